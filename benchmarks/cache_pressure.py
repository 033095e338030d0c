"""Why the same network runs slower inside `fit` than in the lecture's loop (docs/speed.md, "Where a step's time goes").

The lecture's loop on one thread, its forward, backward and update timed apart (CPU time, median over the steady
steps), with and without Python work between two steps that reads N small dictionaries (each a dict, a list and a
string, as Lightning's bookkeeping reads its objects). The work itself is not timed: only how much slower the
network's own ops run after it. Rounds alternate with and without, so the machine's drift hits both.

    python benchmarks/cache_pressure.py [--objects 300 1000 3000 10000] [--steps 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mm_lightning import bench
from mm_lightning.model import MLP, MLPConfig

clock = time.thread_time_ns


def steps(x, y, net, params, junk: list[dict], n: int) -> tuple[float, float, float]:
    """Median forward, backward and update CPU us of n steps, `junk` read between each two."""
    g = torch.Generator().manual_seed(1)
    forward, backward, update = [], [], []
    for _ in range(n):
        total = 0
        for d in junk:  # the untimed work between two steps
            total += d["a"] + len(d["b"]) + len(d["c"])
        ix = torch.randint(0, x.shape[0], (32,), generator=g)
        t0 = clock()
        logits = net(x[ix])
        t1 = clock()
        loss = F.cross_entropy(logits, y[ix])
        for p in params:
            p.grad = None
        t2 = clock()
        loss.backward()
        t3 = clock()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        t4 = clock()
        forward.append(t1 - t0), backward.append(t3 - t2), update.append(t4 - t3)
    steady = n // 5
    return tuple(statistics.median(v[steady:]) / 1000 for v in (forward, backward, update))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="data/names.txt")
    parser.add_argument("--objects", type=int, nargs="+", default=[300, 1000, 3000, 10000])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(1)
    x, y, vocab = bench.train_split(a.data_path)
    torch.manual_seed(42)
    net = MLP(MLPConfig(vocab=vocab))
    params = list(net.parameters())
    print("CPU us per step of the lecture's model, median; slower: the three together against the bare loop's")
    print("| objects read between steps | forward | backward | update | slower |\n| ---: | ---: | ---: | ---: | ---: |")
    for count in a.objects:
        junk = [{"a": i, "b": [i, i + 1], "c": str(i)} for i in range(count)]
        bare, loaded = [], []
        for _ in range(a.rounds):
            bare.append(steps(x, y, net, params, [], a.steps))
            loaded.append(steps(x, y, net, params, junk, a.steps))
        base = statistics.median(sum(r) for r in bare)
        for label, rows in (("0", bare), (f"{count:,}", loaded)):
            f, b, u = (statistics.median(r[i] for r in rows) for i in range(3))
            print(f"| {label} | {f:.0f} | {b:.0f} | {u:.0f} | {100 * ((f + b + u) / base - 1):+.0f}% |")


if __name__ == "__main__":
    main()
