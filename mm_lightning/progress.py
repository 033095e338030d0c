"""A progress bar over optimizer steps (Lightning's bars count batches, and a batch here holds many steps)."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgressBar(ProgressBar):
    """On a terminal: one live Rich bar with the loss, the last val/loss and steps/s. Otherwise (logs, CI): one line
    at every validation. The bar is redrawn at most every refresh_s seconds, so it costs nothing per step."""

    def __init__(self, refresh_s: float = 0.5):
        super().__init__()
        self.refresh_s = refresh_s
        self._enabled = True
        self._progress: Progress | None = None
        self._task = None
        self._console = Console(stderr=True)
        self._last_draw = 0.0
        self._rate_mark: tuple[float, int] = (0.0, 0)  # (time, step) at the start of the rate window
        self._rate = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _status(self, trainer: L.Trainer) -> str:
        m = trainer.progress_bar_metrics
        parts = [f"{key} {float(m[key]):.4f}" for key in ("train/loss", "val/loss") if key in m]
        parts.append(f"{self._rate:,.0f} steps/s")
        return "  ".join(parts)

    def _update_rate(self, step: int) -> None:
        """Steps/s over the last second or more (over everything so far until a second has passed)."""
        now = time.monotonic()
        t0, s0 = self._rate_mark
        if now > t0 and step > s0:
            self._rate = (step - s0) / (now - t0)
            if now - t0 >= 1.0:
                self._rate_mark = (now, step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        self._rate_mark = (time.monotonic(), trainer.global_step)
        if self._console.is_terminal:
            total = trainer.max_steps if trainer.max_steps > 0 else None
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self._console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, completed=trainer.global_step, status="")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last_draw >= self.refresh_s:  # the rate only where it is drawn: nothing else per step
            self._last_draw = now
            self._update_rate(trainer.global_step)
            self._progress.update(self._task, completed=trainer.global_step, status=self._status(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._update_rate(trainer.global_step)
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step, status=self._status(trainer))
        else:
            total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
            self._console.print(f"step {trainer.global_step}{total}  {self._status(trainer)}", highlight=False)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()
