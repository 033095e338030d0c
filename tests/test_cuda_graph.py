"""The GPU's one-CUDA-graph-per-step path (graphed.py, run by the fast path's lean loop): the same training as the
eager path, exact resume, the non-finite stop, the fallback; and, on any machine, the step function it captures,
the check that decides when it may run, and the lean loop's graphed branch run eagerly on the CPU."""

import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mm_lightning.cli import MakemoreCLI
from mm_lightning.data import NamesDataModule
from mm_lightning.diagnostics.callback import TrainingDiagnostics
from mm_lightning.model import MLP, MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.speed import FastPath, lean, private
from mm_lightning.speed.graphed import GraphedSGDStep
from tests.conftest import flat_tag, scalars
from tests.test_reliability import FAST, NO_BN, _fit, _last, _same_state

VOCAB = ".abcdefghijklmnopqrstuvwxyz"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--data.steps_per_epoch", "100"]


def test_the_captured_step_is_the_template_step_and_an_sgd_step():
    """What the graph holds, run eagerly on the CPU: cross_entropy(net(x), y) and SGD(lr).step(), bit for bit; a
    non-finite loss updates nothing (the eager step then reports it)."""
    torch.manual_seed(0)
    net, ref = MLP(MLPConfig(vocab=VOCAB)), MLP(MLPConfig(vocab=VOCAB))
    ref.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(0)
    graphed = GraphedSGDStep(net, list(net.parameters()))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(5):
        x, y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
        graphed.x, graphed.y = x, y
        graphed.step(0.1)
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert graphed.loss.item() == loss.item()
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    before = [p.clone() for p in net.parameters()]
    with torch.no_grad():
        net.layers[0].weight[0, 0] = float("inf")
        before[1][0, 0] = float("inf")
    graphed.step(0.1)
    assert not torch.isfinite(graphed.loss)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))  # nothing updated


def test_observed_steps_are_seen():
    net = MLP(MLPConfig(vocab=VOCAB))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    modules = list(net.modules())
    assert not private.step_is_observed(opt, modules)
    handle = net.layers[2].register_forward_hook(lambda *a: None)
    assert private.step_is_observed(opt, modules)
    handle.remove()
    handle = opt.register_step_post_hook(lambda *a: None)
    assert private.step_is_observed(opt, modules)
    handle.remove()
    assert not private.step_is_observed(opt, modules)


def _python_fit(names_file, root, steps: int) -> tuple[MakemoreModule, TrainingDiagnostics]:
    L.seed_everything(42)
    module = MakemoreModule(net=MLPConfig(n_hidden=16, n_layers=2))
    diagnostics = TrainingDiagnostics(every_n_steps=20, histograms_every_n_steps=20, figures_every_n_steps=0)
    trainer = L.Trainer(
        max_steps=steps,
        default_root_dir=root,
        callbacks=[FastPath(), diagnostics],
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        logger=False,
    )
    trainer.fit(module, NamesDataModule(path=str(names_file), steps_per_epoch=50))
    return module, diagnostics


@pytest.mark.slow
def test_graphed_branch_of_the_lean_loop_equals_eager_steps_on_cpu(names_file, tmp_path, monkeypatch):
    """The lean loop's graphed branch (counters, logging, observed steps eager, the LR milestone), with the graph
    "replayed" eagerly on the CPU: bitwise the same module and diagnostics as eager lean steps."""
    eager, eager_diag = _python_fit(names_file, tmp_path / "e", 120)
    replays = []

    def use_graphs(self, trainer, module):
        self.lean_graph = GraphedSGDStep(module.net, self.lean_params)
        return None

    def capture(self, lr):
        self.graph = SimpleNamespace(replay=lambda: replays.append(1) or self.step(lr))
        self.lr, self.captures = lr, self.captures + 1

    monkeypatch.setattr(lean.LeanEpochLoop, "graph_steps", use_graphs)
    monkeypatch.setattr(GraphedSGDStep, "_capture", capture)
    graphed, graphed_diag = _python_fit(names_file, tmp_path / "g", 120)
    assert len(replays) == 120 - 6  # every step but the six the diagnostics watched (0, 20, ..., 100)
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), name
    assert graphed_diag.last_snapshot == eager_diag.last_snapshot
    assert graphed.trainer.callback_metrics["train/loss"] == eager.trainer.callback_metrics["train/loss"]


def _cli(root, steps, *extra):
    args = ["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *FAST, *GPU, *extra]
    return MakemoreCLI(args)


@cuda
def test_graphed_training_matches_eager(project, monkeypatch):
    monkeypatch.chdir(project)
    graphed = _cli("g", 300)
    assert graphed.trainer.fit_loop.epoch_loop.lean_graph.graph is not None  # the graph ran
    _cli("e", 300, "--fast_path.cuda_graph", "false")
    a, b = _last("g"), _last("e")
    assert a["global_step"] == b["global_step"] == 300
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key].float(), b["state_dict"][key].float(), rtol=1e-4, atol=1e-5), key
    runs = [scalars(project / d / "lightning_logs" / "version_0") for d in ("g", "e")]
    for tag in (
        "train/loss",
        "val/loss",
        flat_tag("act/std/net.layers.2"),
        flat_tag("update/log10_ratio/net.layers.0.weight"),
    ):
        steps = [s for s, _ in runs[0][tag]]
        assert steps == [s for s, _ in runs[1][tag]], tag  # the same cadence: diagnostics sampled alike
        assert [v for _, v in runs[0][tag]] == pytest.approx([v for _, v in runs[1][tag]], rel=1e-4, abs=1e-5), tag


@cuda
@pytest.mark.parametrize("extra", [[], ["--model.milestones", "[150]"]], ids=["plain", "across-lr-milestone"])
def test_graphed_resume_is_exact(project, monkeypatch, extra):
    monkeypatch.chdir(project)
    assert _fit("whole", 260, *GPU, *extra) == 0
    assert _fit("split", 130, *GPU, *extra) == 0
    assert _fit("split", 260, "--ckpt_path", "last", *GPU, *extra) == 0
    _same_state(_last("whole"), _last("split"))


@cuda
def test_graphed_non_finite_loss_names_step_and_layer(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert _fit("runs", 50, *GPU, *NO_BN, "--model.lr", "1e38") == 1
    err = capsys.readouterr().err
    # the same stop as on the CPU; the GPU's kernels may give nan where the CPU's give inf
    expected = r"the loss became (inf|nan) at step 1; the first non-finite output is net\.layers\.0 \(Linear\)"
    assert re.search(expected, err), err


@cuda
def test_a_failed_capture_falls_back_to_eager_steps(project, monkeypatch):
    monkeypatch.chdir(project)

    def broken(self, lr):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(GraphedSGDStep, "_capture", broken)
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*: training steps run eagerly from here"):
        cli = _cli("f", 120)
    assert cli.trainer.global_step == 120
    monkeypatch.undo()
    monkeypatch.chdir(project)
    _cli("e", 120, "--fast_path.cuda_graph", "false")
    _same_state(_last("f"), _last("e"))  # the eager path, bit for bit
