"""TrainingDiagnostics on models it was not written for, under the precisions and optimizer settings Lightning offers.

Every number is checked against an independent float64 record of the same step (`Truth`: its own forward hooks,
tensor hooks and parameter copies), not only that tags exist.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from lightning.pytorch.plugins import MixedPrecision

from mm_lightning.diagnostics import TrainingDiagnostics

# ------------------------------------------------------------------------------------------ the independent truth


class Truth(L.Callback):
    """Step 0 as it really happened, in float64: each named module's first output and the gradient with respect
    to it (divided by the GradScaler's scale, if any), every parameter before and after the step, and each
    optimizer's gradients as they were when it stepped (after clipping)."""

    def __init__(self, names: list[str]):
        self.names, self.out, self.grad, self.handles = names, {}, {}, []
        self.before = self.after = None
        self.step_grads: dict[str, torch.Tensor] = {}
        self.scale = 1.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and self.before is None:
            self.before = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
            for name in self.names:
                self.handles.append(pl_module.get_submodule(name).register_forward_hook(partial(self._forward, name)))

    def _forward(self, name, module, inputs, output):
        t = output[0] if isinstance(output, tuple) else output
        if name not in self.out:
            self.out[name] = t.detach().double().clone()
            if t.requires_grad:

                def keep(g: torch.Tensor) -> None:
                    self.grad.setdefault(name, g.detach().double() / self.scale)

                t.register_hook(keep)

    def on_before_backward(self, trainer, pl_module, loss):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and not self.grad:
            self.scale = scaler.get_scale()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.after is None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    name = next(n for n, q in pl_module.named_parameters() if q is p)
                    self.step_grads.setdefault(name, p.grad.detach().double().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and self.after is None:
            self.after = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
            for h in self.handles:
                h.remove()


def dead_fraction(out: torch.Tensor, channel_dim: int, bounded: bool) -> float:
    """Units (channels of N-D outputs) constant over the batch and every position, or all saturated."""
    x = out.movedim(channel_dim, 0).reshape(out.shape[channel_dim], -1)
    dead = x.amax(1) == x.amin(1)
    if bounded:
        dead |= (x.abs() > 0.97).all(1)
    return dead.double().mean().item()


def one_pass_float32_rel(t: torch.Tensor) -> float:
    """The rounding bound, relative, of the std of t as the diagnostics compute a layer's (stats._moments): the sum
    and the sum of squares of t in float32, pairwise (relative error at most about (log2 n + 2) u, u = 2**-24, the
    +2 for the norm's square root and its square), then var = (sum x^2 - n mean^2) / (n - 1), which multiplies
    that error by (sum x^2 + 2 n mean^2) / ((n - 1) var): large when the mean dwarfs the std (a gradient that is
    nearly the same for every sample, as behind a saturated Sigmoid); the std's is half the variance's."""
    t = t.double().flatten()
    n = t.numel()
    var = t.var().item()
    if n < 2 or var == 0:
        return 0.0
    amplification = (t.square().sum().item() + 2 * n * t.mean().item() ** 2) / ((n - 1) * var)
    return 0.5 * (math.log2(n) + 2) * 2**-24 * amplification


def check_against_truth(diag: TrainingDiagnostics, truth: Truth, channel_dims: dict[str, int], grad_rel=1e-4):
    """grad_rel: the relative tolerance of gradient stds beyond float32's one-pass rounding bound (above)."""
    s = diag.first_snapshot
    assert s.step == 0
    layers = {x.name: x for x in s.layers}
    assert set(truth.out) <= set(layers), (sorted(truth.out), sorted(layers))
    for name, out in truth.out.items():
        x = layers[name]
        assert x.mean == pytest.approx(out.mean().item(), rel=1e-4, abs=1e-6), name
        assert x.std == pytest.approx(out.std().item(), rel=1e-4), name
        bounded = x.saturation is not None
        assert x.dead == pytest.approx(dead_fraction(out, channel_dims.get(name, -1), bounded)), name
        if bounded:
            assert x.saturation == pytest.approx((out.abs() > 0.97).double().mean().item()), name
        if name in truth.grad:
            g = truth.grad[name]
            assert x.grad_std == pytest.approx(g.std().item(), rel=grad_rel + one_pass_float32_rel(g)), name
    params = {p.name: p for p in s.params}
    assert set(params) == set(truth.step_grads), "every parameter that stepped, named as in the model"
    for name, g in truth.step_grads.items():
        p, before, after = params[name], truth.before[name], truth.after[name]
        if g.numel() == 1:  # the std of one value: 0 for the diagnostics, NaN for torch
            assert p.grad_std == 0.0, name
            continue
        assert p.grad_std == pytest.approx(g.std().item(), rel=grad_rel), name
        if before.std() > 0:
            assert p.grad_data_ratio == pytest.approx((g.std() / before.std()).item(), rel=grad_rel), name
            change = ((after - before).std() / before.std()).item()
            expected = math.log10(change) if change > 0 else -math.inf
            assert p.log10_update_ratio == pytest.approx(expected, abs=1e-3), (name, change)


class FirstSnapshot(TrainingDiagnostics):
    """Keeps the snapshot of step 0 (the one Truth records)."""

    first_snapshot = None

    def _record(self, trainer, pl_module, s):
        if s.step == 0:
            self.first_snapshot = s
        super()._record(trainer, pl_module, s)


def fit(model, data, truth_names, max_steps=2, diag_kwargs=None, **trainer_kwargs):
    truth = Truth(truth_names)
    diag = FirstSnapshot(every_n_steps=1, histograms_every_n_steps=0, figures_every_n_steps=0, **(diag_kwargs or {}))
    trainer_kwargs.setdefault("logger", False)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[truth, diag],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, data)
    return diag, truth


def loader(*tensors, batch_size=16):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size)


