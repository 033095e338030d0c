"""TrainingDiagnostics: the lecture's four diagnostics, live in TensorBoard, for any LightningModule.

On a sampled step (step 0 and every every_n_steps) and only then, hooks are attached:
- a forward hook on each watched layer keeps its output and puts a tensor hook on it for the output's gradient
  (not register_full_backward_hook, which breaks on in-place ops);
- an optimizer step pre-hook keeps every parameter, and a post-hook measures the real change and the gradient.
Every hook removes itself after one use, so other steps pay nothing.
"""

from __future__ import annotations

import fnmatch
import math
import sys
import time
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from . import figures, tbwrite
from .stats import CapturedLayer, CapturedParams, Snapshot, is_activation, summarize
from .verdicts import CHECKS, HealthThresholds, Verdict, judge
from .worker import Worker, figures_job

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


class DiagnosticsConfigError(ValueError):
    """A bad argument of TrainingDiagnostics: the message starts with the argument's name (a CLI adds its prefix)."""


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    dist.all_reduce(t, op=_OPS[op])
    return t


class TrainingDiagnostics(Callback):
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
    ):
        """
        Args:
            every_n_steps: sample step 0 and every this many optimizer steps (0 turns diagnostics off).
            layers: which modules to watch: module paths or class names, glob patterns allowed ('net.layers.*',
                'Tanh'). Default: every torch.nn activation module (Tanh, ReLU, GELU, ...).
            saturation_threshold: |t| above which a bounded activation's output counts as saturated.
            histogram_bins: bins of every histogram (computed on the device).
            histograms_every_n_steps: log histograms at step 0 and every this many steps (a multiple of
                every_n_steps; 0: none; TensorBoard keeps 500 samples per histogram tag anyway).
            figures_every_n_steps: draw the four lecture figures at step 0, every this many steps and at the end
                (a multiple of histograms_every_n_steps; 0: none).
            expected_initial_loss: loss expected at step 0; default ln(classes) where the module has num_classes.
            health: thresholds of the verdicts.
            stats_in_worker: compute a sampled step's statistics in the worker process that also draws the
                figures, when training runs in one process on the CPU (speed only: the same numbers, logged a
                batch later); False computes them in the training process.
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
        self.every_n_steps = every_n_steps  # also read by NamesDataModule: a sampled step starts a batch
        self.patterns = list(layers) if layers else None
        self.saturation_threshold = saturation_threshold
        self.bins = histogram_bins
        self.histograms_every_n_steps = histograms_every_n_steps
        self.figures_every_n_steps = figures_every_n_steps
        self.expected_initial_loss = expected_initial_loss
        self.health = health
        # across the run (saved in checkpoints)
        self.update_history: dict[str, list[tuple[int, float]]] = {}
        self.warned: set[tuple[str, str]] = set()
        # the step being sampled
        self._watched: list[tuple[str, nn.Module]] = []
        self._param_names: dict[int, str] = {}
        self._handles: list = []
        self._layers: list[CapturedLayer] = []
        self._params: list[CapturedParams] = []
        self._before: dict[int, torch.Tensor] = {}  # per optimizer: its rows, once the parameters are saved
        self._buffers: dict[int, tuple] = {}  # per optimizer: (3, n) before / change / gradient, names, shapes
        self._captured_names: set[str] = set()
        self._sampling: int | None = None
        self._stepped = False
        self._optimizers_left = 0
        self._loss: torch.Tensor | None = None
        self.last_snapshot: Snapshot | None = None
        self.last_verdicts: list[Verdict] = []
        self._last_drawable: Snapshot | None = None  # the latest snapshot with histograms, for the figures
        self._last_drawn: int | None = None
        self.stats_in_worker = stats_in_worker
        self._worker: Worker | None = None  # statistics and figures, see worker.py; started when first needed
        self._no_worker = False  # it could not be started: everything inline
        self._running: tuple[L.Trainer, L.LightningModule] | None = None  # for state_dict(), which gets neither

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._watched = self._select(pl_module)
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}

    def _select(self, pl_module: L.LightningModule) -> list[tuple[str, nn.Module]]:
        modules = [(n, m) for n, m in pl_module.named_modules() if n]
        if self.patterns is None:
            return [(n, m) for n, m in modules if is_activation(m)]
        chosen = [
            (n, m)
            for n, m in modules
            if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(type(m).__name__, p) for p in self.patterns)
        ]
        if not chosen:
            raise DiagnosticsConfigError(
                f"layers {self.patterns} matches no module of {type(pl_module).__name__}; "
                "give module paths (see the model summary) or class names such as Tanh"
            )
        return chosen

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running = (trainer, pl_module)
        if self.every_n_steps and not self._watched and trainer.is_global_zero:
            print(
                f"[diagnostics] no layer to watch in {type(pl_module).__name__}: no torch.nn activation modules (a "
                "model may call functional ones, F.relu); activation and gradient statistics are off, weights and "
                "updates are measured; pass layers=[...] (module paths or class names) to choose layers",
                file=sys.stderr,
            )
        tbwrite.speed_up()
        writer = self._writer(trainer)
        if writer is not None and self.every_n_steps:
            writer.add_custom_scalars(custom_scalars_layout())

    # ---------------------------------------------------------------------------------------------- capture

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or self._sampling is not None:
            return
        self._sampling, self._stepped, self._loss = step, False, None
        self._optimizers_left = len(trainer.optimizers)
        self._layers, self._params, self._before, self._captured_names = [], [], {}, set()
        for name, module in self._watched:
            self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._on_pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._on_post_step))

    def _on_forward(self, name: str, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor) or name in self._captured_names:
            return  # first call of the sampled step only
        self._captured_names.add(name)
        # a float32 copy: statistics in float32 whatever the precision (bf16/fp16 under autocast)
        captured = CapturedLayer(name, module, output.detach().to(torch.float32, copy=True))
        self._layers.append(captured)
        if output.requires_grad:

            def keep_grad(grad: torch.Tensor) -> None:
                if captured.grad is None:
                    captured.grad = grad.detach().to(torch.float32, copy=True)

            output.register_hook(keep_grad)

    def _rows(self, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], torch.Tensor, list, list]:
        """The optimizer's parameters, a (3, n) buffer for them kept across samples (allocating a fresh one each
        time costs page faults that doubled the time of the statistics), their names and shapes."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        order = sorted(range(len(params)), key=lambda i: tuple(params[i].shape))  # equal shapes side by side:
        params = [params[i] for i in order]  # summarize reduces each run of them at once
        cached, numel = self._buffers.get(id(optimizer)), sum(p.numel() for p in params)
        if cached is None or cached[0].shape[1] != numel:
            rows = torch.empty(3, numel, dtype=params[0].dtype, device=params[0].device)
            names = [self._param_names.get(id(p), f"param_{i}") for i, p in zip(order, params)]
            cached = self._buffers[id(optimizer)] = (rows, names, [tuple(p.shape) for p in params], order)
        return params, *cached

    @staticmethod
    def _flatten_into(tensors: list[torch.Tensor], out: torch.Tensor) -> None:
        torch.cat([t.detach().reshape(-1) for t in tensors], out=out)

    def _on_pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if not self._stepped:
            params, rows, *_ = self._rows(optimizer)
            self._flatten_into(params, rows[0])
            self._before[id(optimizer)] = rows

    def _on_post_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        rows = self._before.pop(id(optimizer), None)
        if self._stepped or rows is None:
            return
        params, _, names, shapes, order = self._rows(optimizer)
        self._flatten_into(params, rows[1])
        rows[1].sub_(rows[0])  # the real change the optimizer made
        self._flatten_into([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], rows[2])
        self._params.append(CapturedParams(names, shapes, rows, order))
        self._optimizers_left -= 1
        if self._optimizers_left <= 0:  # every optimizer has stepped once
            self._stepped = True
            self._remove_hooks()  # nothing more to see on this step: later steps of the batch run hook-free

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect(trainer, pl_module)  # record what the worker has finished, if anything
        if self._sampling is None:
            return
        if self._loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands on the loss / accumulation steps
            self._loss = loss.detach() if isinstance(loss, torch.Tensor) else None
        if not self._stepped:  # e.g. accumulating gradients: the optimizer has not stepped yet
            return
        self._remove_hooks()
        step, params = self._sampling, _merge(self._params)
        histograms = bool(self.histograms_every_n_steps and step % self.histograms_every_n_steps == 0)
        worker = self._worker_for(trainer, params)
        if worker is not None:
            worker.submit_stats(
                step, self._loss, self._layers, params, self.saturation_threshold, self.bins, histograms
            )
        else:
            reduce = _all_reduce if trainer.world_size > 1 and dist.is_available() and dist.is_initialized() else None
            snapshot = summarize(
                step,
                self._loss,
                self._layers,
                params,
                self.saturation_threshold,
                self.bins,
                histograms=histograms,
                reduce=reduce,
            )
        self._sampling, self._layers, self._params, self._before = None, [], [], {}
        if worker is None:
            self._record(trainer, pl_module, snapshot)

    def _worker_for(self, trainer: L.Trainer, params: CapturedParams | None) -> Worker | None:
        """The worker, when this sample's statistics may go there: one process (no all-reduce), tensors on the CPU
        (a GPU reduces them faster than it could copy them out)."""
        on_cpu = all(x.output.device.type == "cpu" for x in self._layers) and (params is None or params.rows.is_cpu)
        if not (self.stats_in_worker and trainer.world_size == 1 and on_cpu):
            return None
        return self._start_worker()

    def _drop_dead_worker(self) -> None:
        """A worker that died is said so once; statistics and figures are then computed inline."""
        if self._worker is not None and not self._worker.alive():
            lost, code = self._worker.pending["stats"] + self._worker.pending["figures"], self._worker.process.poll()
            self._worker, self._no_worker = None, True
            print(
                f"[diagnostics] the worker process stopped (exit code {code}) with {lost} job(s) unanswered; "
                "statistics and figures in the training process from here",
                file=sys.stderr,
            )

    def _start_worker(self) -> Worker | None:
        self._drop_dead_worker()
        if self._worker is None and not self._no_worker:
            try:
                self._worker = Worker()
            except OSError as e:
                self._no_worker = True
                print(
                    f"[diagnostics] no worker process ({e}); statistics and figures in the training process",
                    file=sys.stderr,
                )
        return self._worker

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # ---------------------------------------------------------------------------------------------- results

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, s: Snapshot) -> None:
        for p in s.weights:
            if p.log10_update_ratio is not None and not math.isnan(p.log10_update_ratio):
                self.update_history.setdefault(p.name, []).append((s.step, p.log10_update_ratio))
        expected = self.expected_initial_loss
        if expected is None and getattr(pl_module, "num_classes", None):
            expected = math.log(pl_module.num_classes)
        window = self.health.update_ratio_window
        history = {name: [v for _, v in points[-window:]] for name, points in self.update_history.items()}
        verdicts = judge(s, self.health, expected, history)
        self.last_snapshot, self.last_verdicts = s, verdicts
        if not trainer.is_global_zero:
            return
        self._log(trainer, s, verdicts)
        if s.has_histograms:
            self._last_drawable = s
            if self.figures_every_n_steps and s.step % self.figures_every_n_steps == 0:  # step 0 included
                self._log_figures(trainer, s)

    def _log(self, trainer: L.Trainer, s: Snapshot, verdicts: list[Verdict]) -> None:
        scalars = snapshot_scalars(s)
        for check in CHECKS:
            mine = [v for v in verdicts if v.check == check]
            if mine:
                scalars[f"health/{check}"] = float(any(not v.ok for v in mine))
        writer = self._writer(trainer)
        if writer is not None:
            tbwrite.add_scalars(writer, scalars, s.step)
            for tag, hist in snapshot_histograms(s).items():
                tbwrite.add_histogram(writer, tag, hist, s.step)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=s.step)
        new = [v for v in verdicts if not v.ok and (v.check, v.subject) not in self.warned]
        for v in new:
            self.warned.add((v.check, v.subject))
            print(f"[diagnostics] step {s.step}: {v.message}", file=sys.stderr)
        if writer is not None:  # one entry per check and step: TensorBoard shows only the last of a tag and step
            for check in dict.fromkeys(v.check for v in new):
                lines = [f"- step {s.step}: {v.message}" for v in new if v.check == check]
                writer.add_text(f"health/{check}", "\n".join(lines), s.step)

    def _log_figures(self, trainer: L.Trainer, s: Snapshot) -> None:
        """Hand the figures of s to the worker process (drawn inline if none can be started)."""
        if self._writer(trainer) is None:
            return
        self._last_drawn = s.step
        worker = self._start_worker()
        if worker is not None:
            worker.submit(figures_job(s, self.update_history))
        else:
            tbwrite.add_png_images(self._writer(trainer), figures.render_pngs(s, self.update_history), s.step)

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, wait: float = 0.0) -> None:
        """Record the worker's answers, in order: statistics (their verdicts and logging may ask for figures, so
        with wait > 0 this goes on until nothing is pending or the time is up) and figures."""
        deadline = time.monotonic() + wait
        while self._worker is not None and sum(self._worker.pending.values()):
            answers = self._worker.ready(max(deadline - time.monotonic(), 0.0) if wait else 0.0)
            for kind, step, result in answers:
                if isinstance(result, str):
                    print(f"[diagnostics] {kind} of step {step} failed: {result}", file=sys.stderr)
                elif kind == "stats":
                    self._record(trainer, pl_module, result)
                elif self._writer(trainer) is not None:
                    tbwrite.add_png_images(self._writer(trainer), result, step)
            if not wait or not answers:
                break
        if wait:
            self._drop_dead_worker()
        if wait and self._worker is not None and self._worker.pending["stats"]:  # alive, but too slow
            print(
                f"[diagnostics] the worker process did not answer for {self._worker.pending['stats']} sampled "
                "step(s); their statistics are lost",
                file=sys.stderr,
            )

    def _close_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close(wait=0.0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module, wait=120.0)  # every sampled step recorded
        s = self._last_drawable
        if self.figures_every_n_steps and trainer.is_global_zero and s is not None and s.step != self._last_drawn:
            self._log_figures(trainer, s)  # the figures of the last step with histograms
        self._collect(trainer, pl_module, wait=120.0)
        self._close_worker()
        self._running = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close_worker()  # after an exception: stop the worker
        self._running = None

    @staticmethod
    def _writer(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    # ---------------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        if self._running is not None:  # a checkpoint holds every sampled step before it
            self._collect(*self._running, wait=120.0)
        return {
            "update_history": {k: [list(p) for p in v] for k, v in self.update_history.items()},
            "warned": sorted(list(w) for w in self.warned),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.update_history = {k: [tuple(p) for p in v] for k, v in state_dict.get("update_history", {}).items()}
        self.warned = {tuple(w) for w in state_dict.get("warned", [])}


def _merge(captured: list[CapturedParams]) -> CapturedParams | None:
    """One CapturedParams for all optimizers."""
    if len(captured) <= 1:
        return captured[0] if captured else None
    rows = torch.cat([c.rows for c in captured], dim=1)
    offsets = [sum(len(c.names) for c in captured[:i]) for i in range(len(captured))]
    order = [o + i for c, o in zip(captured, offsets) for i in (c.order or range(len(c.names)))]
    return CapturedParams([n for c in captured for n in c.names], [s for c in captured for s in c.shapes], rows, order)


# ------------------------------------------------------------------------------------------- what is logged


def snapshot_scalars(s: Snapshot) -> dict[str, float]:
    out: dict[str, float] = {}
    if s.loss is not None:
        out["sampled/loss"] = s.loss  # the loss of the sampled step's minibatch, before its update (step 0: init)
    for x in s.layers:
        out[f"act/mean/{x.name}"] = x.mean
        out[f"act/std/{x.name}"] = x.std
        if x.saturation is not None:
            out[f"act/saturation/{x.name}"] = 100 * x.saturation  # percent, as the lecture prints it
        out[f"act/dead/{x.name}"] = 100 * x.dead
        if x.grad_std is not None:
            out[f"grad/mean/{x.name}"] = x.grad_mean
            out[f"grad/std/{x.name}"] = x.grad_std
    for p in s.weights:
        if p.grad_std is not None:
            out[f"weight/grad_mean/{p.name}"] = p.grad_mean
            out[f"weight/grad_std/{p.name}"] = p.grad_std
        if p.grad_data_ratio is not None:
            out[f"weight/grad_data_ratio/{p.name}"] = p.grad_data_ratio
    for p in s.params:
        if p.log10_update_ratio is not None and math.isfinite(p.log10_update_ratio):
            out[f"update/log10_ratio/{p.name}"] = p.log10_update_ratio
    if s.params:
        out["update/reference"] = -3.0  # the lecture's 1e-3 line, so the custom-scalars chart can show it
    return out


def snapshot_histograms(s: Snapshot) -> dict:
    out = {}
    for x in s.layers:
        if x.hist is not None:
            out[f"act_hist/{x.name}"] = x.hist
        if x.grad_hist is not None:
            out[f"grad_hist/{x.name}"] = x.grad_hist
    for p in s.weights:
        if p.grad_hist is not None:
            out[f"weight_grad_hist/{p.name}"] = p.grad_hist
    return out


def custom_scalars_layout() -> dict:
    """TensorBoard's Custom Scalars tab: each family one multi-line chart over all layers."""
    m = lambda *tags: ["Multiline", list(tags)]  # noqa: E731
    return {
        "1 activations": {
            "std": m(r"act/std/.*"),
            "saturated %": m(r"act/saturation/.*"),
            "mean": m(r"act/mean/.*"),
            "dead units %": m(r"act/dead/.*"),
        },
        "2 gradients": {"output-gradient std": m(r"grad/std/.*"), "output-gradient mean": m(r"grad/mean/.*")},
        "3 weight gradients": {
            "grad:data": m(r"weight/grad_data_ratio/.*"),
            "grad std": m(r"weight/grad_std/.*"),
        },
        "4 updates": {"log10(update:data), reference -3": m(r"update/log10_ratio/.*", r"update/reference")},
        "health": {"failing checks (1 = failing)": m(r"health/.*")},
    }
