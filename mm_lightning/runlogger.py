"""The run's TensorBoard logger: Lightning's TensorBoardLogger with the losses filed under a group that sorts first.

TensorBoard's Time Series and Scalars tabs group tags by their first path component, sort the groups by name
(digits before letters) and open the first two. The diagnostics' groups are numbered in reading order ("1
activations", "2 updates", ...), so `train` and `val` would come last, closed. Here every metric named "loss" or
"<anything>/loss" is written as "0 loss/<name>": the group "0 loss" comes first and opens with "1 activations", and
Time Series titles each card by the tag after its group, so the cards read `train/loss`, `val/loss` as the progress
bar does. (`train/lr` stays in `train`: TensorBoard opens two groups, and the per-layer activations come next.)

Only the TensorBoard tag changes: Lightning's metric keeps its name, so `--checkpoint.monitor val/loss`, the
progress bar, `trainer.callback_metrics` and other loggers (CSV, W&B) still say `train/loss`.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger

LOSS_GROUP = "0 loss"


def tensorboard_tag(name: str) -> str:
    """A metric's TensorBoard tag: "0 loss/<name>" for a loss curve (train/loss, val/loss, a user's x/loss), else its
    name. test/loss (one point, written by `test`) keeps its own group: in "0 loss" it would sort before train."""
    return f"{LOSS_GROUP}/{name}" if name.rsplit("/", 1)[-1] == "loss" and name != "test/loss" else name


class RunLogger(TensorBoardLogger):
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({tensorboard_tag(k): v for k, v in metrics.items()}, step)
