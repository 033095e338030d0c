"""The command line: python -m mm_lightning.cli {fit,validate,test,predict,sample,download} ...

fit/validate/test/predict are LightningCLI subcommands (configs in configs/, overrides such as
--trainer.max_steps 400 --model.lr 0.05 --data.batch_size 64). On top of plain LightningCLI:
- `--ckpt_path last` resumes the most recently written run in its own directory, so TensorBoard curves continue
  (plain Lightning looks for `last` in a new version folder and silently starts over: Lightning issue 18524). The
  run's config.yaml is the base config, and settings that contradict the checkpoint are refused, not ignored.
- a new run claims its version directory atomically: runs started together never share one;
- checkpoints are written atomically and read with torch.load(weights_only=True);
- bad input prints one line and exits with status 2 (add --debug for the traceback).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mm_lightning import preflight, signals
from mm_lightning.data import (
    DEFAULT_PATH,
    NAMES_SHA256,
    NOTEBOOK_NEEDS_INIT_SEED,
    NOTEBOOK_ONE_PROCESS,
    NamesDataModule,
    download_names,
)
from mm_lightning.diagnostics import DiagnosticsConfigError, TrainingDiagnostics, tbwrite
from mm_lightning.errors import NothingToDo, UsageError
from mm_lightning.model import generate
from mm_lightning.module import LR_TAG, MakemoreModule, NonFiniteLossError
from mm_lightning.nonfinite import StopOnNonFiniteLoss
from mm_lightning.progress import StepProgressBar
from mm_lightning.runlogger import RunLogger
from mm_lightning.runs import (
    RUNS_DIRNAME,
    ResumedRunLogs,
    RunCheckpoint,
    SafeCheckpointIO,
    StopOnSignal,
    checkpoint_net,
    claim_version,
    discard_empty_claims,
    find_last,
    load_checkpoint,
    lock_run,
    remove_partial_writes,
    runs_dir,
    unlock_runs,
    version_of,
)
from mm_lightning.speedswitch import fast_path_class
from mm_lightning.threads import one_thread_if_small

TRAINER_DEFAULTS = {
    "max_steps": 200_000,  # the lecture's run length
    "log_every_n_steps": 50,  # train/loss and train/lr are logged every this many optimizer steps
    "use_distributed_sampler": False,  # the DataModule draws minibatches and shards eval splits per rank itself
}
CHECKPOINT_DEFAULTS = {
    "checkpoint.monitor": "val/loss",  # keep the best by validation loss ...
    "checkpoint.mode": "min",
    "checkpoint.save_top_k": 1,
    "checkpoint.save_last": True,  # ... and the last, at every epoch end (--data.steps_per_epoch) and at the end
    "checkpoint.filename": "best-step={step}-val_loss={val/loss:.4f}",
    "checkpoint.auto_insert_metric_name": False,
}
VERSION_ENV = "MM_LIGHTNING_RUN_VERSION"  # rank 0's run version, inherited by the DDP processes it launches


def _is_rank_zero() -> bool:
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


@dataclass
class Resume:
    checkpoint: Path
    version: int | None  # the run directory version_N the checkpoint belongs to, if it is in one
    global_step: int
    vocab: str


def _after_existing_event_files(run_dir: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after the run's existing ones. TensorBoard reads a run's
    event files in name order: events.out.tfevents.<second>.<host>.<pid>.<counter>. Within one second and one process
    (a resume right after a short fit, in a notebook or a test) the counter decides, and 10 sorts before 9: the
    resumed file would be read first, and its purge step would hide everything the earlier file holds."""
    seconds = [p.name.split(".")[3] for p in run_dir.glob("events.out.tfevents.*")]
    newest = max((int(s) for s in seconds if s.isdigit()), default=0)
    while int(time.time()) <= newest:
        time.sleep(0.05)


