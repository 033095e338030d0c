"""How fast can anything inside Lightning's fit loop go? (docs/measurements.md, docs/speed.md)

Runs `fit` with the lean loop's `advance` replaced by the bare minimum: fetch the batch, forward, zero_grad, backward,
one foreach SGD kernel, the progress counters (no hooks, no logging, no checks: the results are not `fit`'s, the
time is what is left of Lightning's loop around the network). Beside it, in the same process, the lecture's loop
with the same foreach update. Prints mean wall us per step (from step 1000) of: fetching the batch, the network and
update, and everything outside `advance`, and the whole cycle.

    python benchmarks/lightning_floor.py [--steps 8000] [--data_path data/names.txt]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from mm_lightning import bench
from mm_lightning.cli import MakemoreCLI, _quiet_noise
from mm_lightning.model import MLP, MLPConfig
from mm_lightning.speed import lean

WARM_UP = 1000
times: dict[str, list[float]] = {"fetch": [], "network and update": [], "outside advance": [], "a step": []}
marks = {"end": None, "start": None}
original_advance = lean.LeanEpochLoop.advance


def bare_advance(self, data_fetcher) -> None:
    if self.restarting:
        return original_advance(self, data_fetcher)
    t0 = time.perf_counter()
    counted = self.trainer.global_step > WARM_UP
    if counted and marks["end"] is not None:
        times["outside advance"].append(t0 - marks["end"])
        times["a step"].append(t0 - marks["start"])
    marks["start"] = t0
    x, y = next(data_fetcher)[0]
    t1 = time.perf_counter()
    loss = F.cross_entropy(self.lean_module.net(x), y)
    for p in self.lean_params:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        torch._foreach_add_(self.lean_params, [p.grad for p in self.lean_params], alpha=-0.1)
    t2 = time.perf_counter()
    if counted:
        times["fetch"].append(t1 - t0)
        times["network and update"].append(t2 - t1)
    self.automatic_optimization.optim_progress.optimizer.step.increment_completed()  # global_step
    for count in ("ready", "started", "processed", "completed"):
        getattr(self.batch_progress, f"increment_{count}")()
    self.batch_progress.is_last_batch = data_fetcher.done
    marks["end"] = time.perf_counter()


def lecture_loop(x, y, config: MLPConfig, steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(42)
    net = MLP(config)
    params = list(net.parameters())
    g = torch.Generator().manual_seed(1)
    fetch, network, step, previous = [], [], [], None
    for i in range(steps):
        t0 = time.perf_counter()
        if i > WARM_UP:
            step.append(t0 - previous)
        previous = t0
        ix = torch.randint(0, x.shape[0], (32,), generator=g)
        xb, yb = x[ix], y[ix]
        t1 = time.perf_counter()
        loss = F.cross_entropy(net(xb), yb)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        t2 = time.perf_counter()
        if i > WARM_UP:
            fetch.append(t1 - t0)
            network.append(t2 - t1)
    return {
        "fetch": statistics.mean(fetch),
        "network and update": statistics.mean(network),
        "a step": statistics.mean(step),
    }


def bare_fit(steps: int, data_path: str) -> None:
    """`fit` (CPU, no validation, diagnostics or progress bar) with the lean loop's advance cut down (bare_advance)."""
    lean.LeanEpochLoop.advance = bare_advance
    try:
        with tempfile.TemporaryDirectory() as root:
            MakemoreCLI(
                ["fit", "--trainer.default_root_dir", root, "--trainer.max_steps", str(steps), "--data.path", data_path]
                + ["--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false"]
                + ["--diagnostics.every_n_steps", "0", "--trainer.enable_progress_bar", "false"]
                + ["--trainer.accelerator", "cpu"]
            )
    finally:
        lean.LeanEpochLoop.advance = original_advance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--data_path", default="data/names.txt")
    a = parser.parse_args()
    _quiet_noise()
    x, y, vocab = bench.train_split(a.data_path)
    for _ in range(2):
        lecture = lecture_loop(x, y, MLPConfig(vocab=vocab), a.steps)
        print("lecture loop, foreach update: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in lecture.items()))
        for values in times.values():
            values.clear()
        marks["end"] = None
        bare_fit(a.steps, a.data_path)
        print(
            "Lightning's loop, bare advance: "
            + ", ".join(f"{k} {statistics.mean(v) * 1e6:.0f} us" for k, v in times.items())
        )


if __name__ == "__main__":
    main()
