"""TrainingDiagnostics: the lecture's four diagnostics, live in TensorBoard (or any logger), for any LightningModule.

On a sampled step (step 0 and every every_n_steps) and only then, hooks are attached:
- a forward hook on each watched layer keeps its output and puts a tensor hook on it for the output's gradient
  (not register_full_backward_hook, which breaks on in-place ops);
- an optimizer step pre-hook keeps every parameter, and a post-hook measures the real change and the gradient.
They do nothing once every optimizer has stepped, and are removed at the end of the batch (never from inside a
hook: torch would be iterating the hooks, other callbacks' included), so other steps pay nothing.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import sys
import time
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from . import figures, tbwrite
from .outputs import (
    custom_scalars_layout,
    flat_scalars,
    snapshot_histograms,
    snapshot_scalars,
    snapshot_series,
    tensorboard_scalars,
)
from .select import (
    Watched,
    after_channels_first,
    chosen_layers,
    default_layers,
    describe,
    groups,
    normalised_groups,
    untrained_parts,
)
from .stats import CapturedLayer, CapturedParams, Snapshot, is_activation, summarize
from .verdicts import CHECKS, Context, HealthThresholds, Verdict, judge, optimizer_family
from .worker import Worker, figures_job

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX} if dist.is_available() else {}
MAX_CALLS = 8  # a module called more often in one step (an RNN cell in a loop): its first calls are measured

__all__ = ["DiagnosticsConfigError", "TrainingDiagnostics", "custom_scalars_layout", "flat_scalars", "snapshot_series"]


class DiagnosticsConfigError(ValueError):
    """A bad argument of TrainingDiagnostics: the message starts with the argument's name (a CLI adds its prefix)."""


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    dist.all_reduce(t, op=_OPS[op])
    return t


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now: a forward called then is gradient checkpointing's
    recomputation of one already measured, not a real forward."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _measured_part(output) -> tuple[torch.Tensor | None, str]:
    """The float tensor measured in a module's output, and what it is when the output is not a tensor itself."""
    if isinstance(output, torch.Tensor):
        return output, ""
    if isinstance(output, dict):
        items = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        return None, ""
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            where = (
                f"key {key!r} of the dict"
                if isinstance(output, dict)
                else f"element {key} of the {type(output).__name__}"
            )
            return value, f"its output is a {type(output).__name__} of {len(items)}: {where} is measured"
    return None, ""


def _say(message: str) -> None:
    print(f"[diagnostics] {message}", file=sys.stderr)


_FINISHING: list[Worker] = []  # workers still drawing after their fit returned, in any TrainingDiagnostics


def _settle(worker: Worker, timeout: float) -> bool:
    """Wait for a finished worker to exit; the figures it died without drawing are drawn here. True when done."""
    if not worker.wait(timeout):
        return False
    if worker in _FINISHING:
        _FINISHING.remove(worker)
    jobs = [job for kind, job in worker.unanswered if kind == "figures"]
    worker.unanswered.clear()
    if jobs:
        _say(
            f"the figures worker process stopped (exit code {worker.process.returncode}) before drawing step(s) "
            f"{', '.join(str(job[1]) for job in jobs)}; drawing them in this process"
        )
        writers: dict = {}
        for _, step, (snapshot, history, destination) in jobs:
            figures.write(figures.render_pngs(snapshot, history), step, destination, writers)
        for writer in writers.values():
            writer.close()
    return True


EXIT_WAIT = 0.5  # seconds a script's exit waits for figures still being drawn (TrainingDiagnostics.wait() for more)


