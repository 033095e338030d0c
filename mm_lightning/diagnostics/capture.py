"""Capture: what a sampled step measures, by hooks attached for that step only.

On a sampled step (see schedule.py) and only then, hooks are attached:
- a forward hook on each watched layer keeps its output and puts a tensor hook on it for the output's gradient
  (not register_full_backward_hook, which breaks on in-place ops);
- an optimizer step pre-hook keeps every parameter, and a post-hook measures the real change and the gradient.
They do nothing once every optimizer has stepped, and are removed at the end of the batch (never from inside a
hook: torch would be iterating the hooks, other callbacks' included), so other steps pay nothing.

What the rules need to know beyond the statistics (verdicts.Context) is gathered here too: each parameter's optimizer
family, learning rate set and used, which parameters had no gradient, and (at the first sample) the output layers.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import torch

from .logs import _say
from .select import Watched
from .stats import CapturedLayer, CapturedParams
from .verdicts import optimizer_family

MAX_CALLS = 8  # a module called more often in one step (an RNN cell in a loop): its first calls are measured


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


class Capture:
    """The capturing part of TrainingDiagnostics (a mixin: the callback's state, set up by _init_capture)."""

    def _init_capture(self) -> None:
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
        self._tables: set[str] = set()  # lookup tables (nn.Embedding weights): see verdicts.Context.tables
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
        self._param_names: dict[int, str] = {}  # id(parameter) -> its name, set at fit start

    def _attach_hooks(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """The hooks of sampled step `step` (removed by _remove_hooks at the end of its batch)."""
        self._sampling, self._loss, self._later_micro_batch = step, None, False
        # 16-mixed: the loss is multiplied by the GradScaler's scale before backward, and so is every gradient the
        # tensor hooks see (the weights' are unscaled before the optimizer steps). The scale this step's backward
        # uses is the one at its start: the scaler updates it after the optimizer step. Read here, not in
        # on_before_backward: a callback without per-step backward hooks lets the training loop skip their dispatch
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
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
        # one op per tensor (a view where it is contiguous): torch.cat converts into out's dtype itself, exactly as
        # .to(out.dtype) would; half the time of detach/reshape/to each, three times per sample
        with torch.no_grad():
            torch.cat([t.reshape(-1) for t in tensors], out=out)

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


def _merge(captured: list[CapturedParams]) -> CapturedParams | None:
    """One CapturedParams for all optimizers."""
    if len(captured) <= 1:
        return captured[0] if captured else None
    rows = torch.cat([c.rows for c in captured], dim=1)
    offsets = [sum(len(c.names) for c in captured[:i]) for i in range(len(captured))]
    order = [o + i for c, o in zip(captured, offsets) for i in (c.order or range(len(c.names)))]
    return CapturedParams([n for c in captured for n in c.names], [s for c in captured for s in c.shapes], rows, order)