# --------------------------------------------------------------------------------------------------- the models


class DemoTransformer(L.LightningModule):
    """Lightning's own demo Transformer (nn.Transformer: F.relu inside, no activation module)."""

    def __init__(self):
        super().__init__()
        self.model = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=32, nlayers=2, dropout=0.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CNN(L.LightningModule):
    """Conv -> BatchNorm2d -> ReLU, 3 of its 8 channels dead (a bias of -100 before the ReLU)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU())
        self.shift = nn.Parameter(torch.tensor([0, 0, -100.0, 0, -100.0, 0, 0, -100.0]).view(1, 8, 1, 1))
        self.shift.requires_grad_(False)
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        h = self.features[1](self.features[0](x)) + self.shift
        return self.head(self.features[2](h).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class LSTMTagger(L.LightningModule):
    """An LSTM (tuple output) and a Linear head over (batch, time, features)."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 12, batch_first=True), nn.Linear(12, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.lstm(x)
        return F.cross_entropy(self.head(out).reshape(-1, 3), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class FunctionalMLP(L.LightningModule):
    """Functional activations only (F.relu): no activation module anywhere."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class BuiltLate(L.LightningModule):
    """Layers built in configure_model (Lightning's pattern for large models), with Tanh modules."""

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GAN(L.LightningModule):
    """Two optimizers, manual optimization: a LeakyReLU generator and a LeakyReLU/Sigmoid discriminator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        act = partial(nn.LeakyReLU, 0.2)
        self.generator = nn.Sequential(nn.Linear(4, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), act(), nn.Linear(16, 1), nn.Sigmoid())

    def training_step(self, batch, batch_idx):
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 4))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_real = self.discriminator(real)  # the discriminator's first call: the one its hooks keep
        d_loss = F.binary_cross_entropy(d_real, ones) + F.binary_cross_entropy(self.discriminator(fake.detach()), zeros)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = F.binary_cross_entropy(self.discriminator(fake), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.SGD(
            self.discriminator.parameters(), 0.1
        )


def classification(n=64, features=8, classes=4):
    torch.manual_seed(0)
    return loader(torch.randn(n, features), torch.randint(0, classes, (n,)))


# ----------------------------------------------------------------------------------------------------- the zoo


def test_demo_transformer_watches_its_blocks(capsys):
    torch.manual_seed(0)
    data = loader(torch.randint(0, 50, (64, 10)), torch.randint(0, 50, (64, 10)))
    blocks = [f"model.transformer.{part}.layers.{i}" for part in ("encoder", "decoder") for i in (0, 1)]
    diag, truth = fit(DemoTransformer(), data, blocks)
    assert [w.name for w in diag.watched] == blocks
    check_against_truth(diag, truth, {})
    assert (
        "[diagnostics] watching model.transformer.encoder.layers.0 (TransformerEncoderLayer)" in capsys.readouterr().err
    )
    groups = {v.subject for v in diag.last_verdicts if v.check == "activation_std_ratio"}
    assert groups == {"model.transformer TransformerEncoderLayer", "model.transformer TransformerDecoderLayer"}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cnn_dead_units_are_counted_per_channel(precision):
    torch.manual_seed(0)
    data = loader(torch.randn(32, 1, 6, 6), torch.randint(0, 10, (32,)))
    diag, truth = fit(CNN(), data, ["features.2"], precision=precision)
    assert [w.name for w in diag.watched] == ["features.2"]
    check_against_truth(diag, truth, {"features.2": 1}, grad_rel=1e-4 if precision == "32-true" else 1e-3)
    assert diag.first_snapshot.layers[0].dead == pytest.approx(3 / 8)  # 3 dead channels, not 0% over the width
    failing = [v for v in diag.last_verdicts if v.check == "dead_units" and not v.ok]
    assert [v.subject for v in failing] == ["features.2"]


def test_lstm_tuple_output_is_measured():
    torch.manual_seed(0)
    data = loader(torch.randn(32, 5, 6), torch.randint(0, 3, (32, 5)))
    diag, truth = fit(LSTMTagger(), data, ["lstm", "head"])
    assert {w.name: w.kind for w in diag.watched} == {"lstm": "LSTM", "head": "Linear"}
    check_against_truth(diag, truth, {"lstm": -1, "head": -1})
    lstm = diag.first_snapshot.layers[0]
    assert lstm.saturation is not None  # an LSTM's output is bounded by tanh


def test_functional_activations_fall_back_to_linear_layers(capsys):
    diag, truth = fit(FunctionalMLP(), classification(), ["fc1", "fc2", "fc3"])
    check_against_truth(diag, truth, {})
    err = capsys.readouterr().err
    assert "watching fc1 (Linear), fc2 (Linear), fc3 (Linear) (3 layers)" in err and "Linear/Conv" in err


def test_clipping_measures_the_clipped_gradient_and_the_real_update():
    diag, truth = fit(FunctionalMLP(), classification(), [], gradient_clip_val=0.05)
    norm = torch.sqrt(sum(g.square().sum() for g in truth.step_grads.values()))
    assert norm > 0.05  # the clipping did something
    clipped = {n: g * (0.05 / (norm + 1e-6)) for n, g in truth.step_grads.items()}
    for p in diag.first_snapshot.params:
        assert p.grad_std == pytest.approx(clipped[p.name].std().item(), rel=1e-4), p.name
        change = (truth.after[p.name] - truth.before[p.name]).std() / truth.before[p.name].std()
        assert p.log10_update_ratio == pytest.approx(math.log10(change.item()), abs=1e-3), p.name


def test_layers_built_in_configure_model():
    diag, truth = fit(BuiltLate(), classification(), ["net.1", "net.3"], diag_kwargs={"layers": ["Tanh"]})
    assert [w.name for w in diag.watched] == ["net.1", "net.3"]
    check_against_truth(diag, truth, {})
    assert {p.name for p in diag.first_snapshot.params} == {
        f"net.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")
    }


def test_two_optimizers_manual_optimization_and_comparable_ratios():
    torch.manual_seed(0)
    data = loader(torch.randn(64, 2) * 0.5 + 2)
    names = ["generator.1", "generator.3", "discriminator.1", "discriminator.3"]
    diag, truth = fit(GAN(), data, names, max_steps=4)
    check_against_truth(diag, truth, {})
    assert {p.name.split(".")[0] for p in diag.first_snapshot.params} == {"generator", "discriminator"}
    ratios = {v.subject for v in diag.last_verdicts if v.check == "activation_std_ratio"}
    assert ratios == {"generator LeakyReLU"}  # never the generator's LeakyReLU against the discriminator's Sigmoid
    reused = [x.name for x in diag.first_snapshot.layers if x.name.startswith("discriminator.1")]
    # called on real, on fake before its step and on fake in the generator's turn: each call a layer of its own
    assert reused == ["discriminator.1", "discriminator.1#2", "discriminator.1#3"]


def test_accumulation_initial_loss_is_the_true_loss():
    torch.manual_seed(0)
    model = FunctionalMLP()
    data = classification()
    x, y = next(iter(data))
    expected = F.cross_entropy(model.fc3(F.relu(model.fc2(F.relu(model.fc1(x))))), y).item()
    diag, truth = fit(model, data, ["fc1"], accumulate_grad_batches=4)
    assert diag.first_snapshot.loss == pytest.approx(expected, rel=1e-5)  # not divided by 4
    check_against_truth(diag, truth, {})


def test_fp16_gradient_scaler_unscales_and_skips():
    """16-mixed with a GradScaler (on the CPU): output gradients divided by the scale; a step the scaler skips
    (inf gradients at a huge scale) records its loss and activations but no update, and no false verdict."""
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    diag, truth = fit(FunctionalMLP(), classification(), ["fc1", "fc2"], plugins=[plugin])
    assert truth.scale == 2.0**8
    check_against_truth(diag, truth, {}, grad_rel=1e-3)

    skipping = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # float16 overflows: the first step is skipped
    model = FunctionalMLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    diag, truth = fit(
        model, classification(), ["fc1"], max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", skipping)]
    )
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # really skipped
    s = diag.first_snapshot
    assert s.params == [] and all(x.grad_std is None for x in s.layers) and s.loss is not None
    assert s.layers[0].std == pytest.approx(truth.out["fc1"].std().item(), rel=1e-4)
    assert all(v.ok for v in diag.last_verdicts if v.check == "nonfinite")


# ------------------------------------------------------------------------------------------ hooks and loggers


class PostHook(L.Callback):
    """Registers an optimizer step post-hook every step (before or after ours) and removes it at batch end."""

    def __init__(self):
        self.calls, self.handles = 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for optimizer in trainer.optimizers:
            self.handles.append(optimizer.register_step_post_hook(lambda *a: setattr(self, "calls", self.calls + 1)))
            self.handles.append(optimizer.register_step_pre_hook(lambda *a: None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for h in self.handles:
            h.remove()
        self.handles = []


def test_other_callbacks_hooks_before_and_after_ours():
    before, after = PostHook(), PostHook()
    diag = TrainingDiagnostics(every_n_steps=1, histograms_every_n_steps=0, figures_every_n_steps=0)
    trainer = L.Trainer(max_steps=3, callbacks=[before, diag, after], logger=False, enable_checkpointing=False)
    trainer.fit(FunctionalMLP(), classification())  # once crashed: OrderedDict mutated during iteration
    assert before.calls == after.calls == 3 and diag.last_snapshot.step == 2


@pytest.mark.slow
def test_csv_logger_gets_the_scalars_and_figures_go_to_png(tmp_path, capsys):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    diag = TrainingDiagnostics(every_n_steps=2, histograms_every_n_steps=2, figures_every_n_steps=2)
    trainer = L.Trainer(max_steps=4, callbacks=[diag], logger=logger, enable_checkpointing=False)
    trainer.fit(BuiltLate(), classification())
    assert diag.wait(60)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    stds = {int(r["step"]): float(r["act/std/net.1"]) for r in rows if r.get("act/std/net.1")}
    assert sorted(stds) == [0, 2] and stds[2] == pytest.approx(diag.last_snapshot.layers[0].std, rel=1e-6)
    pngs = sorted(p.name for p in (tmp_path / "csv" / "version_0" / "diagnostics_figures").glob("*.png"))
    assert pngs == [f"step{s:07d}_{n}.png" for s in (0, 2) for n in FIGURES]
    assert "no TensorBoard logger: scalars go to CSVLogger" in capsys.readouterr().err


FIGURES = ("1_activations", "2_gradients", "3_weight_gradients", "4_update_ratios")


def test_no_logger_says_nothing_is_recorded(capsys):
    diag = TrainingDiagnostics(every_n_steps=2)
    trainer = L.Trainer(max_steps=2, callbacks=[diag], logger=False, enable_checkpointing=False)
    trainer.fit(BuiltLate(), classification())
    assert "no logger (logger=False): nothing is recorded" in capsys.readouterr().err
    assert diag.last_snapshot.step == 0 and diag.wait(5)


# ----------------------------------------------------------------------------------------------- under DDP


class SaveRank(L.Callback):
    """Each rank's step-0 output of features.2 and the gradient with respect to it, and rank 0's snapshot."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and not hasattr(self, "out"):
            module = pl_module.get_submodule("features.2")
            self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        self.handle.remove()
        self.out = output.detach().double().clone()

        def keep(g: torch.Tensor) -> None:
            self.grad = g.detach().double().clone()

        output.register_hook(keep)

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        diag = next(c for c in trainer.callbacks if isinstance(c, FirstSnapshot))
        torch.save({"out": self.out, "grad": self.grad, "snapshot": diag.first_snapshot}, f"{self.path}/{rank}.pt")


@pytest.mark.slow
def test_cnn_under_two_process_ddp_describes_the_global_batch(tmp_path):
    """2-process CPU DDP: the diagnostics on rank 0 describe both ranks' halves of the batch together."""
    torch.manual_seed(0)
    data = loader(torch.randn(64, 1, 6, 6), torch.randint(0, 10, (64,)))
    diag = FirstSnapshot(every_n_steps=1, histograms_every_n_steps=0, figures_every_n_steps=0)
    trainer = L.Trainer(
        max_steps=1,
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        callbacks=[SaveRank(str(tmp_path)), diag],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CNN(), data)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1)]
    out = torch.cat([r["out"] for r in ranks])  # the global batch: each rank's half
    grad = torch.cat([r["grad"] for r in ranks])
    x = ranks[0]["snapshot"].layers[0]
    assert ranks[1]["snapshot"].layers[0] == x  # every rank holds the same (all-reduced) numbers
    assert x.mean == pytest.approx(out.mean().item(), rel=1e-5, abs=1e-7)
    assert x.std == pytest.approx(out.std().item(), rel=1e-5)
    assert x.dead == pytest.approx(dead_fraction(out, 1, False)) == 3 / 8
    assert x.grad_std == pytest.approx(grad.std().item(), rel=1e-4)


