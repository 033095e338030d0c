"""The LightningModule: the makemore MLP trained on next-character prediction, the Lightning way.

One minibatch per `training_step`, automatic optimization, `configure_optimizers` returning an optimizer and a
step-interval scheduler, metrics through `self.log`. Every Lightning feature (callbacks, loggers, precision,
gradient clipping, accumulation, `--optimizer` / `--lr_scheduler` from the CLI) works on it as on any Lightning
project. Nothing here is about speed but the optional `compile` (torch.compile, docs/compile.md): the rest lives in
the speed add-on (mm_lightning/speed/), which runs this same module faster when it can do so exactly, and steps
aside when it cannot. A NaN/Inf loss stops training through a callback the CLI adds (mm_lightning/nonfinite.py), so
that nothing here waits for a GPU on every step.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from mm_lightning import compat
from mm_lightning.errors import UsageError
from mm_lightning.model import MLPConfig, generate

LR_TAG = "train/lr"  # the learning rate's tag, for every scheduler (see configure_optimizers)
# what a run that produced a NaN/Inf can do about it; its checkpoints are never touched by the stop
NON_FINITE_ADVICE = "lower the learning rate or check the init; checkpoints written so far are intact"
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the first non-finite layer."""


class IntervalMean:
    """A per-step loss's mean over each logging interval (`every` optimizer steps), summed on the loss's device:
    nothing waits for a GPU until the logger writes. Its state is plain values (checkpoints load weights_only)."""

    def __init__(self):
        self.interval, self.total, self.count = -1, None, 0

    def add(self, loss: torch.Tensor, step: int, every: int) -> None:
        interval = step // every if every > 0 else 0
        if interval != self.interval:  # the interval's first step, whether or not the last one was logged
            self.interval, self.total, self.count = interval, None, 0
        loss = loss.detach()
        # a copy of the first: a CUDA graph replay (mm_lightning/speed) hands the same tensor every step
        self.total = loss.clone() if self.total is None else self.total + loss
        self.count += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def state_dict(self) -> dict:
        total = None if self.total is None else self.total.cpu()
        return {"interval": self.interval, "total": total, "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        total = state["total"]
        self.interval, self.count = int(state["interval"]), int(state["count"])
        self.total = None if total is None else total.to(device)


class MakemoreModule(L.LightningModule):
    """Trains the makemore MLP on next-character prediction."""

    def __init__(
        self,
        net: MLPConfig = MLPConfig(),
        lr: float = 0.1,
        milestones: list[int] = [150_000],
        lr_decay: float = 0.1,
        compile: bool = False,
        compile_mode: CompileMode = "default",
    ):
        """
        Args:
            net: the network (see MLPConfig).
            lr: SGD learning rate before the first milestone (the default optimizer; --optimizer replaces it).
            milestones: optimizer steps at which the learning rate is multiplied by lr_decay.
            lr_decay: factor applied at each milestone (0.1 -> 0.01 as in the lecture).
            compile: run training steps through torch.compile(net) (speed only: the same updates to float rounding;
                checkpoints are the same, so a run resumes with or without it). Steps a hook watches (the
                diagnostics' sampled ones) and evaluation run the network eagerly. See docs/compile.md.
            compile_mode: torch.compile's mode, with compile.
        """
        super().__init__()
        if isinstance(net, dict):  # Lightning's load_from_checkpoint passes the hparams back as saved (plain values)
            net = MLPConfig(**net)
        if not lr > 0:
            raise UsageError(f"--model.lr must be positive, got {lr}")
        if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise UsageError(f"--model.milestones must be positive and strictly increasing, got {list(milestones)}")
        if not 0 < lr_decay <= 1:
            raise UsageError(f"--model.lr_decay must be in (0, 1], got {lr_decay}")
        if compile_mode not in CompileMode.__args__:
            modes = ", ".join(CompileMode.__args__)
            raise UsageError(f"--model.compile_mode must be one of {modes}; got {compile_mode!r}")
        if compile_mode != "default" and not compile:
            raise UsageError(
                f"--model.compile_mode {compile_mode} has no effect without --model.compile true: add that, or set "
                "--model.compile_mode default"
            )
        # plain values only, so checkpoints load with torch.load(weights_only=True); compile is not among them: it
        # changes no result, so a run may resume with or without it
        hparams = {"net": asdict(net), "lr": lr, "milestones": list(milestones), "lr_decay": lr_decay}
        self.save_hyperparameters(hparams)
        self.net = net.build()  # MLP(net), or the network a subclass of MLPConfig builds
        self.compile_mode = compile_mode if compile else None
        # kept out of nn.Module's registry (__dict__, not setattr): the compiled wrapper's parameters are self.net's,
        # and registered it would add a second set of names (_orig_mod.*) to every state dict and checkpoint
        self.__dict__["compiled_net"] = torch.compile(self.net, mode=compile_mode) if compile else None
        self._net_modules: list[torch.nn.Module] = []  # self.net's modules, found at the first training step
        self.num_classes = net.vocab_size  # diagnostics compare the loss at step 0 with ln(num_classes)
        # one example's context: Lightning's model summary runs it (eval mode, no grad) for its In/Out sizes and
        # FLOPs columns (per example; without it they read 0), and to_onnx / log_graph use it as their input
        self.example_input_array = torch.zeros(1, net.block_size, dtype=torch.long)
        # float64 sums: loss x examples must not overflow (or round) on a whole split
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        self._checkpoint_step: int | None = None  # the step of the checkpoint loaded (evaluation restores no loop
        # state); None: none loaded, as `trainer.validate(model)` right after `trainer.fit` in Python
        self.train_loss = IntervalMean()  # logged as train/loss where the logger writes (on_train_batch_end)

    @property
    def vocab(self) -> str:
        return self.net.config.vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def on_fit_start(self) -> None:
        if self.compiled_net is not None:
            rank_zero_info(
                f"torch.compile (mode {self.compile_mode}): training steps run compiled, compiled at the "
                "first step; steps a hook watches (the diagnostics' sampled ones) and evaluation run eagerly"
            )
        self._net_modules = []  # found again at the first step: a strategy may have swapped modules since

    def training_forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The network in a training step: compiled (--model.compile) unless a hook watches one of its modules, as
        the diagnostics do on their sampled steps. Those run eagerly: inside a compiled graph a hook is traced
        (a graph break, and a recompile each time hooks come and go); eagerly the compiled graph stays the one
        graph every other step runs, and the hooks see the eager network's tensors."""
        compiled = self.compiled_net
        if compiled is None:
            return self.net(idx)
        if not self._net_modules:
            self._net_modules = list(self.net.modules())
        return self.net(idx) if compat.modules_are_hooked(self._net_modules) else compiled(idx)

    def configure_optimizers(self):
        """The lecture's SGD, its learning rate multiplied by lr_decay at each milestone (counted in steps)."""
        # foreach: one call updates every parameter, the same numbers as a loop over them (the GPU default)
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, foreach=True)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.hparams.milestones, self.hparams.lr_decay)
        # "name": the tag LearningRateMonitor logs it under (the CLI adds one: train/lr in TensorBoard)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": LR_TAG}}

    # ----------------------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.training_forward(x), y)
        self.track_train_loss(loss)
        return loss

    # The speed add-on (mm_lightning/speed) may run this training_step as one CUDA graph of what it does: the loss
    # cross_entropy(self.net(x), y), handed to track_train_loss. A subclass that overrides training_step is run as
    # written, unless it declares its own the same way (docs/speed.md).
    graphable_training_step = training_step

    def track_train_loss(self, loss: torch.Tensor) -> None:
        """Add the step's loss to train/loss, the mean over each logging interval (see on_train_batch_end)."""
        try:
            every = self.trainer.log_every_n_steps
        except RuntimeError:  # called outside a fit (no trainer): one interval
            every = 0
        self.train_loss.add(loss, self.global_step, every)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # train/loss only where the logger writes it (every log_every_n_steps optimizer steps, and as training
        # stops): a self.log costs ~0.4 ms on a CPU, and reading a loss off a GPU makes the CPU wait for it
        trainer, every = self.trainer, self.trainer.log_every_n_steps
        writes = trainer.should_stop or trainer.fast_dev_run or (every and trainer.global_step % every == 0)
        if writes and self.train_loss.count:
            self.log("train/loss", self.train_loss.mean(), prog_bar=True)

    def _first_nonfinite_parameter(self) -> str | None:
        return next((name for name, p in self.named_parameters() if not torch.isfinite(p).all()), None)

    def on_train_epoch_end(self) -> None:
        # runs before ModelCheckpoint's hook: the last update may have left non-finite parameters (with validation
        # off nothing else would notice), and they must never reach a checkpoint
        bad = self._first_nonfinite_parameter()
        if bad is not None:
            raise NonFiniteLossError(f"{bad} became non-finite by step {self.global_step}; {NON_FINITE_ADVICE}")

    # --------------------------------------------------------------------------------------------- evaluation

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_loss_interval"] = self.train_loss.state_dict()  # a resumed run continues its mean

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        if "train_loss_interval" in checkpoint:
            self.train_loss.load_state_dict(checkpoint["train_loss_interval"], self.device)

    def on_validation_start(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            # every rank evaluates the model rank 0 holds and checkpoints: without SyncBatchNorm, each rank's
            # BatchNorm running statistics have followed its own minibatches since DDP last broadcast them
            for buffer in self.net.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(F.cross_entropy(self(x), y), weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()  # weighted mean over the whole split, all ranks
        self.val_loss.reset()
        if not torch.isfinite(value) and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # stop before the epoch's checkpoint is written (ModelCheckpoint saves after validation)
            bad = self._first_nonfinite_parameter()
            raise NonFiniteLossError(
                f"val/loss became {value.item()} at step {self.global_step}"
                + (f"; the first non-finite parameter is {bad}" if bad else "")
                + f"; {NON_FINITE_ADVICE}"
            )
        self._log_evaluation("val/loss", value)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_loss.update(F.cross_entropy(self(x), y), weight=y.numel())

    def on_test_epoch_end(self) -> None:
        value = self.test_loss.compute()
        self.test_loss.reset()
        self._log_evaluation("test/loss", value)

    def _log_evaluation(self, name: str, value: torch.Tensor) -> None:
        """Log at the step the result belongs to: the trainer's while fitting, the checkpoint's for `validate` and
        `test` (Lightning would put those at step 0). A logged "step" is Lightning's own way to set the x-axis.
        The value is already global (torchmetrics syncs it); sync_dist only keeps Lightning from warning."""
        loaded = self.trainer.state.fn != "fit" and self._checkpoint_step is not None
        step = self._checkpoint_step if loaded else self.global_step
        self.log(name, value, prog_bar=name == "val/loss", sync_dist=True)
        self.log("step", float(step), sync_dist=True)

    # ----------------------------------------------------------------------------------------------- sampling

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[str]:
        """Names for a batch of sample numbers (see NamesDataModule.predict_dataloader)."""
        return self.sample(len(batch), seed=int(batch[0]))

    def sample(self, num_samples: int, temperature: float = 1.0, seed: int = 42) -> list[str]:
        """Names from the model, seeded (the same seed gives the same names on the same kind of device)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate(self.net, num_samples, temperature, generator)
