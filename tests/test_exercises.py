"""The lecture's exercise E01: every weight and bias zero. It trains, but only partially, and the diagnostics show
why: every tanh outputs 0, so no gradient reaches any weight; only the output bias learns (the letters' frequencies).
(E02, folding BatchNorm, is tests/test_fold.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mm_lightning.cli import main
from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLP, MLPConfig
from tests.conftest import ROOT

E01 = str(ROOT / "configs" / "exercises" / "e01_zero_init.yaml")


@pytest.mark.slow
def test_e01_zero_init_trains_only_the_output_bias_down_to_the_letter_frequencies(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--config", E01, "--trainer.max_steps", "3000", "--data.steps_per_epoch", "3000"]
    assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    assert "net.layers.1 (Tanh) 100.0% of units dead" in capsys.readouterr().err  # the diagnostics say why
    checkpoint = torch.load(next(project.rglob("last.ckpt")), weights_only=True)
    state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    moved = sorted(name for name, value in state.items() if value.abs().max() > 0)
    assert moved == ["layers.10.bias"]  # the one parameter that trains: the output bias
    data = NamesDataModule(path="data/names.txt")
    data.setup()
    x, y = data.splits["train"].tensors()
    frequencies = torch.bincount(y, minlength=27).double() / len(y)
    seen = frequencies[frequencies > 0]
    entropy = -(seen * seen.log()).sum().item()  # the best loss a prediction that ignores the context can reach
    net = MLP(MLPConfig(**checkpoint["hyper_parameters"]["net"]))
    net.load_state_dict(state)
    with torch.no_grad():
        loss = F.cross_entropy(net.eval()(x), y).item()
    assert entropy - 1e-6 <= loss <= entropy + 0.03, (loss, entropy)
    assert loss < math.log(27) - 0.3  # it did learn something: ln(27) = 3.30 at step 0
