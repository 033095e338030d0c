"""The speed add-on (mm_lightning/speed): the lean loop is chosen by itself when it can honour the run exactly, one
line says which path runs and why, and it gives bitwise the same results as Lightning's own loop: parameters, BatchNorm
buffers, every logged metric (a user's own included, in TensorBoard and CSV), what callbacks' per-step hooks see,
diagnostics, checkpoints; a checkpoint written by one path resumes exactly on the other."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
from tests.conftest import SMALL, flat_tag, run_cli, scalars
from tests.test_reliability import _fit, _last, _same_state

NET = MLPConfig(n_hidden=16, n_layers=2)
REPO = Path(__file__).resolve().parent.parent


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
@pytest.mark.slow
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
        flat_tag("act/std/net.layers.2"),
        flat_tag("update/log10_ratio/net.layers.0.weight"),
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
        ([], "per-step overhead, hand gradients (autograd's ops without its graph, docs/speed.md))"),
        (["--fast_path.hand_gradients", "false"], "autograd steps: hand_gradients=False)"),
        (["--trainer.gradient_clip_val", "1.0"], "autograd steps: something runs inside each step (gradient clipping)"),
        (["--model.net.batchnorm", "false"], "autograd steps: the MLP has Linear biases"),
    ],
    ids=["default", "accumulation", "bf16", "switched-off", "profiler", "hand", "hand-off", "clipping", "biases"],
)
@pytest.mark.slow
def test_one_line_says_which_path_runs_and_why(project, extra, expected):
    proc = run_cli(
        ["fit", "--trainer.max_steps", "20", "--model.net.n_layers", "1", "--diagnostics.every_n_steps", "0", *extra],
        project,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "training path:" in line]
    assert len(lines) == 1 and expected in lines[0], lines


# ------------------------------------------------------------------------ the gate: a simulated other Lightning


def _small_fit(names, root, lean: bool = True, steps: int = 40):
    L.seed_everything(42)
    module = MakemoreModule(net=NET, milestones=[20])
    fast = FastPath(lean_loop=lean)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[fast],
        logger=TensorBoardLogger(root, name="tb", version=0),
        log_every_n_steps=10,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, NamesDataModule(path=str(names), steps_per_epoch=50))
    return module, fast


def _another_version(monkeypatch):
    import lightning

    monkeypatch.setattr(lightning, "__version__", "2.99.0")
    return "Lightning 2.99.0 is not a version the lean loop was verified against"


def _a_renamed_private_name(monkeypatch):
    import lightning.pytorch.loops.training_epoch_loop as loops

    monkeypatch.delattr(loops, "_TrainingEpochLoop")
    monkeypatch.delitem(sys.modules, "mm_lightning.speed.private", raising=False)  # imported afresh
    return "a private Lightning name it uses is missing"


def _a_changed_function(monkeypatch):
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization

    original = _AutomaticOptimization.run

    def run(self, optimizer, batch_idx, kwargs):
        return original(self, optimizer, batch_idx, kwargs)

    monkeypatch.setattr(_AutomaticOptimization, "run", run)
    return "Lightning's _AutomaticOptimization.run is not the code the lean loop was verified against"


ADVANCES = []


def _a_patched_advance(monkeypatch):
    """A Lightning whose `advance` does more per batch: the lean loop would skip it, so it must not run."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    original = _TrainingEpochLoop.advance

    def advance(self, data_fetcher):
        ADVANCES.append(1)
        return original(self, data_fetcher)

    monkeypatch.setattr(_TrainingEpochLoop, "advance", advance)
    ADVANCES.clear()
    return "Lightning's _TrainingEpochLoop.advance is not the code the lean loop was verified against"


@pytest.mark.slow
@pytest.mark.parametrize(
    "simulate",
    [_another_version, _a_renamed_private_name, _a_changed_function, _a_patched_advance],
    ids=["another-version", "renamed-private-name", "changed-fingerprint", "patched-advance"],
)
def test_another_lightning_trains_on_its_own_loop_with_the_same_results(names_file, tmp_path, monkeypatch, simulate):
    plain, _ = _small_fit(names_file, tmp_path / "plain", lean=False)
    expected = simulate(monkeypatch)
    other, fast = _small_fit(names_file, tmp_path / "other")
    assert fast.path == "plain" and fast.why.startswith(expected), fast.why
    _same(other.state_dict(), plain.state_dict(), "state_dict")
    assert scalars(tmp_path / "other" / "tb" / "version_0") == scalars(tmp_path / "plain" / "tb" / "version_0")
    if simulate is _a_patched_advance:
        assert len(ADVANCES) == 40  # Lightning's own advance ran every batch, with what it does more


