"""The LightningModule: SGD with a step learning-rate decay, several optimizer steps per Lightning batch.

Lightning costs a fixed few hundred microseconds per batch, more than a whole step of this tiny model. So the
module uses manual optimization and runs a chunk of consecutive optimizer steps per batch (see data.TrainStream):
trainer.global_step still counts optimizer steps, the LR schedule is stepped every step, and metrics are logged
with explicit global steps, so every curve and cadence is the same as with one step per batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import prepare_for_backward
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from mm_lightning.diagnostics.stats import first_nonfinite_module
from mm_lightning.errors import UsageError
from mm_lightning.graphed import GraphedSGDStep, can_graph, observed
from mm_lightning.model import MLP, MLPConfig, generate

# Lightning callbacks that run inside every optimizer step when it is driven through Lightning's wrappers
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def needs_lightning_step(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether each optimizer step must go through Lightning's manual_backward / LightningOptimizer.step.

    They call every callback's per-step hooks inside profiler contexts, ~150 us a step, which is a quarter of a
    whole step of this model on a CPU. They are needed only when a callback or the module overrides those hooks,
    or when the precision plugin scales gradients, or for strategies other than single-device and DDP.
    """
    overridden = [
        h
        for obj, base in [*((cb, Callback) for cb in trainer.callbacks), (module, L.LightningModule)]
        for h in STEP_HOOKS
        if getattr(type(obj), h) is not getattr(base, h)
    ]
    precision = trainer.precision_plugin
    plain_precision = type(precision) is Precision or (type(precision) is MixedPrecision and precision.scaler is None)
    return bool(overridden) or not plain_precision or type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy)


