"""Exercise E02: BatchNorm folded into the Linear before it gives the same network in eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.cli import main
from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLP, MLPConfig, generate
from mm_lightning.runs import load_checkpoint
from tests.conftest import SMALL


def _net(checkpoint: dict) -> MLP:
    net = MLP(MLPConfig(**checkpoint["hyper_parameters"]["net"]))
    net.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    return net.eval()


@pytest.mark.slow
def test_folded_checkpoint_is_the_same_network_without_batchnorm(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "300", *SMALL, "--data.steps_per_epoch", "300"]
    assert main([*args, "--trainer.enable_progress_bar", "false", "--diagnostics.every_n_steps", "0"]) == 0
    assert main(["fold-batchnorm", "--ckpt_path", "last", "--out", "folded.ckpt"]) == 0
    original = load_checkpoint(next(project.rglob("last.ckpt")))
    folded = load_checkpoint(project / "folded.ckpt")  # a checkpoint the project's own loader accepts
    a, b = _net(original), _net(folded)
    assert any(isinstance(m, nn.BatchNorm1d) for m in a.modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in b.modules())
    data = NamesDataModule(path="data/names.txt")
    data.setup()
    x, y = data.splits["val"].tensors()  # the whole val split
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    assert (out_a - out_b).abs().max().item() < 1e-5
    loss_a, loss_b = F.cross_entropy(out_a, y).item(), F.cross_entropy(out_b, y).item()
    assert abs(loss_a - loss_b) < 1e-6
    names = [generate(net, 20, generator=torch.Generator().manual_seed(42)) for net in (a, b)]
    assert names[0] == names[1]
    capsys.readouterr()
    assert main(["sample", "--ckpt_path", "folded.ckpt", "--num_samples", "20"]) == 0
    from_folded = capsys.readouterr().out.split()
    assert main(["sample", "--num_samples", "20"]) == 0
    assert from_folded == capsys.readouterr().out.split()  # the same names from the command line


def test_fold_refuses_an_existing_output_and_a_model_without_batchnorm(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "20", *SMALL, "--data.steps_per_epoch", "20", "--trainer.enable_progress_bar"]
    assert main([*args, "false", "--model.net.batchnorm", "false", "--model.net.output_batchnorm", "false"]) == 0
    (project / "taken.ckpt").write_text("mine")
    assert main(["fold-batchnorm", "--out", "taken.ckpt"]) == 2
    assert "--out taken.ckpt already exists" in capsys.readouterr().err
    assert main(["fold-batchnorm", "--out", "new.ckpt"]) == 2
    assert "has no BatchNorm layer to fold" in capsys.readouterr().err and not (project / "new.ckpt").exists()
