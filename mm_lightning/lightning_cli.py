"""MakemoreCLI, the LightningCLI of every training and evaluation command: the model and DataModule, the trainer it
assembles (the run's TensorBoard logger, safe checkpoint IO, the callbacks every run has), and resuming a run in its
own directory (`--ckpt_path last`, the policy in resume.py). cli.py is the command line around it.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.nn import BatchNorm1d

from mm_lightning import compat, preflight
from mm_lightning.checkpoints import current_hparams
from mm_lightning.data import NamesDataModule
from mm_lightning.diagnostics import TrainingDiagnostics
from mm_lightning.errors import NothingToDo, UsageError
from mm_lightning.model import MLPConfig
from mm_lightning.module import LR_TAG, MakemoreModule
from mm_lightning.nonfinite import StopOnNonFiniteLoss
from mm_lightning.progress import StepProgressBar
from mm_lightning.resume import (
    RecordOptimizer,
    Resume,
    _model_args,
    _refuse_changed_model,
    _refuse_changed_optimizer,
    current_layout,
    list_or,
)
from mm_lightning.runlogger import RunLogger
from mm_lightning.runs import (
    RUNS_DIRNAME,
    ResumedRunLogs,
    RunCheckpoint,
    SafeCheckpointIO,
    StopOnSignal,
    claim_version,
    find_last,
    load_checkpoint,
    lock_run,
    remove_partial_writes,
    runs_dir,
    version_of,
)
from mm_lightning.speedswitch import fast_path_class

set_parsing_settings(subclasses_enabled=[MLPConfig])  # --model.net takes a subclass's class path (the lecture kit's)

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


def _after_existing_event_files(run_dir: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after the run's existing ones. TensorBoard reads a run's
    event files in name order: events.out.tfevents.<second>.<host>.<pid>.<counter>. Within one second and one process
    (a resume right after a short fit, in a notebook or a test) the counter decides, and 10 sorts before 9: the
    resumed file would be read first, and its purge step would hide everything the earlier file holds."""
    seconds = [p.name.split(".")[3] for p in run_dir.glob("events.out.tfevents.*")]
    newest = max((int(s) for s in seconds if s.isdigit()), default=0)
    while int(time.time()) <= newest:
        time.sleep(0.05)


def closest_option(parser, args: list[str], message: str) -> str | None:
    """The option of the command's parser nearest an unknown one an error names (--model.lrr, a YAML key
    trainer.max_step), as --key (class-path arguments as users write them: --model.net.n_hidden); None if none."""
    import difflib

    found = re.search(r"unrecognized arguments: --([\w.]+)|does not accept option '([\w.]+)'", message)
    command = next((a for a in args if not a.startswith("-")), None)
    subcommands = getattr(parser, "_subcommands_action", None)
    if not found or subcommands is None or command not in subcommands._name_parser_map:
        return None
    defaults = subcommands._name_parser_map[command].get_defaults()
    keys = [k.replace(".init_args.", ".") for k in defaults.keys() if not k.endswith(".class_path")]
    close = difflib.get_close_matches(found[1] or found[2], keys, n=1, cutoff=0.75)
    return f"--{close[0]}" if close else None


