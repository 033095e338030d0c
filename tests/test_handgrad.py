"""Hand gradients (mm_lightning/speed/handgrad.py): a CPU step of the core MLP computed with autograd's ops but no
autograd graph must be bitwise the step autograd computes, run the very ops autograd runs, step aside wherever it
cannot be exact (and say why), and notice by itself when it is not."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from mm_lightning.data import NamesDataModule
from mm_lightning.diagnostics.callback import TrainingDiagnostics
from mm_lightning.lecture import NotebookMLPConfig
from mm_lightning.model import MLP, MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.speed import FastPath, gate, handgrad
from mm_lightning.speed.handgrad import HandGradStep, why_not_hand
from tests.conftest import scalars
from tests.test_fastpath import _same

NET = MLPConfig(n_hidden=16, n_layers=2)


def _fit(names, root, lean: bool, hand: bool = True, steps: int = 130, module_class=MakemoreModule, callbacks=()):
    L.seed_everything(42)
    module = module_class(net=NET, milestones=[60])
    fast = FastPath(lean_loop=lean, hand_gradients=hand)
    diagnostics = TrainingDiagnostics(every_n_steps=20, histograms_every_n_steps=40, figures_every_n_steps=0)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=50, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        max_steps=steps,
        default_root_dir=root,
        callbacks=[fast, diagnostics, checkpoints, *callbacks],
        logger=[TensorBoardLogger(root, name="tb", version=0), CSVLogger(root, name="csv", version=0)],
        log_every_n_steps=10,
        val_check_interval=40,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, NamesDataModule(path=str(names), steps_per_epoch=50))
    hand_step = getattr(trainer.fit_loop.epoch_loop, "lean_hand", None)
    return module, trainer, diagnostics, hand_step


def test_hand_gradients_and_the_plain_loop_are_bitwise_the_same(names_file, tmp_path):
    hand = _fit(names_file, tmp_path / "hand", lean=True)
    plain = _fit(names_file, tmp_path / "plain", lean=False)
    # every step but the diagnostics' sampled ones (hooks watch those: autograd runs them) ran by hand
    assert hand[3] is not None and hand[3].off is None
    sampled = [s for s in range(130) if s % 20 == 0]
    assert hand[3].steps == 130 - len(sampled)
    _same(hand[0].state_dict(), plain[0].state_dict(), "state_dict")  # parameters, BatchNorm buffers
    for tag in ("callback_metrics", "logged_metrics", "progress_bar_metrics"):
        _same(dict(getattr(hand[1], tag)), dict(getattr(plain[1], tag)), tag)
    tb = [scalars(tmp_path / d / "tb" / "version_0") for d in ("hand", "plain")]
    assert tb[0] == tb[1] and [s for s, _ in tb[0]["train/loss"]] == list(range(9, 130, 10))
    rows = [list(csv.reader(open(tmp_path / d / "csv" / "version_0" / "metrics.csv"))) for d in ("hand", "plain")]
    assert rows[0] == rows[1] and len(rows[0]) > 10
    assert hand[2].last_snapshot == plain[2].last_snapshot and hand[2].last_snapshot.step == 120
    assert hand[2].update_history == plain[2].update_history
    files = sorted(p.name for p in (tmp_path / "hand" / "ckpt").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "plain" / "ckpt").iterdir()) and len(files) >= 3
    for name in files:
        a, b = (torch.load(tmp_path / d / "ckpt" / name, weights_only=True) for d in ("hand", "plain"))
        _same(a, b, name, roots=(tmp_path / "hand", tmp_path / "plain"))


class _Ops(TorchDispatchMode):
    """The aten ops run inside the block, with their tensor arguments' shapes and strides (view-only ops left out:
    they move no numbers)."""

    SKIP = {"detach", "t", "view", "empty"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.SKIP:
            flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x])]
            self.ops.append((name, [(tuple(a.shape), a.stride()) for a in flat if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def _hand_step(net) -> HandGradStep:
    module = MakemoreModule(net=NET)
    module.net = net
    return HandGradStep(module, torch.optim.SGD(module.parameters(), lr=0.1))


def test_the_hand_step_runs_the_ops_autograd_runs():
    """The same kernels on the same operands (shapes and memory layouts) are what make the bits the same."""
    torch.manual_seed(0)
    net = MLPConfig(n_hidden=20, n_layers=2).build()
    x, y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
    autograd, hand = _Ops(), _Ops()
    with autograd:
        F.cross_entropy(net(x), y).backward()
    step = _hand_step(net)
    with hand:
        step.loss_and_grads(x, y)
    assert hand.ops == autograd.ops
    ops = [op for op, _ in hand.ops]
    assert ops.count("mm") == 3 * 3 and ops.count("native_batch_norm_backward") == 3  # forward + 2 per Linear


def test_a_new_batch_shape_is_compared_with_autograd_first():
    torch.manual_seed(0)
    net = MLPConfig(n_hidden=20, n_layers=1).build()
    hand = _hand_step(net)
    for rows in (32, 7, 32):
        x, y = torch.randint(0, 27, (rows, 3)), torch.randint(0, 27, (rows,))
        assert hand.ready(x, y)
    assert {key[0] for key in hand.checked} == {(32, 3), (7, 3)}
    assert not hand.ready(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long))  # BatchNorm raises
    with torch.autograd.detect_anomaly():
        assert not hand.ready(x, y)  # anomaly mode checks autograd's backward: autograd runs it


def test_a_difference_from_autograd_turns_hand_gradients_off(names_file, tmp_path, monkeypatch):
    loss_and_grads = HandGradStep.loss_and_grads

    def one_ulp_off(self, x, y):
        loss, grads = loss_and_grads(self, x, y)
        grads[0][0, 0] = torch.nextafter(grads[0][0, 0], torch.tensor(1.0))
        return loss, grads

    monkeypatch.setattr(HandGradStep, "loss_and_grads", one_ulp_off)
    with pytest.warns(UserWarning, match=r"hand gradients differ from autograd's \(embedding.weight's gradient\)"):
        hand = _fit(names_file, tmp_path / "hand", lean=True, steps=30)
    assert hand[3].steps == 0 and "embedding.weight" in hand[3].off
    plain = _fit(names_file, tmp_path / "plain", lean=False, steps=30)
    _same(hand[0].state_dict(), plain[0].state_dict(), "state_dict")


class _CountGradients(L.Callback):
    """A user's tensor hook on a parameter: autograd calls it every step, so every step must run autograd."""

    def __init__(self, kind: str):
        self.kind, self.calls = kind, 0

    def on_fit_start(self, trainer, pl_module):
        def count(*_):
            self.calls += 1

        if self.kind == "hook":
            pl_module.net.embedding.weight.register_hook(count)
        else:
            pl_module.net.layers[0].weight.register_post_accumulate_grad_hook(count)


