"""Every private Lightning/PyTorch name in mm_lightning/compat.py still exists and still behaves as used; and the
Lightning code the fast path mirrors is still the code it was checked against. An upgrade that changes any of it
fails here, in one place, with what to re-check (tests/test_fastpath.py then proves the two paths equal again)."""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.loops.optimization.automatic import Closure, _AutomaticOptimization
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection, _ResultMetric

from mm_lightning import compat

# the Lightning 2.6.6 code that fastpath.LeanEpochLoop and compat.LeanLog reproduce, call for call (sha256 of the
# source, first 16 hex digits). If one changes: read the new code, bring the lean loop in line, update the hash.
MIRRORED = {
    "_TrainingEpochLoop.advance": (compat.TrainingEpochLoop.advance, "c7555c016027bd73"),
    "_TrainingEpochLoop.reset": (compat.TrainingEpochLoop.reset, "0014631aabe0ac52"),
    "_TrainingEpochLoop._should_check_val_fx": (compat.TrainingEpochLoop._should_check_val_fx, "cf0916b12e18a2cc"),
    "_TrainingEpochLoop._update_learning_rates": (compat.TrainingEpochLoop._update_learning_rates, "26ac8752d7a358d5"),
    "_AutomaticOptimization.run": (_AutomaticOptimization.run, "385b43732ecc8af3"),
    "_AutomaticOptimization._make_zero_grad_fn": (_AutomaticOptimization._make_zero_grad_fn, "0f9b56ff1dc1a3ba"),
    "_AutomaticOptimization._optimizer_step": (_AutomaticOptimization._optimizer_step, "e196b2fa15d19ee6"),
    "_AutomaticOptimization._on_before_zero_grad": (_AutomaticOptimization._on_before_zero_grad, "b7f44d3a31d4debb"),
    "_AutomaticOptimization._optimizer_zero_grad": (_AutomaticOptimization._optimizer_zero_grad, "abd5876aaf91ee7d"),
    "_AutomaticOptimization._training_step": (_AutomaticOptimization._training_step, "72e8f9529eacba73"),
    "Closure.closure": (Closure.closure, "9fb9a0ba9c7be69a"),
    "ClosureResult.from_training_step_output": (compat.ClosureResult.from_training_step_output, "1f1d12d6ce289fc7"),
    "LightningModule.log": (LightningModule.log, "439eca9906e4b77b"),
    "LightningModule.optimizer_step": (LightningModule.optimizer_step, "f07278673bfab100"),
    "LightningModule.lr_scheduler_step": (LightningModule.lr_scheduler_step, "7cd01c527733468c"),
    "_ResultCollection.log": (_ResultCollection.log, "57ea91856621d155"),
    "_ResultCollection.update_metrics": (_ResultCollection.update_metrics, "61e950f1f1d25eea"),
    "_LoggerConnector.on_batch_end": (_LoggerConnector.on_batch_end, "87c0a9cd43e97f9d"),
    "_LoggerConnector.update_train_step_metrics": (_LoggerConnector.update_train_step_metrics, "44584c0c55de3464"),
    "_LoggerConnector.should_update_logs": (_LoggerConnector.should_update_logs.fget, "a60ba9e9cd0c62d9"),
    "Precision._wrap_closure": (Precision._wrap_closure, "2d25ccda9ac5fcdc"),
    "Strategy.backward": (Strategy.backward, "627cfe60660857e3"),
    "Precision.pre_backward": (Precision.pre_backward, "f94c53cfe4fc28b2"),  # LeanEpochLoop._backward_with_hooks
    "Precision.backward": (Precision.backward, "c45a6fcf5963eb17"),
    "Precision.post_backward": (Precision.post_backward, "26b545c12fad4e75"),
    "Strategy.training_step": (Strategy.training_step, "e0755d72cd8b74f0"),
}


@pytest.mark.parametrize("name", list(MIRRORED))
def test_the_lightning_code_the_fast_path_mirrors_is_unchanged(name):
    obj, expected = MIRRORED[name]
    digest = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    assert digest == expected, (
        f"Lightning changed {name}: fastpath.py / compat.py reproduce it; re-check them against the new code, "
        "then update MIRRORED here"
    )


def test_private_attributes_the_project_reads_exist():
    loop_attrs = ["_batches_that_stepped", "_build_kwargs", "_should_check_val_fx", "_is_training_done"]
    loop_attrs += ["_num_ready_batches_reached", "_broadcast_sigterm_tensor", "_warning_cache", "_results"]
    for attr in loop_attrs:
        assert hasattr(compat.TrainingEpochLoop, attr) or attr in inspect.getsource(compat.TrainingEpochLoop), attr
    for attr in ("_should_skip_saving_checkpoint", "_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(ModelCheckpoint, attr)), attr
    assert "_last_global_step_saved" in inspect.getsource(ModelCheckpoint.__init__)
    for attr in ("_progress_bar_metrics", "_callback_metrics", "_logged_metrics", "_current_fx", "_first_loop_iter"):
        assert attr in inspect.getsource(_LoggerConnector.__init__), attr
    assert callable(_ResultCollection._extract_batch_size) and callable(_ResultMetric.forward)
    assert "has_reset" in inspect.getsource(_ResultMetric)
    assert "_val_check_time_interval" in inspect.getsource(compat.TrainingEpochLoop._should_check_val_fx)


def test_set_epoch_loop_class_keeps_the_loop_object():
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    loop = trainer.fit_loop.epoch_loop

    class Lean(compat.TrainingEpochLoop):
        pass

    compat.set_epoch_loop_class(trainer, Lean)
    assert trainer.fit_loop.epoch_loop is loop and type(loop) is Lean
    trainer.fit_loop.epoch_loop = object()
    with pytest.raises(TypeError, match="not Lightning's training epoch loop"):
        compat.set_epoch_loop_class(trainer, Lean)


def test_foreach_ops_match_their_per_tensor_meaning():
    a = [torch.randn(3, 4), torch.randn(5)]
    b = [torch.randn(3, 4), torch.randn(5)]
    expected = [x.clone().add_(y, alpha=-0.1) for x, y in zip(a, b)]
    compat.foreach_add_(a, b, alpha=-0.1)
    assert all(torch.equal(x, e) for x, e in zip(a, expected))
    compat.foreach_copy_(a, b)
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
    layer = torch.nn.Linear(1, 1)
    assert all(isinstance(getattr(layer, a), dict) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
