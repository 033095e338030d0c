"""Whether the installed Lightning is one the lean loop was verified against: checked once per fit, at its start.

The lean loop (lean.py) and LeanLog (private.py) reproduce a few Lightning functions call for call. They are exact
only for the code they were checked against, so the gate lets them run only where
- the installed version is in VERIFIED (tests/test_fastpath.py proved the two loops bitwise equal on it),
- every private name they use imports (private.py), and
- the source of every mirrored function still has the fingerprint recorded for that version (sha256 of its
  source; a patched or monkeypatched function has other source, or none).
Anything else runs Lightning's own loop, and the fast path's one line says why. Verifying a new release: see
docs/speed.md (tests/test_compat.py flags one in CI).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

# "module:Qualified.name" of each Lightning function the fast path mirrors (private.py and lean.py say where)
MIRRORED = (
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop.advance",
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop.reset",
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop._should_check_val_fx",
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop._update_learning_rates",
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop.on_advance_end",
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop._save_loggers_on_train_batch_end",
    "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization.run",
    "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization._make_zero_grad_fn",
    "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization._optimizer_step",
    "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization._on_before_zero_grad",
    "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization._optimizer_zero_grad",
    "lightning.pytorch.loops.optimization.automatic:_AutomaticOptimization._training_step",
    "lightning.pytorch.loops.optimization.automatic:Closure.closure",
    "lightning.pytorch.loops.optimization.automatic:ClosureResult.from_training_step_output",
    "lightning.pytorch.core.module:LightningModule.log",
    "lightning.pytorch.core.module:LightningModule.optimizer_step",
    "lightning.pytorch.core.module:LightningModule.lr_scheduler_step",
    "lightning.pytorch.trainer.connectors.logger_connector.result:_ResultCollection.log",
    "lightning.pytorch.trainer.connectors.logger_connector.result:_ResultCollection.update_metrics",
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector:_LoggerConnector.on_batch_end",
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector:_LoggerConnector.update_train_step_metrics",
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector:_LoggerConnector.should_update_logs",
    "lightning.pytorch.plugins.precision.precision:Precision._wrap_closure",
    "lightning.pytorch.plugins.precision.precision:Precision.pre_backward",  # LeanEpochLoop._backward_with_hooks
    "lightning.pytorch.plugins.precision.precision:Precision.backward",
    "lightning.pytorch.plugins.precision.precision:Precision.post_backward",
    "lightning.pytorch.strategies.strategy:Strategy.backward",
    "lightning.pytorch.strategies.strategy:Strategy.training_step",
)

# Lightning versions the lean loop was verified against, with the fingerprint (first 16 hex digits of the sha256 of
# its source) each mirrored function had there
VERIFIED: dict[str, dict[str, str]] = {
    "2.6.6": {
        "_TrainingEpochLoop.advance": "c7555c016027bd73",
        "_TrainingEpochLoop.reset": "0014631aabe0ac52",
        "_TrainingEpochLoop._should_check_val_fx": "cf0916b12e18a2cc",
        "_TrainingEpochLoop._update_learning_rates": "26ac8752d7a358d5",
        "_TrainingEpochLoop.on_advance_end": "2d1ddaa4e45ef5c6",
        "_TrainingEpochLoop._save_loggers_on_train_batch_end": "bd82b8b33ac22d1c",
        "_AutomaticOptimization.run": "385b43732ecc8af3",
        "_AutomaticOptimization._make_zero_grad_fn": "0f9b56ff1dc1a3ba",
        "_AutomaticOptimization._optimizer_step": "e196b2fa15d19ee6",
        "_AutomaticOptimization._on_before_zero_grad": "b7f44d3a31d4debb",
        "_AutomaticOptimization._optimizer_zero_grad": "abd5876aaf91ee7d",
        "_AutomaticOptimization._training_step": "72e8f9529eacba73",
        "Closure.closure": "9fb9a0ba9c7be69a",
        "ClosureResult.from_training_step_output": "1f1d12d6ce289fc7",
        "LightningModule.log": "439eca9906e4b77b",
        "LightningModule.optimizer_step": "f07278673bfab100",
        "LightningModule.lr_scheduler_step": "7cd01c527733468c",
        "_ResultCollection.log": "57ea91856621d155",
        "_ResultCollection.update_metrics": "61e950f1f1d25eea",
        "_LoggerConnector.on_batch_end": "87c0a9cd43e97f9d",
        "_LoggerConnector.update_train_step_metrics": "44584c0c55de3464",
        "_LoggerConnector.should_update_logs": "a60ba9e9cd0c62d9",
        "Precision._wrap_closure": "2d25ccda9ac5fcdc",
        "Precision.pre_backward": "f94c53cfe4fc28b2",
        "Precision.backward": "c45a6fcf5963eb17",
        "Precision.post_backward": "26b545c12fad4e75",
        "Strategy.backward": "627cfe60660857e3",
        "Strategy.training_step": "e0755d72cd8b74f0",
    },
}


def resolve(path: str):
    """The function "module:Class.attr" names (a property's getter for a property)."""
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    for unwrap in ("fget", "__func__"):  # a property, a staticmethod / classmethod
        obj = getattr(obj, unwrap, obj)
    return obj


def fingerprint(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def fingerprints(paths: tuple[str, ...] = MIRRORED) -> dict[str, str]:
    """The installed fingerprint of each mirrored function (raises where one is missing): Lightning's by default."""
    return {path.partition(":")[2]: fingerprint(resolve(path)) for path in paths}


def first_difference(paths: tuple[str, ...], expected: dict, library: str, version: str, who: str) -> str | None:
    """Why the installed code of `library` (its name as said, e.g. "Lightning") is not what `who` was verified
    against: the first of `paths` missing, or with another fingerprint than `expected` records (None: all match)."""
    for path in paths:
        name = path.partition(":")[2]
        try:
            found = fingerprint(resolve(path))
        except Exception as e:  # noqa: BLE001 - missing, renamed, or without source (patched by a C function)
            return f"{library} {version} has no {name} as verified ({type(e).__name__}: {str(e).splitlines()[0]})"
        if found != expected.get(name):
            return f"{library}'s {name} is not the code {who} was verified against (fingerprint {found})"
    return None


def torch_why_not(verified: dict[str, dict[str, str]], mirrored: tuple[str, ...], who: str) -> str | None:
    """Why `who` (a shortcut mirroring torch functions: "its SGD step") must not run on the installed torch: its
    release (without "+cpu"/"+cu128") not in `verified`, or a mirrored function's fingerprint not the one recorded
    there. None when it may."""
    import torch

    version = torch.__version__.split("+")[0]
    expected = verified.get(version)
    if expected is None:
        return f"torch {version} is not a version {who} was verified against ({', '.join(verified)})"
    return first_difference(mirrored, expected, "torch", version, who)


def why_not_verified() -> str | None:
    """Why the lean loop must not run on this Lightning (None when it may): the version, a private name, a
    fingerprint. Reading the sources costs a few milliseconds, once per fit."""
    import lightning

    version = lightning.__version__
    expected = VERIFIED.get(version)
    if expected is None:
        return f"Lightning {version} is not a version the lean loop was verified against ({', '.join(VERIFIED)})"
    try:
        importlib.import_module("mm_lightning.speed.private")  # the private names it uses, all importable
    except Exception as e:  # noqa: BLE001 - an ImportError, or whatever a changed Lightning raises on import
        return f"a private Lightning name it uses is missing in Lightning {version} ({str(e).splitlines()[0]})"
    return first_difference(MIRRORED, expected, "Lightning", version, "the lean loop")
