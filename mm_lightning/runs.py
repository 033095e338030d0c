"""Run directories and checkpoint files: a new run's directory, the checkpoint `last` means, and reading and
writing checkpoints so that none is ever truncated and none can run code.

A run lives in <root>/lightning_logs/version_N/ (TensorBoard events, config.yaml, checkpoints/). Lightning picks N
by listing the folder, so two runs started together can pick the same N; here N is claimed with an atomic mkdir.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mm_lightning import compat, signals
from mm_lightning.checkpoints import checkpoint_net, load_checkpoint, net_config_class, net_state, safe_load  # noqa: F401
from mm_lightning.errors import UsageError

RUNS_DIRNAME = "lightning_logs"
_VERSION_RE = re.compile(r"version_(\d+)$")


def runs_dir(root_dir: str | os.PathLike | None) -> Path:
    return Path(root_dir or ".") / RUNS_DIRNAME


_CLAIMED: list[Path] = []  # run directories this process created (see discard_empty_claims)


def claim_version(runs: Path) -> int:
    """Create runs/version_N for the smallest free N above all existing ones, atomically."""
    runs.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in runs.iterdir() if (m := _VERSION_RE.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (runs / f"version_{n}").mkdir()
            _CLAIMED.append(runs / f"version_{n}")
            return n
        except FileExistsError:  # another run claimed it between our listing and mkdir
            n += 1


_LOCKS: dict[Path, int] = {}  # run directory -> the open file descriptor holding its lock, for this process's life


def lock_run(run_dir: Path) -> None:
    """Make this process the run's only writer, or refuse in one line naming the one that is. An flock on
    run_dir/.lock: the kernel releases it when its holder exits, however (a SIGKILL leaves nothing stuck)."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _LOCKS:
        return
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot lock run {run_dir} ({e.strerror}); check the directory's permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(
            f"run {run_dir} is being trained by process {holder}; wait for it to finish (or stop it), "
            "or start a new run without --ckpt_path"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[run_dir.resolve()] = fd


def discard_empty_claims() -> list[Path]:
    """Remove the run directories this process created that hold nothing yet: no checkpoint, and event files with
    no logged value (a command that failed before training, e.g. a bad --optimizer argument or a batch that does
    not fit in memory, would leave an empty version_N behind). Returns what was removed."""
    import shutil

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    removed = []
    for run in _CLAIMED:
        if not run.is_dir() or any(run.rglob("*.ckpt")):
            continue
        events = list(run.rglob("events.out.tfevents.*"))
        if any(event.summary.value for path in events for event in EventFileLoader(str(path)).Load()):
            continue
        shutil.rmtree(run, ignore_errors=True)
        removed.append(run)
    _CLAIMED.clear()
    return removed


def unlock_runs() -> None:
    """Release every run this process locked (the CLI does when its command is done)."""
    for fd in _LOCKS.values():
        os.close(fd)  # closing the descriptor releases the flock
    _LOCKS.clear()


def version_of(checkpoint: Path, runs: Path) -> int | None:
    """N when checkpoint is runs/version_N/checkpoints/<file>, else None."""
    checkpoint, runs = checkpoint.resolve(), runs.resolve()
    run_dir = checkpoint.parent.parent
    m = _VERSION_RE.match(run_dir.name)
    if m and checkpoint.parent.name == "checkpoints" and run_dir.parent == runs:
        return int(m.group(1))
    return None


