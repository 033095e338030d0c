"""Lecture-style text tables of one sampled step, for the `diagnose` command (and anyone with a Snapshot)."""

from __future__ import annotations

from .snapshot import Snapshot
from .verdicts import Verdict


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(s: Snapshot, verdicts: list[Verdict], expected_loss: float | None = None) -> str:
    lines = []
    loss = "" if s.loss is None else f"loss {s.loss:.4f}"
    if expected_loss is not None and s.loss is not None:
        loss += f" (ln(classes) = {expected_loss:.4f})"
    lines.append(f"step {s.step}  {loss}".rstrip())
    lines.append("")
    lines.append(
        f"{'layer output':<24}{'mean':>10}{'std':>9}{'saturated':>11}{'dead':>8}{'grad mean':>12}{'grad std':>11}"
    )
    for x in s.layers:
        sat = "n/a" if x.saturation is None else f"{100 * x.saturation:.2f}%"
        lines.append(
            f"{x.name + ' (' + x.kind + ')':<24}{x.mean:>+10.4f}{x.std:>9.4f}{sat:>11}{100 * x.dead:>7.2f}%"
            f"{_f(x.grad_mean, '+.2e'):>12}{_f(x.grad_std, '.2e'):>11}"
        )
    lines.append("")
    lines.append(
        f"{'weight':<24}{'shape':>10}{'grad mean':>12}{'grad std':>11}{'grad:data':>11}{'log10 update:data':>19}"
    )
    for p in s.weights:
        shape = "x".join(map(str, p.shape))
        lines.append(
            f"{p.name:<24}{shape:>10}{_f(p.grad_mean, '+.2e'):>12}{_f(p.grad_std, '.2e'):>11}"
            f"{_f(p.grad_data_ratio, '.2e'):>11}{_f(p.log10_update_ratio, '.2f'):>19}"
        )
    lines.append("")
    lines.append("verdicts")
    for v in verdicts:
        if v.check == "update_ratio" and v.ok:
            continue  # one line per weight that is fine would drown the rest; the table above has the values
        lines.append(f"  {'ok  ' if v.ok else 'FAIL'}  {v.check:<22}{v.message}")
    failing = sum(not v.ok for v in verdicts)
    lines.append(f"{failing} failing" if failing else "all healthy")
    return "\n".join(lines)
