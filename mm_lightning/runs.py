"""Run directories and checkpoint files: a new run's directory, the checkpoint `last` means, and reading and
writing checkpoints so that none is ever truncated and none can run code.

A run lives in <root>/lightning_logs/version_N/ (TensorBoard events, config.yaml, checkpoints/). Lightning picks N
by listing the folder, so two runs started together can pick the same N; here N is claimed with an atomic mkdir.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from mm_lightning.errors import UsageError

RUNS_DIRNAME = "lightning_logs"
_VERSION_RE = re.compile(r"version_(\d+)$")


def runs_dir(root_dir: str | os.PathLike | None) -> Path:
    return Path(root_dir or ".") / RUNS_DIRNAME


def claim_version(runs: Path) -> int:
    """Create runs/version_N for the smallest free N above all existing ones, atomically."""
    runs.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in runs.iterdir() if (m := _VERSION_RE.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (runs / f"version_{n}").mkdir()
            return n
        except FileExistsError:  # another run claimed it between our listing and mkdir
            n += 1


def version_of(checkpoint: Path, runs: Path) -> int | None:
    """N when checkpoint is runs/version_N/checkpoints/<file>, else None."""
    checkpoint, runs = checkpoint.resolve(), runs.resolve()
    run_dir = checkpoint.parent.parent
    m = _VERSION_RE.match(run_dir.name)
    if m and checkpoint.parent.name == "checkpoints" and run_dir.parent == runs:
        return int(m.group(1))
    return None


def find_last(runs: Path) -> Path:
    """The most recently written runs/version_*/checkpoints/last.ckpt."""
    candidates = list(runs.glob("version_*/checkpoints/last.ckpt"))
    if not candidates:
        raise UsageError(
            f"no checkpoint to resume: no {RUNS_DIRNAME}/version_*/checkpoints/last.ckpt under {runs.parent}; "
            "drop --ckpt_path to start a new run, or pass --ckpt_path FILE"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True, turning every way it can fail into a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"checkpoint {path} {what}; pass --ckpt_path last or the path of a .ckpt file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not one of ours
        raise UsageError(f"{path} is not a readable checkpoint (not a torch.save archive); pass a .ckpt written by fit")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run code; "
            "use a checkpoint written by mm_lightning"
        ) from None
    except Exception as e:  # not a zip/pickle at all, truncated, ...
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint ({reason}); pass a .ckpt file written by fit") from None
    return checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A checkpoint written by this project's fit, loaded safely (see safe_load)."""
    checkpoint = safe_load(path, map_location)
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "net" not in checkpoint.get("hyper_parameters", {})
    ):
        raise UsageError(
            f"{path} is not an mm_lightning checkpoint (no model hyperparameters); pass one written by fit"
        )
    return checkpoint


def remove_partial_writes(directory: Path) -> None:
    """Delete temp files a killed writer left behind (their final files were never replaced)."""
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically next to their destination, and only ever read with weights_only=True.

    Lightning's own save goes through a temp file in the system temp dir and a move, which is a copy (and so not
    atomic) when that dir is on another filesystem; a SIGKILL during the copy leaves a truncated checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a part
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes last.ckpt at every epoch end and remembers across a restart where it saved.

    - Lightning 2.6 writes last.ckpt only in a step where the monitored metric improved: once val/loss stops
      improving, last.ckpt would fall behind and a restart would silently go back to an old step.
    - A checkpoint is written in the epoch-end hook, and on resume Lightning runs that hook again for the restored
      epoch: plain ModelCheckpoint would then save the same step a second time, before any validation (and warn that
      val/loss is missing).
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # i.e. not saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_global_step_saved": self._last_global_step_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_global_step_saved = state_dict.get("last_global_step_saved", self._last_global_step_saved)
