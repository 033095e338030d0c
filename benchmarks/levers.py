"""What each of the fast path's levers is worth: the default `fit` with all of them against `fit` with one turned off,
in one process, rounds alternating their order, each beside the lecture's loop on one thread (docs/speed.md).

A lever turned off is the code path it replaces, put back for that fit only: autograd for hand gradients
(handgrad.py), `scheduler.step()` for the MultiStepLR step (lrstep.py), `optimizer.step` for the SGD step (sgd.py),
TensorBoard's own checksum (tbcrc.py), TensorBoard's writer thread (tbsync.py), Lightning's flush after every logging
step (runlogger.py), and Lightning's own loop for the lean loop. Ratios are taken within a round (fit / the lecture
loop run just before or after it) and compared with the round's all-levers fit.

    python benchmarks/levers.py [--rounds 6] [--steps 6000] [--off handgrad tbsync ...] [--no_diagnostics]
"""

from __future__ import annotations

import argparse
import statistics

from lightning.pytorch.loggers import TensorBoardLogger

from mm_lightning import bench, runlogger
from mm_lightning.cli import _quiet_noise
from mm_lightning.model import MLPConfig
from mm_lightning.speed import lrstep, sgd, tbcrc, tbsync

ON = {
    "lrstep": (lrstep.MultiStepLRStep, "exact", lrstep.MultiStepLRStep.exact),
    "sgd": (sgd.SGDStep, "exact", sgd.SGDStep.exact),
    "tbcrc": (tbcrc.CRCSwap, "install", tbcrc.CRCSwap.install),
    "tbsync": (tbsync.TrainingThreadWrites, "install", tbsync.TrainingThreadWrites.install),
    "flush": (runlogger.RunLogger, "save", runlogger.RunLogger.save),
}
OFF = {
    "lrstep": lambda self, scheduler: False,
    "sgd": lambda self: False,
    "tbcrc": lambda self: "turned off by benchmarks/levers.py",
    "tbsync": lambda self, loggers: None,
    "flush": TensorBoardLogger.save,
}


def set_levers(off: str | None) -> tuple[str, ...]:
    """All levers on but `off`; returns the fit's extra CLI arguments (the lean loop and hand gradients are CLI
    options)."""
    for name, (owner, attribute, original) in ON.items():
        setattr(owner, attribute, OFF[name] if name == off else original)
    cli = {"lean_loop": ("--fast_path.lean_loop", "false"), "handgrad": ("--fast_path.hand_gradients", "false")}
    return cli.get(off, ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument(
        "--off",
        nargs="+",
        default=["handgrad", "tbsync", "tbcrc", "flush", "lrstep"],
        choices=[*ON, "lean_loop", "handgrad"],
    )
    parser.add_argument("--no_diagnostics", action="store_true")
    parser.add_argument("--data_path", default="data/names.txt")
    a = parser.parse_args()
    _quiet_noise()
    x, y, vocab = bench.train_split(a.data_path)
    config = MLPConfig(vocab=vocab)
    runs = ["all levers", *(f"{name} off" for name in a.off)]
    ratios: dict[str, list[float]] = {run: [] for run in runs}
    try:
        for r in range(a.rounds):
            lecture = bench.lecture_loop(x, y, config, 32, a.steps, "cpu", 1)
            for run in runs if r % 2 == 0 else reversed(runs):
                extra = set_levers(None if run == "all levers" else run.removesuffix(" off"))
                fit = bench.fit_path(32, 100, a.steps, "cpu", a.data_path, not a.no_diagnostics, extra).steps_per_s
                ratios[run].append(fit / lecture)
            print(f"  round {r + 1}: " + ", ".join(f"{run} {ratios[run][-1]:.3f}" for run in runs), flush=True)
    finally:
        set_levers(None)
    what = "fit, no diagnostics" if a.no_diagnostics else "fit (defaults)"
    print(f"\n{what} against the one-thread lecture loop ({a.rounds} rounds of {a.steps} steps)")
    print("| run | vs lecture loop, median (range) | time a step, against all levers (median) |\n| --- | ---: | ---: |")
    for run in runs:
        values = ratios[run]
        cost = statistics.median(all_ / v - 1 for v, all_ in zip(values, ratios["all levers"]))
        share = "" if run == "all levers" else f"{100 * cost:+.1f}%"
        print(f"| {run} | {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}) | {share} |")


if __name__ == "__main__":
    main()