@pytest.mark.parametrize("kind", ["hook", "post_accumulate_grad_hook"])
def test_tensor_hooks_on_parameters_run_every_step(names_file, tmp_path, kind):
    counter = _CountGradients(kind)
    _, _, _, hand = _fit(names_file, tmp_path, lean=True, steps=30, callbacks=[counter])
    assert counter.calls == 30 and hand.steps == 0


@pytest.mark.parametrize(
    "net, why",
    [
        (NotebookMLPConfig(n_layers=1, bn_style="lecture"), "the layers are not torch's Linear / BatchNorm1d / Tanh"),
        (MLPConfig(n_layers=1, batchnorm=False), "the MLP has Linear biases"),
        (MLPConfig(n_layers=1, output_batchnorm=False), "the MLP has Linear biases"),
    ],
    ids=["notebook-batchnorm", "no-batchnorm", "no-output-batchnorm"],
)
def test_hand_gradients_step_aside_for_other_networks(net, why):
    built = net.build()
    params = list(built.parameters())
    assert why in why_not_hand(built, params, params)


def test_hand_gradients_step_aside_for_frozen_or_foreign_parameters():
    net = MLPConfig(n_layers=1).build()
    params = list(net.parameters())
    assert why_not_hand(net, params, params) is None
    extra = torch.nn.Parameter(torch.zeros(3))
    assert "parameters other than the net's" in why_not_hand(net, params, [*params, extra])
    assert "parameters other than the net's" in why_not_hand(net, [*params, extra], params)
    net.embedding.weight.requires_grad_(False)
    assert "frozen" in why_not_hand(net, params, params)


