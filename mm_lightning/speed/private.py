"""Every private Lightning and PyTorch name the speed add-on touches, each with the reason. Importing this module is
the first check the gate makes (gate.py): a Lightning release that renamed one fails the import, and the fit runs
on Lightning's own loop. tests/test_compat.py checks that each still exists and still behaves as used here.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from lightning.pytorch.core.module import LightningModule

# training_step's output as Lightning normalises it (a Tensor, a dict with "loss", or None): the lean loop hands
# hooks exactly what Lightning's loop would
from lightning.pytorch.loops.optimization.automatic import ClosureResult

# The lean loop (lean.py) runs Lightning's own training epoch loop with a leaner `advance`: a subclass of the
# loop class, swapped onto the trainer's loop object so that its progress counters, children and checkpointed
# state stay the very objects Lightning created. There is no public way to customise the loop in Lightning 2.x.
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop as TrainingEpochLoop

# a module hook as Lightning calls it (hook name set for self.log, profiler scope), where the module overrides it
from lightning.pytorch.trainer.call import _call_lightning_module_hook as call_module_hook
from torch.optim import optimizer as torch_optimizer
from torchmetrics import Metric

from mm_lightning import compat

__all__ = [
    "ClosureResult",
    "LeanLog",
    "TrainingEpochLoop",
    "call_module_hook",
    "set_epoch_loop_class",
]


def set_epoch_loop_class(trainer, cls: type) -> None:
    """Make the trainer's training epoch loop an instance of `cls` (a subclass of TrainingEpochLoop adding no
    state), keeping the object itself: its counters, its validation loop, what checkpoints save and restore."""
    loop = trainer.fit_loop.epoch_loop
    if not isinstance(loop, TrainingEpochLoop):
        raise TypeError(f"the trainer's epoch loop is a {type(loop).__name__}, not Lightning's training epoch loop")
    loop.__class__ = cls


def lightning_optimizer(trainer):
    """The LightningOptimizer wrapping the (single) optimizer: what Lightning hands the `optimizer_step` hook."""
    return trainer.strategy._lightning_optimizers[0]


def logger_connector(trainer):
    """Lightning's per-batch logging bookkeeping (`on_batch_start`, `on_batch_end`, `update_train_step_metrics`),
    which the lean loop calls exactly where Lightning's own loop does."""
    return trainer._logger_connector


def end_batch(trainer, refresh: bool) -> None:
    """_LoggerConnector.on_batch_end, refreshing its cached metric dicts only when `refresh`.

    While the fit loop runs, nobody sees those caches: trainer.callback_metrics, logged_metrics and
    progress_bar_metrics recompute from the fit loop's results on every read (and refresh the caches then). They
    are seen as they are once another loop is active (validation) or none (after fit), so the lean loop refreshes
    them on the last step before that (see LeanEpochLoop.advance). The results' keys only ever grow and the caches
    hold the latest values, so they end up exactly as Lightning's every-step refresh leaves them, without
    computing every logged value every step."""
    connector = trainer._logger_connector
    if refresh:
        metrics = connector.metrics
        connector._progress_bar_metrics.update(metrics["pbar"])
        connector._callback_metrics.update(metrics["callback"])
        connector._logged_metrics.update(metrics["log"])
    results = trainer.fit_loop._results
    results.batch = None  # the rest of on_batch_end: drop the batch and its cached size
    results.batch_size = None


def validation_may_run(loop) -> bool:
    """Whether the training epoch loop may validate after this batch: _TrainingEpochLoop._should_check_val_fx's
    reasons to say yes, without its reasons to say no (it checks the epoch, and whether validation is on at all,
    through ~15 us of lookups). Saying yes too often only costs time (a refresh, see end_batch; Lightning's own
    check, see LeanEpochLoop.on_advance_end); never too rarely."""
    trainer = loop.trainer
    if loop.batch_progress.is_last_batch or trainer.should_stop or trainer._val_check_time_interval is not None:
        return True
    every = trainer.val_check_batch
    if isinstance(trainer.limit_train_batches, int) and every == float("inf"):
        return (loop.batch_idx + 1) % trainer.limit_train_batches == 0
    if every != float("inf"):
        current = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx
        return (current + 1) % every == 0
    return False


def logs_this_step(trainer) -> bool:
    """Whether _LoggerConnector.update_train_step_metrics would log now (it does nothing else): its own test,
    should_update_logs (every log_every_n_steps, counted by `_batches_that_stepped + 1`) or a stopping trainer, or
    fast_dev_run. No accumulation here (the lean loop runs only without it)."""
    every = trainer.log_every_n_steps
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return bool(every and step % every == 0) or trainer.should_stop or bool(trainer.fast_dev_run)


def set_current_fx(module: LightningModule, name: str | None) -> str | None:
    """Set the hook name `self.log` files values under (Lightning sets it around every hook); returns the old one.
    A plain attribute: object.__setattr__ stores it as nn.Module.__setattr__ would, without its ~3 us of checks."""
    previous = module._current_fx_name
    object.__setattr__(module, "_current_fx_name", name)
    return previous


# the hooks LeanLog reproduces `self.log` in: those of a training batch, which log into the fit loop's results
# (on_train_batch_end is where MakemoreModule logs train/loss, every log_every_n_steps steps)
LEAN_LOG_HOOKS = ("training_step", "on_train_batch_end")


