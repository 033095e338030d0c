"""Resuming and evaluating a checkpoint: what it was trained with, as command-line arguments, and refusing a
command that would silently change it (its model, its optimizer's class). Also the run config of a run written
before the lecture kit's options left the core (current_layout).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from mm_lightning.checkpoints import net_config_class
from mm_lightning.errors import UsageError


@dataclass
class Resume:
    checkpoint: Path
    version: int | None  # the run directory version_N the checkpoint belongs to, if it is in one
    global_step: int
    vocab: str


def _net_given(model: dict) -> dict:
    """A parsed config's model.net as plain arguments (class_path/init_args, or given directly)."""
    net = model.get("net") or {}
    return dict(net.get("init_args") or {}) if "class_path" in net else dict(net)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _model_args(hparams: dict, model: dict) -> list[str]:
    """The checkpoint's model settings as command-line arguments (those its network's config takes; the vocabulary
    and block size come with the data), for evaluating a checkpoint with the model it holds."""

    def value(v) -> str:
        return v if isinstance(v, str) else json.dumps(list_or(v))

    cls, net = net_config_class(hparams.get("net") or {})
    args = [] if (model.get("net") or {}).get("class_path") == _class_path(cls) else ["--model.net", _class_path(cls)]
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, v in net.items():
        if key not in ("vocab", "block_size") and key in fields:
            args += [f"--model.net.{key}", value(v)]
    args += [a for key, v in hparams.items() if key != "net" and key in model for a in (f"--model.{key}", value(v))]
    return args


def _refuse_changed_model(hparams: dict, given: dict, path: Path, resuming: bool = True) -> None:
    """A resumed run keeps its model and optimizer: the checkpoint's state would silently win over new values.
    Evaluating, a checkpoint is its model: an override could only describe another one."""
    _, net = net_config_class(hparams["net"])
    expected = {f"net.{k}": v for k, v in net.items() if k != "vocab"}
    expected.update({k: v for k, v in hparams.items() if k != "net"})
    given_net = _net_given(given)
    flat = {f"net.{k}": v for k, v in given_net.items()}
    flat.update({k: v for k, v in given.items() if k != "net"})
    for key, want in expected.items():
        # a field the given network's config does not have (another class): it cannot be what was trained
        got = None if given_net and key.startswith("net.") and key not in flat else flat.get(key, want)
        same = math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) else list_or(got) == list_or(want)
        if isinstance(want, float) and got is None:
            same = False
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


OPTIMIZER_RECORD = "optimizer_class"  # a checkpoint's record of its optimizer's class path (RecordOptimizer)


class RecordOptimizer(Callback):
    """Writes the optimizer's class path into every checkpoint (a plain string), so that a resumed run can refuse
    another optimizer: Lightning would load the state into whatever the command builds, without a word."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if len(trainer.optimizers) == 1:
            checkpoint[OPTIMIZER_RECORD] = _class_path(type(trainer.optimizers[0]))


def trained_optimizer(checkpoint: dict) -> str | None:
    """The class path of the optimizer a checkpoint was trained with, where it says: RecordOptimizer's record, or,
    written before the notebook's update left the core, model.update 'lecture' (NotebookSGD). None: not known (an
    older checkpoint's 'torch' allowed --optimizer beside it)."""
    recorded = checkpoint.get(OPTIMIZER_RECORD)
    if isinstance(recorded, str):
        return recorded
    if (checkpoint.get("hyper_parameters") or {}).get("update") == "lecture":
        from mm_lightning.lecture.optim import NotebookSGD

        return _class_path(NotebookSGD)
    return None


def given_optimizer(config) -> str:
    """The class path of the optimizer a parsed command trains with: --optimizer's, or the module's own SGD."""
    optimizer = config.get("optimizer")
    if not optimizer:
        return _class_path(torch.optim.SGD)
    module, _, name = optimizer["class_path"].rpartition(".")  # the parser has resolved it: it imports
    return _class_path(getattr(importlib.import_module(module), name))


def _refuse_changed_optimizer(checkpoint: dict, config, path: Path) -> None:
    """A resumed run keeps its optimizer: another class would take over the saved state (the notebook-exact configs'
    NotebookSGD silently becoming torch's SGD, say)."""
    from mm_lightning.lecture.optim import NotebookSGD

    want, got = trained_optimizer(checkpoint), given_optimizer(config)
    if want is None and got == _class_path(NotebookSGD):  # an earlier version's, without model.update lecture
        want = "torch's SGD or --optimizer's (it records no optimizer, and no model.update lecture)"
    if want is not None and want != got:
        example = " (configs/lecture/notebook_*.yaml give NotebookSGD)" if want.endswith(".NotebookSGD") else ""
        raise UsageError(
            f"{path} was trained with the optimizer {want} but this command gives {got}; a resumed run keeps its "
            f"optimizer: give the run's --config, or its optimizer: and lr_scheduler:{example}"
        )


def current_layout(run_config: Path) -> Path:
    """A run's config.yaml in this version's layout. Runs written before the notebook-exact options left the core
    hold them as model.net.bn_style, linear_style, init_seed, init_draws and data.sampler: at their defaults they are
    dropped; otherwise they select the lecture kit's classes (NotebookMLPConfig, NotebookNamesDataModule). Their
    model.update is dropped too; 'lecture' becomes the lecture kit's optimizer (NotebookSGD, with model.lr) and
    MultiStepLR (model.milestones, model.lr_decay), as configs/lecture/notebook_*.yaml select them. The translation
    goes to a temporary file (the run's own file is only read); a current config is returned as it is."""
    config = yaml.safe_load(run_config.read_text(encoding="utf-8"))
    changed = False
    for section in (config.get(k) for k in ("fit", "validate", "test", "predict")):
        if isinstance(section, dict):
            changed |= _current_layout(section)
    changed |= _current_layout(config)
    if not changed:
        return run_config
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="config-", delete=False, encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(f.name)


def _current_layout(config: dict) -> bool:
    changed = False
    model, data = config.get("model"), config.get("data")
    if isinstance(model, dict) and "update" in model:  # the notebook's update was model.update: lecture
        if model.pop("update") == "lecture":
            optimizer = {"lr": model.pop("lr")}
            config["optimizer"] = {"class_path": "mm_lightning.lecture.NotebookSGD", "init_args": optimizer}
            schedule = {"milestones": model.pop("milestones"), "gamma": model.pop("lr_decay")}
            config["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.MultiStepLR", "init_args": schedule}
        changed = True
    net = model.get("net") if isinstance(model, dict) else None
    if isinstance(net, dict) and "class_path" not in net:
        cls, args = net_config_class(net)
        if set(args) != set(net) or cls.__name__ != "MLPConfig":
            model["net"] = args if cls.__name__ == "MLPConfig" else {"class_path": _class_path(cls), "init_args": args}
            changed = True
    if isinstance(data, dict) and "class_path" not in data and "sampler" in data:
        from mm_lightning.lecture.data import NotebookNamesDataModule

        sampler = data.pop("sampler")
        if sampler == "notebook":
            config["data"] = {"class_path": _class_path(NotebookNamesDataModule), "init_args": data}
        changed = True
    return changed


def list_or(value):
    return list(value) if isinstance(value, tuple) else value
