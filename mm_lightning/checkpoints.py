"""Checkpoint files: read safely (torch.load with weights_only=True, every failure as one line), checked against
the model their hyperparameters describe, and turned back into that network.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mm_lightning.errors import UsageError


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
    check_checkpoint(checkpoint, path)
    return checkpoint


def net_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The network's weights in a checkpoint fit wrote: its state_dict's `net.` entries, without the prefix."""
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def net_config_class(net: dict) -> tuple[type, dict]:
    """(the config class, its arguments) of a checkpoint's net hyperparameters: the core MLPConfig, or the lecture
    kit's NotebookMLPConfig when they hold its own fields (bn_style, init_seed, ...) at other values than their
    defaults. Told apart by their fields: a checkpoint names no class, so it cannot choose code to run. Checkpoints
    written before those fields left the core hold them at their defaults: they load as MLPConfig."""
    import dataclasses

    from mm_lightning.lecture.nets import NotebookMLPConfig
    from mm_lightning.model import MLPConfig

    core = {f.name for f in dataclasses.fields(MLPConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(NotebookMLPConfig) if f.name not in core}
    extra = {k: v for k, v in net.items() if k not in core}
    if all(k in defaults and v == defaults[k] for k, v in extra.items()):
        return MLPConfig, {k: v for k, v in net.items() if k in core}
    return NotebookMLPConfig, dict(net)


def current_hparams(hparams: dict) -> dict:
    """A checkpoint's model hyperparameters in this version's layout. Checkpoints written while the notebook's update
    was the module's own option hold model.update: 'torch' (the module's SGD) or 'lecture' (the lecture kit's
    NotebookSGD, now the config's optimizer:). It is dropped; with 'lecture', lr, milestones and lr_decay go too:
    they configured that optimizer, not the module's own SGD (see resume.trained_optimizer)."""
    update = hparams.get("update")
    drop = {"update"} | ({"lr", "milestones", "lr_decay"} if update == "lecture" else set())
    return {k: v for k, v in hparams.items() if k not in drop}


def checkpoint_net(checkpoint: dict):
    """The network of a checkpoint load_checkpoint accepted (its weights fit its hyperparameters), with them."""
    cls, args = net_config_class(checkpoint["hyper_parameters"]["net"])
    net = cls(**args).build()
    net.load_state_dict(net_state(checkpoint))
    return net


def check_checkpoint(checkpoint: dict, path) -> None:
    """A checkpoint fit wrote: known hyperparameters, a whole global_step, weights of the shapes they build."""
    from mm_lightning.module import MakemoreModule

    hparams = current_hparams(checkpoint["hyper_parameters"])
    module_args = set(inspect.signature(MakemoreModule).parameters)
    config_class, net_args = net_config_class(hparams["net"])
    net_fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = [k for k in hparams if k not in module_args] + [f"net.{k}" for k in net_args if k not in net_fields]
    if unknown:
        raise UsageError(
            f"{path}: hyperparameter {unknown[0]} is not one this project's model takes (written by another "
            "version, or edited); use a checkpoint written by this version's fit"
        )
    step = checkpoint.get("global_step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"{path}: global_step is {step!r}, not a step count: the checkpoint is damaged")
    try:
        with torch.device("meta"):  # shapes only: a claimed size that would not fit allocates nothing here
            expected = {k: tuple(v.shape) for k, v in config_class(**net_args).build().state_dict().items()}
    except (TypeError, ValueError, UsageError) as e:
        raise UsageError(f"{path}: its model hyperparameters are not valid ({' '.join(str(e).split())})") from None
    stored = {k: tuple(v.shape) for k, v in net_state(checkpoint).items()}
    if stored != expected:
        wrong = sorted(set(stored) ^ set(expected)) or [k for k in expected if stored[k] != expected[k]]
        raise UsageError(
            f"{path}: its weights do not match its own hyperparameters (first: net.{wrong[0]}); the checkpoint is "
            "damaged or was edited"
        )