# ------------------------------------------------------------------------------- found by trying it as a user


class Shrinking(L.LightningModule):
    """Four Tanh layers whose weights shrink the signal layer by layer: flat attributes, or one Sequential."""

    def __init__(self, flat: bool):
        super().__init__()
        layers = []
        for _ in range(4):
            linear = nn.Linear(16, 16)
            nn.init.normal_(linear.weight, std=0.3 / 4)
            layers += [linear, nn.Tanh()]
        if flat:
            for i, layer in enumerate(layers):
                setattr(self, f"l{i}", layer)
            self.order = [f"l{i}" for i in range(len(layers))]
        else:
            self.net = nn.Sequential(*layers)

    def forward(self, x):
        if hasattr(self, "net"):
            return self.net(x)
        for name in self.order:
            x = getattr(self, name)(x)
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)[:, :4], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("flat", [True, False], ids=["flat-attributes", "one-sequential"])
def test_ratio_verdicts_run_on_flat_and_single_sequential_models(flat):
    torch.manual_seed(0)
    data = loader(torch.randn(64, 16) * 3, torch.randint(0, 4, (64,)))
    diag, _ = fit(Shrinking(flat), data, [], max_steps=1)
    ratio = [v for v in diag.last_verdicts if v.check == "activation_std_ratio"]
    assert len(ratio) == 1 and not ratio[0].ok and "shrink" in ratio[0].message, diag.last_verdicts


