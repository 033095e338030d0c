"""Training diagnostics: the statistics are right, the verdicts tell the lecture's stories, TensorBoard gets
everything (read back with its own reader), training is unchanged, and the callback works on other modules."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.cli import main
from mm_lightning.diagnostics.callback import TrainingDiagnostics, custom_scalars_layout
from mm_lightning.diagnostics.snapshot import LayerStats, ParamStats, Snapshot
from mm_lightning.diagnostics.stats import CapturedLayer, CapturedParams, summarize
from mm_lightning.diagnostics.verdicts import Context, HealthThresholds, judge
from tests.conftest import SMALL, flat_tag, free_port, scalars, tb_tags

NO_BN = ["--model.net.batchnorm", "false", "--model.net.output_batchnorm", "false"]

# ------------------------------------------------------------------------------------------------ statistics


def test_summarize_matches_direct_computation():
    torch.manual_seed(0)
    outs = [torch.tanh(torch.randn(32, 100) * s) for s in (0.5, 3.0)] + [torch.relu(torch.randn(32, 50))]
    outs[1][:, 7] = 1.0  # a unit saturated for every example: dead
    outs[2][:, :5] = 0.0  # five ReLU units that never fire: dead
    grads = [torch.randn_like(o) * 1e-3 for o in outs]
    kinds = [nn.Tanh(), nn.Tanh(), nn.ReLU()]
    layers = [CapturedLayer(f"l{i}", k, o, g) for i, (k, o, g) in enumerate(zip(kinds, outs, grads))]
    shapes = [(100, 30), (100,), (100, 100), (100,), (100, 100)]  # as an optimizer lists them
    params = [torch.randn(s) for s in shapes]
    params[1] = torch.full((100,), 0.1)  # a fresh output BatchNorm gamma x 0.1: constant, no update ratio yet
    deltas = [torch.randn(s) * 1e-3 for s in shapes]
    pgrads = [torch.randn(s) * 1e-2 for s in shapes]
    order = sorted(range(5), key=lambda i: shapes[i])  # the callback's layout: equal shapes side by side
    rows = torch.stack([torch.cat([t[i].reshape(-1) for i in order]) for t in (params, deltas, pgrads)])
    captured = CapturedParams([f"p{i}" for i in order], [shapes[i] for i in order], rows, order)
    s = summarize(7, torch.tensor(3.0), layers, captured, saturation_threshold=0.97, bins=20)

    assert s.step == 7 and s.loss == pytest.approx(3.0)
    for x, o, g in zip(s.layers, outs, grads):
        assert x.mean == pytest.approx(o.mean().item(), abs=1e-6) and x.std == pytest.approx(o.std().item(), rel=1e-5)
        assert x.grad_std == pytest.approx(g.std().item(), rel=1e-5)
        assert sum(x.hist.counts) == o.numel()
        assert x.hist.counts == torch.histc(o, 20, x.hist.edges[0], x.hist.edges[-1]).tolist()
    assert s.layers[0].saturation == pytest.approx((outs[0].abs() > 0.97).float().mean().item())
    assert s.layers[1].dead == pytest.approx(0.01) and s.layers[0].dead == 0.0
    assert s.layers[2].saturation is None and s.layers[2].dead == pytest.approx(0.1)  # 5 of 50 units
    assert [p.name for p in s.params] == [f"p{i}" for i in range(5)]  # back in optimizer order
    for p, data, d, g in zip(s.params, params, deltas, pgrads):
        assert p.grad_std == pytest.approx(g.std().item(), rel=1e-5)
        if p.name == "p1":
            assert p.data_std < 1e-7 and p.log10_update_ratio is None and p.grad_data_ratio is None
        else:
            assert p.log10_update_ratio == pytest.approx(math.log10(d.std().item() / data.std().item()), abs=1e-5)
            assert p.grad_data_ratio == pytest.approx(g.std().item() / data.std().item(), rel=1e-5)
    assert [p.name for p in s.weights] == ["p0", "p2", "p4"]


def test_a_nan_is_pinned_to_its_own_layer():
    outs = [torch.tanh(torch.randn(8, 10)) for _ in range(3)]
    outs[1][0, 0] = float("nan")
    s = summarize(0, torch.tensor(1.0), [CapturedLayer(f"l{i}", nn.Tanh(), o) for i, o in enumerate(outs)], None)
    assert math.isnan(s.layers[1].std)
    assert math.isfinite(s.layers[0].std) and math.isfinite(s.layers[2].std)
    nonfinite = [v for v in judge(s, HealthThresholds()) if v.check == "nonfinite"][0]
    assert not nonfinite.ok and nonfinite.subject == "l1"


def test_stds_hold_where_the_mean_dwarfs_the_std():
    """A Sigmoid behind a saturated layer, a nearly constant gradient: mean/std ~ 1000. A one-pass sum of squares
    in float32 loses about 1e-2 of such a std (and how much depends on the CPU's summation order)."""
    g = torch.Generator().manual_seed(0)
    out = 0.999 + 1e-3 * torch.rand(256, 64, generator=g)
    grad = -2.0 + 2e-3 * torch.randn(256, 64, generator=g)
    s = summarize(0, torch.tensor(1.0), [CapturedLayer("sig", nn.Sigmoid(), out, grad=grad)], None)
    layer = s.layers[0]
    assert layer.std == pytest.approx(out.double().std().item(), rel=1e-5)
    assert layer.grad_std == pytest.approx(grad.double().std().item(), rel=1e-5)
    assert layer.mean == pytest.approx(out.double().mean().item(), rel=1e-6)


def test_stds_hold_where_the_std_is_below_the_means_rounding():
    """A Sigmoid at a bias of 12: outputs 0.9999938 +- 2e-6, a std ~30 float32 ulps at 1.0. Centred on a float32
    mean, whose rounding (~6e-8) is not small against such a std, the std came out 7e-4 off (a new user's check)."""
    g = torch.Generator().manual_seed(0)
    out = torch.sigmoid(12 + 0.3 * torch.randn(512, 4, generator=g))
    s = summarize(0, torch.tensor(1.0), [CapturedLayer("sig", nn.Sigmoid(), out)], None)
    assert s.layers[0].std == pytest.approx(out.double().std().item(), rel=1e-5)
    assert s.layers[0].mean == pytest.approx(out.double().mean().item(), rel=1e-7)


def test_stds_hold_over_millions_of_values():
    """A CNN's activations: 4M values in one layer. Squares summed in float32 by vector_norm left a ReLU output's
    std 1e-3 off (a new user's check against float64); parameter stds are summed the same way."""
    g = torch.Generator().manual_seed(0)
    out = torch.relu(torch.randn(64, 16, 64, 64, generator=g))
    s = summarize(0, torch.tensor(1.0), [CapturedLayer("relu", nn.ReLU(), out)], None)
    assert s.layers[0].std == pytest.approx(out.double().std().item(), rel=1e-6)
    weight = torch.randn(2048, 2048, generator=g).relu()
    rows = torch.stack([weight.reshape(-1), 1e-3 * weight.reshape(-1), weight.reshape(-1)])
    params = summarize(0, None, [], CapturedParams(["w"], [tuple(weight.shape)], rows)).params[0]
    assert params.data_std == pytest.approx(weight.double().std().item(), rel=1e-6)


def _snapshot(step=0, loss=3.3, stds=(0.64, 0.64), sats=(0.03, 0.03), gstds=(1e-3, 1e-3), dead=0.0):
    layers = [
        LayerStats(f"l{i}", "Tanh", 0.0, std, sat, dead, grad_mean=0.0, grad_std=g)
        for i, (std, sat, g) in enumerate(zip(stds, sats, gstds))
    ]
    return Snapshot(step, loss, layers, [ParamStats("w", (10, 10), 1.0, 0.0, 1e-3, 1e-3, -3.0)])


def test_verdicts():
    t = HealthThresholds()
    failing = lambda s, **kw: {v.check for v in judge(s, t, **kw) if not v.ok}  # noqa: E731
    assert failing(_snapshot(), expected_loss=math.log(27)) == set()
    assert failing(_snapshot(loss=27.0), expected_loss=math.log(27)) == {"initial_loss"}
    assert failing(_snapshot(step=100, loss=27.0), expected_loss=math.log(27)) == set()  # step 0 only
    assert failing(_snapshot(sats=(0.45, 0.03))) == {"saturation"}
    three = {"sats": (0.03,) * 3, "gstds": (1e-3,) * 3}
    assert failing(_snapshot(stds=(0.62, 0.45, 0.30), **three)) == {"activation_std_ratio"}  # layer by layer
    assert failing(_snapshot(stds=(0.62, 0.30))) == set()  # one step: as PyTorch's default init behind a ReLU
    assert failing(_snapshot(stds=(0.62, 0.10))) == {"activation_std_ratio"}
    assert failing(_snapshot(gstds=(1e-5, 1e-3))) == {"gradient_std_ratio"}
    assert failing(_snapshot(dead=0.2)) == {"dead_units"}
    low = {"w": [-4.5] * 10}
    assert failing(_snapshot(), update_history=low) == {"update_ratio"}
    assert failing(_snapshot(), update_history={"w": [-4.5] * 9}) == set()  # not sustained long enough
    assert failing(_snapshot(), update_history={"w": [-4.5] * 9 + [-3.0]}) == set()


def test_std_ratios_of_non_saturating_layers_and_under_adam():
    """ReLU layers (no saturation statistic): only an extreme change of scale fails, and its fix is the init scale,
    not a gain; under an Adam-like optimizer only an extreme gradient ratio fails. Tanh keeps the lecture's bands."""
    t = HealthThresholds()

    def verdicts(kind, stds, gstds, family=None):
        sat = 0.03 if kind == "Tanh" else None
        layers = [
            LayerStats(f"net.{i}", kind, 0.0, std, sat, 0.0, grad_mean=0.0, grad_std=g, group="net")
            for i, (std, g) in enumerate(zip(stds, gstds))
        ]
        context = Context(optimizer={"net.0.weight": family}) if family else None
        out = judge(Snapshot(0, None, layers), t, context=context)
        return {v.check: v for v in out if v.check.endswith("std_ratio")}

    three = (1e-3,) * 3
    assert verdicts("ReLU", (0.34, 0.15, 0.07), three)["activation_std_ratio"].ok  # PyTorch's default init
    assert not verdicts("Tanh", (0.34, 0.15, 0.07), three)["activation_std_ratio"].ok  # the lecture's gain 1
    grown = verdicts("ReLU", (1.0, 30.0, 300.0), three)["activation_std_ratio"]
    assert not grown.ok and "grow 300x" in grown.message and "lower the init scale" in grown.message
    assert "gain" not in grown.message
    assert not verdicts("ReLU", (1.0, 0.5, 0.005), three)["activation_std_ratio"].ok
    assert not verdicts("ReLU", (1, 1, 1), (2e-5, 1e-4, 2e-3))["gradient_std_ratio"].ok  # SGD's band: 1/100
    assert verdicts("ReLU", (1, 1, 1), (2e-5, 1e-4, 2e-3), "adaptive")["gradient_std_ratio"].ok
    assert verdicts("ReLU", (1, 1, 1), (2e-5, 1e-4, 2e-3), "sgd")["gradient_std_ratio"].ok is False
    vanish = verdicts("ReLU", (1, 1, 1), (3e-11, 1e-6, 2e-4), "adaptive")["gradient_std_ratio"]
    assert not vanish.ok and "raise the init scale" in vanish.message and "non-saturating" not in vanish.message
    tanh = verdicts("Tanh", (1, 1, 1), (3e-11, 1e-6, 2e-4), "adaptive")["gradient_std_ratio"]
    assert not tanh.ok and "non-saturating activation" in tanh.message


# ---------------------------------------------------------------------------------------- the lecture's stories


@pytest.mark.parametrize(
    "extra, status, expect",
    [
        ([], 0, "all healthy"),  # deep BN net: tanh std ~0.64, a few % saturated
        (NO_BN + ["--model.net.gain", "1.0"], 1, "activations shrink layer by layer"),
        pytest.param(  # gain 5/3: the first layer ~20% saturated, which the lecture accepts
            NO_BN, 0, "all healthy", marks=pytest.mark.slow
        ),
        pytest.param(NO_BN + ["--model.net.gain", "3.0"], 1, "saturated (> 30%)", marks=pytest.mark.slow),
    ],
    ids=["batchnorm", "no-bn-gain-1", "no-bn-gain-5/3", "no-bn-gain-3"],
)
def test_diagnose_tells_the_lectures_stories(project, monkeypatch, capsys, extra, status, expect):
    monkeypatch.chdir(project)
    assert main(["diagnose", *extra]) == status
    out = capsys.readouterr().out
    assert expect in out
    rows = [line.split() for line in out.splitlines() if line.startswith("net.layers.") and "(Tanh)" in line]
    assert len(rows) == 5
    stds = [float(r[3]) for r in rows]  # name, (kind), mean, std, saturated, dead, grad mean, grad std
    if not extra:
        assert all(0.6 <= s <= 0.7 for s in stds), stds
        assert all(0.5 <= float(r[4].rstrip("%")) <= 6 for r in rows)  # a few % saturated
        grad_stds = [float(r[-1]) for r in rows]
        assert max(grad_stds) / min(grad_stds) < 3  # about equal across layers
    if "1.0" in extra:
        assert stds == sorted(stds, reverse=True) and stds[-1] < 0.6 * stds[0]  # shrinking layer by layer


@pytest.mark.slow
def test_diagnose_after_training_steps_and_figures(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["diagnose", "--steps", "300", "--save_figures", "figs", *SMALL[:4]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 300")
    assert sorted(p.name for p in (project / "figs").iterdir()) == [
        "1_activations.png",
        "2_gradients.png",
        "3_weight_gradients.png",
        "4_update_ratios.png",
    ]
    assert main(["diagnose", "--steps", "-1"]) == 2


def test_diagnose_samples_every_n_steps_as_fit_does(project, monkeypatch, capsys):
    """--diagnostics.every_n_steps N reaches the diagnosis: figure 4's update ratios at 0, N, ..., K (it drew 0 and
    K only, whatever N); a K that is no multiple of N is refused, naming both."""
    from mm_lightning.lecture import run_diagnosis

    monkeypatch.chdir(project)
    diagnosis = run_diagnosis(["--diagnostics.every_n_steps", "10", *SMALL[:4]], steps=40)
    assert diagnosis.snapshot.step == 40 and diagnosis.update_history
    for name, points in diagnosis.update_history.items():
        assert [step for step, _ in points] == [0, 10, 20, 30, 40], name
    assert main(["diagnose", "--steps", "45", "--diagnostics.every_n_steps", "10", *SMALL[:4]]) == 2
    err = capsys.readouterr().err
    assert "--steps 45" in err and "every 10 steps" in err, err


# ------------------------------------------------------------------------------------ TensorBoard and training


def _fit(project, root: str, *extra: str) -> None:
    args = ["fit", "--trainer.max_steps", "300", "--data.steps_per_epoch", "300", "--trainer.default_root_dir", root]
    assert main([*args, "--trainer.enable_model_summary", "false", *extra]) == 0


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_fit_writes_every_diagnostic_to_tensorboard(project, monkeypatch):
    monkeypatch.chdir(project)
    _fit(project, "out", "--diagnostics.histograms_every_n_steps", "100", "--diagnostics.figures_every_n_steps", "200")
    run = project / "out" / "lightning_logs" / "version_0"
    acc, logged = _events(run), scalars(run)
    tags = acc.Tags()
    tanh = [f"net.layers.{i}" for i in (2, 5, 8, 11, 14)]
    weights = ["net.embedding.weight", "net.layers.0.weight", "net.layers.3.weight", "net.layers.15.weight"]
    for layer in tanh:
        for family in ("act/mean", "act/std", "act/saturation", "act/dead", "grad/mean", "grad/std"):
            assert [s for s, _ in logged[flat_tag(f"{family}/{layer}")]] == [0, 100, 200]
        assert 0.4 < logged[flat_tag(f"act/std/{layer}")][0][1] < 0.9
        assert all(0 <= v <= 100 for _, v in logged[flat_tag(f"act/saturation/{layer}")])
        assert f"act_hist/{layer}" in tags["histograms"] and f"grad_hist/{layer}" in tags["histograms"]
    for w in weights:
        assert flat_tag(f"weight/grad_data_ratio/{w}") in logged and f"weight_grad_hist/{w}" in tags["histograms"]
        assert all(-6 < v < 0 for _, v in logged[flat_tag(f"update/log10_ratio/{w}")])
    # BN gamma (once it has moved) is no weight of the lecture's plot: with biases, under "5 more"
    assert "5 more/log10 update:data (guide -3) · net.layers.1.weight" in logged
    assert all(v == 0.0 for _, v in logged["health/saturation"])
    # one run per fit (no sub-runs: TensorBoard selects none past ~40), a chart per layer, numbered by depth
    written = tb_tags(run)
    assert not [p for p in run.iterdir() if p.is_dir() and p.name != "checkpoints"]
    std_charts = sorted(t for t in written if t.startswith("1 activations/output std · "))
    assert std_charts == [f"1 activations/output std · {i:02d} {n}" for i, n in enumerate(tanh, 1)]
    assert not any("/" in tag and tag.split("/")[0] in ("act", "grad", "weight", "update") for tag in logged)
    hist = acc.Histograms(f"act_hist/{tanh[0]}")[0].histogram_value
    assert hist.num == 32 * 100 and hist.min == -1.0 and hist.max == 1.0
    images = {tag: [e.step for e in acc.Images(tag)] for tag in tags["images"]}
    figures = ("1_activations", "2_gradients", "3_weight_gradients", "4_update_ratios")
    assert images == {f"figures/{n}": [0, 200] for n in figures}  # step 0, then every 200 (the last sample)
    # laid out for a card (345 px), drawn at twice the pixels: legible exported or at actual size
    assert all(acc.Images(t)[0].width == 691 and acc.Images(t)[0].height > 400 for t in images)
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: [list(ch.multiline.tag) for ch in c.chart] for c in layout.category}
    assert list(charts)[0] == "loss" and charts["loss"] == [[".*loss.*"]]  # the loss first, every loss tag
    assert set(charts) == set(custom_scalars_layout())


@pytest.mark.slow
def test_diagnostics_do_not_change_training(project, monkeypatch):
    monkeypatch.chdir(project)
    _fit(project, "on", *SMALL[:4])
    _fit(project, "off", *SMALL[:4], "--diagnostics.every_n_steps", "0")
    on, off = (project / d / "lightning_logs" / "version_0" for d in ("on", "off"))
    assert scalars(on)["train/loss"] == scalars(off)["train/loss"]
    a = torch.load(on / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(off / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("1 activations/", "2 updates/")) for k in scalars(off))


# ------------------------------------------------------------------------------------------- any LightningModule


class ReluMLP(L.LightningModule):
    """A different model: ReLU, automatic optimization, Adam. Records each step's real parameter change."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.changes = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def on_train_batch_start(self, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in self.named_parameters()}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.changes[self.global_step - 1] = {
            n: math.log10((p.detach() - self._before[n]).std().item() / self._before[n].std().item())
            for n, p in self.named_parameters()
        }


def test_callback_on_another_lightning_module(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = ReluMLP()
    diagnostics = TrainingDiagnostics(every_n_steps=5, histograms_every_n_steps=5, figures_every_n_steps=0)
    trainer = L.Trainer(
        max_steps=12,
        logger=TensorBoardLogger(tmp_path, name="relu"),
        callbacks=[diagnostics],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    tags = scalars(tmp_path / "relu" / "version_0")
    assert {flat_tag(t) for t in ("act/dead/net.1", "act/dead/net.3", "act/std/net.1", "grad/std/net.3")} <= set(tags)
    assert not any(t.startswith("1 activations/saturated %") for t in tags)  # ReLU is not bounded: no saturation
    assert [s for s, _ in tags[flat_tag("act/std/net.1")]] == [0, 5, 10]
    for step in (0, 5, 10):  # Adam's update is not lr * grad: the logged ratio is the real measured change
        logged = [v for s, v in tags[flat_tag("update/log10_ratio/net.0.weight")] if s == step][0]
        assert logged == pytest.approx(model.changes[step]["net.0.weight"], abs=1e-4)
    assert diagnostics.last_snapshot.step == 10


@pytest.mark.slow  # the worker imports matplotlib for the figure: 2-6 s
def test_the_worker_does_not_hold_the_scripts_stderr_and_its_messages_still_arrive(capsys):
    """A worker that inherited the training process's stderr kept a script's output open (a shell pipe, `tee`,
    subprocess.run) until its last figure was written, 0.7-5 s after the script had exited. Its stderr is now a pipe
    of its own, whose lines (a figure that failed) are copied to the training process's stderr."""
    from mm_lightning.diagnostics.worker import Worker

    w = Worker(warm=False)
    try:
        assert os.readlink(f"/proc/{w.process.pid}/fd/2") != os.readlink("/proc/self/fd/2")
        w.submit(("figures", 7, (None, {}, ("png", "unused"))))  # no snapshot: the figure fails in the worker
        assert [(kind, step) for kind, step, _ in w.ready(wait=60)] == [("figures", 7)]
    finally:
        w.finish()
        assert w.wait(60)
    assert "[diagnostics] figures of step 7 failed: AttributeError" in capsys.readouterr().err


@pytest.mark.slow
def test_the_worker_does_not_outlive_a_killed_trainer(tmp_path):
    script = (
        "import os, sys, time\n"
        "from mm_lightning.diagnostics.worker import Worker\n"
        "w = Worker(); print(w.process.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return  # gone: its stdin closed with the parent
        with open(f"/proc/{worker}/stat") as f:
            if f.read().split()[2] == "Z":  # exited, waiting to be reaped by init
                return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker kept running after its trainer was killed")


# ----------------------------------------------------------------------------------- through TensorBoard itself


@pytest.mark.slow
def test_tensorboard_serves_the_diagnostics_over_http(project, monkeypatch):
    """Start TensorBoard on 127.0.0.1 against a finished run and read what the browser reads."""
    import json
    import shutil
    import urllib.parse
    import urllib.request

    monkeypatch.chdir(project)
    _fit(project, "out", *NO_BN, "--model.net.gain", "3.0")  # saturated: verdicts to find as text too
    port = free_port()
    exe = shutil.which("tensorboard") or os.path.join(os.path.dirname(sys.executable), "tensorboard")
    server = subprocess.Popen(
        [exe, "--logdir", str(project / "out" / "lightning_logs"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def get(path: str, **query):
        url = f"http://127.0.0.1:{port}/data/plugin/{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    try:
        deadline, runs = time.monotonic() + 90, {}
        sat = "1 activations/saturated % · "  # then the layer's depth and name
        while time.monotonic() < deadline:
            try:
                runs = get("scalars/tags")
                if any(t.endswith(" net.layers.1") and t.startswith(sat) for t in runs.get("version_0", {})):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert list(runs) == ["version_0"], f"a fit is one run: {sorted(runs)[:5]}"
        charts = {t[len(sat) :].split(" ", 1)[1]: t for t in runs["version_0"] if t.startswith(sat)}  # layer: tag
        assert "net.layers.1" in charts, f"TensorBoard never served: {sorted(runs['version_0'])[:5]}"
        points = get("scalars/scalars", run="version_0", tag=charts["net.layers.1"])
        assert [p[1] for p in points] == [0, 100, 200] and points[0][2] > 30  # (wall time, step, value): saturated
        health = get("scalars/scalars", run="version_0", tag="health/saturation")
        assert [p[2] for p in health] == [1.0, 1.0, 1.0]
        layout = get("custom_scalars/layout")
        assert {c["title"] for c in layout["category"]} == set(custom_scalars_layout())
        assert "figures/1_activations" in get("images/tags")["version_0"]
        assert "act_hist/net.layers.1" in get("histograms/tags")["version_0"]
        assert any(t.startswith("health/") for t in get("text/tags").get("version_0", []))
        # every failing verdict of a step is in the Text tab, not only the last one written under its tag
        saturated = [n for n, t in charts.items() if get("scalars/scalars", run="version_0", tag=t)[0][2] > 30]
        text = next(
            e["text"] for e in get("text/text", run="version_0", tag="health/saturation/text_summary") if e["step"] == 0
        )
        assert len(saturated) >= 2 and all(f"{name} (Tanh)" in text for name in saturated), text
    finally:
        server.terminate()
        server.wait(timeout=10)


# ------------------------------------------------------------------------------------------------- under DDP


def _ddp_worker(rank: int, port: int, path: str, tensors) -> None:
    import torch.distributed as dist

    from mm_lightning.diagnostics.callback import _all_reduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outs, grads, loss = tensors
    half = slice(rank * 16, (rank + 1) * 16)  # each process sees half of the batch
    layers = [CapturedLayer(f"l{i}", nn.Tanh(), o[half], g[half]) for i, (o, g) in enumerate(zip(outs, grads))]
    snapshot = summarize(0, loss[rank], layers, None, bins=10, reduce=_all_reduce)
    if rank == 0:
        torch.save(snapshot, path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_are_all_reduced_across_processes(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    outs = [torch.tanh(torch.randn(32, 20) * s) for s in (0.7, 2.5)]
    outs[1][:16, 3] = 1.0  # saturated on rank 0's half only: not dead for the whole batch
    outs[1][:, 4] = -1.0  # saturated everywhere: dead
    grads = [torch.randn(32, 20) * 1e-3 for _ in outs]
    loss = torch.tensor([2.0, 4.0])
    path = str(tmp_path / "snapshot.pt")
    mp.spawn(_ddp_worker, args=(free_port(), path, (outs, grads, loss)), nprocs=2)
    ddp = torch.load(path, weights_only=False)  # our own test file
    whole = summarize(
        0,
        loss.mean(),
        [CapturedLayer(f"l{i}", nn.Tanh(), o, g) for i, (o, g) in enumerate(zip(outs, grads))],
        None,
        bins=10,
    )
    assert ddp.loss == pytest.approx(3.0)
    for a, b in zip(ddp.layers, whole.layers):
        assert a.mean == pytest.approx(b.mean, abs=1e-7) and a.std == pytest.approx(b.std, rel=1e-6)
        assert a.saturation == pytest.approx(b.saturation) and a.dead == b.dead
        assert a.grad_std == pytest.approx(b.grad_std, rel=1e-6) and a.hist.counts == b.hist.counts
    assert ddp.layers[1].dead == pytest.approx(1 / 20)


@pytest.mark.slow
def test_the_worker_process_computes_what_the_training_process_would(project, monkeypatch):
    """stats_in_worker is speed only: every diagnostics number, histogram and verdict is the same inline."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(TrainingDiagnostics, "INLINE_SAMPLES", 2)  # step 0 inline, the others in the worker
    monkeypatch.setattr(TrainingDiagnostics, "WORKER_MIN_CPUS", 1)  # on a machine of any size
    common = ["fit", "--trainer.max_steps", "250", *SMALL, "--data.steps_per_epoch", "250"]
    common += ["--diagnostics.every_n_steps", "50", "--diagnostics.histograms_every_n_steps", "100"]
    assert main([*common, "--trainer.default_root_dir", "worker"]) == 0
    assert main([*common, "--trainer.default_root_dir", "inline", "--diagnostics.stats_in_worker", "false"]) == 0
    runs = [scalars(project / d / "lightning_logs" / "version_0") for d in ("worker", "inline")]
    diag = [t for t in runs[1] if ":" in t or t.startswith("health/")]
    assert len(diag) > 20 and {t: runs[0][t] for t in diag} == {t: runs[1][t] for t in diag}
    assert [s for s, _ in runs[0][flat_tag("act/std/net.layers.2")]] == [
        0,
        50,
        100,
        150,
        200,
    ]  # every sample, in order
    hists = [_events(project / d / "lightning_logs" / "version_0") for d in ("worker", "inline")]
    tag = "act_hist/net.layers.2"
    assert [(e.step, list(e.histogram_value.bucket)) for e in hists[0].Histograms(tag)] == [
        (e.step, list(e.histogram_value.bucket)) for e in hists[1].Histograms(tag)
    ]
    ckpts = [
        torch.load(next(Path(d).glob("lightning_logs/version_0/checkpoints/last.ckpt")), weights_only=True)
        for d in ("worker", "inline")
    ]
    states = [next(v for k, v in c["callbacks"].items() if "TrainingDiagnostics" in k) for c in ckpts]
    assert states[0] == states[1] and states[0]["update_history"]  # the checkpoint waited for the last samples


@pytest.mark.slow
def test_a_dead_worker_process_leaves_the_statistics_inline(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker process exits at once
    args = ["fit", "--trainer.max_steps", "150", *SMALL, "--data.steps_per_epoch", "150"]
    args += ["--diagnostics.histograms_every_n_steps", "50", "--diagnostics.figures_every_n_steps", "100"]
    assert main([*args, "--diagnostics.every_n_steps", "50", "--trainer.default_root_dir", "runs"]) == 0
    err = capsys.readouterr().err
    assert "[diagnostics] the figures worker process stopped (exit code 1) before drawing step(s) 0" in err
    run = project / "runs" / "lightning_logs" / "version_0"
    assert [s for s, _ in scalars(run)[flat_tag("act/std/net.layers.2")]] == [
        0,
        50,
        100,
    ]  # short run: statistics inline
    images = _events(run).Tags()["images"]  # the figures the worker never drew, drawn by the training process
    assert {e.step for tag in images for e in _events(run).Images(tag)} == {0, 100} and len(images) == 4


@pytest.mark.slow
def test_a_dead_statistics_worker_leaves_the_statistics_inline(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker process exits at once
    monkeypatch.setattr(TrainingDiagnostics, "INLINE_SAMPLES", 1)  # a statistics worker from the first sample
    monkeypatch.setattr(TrainingDiagnostics, "WORKER_MIN_CPUS", 1)
    args = ["fit", "--trainer.max_steps", "150", *SMALL, "--data.steps_per_epoch", "150"]
    assert main([*args, "--diagnostics.every_n_steps", "50", "--trainer.default_root_dir", "runs"]) == 0
    assert "[diagnostics] the stats worker process stopped (exit code 1)" in capsys.readouterr().err
    steps = [s for s, _ in scalars(project / "runs" / "lightning_logs" / "version_0")[flat_tag("act/std/net.layers.2")]]
    assert steps in ([50, 100], [0, 50, 100])  # only what the dead worker never answered (step 0) may be lost


def test_every_histogram_belongs_to_its_tensor(names_file):
    """Each histogram's count is its tensor's element count and its range that tensor's min/max, checked against
    the gradients themselves (the weight-gradient histograms once went to other parameters of the same size)."""
    import lightning as L

    from mm_lightning.data import NamesDataModule
    from mm_lightning.module import MakemoreModule

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    L.seed_everything(0)
    module, grads = MakemoreModule(), Grads()  # the lecture's deep network: parameters of many sizes
    diagnostics = TrainingDiagnostics(every_n_steps=1, histograms_every_n_steps=1, figures_every_n_steps=0)
    diagnostics.stats_in_worker = False
    trainer = L.Trainer(max_steps=1, callbacks=[grads, diagnostics], logger=False, enable_checkpointing=False)
    trainer.fit(module, NamesDataModule(path=str(names_file), steps_per_epoch=10))
    s = diagnostics.last_snapshot
    assert s.step == 0 and len(s.weights) == 7
    for p in s.weights:
        g = grads.grads[p.name]
        assert sum(p.grad_hist.counts) == g.numel(), p.name
        assert p.grad_hist.edges[0] == pytest.approx(g.min().item()), p.name
        assert p.grad_hist.edges[-1] == pytest.approx(g.max().item()), p.name
    for x in s.layers:
        assert sum(x.hist.counts) == 32 * 100 and sum(x.grad_hist.counts) == 32 * 100, x.name


PORTABLE = """
import sys

class NoProject:  # the project around the package is not there
    def find_spec(self, name, path=None, target=None):
        if name == "mm_lightning" or name.startswith("mm_lightning."):
            raise ImportError("mm_lightning is not installed in this project")

sys.meta_path.insert(0, NoProject())
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from mydiag import HealthThresholds, TrainingDiagnostics

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layers(x), y)
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)
diagnostics = TrainingDiagnostics(every_n_steps=5, histograms_every_n_steps=5, figures_every_n_steps=5,
                                  health=HealthThresholds(max_saturation=0.5))
trainer = L.Trainer(max_steps=12, callbacks=[diagnostics], logger=TensorBoardLogger("logs"), enable_progress_bar=False)
trainer.fit(Net(), data)
assert diagnostics.last_snapshot.step == 10, diagnostics.last_snapshot
assert not any(m.startswith("mm_lightning") for m in sys.modules)
print("steps", sorted(s for s, _ in diagnostics.update_history["layers.0.weight"]))
"""


@pytest.mark.slow
def test_the_package_works_copied_into_another_project(tmp_path):
    """diagnostics/ copied as another project's `mydiag`, with mm_lightning nowhere: it trains, samples, logs,
    and its worker process starts from the copy (statistics and figures)."""
    import shutil

    from tests.conftest import ROOT

    shutil.copytree(ROOT / "mm_lightning" / "diagnostics", tmp_path / "mydiag")
    (tmp_path / "train.py").write_text(PORTABLE)
    proc = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps [0, 5, 10]" in proc.stdout
    assert "worker process stopped" not in proc.stderr and "no worker process" not in proc.stderr
    from tests.conftest import scalars

    tags = scalars(next((tmp_path / "logs").glob("lightning_logs/version_0")))
    assert [s for s, _ in tags[flat_tag("act/std/layers.1")]] == [0, 5, 10]


def test_a_bad_argument_names_the_python_argument_and_the_cli_its_option(project, monkeypatch, capsys):
    from mm_lightning.diagnostics import DiagnosticsConfigError

    monkeypatch.chdir(project)
    with pytest.raises(DiagnosticsConfigError, match=r"^every_n_steps must be 0 \(off\) or more, got -1"):
        TrainingDiagnostics(every_n_steps=-1)
    assert main(["fit", "--diagnostics.every_n_steps", "-1", "--trainer.max_steps", "1"]) == 2
    assert "error: --diagnostics.every_n_steps must be 0 (off) or more, got -1" in capsys.readouterr().err


def test_hand_encoded_scalar_events_are_what_protobuf_reads():
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from mm_lightning.diagnostics.tbwrite import scalar_event

    scalars = {"1 activations/std": 0.64, "5 more/dead units %": 0.0, "x" * 200: 1e30, "é/ü": -3.25, "zero": -0.0}
    for step in (0, 1, 127, 128, 300_000, 2**40):
        built = Event(
            wall_time=1234.5,
            step=step,
            summary=Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in scalars.items()]),
        )
        assert Event.FromString(scalar_event(1234.5, step, scalars)) == built, step


@pytest.mark.parametrize("cpus, expected", [(2, False), (4, True)], ids=["2-cpus-inline", "4-cpus-worker"])
def test_the_stats_worker_starts_only_with_a_cpu_to_spare(monkeypatch, cpus, expected):
    """With two CPUs the worker shares the core training leaves free with everything else (and its start costs
    more than it saves in most runs): statistics inline. With more, the worker (past the first samples)."""
    from mm_lightning.diagnostics import schedule

    monkeypatch.setattr(schedule, "_usable_cpus", lambda: cpus)
    monkeypatch.setattr(TrainingDiagnostics, "INLINE_SAMPLES", 1)
    started = []
    monkeypatch.setattr(schedule.Scheduling, "_start_worker", lambda self, kind: started.append(kind))
    callback = TrainingDiagnostics(every_n_steps=10, histograms_every_n_steps=0, figures_every_n_steps=0)
    callback._samples = 5
    layer = SimpleNamespace(output=torch.zeros(2))
    callback._layers = [layer]
    trainer = SimpleNamespace(world_size=1)
    callback._worker_for(trainer, None)
    assert started == (["stats"] if expected else [])
