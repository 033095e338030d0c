"""StopOnNonFiniteLoss: training stops at a NaN/Inf loss, naming the step and the first layer whose output is not
finite, before any checkpoint can hold what it did. A callback rather than a check in training_step, so that the
training step never waits for the device: on a CPU reading a loss costs nothing and it looks at every step; on a
GPU it keeps the first bad step on the device and reads it only where the host waits anyway (the steps the logger
writes, the epoch's end) and before every checkpoint.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback

from mm_lightning.diagnostics.stats import first_nonfinite_module
from mm_lightning.module import NON_FINITE_ADVICE, NonFiniteLossError


class StopOnNonFiniteLoss(Callback):
    """Raises NonFiniteLossError (the CLI prints it in one line, exit status 1) at the first non-finite loss."""

    def __init__(self):
        self._step = 0  # the optimizer step of the batch under way
        self._x = None  # its inputs, to find the first non-finite layer
        self._first = None  # on a GPU: (step, loss) of the first non-finite loss, device tensors (step -1: none)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self._x = batch[0] if isinstance(batch, (tuple, list)) and batch else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        if loss.device.type == "cpu":
            if not math.isfinite(loss.item()):
                self._stop(pl_module, loss.item(), self._step)
            return
        loss = loss.detach().reshape(())
        if self._first is None:
            self._first = (torch.full((), -1, device=loss.device), torch.zeros((), device=loss.device))
        step, value = self._first
        new = (step < 0) & ~torch.isfinite(loss)  # no host sync: the flag stays on the device
        self._first = (torch.where(new, self._step, step), torch.where(new, loss.float(), value))
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self._check(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(pl_module)  # before ModelCheckpoint's epoch-end save (it runs after other callbacks)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._check(pl_module)  # a raise here writes nothing: the checkpoint is assembled before it is written

    def _check(self, pl_module) -> None:
        if self._first is not None and int(self._first[0]) >= 0:
            self._stop(pl_module, float(self._first[1]), int(self._first[0]))

    def _stop(self, pl_module, loss: float, step: int) -> None:
        where = None
        if isinstance(self._x, torch.Tensor):
            with torch.no_grad():
                where = first_nonfinite_module(pl_module, self._x)
        raise NonFiniteLossError(
            f"the loss became {loss} at step {step}"
            + (f"; the first non-finite output is {where}" if where else "")
            + f"; {NON_FINITE_ADVICE}"
        )
