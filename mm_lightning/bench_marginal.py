"""`python -m mm_lightning.bench --marginal N1,N2`: fit's speed against the lecture's loop as a marginal rate,
(N2 - N1) / (T2 - T1), where T is the wall time of a whole run of N steps: fit's whole call (the CLI's start-up,
training, validation, checkpoint, figures) and the lecture loop's whole loop (its warm-up included). What a run
pays once, whenever it pays it, is in both T1 and T2 and cancels: start-up, the final validation and checkpoint,
and the diagnostics' worker processes starting (the figure worker at step 0, the stats worker at the 10th sampled
step, ~step 900), which on a 2-core machine slow the training thread from the other core while they start. A fixed
steady window (`bench`'s table: from a tenth of the steps on) catches part of that one-off work; this does not,
provided both lengths are past it.

Every variant first runs once at N1, untimed (what the process pays once: imports, torch.compile's set-up). Then
each repeat runs every variant at N1 and at N2, back to back, in an order that reverses between repeats (as
`bench.run` does); ratios are taken against the one-thread lecture loop within a repeat only. The variants and
how they are timed are `bench.marginal`'s (this module imports nothing of bench): fit's time includes waiting for
the figures its worker draws after fit returns, so that they do not slow the next run.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable

from mm_lightning.errors import UsageError

DEFAULT = "2000,8000"
HELP = (
    "instead: steps/s as the marginal rate (N2-N1)/(T2-T1) of whole runs of N1 and N2 steps, so that start-up and "
    f"one-off work cancel (default {DEFAULT}: both past step ~900, where the diagnostics' stats worker starts, and "
    "under one 10000-step epoch, so both hold the same one-off work); --sizes defaults to small here"
)


def parse_lengths(text: str) -> tuple[int, int]:
    """'N1,N2' -> (N1, N2), refused in one line unless 0 < N1 < N2."""
    fix = f"give two step counts N1,N2 with 0 < N1 < N2, e.g. --marginal {DEFAULT}"
    parts = text.split(",")
    if len(parts) != 2:
        raise UsageError(f"--marginal {text!r}: expected two step counts, got {len(parts)}; {fix}")
    try:
        n1, n2 = (int(part) for part in parts)
    except ValueError:
        raise UsageError(f"--marginal {text!r}: not whole numbers; {fix}") from None
    if not 0 < n1 < n2:
        raise UsageError(f"--marginal {text!r}: N1 must be at least 1 and less than N2; {fix}")
    return n1, n2


def marginal_rates(
    runs: dict[str, Callable[[int], float]], n1: int, n2: int, repeats: int, label: str = ""
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per variant and repeat: the marginal steps/s and the run's one-off seconds (T1 less N1 steps at that rate).
    runs[name](steps) runs the variant for `steps` steps and returns the wall time of the whole run. A repeat whose
    longer run was not the slower (noise larger than N2 - N1 steps' worth) gives NaN, said on stderr. Each variant
    first runs once at N1 untimed."""
    for name in runs:  # what a process pays once (imports, the first compile's set-up) is no run's: paid untimed
        print(f"  [{label}warm-up] {name}: {runs[name](n1):.3f} s (not counted)", file=sys.stderr)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    one_off: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):  # reversed on odd repeats, lengths too: no variant or length always runs first
        jobs = [(name, n) for name in runs for n in (n1, n2)]
        seconds = {job: runs[job[0]](job[1]) for job in (jobs if r % 2 == 0 else reversed(jobs))}
        for name in runs:
            t1, t2 = seconds[name, n1], seconds[name, n2]
            rate = (n2 - n1) / (t2 - t1) if t2 > t1 else math.nan
            rates[name].append(rate)
            one_off[name].append(t1 - n1 / rate)
            said = f"{rate:,.0f} steps/s" if t2 > t1 else "no rate: the longer run was not slower (use longer runs)"
            print(f"  [{label}{r + 1}/{repeats}] {name}: {t1:.3f} s, {t2:.3f} s: {said}", file=sys.stderr)
    return rates, one_off


def median_spread(values: list[float]) -> dict:
    """A row's ratio fields (bench's table and this): the median of per-repeat values, their spread (max - min), in
    the row's units, and the values."""
    return {"ratio": statistics.median(values), "spread": max(values) - min(values), "per_repeat": values}


def marginal_rows(
    rates: dict[str, list[float]], one_off: dict[str, list[float]], base: str, n1: int, n2: int, row: dict
) -> list[dict]:
    """bench.format_table's rows: median marginal steps/s, the median and spread of per-repeat ratios to `base`, the
    median one-off seconds, and the diagnostics' cost (fit over fit without them). Repeats with no rate are left out
    of a row; a row with none left says so in its label."""

    def kept(values: list[float]) -> list[float]:
        return [v for v in values if not math.isnan(v)]

    rows = []
    for name, values in rates.items():
        ratios = kept([v / b for v, b in zip(values, rates[base])])  # within a repeat only
        what = f"{name}, marginal {n1}→{n2}"
        if not ratios:
            rows.append({**row, "what": f"{what}: no rate (use longer runs)", "steps_per_s": None, "ratio": None})
            continue
        rows.append({**row, "what": what, "steps_per_s": statistics.median(kept(values)), **median_spread(ratios)})
        rows[-1]["one_off_s"] = statistics.median(kept(one_off[name]))
    on, off = rates.get("fit (defaults)"), rates.get("fit, no diagnostics")
    if on and off and (costs := kept([b / a - 1 for a, b in zip(on, off)])):
        rows.append(
            {**row, "what": f"diagnostics cost, marginal {n1}→{n2}", "steps_per_s": None, **median_spread(costs)}
        )
    return rows


def timed(fn: Callable[..., object], *args, **kwargs) -> float:
    """The wall time of the whole call."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def run_marginal(
    n1: int, n2: int, repeats: int, sizes: list[str], variants: Callable[[str], tuple[str, dict, dict]]
) -> list[dict]:
    """The rows of every size; variants(size) gives the base variant's name, the runs (name: a function of the step
    count that runs the variant and returns its wall time) and the row's size fields (bench.marginal)."""
    rows = []
    for size in sizes:
        base, runs, row = variants(size)
        rates, one_off = marginal_rates(runs, n1, n2, repeats, label=f"{size} ")
        rows += marginal_rows(rates, one_off, base, n1, n2, {**row, "steps": n2 - n1})
    return rows
