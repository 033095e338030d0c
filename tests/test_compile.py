"""--model.compile: training steps through torch.compile(net), checkpoints with the uncompiled names (a run resumes
with or without it), the diagnostics' sampled steps run eagerly (no graph break, no recompile caused by their
hooks) and measure what the eager run measures, to float rounding."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from torch._dynamo.utils import counters

from mm_lightning import compat
from mm_lightning.data import NamesDataModule
from mm_lightning.diagnostics.callback import TrainingDiagnostics
from mm_lightning.errors import UsageError
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.speed import FastPath
from tests.conftest import ROOT, SMALL, run_cli

NET = MLPConfig(n_hidden=16, n_layers=2)


# ------------------------------------------------------------------------------------------------------ fast


def test_checkpoint_names_and_hyperparameters_are_the_uncompiled_ones():
    compiled, eager = MakemoreModule(net=NET, compile=True), MakemoreModule(net=NET)
    assert compiled.compiled_net is not None and eager.compiled_net is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod.* twin names
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert dict(compiled.hparams) == dict(eager.hparams)  # compile is not part of a checkpoint


def test_a_bad_compile_mode_is_one_line():
    with pytest.raises(UsageError, match="compile_mode must be one of default, reduce-overhead"):
        MakemoreModule(net=NET, compile=True, compile_mode="fastest")
    without = "compile_mode max-autotune has no effect without --model.compile true: add that"
    with pytest.raises(UsageError, match=without):
        MakemoreModule(net=NET, compile_mode="max-autotune")  # would silently train uncompiled


class _Spy:
    """Stands in for the compiled network: records that it ran, and runs the eager one."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x):
        self.calls += 1
        return self.net(x)


def test_a_hooked_network_runs_eagerly_and_an_unhooked_one_compiled():
    module = MakemoreModule(net=NET, compile=True)
    spy = module.__dict__["compiled_net"] = _Spy(module.net)
    x = torch.randint(0, 27, (8, 3))
    module.training_forward(x)
    assert spy.calls == 1
    seen = []
    handle = module.net.layers[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # a Tanh
    module.training_forward(x)
    assert spy.calls == 1 and seen == [(8, 16)]  # the eager network ran, and its hook saw it
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)  # global: every module
    try:
        assert compat.modules_are_hooked(list(module.net.modules()))
        module.training_forward(x)
        assert spy.calls == 1
    finally:
        handle.remove()
    module.training_forward(x)
    assert spy.calls == 2


class _BackwardRecorder(Callback):
    def __init__(self):
        self.seen = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.seen.append(("before", trainer.global_step, pl_module._current_fx_name))

    def on_after_backward(self, trainer, pl_module):
        grads = all(p.grad is not None for p in pl_module.parameters())
        self.seen.append(("after", trainer.global_step, pl_module._current_fx_name, grads))


def test_the_lean_loop_calls_the_backward_hooks_itself(names_file, tmp_path, monkeypatch):
    """The speed of the default fit: the diagnostics override on_before_backward, which used to send every step
    through Lightning's Strategy.backward (two passes over every callback, in profiler scopes: ~0.1 ms of the
    0.2 ms by which fit trailed the lecture loop). The lean loop calls the same hooks, in the same order, itself."""
    through_lightning = []
    original = Strategy.backward

    class CountLightningsBackward(Callback):  # patched once training starts: the speed gate fingerprints it first
        def on_train_start(self, trainer, pl_module):
            monkeypatch.setattr(Strategy, "backward", lambda *a, **k: through_lightning.append(1) or original(*a, **k))

    fast, recorder = FastPath(cpu_threads=1), _BackwardRecorder()
    trainer = L.Trainer(
        max_steps=3,
        default_root_dir=tmp_path,
        callbacks=[
            fast,
            TrainingDiagnostics(every_n_steps=2, figures_every_n_steps=0, verbose=False),
            recorder,
            CountLightningsBackward(),
        ],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MakemoreModule(net=NET), NamesDataModule(path=str(names_file), steps_per_epoch=3))
    assert fast.path == "lean" and through_lightning == []
    expected = [[("before", s, "on_before_backward"), ("after", s, "on_after_backward", True)] for s in range(3)]
    assert recorder.seen == [event for step in expected for event in step]


# ------------------------------------------------------------------------------------------------------ slow


def _fit(names, root, compile: bool, lean: bool = True, steps: int = 60, every: int = 20):
    """A Python fit of the small net; returns the module, the diagnostics and dynamo's counters for this fit."""
    torch._dynamo.reset()
    counters.clear()
    L.seed_everything(42)
    module = MakemoreModule(net=NET, milestones=[steps // 2], compile=compile)
    diagnostics = TrainingDiagnostics(
        every_n_steps=every, histograms_every_n_steps=every, figures_every_n_steps=0, stats_in_worker=False
    )
    trainer = L.Trainer(
        max_steps=steps,
        default_root_dir=root,
        callbacks=[FastPath(lean_loop=lean, cpu_threads=1), diagnostics],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, NamesDataModule(path=str(names), steps_per_epoch=steps))
    seen = {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}
    seen["frames"] = counters["frames"]["ok"]
    return module, diagnostics, seen


def _close(a, b, where="", rel=1e-4, abs_=1e-6):
    """Recursive equality of plain values, floats to float32 rounding (relative), histogram counts within one."""
    if dataclasses.is_dataclass(a):
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}", rel, abs_)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", rel, abs_)
    elif isinstance(a, float):
        counts = ".counts" in where  # a value on a bin edge may land in the next bin
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1.0 if counts else abs_), f"{where}: {a} vs {b}"
    else:
        assert a == b, where