def test_unlike_layers_of_a_block_are_not_compared():
    """linear1 (to the feed-forward width) and linear2 (back to the model width) of transformer blocks: each is
    compared with its own kind across blocks, never with the other."""
    torch.manual_seed(0)
    data = loader(torch.randint(0, 50, (64, 10)), torch.randint(0, 50, (64, 10)))
    diag, _ = fit(DemoTransformer(), data, [], max_steps=1, diag_kwargs={"layers": ["*encoder.layers.?.linear?"]})
    assert len(diag.watched) == 4
    subjects = {v.subject for v in diag.last_verdicts if v.check == "activation_std_ratio"}
    assert subjects == {"model.transformer Linear linear1", "model.transformer Linear linear2"}


def test_a_watched_module_never_called_is_said_once(capsys):
    """MultiheadAttention uses its out_proj's weights directly: the module is never called."""
    torch.manual_seed(0)
    data = loader(torch.randint(0, 50, (64, 10)), torch.randint(0, 50, (64, 10)))
    fit(DemoTransformer(), data, [], max_steps=3, diag_kwargs={"layers": ["*.self_attn.out_proj"]})
    err = capsys.readouterr().err
    line = (
        "model.transformer.encoder.layers.0.self_attn.out_proj is watched but not measured (in full): it was not called"
    )
    assert err.count(line) == 1, err