@pytest.mark.slow
def test_another_lightning_through_the_cli_says_why_in_one_line(project, monkeypatch, caplog):
    monkeypatch.chdir(project)
    expected = _another_version(monkeypatch)
    with caplog.at_level("INFO"):
        assert _fit("other", 60, "--data.steps_per_epoch", "30") == 0
    lines = [r.getMessage() for r in caplog.records if "training path:" in r.getMessage()]
    assert lines == [f"training path: plain Lightning loop, because {expected} (2.6.6)"], lines
    monkeypatch.undo()
    monkeypatch.chdir(project)
    assert _fit("plain", 60, "--data.steps_per_epoch", "30", "--fast_path.lean_loop", "false") == 0
    _same_state(_last("other"), _last("plain"))


class Declared(MakemoreModule):
    """A subclass with its own training_step that declares it graphable again (what a user opts into)."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)

    graphable_training_step = training_step


def test_a_graph_replaces_only_a_training_step_the_module_declares():
    from mm_lightning.speed.graphed import why_not_graphable

    assert why_not_graphable(MakemoreModule(net=NET)) is None
    assert why_not_graphable(UserModule(net=NET)) == (
        "UserModule.training_step is not the one it declares graphable (the declared step would not run its code)"
    )
    assert why_not_graphable(Declared(net=NET)) is None
    assert why_not_graphable(L.LightningModule()) == "LightningModule declares no graphable_training_step"


# ------------------------------------------------------------------------------------ a tree without the add-on

SPEED_IMPORTED = (
    "import sys; from mm_lightning.cli import main; rc = main(sys.argv[1:]); "
    "print('speed imported:', any(m.split('.')[:2] == ['mm_lightning', 'speed'] for m in sys.modules)); "
    "sys.exit(rc)"
)


# `pip install -e .` puts a finder on sys.meta_path that maps mm_lightning to the checkout it was installed from:
# it would find that checkout's mm_lightning.speed for a tree on PYTHONPATH that has none. A user who deletes the
# folder deletes it where that finder looks; the copied tree below is only like that without the finder.
WITHOUT_EDITABLE_FINDER = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in (getattr(f, '__module__', None) or '') "
    "+ type(f).__module__]; "
    "module = sys.argv[1]; sys.argv = [module, *sys.argv[2:]]; runpy.run_module(module, run_name='__main__')"
)


def _python(args: list[str], cwd, pythonpath) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONUNBUFFERED": "1"}
    env.pop("MM_LIGHTNING_RUN_VERSION", None)
    if args[0] == "-m":  # python -m MODULE ARGS, with only PYTHONPATH and site-packages to import from
        args = ["-c", WITHOUT_EDITABLE_FINDER, *args[1:]]
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_every_command_works_with_the_speed_add_on_deleted(project, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "mm_lightning", tree / "mm_lightning", ignore=shutil.ignore_patterns("speed", "__pycache__"))
    assert not (tree / "mm_lightning" / "speed").exists()
    cli = ["-m", "mm_lightning.cli"]
    assert _python([*cli, "--help"], project, tree).returncode == 0
    assert _python([*cli, "fit", "--help"], project, tree).returncode == 0
    done = _python([*cli, "download", "--path", "data/names.txt"], project, tree)
    assert done.returncode == 0 and "already exists" in done.stdout
    args = ["fit", "--trainer.max_steps", "30", *SMALL, "--diagnostics.every_n_steps", "0"]
    fit = _python([*cli, *args, "--data.steps_per_epoch", "30"], project, tree)
    assert fit.returncode == 0, fit.stderr[-2000:]
    lines = [line for line in (fit.stdout + fit.stderr).splitlines() if "training path:" in line]
    assert lines == [
        "training path: plain Lightning loop, because the speed add-on mm_lightning.speed does not import "
        "(ModuleNotFoundError: No module named 'mm_lightning.speed')"
    ], lines
    sample = _python([*cli, "sample", "-n", "3"], project, tree)
    assert sample.returncode == 0 and len(sample.stdout.split()) == 3, sample.stderr[-2000:]
    assert _python([*cli, "validate", "--ckpt_path", "last"], project, tree).returncode == 0


@pytest.mark.slow
def test_only_fit_imports_the_speed_add_on(project):
    """With the add-on present: sample, download and validate never import it (its private names least of all)."""
    fit = _python(["-c", SPEED_IMPORTED, "fit", "--trainer.max_steps", "20", *SMALL], project, REPO)
    assert fit.returncode == 0 and "speed imported: True" in fit.stdout, fit.stderr[-2000:]
    for args in (["sample", "-n", "2"], ["download", "--path", "data/names.txt"], ["validate", "--ckpt_path", "last"]):
        proc = _python(["-c", SPEED_IMPORTED, *args], project, REPO)
        assert proc.returncode == 0 and "speed imported: False" in proc.stdout, (args, proc.stderr[-2000:])


# ------------------------------------------------------------------------------------ the plain path's levers


def test_training_step_neither_waits_for_the_device_nor_logs_between_logger_writes(monkeypatch):
    """train/loss: the mean of the interval's losses, logged once, where the logger writes; no loss.item()."""
    from types import SimpleNamespace

    module = MakemoreModule(net=MLPConfig(n_hidden=8, n_layers=1))
    trainer = SimpleNamespace(log_every_n_steps=4, global_step=0, should_stop=False, fast_dev_run=False)
    monkeypatch.setattr(MakemoreModule, "trainer", property(lambda self: trainer))
    monkeypatch.setattr(MakemoreModule, "global_step", property(lambda self: trainer.global_step))
    logged = []
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.append((trainer.global_step, name, value)))

    def no_sync(self):
        raise AssertionError("a host sync in training_step")

    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(10):
        batch = torch.randint(0, 27, (16, 3), generator=g), torch.randint(0, 27, (16,), generator=g)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_sync)
            losses.append(module.training_step(batch, step).detach())
        trainer.global_step = step + 1  # the optimizer stepped
        module.on_train_batch_end({"loss": losses[-1]}, batch, step)
    assert [(s, n) for s, n, _ in logged] == [(4, "train/loss"), (8, "train/loss")]
    for (_, _, value), first in zip(logged, (0, 4)):
        total = losses[first]
        for loss in losses[first + 1 : first + 4]:
            total = total + loss
        assert torch.equal(value, total / 4)


