"""The GPU's one-CUDA-graph-per-step path (graphed.py): the same training as the eager path, exact resume, the
non-finite stop; and, on any machine, the step function it captures and the check that decides when it may run."""

import re

import pytest
import torch
import torch.nn.functional as F

from mm_lightning.cli import MakemoreCLI
from mm_lightning.graphed import GraphedSGDStep, observed
from mm_lightning.model import MLP, MLPConfig
from tests.conftest import scalars
from tests.test_reliability import FAST, NO_BN, _fit, _last, _same_state

VOCAB = ".abcdefghijklmnopqrstuvwxyz"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--data.steps_per_epoch", "100"]


def _chunk(steps=5, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 27, (steps, batch, 3), generator=g), torch.randint(0, 27, (steps, batch), generator=g)


def test_the_captured_step_is_an_sgd_step_and_rewinds():
    """What the graph holds, run eagerly on the CPU: each step equals cross_entropy + SGD(lr).step()."""
    torch.manual_seed(0)
    net, ref = MLP(MLPConfig(vocab=VOCAB)), MLP(MLPConfig(vocab=VOCAB))
    ref.load_state_dict(net.state_dict())
    xs, ys = _chunk()
    graphed = GraphedSGDStep(net, list(net.parameters()), capacity=8)
    losses = graphed.begin(xs, ys)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    expected = []
    for x, y in zip(xs, ys):
        graphed.step(0.1)
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    graphed.rewind()  # back to the chunk's start: the parameters the first loss came from
    graphed.seek(0)
    assert F.cross_entropy(net(xs[0]), ys[0]).item() == pytest.approx(expected[0], rel=1e-6)


def test_observed_steps_are_seen():
    net = MLP(MLPConfig(vocab=VOCAB))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    modules = list(net.modules())
    assert not observed(opt, modules)
    handle = net.layers[2].register_forward_hook(lambda *a: None)
    assert observed(opt, modules)
    handle.remove()
    handle = opt.register_step_post_hook(lambda *a: None)
    assert observed(opt, modules)
    handle.remove()
    assert not observed(opt, modules)


def _cli(root, steps, *extra):
    args = ["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *FAST, *GPU, *extra]
    return MakemoreCLI(args)


@cuda
def test_graphed_training_matches_eager(project, monkeypatch):
    monkeypatch.chdir(project)
    graphed = _cli("g", 300)
    assert graphed.model._graphed is not None and graphed.model._graphed.graph is not None  # the graph ran
    eager = _cli("e", 300, "--model.cuda_graph", "false")
    assert eager.model._graphed is None
    a, b = _last("g"), _last("e")
    assert a["global_step"] == b["global_step"] == 300
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key].float(), b["state_dict"][key].float(), rtol=1e-4, atol=1e-5), key
    runs = [scalars(project / d / "lightning_logs" / "version_0") for d in ("g", "e")]
    for tag in ("train/loss", "val/loss", "act/std/net.layers.2", "update/log10_ratio/net.layers.0.weight"):
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
    with pytest.warns(UserWarning, match="CUDA graph capture failed, training steps run eagerly"):
        cli = _cli("f", 120)
    assert cli.model._graphed.failed and cli.trainer.global_step == 120
    monkeypatch.undo()
    monkeypatch.chdir(project)
    _cli("e", 120, "--model.cuda_graph", "false")
    _same_state(_last("f"), _last("e"))  # the eager path, bit for bit
