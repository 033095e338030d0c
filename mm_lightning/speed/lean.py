"""The lean loop: Lightning's own training epoch loop object with a leaner `advance` (see __init__.py). Imported
only at fit start, once the gate (gate.py) has found the installed Lightning to be one it was verified against.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mm_lightning.speed import handgrad, lrstep, private, sgd
from mm_lightning.speed.graphed import GraphedSGDStep, can_graph, why_not_graphable
from mm_lightning.speed.handgrad import HandGradStep
from mm_lightning.speed.private import ClosureResult, call_module_hook
from mm_lightning.speed.sgd import SGDStep

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
    if type(trainer.fit_loop.epoch_loop) is not private.TrainingEpochLoop:
        return f"a custom training loop ({type(trainer.fit_loop.epoch_loop).__name__})"
    if "dataloader_iter" in trainer.fit_loop.epoch_loop._build_kwargs(OrderedDict(), None, 0):
        return "training_step takes dataloader_iter"
    return None


class LeanEpochLoop(private.TrainingEpochLoop):
    """Lightning's training epoch loop with a leaner `advance` (see the module docstring). It adds no state: the
    FastPath callback turns the trainer's own loop object into one (private.set_epoch_loop_class) and back."""

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
        self.lean_plateau = any(config.reduce_on_plateau for config in trainer.lr_scheduler_configs)
        self.lean_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        # a plain SGD steps without torch's per-call wrappers where that is exact (sgd.py); else optimizer.step
        self.lean_sgd: SGDStep | None = None
        self.lean_sgd_why: str | None = None  # why not, where the optimizer is an SGD but torch is not verified
        if SGDStep.why_not(trainer.optimizers[0]) is None:
            self.lean_sgd_why = sgd.why_not_verified()
            if self.lean_sgd_why is None:
                self.lean_sgd = SGDStep(trainer.optimizers[0])
        # a MultiStepLR steps without torch's per-call machinery on steps that change no rate (lrstep.py)
        multistep = any(type(c.scheduler) is lrstep.MultiStepLR for c in trainer.lr_scheduler_configs)
        self.lean_lr_why = lrstep.why_not_verified() if multistep else None  # why not, where one is used
        self.lean_lr_step = lrstep.MultiStepLRStep(verified=multistep and self.lean_lr_why is None)
        self.lean_modules = list(module.modules())
        self.lean_module = module  # trainer.lightning_module, without its property lookups every step
        self.lean_graph: GraphedSGDStep | None = None
        self.lean_hand: HandGradStep | None = None

    def _why_not_declared_step(self, trainer: L.Trainer, module: L.LightningModule, device: str) -> str | None:
        """Why unobserved steps cannot run the module's declared graphable step some other way than its
        training_step (a CUDA graph, hand gradients) on this device type: None when they can."""
        if trainer.strategy.root_device.type != device:
            return "not on a CUDA device" if device == "cuda" else "not on the CPU"
        if type(trainer.strategy) is not SingleDeviceStrategy:
            return f"strategy {type(trainer.strategy).__name__}"
        why = why_not_graphable(module)
        if why is not None:
            return why
        if device == "cuda" and getattr(module, "compiled_net", None) is not None:
            return "the network is compiled (--model.compile): torch.compile runs each step"
        hooked = [h for h in STEP_HOOKS if self.lean_callbacks[h] or self.lean_module_hooks[h]]
        hooked += [h for h in ("optimizer_step", "optimizer_zero_grad", "backward") if self.lean_module_hooks[h]]
        if hooked or self.lean_plain_step or self.lean_plain_backward:
            return f"something runs inside each step ({', '.join(hooked) or 'gradient clipping'})"
        return None

    def graph_steps(self, trainer: L.Trainer, module: L.LightningModule) -> str | None:
        """Run unobserved steps as CUDA graph replays (graphed.py) where the module declares its step graphable;
        returns why not (None when they will)."""
        why = self._why_not_declared_step(trainer, module, "cuda") or can_graph(trainer.optimizers[0], self.lean_params)
        if why is None:
            self.lean_graph = GraphedSGDStep(module.net, self.lean_params)
        return why

    def hand_steps(self, trainer: L.Trainer, module: L.LightningModule) -> str | None:
        """Run unobserved steps with hand gradients (handgrad.py) where the module declares its step graphable and
        its net is the core MLP; returns why not (None when they will). With --model.compile, what torch.compile
        compiles is the hand step (forward and backward, one function without autograd)."""
        why = self._why_not_declared_step(trainer, module, "cpu") or handgrad.why_not_verified()
        if why is None:
            why = handgrad.why_not_hand(module.net, list(module.parameters()), self.lean_params)
        if why is None:
            compiled = getattr(module, "compiled_net", None) is not None
            compile_mode = getattr(module, "compile_mode", None) if compiled else None
            self.lean_hand = HandGradStep(module, trainer.optimizers[0], compile_mode)
        return why

    # ------------------------------------------------------------------------------------------ dispatch

    def _callbacks(self, name: str, *args) -> None:
        if self.lean_callbacks[name]:
            trainer, module = self.trainer, self.lean_module
            previous = private.set_current_fx(module, name)
            for callback in self.lean_callbacks[name]:
                callback_fn = getattr(callback, name)
                callback_fn(trainer, module, *args)
            private.set_current_fx(module, previous)

    def _module_hook(self, name: str, *args):
        """_call_lightning_module_hook: the hook name set for self.log around the call, minus the profiler scope
        (the lean loop runs only with the pass-through profiler) and its debug line."""
        if self.lean_module_hooks[name]:
            module = self.lean_module
            previous = private.set_current_fx(module, name)
            output = getattr(module, name)(*args)
            private.set_current_fx(module, previous)
            return output
        return None

    # ------------------------------------------------------------------------------------------- one batch

    def advance(self, data_fetcher) -> None:
        """Lightning's _TrainingEpochLoop.advance for one batch, minus what does nothing here (see the class)."""
        trainer = self.trainer
        if self._lightnings_own_batch():
            return super().advance(data_fetcher)
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
        connector = private.logger_connector(trainer)
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
        # the metric caches are seen as they are only once the fit loop hands over (see private.end_batch)
        private.end_batch(trainer, refresh=self._is_training_done or private.validation_may_run(self))
        self.batch_progress.increment_completed()
        if private.logs_this_step(trainer):
            connector.update_train_step_metrics()

    def on_advance_end(self, data_fetcher) -> None:
        """_TrainingEpochLoop.on_advance_end, minus its validation checks (~15 us) where no validation can follow
        this batch (private.validation_may_run) and no scheduler steps on a plateau: what it does then is count the
        step, save the loggers when stopping, and check for SIGTERM. Otherwise, Lightning's own."""
        own = self._lightnings_own_batch() or self._skip_next_val or self.lean_plateau
        if own or private.validation_may_run(self):
            return super().on_advance_end(data_fetcher)
        self._batches_that_stepped += 1  # "if not self._should_accumulate()": the lean loop never accumulates
        self._save_loggers_on_train_batch_end()
        if not self._is_training_done and self.trainer.received_sigterm:
            raise SIGTERMException
        return None

    def _lightnings_own_batch(self) -> bool:
        """Whether this batch goes through Lightning's own `advance` and `on_advance_end`: the first batch after a
        restore (Lightning's own bookkeeping), and any batch of an epoch in which a callback turned on gradient
        accumulation (GradientAccumulationScheduler) or skips the backward (StochasticWeightAveraging's BatchNorm
        epoch): the lean loop never accumulates. They change only at an epoch's start, so both hooks agree."""
        return (
            self.restarting
            or self.trainer.accumulate_grad_batches != 1
            or private.skips_backward(self.automatic_optimization)
        )

    def _optimizer_step(self, batch, batch_idx: int) -> dict:
        """_AutomaticOptimization.run for one optimizer and no accumulation: the closure (training_step, zero_grad,
        backward) run by the optimizer's own step, with Lightning's counters."""
        trainer, module = self.trainer, self.lean_module
        progress = self.automatic_optimization.optim_progress.optimizer
        optimizer = trainer.optimizers[0]
        args = (batch, batch_idx) if self.lean_takes_batch_idx else (batch,)
        graph = self.lean_graph
        if graph is not None and not private.step_is_observed(optimizer, self.lean_modules):
            if graph.ready(*batch, optimizer.param_groups[0]["lr"]):
                return self._graphed_step(graph, args)
        hand = self.lean_hand
        if hand is not None and not private.step_is_observed(optimizer, self.lean_modules) and hand.ready(*batch):
            return self._hand_step(hand, batch)
        results: list[ClosureResult] = []

        def closure():
            previous = private.set_current_fx(module, "training_step")
            if isinstance(trainer.strategy, DDPStrategy):
                output = trainer.strategy.training_step(*args)  # DDP's forward wraps it: gradients all-reduce
            else:
                output = module.training_step(*args)
            private.set_current_fx(module, previous)
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
                    previous = private.set_current_fx(module, "backward")
                    trainer.strategy.backward(result.closure_loss, optimizer)
                    private.set_current_fx(module, previous)
                elif self.lean_backward_hooks:
                    self._backward_with_hooks(result.closure_loss)
                else:
                    module.backward(result.closure_loss)
            return result.loss

        progress.step.increment_ready()
        if self.lean_module_hooks["optimizer_step"]:
            lightning_optimizer = private.lightning_optimizer(trainer)
            call_module_hook(trainer, "optimizer_step", trainer.current_epoch, batch_idx, lightning_optimizer, closure)
        else:
            previous = private.set_current_fx(module, "optimizer_step")
            if self.lean_plain_step:
                trainer.strategy.optimizer_step(optimizer, closure)  # hooks and clipping after the closure
            elif self.lean_sgd is not None:
                self.lean_sgd.step(closure)  # optimizer.step(closure), without its wrappers where exact
            else:
                optimizer.step(closure)
            private.set_current_fx(module, previous)
        progress.step.increment_completed()
        result = results[-1] if results else None
        return {} if result is None or result.loss is None else result.asdict()

    def _backward_with_hooks(self, loss: torch.Tensor) -> None:
        """Strategy.backward on one device with the plain precision plugin (its pre_backward, backward and
        post_backward): the same hooks in the same order, under the same hook names, without the profiler scopes
        and the calls to callbacks that do not override them."""
        module = self.lean_module
        previous = private.set_current_fx(module, "backward")
        self._callbacks("on_before_backward", loss)
        self._module_hook("on_before_backward", loss)
        module.backward(loss)
        self._callbacks("on_after_backward")
        self._module_hook("on_after_backward")
        private.set_current_fx(module, previous)

    def _graphed_step(self, graph: GraphedSGDStep, args: tuple) -> dict:
        """The module's graphable training_step + SGD as one CUDA graph replay, with the counters of the eager path
        and the loss handed to the module's track_train_loss, as its training_step does (see graphed.py)."""
        module = self.lean_module
        progress = self.automatic_optimization.optim_progress.optimizer
        progress.step.increment_ready()
        for p in self.lean_params:  # zero_grad(): the graph computes its gradients apart, .grad stays None
            p.grad = None
        for counter in ("ready", "started", "completed"):
            getattr(progress.zero_grad, f"increment_{counter}")()
        loss = graph.replay()  # a non-finite loss updated nothing: StopOnNonFiniteLoss sees it at batch end
        previous = private.set_current_fx(module, "training_step")
        module.track_train_loss(loss)  # what the declared training_step does with its loss
        private.set_current_fx(module, previous)
        progress.step.increment_completed()
        return ClosureResult.from_training_step_output(loss, 1).asdict()

    def _hand_step(self, hand: HandGradStep, batch) -> dict:
        """The module's graphable training_step with hand gradients (handgrad.py): _optimizer_step's closure and
        counters, with the forward and backward by hand and the loss handed to track_train_loss, as the declared
        training_step does."""
        trainer, module = self.trainer, self.lean_module
        progress = self.automatic_optimization.optim_progress.optimizer
        results: list[ClosureResult] = []

        def closure():
            previous = private.set_current_fx(module, "training_step")
            loss, grads = hand.step(*batch)  # the forward and, already, the backward (nothing runs between them)
            module.track_train_loss(loss)
            private.set_current_fx(module, previous)
            trainer.strategy.post_training_step()
            results.append(ClosureResult(loss))
            progress.zero_grad.increment_ready()
            progress.zero_grad.increment_started()
            for p in self.lean_params:  # optimizer.zero_grad() (set_to_none)
                p.grad = None
            progress.zero_grad.increment_completed()
            hand.set_grads(grads)  # what backward leaves in .grad
            return results[-1].loss

        progress.step.increment_ready()
        previous = private.set_current_fx(module, "optimizer_step")
        if self.lean_sgd is not None:
            self.lean_sgd.step(closure)
        else:
            trainer.optimizers[0].step(closure)
        private.set_current_fx(module, previous)
        progress.step.increment_completed()
        return results[-1].asdict()

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
                self.lean_lr_step.step(config.scheduler)  # LightningModule.lr_scheduler_step: scheduler.step()
            self.scheduler_progress.increment_completed()


