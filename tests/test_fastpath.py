"""The speed add-on (mm_lightning/speed): the lean loop is chosen by itself when it can honour the run exactly, one
line says which path runs and why, and it gives bitwise the same results as Lightning's own loop: parameters, BatchNorm
buffers, every logged metric (a user's own included, in TensorBoard and CSV), what callbacks' per-step hooks see,
diagnostics, checkpoints; a checkpoint written by one path resumes exactly on the other."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mm_lightning.data import NamesDataModule
from mm_lightning.diagnostics.callback import TrainingDiagnostics
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.speed import FastPath
from tests.conftest import run_cli, scalars
from tests.test_reliability import _fit, _last, _same_state

NET = MLPConfig(n_hidden=16, n_layers=2)


class UserModule(MakemoreModule):
    """What someone adapting the template adds first: metrics of their own."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("user/loss_x2", loss * 2)
        self.log("user/batch_idx", float(batch_idx), on_step=True)  # a plain number, not a tensor
        return loss


class HookRecorder(Callback):
    """Records what per-step hooks see: they must be called, in order, on both paths alike."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("batch_start", trainer.global_step, batch_idx))

    def on_before_backward(self, trainer, pl_module, loss):
        self.seen.append(("before_backward", trainer.global_step, loss.item()))

    def on_after_backward(self, trainer, pl_module):
        norm = torch.stack([p.grad.norm() for p in pl_module.parameters() if p.grad is not None]).norm()
        self.seen.append(("after_backward", trainer.global_step, norm.item()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(("before_step", trainer.global_step, optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(("batch_end", trainer.global_step, outputs["loss"].item()))


def _python_fit(names, root, lean: bool, hooks: bool, steps: int = 130):
    L.seed_everything(42)
    module = UserModule(net=NET, milestones=[60])
    fast = FastPath(lean_loop=lean)
    diagnostics = TrainingDiagnostics(every_n_steps=20, histograms_every_n_steps=40, figures_every_n_steps=0)
    recorder = HookRecorder()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=50, save_top_k=-1, save_last=True)
    callbacks = [fast, diagnostics, checkpoints] + ([recorder] if hooks else [])
    loggers = [TensorBoardLogger(root, name="tb", version=0), CSVLogger(root, name="csv", version=0)]
    trainer = L.Trainer(
        max_steps=steps,
        default_root_dir=root,
        callbacks=callbacks,
        logger=loggers,
        log_every_n_steps=10,
        val_check_interval=40,  # optimizer steps
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, NamesDataModule(path=str(names), steps_per_epoch=50))
    return module, trainer, fast, diagnostics, recorder


def _same(a, b, where="", roots=("", "")):
    """Recursive equality, tensors bitwise; paths compared relative to each run's root."""
    assert type(a) is type(b), where
    if isinstance(a, str):
        a, b = a.replace(str(roots[0]), "<root>"), b.replace(str(roots[1]), "<root>")
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}", roots)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", roots)
    else:
        assert a == b, where


@pytest.mark.parametrize("hooks", [False, True], ids=["nothing-per-step", "callbacks-with-step-hooks"])
def test_lean_and_plain_loops_are_bitwise_the_same(names_file, tmp_path, hooks):
    lean = _python_fit(names_file, tmp_path / "lean", lean=True, hooks=hooks)
    plain = _python_fit(names_file, tmp_path / "plain", lean=False, hooks=hooks)
    assert lean[2].path == "lean" and plain[2].path == "plain"
    _same(lean[0].state_dict(), plain[0].state_dict(), "state_dict")  # parameters, BatchNorm buffers
    for tag, a, b in [(t, lean[1], plain[1]) for t in ("callback_metrics", "logged_metrics", "progress_bar_metrics")]:
        _same(dict(getattr(a, tag)), dict(getattr(b, tag)), tag)
    tb = [scalars(tmp_path / d / "tb" / "version_0") for d in ("lean", "plain")]
    assert tb[0] == tb[1]
    assert [s for s, _ in tb[0]["user/loss_x2"]] == list(range(9, 130, 10))  # on the optimizer-step axis
    assert [s for s, _ in tb[0]["val/loss"]] == [40, 80, 120]
    rows = [list(csv.reader(open(tmp_path / d / "csv" / "version_0" / "metrics.csv"))) for d in ("lean", "plain")]
    assert rows[0] == rows[1] and len(rows[0]) > 10
    assert lean[3].last_snapshot == plain[3].last_snapshot and lean[3].last_snapshot.step == 120
    assert lean[3].update_history == plain[3].update_history
    if hooks:
        assert lean[4].seen == plain[4].seen and len(lean[4].seen) == 5 * 130
    files = sorted(p.name for p in (tmp_path / "lean" / "ckpt").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "plain" / "ckpt").iterdir()) and len(files) >= 3
    for name in files:
        a, b = (torch.load(tmp_path / d / "ckpt" / name, weights_only=True) for d in ("lean", "plain"))
        _same(a, b, name, roots=(tmp_path / "lean", tmp_path / "plain"))


@pytest.mark.parametrize(
    "first, second", [("true", "false"), ("false", "true")], ids=["lean-then-plain", "plain-then-lean"]
)
def test_a_checkpoint_of_one_path_resumes_exactly_on_the_other(project, monkeypatch, first, second):
    monkeypatch.chdir(project)
    assert _fit("whole", 260, "--data.steps_per_epoch", "100", "--model.milestones", "[150]") == 0
    assert (
        _fit(
            "split", 130, "--data.steps_per_epoch", "100", "--model.milestones", "[150]", "--fast_path.lean_loop", first
        )
        == 0
    )
    assert _fit("split", 260, "--ckpt_path", "last", "--fast_path.lean_loop", second) == 0
    _same_state(_last("whole"), _last("split"))
    whole, split = (scalars(project / d / "lightning_logs" / "version_0") for d in ("whole", "split"))
    for tag in (
        "train/loss",
        "train/lr",
        "layers/net.layers.2:1 activations/std",
        "reference 1e-3:4 updates/log10 update:data",
    ):
        assert split[tag] == whole[tag], tag  # the same points at the same steps
    assert [p for p in split["val/loss"] if p[0] != 130] == whole["val/loss"]  # + the first part's last validation


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "training path: fast (lean loop"),
        (["--trainer.accumulate_grad_batches", "2"], "plain Lightning loop, because accumulate_grad_batches=2"),
        (["--trainer.precision", "bf16-mixed"], "plain Lightning loop, because precision bf16-mixed"),
        (
            ["--fast_path.lean_loop", "false"],
            "plain Lightning loop, because lean_loop=False (--fast_path.lean_loop false)",
        ),
        (["--trainer.profiler", "simple"], "plain Lightning loop, because a profiler is attached"),
    ],
    ids=["default", "accumulation", "bf16", "switched-off", "profiler"],
)
def test_one_line_says_which_path_runs_and_why(project, extra, expected):
    proc = run_cli(
        ["fit", "--trainer.max_steps", "20", "--model.net.n_layers", "1", "--diagnostics.every_n_steps", "0", *extra],
        project,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "training path:" in line]
    assert len(lines) == 1 and expected in lines[0], lines
