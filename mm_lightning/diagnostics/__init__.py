"""Training diagnostics for any LightningModule: the lecture's four diagnostics (activations, gradients, weight
gradients, update:data ratios), health verdicts and figures, live in TensorBoard.

A package of its own: it imports nothing else from mm_lightning, so it can be copied into another project.

    from mm_lightning.diagnostics import TrainingDiagnostics
    trainer = L.Trainer(callbacks=[TrainingDiagnostics(every_n_steps=100)])
"""

from .callback import DiagnosticsConfigError, TrainingDiagnostics, custom_scalars_layout, snapshot_scalars
from .report import format_report
from .snapshot import Histogram, LayerStats, ParamStats, Snapshot
from .stats import first_nonfinite_module, summarize
from .verdicts import CHECKS, HealthThresholds, Verdict, judge

__all__ = [
    "CHECKS",
    "DiagnosticsConfigError",
    "HealthThresholds",
    "Histogram",
    "LayerStats",
    "ParamStats",
    "Snapshot",
    "TrainingDiagnostics",
    "Verdict",
    "custom_scalars_layout",
    "first_nonfinite_module",
    "format_report",
    "judge",
    "snapshot_scalars",
    "summarize",
]
