"""What a Snapshot becomes in a logger: flat scalar tags, TensorBoard's one-run tags, histograms, Custom Scalars.

Loggers without runs (CSV, MLflow, W&B) get flat tags: "act/std/<layer>", "update/log10_ratio/<parameter>".

TensorBoard gets everything in the fit's own run (no sub-runs: TensorBoard selects no run at all once a log
directory holds more than ~40, and a run per layer reached that after two fits). Each per-layer quantity is one
chart per layer, "<group>/<quantity> · <NN> <layer>", NN the layer's depth (its position in the model), so charts
sort by depth and each line of a chart is one fit (compare runs layer by layer); the lecture's four figures are
the all-layers overview (Images). TensorBoard opens the first two groups (in its natural sort of the tags, digits
first), so the groups are numbered by what a user reads first, leaving "0" to the loss (a logger may file it as
"0 loss/...", as mm_lightning's CLI does): "1 activations", "2 updates" (weights: the lecture's plot, its 1e-3
guide in the chart's name), "3 gradients", "4 weight gradients"; the charts that are flat or round-off on a
healthy net (dead units 0%, the output-gradient mean ±1e-11 behind BatchNorm), means, and biases' and BatchNorm's
updates go to "5 more", last and closed until clicked.
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
    """{"layers/<name>" or "params/<name>": {chart tag: value}}: each layer's and parameter's numbers, which
    flat_scalars and tensorboard_scalars name each their way."""
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


GUIDE = "log10 update:data (guide -3)"
TENSORBOARD = {  # the chart tag inside snapshot_series -> its TensorBoard quantity
    "1 activations/std": "1 activations/output std",
    "1 activations/saturated %": "1 activations/saturated %",
    "2 gradients/output-gradient std": "3 gradients/output-gradient std",
    "3 weight gradients/grad:data": "4 weight gradients/grad:data",
    "4 updates/log10 update:data": f"2 updates/{GUIDE}",
    "5 more/activation mean": "5 more/activation mean",
    "5 more/dead units %": "5 more/dead units %",
    "5 more/output-gradient mean": "5 more/output-gradient mean",
    "5 more/weight-gradient std": "5 more/weight-gradient std",
    "5 more/weight-gradient mean": "5 more/weight-gradient mean",
}


def tensorboard_scalars(s: Snapshot, depth: dict[str, int] | None = None) -> dict[str, float]:
    """Every per-layer number of s as one tag of the run: "<group>/<quantity> · <NN> <name>". depth: each layer's
    and parameter's position in the model (stable across samples); default their order in s."""
    if depth is None:
        depth = {x.name: i for i, x in enumerate(s.layers)} | {p.name: i for i, p in enumerate(s.params)}
    weights = {p.name for p in s.weights}
    out = {}
    for run, values in snapshot_series(s).items():
        if run == REFERENCE_RUN:
            continue  # named in the update charts' title instead: a line of its own needs a run of its own
        name = run.split("/", 1)[1]
        for tag, value in values.items():
            quantity = TENSORBOARD[tag]
            if quantity.startswith("2 updates/") and name not in weights:
                quantity = f"5 more/{GUIDE}"  # biases and BatchNorm: the lecture plots weights only
            out[f"{quantity} · {depth.get(name, 0) + 1:02d} {name}"] = value
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
    """TensorBoard's Custom Scalars tab: the loss on top (every tag with "loss" in its name, in one chart), then
    the failing checks. Per-layer quantities are not here: in one run, Custom Scalars would draw every layer in
    the run's colour (it colours by run); they are in Time Series, a chart per layer, and in the figures."""
    m = lambda *tags: ["Multiline", list(tags)]  # noqa: E731
    return {
        "loss": {"every loss tag (train, val, sampled)": m(r".*loss.*")},
        "health": {"failing checks (1 = failing)": m(r"health/.*")},
    }