# Below this many multiply-adds in the widest layer of a step, one CPU thread beats several (each op is too small
# to split): measured 1.27x faster at batch 32 x width 100; two threads win from about batch 2048 x width 100.
SINGLE_THREAD_WORK = 2_500_000


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the first non-finite layer."""


class MakemoreModule(L.LightningModule):
    """Trains the makemore MLP on next-character prediction."""

    def __init__(
        self,
        net: MLPConfig = MLPConfig(),
        lr: float = 0.1,
        milestones: list[int] = [150_000],
        lr_decay: float = 0.1,
        cuda_graph: bool = True,
    ):
        """
        Args:
            net: the network (see MLPConfig).
            lr: SGD learning rate before the first milestone.
            milestones: optimizer steps at which the learning rate is multiplied by lr_decay.
            lr_decay: factor applied at each milestone (0.1 -> 0.01 as in the lecture).
            cuda_graph: on a CUDA device, run each unobserved optimizer step as one CUDA graph replay (see
                graphed.py); speed only, results match the eager path. False forces the eager path.
        """
        super().__init__()
        if not lr > 0:
            raise UsageError(f"--model.lr must be positive, got {lr}")
        if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise UsageError(f"--model.milestones must be positive and strictly increasing, got {list(milestones)}")
        if not 0 < lr_decay <= 1:
            raise UsageError(f"--model.lr_decay must be in (0, 1], got {lr_decay}")
        # plain values only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"net": asdict(net), "lr": lr, "milestones": list(milestones), "lr_decay": lr_decay})
        self.automatic_optimization = False
        self.net = MLP(net)
        self.num_classes = net.vocab_size  # diagnostics compare the loss at step 0 with ln(num_classes)
        # float64 sums: loss x examples must not overflow (or round) on a whole split
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        self._loss_window: list[float] = []  # losses since train/loss was last logged
        self._last_val_loss: float | None = None
        self._checkpoint_step = 0  # the step of the checkpoint loaded (evaluation restores no loop state)
        self._optimizer_step = self._lightning_step  # chosen at train start, see needs_lightning_step
        self._grad_params: list[torch.Tensor] = []
        self._threads: tuple[int, int] | None = None  # (threads for training steps, threads to restore)
        self.cuda_graph = cuda_graph  # not a hyperparameter: speed only, so resuming may change it
        self._graphed: GraphedSGDStep | None = None  # set at train start when the step can be one CUDA graph
        self._watched_modules: list[torch.nn.Module] = []

    @property
    def vocab(self) -> str:
        return self.net.config.vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.hparams.milestones, self.hparams.lr_decay)
        return [optimizer], [schedule]

    # ----------------------------------------------------------------------------------------------- training

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        xs, ys, first_step = batch["x"], batch["y"], int(batch["step"])
        if first_step != self.global_step:  # the stream and the trainer must agree, or resume is not exact
            raise RuntimeError(f"batch starts at step {first_step} but the trainer is at step {self.global_step}")
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        if self._graphed is not None:
            return self._graphed_chunk(xs, ys, first_step, optimizer, schedule)
        wrapper = self.trainer.strategy.model  # looked up per batch: kept as an attribute it would be a submodule
        ddp = wrapper if isinstance(wrapper, DistributedDataParallel) else None
        values, first_loss = [], None
        for x, y in zip(xs, ys):
            loss = F.cross_entropy(self.net(x), y)
            value = loss.item()  # free on a CPU; on a GPU this is one sync per step
            if not math.isfinite(value):  # checked before the update, while the parameters that produced it exist
                self._stop_non_finite(value, x, self.global_step)
            self._optimizer_step(optimizer, loss, ddp)
            schedule.step()
            values.append(value)
            first_loss = loss.detach() if first_loss is None else first_loss
        self._log_losses(first_step, values)
        return {"loss": first_loss}  # the loss of the chunk's first step, the one callbacks sample

    def _graphed_chunk(self, xs: torch.Tensor, ys: torch.Tensor, first_step: int, optimizer, schedule) -> dict:
        """The chunk's steps as CUDA graph replays, except observed steps (hooks: diagnostics), which run eagerly.

        No host sync per step: losses stay in device slots and are read once, at the end of the chunk. A
        non-finite loss is found then; the chunk is re-run from its start up to that step, so that the parameters
        that produced it are there to be examined, as on the eager path."""
        graph = self._graphed
        losses = graph.begin(xs, ys)
        first_loss = None
        for i in range(len(xs)):
            lr = optimizer.param_groups[0]["lr"]
            if observed(optimizer.optimizer, self._watched_modules) or not graph.ready(lr):
                loss = F.cross_entropy(self.net(xs[i]), ys[i])
                self._direct_step(optimizer, loss, None)
                losses[i].copy_(loss.detach())
                graph.seek(i + 1)
                first_loss = loss.detach() if i == 0 else first_loss
                del loss  # its autograd graph must not outlive the step: capturing a graph would trip on it
            else:
                graph.replay()
                optimizer._on_before_step()  # Lightning's step count, as _direct_step keeps it
                optimizer._on_after_step()
            schedule.step()
        values = losses.tolist()  # the chunk's one sync
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            self._rerun_to(graph, first_step, bad)
            self._stop_non_finite(values[bad], xs[bad], first_step + bad)
        self._log_losses(first_step, values)
        return {"loss": losses[0].clone() if first_loss is None else first_loss}

    @torch.no_grad()
    def _rerun_to(self, graph: GraphedSGDStep, first_step: int, stop: int) -> None:
        """The chunk again from its start, up to (not including) step `stop` of it, from the graph's buffers."""
        graph.rewind()
        graph.seek(0)
        with torch.enable_grad():
            for i in range(stop):
                graph.step(self._lr_at(first_step + i))

    def _lightning_step(self, optimizer, loss: torch.Tensor, ddp: DistributedDataParallel | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()

    def _direct_step(self, optimizer, loss: torch.Tensor, ddp: DistributedDataParallel | None) -> None:
        """What _lightning_step does, minus the per-step callback hooks: same updates, same step counting."""
        for p in self._grad_params:  # zero_grad(set_to_none=True) without its ~70 us of profiler scope
            p.grad = None
        if ddp is not None:
            prepare_for_backward(ddp, loss)  # re-arm DDP's gradient all-reduce, as Lightning's pre_backward does
        loss.backward()
        optimizer._on_before_step()  # the manual-optimization loop's own step counter (trainer.global_step)
        optimizer.optimizer.step()
        optimizer._on_after_step()

    def _stop_non_finite(self, loss: float, x: torch.Tensor, step: int) -> None:
        with torch.no_grad():
            where = first_nonfinite_module(self, x)
        raise NonFiniteLossError(
            f"the loss became {loss} at step {step}"
            + (f"; the first non-finite output is {where}" if where else "")
            + "; lower --model.lr or check the init; checkpoints written so far are intact"
        )

    def _stop_non_finite_validation(self, loss: float) -> None:
        """Stop before the epoch's checkpoint is written (ModelCheckpoint saves after validation)."""
        bad = self._first_nonfinite_parameter()
        raise NonFiniteLossError(
            f"val/loss became {loss} at step {self.global_step}"
            + (f"; the first non-finite parameter is {bad}" if bad else "")
            + "; lower --model.lr or check the init; checkpoints written so far are intact"
        )

    def _first_nonfinite_parameter(self) -> str | None:
        return next((name for name, p in self.named_parameters() if not torch.isfinite(p).all()), None)

    def on_train_epoch_end(self) -> None:
        # runs before ModelCheckpoint's hook: the last update may have left non-finite parameters (with validation
        # off nothing else would notice), and they must never reach a checkpoint
        bad = self._first_nonfinite_parameter()
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} became non-finite by step {self.global_step}; lower --model.lr or check the init; "
                "checkpoints written so far are intact"
            )

    def _log_losses(self, first_step: int, values: list[float]) -> None:
        """Log train/loss (mean over the last log_every_n_steps steps) and train/lr at multiples of that cadence."""
        every = max(1, self.trainer.log_every_n_steps)
        latest = None
        for i, value in enumerate(values):
            step = first_step + i
            self._loss_window.append(value)
            if step % every == 0:
                latest = math.fsum(self._loss_window) / len(self._loss_window)
                self._loss_window.clear()
                self._log_to_loggers({"train/loss": latest, "train/lr": self._lr_at(step)}, step)
        if latest is not None:  # for the progress bar and callbacks; self.log costs ~0.3 ms, so once a batch
            self.log("train/loss", latest, prog_bar=True, logger=False)

    def _lr_at(self, step: int) -> float:
        passed = sum(step >= m for m in self.hparams.milestones)
        return self.hparams.lr * self.hparams.lr_decay**passed

    def _log_to_loggers(self, metrics: dict[str, float], step: int) -> None:
        if self.trainer.sanity_checking:
            return
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # ---------------------------------------------------------------------------------------- checkpoint extras

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain floats: an exact resume logs exactly the train/loss points an uninterrupted run would
        checkpoint["loss_window"] = list(self._loss_window)
        checkpoint["last_val_loss"] = self._last_val_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._loss_window = list(checkpoint.get("loss_window", []))
        self._last_val_loss = checkpoint.get("last_val_loss")
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    def _evaluated_step(self) -> int:
        """The step a validation or test result belongs to: the trainer's while fitting, else the checkpoint's."""
        return self.global_step if self.trainer.state.fn == "fit" else self._checkpoint_step

    def on_train_start(self) -> None:
        slow = needs_lightning_step(self.trainer, self)
        self._optimizer_step = self._lightning_step if slow else self._direct_step
        self._grad_params = [p for group in self.optimizers().param_groups for p in group["params"]]
        self._graphed = self._graph_if_possible(slow)
        self._pick_cpu_threads()
        # a resumed run's TensorBoard purges everything from the checkpoint's step on (what a killed run logged
        # after it): put back the validation loss that was measured at that very step
        if self.global_step > 0 and self._last_val_loss is not None:
            self._log_to_loggers({"val/loss": self._last_val_loss}, self.global_step)

    def _graph_if_possible(self, slow: bool) -> GraphedSGDStep | None:
        """The CUDA-graph step on a single CUDA device with plain float32 precision and nothing hooked per step."""
        if not self.cuda_graph or slow or type(self.trainer.strategy) is not SingleDeviceStrategy:
            return None
        why_not = can_graph(self.optimizers().optimizer, self._grad_params)
        if type(self.trainer.precision_plugin) is not Precision:
            why_not = "a precision plugin other than 32-true"
        if why_not is not None:
            if self.device.type == "cuda":
                rank_zero_info(f"training steps run eagerly, not as CUDA graphs: {why_not}")
            return None
        self._watched_modules = list(self.modules())
        capacity = getattr(self.trainer.datamodule, "steps_per_batch", 1) if self.trainer.datamodule else 1
        return GraphedSGDStep(self.net, self._grad_params, capacity)

    # ---------------------------------------------------------------------------------------------- threads

    def _pick_cpu_threads(self) -> None:
        """One thread for training steps whose matmuls are too small to split (unless OMP_NUM_THREADS is set)."""
        if self.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() == 1:
            return
        c = self.net.config
        batch = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        width = max(c.n_embd * c.block_size, c.n_hidden if c.n_layers else c.vocab_size)
        if batch is not None and batch * width * width < SINGLE_THREAD_WORK:
            self._threads = (1, torch.get_num_threads())
            torch.set_num_threads(1)

    def _restore_threads(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads[1])

    def on_validation_start(self) -> None:
        self._restore_threads()  # evaluating a whole split is large matmuls: all threads
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            # every rank evaluates the model rank 0 holds and checkpoints: without SyncBatchNorm, each rank's
            # BatchNorm running statistics have followed its own minibatches since DDP last broadcast them
            for buffer in self.net.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def on_validation_end(self) -> None:
        if self._threads is not None:  # set between train start and end only: back to training
            torch.set_num_threads(self._threads[0])

    def on_train_end(self) -> None:
        self._restore_threads()
        self._threads = None

    # --------------------------------------------------------------------------------------------- evaluation

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(F.cross_entropy(self.net(x), y), weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()  # weighted mean over the whole split, all ranks
        self.val_loss.reset()
        if not torch.isfinite(value) and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._stop_non_finite_validation(value.item())
        self._log_evaluation("val/loss", value)
        if not self.trainer.sanity_checking:
            self._last_val_loss = value.item()

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_loss.update(F.cross_entropy(self.net(x), y), weight=y.numel())

    def on_test_epoch_end(self) -> None:
        value = self.test_loss.compute()
        self.test_loss.reset()
        self._log_evaluation("test/loss", value)

    def _log_evaluation(self, name: str, value: torch.Tensor) -> None:
        """Log through Lightning (loggers, printed table, what trainer.validate/test return) at the right step.

        Lightning would put evaluation results at its count of batches, which is not the optimizer step here
        (K steps per batch), and at 0 for `validate`/`test` from a checkpoint: a logged "step" is Lightning's
        own way to set the x-axis. The value is already global (torchmetrics syncs it); sync_dist only keeps
        Lightning from warning under DDP."""
        self.log(name, value, prog_bar=name == "val/loss", sync_dist=True)
        self.log("step", float(self._evaluated_step()), sync_dist=True)

    # ----------------------------------------------------------------------------------------------- sampling

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[str]:
        """Names for a batch of sample numbers (see NamesDataModule.predict_dataloader)."""
        return self.sample(len(batch), seed=int(batch[0]))

    def sample(self, num_samples: int, temperature: float = 1.0, seed: int = 42) -> list[str]:
        """Names from the model, seeded (the same seed gives the same names on the same kind of device)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate(self.net, num_samples, temperature, generator)
