"""TrainingDiagnostics: the lecture's four diagnostics, live in TensorBoard (or any logger), for any LightningModule.

The callback is put together from one part per job, each in a file of its own (each a mixin that sets up its own
state in its _init_* method):
- capture.py: the hooks of a sampled step, what they measure, and what the verdicts need to know besides;
- schedule.py: which steps are sampled, where their statistics are computed (inline or the worker process), the
  workers' lifecycle and what a script's exit waits for;
- logs.py: the verdicts of each sample, and what goes to the loggers and to stderr;
- figure_jobs.py: where the figures go, handed to their worker process.
This file holds the arguments, the fit's start and end, and what a checkpoint keeps.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .capture import Capture
from .figure_jobs import FigureJobs
from .logs import Logging
from .outputs import custom_scalars_layout, flat_scalars, snapshot_series
from .schedule import EXIT_WAIT, Scheduling, _all_reduce
from .select import (
    Watched,
    after_channels_first,
    chosen_layers,
    default_layers,
    groups,
    normalised_groups,
    untrained_parts,
)
from .stats import is_activation
from .verdicts import HealthThresholds

__all__ = ["DiagnosticsConfigError", "TrainingDiagnostics", "custom_scalars_layout", "flat_scalars", "snapshot_series"]
_ = (EXIT_WAIT, _all_reduce)  # where they used to be: callback.EXIT_WAIT, callback._all_reduce


class DiagnosticsConfigError(ValueError):
    """A bad argument of TrainingDiagnostics: the message starts with the argument's name (a CLI adds its prefix)."""


