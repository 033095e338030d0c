"""Training diagnostics for any LightningModule: the lecture's four diagnostics (activations, gradients, weight
gradients, update:data ratios), health verdicts and figures, live in TensorBoard (or any logger).

A package of its own: it imports nothing else from mm_lightning, so it can be copied into another project.

    from mm_lightning.diagnostics import TrainingDiagnostics
    trainer = L.Trainer(callbacks=[TrainingDiagnostics(every_n_steps=100)])

Names are imported when first used (PEP 562), so the worker process, which needs only torch, does not pay for
importing Lightning.
"""

from importlib import import_module

_WHERE = {
    "DiagnosticsConfigError": "callback",
    "TrainingDiagnostics": "callback",
    "custom_scalars_layout": "outputs",
    "snapshot_scalars": "outputs",
    "snapshot_series": "outputs",
    "flat_scalars": "outputs",
    "format_report": "report",
    "Histogram": "snapshot",
    "LayerStats": "snapshot",
    "ParamStats": "snapshot",
    "Snapshot": "snapshot",
    "first_nonfinite_module": "stats",
    "summarize": "stats",
    "CHECKS": "verdicts",
    "HealthThresholds": "verdicts",
    "Verdict": "verdicts",
    "judge": "verdicts",
    "default_layers": "select",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
