"""Health verdicts: is training healthy, judged from one sampled step's statistics (and the update history).

The defaults are calibrated on the lecture's stories at init: the deep BatchNorm net (tanh std 0.64, 3% saturated)
and the 5/3-gain net without BatchNorm (first layer 20% saturated) pass; gain 1 without BatchNorm (activations
shrinking 0.62 -> 0.31 over five layers) and gain 3 (40-47% saturated) fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .snapshot import LayerStats, Snapshot

CHECKS = (
    "nonfinite",
    "initial_loss",
    "saturation",
    "dead_units",
    "activation_std_ratio",
    "gradient_std_ratio",
    "update_ratio",
)


@dataclass(frozen=True)
class HealthThresholds:
    """When a verdict fails."""

    max_saturation: float = 0.30
    """Largest fraction of a bounded activation's outputs past the saturation threshold (|tanh| > 0.97)."""
    max_dead: float = 0.05
    """Largest fraction of a layer's units that are saturated or constant over the whole batch."""
    activation_std_ratio: float = 0.6
    """std of the last watched layer's output over the first's must lie in [r, 1/r]: beyond, activations shrink
    (or grow) layer by layer. Compared within one kind of layer in one part of the model only."""
    gradient_std_ratio: float = 10.0
    """std of the first watched layer's output gradient over the last's must lie in [1/r, r]: beyond, gradients
    vanish (or explode) on their way back. Compared within one kind of layer in one part of the model only."""
    update_ratio_low: float = -4.0
    """log10(update:data) below this for update_ratio_window samples in a row: the parameter barely learns."""
    update_ratio_high: float = -2.0
    """log10(update:data) above this for update_ratio_window samples in a row: updates too large."""
    update_ratio_window: int = 10
    """Consecutive sampled steps an update ratio must stay out of range before it is reported."""
    initial_loss_tolerance: float = 0.5
    """Largest |loss at step 0 - ln(classes)|: a bigger gap means the initial predictions are confidently wrong."""


def _comparable(layers: list[LayerStats]) -> dict[tuple[str, str], list[LayerStats]]:
    """Layers whose stds may be compared: one kind (Tanh with Tanh) in one role (a block's linear1 with the next
    block's linear1, not with its linear2; the role is the module's attribute name, unless it is an index) in one
    part of the model (see select.groups), in forward order. A GAN's generator is not compared with its
    discriminator, a ReLU with a Sigmoid, a reused module's second call (named name#2) with its first."""
    out: dict[tuple[str, str], list[LayerStats]] = {}
    for x in layers:
        if "#" not in x.name:
            last = x.name.rsplit(".", 1)[-1]
            role = "" if last.isdigit() or "." not in x.name else f" {last}"
            out.setdefault((x.group, x.kind + role), []).append(x)
    return out


@dataclass
class Verdict:
    check: str  # one of CHECKS
    subject: str  # the layer or parameter concerned, "" for the whole model
    ok: bool
    message: str


def judge(
    snapshot: Snapshot,
    t: HealthThresholds,
    expected_loss: float | None = None,
    update_history: dict[str, list[float]] | None = None,
) -> list[Verdict]:
    """Every verdict for this snapshot, passing and failing, in the order of CHECKS."""
    out: list[Verdict] = []
    layers, weights = snapshot.layers, snapshot.weights

    bad = [x.name for x in layers if not all(map(math.isfinite, (x.mean, x.std)))]
    bad += [x.name + " (gradient)" for x in layers if x.grad_std is not None and not math.isfinite(x.grad_std)]
    bad += [p.name + " (gradient)" for p in snapshot.params if p.grad_std is not None and not math.isfinite(p.grad_std)]
    if snapshot.loss is not None and not math.isfinite(snapshot.loss):
        bad.insert(0, "the loss")
    out.append(
        Verdict("nonfinite", bad[0] if bad else "", not bad, f"NaN/Inf first in {bad[0]}" if bad else "all finite")
    )

    if snapshot.step == 0 and expected_loss is not None and snapshot.loss is not None:
        gap = abs(snapshot.loss - expected_loss)
        out.append(
            Verdict(
                "initial_loss",
                "",
                gap <= t.initial_loss_tolerance,
                f"loss at step 0 is {snapshot.loss:.4f}, ln(classes) = {expected_loss:.4f}"
                + ("" if gap <= t.initial_loss_tolerance else ": the initial predictions are confidently wrong"),
            )
        )

    for x in layers:
        if x.saturation is not None:
            ok = x.saturation <= t.max_saturation
            out.append(
                Verdict(
                    "saturation",
                    x.name,
                    ok,
                    f"{x.name} ({x.kind}) {100 * x.saturation:.1f}% saturated"
                    + ("" if ok else f" (> {100 * t.max_saturation:.0f}%): its gradients are blocked; lower the gain"),
                )
            )
    for x in layers:
        ok = x.dead <= t.max_dead
        out.append(
            Verdict(
                "dead_units",
                x.name,
                ok,
                f"{x.name} ({x.kind}) {100 * x.dead:.1f}% of units dead"
                + ("" if ok else " (saturated or constant for the whole batch): they never learn"),
            )
        )

    for (group, kind), same in _comparable(layers).items():  # first and last layer of one kind in one part
        first, last = same[0], same[-1]
        if len(same) >= 2 and first.std > 0 and math.isfinite(last.std):
            r = last.std / first.std
            lo, hi = t.activation_std_ratio, 1 / t.activation_std_ratio
            ok = lo <= r <= hi
            trend = "shrink" if r < lo else "grow"
            out.append(
                Verdict(
                    "activation_std_ratio",
                    f"{group} {kind}".strip(),
                    ok,
                    f"activation std {first.std:.3f} -> {last.std:.3f} from {first.name} to {last.name} ({kind})"
                    + (
                        ""
                        if ok
                        else f": activations {trend} layer by layer; the gain is too {'low' if r < lo else 'high'}"
                    ),
                )
            )
        grads = [x for x in same if x.grad_std is not None]
        if len(grads) >= 2 and grads[-1].grad_std and grads[-1].grad_std > 0:
            r = grads[0].grad_std / grads[-1].grad_std
            ok = 1 / t.gradient_std_ratio <= r <= t.gradient_std_ratio
            trend = "vanish" if r < 1 else "explode"
            out.append(
                Verdict(
                    "gradient_std_ratio",
                    f"{group} {kind}".strip(),
                    ok,
                    f"output-gradient std {grads[0].grad_std:.2e} ({grads[0].name}) vs {grads[-1].grad_std:.2e} "
                    f"({grads[-1].name}, {kind})" + ("" if ok else f": gradients {trend} on their way back"),
                )
            )

    history = update_history or {}
    for p in weights:
        recent = history.get(p.name, [])[-t.update_ratio_window :]
        outside = [v for v in recent if not (t.update_ratio_low <= v <= t.update_ratio_high)]
        sustained = len(recent) >= t.update_ratio_window and len(outside) == len(recent)
        current = p.log10_update_ratio
        shown = "n/a" if current is None else f"{current:.2f}"
        if sustained:
            low = sum(v < t.update_ratio_low for v in recent) > len(recent) / 2
            why = "barely learns (learning rate too low?)" if low else "changes too fast (learning rate too high?)"
            message = (
                f"{p.name} log10(update:data) {shown}, outside [{t.update_ratio_low:g}, {t.update_ratio_high:g}] "
                f"for {len(recent)} samples: it {why}"
            )
        else:
            message = f"{p.name} log10(update:data) {shown}"
        out.append(Verdict("update_ratio", p.name, not sustained, message))
    return out