class MakemoreCLI(LightningCLI):
    def __init__(self, args: list[str], run: bool = True, stop_on_signal: StopOnSignal | None = None):
        self._argv = list(args)
        self.resume: Resume | None = None
        self.complete: str | None = None  # fit resuming a run already at its max_steps: the line that says so
        self.stop_on_signal = stop_on_signal or StopOnSignal()
        super().__init__(
            MakemoreModule,
            NamesDataModule,
            subclass_mode_data=True,  # --data takes a subclass's class path (the lecture kit's notebook stream)
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own config.yaml
            load_from_checkpoint_support=False,  # no class paths in checkpoints: they could choose code to run
            parser_kwargs={"exit_on_error": False},  # main() reports a parse error in one line
            args=self._argv,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        # the network and the DataModule are chosen by class path (the lecture kit's: configs/lecture/notebook_*.yaml)
        parser.link_arguments("data.init_args.block_size", "model.net.init_args.block_size")
        parser.link_arguments("data.vocab", "model.net.init_args.vocab", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": f"{NamesDataModule.__module__}.{NamesDataModule.__name__}"}})
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
            name, lr = type(optimizer).__name__, optimizer.param_groups[0]["lr"]
            rank_zero_info(  # (the module's step decay goes with its SGD: said, not dropped silently)
                f"--optimizer {name} without --lr_scheduler: the learning rate stays {lr:g} (the module's step decay "
                f"is replaced too; add --lr_scheduler to schedule it); TensorBoard logs it as lr-{name}"
            )
            return optimizer
        scheduler = {"scheduler": lr_scheduler, "interval": "step", "name": LR_TAG}
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.update(interval="epoch", monitor=lr_scheduler.monitor)  # it needs a metric: val/loss, per epoch
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------------------------------------- resume

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:  # an option no parser knows: the closest one it does, for the one-line error
            e.closest = closest_option(parser, args, str(e))
            raise
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
        hparams = current_hparams(checkpoint["hyper_parameters"])  # (written by an earlier version: as it would be now)
        base = []
        if own_run and run_config.is_file() and not any(a.split("=")[0] == "--config" for a in args):
            preflight.check_config_files(["--config", str(run_config)])  # a damaged one is named, in one line
            run_config = current_layout(run_config)  # a run written before the lecture kit left the core
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
            _refuse_changed_optimizer(checkpoint, config, path)
            preflight.check_resumable(checkpoint, path)
            preflight.check_resumed_data(checkpoint, config.data.init_args.as_dict(), path, run_config)
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
        net, batch_size = config.model.net.init_args, config.data.init_args.batch_size
        if batch_size == 1 and (net.batchnorm or net.output_batchnorm) and self.subcommand == "fit":
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
            changed = [k for k in ("lr", "milestones", "lr_decay") if list_or(config.model[k]) != defaults[k]]
            if changed:
                raise UsageError(
                    f"--model.{changed[0]} configures the module's own SGD, which --optimizer replaces; "
                    "set --optimizer.lr (and --lr_scheduler) instead"
                )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # jsonargparse wraps what a class-path DataModule raises: say the DataModule's line
            cause = compat.usage_error_within(e, UsageError)
            if cause is None:
                raise
            raise cause from None

    def after_instantiate_classes(self) -> None:
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
        # before the trainer exists (it prints, and starts DDP's other processes): what the model and data cannot do
        trainer = self._get(self.config_init, "trainer", default={})
        connect = getattr(self.datamodule, "connect", None)
        if callable(connect):  # a DataModule that follows the model (the lecture kit's notebook stream) is told of it
            connect(self.model, _processes(trainer))
        custom = [m for m in self.model.net.modules() if isinstance(m, BatchNorm1d) and type(m) is not BatchNorm1d]
        if custom and trainer.get("sync_batchnorm"):
            # Lightning swaps every BatchNorm for torch's SyncBatchNorm: the network's own would silently become torch's
            raise UsageError(
                f"--trainer.sync_batchnorm replaces the network's {type(custom[0]).__name__} with torch's "
                "SyncBatchNorm; use bn_style torch with it (torch's BatchNorm1d)"
            )
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
        callbacks += [StopOnNonFiniteLoss(), RecordOptimizer()]
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


def _quiet_noise() -> None:
    """Silence messages that say nothing about this run."""
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")  # we pass argv on purpose
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a deprecation inside Lightning itself
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # a resumed run's own checkpoints
    # --optimizer replacing the module's own SGD is what it is for (configs/lecture/notebook_*.yaml select theirs)
    warnings.filterwarnings("ignore", message=".*configure_optimizers` will be overridden.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 42"


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
