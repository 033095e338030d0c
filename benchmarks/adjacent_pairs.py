"""The default `fit` against the lecture's loop on one thread, in runs adjacent in time: for a machine whose speed
changes over minutes (docs/measurements.md), where `python -m mm_lightning.bench`'s repeats span a change.

Each pair runs the lecture loop (1 thread, STEPS steps) and then `fit` (STEPS steady steps after its warm-up), in
this process, with bench.py's own `lecture_loop` and `fit_path`; the ratio is taken within the pair.

    python benchmarks/adjacent_pairs.py [--pairs 6] [--steps 4000] [--data_path data/names.txt]
"""

from __future__ import annotations

import argparse
import statistics

from mm_lightning import bench
from mm_lightning.cli import _quiet_noise
from mm_lightning.model import MLPConfig

VARIANTS = {"fit (defaults)": True, "fit, no diagnostics": False}  # name: diagnostics on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--data_path", default="data/names.txt")
    a = parser.parse_args()
    _quiet_noise()
    x, y, vocab = bench.train_split(a.data_path)
    config = MLPConfig(vocab=vocab)
    fit_steps = a.steps + a.steps // 10 // 100 * 100 + 100  # fit_path times after a tenth of its steps
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(a.pairs):
        for name, diagnostics in VARIANTS.items():
            lecture = bench.lecture_loop(x, y, config, 32, a.steps, "cpu", 1)
            fit = bench.fit_path(32, 100, fit_steps, "cpu", a.data_path, diagnostics).steps_per_s
            pairs[name].append((fit, lecture))
            print(f"  {name}: {fit:,.0f} steps/s, lecture loop 1 thread {lecture:,.0f}: {fit / lecture:.3f}")
    for name, values in pairs.items():
        ratios = [f / lec for f, lec in values]
        print(
            f"{name} / lecture loop, 1 thread: median {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f}); fit {statistics.median(f for f, _ in values):,.0f} steps/s, "
            f"lecture loop {statistics.median(lec for _, lec in values):,.0f}"
        )


if __name__ == "__main__":
    main()