class MakemoreCLI(LightningCLI):
    def __init__(self, args: list[str], run: bool = True, stop_on_signal: StopOnSignal | None = None):
        self._argv = list(args)
        self.resume: Resume | None = None
        self.complete: str | None = None  # fit resuming a run already at its max_steps: the line that says so
        self.stop_on_signal = stop_on_signal or StopOnSignal()
        super().__init__(
            MakemoreModule,
            NamesDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own config.yaml
            load_from_checkpoint_support=False,  # no class paths in checkpoints: they could choose code to run
            parser_kwargs={"exit_on_error": False},  # main() reports a parse error in one line
            args=self._argv,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.block_size", "model.net.block_size")
        parser.link_arguments("data.vocab", "model.net.vocab", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_lightning_class_args(TrainingDiagnostics, "diagnostics")  # on by default
        # speed only: results are the same without it; the add-on is imported only by fit (speedswitch.py)
        parser.add_lightning_class_args(fast_path_class(self._argv[0] if self._argv else None), "fast_path")

    @staticmethod
    def configure_optimizers(lightning_module, optimizer, lr_scheduler=None):
        """--optimizer / --lr_scheduler replace the module's own SGD and step decay. A scheduler steps every
        optimizer step, as the module's own does (Lightning's CLI default would step it once per epoch)."""
        if lr_scheduler is None:
            return optimizer
        scheduler = {"scheduler": lr_scheduler, "interval": "step", "name": LR_TAG}
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.update(interval="epoch", monitor=lr_scheduler.monitor)  # it needs a metric: val/loss, per epoch
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------------------------------------- resume

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        preflight.check_seed((self.config[subcommand] if subcommand else self.config).get("seed_everything"))
        if subcommand is not None and self.config[subcommand].get("weights_only") is False:
            raise UsageError("--weights_only false is refused: checkpoints are only loaded with weights_only=True")
        if subcommand is None or not self.config[subcommand].get("ckpt_path"):
            return
        config = self.config[subcommand]
        runs = runs_dir(config.trainer.default_root_dir)
        given = config.ckpt_path
        path = find_last(runs, subcommand) if given == "last" else Path(given)
        checkpoint = load_checkpoint(path)
        version = version_of(path, runs)
        run_config = path.parent.parent / "config.yaml"
        own_run = version is not None or subcommand != "fit"  # evaluating: a run from anywhere, with its config
        hparams = checkpoint["hyper_parameters"]
        base = []
        if own_run and run_config.is_file() and not any(a.split("=")[0] == "--config" for a in args):
            preflight.check_config_files(["--config", str(run_config)])  # a damaged one is named, in one line
            # the run's own config is the base, so `fit --ckpt_path last` continues it as it was configured, and
            # `validate --ckpt_path <another directory's run>/...` evaluates the model it trained
            base = ["--config", str(run_config)]
        if subcommand != "fit":  # evaluating: the model the checkpoint holds (a folded one has no BatchNorm)
            base += _model_args(hparams, config.model.as_dict())
        if base:
            super().parse_arguments(parser, [args[0], *base, *args[1:]])
            config = self.config[subcommand]
        config.ckpt_path = str(path)
        _refuse_changed_model(hparams, config.model.as_dict(), path, resuming=subcommand == "fit")
        if subcommand == "fit":
            preflight.check_resumable(checkpoint, path)
            preflight.check_resumed_data(checkpoint, config.data.as_dict(), path, run_config)
        self.resume = Resume(path, version, int(checkpoint.get("global_step", 0)), hparams["net"]["vocab"])
        step, max_steps = self.resume.global_step, config.trainer.max_steps
        if subcommand == "fit" and max_steps is not None and 0 <= max_steps <= step:  # (Lightning would say only
            where = f"run {path.parent.parent}" if version is not None else str(path)  # "max_steps=N reached")
            self.complete = (  # said once the data is checked too (after_instantiate_classes)
                f"fit: {where} is already complete at step {step} (--trainer.max_steps {max_steps}): nothing to "
                f"train; to train further, give a larger --trainer.max_steps, e.g. `fit --ckpt_path {given} "
                f"--trainer.max_steps {2 * max(step, 1)}`"
            )
        elif _is_rank_zero():
            written = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
            where = f"run {path.parent.parent}" if version is not None else "checkpoint"
            print(f"{subcommand}: {where} at step {self.resume.global_step} ({path}, written {written})", flush=True)

    def _add_configure_optimizers_method_to_model(self, subcommand) -> None:
        """Lightning's: instantiates --optimizer / --lr_scheduler; a bad argument for them is a usage error."""
        try:
            super()._add_configure_optimizers_method_to_model(subcommand)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--optimizer / --lr_scheduler: {str(e).splitlines()[0]}") from None

    def _parse_ckpt_path(self) -> None:
        """Lightning's version lays the checkpoint's hyperparameters over the command line without a word; ours
        (in parse_arguments) refuses a mismatch instead."""

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            self.save_config_callback = None  # evaluating must not overwrite the run's training config.yaml
            # evaluating saves no checkpoint: ModelCheckpoint's bookkeeping, and its warning about it, do not matter
            warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.data.sampler == "notebook" and config.model.net.init_seed is None:
            raise UsageError(NOTEBOOK_NEEDS_INIT_SEED)  # before anything is built
        if config.data.sampler == "notebook" and _processes(config.trainer) > 1:  # before DDP starts them
            raise UsageError(NOTEBOOK_ONE_PROCESS)
        if config.trainer.get("sync_batchnorm") and config.model.net.bn_style != "torch":
            # Lightning swaps every BatchNorm for torch's SyncBatchNorm: the lecture's would silently become torch's
            raise UsageError(
                f"--trainer.sync_batchnorm replaces --model.net.bn_style {config.model.net.bn_style} with torch's "
                "SyncBatchNorm; use bn_style torch with it"
            )
        net = config.model.net
        if config.data.batch_size == 1 and (net.batchnorm or net.output_batchnorm) and self.subcommand == "fit":
            raise UsageError(  # (torch: "Expected more than 1 value per channel when training", a traceback)
                "--data.batch_size 1 with BatchNorm: a batch of one example has no spread to normalise by; use a "
                "batch size of at least 2, or --model.net.batchnorm false --model.net.output_batchnorm false"
            )
        if config.get("lr_scheduler") and not config.get("optimizer"):
            # Lightning's CLI would drop it without a word: it only applies with an --optimizer
            raise UsageError(
                "--lr_scheduler needs --optimizer too (the module's own SGD has its own step decay): "
                "e.g. --optimizer SGD --optimizer.lr 0.1 --lr_scheduler ..."
            )
        if config.get("optimizer"):
            defaults = {k: v.default for k, v in inspect.signature(MakemoreModule).parameters.items()}
            changed = [k for k in ("lr", "milestones", "lr_decay", "update") if list_or(config.model[k]) != defaults[k]]
            if changed:
                raise UsageError(
                    f"--model.{changed[0]} configures the module's own SGD, which --optimizer replaces; "
                    "set --optimizer.lr (and --lr_scheduler) instead"
                )

    def after_instantiate_classes(self) -> None:
        # the notebook's single generator (--data.sampler notebook): minibatches continue where the init stopped
        self.datamodule.follow_init_generator(self.model.net.init_generator_state)
        if self.resume is not None and self.datamodule.vocab != self.resume.vocab:
            raise UsageError(
                f"{self.resume.checkpoint} was trained on a {len(self.resume.vocab)}-character vocabulary but "
                f"{self.datamodule.path} gives {len(self.datamodule.vocab)}; use the run's --data.path"
            )
        if self.complete is not None:  # before the run is locked or written to
            raise NothingToDo(self.complete)
        if self.resume is not None and self.resume.version is not None and self.subcommand == "fit":
            if _is_rank_zero():  # one writer per run: a second fit is refused
                lock_run(self.resume.checkpoint.parent.parent)
            remove_partial_writes(self.resume.checkpoint.parent)

    # ------------------------------------------------------------------------------------------------ trainer

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        given = trainer.get("logger")
        if given in (None, True):
            kwargs["logger"] = self._run_logger(trainer.get("default_root_dir"))
        elif given is not False:  # other loggers go beside the run's TensorBoard (run directory, checkpoints, resume)
            given = list(given) if isinstance(given, (list, tuple)) else [given]
            if not any(isinstance(logger, TensorBoardLogger) for logger in given):
                run_logger = self._run_logger(trainer.get("default_root_dir"))
                kwargs["logger"] = [run_logger, *given] if run_logger else given
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        callbacks = trainer.get("callbacks") or []
        callbacks = [ResumedRunLogs(), *(callbacks if isinstance(callbacks, list) else [callbacks])]  # first
        callbacks.append(StopOnNonFiniteLoss())
        if trainer.get("enable_progress_bar") is not False:
            callbacks.append(StepProgressBar())
        # train/lr (the scheduler's "name") every log_every_n_steps optimizer steps, beside train/loss
        kwargs["callbacks"] = [*callbacks, LearningRateMonitor(logging_interval="step"), self.stop_on_signal]
        return super().instantiate_trainer(**kwargs)

    def _run_logger(self, root_dir) -> RunLogger | bool:
        """TensorBoard in the run's directory: a freshly claimed one, or the resumed run's own (predict logs
        nothing: it would only leave an empty event file there)."""
        if self.subcommand == "predict":
            return False
        runs = runs_dir(root_dir)
        extra = {}
        if self.resume is not None and self.resume.version is not None:
            version = self.resume.version
            run_dir = runs / f"version_{version}"
            if not os.access(run_dir, os.W_OK):  # else TensorBoard's writer thread fails with a 50-line traceback
                fix = (
                    "copy the run somewhere writable and continue it there"
                    if self.subcommand == "fit"
                    else "or add --trainer.logger false to print the result only"
                )
                raise UsageError(
                    f"cannot write to run {run_dir} (read-only, or another user's): {self.subcommand} writes there; "
                    f"make it writable, {fix}"
                )
            if self.subcommand == "fit":  # TensorBoard drops what the killed run logged after this step
                extra["purge_step"] = self.resume.global_step
            _after_existing_event_files(run_dir)
        elif self.subcommand == "fit":
            version = claim_version(runs) if _is_rank_zero() else int(os.environ.get(VERSION_ENV, -1))
            if version < 0:  # a rank started by torchrun: it writes no logs, rank 0 broadcasts the checkpoint dir
                return False
            if _is_rank_zero():
                lock_run(runs / f"version_{version}")
                print(f"fit: new run {runs / f'version_{version}'} (see it: tensorboard --logdir {runs})", flush=True)
        else:
            return False  # evaluating a checkpoint from outside a run: results are printed only
        os.environ[VERSION_ENV] = str(version)
        return RunLogger(  # TensorBoard with the losses on top (mm_lightning/runlogger.py)
            save_dir=runs.parent, name=RUNS_DIRNAME, version=version, default_hp_metric=False, **extra
        )

    def after_fit(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, TrainingDiagnostics) and not callback.wait(timeout=60):
                print("[diagnostics] the last figures are still being drawn; they will appear shortly", file=sys.stderr)

    def after_predict(self) -> None:
        for batch in self.trainer.predict_loop.predictions or []:
            for name in batch:
                print(printable(name))


def printable(name: str) -> str:
    """A generated name as it may reach a terminal: a character that is not printable (ESC, BEL, a line break; only
    a crafted checkpoint's vocabulary holds one, the data reader refuses them) as its Python escape, e.g. \\x1b."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def _processes(trainer) -> int:
    """Training processes the trainer config asks for explicitly (devices 'auto' counts as 1: the DataModule
    checks the real world size again when it builds the training stream)."""
    devices = trainer.get("devices")
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    else:
        text = str(devices).strip().rstrip(",")
        count = int(text) if text.lstrip("-").isdigit() else len(text.split(",")) if "," in text else 1
        count = max(count, 2) if count < 0 else count  # -1: every device, several on a multi-device machine
    return count * int(trainer.get("num_nodes") or 1)


def _model_args(hparams: dict, model: dict) -> list[str]:
    """The checkpoint's model settings as command-line arguments (those the parser has; the vocabulary and block
    size come with the data), for evaluating a checkpoint with the model it holds."""
    import json

    def value(v) -> str:
        return v if isinstance(v, str) else json.dumps(list_or(v))

    args = []
    for key, v in (hparams.get("net") or {}).items():
        if key not in ("vocab", "block_size") and key in (model.get("net") or {}):
            args += [f"--model.net.{key}", value(v)]
    args += [a for key, v in hparams.items() if key != "net" and key in model for a in (f"--model.{key}", value(v))]
    return args


def _refuse_changed_model(hparams: dict, given: dict, path: Path, resuming: bool = True) -> None:
    """A resumed run keeps its model and optimizer: the checkpoint's state would silently win over new values.
    Evaluating, a checkpoint is its model: an override could only describe another one."""
    expected = {f"net.{k}": v for k, v in hparams["net"].items() if k != "vocab"}
    expected.update({k: v for k, v in hparams.items() if k != "net"})
    expected.setdefault("update", "torch")  # checkpoints from before model.update existed were trained with torch's SGD
    flat = {f"net.{k}": v for k, v in (given.get("net") or {}).items()}
    flat.update({k: v for k, v in given.items() if k != "net"})
    for key, want in expected.items():
        got = flat.get(key, want)
        same = math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) else list_or(got) == list_or(want)
        if not same and not resuming:
            raise UsageError(
                f"{path} holds a model with model.{key}={want!r} but this command gives {got!r}; a checkpoint is "
                "evaluated with the model it holds: drop the override"
            )
        if not same:
            raise UsageError(
                f"{path} was trained with model.{key}={want!r} but this command gives {got!r}; a resumed run keeps "
                "its model and optimizer settings: drop the override (or pass the run's --config), or start a new run "
                "without --ckpt_path"
            )


def list_or(value):
    return list(value) if isinstance(value, tuple) else value


# -------------------------------------------------------------------------------------------- other commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message}; see `python -m mm_lightning.cli {self.prog.split()[-1]} --help`")


SAMPLE_CHUNK = 10_000  # names generated at once by `sample`


def sample_command(args: list[str]) -> None:
    parser = _Parser(prog="mm_lightning.cli sample", description="Print names sampled from a checkpoint.")
    parser.add_argument("--ckpt_path", default="last", help="a .ckpt file, or 'last': the newest run's last.ckpt")
    parser.add_argument("--root_dir", default=".", help="where lightning_logs/ is (fit's --trainer.default_root_dir)")
    parser.add_argument("-n", "--num_samples", type=int, default=20, help="how many names")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; lower is safer)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument(
        "--one_at_a_time",
        action="store_true",
        help="one name after another, as the lecture's notebook samples (slower); with --seed 2147483657, its names",
    )
    a = parser.parse_args(args)
    if a.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {a.num_samples}")
    if not a.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {a.temperature}; 1.0 samples the model as trained")
    if not 0 <= a.seed < 2**64:  # torch.Generator.manual_seed's range
        raise UsageError(f"--seed must be a whole number from 0 to 2**64 - 1, got {a.seed}")
    runs = runs_dir(a.root_dir)
    if a.ckpt_path == "last" and not any(runs.glob("version_*/checkpoints/last.ckpt")):
        raise UsageError(
            f"no trained run to sample from under {runs}: train one first (python -m mm_lightning.cli fit), "
            "or pass --ckpt_path FILE (--root_dir DIR if the runs are elsewhere)"
        )
    path = find_last(runs) if a.ckpt_path == "last" else Path(a.ckpt_path)
    checkpoint = load_checkpoint(path)
    net = checkpoint_net(checkpoint)  # (load_checkpoint refuses weights that do not fit their model)
    # on stderr: stdout holds only the names, for a pipe
    print(f"sample: {path} (step {int(checkpoint.get('global_step', 0))})", file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(a.seed)
    rows = 1 if a.one_at_a_time else min(SAMPLE_CHUNK, a.num_samples)  # names computed at once: fit's thread rule
    with one_thread_if_small(net, rows):
        for start in range(0, a.num_samples, SAMPLE_CHUNK):  # in chunks: memory stays flat however many are asked
            count = min(SAMPLE_CHUNK, a.num_samples - start)
            for name in generate(net, count, a.temperature, generator, one_at_a_time=a.one_at_a_time):
                print(printable(name))


def download_command(args: list[str]) -> None:
    parser = _Parser(prog="mm_lightning.cli download", description="Fetch makemore's names.txt (sha256-checked).")
    parser.add_argument("--path", default=DEFAULT_PATH, help="where to write it")
    path = Path(parser.parse_args(args).path)
    if path.exists():
        print(f"{path} already exists; delete it to download again")
        return
    download_names(path)
    print(f"wrote {path} (sha256 {NAMES_SHA256[:12]}...)")


DIAGNOSE_USAGE = """usage: python -m mm_lightning.cli diagnose [--config FILE] [--steps K] [--save_figures DIR] [...]

Build the data and the model exactly as `fit` would (same --config, --model.*, --data.*, --diagnostics.*), train
K steps (default 0: at init), then print the lecture's per-layer tables for step K and the health verdicts.
Training samples every --diagnostics.every_n_steps N steps as fit does (figure 4: the update ratios at 0, N, ...,
K); K is then a multiple of N. Exit status 1 when a verdict fails. --save_figures DIR writes the four lecture
figures there as PNG files."""


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` or `name=VALUE` from args and return VALUE."""
    for i, a in enumerate(args):
        if a == name:
            if i + 1 >= len(args):
                raise UsageError(f"{name} needs a value")
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def diagnose_command(args: list[str]) -> int:
    from mm_lightning.diagnostics import figures
    from mm_lightning.lecture import run_diagnosis

    if "-h" in args or "--help" in args:
        print(DIAGNOSE_USAGE)
        return 0
    args = list(args)
    steps_text, figures_dir = _pop_option(args, "--steps"), _pop_option(args, "--save_figures")
    if figures_dir and Path(figures_dir).exists() and not Path(figures_dir).is_dir():
        raise UsageError(f"--save_figures {figures_dir} is a file; give a directory (it is created if missing)")
    try:
        steps = int(steps_text or 0)
    except ValueError:
        raise UsageError(f"--steps must be a whole number of training steps, got {steps_text!r}") from None
    diagnosis = run_diagnosis(args, steps)
    print(diagnosis)
    if figures_dir:
        out = Path(figures_dir)
        out.mkdir(parents=True, exist_ok=True)
        for tag, (data, _, _) in figures.render_pngs(diagnosis.snapshot, diagnosis.update_history).items():
            (out / f"{tag.split('/')[-1]}.png").write_bytes(data)
        print(f"figures written to {out}/")
    return 1 if diagnosis.failing else 0


def fold_batchnorm_command(args: list[str]) -> None:
    from mm_lightning.fold import fold_command

    fold_command(args, _Parser)


COMMANDS = {
    "sample": sample_command,
    "download": download_command,
    "diagnose": diagnose_command,
    "fold-batchnorm": fold_batchnorm_command,
}
USAGE = """usage: python -m mm_lightning.cli COMMAND [options]   (or: mm-lightning COMMAND [options])

  fit        train; --config configs/X.yaml, overrides like --trainer.max_steps 400 --model.lr 0.05;
             --ckpt_path last continues the most recent run in its own directory
  validate   val/loss of a checkpoint        (--ckpt_path last | FILE)
  test       test/loss of a checkpoint       (--ckpt_path last | FILE)
  predict    names generated through Lightning (--ckpt_path ..., --data.num_samples N)
  sample     names from a checkpoint, quickly (--num_samples 20 --temperature 1.0 --seed 42)
  diagnose   per-layer activation/gradient tables and health verdicts at init (or after --steps K)
  download   fetch makemore's names.txt into data/ (sha256-checked)
  fold-batchnorm  a checkpoint with every BatchNorm folded into its Linear (--ckpt_path last --out F.ckpt)

Every command takes --help; --debug shows the traceback of an error."""


COMMON_OPTIONS = """the options most runs need (every option follows, grouped by class, after this):
  --config FILE                   a YAML of options, e.g. configs/lecture/batchnorm.yaml (several: later wins)
  --ckpt_path last|FILE           fit: continue the newest run in its own directory; validate/test/predict:
                                  the checkpoint to read (its own model settings)
  --trainer.max_steps N           optimizer steps (default 200000, the lecture's run)
  --trainer.default_root_dir DIR  where lightning_logs/ goes (default .)
  --trainer.accelerator cpu|gpu   --trainer.devices N    --trainer.precision 32-true|bf16-mixed
  --model.lr LR                   SGD's learning rate (default 0.1; --model.milestones [150000] divides it by 10)
  --model.net.n_hidden N          units per hidden layer (default 100)   --model.net.n_layers N  (default 5)
  --model.net.batchnorm BOOL      BatchNorm after each hidden Linear     --model.net.gain G  (default 5/3)
  --data.path FILE                names, one per line (default data/names.txt)
  --data.batch_size N             minibatch size (default 32)
  --diagnostics.every_n_steps N   sample the lecture's diagnostics every N steps (0: off; default 100)
  --print_config                  print the full configuration as YAML and exit
"""
PRINTING_COMMANDS = ("sample", "predict", "validate", "test", "diagnose")  # their results go to standard output


def _quiet_noise() -> None:
    """Silence messages that say nothing about this run."""
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")  # we pass argv on purpose
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a deprecation inside Lightning itself
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # a resumed run's own checkpoints
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 42"


def _one_line(error: Exception, argv: list[str]) -> str:
    """jsonargparse's multi-line parse errors, as one line that names the key and points at --help."""
    text = " ".join(str(error).split())
    text = re.sub(r'Parser key "([^"]+)": ', r"--\1: ", text)
    text = text.replace("Expected a typing.Literal", "expected one of ").replace("Expected a ", "expected ")
    text = re.sub(r"<class '(\w+)'>", r"\1", text).replace(". Got value:", ", got")
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    return f"{text} (see `python -m mm_lightning.cli {command} --help`)".replace("  ", " ")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _interrupted_line(e: signals.Interrupted, argv: list[str], stopper: StopOnSignal) -> str:
    """What a signal that stopped the command where it was leaves behind, in one line."""
    if argv[0] != "fit":
        return f"interrupted by {e.name}: {argv[0]} stopped before it finished"
    if not stopper.started:
        resumed = any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv)
        kept = "the checkpoint resumed from is as it was: run the same command again" if resumed else "run it again"
        return f"interrupted by {e.name} before the first step: no checkpoint written; {kept}"
    step = stopper.trainer_step()
    if stopper.ended:
        return f"interrupted by {e.name} after training ended at step {step}: its checkpoints are written"
    return (
        f"stopped at once by a second {e.name} at step {step}: no checkpoint at this step; the last one written "
        "stays (continue with `fit --ckpt_path last`)"
    )


