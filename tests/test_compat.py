"""The installed Lightning against what the project was verified on: its version is in the speed add-on's table of
verified versions, every function the lean loop mirrors still has the recorded source fingerprint, and every private
Lightning/PyTorch name the project touches still exists and behaves as used. A new Lightning release fails here, in
CI, with what to re-check (docs/speed.md), while users of it train on Lightning's own loop. The gate's own answers
for a simulated other Lightning (another version, a renamed private name, a changed or patched function) are
checked here too; tests/test_fastpath.py checks that such a fit equals the plain loop's."""

from __future__ import annotations

import hashlib
import inspect
import sys

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult, _AutomaticOptimization
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection, _ResultMetric

from mm_lightning import compat
from mm_lightning.speed import gate, private, sgd


def test_the_installed_lightning_is_a_verified_version():
    assert lightning.__version__ in gate.VERIFIED, (
        f"Lightning {lightning.__version__} is not in mm_lightning/speed/gate.py's VERIFIED: users of it train on "
        "Lightning's own loop. To verify it, follow docs/speed.md (read the mirrored code, run tests/test_fastpath.py)"
    )
    assert gate.why_not_verified() is None


@pytest.mark.parametrize("path", gate.MIRRORED, ids=[p.partition(":")[2] for p in gate.MIRRORED])
def test_the_lightning_code_the_fast_path_mirrors_is_unchanged(path):
    name = path.partition(":")[2]
    expected = gate.VERIFIED.get(lightning.__version__, {}).get(name)
    assert gate.fingerprint(gate.resolve(path)) == expected, (
        f"Lightning changed {name}: lean.py / private.py reproduce it; re-check them against the new code, then "
        "record the new fingerprints in gate.VERIFIED (docs/speed.md)"
    )


def test_the_gate_fingerprints_the_functions_themselves():
    """gate.resolve finds the very functions Lightning's classes hold (an independent import of each), and the
    fingerprint is the sha256 of the source."""
    found = {p.partition(":")[2]: gate.resolve(p) for p in gate.MIRRORED}
    assert found["_TrainingEpochLoop.advance"] is _TrainingEpochLoop.advance
    assert found["_AutomaticOptimization.run"] is _AutomaticOptimization.run
    assert found["Closure.closure"] is Closure.closure
    assert found["ClosureResult.from_training_step_output"] is ClosureResult.from_training_step_output.__func__
    assert found["_LoggerConnector.should_update_logs"] is _LoggerConnector.should_update_logs.fget
    assert found["LightningModule.log"] is LightningModule.log
    source = inspect.getsource(_ResultCollection.log).encode()
    assert gate.fingerprint(_ResultCollection.log) == hashlib.sha256(source).hexdigest()[:16]
    assert set(gate.VERIFIED[lightning.__version__]) == set(found)


# ------------------------------------------------------------------------------------ a simulated other Lightning


def test_the_gate_refuses_another_version(monkeypatch):
    monkeypatch.setattr(lightning, "__version__", "2.99.0")
    assert gate.why_not_verified() == (
        f"Lightning 2.99.0 is not a version the lean loop was verified against ({', '.join(gate.VERIFIED)})"
    )


def test_the_gate_refuses_a_renamed_private_name(monkeypatch):
    import lightning.pytorch.loops.training_epoch_loop as loops

    monkeypatch.delattr(loops, "_TrainingEpochLoop")  # as if a release had renamed it
    monkeypatch.delitem(sys.modules, "mm_lightning.speed.private", raising=False)  # imported afresh
    why = gate.why_not_verified()
    assert why.startswith(f"a private Lightning name it uses is missing in Lightning {lightning.__version__}"), why
    assert "_TrainingEpochLoop" in why


def test_the_gate_refuses_a_changed_function(monkeypatch):
    original = _AutomaticOptimization.run

    def run(self, optimizer, batch_idx, kwargs):  # a release that does more per step
        return original(self, optimizer, batch_idx, kwargs)

    monkeypatch.setattr(_AutomaticOptimization, "run", run)
    why = gate.why_not_verified()
    assert why.startswith("Lightning's _AutomaticOptimization.run is not the code the lean loop was verified"), why


def test_the_gate_refuses_a_missing_mirrored_function(monkeypatch):
    monkeypatch.delattr(_LoggerConnector, "on_batch_end")
    why = gate.why_not_verified()
    assert why.startswith(f"Lightning {lightning.__version__} has no _LoggerConnector.on_batch_end as verified"), why


# ------------------------------------------------------------------------------------------------ private names