def find_last(runs: Path, command: str = "fit", root_option: str = "--trainer.default_root_dir") -> Path:
    """The most recently written runs/version_*/checkpoints/last.ckpt. None there: fit is told it can start a new
    run, an evaluation (which cannot) to train one first; root_option is the command's option for runs' place."""
    candidates = list(runs.glob("version_*/checkpoints/last.ckpt"))
    if not candidates:
        missing = f"no {RUNS_DIRNAME}/version_*/checkpoints/last.ckpt under {runs.parent}"
        if command == "fit":
            raise UsageError(
                f"no checkpoint to resume: {missing}; drop --ckpt_path to start a new run, or pass --ckpt_path FILE"
            )
        raise UsageError(
            f"no trained run for {command}: {missing}; train one first (python -m mm_lightning.cli fit), or pass "
            f"--ckpt_path FILE ({root_option} DIR if the runs are elsewhere)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)


def remove_partial_writes(directory: Path) -> None:
    """Delete temp files a killed writer left behind (their final files were never replaced)."""
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    try:  # Linux says it without changing it (setting and resetting it races with other threads' new files)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


class _ErrorKeepingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer replaces it with a
    RuntimeError without an errno ("unexpected pos ..."), so a full disk (ENOSPC), a file-size limit (EFBIG) or a
    quota (EDQUOT) would otherwise not be told apart from a bug."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


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
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode any new file gets
            with os.fdopen(fd, "wb") as f:
                writer = _ErrorKeepingWriter(f)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError:
                    if writer.error is not None:
                        raise writer.error from None
                    raise
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a part
        except OSError as e:  # a full disk, say: the old file stays, and the error names the checkpoint
            Path(tmp).unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from e
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
    - A run directory that was moved or copied keeps its checkpoints' bookkeeping (see `moved`): plain
      ModelCheckpoint would forget it, write last-v1.ckpt beside last.ckpt, and `--ckpt_path last` would go back.

    On a Lightning without the private ModelCheckpoint names the first two use (compat.model_checkpoint_missing),
    it is ModelCheckpoint as Lightning ships it, and one warning at setup says so.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        missing = compat.model_checkpoint_missing(self)
        if missing is not None and stage == "fit":
            compat.warn_plain_checkpoint(missing)
        self._saves_on_train_batches = compat.saves_on_train_batches(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # without every_n_train_steps or train_time_interval (the CLI's default) ModelCheckpoint's hook does nothing
        if getattr(self, "_saves_on_train_batches", True):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if compat.model_checkpoint_missing(self) is not None:
            return
        if self.save_last and not compat.checkpoint_saved_at_this_step(self, trainer):
            compat.save_last_checkpoint(self, trainer)

    def state_dict(self) -> dict[str, Any]:
        if compat.model_checkpoint_missing(self) is not None:
            return super().state_dict()
        return {**super().state_dict(), "last_global_step_saved": compat.last_saved_step(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(inside_run(moved(state_dict, self.dirpath), self.dirpath))
        if compat.model_checkpoint_missing(self) is None:
            compat.set_last_saved_step(self, state_dict.get("last_global_step_saved", compat.last_saved_step(self)))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        # Lightning deletes a checkpoint it replaces after checking it lies in dirpath with Path.absolute(), which
        # keeps `..` and follows no symlink: a second check, on the resolved path, whatever the state came from
        if self.dirpath is None or not _resolves_inside(filepath, self.dirpath):
            return
        super()._remove_checkpoint(trainer, filepath)


PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")  # ModelCheckpoint's state: files it owns


def _resolves_inside(path: str, dirpath: str) -> bool:
    """Whether `path`, with `..` and every symlink resolved, names a file inside `dirpath` (resolved too)."""
    if "://" in str(path):  # another filesystem (fsspec): never one of this run's files
        return False
    try:
        return Path(dirpath).resolve() in Path(path).resolve().parents
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: not a path of ours
        return False


def inside_run(state: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """ModelCheckpoint's state with every path outside the run's checkpoints directory dropped: Lightning deletes
    the old `last` and the worst of the best k when it writes new ones, so a checkpoint whose state names
    `<dirpath>/../../../somefile` (a run folder someone sent) would make `fit --ckpt_path last` delete that file.
    A path that claims to be inside but resolves outside is reported in one line (the checkpoint was crafted or
    edited); one plainly elsewhere (another run's checkpoint resumed into a new run) is dropped as Lightning would
    ignore it."""
    if not dirpath:
        return state
    state, dropped = dict(state), []

    def keep(path) -> bool:
        if not path or _resolves_inside(path, dirpath):
            return True
        claimed = "://" in str(path) or Path(dirpath).absolute() in Path(path).absolute().parents
        if claimed:
            dropped.append(str(path))
        return False

    for key in PATH_KEYS:
        if key in state and not keep(state[key]):
            state[key] = ""
    if "last_model_path" in state and not state["last_model_path"] and (Path(dirpath) / "last.ckpt").is_file():
        # the run's own last.ckpt, which a replaced path stood for: written over in place (not beside, as last-v1)
        state["last_model_path"] = str(Path(dirpath) / "last.ckpt")
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {k: v for k, v in state["best_k_models"].items() if keep(k)}
    if dropped and all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK")):
        print(
            f"warning: ignored {len(dropped)} checkpoint path(s) that lead outside {dirpath} (first: {dropped[0]}); "
            "the checkpoint was edited or crafted: no file outside the run is read or deleted",
            file=sys.stderr,
        )
    return state


def moved(state: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """ModelCheckpoint's state with the paths it holds moved from the directory it was saved in to `dirpath`, the
    same run's checkpoints directory (version_N/checkpoints) wherever it now is: ModelCheckpoint keeps the paths it
    was given, and would otherwise forget its best and last checkpoints there."""
    old = state.get("dirpath")
    if not old or not dirpath or old == dirpath or Path(old).parts[-2:] != Path(dirpath).parts[-2:]:
        return state  # the same place, or another run's checkpoint resumed into a new run: Lightning's own way

    def here(path):
        return str(Path(dirpath) / Path(path).name) if path and Path(path).parent == Path(old) else path

    state = {**state, "dirpath": dirpath}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = here(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {here(k): v for k, v in state["best_k_models"].items()}
    return state


class ResumedRunLogs(Callback):
    """A resumed run's TensorBoard curves, continued as if it had never stopped.

    - Lightning restores the step loggers write at off by one in some restart stages (compat.realign_logging_step):
      put it back on the optimizer step at the first batch, before any callback logs (keep this callback first).
    - TensorBoard purges everything the stopped run logged from the checkpoint's step on (what came after the
      checkpoint), and the val/loss measured at that very step, just before the checkpoint was written, would go
      with it: write it again, at fit start (a finished run resumed with no steps left never starts training).
    """

    def __init__(self):
        self.last: tuple[int, float] | None = None  # (step, val/loss) of the latest validation while fitting
        self.saved_at: int | None = None  # the step of the checkpoint this state was saved in
        self._realign = False
        self._trainer = None  # for state_dict(), which is given no trainer

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if trainer.state.fn == "fit" and not trainer.sanity_checking and value is not None:
            self.last = (trainer.global_step, float(value))

    def on_fit_start(self, trainer, pl_module) -> None:
        # restored from the checkpoint (callbacks' state is, before this hook): its last val/loss was purged
        if self.last is not None and self.last[0] == self.saved_at and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"val/loss": self.last[1]}, step=self.last[0])

    def on_train_start(self, trainer, pl_module) -> None:
        self._realign = trainer.global_step > 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._realign:
            self._realign = False
            compat.realign_logging_step(trainer)

    def state_dict(self) -> dict:
        step = None if self._trainer is None else self._trainer.global_step
        return {"last": None if self.last is None else list(self.last), "saved_at": step}

    def load_state_dict(self, state_dict: dict) -> None:
        last = state_dict.get("last")
        self.last = None if last is None else (int(last[0]), float(last[1]))
        self.saved_at = state_dict.get("saved_at")


class StopOnSignal(Callback):
    """SIGTERM (what a cluster scheduler or a spot instance sends before the end) and Ctrl-C stop training at the
    end of the optimizer step under way, never inside it (under gradient accumulation: at the next batch that steps
    the optimizer, so the resumed run's batches line up): Lightning then validates and ModelCheckpoint writes
    last.ckpt at that step (atomically, as every checkpoint), the loggers are flushed, and the CLI exits with
    128 + the signal (143, 130) and one line saying so. `fit --ckpt_path last` continues exactly. A second Ctrl-C
    stops at once (the last checkpoint written stays). Before training starts and after it ends, signals.py answers
    (no checkpoint is claimed). One process only: under DDP Lightning's own SIGTERM handling runs (it broadcasts the
    signal to every rank)."""

    SIGNALS = signals.NAMES

    def __init__(self):
        self.received: int | None = None  # the signal that stopped training
        self.step: int | None = None  # the step training stopped at
        self.started = False  # on_train_start ran: a signal from now on stops at a step, with a checkpoint
        self.ended = False  # on_train_end ran: training's checkpoints are written
        self._pending = False  # a signal came mid-accumulation: stop at the batch that steps the optimizer
        self._previous: dict = {}
        self._trainer = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self._trainer = True, trainer
        if trainer.world_size > 1:
            signals.defer = True  # Lightning stops every rank at a batch end and raises SIGTERMException
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        self._trainer, self.received = trainer, None
        for sig in self.SIGNALS:  # replaces Lightning's SIGTERM handler, which stops without a checkpoint
            self._previous[sig] = signal.signal(sig, self._handle)

    def trainer_step(self) -> int | None:
        return None if self._trainer is None else self._trainer.global_step

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise signals.Interrupted(signum)  # a second Ctrl-C: at once (the CLI says so in one line)
        self.received = signum
        if self._trainer.accumulate_grad_batches > 1:
            self._pending = True  # stopping between two accumulated batches would shift every later batch
        else:
            self._trainer.should_stop = True  # the loop ends after this step: validation, last.ckpt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the batch that just ran stepped the optimizer when it completed an accumulation (or ended the epoch)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self._pending and (stepped or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            self._pending = False
            trainer.should_stop = True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self.ended = True
        if self.received is not None:
            self.step = trainer.global_step
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def message(self) -> str | None:
        """The line the CLI prints when a signal stopped training, or None."""
        if self.received is None:
            return None
        return (
            f"interrupted by {self.SIGNALS[self.received]} at step {self.step}: last.ckpt written there; "
            "continue with `fit --ckpt_path last`"
        )