def main(argv: list[str] | None = None) -> int:
    _quiet_noise()
    tbwrite.speed_up()  # every TensorBoard event this process writes: a C checksum instead of a Python one
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("MM_LIGHTNING_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    # `--help` shows each MLPConfig field's docstring (the dataclass documents its fields under each one, as litgpt's).
    # Only then: finding those docstrings parses the source of every class the parser reads (Trainer's included),
    # ~80% of building the parser, which every command pays at start.
    set_parsing_settings(docstring_parse_attribute_docstrings=any(a in ("-h", "--help") for a in argv))
    failed_threads: list[BaseException] = []  # a background writer's failure (TensorBoard's), said in one line
    previous_hook, threading.excepthook = threading.excepthook, lambda args: failed_threads.append(args.exc_value)
    try:
        status = _main(argv, debug, failed_threads)
    finally:
        threading.excepthook = previous_hook
    return status


def _main(argv: list[str], debug: bool, failed_threads: list[BaseException]) -> int:
    with signals.handled():  # from here to the end a signal gives 128 + signal and one line, never 0
        status = None
        try:
            try:
                status = _command(argv, debug)
            finally:
                signals.hold()  # the cleanup below must finish: a signal now is noted, and answered after it
                if status != 0:
                    discard_empty_claims()  # a command that failed before logging anything leaves no empty version_N
                unlock_runs()
        except signals.Interrupted as e:  # (between _command's own handling and the hold above)
            print(f"error: interrupted by {e.name} while finishing {argv[0]}", file=sys.stderr)
            return e.status
        if failed_threads and status == 0:  # (with another failure, its line already says what went wrong)
            error = failed_threads[0]
            if debug:
                raise error
            line = preflight.resource_error(error, argv[0]) or f"a background thread failed: {_first_line(error)}"
            print(f"error: {line}", file=sys.stderr)
            status = 2
        late = signals.held()
        if late is not None and status == 0:
            print(
                f"error: interrupted by {signals.NAMES[late]} as {argv[0]} finished (it had completed)", file=sys.stderr
            )
            return 128 + late
        return status


def _command(argv: list[str], debug: bool) -> int:
    """Run the command; bad input, and resource errors, as one line and exit status 2."""
    stopper = StopOnSignal()
    try:
        if sys.stdout is None and argv[0] in PRINTING_COMMANDS:  # `sample >&-`: print() would write nowhere, exit 0
            raise UsageError(f"standard output is closed: {argv[0]} prints its results there; give it a file or pipe")
        preflight.check_config_files(argv)
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:]) or 0
        if argv[0] in ("fit", "validate", "test", "predict") and {"-h", "--help"} & set(argv[1:]):
            print(f"usage: python -m mm_lightning.cli {argv[0]} [options]\n\n{COMMON_OPTIONS}", flush=True)
        interrupted = MakemoreCLI(argv, stop_on_signal=stopper).stop_on_signal
        if interrupted.message() is not None:
            print(f"error: {interrupted.message()}", file=sys.stderr)
            return 128 + interrupted.received
        return 0
    except signals.Interrupted as e:
        signals.hold()
        if debug:
            raise
        print(f"error: {_interrupted_line(e, argv, stopper)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:  # (signal handlers are only ours in the main thread)
        signals.hold()
        if debug:
            raise
        print(f"error: {_interrupted_line(signals.Interrupted(signal.SIGINT), argv, stopper)}", file=sys.stderr)
        return 128 + signal.SIGINT
    except SIGTERMException:  # several processes: Lightning stopped every rank at a batch end (exit 0 otherwise)
        signals.hold()
        print(
            "error: interrupted by SIGTERM: every process stopped at a batch end; continue from the last checkpoint "
            "written with `fit --ckpt_path last`",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except NothingToDo as e:  # 0: the run is where it was asked to be (a loop or reproduce continuing it is done)
        if _is_rank_zero():
            print(e, flush=True)
        return 0
    except (UsageError, MisconfigurationException) as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except DiagnosticsConfigError as e:  # it names its Python argument: the CLI's is --diagnostics.<argument>
        if debug:
            raise
        print(f"error: --diagnostics.{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ArgumentError as e:
        if debug:
            raise
        print(f"error: {_one_line(e, argv)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        if debug:
            raise
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `sample ... | head`: the reader has gone; stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE
    except Exception as e:  # memory, disk, permissions: one line naming what to change; anything else: a bug
        message = None if debug else preflight.resource_error(e, argv[0])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