class _AdamWModule(MakemoreModule):
    """A user's own optimizer: the declared training step is unchanged, so hand gradients still serve it."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


def test_any_optimizer_steps_on_hand_gradients_bitwise(names_file, tmp_path):
    hand = _fit(names_file, tmp_path / "hand", lean=True, steps=40, module_class=_AdamWModule)
    plain = _fit(names_file, tmp_path / "plain", lean=False, steps=40, module_class=_AdamWModule)
    assert hand[3].steps == 40 - 2  # steps 0 and 20 sampled by the diagnostics
    _same(hand[0].state_dict(), plain[0].state_dict(), "state_dict")
    _same(hand[1].optimizers[0].state_dict(), plain[1].optimizers[0].state_dict(), "AdamW state")


@pytest.mark.parametrize("path", handgrad.MIRRORED, ids=[p.partition(":")[2] for p in handgrad.MIRRORED])
def test_the_code_the_hand_step_mirrors_is_unchanged(path):
    name = path.partition(":")[2]
    expected = handgrad.TORCH_VERIFIED.get(torch.__version__.split("+")[0], {}).get(name)
    assert gate.fingerprint(gate.resolve(path)) == expected, f"{name} changed: re-check handgrad.py against it"


def test_the_mlp_forward_the_hand_step_mirrors_is_unchanged(monkeypatch):
    assert gate.fingerprint(MLP.forward) == handgrad.MLP_FORWARD, "MLP.forward changed: re-check handgrad.py"
    monkeypatch.setattr(MLP, "forward", lambda self, idx: self.layers(self.embedding(idx).flatten(1)))
    assert handgrad.why_not_verified().startswith("MLP.forward is not the code the hand step mirrors")


def test_another_torch_or_changed_code_runs_autograd_and_says_so(names_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert handgrad.why_not_verified() == "torch 2.99.0 is not a version the hand step was verified against (2.13.0)"
    monkeypatch.undo()
    original = torch.nn.BatchNorm1d.forward
    monkeypatch.setattr(torch.nn.modules.batchnorm._BatchNorm, "forward", lambda self, x: original(self, x))
    assert handgrad.why_not_verified().startswith("torch's _BatchNorm.forward is not the code the hand step was")
    with caplog.at_level("INFO"):
        changed = _fit(names_file, tmp_path / "changed", lean=True, steps=30)
    assert changed[3] is None
    assert "autograd steps: torch's _BatchNorm.forward is not the code the hand step was verified" in caplog.text
    monkeypatch.undo()
    plain = _fit(names_file, tmp_path / "plain", lean=False, steps=30)
    _same(changed[0].state_dict(), plain[0].state_dict(), "state_dict")


# ------------------------------------------------------------------ what changes mid-fit, or is not the core MLP


class _Double(torch.nn.Module):
    def forward(self, weight):
        return weight * 1.0


def _patch_forward(net, calls):
    layer = net.layers[2]
    original = layer.forward

    def counted(x):
        calls.append(1)
        return original(x)

    layer.forward = counted


CHANGES = {
    "freeze-embedding": lambda net, calls: net.embedding.weight.requires_grad_(False),
    "momentum-none": lambda net, calls: setattr(net.layers[1], "momentum", None),  # as SWA's BatchNorm epoch does
    "no-running-stats": lambda net, calls: setattr(net.layers[4], "track_running_stats", False),
    "parametrize": lambda net, calls: torch.nn.utils.parametrize.register_parametrization(
        net.layers[0], "weight", _Double()
    ),
    "patch-forward": _patch_forward,
    "eval-mode": lambda net, calls: net.layers[1].eval(),
}


class _ChangeAt(L.Callback):
    """A callback that changes the net at one step, as a user's might (or Lightning's StochasticWeightAveraging)."""

    def __init__(self, change, step: int = 12):
        self.change, self.step, self.calls = change, step, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.change(pl_module.net, self.calls)


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_a_change_mid_fit_is_honoured_bitwise(names_file, tmp_path, change):
    hand_change, plain_change = _ChangeAt(CHANGES[change]), _ChangeAt(CHANGES[change])
    hand = _fit(names_file, tmp_path / "hand", lean=True, steps=30, callbacks=[hand_change])
    plain = _fit(names_file, tmp_path / "plain", lean=False, steps=30, callbacks=[plain_change])
    assert 0 < hand[3].steps <= 12  # by hand until the change (steps 0 and 20 sampled), autograd after it
    _same(hand[0].state_dict(), plain[0].state_dict(), "state_dict")
    assert hand_change.calls == plain_change.calls  # a patched forward runs every step on both


def test_nets_that_are_not_the_core_mlp_step_aside():
    net = MLPConfig(n_layers=2, n_embd=10, block_size=10, n_hidden=100).build()
    net.layers[3].weight = net.layers[0].weight  # tied (100 x 100 each)
    params = list(net.parameters())
    assert "tied, or one more" in why_not_hand(net, params, params)
    net = MLPConfig(n_layers=1).build()
    net.temperature = torch.nn.Parameter(torch.ones(()))  # one more parameter, listed first
    params = list(net.parameters())
    assert "tied, or one more" in why_not_hand(net, params, params)
    net = MLPConfig(n_layers=1).build()
    net.layers[0].forward = lambda x: x
    assert "forward is replaced on the instance" in why_not_hand(net, list(net.parameters()), list(net.parameters()))


class _OwnForward(MakemoreModule):
    def training_forward(self, idx):
        return super().training_forward(idx) * 0.5


class _OwnTracking(MakemoreModule):
    def track_train_loss(self, loss):
        super().track_train_loss(loss)


def test_a_module_overriding_what_its_declared_step_calls_steps_aside():
    from mm_lightning.speed.graphed import why_not_graphable

    assert why_not_graphable(_OwnForward(net=NET)) == (
        "_OwnForward overrides training_forward (the declared step would not run its code)"
    )
    assert why_not_graphable(_OwnTracking(net=NET)) == (
        "_OwnTracking overrides track_train_loss (the declared step would not run its code)"
    )


def test_lightnings_accumulation_and_swa_callbacks_run_as_on_lightnings_loop(names_file, tmp_path):
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging

    def fit(root, lean, callback):
        L.seed_everything(0)
        module = MakemoreModule(net=NET)
        trainer = L.Trainer(
            max_epochs=4,
            callbacks=[FastPath(lean_loop=lean), callback()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
        return module, trainer

    names = NamesDataModule(path=str(names_file))  # SWA takes a map-style dataset: 12 batches of the names
    names.setup()
    x, y = (t[:384] for t in names.splits["train"].tensors())

    callbacks = {
        "accumulation": lambda: GradientAccumulationScheduler({0: 1, 2: 2}),
        "swa": lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1),
    }
    for name, callback in callbacks.items():
        lean, plain = fit(tmp_path / f"{name}-lean", True, callback), fit(tmp_path / f"{name}-plain", False, callback)
        assert lean[1].global_step == plain[1].global_step, name
        assert name != "accumulation" or plain[1].global_step == 2 * 12 + 2 * 6  # it did accumulate
        _same(lean[0].state_dict(), plain[0].state_dict(), name)
