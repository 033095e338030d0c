"""The lecture's exercise E02: fold each BatchNorm into the Linear before it, for inference.

In eval mode a BatchNorm1d is an affine map per unit, y = (x - mean) / sqrt(var + eps) * gamma + beta, with the
running mean and variance. After a Linear x = W h + b it folds into that Linear:

    W' = W * s[:, None],  b' = (b - mean) * s + beta,  with s = gamma / sqrt(var + eps)

(b = 0 where the Linear has no bias, as before a BatchNorm). The folded network has no BatchNorm layers, gives the
same eval-mode outputs up to float rounding, and skips one pass over every activation.

    python -m mm_lightning.cli fold-batchnorm --ckpt_path last --out folded.ckpt
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from mm_lightning.errors import UsageError
from mm_lightning.lecture.nets import NotebookMLPConfig
from mm_lightning.model import MLP


@torch.no_grad()
def fold_batchnorm(net: MLP) -> MLP:
    """A copy of net without BatchNorm layers, each folded into the Linear before it (see the module docstring)."""
    no_bn = {"batchnorm": False, "output_batchnorm": False}
    if isinstance(net.config, NotebookMLPConfig):
        no_bn["bn_style"] = "torch"  # (the lecture's BatchNorm is folded like torch's: see its running_var)
    folded = dataclasses.replace(net.config, **no_bn).build()
    folded.embedding.weight.copy_(net.embedding.weight)
    source = list(net.layers)
    targets = iter(m for m in folded.layers if isinstance(m, nn.Linear))
    for i, module in enumerate(source):
        if not isinstance(module, nn.Linear):
            continue
        target = next(targets)
        weight = module.weight.double()
        bias = module.bias.double() if module.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        bn = source[i + 1] if i + 1 < len(source) and isinstance(source[i + 1], nn.BatchNorm1d) else None
        if bn is not None:
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            weight = weight * scale[:, None]
            bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
        target.weight.copy_(weight)
        target.bias.copy_(bias)
    return folded.eval()


def fold_checkpoint(checkpoint: dict) -> dict:
    """A checkpoint of the folded network, for evaluating and sampling (not for training on: no optimizer state)."""
    from mm_lightning.runs import checkpoint_net

    hparams = checkpoint["hyper_parameters"]
    folded = fold_batchnorm(checkpoint_net(checkpoint).eval())
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("net.")}
    state.update({f"net.{k}": v for k, v in folded.state_dict().items()})
    keep = ("epoch", "global_step", "pytorch-lightning_version", "datamodule_hyper_parameters")
    out = {k: checkpoint[k] for k in keep if k in checkpoint}
    out["state_dict"] = state
    out["hyper_parameters"] = {**hparams, "net": dataclasses.asdict(folded.config)}  # the folded model's own
    return out


def fold_command(args: list[str], parser_class=argparse.ArgumentParser) -> None:
    from mm_lightning.runs import SafeCheckpointIO, find_last, load_checkpoint, runs_dir

    parser = parser_class(prog="mm_lightning.cli fold-batchnorm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", default="last", help="a .ckpt file, or 'last': the newest run's last.ckpt")
    parser.add_argument("--root_dir", default=".", help="where lightning_logs/ is (fit's --trainer.default_root_dir)")
    parser.add_argument(
        "--out", required=True, help="the folded checkpoint to write (a new file; its directory is created if missing)"
    )
    a = parser.parse_args(args)
    out = Path(a.out)
    if out.exists():
        raise UsageError(f"--out {out} already exists; give a new file name")
    path = (
        find_last(runs_dir(a.root_dir), "fold-batchnorm", "--root_dir") if a.ckpt_path == "last" else Path(a.ckpt_path)
    )
    checkpoint = load_checkpoint(path)
    net = checkpoint["hyper_parameters"]["net"]
    if not net.get("batchnorm", True) and not net.get("output_batchnorm", True):
        raise UsageError(f"{path} has no BatchNorm layer to fold")
    SafeCheckpointIO().save_checkpoint(fold_checkpoint(checkpoint), out)
    print(f"wrote {out}: {path} with every BatchNorm folded into the Linear before it")
    print(f"evaluate it: python -m mm_lightning.cli sample --ckpt_path {out}")
