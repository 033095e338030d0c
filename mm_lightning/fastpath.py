"""The fast path: the same module, the same Trainer, the same results, less time around each optimizer step.

Lightning's own loop costs ~1 ms around every optimizer step on a CPU (hook dispatch through profiler scopes, the
optimizer closure, ~0.4 ms per `self.log` call), and a step of the lecture's model costs ~1.5 ms: plain Lightning
runs it at ~0.45x the lecture's own loop. `FastPath`, a callback the CLI adds (add it to your own Trainer too),
decides once at fit start and says so in one line:

- the lean loop, when the run uses nothing it cannot honour exactly: Lightning's own training epoch loop object,
  with `advance` (one batch, one optimizer step) replaced by one that makes the same calls in the same order with
  the same counters, but calls a hook only where a callback or the module overrides it, skips profiler scopes,
  sets `.grad` to None itself (what `zero_grad()` does) and makes `self.log` in `training_step` cheap
  (compat.LeanLog). Otherwise Lightning's own `advance` runs, and the line says why.
- CPU threads, on both paths: one thread when each op of a step is too small to split across cores.

What the lean loop must preserve, and tests/test_fastpath.py checks against the plain loop, bitwise on the CPU:
parameters, BatchNorm buffers, every logged metric (a user's `self.log` too), callback hooks and what they see,
diagnostics, checkpoints (a checkpoint of one path resumes exactly on the other).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from mm_lightning import compat
from mm_lightning.compat import ClosureResult, call_module_hook
from mm_lightning.graphed import GraphedSGDStep, can_graph
from mm_lightning.module import MakemoreModule

# Below this many multiply-adds in the widest Linear of a step, one CPU thread beats several (each op is too small
# to split): measured 1.27x faster at batch 32 x width 100; two threads win from about batch 2048 x width 100.
SINGLE_THREAD_WORK = 2_500_000

# hooks inside one optimizer step, and where Lightning declares their no-op defaults
STEP_HOOKS = ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")
TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def overrides(obj, name: str, base: type) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name, None)


def why_plain(trainer: L.Trainer, module: L.LightningModule) -> str | None:
    """Why the lean loop cannot run this fit exactly (None when it can)."""
    if not module.automatic_optimization:
        return "the module uses manual optimization"
    if len(trainer.optimizers) != 1:
        return f"{len(trainer.optimizers)} optimizers"
    if trainer.accumulate_grad_batches != 1:
        return f"accumulate_grad_batches={trainer.accumulate_grad_batches}"
    if type(trainer.precision_plugin) is not Precision:
        return f"precision {trainer.precision}"
    if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
        return f"strategy {type(trainer.strategy).__name__}"
    if not isinstance(trainer.profiler, PassThroughProfiler):
        return "a profiler is attached (it times Lightning's own hooks)"
    if overrides(module, "on_train_batch_start", L.LightningModule):
        return "the module overrides on_train_batch_start (it may end the epoch early)"
    if type(trainer.fit_loop.epoch_loop) is not compat.TrainingEpochLoop:
        return f"a custom training loop ({type(trainer.fit_loop.epoch_loop).__name__})"
    if "dataloader_iter" in trainer.fit_loop.epoch_loop._build_kwargs(OrderedDict(), None, 0):
        return "training_step takes dataloader_iter"
    return None


class LeanEpochLoop(compat.TrainingEpochLoop):
    """Lightning's training epoch loop with a leaner `advance` (see the module docstring). It adds no state: the
    FastPath callback turns the trainer's own loop object into one (compat.set_epoch_loop_class) and back."""

    def prepare(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """What each step would otherwise look up again: who overrides which hook, which shortcuts are exact."""
        cb = lambda name: [c for c in trainer.callbacks if overrides(c, name, Callback)]  # noqa: E731
        mod = lambda name: overrides(module, name, L.LightningModule)  # noqa: E731
        self.lean_callbacks = {name: cb(name) for name in (*STEP_HOOKS, *BATCH_HOOKS)}
        self.lean_module_hooks = {name: mod(name) for name in (*STEP_HOOKS, "on_train_batch_end", "backward")}
        self.lean_module_hooks.update({name: mod(name) for name in ("optimizer_step", "optimizer_zero_grad")})
        self.lean_module_hooks["lr_scheduler_step"] = mod("lr_scheduler_step")
        ddp = isinstance(trainer.strategy, DDPStrategy)
        # Lightning's own backward (strategy -> precision plugin -> hooks) where the strategy does something in it
        # (DDP) or the module's backward is its own; around a plain backward, the backward hooks are called here
        # (Lightning's way costs ~0.1 ms a step: two passes over every callback, in profiler scopes)
        self.lean_plain_backward = ddp or self.lean_module_hooks["backward"]
        self.lean_backward_hooks = any(
            self.lean_callbacks[h] or self.lean_module_hooks[h] for h in ("on_before_backward", "on_after_backward")
        )
        # Lightning's own optimizer step (hooks, gradient clipping) where anything in it does something
        self.lean_plain_step = (
            ddp
            or bool(self.lean_callbacks["on_before_optimizer_step"])
            or self.lean_module_hooks["on_before_optimizer_step"]
            or bool(trainer.gradient_clip_val)
            or mod("configure_gradient_clipping")
        )
        self.lean_transfer = trainer.strategy.root_device.type != "cpu" or any(
            mod(h) or (trainer.datamodule is not None and overrides(trainer.datamodule, h, L.LightningDataModule))
            for h in TRANSFER_HOOKS
        )
        self.lean_strategy_batch_start = overrides(trainer.strategy, "on_train_batch_start", Strategy)
        self.lean_takes_batch_idx = "batch_idx" in self._build_kwargs(OrderedDict(), None, 0)
        self.lean_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        self.lean_modules = list(module.modules())
        self.lean_module = module  # trainer.lightning_module, without its property lookups every step
        self.lean_graph: GraphedSGDStep | None = None

    def graph_steps(self, trainer: L.Trainer, module: L.LightningModule) -> str | None:
        """Run unobserved steps as CUDA graph replays (graphed.py) where that is exactly the template's step;
        returns why not (None when they will)."""
        if trainer.strategy.root_device.type != "cuda":
            return "not on a CUDA device"
        if type(trainer.strategy) is not SingleDeviceStrategy:
            return f"strategy {type(trainer.strategy).__name__}"
        if type(module).training_step is not MakemoreModule.training_step:
            return "training_step is not MakemoreModule's own (a graph would not run its code)"
        if getattr(module, "compiled_net", None) is not None:
            return "the network is compiled (--model.compile): torch.compile runs each step"
        hooked = [h for h in STEP_HOOKS if self.lean_callbacks[h] or self.lean_module_hooks[h]]
        hooked += [h for h in ("optimizer_step", "optimizer_zero_grad", "backward") if self.lean_module_hooks[h]]
        if hooked or self.lean_plain_step or self.lean_plain_backward:
            return f"something runs inside each step ({', '.join(hooked) or 'gradient clipping'})"
        why = can_graph(trainer.optimizers[0], self.lean_params)
        if why is None:
            self.lean_graph = GraphedSGDStep(module.net, self.lean_params)
        return why

    # ------------------------------------------------------------------------------------------ dispatch

    def _callbacks(self, name: str, *args) -> None:
        if self.lean_callbacks[name]:
            trainer, module = self.trainer, self.lean_module
            previous = compat.set_current_fx(module, name)
            for callback in self.lean_callbacks[name]:
                callback_fn = getattr(callback, name)
                callback_fn(trainer, module, *args)
            compat.set_current_fx(module, previous)

    def _module_hook(self, name: str, *args):
        if self.lean_module_hooks[name]:
            return call_module_hook(self.trainer, name, *args)
        return None

    # ------------------------------------------------------------------------------------------- one batch

    def advance(self, data_fetcher) -> None:
        """Lightning's _TrainingEpochLoop.advance for one batch, minus what does nothing here (see the class)."""
        trainer = self.trainer
        if self.restarting:
            return super().advance(data_fetcher)  # the first batch after a restore: Lightning's own bookkeeping
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            self._broadcast_sigterm_tensor()
        batch, _, __ = next(data_fetcher)
        batch_idx = self.batch_idx + 1
        self.batch_progress.is_last_batch = data_fetcher.done
        module = self.lean_module
        if self.lean_transfer:
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        self.batch_progress.increment_ready()
        connector = compat.logger_connector(trainer)
        connector.on_batch_start(batch)
        batch_output = None
        if batch is None:  # as Lightning's loop: no step, a warning
            self._warning_cache.warn("train_dataloader yielded None. If this was on purpose, ignore this warning...")
        else:
            self._callbacks("on_train_batch_start", batch, batch_idx)
            if self.lean_strategy_batch_start:
                trainer.strategy.on_train_batch_start(batch, batch_idx)
            self.batch_progress.increment_started()
            batch_output = self._optimizer_step(batch, batch_idx)
        self.batch_progress.increment_processed()
        self._step_schedulers()
        if self._num_ready_batches_reached():
            self.update_lr_schedulers("epoch", update_plateau_schedulers=False)
        self._callbacks("on_train_batch_end", batch_output, batch, batch_idx)
        self._module_hook("on_train_batch_end", batch_output, batch, batch_idx)
        # the metric caches are seen as they are only once the fit loop hands over (see compat.end_batch)
        compat.end_batch(trainer, refresh=self._is_training_done or compat.validation_may_run(self))
        self.batch_progress.increment_completed()
        if compat.logs_this_step(trainer):
            connector.update_train_step_metrics()

    def _optimizer_step(self, batch, batch_idx: int) -> dict:
        """_AutomaticOptimization.run for one optimizer and no accumulation: the closure (training_step, zero_grad,
        backward) run by the optimizer's own step, with Lightning's counters."""
        trainer, module = self.trainer, self.lean_module
        progress = self.automatic_optimization.optim_progress.optimizer
        optimizer = trainer.optimizers[0]
        args = (batch, batch_idx) if self.lean_takes_batch_idx else (batch,)
        graph = self.lean_graph
        if graph is not None and not compat.step_is_observed(optimizer, self.lean_modules):
            if graph.ready(*batch, optimizer.param_groups[0]["lr"]):
                return self._graphed_step(graph, args)
        results: list[ClosureResult] = []

        def closure():
            previous = compat.set_current_fx(module, "training_step")
            if isinstance(trainer.strategy, DDPStrategy):
                output = trainer.strategy.training_step(*args)  # DDP's forward wraps it: gradients all-reduce
            else:
                output = module.training_step(*args)
            compat.set_current_fx(module, previous)
            trainer.strategy.post_training_step()
            if output is None and trainer.world_size > 1:  # Lightning's own words
                raise RuntimeError(
                    "Skipping the `training_step` by returning None in distributed training is not supported."
                )
            # what from_training_step_output(output, 1) makes, without its loss / 1 (an exact no-op, two kernels)
            if isinstance(output, torch.Tensor):
                result = ClosureResult(output)
            else:
                result = ClosureResult.from_training_step_output(output, 1)
            results.append(result)
            progress.zero_grad.increment_ready()
            self._callbacks("on_before_zero_grad", optimizer)
            self._module_hook("on_before_zero_grad", optimizer)
            progress.zero_grad.increment_started()
            if self.lean_module_hooks["optimizer_zero_grad"]:
                call_module_hook(trainer, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer)
            else:
                for p in self.lean_params:  # optimizer.zero_grad() (set_to_none) without its profiler scope
                    p.grad = None
            progress.zero_grad.increment_completed()
            if result.closure_loss is not None:
                if self.lean_plain_backward:
                    previous = compat.set_current_fx(module, "backward")
                    trainer.strategy.backward(result.closure_loss, optimizer)
                    compat.set_current_fx(module, previous)
                elif self.lean_backward_hooks:
                    self._backward_with_hooks(result.closure_loss)
                else:
                    module.backward(result.closure_loss)
            return result.loss

        progress.step.increment_ready()
        if self.lean_module_hooks["optimizer_step"]:
            lightning_optimizer = compat.lightning_optimizer(trainer)
            call_module_hook(trainer, "optimizer_step", trainer.current_epoch, batch_idx, lightning_optimizer, closure)
        else:
            previous = compat.set_current_fx(module, "optimizer_step")
            if self.lean_plain_step:
                trainer.strategy.optimizer_step(optimizer, closure)  # hooks and clipping after the closure
            else:
                optimizer.step(closure)
            compat.set_current_fx(module, previous)
        progress.step.increment_completed()
        result = results[-1] if results else None
        return {} if result is None or result.loss is None else result.asdict()

    def _backward_with_hooks(self, loss: torch.Tensor) -> None:
        """Strategy.backward on one device with the plain precision plugin (its pre_backward, backward and
        post_backward): the same hooks in the same order, under the same hook names, without the profiler scopes
        and the calls to callbacks that do not override them."""
        module = self.lean_module
        previous = compat.set_current_fx(module, "backward")
        self._callbacks("on_before_backward", loss)
        self._module_hook("on_before_backward", loss)
        module.backward(loss)
        self._callbacks("on_after_backward")
        self._module_hook("on_after_backward")
        compat.set_current_fx(module, previous)

    def _graphed_step(self, graph: GraphedSGDStep, args: tuple) -> dict:
        """MakemoreModule.training_step + SGD as one CUDA graph replay, with the counters, the logging and the
        non-finite stop of the eager path (see graphed.py)."""
        module = self.lean_module
        progress = self.automatic_optimization.optim_progress.optimizer
        progress.step.increment_ready()
        for p in self.lean_params:  # zero_grad(): the graph computes its gradients apart, .grad stays None
            p.grad = None
        for counter in ("ready", "started", "completed"):
            getattr(progress.zero_grad, f"increment_{counter}")()
        loss = graph.replay()
        previous = compat.set_current_fx(module, "training_step")
        if not math.isfinite(loss.item()):  # the graph did not update: the eager step reports it and stops
            module.training_step(*args)
        module.log("train/loss", loss, prog_bar=True)  # what training_step logs (LeanLog copies the value)
        compat.set_current_fx(module, previous)
        progress.step.increment_completed()
        return ClosureResult.from_training_step_output(loss, 1).asdict()

    def _step_schedulers(self) -> None:
        """update_lr_schedulers("step") without the hook dispatch: step-interval schedulers at their frequency."""
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau or config.interval != "step" or (self.batch_idx + 1) % config.frequency:
                continue
            self.scheduler_progress.increment_ready()
            if self.lean_module_hooks["lr_scheduler_step"]:
                call_module_hook(trainer, "lr_scheduler_step", config.scheduler, None)
            else:
                config.scheduler.step()  # LightningModule.lr_scheduler_step without a monitored metric
            self.scheduler_progress.increment_completed()


class FastPath(Callback):
    """Chooses the training path at fit start (see the module docstring) and says which, in one line."""

    def __init__(self, lean_loop: bool = True, cpu_threads: int | None = None, cuda_graph: bool = True):
        """
        Args:
            lean_loop: run the lean loop whenever it can honour the run exactly (speed only: results are bitwise
                the same); False always runs Lightning's own loop.
            cuda_graph: in the lean loop on one CUDA device, run each unobserved step of the template's own
                training_step with plain SGD as one CUDA graph replay (graphed.py; the same updates, to float
                rounding); False runs every step eagerly.
            cpu_threads: CPU threads for training steps; None picks one thread when each step's ops are too small
                to split (under 2.5M multiply-adds in the widest layer), unless OMP_NUM_THREADS is set.
        """
        if cpu_threads is not None and cpu_threads < 1:
            from mm_lightning.errors import UsageError

            raise UsageError(f"--fast_path.cpu_threads must be at least 1 (or null for automatic), got {cpu_threads}")
        self.lean_loop, self.cpu_threads, self.cuda_graph = lean_loop, cpu_threads, cuda_graph
        self._installed: tuple[type, compat.LeanLog] | None = None
        self._threads: tuple[int, int] | None = None  # (threads for training, threads to restore)
        self._threads_decided = False
        self.path: str | None = None  # "lean" or "plain", for tests and the benchmark

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        why = why_plain(trainer, pl_module) if self.lean_loop else "lean_loop=False (--fast_path.lean_loop false)"
        if why is None:
            loop = trainer.fit_loop.epoch_loop
            original = type(loop)
            compat.set_epoch_loop_class(trainer, LeanEpochLoop)
            loop.prepare(trainer, pl_module)
            lean_log = compat.LeanLog(pl_module)
            lean_log.install()
            self._installed = (original, lean_log)
            self.path = "lean"
            graphs = loop.graph_steps(trainer, pl_module) if self.cuda_graph else "cuda_graph=False"
            on_gpu = trainer.strategy.root_device.type == "cuda"
            extra = "" if not on_gpu else ", CUDA graph steps" if graphs is None else f", eager steps: {graphs}"
            rank_zero_info(f"training path: fast (lean loop: Lightning's loop minus per-step overhead{extra})")
        else:
            self.path = "plain"
            rank_zero_info(f"training path: plain Lightning loop, because {why}")
        self._threads_decided = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._threads_decided:  # the first batch tells the batch size: both paths decide alike
            self._threads_decided = True
            self._choose_threads(trainer, pl_module, batch)

    def _choose_threads(self, trainer: L.Trainer, module: L.LightningModule, batch) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        threads = self.cpu_threads
        if threads is None:
            if "OMP_NUM_THREADS" in os.environ:
                return
            first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
            rows = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 0
            linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
            widest = max((m.in_features * m.out_features for m in linears), default=0)
            if not rows or rows * widest >= SINGLE_THREAD_WORK:
                return
            threads = 1
        if threads != torch.get_num_threads():
            self._threads = (threads, torch.get_num_threads())
            torch.set_num_threads(threads)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._threads is not None:  # evaluating a whole split is large matmuls: all threads
            torch.set_num_threads(self._threads[1])

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._threads is not None:  # back to training (on_fit_end restores them for good)
            torch.set_num_threads(self._threads[0])

    def _restore(self, trainer: L.Trainer) -> None:
        if self._installed is not None:
            original, lean_log = self._installed
            compat.set_epoch_loop_class(trainer, original)
            lean_log.remove()
            self._installed = None
        if self._threads is not None:
            torch.set_num_threads(self._threads[1])
            self._threads = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore(trainer)