def test_private_attributes_the_project_reads_exist():
    loop_attrs = ["_batches_that_stepped", "_build_kwargs", "_should_check_val_fx", "_is_training_done"]
    loop_attrs += ["_num_ready_batches_reached", "_broadcast_sigterm_tensor", "_warning_cache", "_results"]
    for attr in loop_attrs:
        assert hasattr(private.TrainingEpochLoop, attr) or attr in inspect.getsource(private.TrainingEpochLoop), attr
    assert compat.model_checkpoint_missing(ModelCheckpoint()) is None
    for attr in ("_progress_bar_metrics", "_callback_metrics", "_logged_metrics", "_current_fx", "_first_loop_iter"):
        assert attr in inspect.getsource(_LoggerConnector.__init__), attr
    assert callable(_ResultCollection._extract_batch_size) and callable(_ResultMetric.forward)
    assert "has_reset" in inspect.getsource(_ResultMetric)
    assert "_val_check_time_interval" in inspect.getsource(private.TrainingEpochLoop._should_check_val_fx)


def test_a_model_checkpoint_without_its_private_names_is_named():
    class Renamed(ModelCheckpoint):
        _save_last_checkpoint = None  # as if a release had renamed it

    assert compat.model_checkpoint_missing(Renamed()) == "ModelCheckpoint._save_last_checkpoint"
    callback = ModelCheckpoint()
    del callback._last_global_step_saved
    assert compat.model_checkpoint_missing(callback) == "ModelCheckpoint._last_global_step_saved"


def test_set_epoch_loop_class_keeps_the_loop_object():
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    loop = trainer.fit_loop.epoch_loop

    class Lean(private.TrainingEpochLoop):
        pass

    private.set_epoch_loop_class(trainer, Lean)
    assert trainer.fit_loop.epoch_loop is loop and type(loop) is Lean
    trainer.fit_loop.epoch_loop = object()
    with pytest.raises(TypeError, match="not Lightning's training epoch loop"):
        private.set_epoch_loop_class(trainer, Lean)


