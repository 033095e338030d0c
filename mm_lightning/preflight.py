"""Checks before any work, and resource errors in one line: a bad input names the setting and the fix.

- config files: present, UTF-8, valid YAML, a non-empty mapping (jsonargparse would say "<unicode string>" or
  "Unexpected config:" with nothing after it, or raise UnicodeDecodeError);
- a seed numpy accepts (0 .. 2**32 - 1);
- a checkpoint fit can resume, and the data it was trained on (a checkpoint's contents: checkpoints.py);
- every failure class a command can meet as one line naming what to change (see `resource_error`, which cli.py's
  `_command`, the one place every command runs through, calls): memory, file-size and open-file limits; a full,
  read-only, unwritable or vanished destination, or a file in the way of a directory; unusable model output.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
import yaml

from mm_lightning.errors import UsageError

MAX_SEED = 2**32 - 1  # numpy's bound, which Lightning's seed_everything passes the seed to


def config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(argv: list[str]) -> None:
    for path in config_paths(argv):
        p = Path(path)
        if not p.is_file():
            where = "" if p.is_absolute() else f" in {Path.cwd()}"  # (a notebook's cwd is often notebooks/)
            raise UsageError(f"--config {path}: no such file{where}")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"--config {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); save it as UTF-8"
            ) from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UsageError(f"--config {path} is not valid YAML{where}: {problem}") from None
        if content is None:
            raise UsageError(f"--config {path} is empty: it holds no settings; fill it (see configs/) or drop --config")
        if not isinstance(content, dict):
            raise UsageError(
                f"--config {path} must be a mapping of settings (trainer:, model:, data:, ...), "
                f"not a {type(content).__name__}"
            )


def check_seed(seed) -> None:
    if isinstance(seed, bool) or seed is None:
        return  # True: a random seed; False/None: none
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise UsageError(f"--seed_everything must be a whole number from 0 to {MAX_SEED}, got {seed}")


def check_resumable(checkpoint: dict, path) -> None:
    """A checkpoint `fit --ckpt_path` can continue exactly: Lightning's loop counters, the optimizer's state and the
    schedulers'. Without loop state Lightning restarts at step 0 while the run counts from the checkpoint's step
    (and writes its TensorBoard points a second time); without optimizer state it stops with a KeyError."""
    step = checkpoint.get("global_step", 0)
    if not isinstance(checkpoint.get("loops"), dict) or "fit_loop" not in checkpoint["loops"]:
        raise UsageError(
            f"{path} holds no training-loop state (edited, or written by another tool): resuming it would restart at "
            f"step 0 while counting from step {step}; use it with validate/test/sample, or start a new run"
        )
    optimizers = checkpoint.get("optimizer_states")
    if not optimizers or not all(isinstance(o, dict) and "param_groups" in o and "state" in o for o in optimizers):
        raise UsageError(
            f"{path} holds no optimizer state (a weights-only checkpoint, e.g. --checkpoint.save_weights_only true): "
            "it cannot continue a run; use it with validate/test/sample, or start a new run"
        )
    schedulers = checkpoint.get("lr_schedulers", [])
    if not isinstance(schedulers, list) or not all(
        isinstance(s, dict) and isinstance(s.get("last_epoch"), int) and isinstance(s.get("base_lrs"), list)
        for s in schedulers
    ):
        raise UsageError(f"{path}: its learning-rate scheduler state is damaged; resume an earlier checkpoint")


RESUMED_DATA = ("batch_size", "seed", "split_seed", "sampler")  # what a resumed run's minibatch stream depends on


def check_resumed_data(checkpoint: dict, given: dict, path, run_config) -> None:
    """A resumed run keeps the minibatch stream it was trained on: a batch size or seed that differs from the
    checkpoint's (its DataModule hyperparameters) would silently change it, e.g. when the run's config.yaml is gone
    and the defaults step in."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    for key in RESUMED_DATA:
        if key in saved and key in given and given[key] != saved[key]:
            why = f"the run's {run_config} is missing" if not Path(run_config).is_file() else "this command changes it"
            raise UsageError(
                f"{path} was trained with data.{key}={saved[key]!r} but this command gives {given[key]!r} ({why}); "
                f"pass --data.{key} {saved[key]} to continue the run as it was, or start a new run without --ckpt_path"
            )


_OOM = re.compile(r"(can't allocate memory|out of memory|Cannot allocate memory)", re.IGNORECASE)


def resource_error(error: BaseException, command: str) -> str | None:
    """A one-line message for a failure class (resources, destinations, model output), naming what to change; None
    for other errors (a bug: the CLI shows its traceback)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and _OOM.search(str(error))
    ):
        size = re.search(r"allocate ([\d.]+ ?[KMGTP]?i?B|\d+ bytes)", str(error))
        asked = f" (asked for {_human(size.group(1))})" if size else ""
        what = (
            "--num_samples" if command == "sample" else "--data.batch_size, --model.net.n_hidden, --model.net.n_layers"
        )
        return f"out of memory{asked}: lower {what}"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = _filename(error) or "a file (TensorBoard's log, or a checkpoint)"
        return (
            f"disk full writing {where}: free some space; checkpoints already written are intact (a run continues "
            "with `fit --ckpt_path last`)"
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write {_filename(error) or 'a file'} ({error.strerror}); choose a writable directory "
            "(--trainer.default_root_dir, --root_dir, --save_figures) or fix its permissions"
        )
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return (
            f"file too large writing {_filename(error) or 'a file'}: the file size limit (ulimit -f) is reached; raise "
            "it; checkpoints already written are intact (a run continues with `fit --ckpt_path last`)"
        )
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        return "too many open files (the limit is `ulimit -n`): raise it, e.g. ulimit -n 4096, and run again"
    if isinstance(error, OSError) and error.errno in (errno.ENOTDIR, errno.EEXIST):
        return (
            f"cannot create the directory {_filename(error) or ''}: a file of that name (or of a parent's) is in the "
            "way; move it, or choose another --trainer.default_root_dir / --root_dir"
        )
    if isinstance(error, FileNotFoundError) and error.filename:
        return (
            f"{os.fsdecode(error.filename)} disappeared while {command} was using it (was the run directory deleted "
            "or moved?); it stopped there"
        )
    if isinstance(error, RuntimeError) and _NOT_A_DISTRIBUTION.search(str(error)):
        return (
            "the model's output is not a probability distribution (NaN or infinite values: the checkpoint's weights "
            "are not finite, or --temperature is too small to divide by); use another checkpoint or temperature"
        )
    return None


# torch.multinomial on NaN/inf probabilities (NaN weights, or logits / a temperature that underflows to 0)
_NOT_A_DISTRIBUTION = re.compile(r"probability tensor contains either `inf`, `nan` or element < 0|invalid multinomial")


def _filename(error: OSError) -> str | None:
    """The file an OSError names, as text (TensorBoard's writer gives bytes)."""
    return os.fsdecode(error.filename) if error.filename else None


def _human(size: str) -> str:
    if size.endswith(" bytes"):
        n = int(size.split()[0])
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if n < 1024 or unit == "PiB":
                return f"{n:.1f} {unit}" if unit != "bytes" else f"{n} bytes"
            n /= 1024
    return size
