"""The run's TensorBoard logger: Lightning's TensorBoardLogger with the losses filed under a group that sorts first.

TensorBoard's Time Series and Scalars tabs group tags by their first path component, sort the groups by name
(digits before letters) and open the first two. The diagnostics' groups are numbered in reading order ("1
activations", "2 updates", ...), so `train` and `val` would come last, closed. Here every metric named "loss" or
"<anything>/loss" is written as "0 loss/<name>": the group "0 loss" comes first and opens with "1 activations", and
Time Series titles each card by the tag after its group, so the cards read `train/loss`, `val/loss` as the progress
bar does. (`train/lr` stays in `train`: TensorBoard opens two groups, and the per-layer activations come next.)

Only the TensorBoard tag changes: Lightning's metric keeps its name, so `--checkpoint.monitor val/loss`, the
progress bar, `trainer.callback_metrics` and other loggers (CSV, W&B) still say `train/loss`.

Lightning calls the logger's `save()` after every logging step; TensorBoardLogger's flushes the writer, which
makes training wait while TensorBoard's writer thread drains its queue (0.5-3% of a CPU step of the lecture's
model at log_every_n_steps 50, docs/measurements.md). Events reach a local file without it (each is appended as it
is written); on a store without appends (a bucket) they wait for a flush. Here `save()` flushes at most every
FLUSH_SECS, TensorBoard's writer thread flushes within FLUSH_SECS of any write, and a flush comes at every
checkpoint (a run resumed after a kill has its curve up to the checkpoint) and at the end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger

LOSS_GROUP = "0 loss"
FLUSH_SECS = 2.0  # the longest a logged point waits in memory (TensorBoard itself reloads every 5 s or more)


def tensorboard_tag(name: str) -> str:
    """A metric's TensorBoard tag: "0 loss/<name>" for a loss curve (train/loss, val/loss, a user's x/loss), else its
    name. test/loss (one point, written by `test`) keeps its own group: in "0 loss" it would sort before train."""
    return f"{LOSS_GROUP}/{name}" if name.rsplit("/", 1)[-1] == "loss" and name != "test/loss" else name


class RunLogger(TensorBoardLogger):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("flush_secs", FLUSH_SECS)  # the SummaryWriter's thread: pending events flushed this soon
        super().__init__(*args, **kwargs)
        self._next_save = 0.0  # (monotonic clock) the first save() writes hparams.yaml at once, as Lightning's

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({tensorboard_tag(k): v for k, v in metrics.items()}, step)

    @rank_zero_only
    def save(self) -> None:
        now = time.monotonic()
        if now >= self._next_save:
            self._next_save = now + FLUSH_SECS
            super().save()

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self._next_save = 0.0
        self.save()  # what was logged up to a checkpoint is on disk with it

    def finalize(self, status: str) -> None:
        self._next_save = 0.0  # Lightning's finalize ends with a save(): hparams.yaml, whatever the clock says
        super().finalize(status)