def test_foreach_ops_match_their_per_tensor_meaning():
    a = [torch.randn(3, 4), torch.randn(5)]
    b = [torch.randn(3, 4), torch.randn(5)]
    expected = [x.clone().add_(y, alpha=-0.1) for x, y in zip(a, b)]
    private.foreach_add_(a, b, alpha=-0.1)
    assert all(torch.equal(x, e) for x, e in zip(a, expected))
    private.foreach_copy_(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_hook_dicts_step_is_observed_reads_exist():
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert isinstance(opt._optimizer_step_pre_hooks, dict) and isinstance(opt._optimizer_step_post_hooks, dict)
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        assert isinstance(getattr(o, name), dict), name
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        assert isinstance(getattr(m, name), dict), name
    assert isinstance(m._global_backward_pre_hooks, dict)
    layer = torch.nn.Linear(1, 1)
    own = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    assert all(isinstance(getattr(layer, a), dict) for a in own)
    assert not private.step_is_observed(opt, [layer])
    handle = layer.register_full_backward_pre_hook(lambda module, grad_output: None)
    assert private.step_is_observed(opt, [layer])
    handle.remove()


def test_skips_backward_reads_what_swa_sets():
    """StochasticWeightAveraging sets fit_loop._skip_backward for its BatchNorm epoch; the lean loop reads it on the
    training epoch loop's automatic optimization (private.skips_backward) to hand such batches to Lightning."""
    trainer = lightning.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    automatic = trainer.fit_loop.epoch_loop.automatic_optimization
    assert private.skips_backward(automatic) is False
    trainer.fit_loop._skip_backward = True
    assert private.skips_backward(automatic) is True


def test_what_autograd_is_watched_reads_exists_and_sees_each_watcher():
    """Hand gradients (speed/handgrad.py) skip autograd's backward: each thing that would see it must be seen."""
    weight = torch.nn.Parameter(torch.zeros(2))
    assert private.autograd_is_watched([weight]) is False
    handle = weight.register_hook(lambda grad: None)
    assert private.autograd_is_watched([weight])
    handle.remove()
    handle = weight.register_post_accumulate_grad_hook(lambda p: None)
    assert private.autograd_is_watched([weight])
    handle.remove()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert private.autograd_is_watched([weight])
    with torch.no_grad():
        assert private.autograd_is_watched([weight])
    assert private.autograd_is_watched([weight]) is False


@pytest.mark.slow
def test_run_checkpoint_on_a_lightning_without_its_private_names_is_model_checkpoint(project, monkeypatch):
    """A release that renamed one of ModelCheckpoint's private methods (simulated: one more name to look for): fit
    and resume still work, as Lightning's own ModelCheckpoint, and one warning says why."""
    from tests.test_reliability import _fit, _last

    monkeypatch.chdir(project)
    monkeypatch.setattr(compat, "MODEL_CHECKPOINT_METHODS", (*compat.MODEL_CHECKPOINT_METHODS, "_renamed"))
    with pytest.warns(
        UserWarning,
        match=r"last\.ckpt is written as Lightning's own ModelCheckpoint does .* "
        r"because Lightning \S+ has no ModelCheckpoint\._renamed",
    ):
        assert _fit("runs", 60, "--data.steps_per_epoch", "30") == 0
    assert _last("runs")["global_step"] == 60
    assert _fit("runs", 90, "--ckpt_path", "last", "--data.steps_per_epoch", "30") == 0
    assert _last("runs")["global_step"] == 90


class CompatData:
    def __init__(self, path: str = "x.txt"):
        self.path = path


class BadCompatData(CompatData):
    def __init__(self, path: str = "x.txt"):
        from mm_lightning.errors import UsageError

        raise UsageError(f"{path} is missing; copy names.txt there")


def test_the_one_line_error_of_a_class_path_argument_is_found_inside_jsonargparses_wrapping():
    """A class-path argument's constructor raising UsageError reaches the CLI as jsonargparse's ValueError (it tries
    each type the argument allows); compat.usage_error_within must find the UsageError itself, whose line the CLI
    prints. A jsonargparse that keeps it elsewhere fails here."""
    from jsonargparse import ArgumentParser

    from mm_lightning.errors import UsageError

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(CompatData, "data")
    config = parser.parse_args(["--data", f"{__name__}.BadCompatData"])
    with pytest.raises(ValueError) as raised:
        parser.instantiate_classes(config)
    assert type(raised.value) is ValueError  # wrapped: what the CLI gets
    found = compat.usage_error_within(raised.value, UsageError)
    assert isinstance(found, UsageError) and str(found) == "x.txt is missing; copy names.txt there"


# ------------------------------------------------------------------------------------------- torch's SGD step


def test_the_installed_torch_is_one_the_sgd_step_was_verified_against():
    version = torch.__version__.split("+")[0]
    assert version in sgd.TORCH_VERIFIED, (
        f"torch {version} is not in mm_lightning/speed/sgd.py's TORCH_VERIFIED: the lean loop steps SGD through "
        "optimizer.step there. To verify it, read the mirrored functions, run tests/test_sgd_step.py, record them"
    )
    assert sgd.why_not_verified() is None


@pytest.mark.parametrize("path", sgd.MIRRORED, ids=[p.partition(":")[2] for p in sgd.MIRRORED])
def test_the_torch_code_the_sgd_step_mirrors_is_unchanged(path):
    name = path.partition(":")[2]
    expected = sgd.TORCH_VERIFIED.get(torch.__version__.split("+")[0], {}).get(name)
    assert gate.fingerprint(gate.resolve(path)) == expected, f"torch changed {name}: re-check sgd.py against it"


def test_the_sgd_fingerprint_is_of_sgds_own_step_under_its_wrappers():
    import torch.optim.sgd as torch_sgd

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # wraps SGD.step for the profiler
    source = inspect.getsource(inspect.unwrap(torch.optim.SGD.step))
    assert "_init_group" in source and source.lstrip().startswith("@_use_grad_for_differentiable")
    expected = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert gate.fingerprint(gate.resolve("torch.optim.sgd:SGD.step")) == expected
    assert gate.resolve("torch.optim.sgd:_multi_tensor_sgd") is torch_sgd._multi_tensor_sgd


def test_the_sgd_step_refuses_another_torch_or_changed_code(monkeypatch):
    import torch.optim.sgd as torch_sgd

    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    assert sgd.why_not_verified().startswith("torch 2.99.0 is not a version its SGD step was verified against")
    monkeypatch.undo()
    original = torch_sgd._multi_tensor_sgd
    monkeypatch.setattr(torch_sgd, "_multi_tensor_sgd", lambda *a, **k: original(*a, **k))
    assert sgd.why_not_verified().startswith("torch's _multi_tensor_sgd is not the code its SGD step was verified")


def test_the_private_names_of_the_sgd_step_behave_as_used():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 1)  # wraps opt.step: the wrapper sets _opt_called
    assert getattr(opt.step, "_wrapped_by_lr_sched", False) and getattr(type(opt).step, "hooked", False)
    opt._opt_called = False
    opt.step()
    assert opt._opt_called is True
    assert private.profiler_enabled() is False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert private.profiler_enabled() is True
    handle = opt.register_step_post_hook(lambda *a: None)
    assert private.optimizer_step_is_hooked(opt)
    handle.remove()
    assert not private.optimizer_step_is_hooked(opt)


def test_saves_on_train_batches_reads_model_checkpoints_own_settings():
    from datetime import timedelta

    assert not compat.saves_on_train_batches(ModelCheckpoint())
    assert compat.saves_on_train_batches(ModelCheckpoint(every_n_train_steps=5))
    assert compat.saves_on_train_batches(ModelCheckpoint(train_time_interval=timedelta(minutes=1)))
    plain = ModelCheckpoint()
    del plain._every_n_train_steps  # a Lightning that renamed it: its own hook runs every batch, as it would
    assert compat.saves_on_train_batches(plain)