class ValidationSteps(Callback):
    """The optimizer step of every validation run, and the steps a plateau scheduler stepped at."""

    def __init__(self):
        self.validated, self.lrs = [], []

    def on_validation_start(self, trainer, pl_module):
        self.validated.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class PlateauModule(MakemoreModule):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, threshold=1.0)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau, "monitor": "train/loss", "interval": "step", "frequency": 7},
        }


VALIDATION_SCHEDULES = {  # Trainer arguments: when Lightning validates (the lean loop skips its check elsewhere)
    "every-epoch": dict(),
    "every-2nd-epoch": dict(check_val_every_n_epoch=2),
    "every-13-steps": dict(val_check_interval=13, check_val_every_n_epoch=None),
    "none": dict(limit_val_batches=0),
    "plateau-scheduler": dict(),
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", VALIDATION_SCHEDULES)
def test_the_lean_loop_validates_and_steps_schedulers_where_lightning_does(names_file, tmp_path, schedule):
    runs = []
    for lean in (True, False):
        L.seed_everything(5)
        module = (PlateauModule if schedule == "plateau-scheduler" else MakemoreModule)(net=NET, milestones=[30])
        seen, fast = ValidationSteps(), FastPath(lean_loop=lean)
        trainer = L.Trainer(
            max_steps=70,
            default_root_dir=tmp_path / str(lean),
            callbacks=[fast, seen],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=5,
            num_sanity_val_steps=0,
            **VALIDATION_SCHEDULES[schedule],
        )
        trainer.fit(module, NamesDataModule(path=str(names_file), steps_per_epoch=20))
        assert fast.path == ("lean" if lean else "plain")
        runs.append((seen.validated, seen.lrs, module.state_dict()))
    (validated, lrs, state), (validated_plain, lrs_plain, state_plain) = runs
    assert validated == validated_plain and lrs == lrs_plain
    _same(state, state_plain, "state_dict")
    expected = {"every-epoch": [20, 40, 60, 70], "every-2nd-epoch": [40, 70], "none": []}
    if schedule in expected:
        assert validated == expected[schedule]
    if schedule == "every-13-steps":
        assert validated == [13, 26, 39, 52, 65]
    if schedule == "plateau-scheduler":
        assert len(set(lrs)) > 1  # it did step