def install(
    trainer: L.Trainer, module: L.LightningModule, cuda_graph: bool, hand_gradients: bool = True
) -> tuple[Callable[[], None], str]:
    """Make the trainer's epoch loop the lean loop and the module's `self.log` LeanLog; returns what undoes both,
    and the words the fast path's line adds (CUDA graphs or hand gradients, or why not). Undone at once if any of
    it fails."""
    loop = trainer.fit_loop.epoch_loop
    original = type(loop)
    private.set_epoch_loop_class(trainer, LeanEpochLoop)
    lean_log = private.LeanLog(module)

    def restore() -> None:
        private.set_epoch_loop_class(trainer, original)
        lean_log.remove()

    try:
        loop.prepare(trainer, module)
        lean_log.install()
        graphs = loop.graph_steps(trainer, module) if cuda_graph else "cuda_graph=False"
        on_cpu = trainer.strategy.root_device.type == "cpu"
        hand = (loop.hand_steps(trainer, module) if hand_gradients else "hand_gradients=False") if on_cpu else None
    except BaseException:
        restore()
        raise
    on_gpu = trainer.strategy.root_device.type == "cuda"
    extra = "" if not on_gpu else ", CUDA graph steps" if graphs is None else f", eager steps: {graphs}"
    if on_cpu and hand is None:
        kind = "compiled hand gradients" if loop.lean_hand.compile_mode is not None else "hand gradients"
        extra += f", {kind} (autograd's ops without its graph, docs/speed.md)"
    elif on_cpu:
        extra += f", autograd steps: {hand}"
    if loop.lean_sgd_why is not None:
        extra += f"; SGD steps through optimizer.step: {loop.lean_sgd_why}"
    if loop.lean_lr_why is not None:
        extra += f"; MultiStepLR steps through scheduler.step: {loop.lean_lr_why}"
    return restore, extra