@atexit.register
def _settle_all(timeout: float = EXIT_WAIT) -> None:
    """At exit, for up to EXIT_WAIT seconds: the last figures written (or drawn here, if their worker died).
    Longer is not needed: a worker that is alive finishes the figures already sent to it and writes them itself
    after this process has gone (its stdin closes; see worker.py). Waiting for it cost a short script's exit 1.4 s
    on a quiet machine and up to 42 s under load (issue 21); `wait()` waits on purpose, as the CLI does."""
    deadline = time.monotonic() + timeout
    for worker in list(_FINISHING):
        _settle(worker, max(deadline - time.monotonic(), 0.0))


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
                CPU (speed only: the same numbers, logged a batch later); False computes them in the training
                process. Figures are always drawn by a worker process of their own, at low priority.
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
        # across the run (saved in checkpoints)
        self.update_history: dict[str, list[tuple[int, float]]] = {}
        self.warned: set[tuple[str, str]] = set()
        # chosen at fit start
        self.watched: list[Watched] = []
        self._param_names: dict[int, str] = {}
        # the step being sampled
        self._sampling: int | None = None
        self._handles: list = []
        self._layers: list[CapturedLayer] = []
        self._calls: dict[str, int] = {}  # forward calls of each watched module in this step
        self._no_grad_yet: dict[str, list[CapturedLayer]] = {}  # measured under no_grad (reentrant checkpointing)
        self._order: dict[str, int] | None = None  # first sample: each watched call's and parameterised call's rank
        self._outputs_found = False
        self.output_layers: set[str] = set()  # watched layers after which no parameterised module runs
        self._normalised: set[str] = set()  # parts of the model with normalisation layers (see select)
        self._trained_how: dict[str, str] = {}  # parameter -> its optimizer's family (see verdicts.optimizer_family)
        self._lr_set: dict[str, float] = {}  # parameter -> the learning rate set (its scheduler's base)
        self._at_step: dict[int, tuple[dict[str, float], set[str]]] = {}  # sampled step -> lr shortfall, frozen
        self.lr_shortfall: dict[str, list[tuple[int, float]]] = {}  # aligned with update_history (see Context)
        self._unmeasured: dict[str, str] = {}  # watched module -> why its output was not measured (said once)
        self._params: list[CapturedParams] = []
        self._before: dict[int, torch.Tensor] = {}  # per optimizer: its rows, once the parameters are saved
        self._buffers: dict[int, tuple] = {}  # per optimizer: (3, n) before / change / gradient, names, shapes
        self._stepped_optimizers: set[int] = set()
        self._later_micro_batch = False  # accumulating gradients: a later micro-batch of the sampled step
        self._loss: torch.Tensor | None = None
        self._grad_scale = 1.0  # the GradScaler's scale in this step's backward (16-mixed): output grads / it
        # results
        self.last_snapshot: Snapshot | None = None
        self.last_verdicts: list[Verdict] = []
        self._last_drawable: Snapshot | None = None  # the latest snapshot with histograms, for the figures
        self._last_drawn: int | None = None
        self._workers: dict[str, Worker] = {}  # "stats" and "figures" processes, see worker.py
        self._no_worker: set[str] = set()  # kinds whose worker could not be started or died: done inline
        self._samples = 0  # sampled steps so far in this fit
        self._figure_jobs: list[tuple] = []  # figures asked for before the figures worker starts
        self._finishing: list[Worker] = []  # workers drawing its last figures after fit (see wait())
        self._depth: dict[str, int] = {}  # each watched layer's and parameter's position: TensorBoard tags sort by it
        self._writers: dict = {}  # TensorBoard event files of figures drawn in this process
        self._running: tuple[L.Trainer, L.LightningModule] | None = None  # for state_dict(), which gets neither

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
        self._order, self.output_layers, self._outputs_found = None, set(), False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running = (trainer, pl_module)
        if not self.every_n_steps:
            return
        if trainer.is_global_zero and self.verbose:
            self._say_what_is_watched(trainer, pl_module)
        tbwrite.speed_up()
        writer = self._writer(trainer)
        if writer is not None:
            writer.add_custom_scalars(custom_scalars_layout())
        self._samples, self._figure_jobs = 0, []

    def _say_what_is_watched(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = type(pl_module).__name__
        if self.watched:
            _say(f"watching {describe(self.watched)} of {model} every {self.every_n_steps} steps ({self._rule})")
        else:
            _say(
                f"no layer to watch in {model}: no torch.nn activation module, block, Linear or Conv layer; "
                "activation and gradient statistics are off, weights and updates are measured; pass "
                "layers=[...] (module paths or class names) to choose layers"
            )
        if not trainer.loggers:
            _say("no logger (logger=False): nothing is recorded; failing verdicts are printed here only")
        elif self._writer(trainer) is None:
            kinds = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            figures_note = ""
            if self.figures_every_n_steps:
                figures_note = f"; the figures are written as PNG files to {self._figure_destination(trainer)[1]}"
            _say(f"no TensorBoard logger: scalars go to {kinds}; histograms are not recorded{figures_note}")

    # ---------------------------------------------------------------------------------------------- capture

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._sampling is not None:  # accumulating: this sample's first micro-batch is the one measured
            self._later_micro_batch = True
        if not self.every_n_steps or step % self.every_n_steps or self._sampling is not None:
            return
        self._sampling, self._loss, self._grad_scale, self._later_micro_batch = step, None, 1.0, False
        self._layers, self._params, self._before, self._calls = [], [], {}, {}
        self._stepped_optimizers, self._no_grad_yet = set(), {}
        for w in self.watched:
            self._handles.append(w.module.register_forward_hook(partial(self._on_forward, w)))
        if not self._outputs_found:  # the first sample: which watched layers are output layers (see _find_outputs)
            self._order, self._rank = {}, 0
            for name, module in pl_module.named_modules():  # not the root: its forward (if any) returns last
                if name and any(True for _ in module.parameters(recurse=False)):
                    self._handles.append(module.register_forward_hook(self._on_parameterised_forward))
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._on_pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._on_post_step))

    @property
    def _stepped(self) -> bool:
        return bool(self._running) and len(self._stepped_optimizers) >= len(self._running[0].optimizers)

    def _on_parameterised_forward(self, module, inputs, output) -> None:
        if self._order is not None and not self._stepped and not _in_backward():
            self._order[""] = self._rank = self._rank + 1  # the latest call of a module with parameters of its own

    def _on_forward(self, w: Watched, module, inputs, output) -> None:
        if self._stepped or self._later_micro_batch:
            return  # after the update (manual optimization), or another micro-batch of the same step
        tensor, what = _measured_part(output)  # RNNs: (output, state): element 0, as select.py says
        if tensor is None:
            self._unmeasured.setdefault(w.name, f"its output is a {type(output).__name__}, not a float tensor")
            return
        if _in_backward():  # checkpointing recomputes it: measured at its real call, whose gradient may only be here
            waiting = self._no_grad_yet.get(w.name)
            if waiting and tensor.requires_grad:
                self._keep_grad(tensor, waiting.pop(0))
            return
        if what and w.kind not in ("RNN", "LSTM", "GRU"):
            self._unmeasured.setdefault(w.name, what)
        calls = self._calls[w.name] = self._calls.get(w.name, 0) + 1
        if calls > MAX_CALLS:
            self._unmeasured.setdefault(w.name, f"called more than {MAX_CALLS} times a step; its first are measured")
            return
        t = tensor.detach()
        if t.dim() >= 3 and w.channel_dim(t.dim()) != t.dim() - 1:
            t = t.movedim(1, -1)  # channels last: a unit is a channel, dead when it is for every position
        # a float32 copy: statistics in float32 whatever the precision (bf16/fp16 under autocast)
        t = t.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        name = w.name if calls == 1 else f"{w.name}#{calls}"  # a reused module: each call a layer of its own
        captured = CapturedLayer(name, None, t, kind=w.kind, bounds=w.bounds, group=w.group)
        self._layers.append(captured)
        if self._order is not None:
            self._order[name] = self._rank = self._rank + 1
        if tensor.requires_grad:
            self._keep_grad(tensor, captured)
        elif torch.is_grad_enabled() is False:  # a checkpointed segment (use_reentrant=True) runs without grad
            self._no_grad_yet.setdefault(w.name, []).append(captured)

    def _keep_grad(self, tensor: torch.Tensor, captured: CapturedLayer) -> None:
        def keep_grad(grad: torch.Tensor) -> None:
            if captured.grad is None and not self._stepped:
                g = grad.detach().to(torch.float32, copy=True)
                captured.grad = g if self._grad_scale == 1.0 else g.div_(self._grad_scale)

        tensor.register_hook(keep_grad)

    def _find_outputs(self) -> None:
        """After the first sample: the watched layers called after the last module with parameters of its own
        (a VAE's Sigmoid before its BCE): output layers, saturated on purpose (see verdicts)."""
        if self._order is not None:
            last = self._order.get("", -1)
            self.output_layers = {n for n, rank in self._order.items() if n and rank > last}
            self._order, self._outputs_found = None, True  # done: not measured again

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Under 16-mixed the loss is multiplied by the GradScaler's scale before backward: so is every gradient
        the tensor hooks see (the weights' are unscaled by Lightning before the optimizer steps)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._sampling is not None and not self._stepped and scaler is not None and scaler.is_enabled():
            self._grad_scale = float(scaler.get_scale())

    def _rows(self, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], torch.Tensor, list, list]:
        """The optimizer's parameters, a (3, n) buffer for them kept across samples (allocating a fresh one each
        time costs page faults that doubled the time of the statistics), their names and shapes."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        order = sorted(range(len(params)), key=lambda i: tuple(params[i].shape))  # equal shapes side by side:
        params = [params[i] for i in order]  # summarize reduces each run of them at once
        cached, numel = self._buffers.get(id(optimizer)), sum(p.numel() for p in params)
        if cached is None or cached[0].shape[1] != numel:
            dtype = params[0].dtype if params[0].dtype in (torch.float32, torch.float64) else torch.float32
            rows = torch.empty(3, numel, dtype=dtype, device=params[0].device)
            names = [self._param_names.get(id(p), f"param_{i}") for i, p in zip(order, params)]
            cached = self._buffers[id(optimizer)] = (rows, names, [tuple(p.shape) for p in params], order)
        return params, *cached

    @staticmethod
    def _flatten_into(tensors: list[torch.Tensor], out: torch.Tensor) -> None:
        torch.cat([t.detach().reshape(-1).to(out.dtype) for t in tensors], out=out)

    def _on_pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if id(optimizer) not in self._stepped_optimizers:
            params, rows, *_ = self._rows(optimizer)
            self._flatten_into(params, rows[0])
            self._before[id(optimizer)] = rows

    def _on_post_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        rows = self._before.pop(id(optimizer), None)
        if rows is None or id(optimizer) in self._stepped_optimizers:
            return  # its first step of the sample is measured; later ones (manual optimization) are not
        params, _, names, shapes, order = self._rows(optimizer)
        self._flatten_into(params, rows[1])
        rows[1].sub_(rows[0])  # the real change the optimizer made (clipped, unscaled, momentum: all included)
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params
        ]
        self._flatten_into(grads, rows[2])  # (a sparse gradient, nn.Embedding(sparse=True), made dense)
        self._params.append(CapturedParams(names, shapes, rows, order))
        family = optimizer_family(optimizer)
        shortfall, frozen = self._at_step.setdefault(self._sampling, ({}, set()))
        for group in optimizer.param_groups:
            lr, base = group.get("lr"), group.get("initial_lr", group.get("lr"))
            # log10(lr set / lr used): a warm-up's or a decay's factor; NaN where the lr is 0 (no update to judge)
            lr, base = float(lr or 0.0), float(base or 0.0)  # (a tensor lr too)
            gap = math.log10(base / lr) if lr > 0 and base > 0 else math.nan
            for p in group["params"]:
                name = self._param_names.get(id(p), "")
                self._trained_how[name], shortfall[name], self._lr_set[name] = family, gap, base
                if p.grad is None:
                    frozen.add(name)
        self._stepped_optimizers.add(id(optimizer))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self._workers.get("stats")
        if stats is not None and stats.pending["stats"]:  # (every step: so nothing else before the sample check)
            self._collect(trainer, pl_module)  # record what the worker has finished, if anything
        if self._sampling is None:
            return
        if self._loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands on the loss / accumulation steps
            self._loss = loss.detach() if isinstance(loss, torch.Tensor) else None
        if not self._stepped and trainer.global_step == self._sampling:
            return  # e.g. accumulating gradients: the optimizer has not stepped yet
        self._remove_hooks()
        self._find_outputs()
        step, params = self._sampling, _merge(self._params)
        if params is None:  # Lightning counted a step no optimizer made: the GradScaler skipped it
            for x in self._layers:
                x.grad = None
            _say(
                f"step {step}: the optimizer step was skipped (the gradient scaler found inf/NaN gradients at "
                f"scale {self._grad_scale:g}): its loss and activations are recorded, not its gradients or update"
            )
        self._report_unmeasured(trainer)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        last = step + self.every_n_steps >= total  # the run's last sample: its histograms make the end's figures
        histograms = bool(self.histograms_every_n_steps and (step % self.histograms_every_n_steps == 0 or last))
        self._samples += 1
        if self._samples == self.INLINE_SAMPLES:
            self._draw_figures()  # a long run: the figures of step 0 now
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

    def _report_unmeasured(self, trainer: L.Trainer) -> None:
        """Each watched module whose output was not measured, once, with why: never skipped silently."""
        for w in self.watched:
            if w.name not in self._calls and w.name not in self._unmeasured:
                self._unmeasured[w.name] = (
                    "it was not called in the sampled step (its parent may use its weights directly, as "
                    "MultiheadAttention does with out_proj)"
                )
        for name, why in self._unmeasured.items():
            if ("unmeasured", name) not in self.warned and trainer.is_global_zero:
                self.warned.add(("unmeasured", name))
                _say(f"{name} is watched but not measured (in full): {why}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # ----------------------------------------------------------------------------------- the worker process

    INLINE_SAMPLES = 10  # the first samples of a fit are computed inline: a short run never starts a stats worker

    def _worker_for(self, trainer: L.Trainer, params: CapturedParams | None) -> Worker | None:
        """The statistics worker, when this sample may go there: one process (no all-reduce), tensors on the CPU
        (a GPU reduces them faster than it could copy them out), past the first INLINE_SAMPLES samples, the
        worker up (torch imported). Otherwise inline (~1.4 ms), unless earlier samples are still queued there
        (steps stay in order)."""
        on_cpu = all(x.output.device.type == "cpu" for x in self._layers) and (params is None or params.rows.is_cpu)
        if not (self.stats_in_worker and trainer.world_size == 1 and on_cpu) or self._samples < self.INLINE_SAMPLES:
            return None
        worker = self._start_worker("stats")
        if worker is not None and (worker.pending["stats"] or worker.ready_event.is_set()):
            return worker
        return None

    def _drop_dead_worker(self, kind: str) -> None:
        """A worker that died is said so once; its work is then done inline (the figures it had not drawn too)."""
        worker = self._workers.get(kind)
        if worker is not None and not worker.alive():
            worker.wait(1.0)  # its last answers read
            del self._workers[kind]
            self._no_worker.add(kind)
            code = worker.process.returncode
            if kind == "figures":
                jobs = [job for k, job in worker.unanswered if k == "figures"]
                self._figure_jobs[:0] = jobs
                steps = ", ".join(str(job[1]) for job in jobs) or "none"
                _say(
                    f"the figures worker process stopped (exit code {code}) before drawing step(s) {steps}; "
                    "drawing them in this process"
                )
            else:
                _say(
                    f"the stats worker process stopped (exit code {code}) with {worker.pending['stats']} sampled "
                    "step(s) unanswered (lost); statistics in the training process from here"
                )

    def _start_worker(self, kind: str) -> Worker | None:
        self._drop_dead_worker(kind)
        if kind not in self._workers and kind not in self._no_worker:
            try:  # figures: at the lowest priority, on CPU time that training leaves idle; no torch needed
                self._workers[kind] = Worker(nice=19, warm=False) if kind == "figures" else Worker()
            except OSError as e:
                self._no_worker.add(kind)
                _say(f"no {kind} worker process ({e}); {kind} in the training process")
        return self._workers.get(kind)

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, wait: float = 0.0) -> None:
        """Record the statistics worker's answers, in order; with wait > 0, until none is pending or the time is
        up. (Figures are never waited for: their worker writes them itself and says when one fails.)"""
        deadline = time.monotonic() + wait
        while (worker := self._workers.get("stats")) is not None and worker.pending["stats"]:
            answers = worker.ready(max(deadline - time.monotonic(), 0.0) if wait else 0.0)
            for kind, step, result in answers:
                if isinstance(result, str):
                    _say(f"{kind} of step {step} failed: {result}")
                else:
                    self._record(trainer, pl_module, result)
            if not wait or not answers:
                break
        if wait:
            self._drop_dead_worker("stats")
        if wait and (worker := self._workers.get("stats")) is not None and worker.pending["stats"]:  # too slow
            _say(f"the worker process did not answer for {worker.pending['stats']} sampled step(s); they are lost")

    def _finish_workers(self) -> None:
        for worker in self._workers.values():
            worker.finish()
            _FINISHING.append(worker)
            self._finishing.append(worker)
        self._workers = {}
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait up to timeout seconds for the figures still being drawn after fit returned (the worker writes them
        on its own, so training never waits for them); True when they are all written."""
        deadline = time.monotonic() + timeout
        done = [_settle(w, max(deadline - time.monotonic(), 0.0)) for w in self._finishing]
        self._finishing = [w for w, settled in zip(self._finishing, done) if not settled]
        return all(done)

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

    # ---------------------------------------------------------------------------------------------- results

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, s: Snapshot) -> None:
        shortfall, frozen = self._at_step.pop(s.step, ({}, set()))
        for p in s.weights:
            if p.log10_update_ratio is not None and not math.isnan(p.log10_update_ratio):
                self.update_history.setdefault(p.name, []).append((s.step, p.log10_update_ratio))
                self.lr_shortfall.setdefault(p.name, []).append((s.step, shortfall.get(p.name, 0.0)))
        expected = self.expected_initial_loss
        if expected is None and getattr(pl_module, "num_classes", None):
            expected = math.log(pl_module.num_classes)
        window = self.health.update_ratio_window
        history = {name: [v for _, v in points[-window:]] for name, points in self.update_history.items()}
        context = Context(
            optimizer=self._trained_how,
            lr_shortfall={name: [v for _, v in points[-window:]] for name, points in self.lr_shortfall.items()},
            lr_set=self._lr_set,
            frozen=frozen,
            output_layers=self.output_layers,
            normalised_groups=self._normalised,
            history_steps={name: [i for i, _ in points[-window:]] for name, points in self.update_history.items()},
        )
        verdicts = judge(s, self.health, expected, history, context)
        self.last_snapshot, self.last_verdicts = s, verdicts
        if not trainer.is_global_zero:
            return
        self._log(trainer, s, verdicts)
        if s.has_histograms:
            self._last_drawable = s
            if self.figures_every_n_steps and s.step % self.figures_every_n_steps == 0:  # step 0 included
                self._log_figures(trainer, s)

    def _log(self, trainer: L.Trainer, s: Snapshot, verdicts: list[Verdict]) -> None:
        """Scalars to every logger (in TensorBoard, a chart per layer in the run itself: see outputs.py);
        histograms and the verdicts' text to TensorBoard; new failures to stderr."""
        health = {}
        for check in CHECKS:
            mine = [v for v in verdicts if v.check == check]
            if mine:
                health[f"health/{check}"] = float(any(not v.ok for v in mine))
        writer = self._writer(trainer)
        for logger in trainer.loggers:
            if writer is not None and isinstance(logger, TensorBoardLogger) and logger.experiment is writer:
                scalars = {**snapshot_scalars(s), **tensorboard_scalars(s, self._depth), **health}
                tbwrite.add_scalars(writer, scalars, s.step)  # one event for all
            else:
                logger.log_metrics({**flat_scalars(s), **health}, step=s.step)
        if writer is not None:
            for tag, hist in snapshot_histograms(s).items():
                tbwrite.add_histogram(writer, tag, hist, s.step)
        new = [v for v in verdicts if not v.ok and (v.check, v.subject) not in self.warned]
        for v in new:
            self.warned.add((v.check, v.subject))
            if self.verbose:
                _say(f"step {s.step}: {v.message}")
        if writer is not None:  # one entry per check and step: TensorBoard shows only the last of a tag and step
            for check in dict.fromkeys(v.check for v in new):
                lines = [f"- step {s.step}: {v.message}" for v in new if v.check == check]
                writer.add_text(f"health/{check}", "\n".join(lines), s.step)

    def _figure_destination(self, trainer: L.Trainer) -> tuple[str, str] | None:
        """Where figures go: the TensorBoard run directory; else PNG files in the artifact directory of an MLflow
        run (file store) or a W&B run (its files, synced with it), else in the run directory of another logger;
        nowhere without a logger."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return ("tensorboard", logger.log_dir)
        for logger in trainer.loggers:
            if (directory := _artifact_dir(logger)) is not None:
                return ("png", os.path.join(directory, "diagnostics_figures"))
        if trainer.loggers:
            return ("png", os.path.join(trainer.log_dir or trainer.default_root_dir, "diagnostics_figures"))
        return None

    def _log_figures(self, trainer: L.Trainer, s: Snapshot) -> None:
        """Hand the figures of s to the worker process, which writes them (drawn here if it cannot be started)."""
        destination = self._figure_destination(trainer)
        if destination is None:
            return
        self._last_drawn = s.step
        self._figure_jobs.append(figures_job(s, self.update_history, destination))
        if self._samples >= self.INLINE_SAMPLES or self._running is None:
            self._draw_figures()  # else later: a short run draws its figures after training, not during it

    def _draw_figures(self) -> None:
        """Send the figures asked for to their worker (drawn here if it cannot be started)."""
        while self._figure_jobs:
            job = self._figure_jobs.pop(0)
            worker = self._start_worker("figures")  # a dead worker's undrawn jobs come back to the front
            if worker is not None:
                worker.submit(job)
            else:
                snapshot, history, destination = job[2]
                figures.write(figures.render_pngs(snapshot, history), job[1], destination, self._writers)

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
            "lr_shortfall": {k: [list(p) for p in v] for k, v in self.lr_shortfall.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.update_history = {k: [tuple(p) for p in v] for k, v in state_dict.get("update_history", {}).items()}
        self.warned = {tuple(w) for w in state_dict.get("warned", [])}
        self.lr_shortfall = {k: [tuple(p) for p in v] for k, v in state_dict.get("lr_shortfall", {}).items()}


def _artifact_dir(logger) -> str | None:
    """A local directory whose files the logger's run keeps as artifacts: an MLflow run's (file store) or a W&B
    run's files directory. Found by the logger's class name: neither package is needed to import this one."""
    try:
        if type(logger).__name__ == "MLFlowLogger":
            uri = logger.experiment.get_run(logger.run_id).info.artifact_uri
            return uri.removeprefix("file://").removeprefix("file:") if uri.startswith(("file:", "/")) else None
        if type(logger).__name__ == "WandbLogger":
            return logger.experiment.dir
    except Exception:  # a logger that cannot say: the run directory instead
        return None
    return None


def _merge(captured: list[CapturedParams]) -> CapturedParams | None:
    """One CapturedParams for all optimizers."""
    if len(captured) <= 1:
        return captured[0] if captured else None
    rows = torch.cat([c.rows for c in captured], dim=1)
    offsets = [sum(len(c.names) for c in captured[:i]) for i in range(len(captured))]
    order = [o + i for c, o in zip(captured, offsets) for i in (c.order or range(len(c.names)))]
    return CapturedParams([n for c in captured for n in c.names], [s for c in captured for s in c.shapes], rows, order)