def test_accumulation_measures_the_first_micro_batch_only():
    diag, truth = fit(FunctionalMLP(), classification(), ["fc1", "fc2"], accumulate_grad_batches=3)
    assert [x.name for x in diag.first_snapshot.layers] == ["fc1", "fc2", "fc3"]  # no fc1#2 from micro-batch 2
    check_against_truth(diag, truth, {})


def test_mlflow_gets_the_scalars_and_the_figures_as_artifacts(tmp_path, capsys, monkeypatch):
    """MLflow's local file store (an optional extra: skipped where mlflow is not installed)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="zoo", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    diag = TrainingDiagnostics(every_n_steps=2, histograms_every_n_steps=2, figures_every_n_steps=2)
    trainer = L.Trainer(max_steps=4, callbacks=[diag], logger=logger, enable_checkpointing=False)
    trainer.fit(BuiltLate(), classification())
    assert diag.wait(60)
    client = logger.experiment
    history = client.get_metric_history(logger.run_id, "act/std/net.1")
    assert [m.step for m in history] == [0, 2]
    assert history[-1].value == pytest.approx(diag.last_snapshot.layers[0].std, rel=1e-6)
    listed = sorted(a.path for a in client.list_artifacts(logger.run_id, "diagnostics_figures"))
    assert listed == [f"diagnostics_figures/step{s:07d}_{n}.png" for s in (0, 2) for n in FIGURES]
    assert "no TensorBoard logger: scalars go to MLFlowLogger" in capsys.readouterr().err