@pytest.mark.slow
def test_diagnostics_on_a_compiled_net_cause_no_recompile_and_measure_the_eager_numbers(names_file, tmp_path):
    compiled, diagnostics, seen = _fit(names_file, tmp_path / "c", compile=True)
    _, _, bare = _fit(names_file, tmp_path / "bare", compile=True, every=0)
    eager, eager_diagnostics, _ = _fit(names_file, tmp_path / "e", compile=False)
    # one graph for every training step, with the diagnostics' hooks coming and going every 20 steps or not at all
    assert seen == bare == {"graphs": 1, "breaks": 0, "frames": 1}
    assert diagnostics.last_snapshot.step == 40 and eager_diagnostics.last_snapshot.step == 40
    _close(diagnostics.last_snapshot, eager_diagnostics.last_snapshot)
    _close(diagnostics.update_history, eager_diagnostics.update_history, rel=1e-3)  # log10 of a small difference
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("lean", [True, False], ids=["lean-loop", "plain-loop"])
def test_compiled_training_agrees_with_eager_over_hundreds_of_steps(names_file, tmp_path, lean):
    compiled, _, seen = _fit(names_file, tmp_path / "c", compile=True, lean=lean, steps=300, every=100)
    eager, _, _ = _fit(names_file, tmp_path / "e", compile=False, lean=lean, steps=300, every=100)
    assert seen["graphs"] == 1 and seen["breaks"] == 0
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name
    assert not torch.equal(compiled.net.layers[0].weight, eager.net.layers[0].weight)  # it really ran compiled
    hand = compiled.trainer.fit_loop.epoch_loop.lean_hand if lean else None
    if lean:  # on a CPU the lean loop compiles the hand step (forward and backward): all but the 3 sampled steps
        assert hand.compile_mode == "default" and hand.off is None and hand.steps == 297


@pytest.mark.slow
def test_a_compiled_run_resumes_uncompiled_and_the_reverse_and_evaluates(project):
    """Two runs of 40 steps, each switching at step 20: compiled then eager, eager then compiled. Their checkpoints
    hold the same names and agree to float rounding; validate, test and sample work on a compiled run."""
    args = ["--trainer.max_steps", "20", "--data.steps_per_epoch", "20", "--trainer.limit_val_batches", "2", *SMALL]
    args += ["--diagnostics.every_n_steps", "10", "--diagnostics.figures_every_n_steps", "0"]
    more = ["--trainer.max_steps", "40"]
    said = "torch.compile (mode default): training steps run compiled"
    fits = [
        (["--model.compile", "true"], True),  # version_0
        (["--ckpt_path", "last", "--model.compile", "false", *more], False),
        ([], False),  # version_1
        (["--model.compile", "true", "--ckpt_path", "last", *more], True),
    ]
    for extra, compiled in fits:
        proc = run_cli(["fit", *args, *extra], project)
        assert (said in proc.stdout + proc.stderr) == compiled, extra
    runs = project / "lightning_logs"
    a, b = (torch.load(runs / f"version_{v}" / "checkpoints" / "last.ckpt", weights_only=True) for v in (0, 1))
    assert a["global_step"] == b["global_step"] == 40
    assert list(a["state_dict"]) == list(b["state_dict"]) and "compile" not in a["hyper_parameters"]
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor.float(), b["state_dict"][name].float(), rtol=1e-4, atol=1e-5), name
    last = str(runs / "version_1" / "checkpoints" / "last.ckpt")  # its config.yaml says compile: true
    for command, metric in (("validate", "val/loss"), ("test", "test/loss")):
        assert metric in run_cli([command, "--ckpt_path", last], project).stdout
    names = run_cli(["sample", "--ckpt_path", last, "-n", "5"], project).stdout.split()
    assert len(names) == 5


@pytest.mark.slow
def test_bench_has_the_compiled_lecture_loop_and_fit_compiled_with_their_compile_apart(tmp_path, names_file):
    out = tmp_path / "bench.json"
    args = ["--steps", "30", "--repeats", "1", "--sizes", "small", "--device", "cpu", "--data_path", str(names_file)]
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.bench", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    for what in ("lecture loop, compiled, 1 thread", "fit, compiled"):
        assert rows[what]["steps_per_s"] > 0 and rows[what]["one_off_s"] > 0, what  # the compile, apart
        assert f"| {what} |" in proc.stdout
    assert "one_off_s" not in rows["lecture loop, 1 thread"]