class TrainingDiagnostics(Capture, Scheduling, Logging, FigureJobs, Callback):
    """Activation, gradient, weight-gradient and update:data statistics every N steps, with health verdicts."""

    def __init__(
        self,
        every_n_steps: int = 100,
        layers: list[str] | None = None,
        saturation_threshold: float = 0.97,
        histogram_bins: int = 60,
        histograms_every_n_steps: int = 1_000,
        figures_every_n_steps: int = 10_000,
        expected_initial_loss: float | None = None,
        health: HealthThresholds = HealthThresholds(),
        stats_in_worker: bool = True,
        verbose: bool = True,
    ):
        """
        Args:
            every_n_steps: sample step 0 and every this many optimizer steps (0 turns diagnostics off).
            layers: which modules to watch: module paths or class names, glob patterns allowed ('net.layers.*',
                'Tanh'). Default: every torch.nn activation module and recurrent layer; in a model without
                activation modules (F.relu), its repeated blocks, else its Linear/Conv layers (see select.py).
            saturation_threshold: |t| above which a bounded activation's output counts as saturated.
            histogram_bins: bins of every histogram (computed on the device).
            histograms_every_n_steps: log histograms at step 0 and every this many steps (a multiple of
                every_n_steps; 0: none; TensorBoard keeps 500 samples per histogram tag anyway).
            figures_every_n_steps: draw the four lecture figures at step 0, every this many steps and at the end
                (a multiple of histograms_every_n_steps; 0: none).
            expected_initial_loss: loss expected at step 0; default ln(classes) where the module has num_classes.
            health: thresholds of the verdicts.
            stats_in_worker: from the run's 10th sampled step on (a short run never pays for the process),
                compute a sampled step's statistics in a worker process when training runs in one process on the
                CPU of a machine with 3 or more CPUs (speed only: the same numbers, logged a batch later; with two,
                the worker would slow training more than it saves); False computes them in the training process.
                Figures are always drawn by a worker process of their own, at low priority.
            verbose: print what is watched and where it goes at train start, and each new failing verdict, to
                stderr (False: for a caller that reports them itself, as the `diagnose` command does).
        """
        super().__init__()
        if every_n_steps < 0:
            raise DiagnosticsConfigError(f"every_n_steps must be 0 (off) or more, got {every_n_steps}")
        if figures_every_n_steps and not histograms_every_n_steps:
            raise DiagnosticsConfigError("figures_every_n_steps needs histograms: set histograms_every_n_steps too")
        for name, value, base, base_name in [
            ("histograms_every_n_steps", histograms_every_n_steps, every_n_steps, "every_n_steps"),
            ("figures_every_n_steps", figures_every_n_steps, histograms_every_n_steps, "histograms_every_n_steps"),
        ]:
            if value < 0 or (value and base and value % base):
                raise DiagnosticsConfigError(f"{name} ({value}) must be 0 or a multiple of {base_name} ({base})")
        if not 0 < saturation_threshold < 1:
            raise DiagnosticsConfigError(f"saturation_threshold must be in (0, 1), got {saturation_threshold}")
        if histogram_bins < 2:
            raise DiagnosticsConfigError(f"histogram_bins must be at least 2, got {histogram_bins}")
        self.every_n_steps = every_n_steps
        self.patterns = list(layers) if layers else None
        self.saturation_threshold = saturation_threshold
        self.bins = histogram_bins
        self.histograms_every_n_steps = histograms_every_n_steps
        self.figures_every_n_steps = figures_every_n_steps
        self.expected_initial_loss = expected_initial_loss
        self.health = health
        self.stats_in_worker = stats_in_worker
        self.verbose = verbose
        self.watched: list[Watched] = []  # chosen at fit start
        self._running: tuple[L.Trainer, L.LightningModule] | None = None  # for state_dict(), which gets neither
        self._init_capture()
        self._init_scheduling()
        self._init_logging()
        self._init_figures()

    # --------------------------------------------------------------------------------------- what to watch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Layers are chosen here, after `configure_model` (which runs after `setup`) has built them."""
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        if self.patterns is None:
            chosen, self._rule = default_layers(pl_module)
            trained = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
            skipped = untrained_parts(pl_module, trained) if trained else []
            inside = lambda n, parts: any(n == s or n.startswith(s + ".") for s in parts)  # noqa: E731
            if any(inside(n, skipped) for n, _ in chosen):
                chosen = [(n, m) for n, m in chosen if not inside(n, skipped)]
                self._rule += (
                    f"; not in {', '.join(skipped)}: no parameter there trains (an EMA or teacher copy, a frozen "
                    "part), pass layers=[...] to watch it"
                )
        else:
            chosen, self._rule = chosen_layers(pl_module, self.patterns), f"layers={self.patterns}"
            if not chosen:
                raise DiagnosticsConfigError(
                    f"layers {self.patterns} matches no module of {type(pl_module).__name__}; "
                    "give module paths (see the model summary) or class names such as Tanh"
                )
        group = groups(pl_module, [n for n, _ in chosen])
        self.watched = [
            Watched(n, m, group[n], is_activation(m) and after_channels_first(pl_module, n)) for n, m in chosen
        ]
        self._depth = {w.name: i for i, w in enumerate(self.watched)}
        self._depth |= {name: i for i, (name, _) in enumerate(pl_module.named_parameters())}
        self._normalised = normalised_groups(pl_module, group)
        tables = [m for m in pl_module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
        self._tables = {self._param_names[id(m.weight)] for m in tables if id(m.weight) in self._param_names}
        self._order, self.output_layers, self._outputs_found = None, set(), False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running = (trainer, pl_module)
        if not self.every_n_steps:
            return
        if trainer.is_global_zero and self.verbose:
            self._say_what_is_watched(trainer, pl_module)
        writer = self._writer(trainer)
        if writer is not None:
            writer.add_custom_scalars(custom_scalars_layout())
        self._samples, self._figure_jobs = 0, []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module, wait=120.0)  # every sampled step recorded
        s = self._last_drawable
        if self.figures_every_n_steps and trainer.is_global_zero and s is not None and s.step != self._last_drawn:
            # the figures of the last step with histograms, titled with the step the run ended at (after it)
            self._log_figures(trainer, dataclasses.replace(s, end_step=trainer.global_step))
        self._draw_figures()
        self._finish_workers()
        self._running = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._draw_figures()  # after an exception: the figures asked for still get drawn
        self._finish_workers()  # and the workers do what they have, then stop
        self._sampling, self._running = None, None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # ---------------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        if self._running is not None:  # a checkpoint holds every sampled step before it
            self._collect(*self._running, wait=120.0)
        return {
            "update_history": {k: [list(p) for p in v] for k, v in self.update_history.items()},
            "warned": sorted(list(w) for w in self.warned),
            "lr_shortfall": {k: [list(p) for p in v] for k, v in self.lr_shortfall.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.update_history = {k: [tuple(p) for p in v] for k, v in state_dict.get("update_history", {}).items()}
        self.warned = {tuple(w) for w in state_dict.get("warned", [])}
        self.lr_shortfall = {k: [tuple(p) for p in v] for k, v in state_dict.get("lr_shortfall", {}).items()}
