"""What a Snapshot becomes in a logger: per-layer series, flat scalar tags, histograms, the Custom Scalars layout.

TensorBoard colours lines by run, not by tag. So in TensorBoard each layer and each parameter is a run of its
own (a subdirectory of the run: `layers/<layer>`, `params/<parameter>`, as `SummaryWriter.add_scalars` does), and
each chart holds one quantity for every layer, in distinct colours, with the layer's name in the legend. The
chart names start with the lecture's figure numbers, so the informative ones come first (TensorBoard sorts them
by name): "1 activations/std", "1 activations/saturated %", "2 gradients/...", "3 weight gradients/grad:data",
"4 updates/log10 update:data" (with a "reference 1e-3" run); means and dead units under "5 more". Loggers without
runs (CSV, MLflow, W&B) get the same numbers as flat tags: "act/std/<layer>", "update/log10_ratio/<parameter>".
"""

from __future__ import annotations

import math

from .snapshot import Snapshot

# chart tag inside a layer's or parameter's run -> the family of its flat tag (family/<layer or parameter>)
FLAT = {
    "1 activations/std": "act/std",
    "1 activations/saturated %": "act/saturation",
    "2 gradients/output-gradient std": "grad/std",
    "3 weight gradients/grad:data": "weight/grad_data_ratio",
    "4 updates/log10 update:data": "update/log10_ratio",
    "5 more/activation mean": "act/mean",
    "5 more/dead units %": "act/dead",
    "5 more/output-gradient mean": "grad/mean",
    "5 more/weight-gradient std": "weight/grad_std",
    "5 more/weight-gradient mean": "weight/grad_mean",
}
REFERENCE_RUN = "reference 1e-3"  # the lecture's 1e-3 line, a run of its own in the update chart


def snapshot_series(s: Snapshot) -> dict[str, dict[str, float]]:
    """{run: {chart tag: value}}: one run per layer ("layers/<name>") and per parameter ("params/<name>")."""
    out: dict[str, dict[str, float]] = {}
    for x in s.layers:
        d = out[f"layers/{x.name}"] = {"1 activations/std": x.std}
        if x.saturation is not None:
            d["1 activations/saturated %"] = 100 * x.saturation  # percent, as the lecture prints it
        d["5 more/activation mean"] = x.mean
        d["5 more/dead units %"] = 100 * x.dead
        if x.grad_std is not None:
            d["2 gradients/output-gradient std"] = x.grad_std
            d["5 more/output-gradient mean"] = x.grad_mean
    weights = {p.name for p in s.weights}
    for p in s.params:
        d = {}
        if p.name in weights:
            if p.grad_data_ratio is not None:
                d["3 weight gradients/grad:data"] = p.grad_data_ratio
            if p.grad_std is not None:
                d["5 more/weight-gradient std"] = p.grad_std
                d["5 more/weight-gradient mean"] = p.grad_mean
        if p.log10_update_ratio is not None and math.isfinite(p.log10_update_ratio):
            d["4 updates/log10 update:data"] = p.log10_update_ratio
        if d:
            out[f"params/{p.name}"] = d
    if s.params:
        out[REFERENCE_RUN] = {"4 updates/log10 update:data": -3.0}
    return out


def snapshot_scalars(s: Snapshot) -> dict[str, float]:
    """The run's own scalars: the sampled step's loss (before its update; step 0: at init)."""
    return {} if s.loss is None else {"sampled/loss": s.loss}


def flat_scalars(s: Snapshot) -> dict[str, float]:
    """Every number of snapshot_series as a flat tag (family/<layer or parameter>), with snapshot_scalars."""
    out = snapshot_scalars(s)
    for run, values in snapshot_series(s).items():
        name = "reference" if run == REFERENCE_RUN else run.split("/", 1)[1]
        for tag, value in values.items():
            out[f"{FLAT[tag]}/{name}"] = value
    return out


def snapshot_histograms(s: Snapshot) -> dict:
    out = {}
    for x in s.layers:
        if x.hist is not None:
            out[f"act_hist/{x.name}"] = x.hist
        if x.grad_hist is not None:
            out[f"grad_hist/{x.name}"] = x.grad_hist
    for p in s.weights:
        if p.grad_hist is not None:
            out[f"weight_grad_hist/{p.name}"] = p.grad_hist
    return out


def custom_scalars_layout() -> dict:
    """TensorBoard's Custom Scalars tab: each chart one quantity over all layers (their runs)."""
    m = lambda *tags: ["Multiline", list(tags)]  # noqa: E731
    return {
        "1 activations": {
            "std": m(r"1 activations/std"),
            "saturated %": m(r"1 activations/saturated %"),
            "mean": m(r"5 more/activation mean"),
            "dead units %": m(r"5 more/dead units %"),
        },
        "2 gradients": {
            "output-gradient std": m(r"2 gradients/output-gradient std"),
            "output-gradient mean": m(r"5 more/output-gradient mean"),
        },
        "3 weight gradients": {
            "grad:data": m(r"3 weight gradients/grad:data"),
            "grad std": m(r"5 more/weight-gradient std"),
        },
        "4 updates": {"log10(update:data), reference -3": m(r"4 updates/log10 update:data")},
        "health": {"failing checks (1 = failing)": m(r"health/.*")},
    }