class LeanLog:
    """`self.log` in `training_step` and `on_train_batch_end`: the same values in the same places as
    LightningModule.log, ~20x cheaper.

    LightningModule.log costs ~0.4 ms a call on a CPU (argument validation, an `inspect` of the training step, and
    moving the stored metric to the value's device on every call), a quarter of a whole step of this model. The
    first call for a name, and any call this class does not reproduce (another hook, other arguments than that
    first call's, a torchmetrics Metric, a new epoch's reset, dataloader indices), goes to LightningModule.log
    itself, which creates and validates the stored metric. A later call with the same arguments does only what
    LightningModule.log would then do to it: turn the value into a detached 0-d tensor (as its private __to_tensor
    does), and update the stored metric with it (as _ResultCollection.log and update_metrics do), skipping the
    `.to(device)` when the metric is already on the value's device (a no-op there).
    """

    def __init__(self, module: LightningModule):
        self.module = module
        self._known: dict[tuple, tuple] = {}  # (fx, name) -> (arguments, result collection, stored metric)
        # what training_step logs into: the fit loop's result collection, made once with the trainer's fit loop
        # (looking it up through the loop properties costs ~10 us a call)
        self._fit_results = module.trainer.fit_loop._results

    def install(self) -> None:
        self.module.log = self  # an instance attribute: shadows LightningModule.log until removed

    def remove(self) -> None:
        self.module.__dict__.pop("log", None)

    def __call__(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any | None = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        module = self.module
        args = (prog_bar, logger, on_step, on_epoch, reduce_fx, enable_graph, sync_dist, sync_dist_group)
        args += (add_dataloader_idx, batch_size, metric_attribute, rank_zero_only)
        fx, trainer = module._current_fx_name, module._trainer
        results = None if trainer is None else self._fit_results if fx in LEAN_LOG_HOOKS else trainer._results
        key = f"{fx}.{name}"
        known = self._known.get((fx, name))
        reproducible = (
            fx in LEAN_LOG_HOOKS
            and known is not None
            and known[0] == args
            and known[1] is results
            and results.get(key) is known[2]
            and results.dataloader_idx is None
            and isinstance(value, (torch.Tensor, numbers.Number))
            and not isinstance(value, Metric)
            and not trainer._logger_connector.should_reset_tensors(fx)
        )
        if not reproducible:
            LightningModule.log(module, name, value, *args)
            if fx in LEAN_LOG_HOOKS and results is not None and key in results and not isinstance(value, Metric):
                self._known[(fx, name)] = (args, results, results[key])
            return
        metric = known[2]
        value = (
            value.clone().detach()
            if isinstance(value, torch.Tensor)
            else torch.tensor(value, device=module.device, dtype=torch.get_default_dtype())
        )
        if value.numel() != 1:  # LightningModule.log raises its own error for this
            LightningModule.log(module, name, value, *args)
            return
        value = value.squeeze()
        if metric.device != value.device:
            metric.to(value.device)
        # _ResultCollection.update_metrics, minus its torch.compiler.disable wrapper (~40 us a call, eager anyway)
        metric.forward(value, results._extract_batch_size(metric, batch_size, metric.meta))
        metric.has_reset = False
        trainer._logger_connector._current_fx = fx


# ----------------------------------------------------------------------------------------------- CUDA graphs


def foreach_add_(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float) -> None:
    """torch's own multi-tensor add, the kernel SGD (momentum 0, foreach) runs on CUDA: a graphed step updates the
    parameters exactly as optimizer.step() would."""
    torch._foreach_add_(tensors, others, alpha=alpha)


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    torch._foreach_copy_(dst, src)


def optimizer_step_is_hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step pre/post hooks (the optimizer's own or global ones) would run around optimizer.step(). torch
    keeps them in private dicts and has no public way to ask."""
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return True
    return bool(torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks)


def step_is_observed(optimizer: torch.optim.Optimizer, modules: list[torch.nn.Module]) -> bool:
    """Whether any hook watches an optimizer step or a module's forward/backward (then it must run eagerly: a CUDA
    graph replay would run no hook; nor would hand gradients). The modules' side is the core's own check."""
    return optimizer_step_is_hooked(optimizer) or compat.modules_are_hooked(modules)


def skips_backward(automatic_optimization) -> bool:
    """Whether Lightning's automatic optimization is told to skip the backward (StochasticWeightAveraging sets it
    through fit_loop._skip_backward for its BatchNorm-update epoch); no public way to read it."""
    return automatic_optimization._skip_backward


def autograd_is_watched(params: list[torch.Tensor]) -> bool:
    """Whether anything would see autograd's backward itself, which hand gradients (handgrad.py) do not run: a tensor
    hook on a parameter's gradient (before or after it accumulates), saved-tensor hooks, anomaly detection, or grad
    mode off. torch keeps tensor hooks in private attributes and has no public way to ask."""
    if torch.is_anomaly_enabled() or not torch.is_grad_enabled():
        return True
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return True
    return any(p._backward_hooks or p._post_accumulate_grad_hooks for p in params)


# ------------------------------------------------------------------------------------------------ the SGD step


def profiler_enabled() -> bool:
    """Whether a torch profiler is recording (then SGD steps go through optimizer.step, which the profiler labels
    "Optimizer.step#SGD.step"). torch.autograd._profiler_enabled is the check torch's own record_function uses."""
    return torch.autograd._profiler_enabled()


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """What the LR scheduler's wrapper of optimizer.step records on each call: its check that the optimizer stepped
    before the scheduler did (it warns otherwise) reads this flag."""
    optimizer._opt_called = True
