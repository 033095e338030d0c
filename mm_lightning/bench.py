"""Benchmark: this project's `fit` against the lecture's own training loop, in one process, on the same data and
model. Machines like this one drift by several percent over minutes, so each repeat runs every variant back to
back, in an order that alternates between repeats (so that no variant always runs first, or right after another),
ratios are taken within a repeat (variants that ran minutes apart are never compared), and the median of the
per-repeat ratios is reported, with the median steps/s.

Run: python -m mm_lightning.bench [--steps 10000] [--repeats 5] [--device cpu|cuda] [--sizes small,wide] [--no_compile]
     python -m mm_lightning.bench --blocks 4 --steps 20000   # the diagnostics' cost inside runs, free of drift
     python -m mm_lightning.bench --short_run 300 --repeats 5  # the default callback on a short demo fit
     python -m mm_lightning.bench --fold --repeats 5            # E02: eval with BatchNorm folded vs not
     python -m mm_lightning.bench --marginal 2000,8000          # (N2-N1)/(T2-T1) of whole runs: bench_marginal.py

Rows:
- lecture loop: makemore part 3's loop (torch.randint minibatch, forward, p.grad = None, backward,
  p.data += -lr * p.grad), PyTorch's default thread count;
- lecture loop, 1 thread: the same loop with the one-thread setting fit picks for small models (for honesty);
- lecture loop, compiled, 1 thread: the same loop with the network run through torch.compile (forward and
  backward compiled; the first step's compile is its "one-off s"), the peer of fit --model.compile;
- one CUDA graph per step (GPU only): the lecture's whole step (minibatch draw, forward, backward, SGD)
  captured once and replayed, no Python per step: a floor that fit's GPU path is measured against;
- fit: `python -m mm_lightning.cli fit` with its defaults (progress bar, diagnostics every 100 steps,
  validation and checkpoints every epoch), timed in its steady state (after a tenth of the steps, as the lecture
  loop after its warm-up); what a run pays once (step 0's diagnostics and figures, the last validation, checkpoint
  and figures) is the "one-off s" column: over a 200000-step run it is spread over 20x more steps than here;
- fit, no diagnostics: the same with --diagnostics.every_n_steps 0 (so the diagnostics' cost is the ratio);
- fit, plain Lightning loop: fit with --fast_path.lean_loop false (what the fast path buys);
- fit, compiled: fit with --model.compile true (its compile is inside "one-off s"; the diagnostics' sampled
  steps run the network eagerly, see docs/compile.md);
- fit, eager steps (GPU only): fit with --fast_path.cuda_graph false, every step launched op by op;
- eval: one pass over the whole val split with BatchNorm in eval mode, in examples/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F

from mm_lightning import bench_marginal
from mm_lightning.data import DEFAULT_PATH, NamesDataModule, download_names
from mm_lightning.errors import UsageError
from mm_lightning.model import MLP, MLPConfig

SIZES = {  # name: (batch size, hidden width, steps for a measurement)
    "small": (32, 100, None),  # the lecture's: --steps
    "wide": (4096, 1024, 60),  # how the cost grows: large matmuls, where threads and GPUs pay off
}


PLAIN = ("--fast_path.lean_loop", "false")  # what the fast path buys: Lightning's own loop, the same results
COMPILED = ("--model.compile", "true")  # torch.compile's default mode


class Stopwatch(L.Callback):
    """Times fit's steady state: from the batch at step `warm_up` to the end of the last batch (as the lecture loop
    is timed after its warm-up). What a run pays once on top (step 0's diagnostics and figures, the figure worker's
    start, the final validation, checkpoint and figures) is kept apart: `one_off` seconds.

    Its per-step hooks are kept to a clock read and an attribute or two (the lecture loop it is compared with has no
    such apparatus): the device and the warm-up's end are decided once, in on_train_start, steps are counted, not read
    from the trainer, and on CUDA only the window's ends wait for the device (a wait every step would slow the fit)."""

    def __init__(self, warm_up: int = 0):
        self.warm_up = warm_up

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._cuda = trainer.strategy.root_device.type == "cuda"
        self.start = self._now()
        self.warm = None
        self._to_warm = max(0, self.warm_up - trainer.global_step)  # batches before the window (one a step here)
        # batches before the last one, whose end closes the window (max_steps -1, no step limit: every batch's end)
        self._to_last = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.warm is None:  # once it is set, one attribute test a step
            if self._to_warm:
                self._to_warm -= 1
            else:
                self.warm, self.warm_step = self._now(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._to_last -= 1
        self.last = time.perf_counter() if self._to_last > 0 else self._now()

    def on_train_end(self, trainer, pl_module):
        end = self._now()
        self.steps = trainer.global_step - self.warm_step
        self.steps_per_s = self.steps / (self.last - self.warm)
        self.one_off = (end - self.start) - trainer.global_step / self.steps_per_s  # beyond the steady rate


class DiagnosticsBlocks(L.Callback):
    """The diagnostics' cost measured inside one run, free of the machine's drift: diagnostics sample in even blocks
    of `block` steps and are off in odd ones; the cost is the mean batch time of on-blocks over off-blocks."""

    def __init__(self, block: int = 1000):
        self.block, self.starts = block, []

    def _diagnostics(self, trainer):
        from mm_lightning.diagnostics.callback import TrainingDiagnostics

        return next(cb for cb in trainer.callbacks if isinstance(cb, TrainingDiagnostics))

    def on_train_start(self, trainer, pl_module):
        self.every = self._diagnostics(trainer).every_n_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append((trainer.global_step, time.perf_counter()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # set up the next batch
        on = (trainer.global_step // self.block) % 2 == 0
        self._diagnostics(trainer).every_n_steps = self.every if on else 0

    def cost(self) -> float:
        times = {True: [], False: []}
        for (step, t), (_, t_next) in zip(self.starts, self.starts[1:]):
            if step >= self.block:  # the first block holds step 0's one-off work
                times[(step // self.block) % 2 == 0].append(t_next - t)
        return statistics.mean(times[True]) / statistics.mean(times[False]) - 1


def _fit_with(watcher: str, args: list[str]) -> tuple[L.Callback, float]:
    """Run `fit` (in this process, in a temporary directory) with one of this file's callbacks added, given by class
    name with its init args after it; returns the instance the CLI made and the whole fit's wall time (the CLI's
    start-up, training, validation, checkpoints and figures: all but the temporary directory's removal)."""
    from mm_lightning import bench  # the module the CLI imports the class from (this file may run as __main__)
    from mm_lightning.cli import MakemoreCLI
    from mm_lightning.diagnostics import TrainingDiagnostics

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cli = MakemoreCLI(
            ["fit", "--trainer.default_root_dir", root, "--trainer.enable_model_summary", "false"]
            + [f"--trainer.callbacks+=mm_lightning.bench.{watcher}", *args]
        )
        for callback in cli.trainer.callbacks:  # the last figures, drawn after fit returns: this run's work, not the
            if isinstance(callback, TrainingDiagnostics):  # next variant's (and their directory is still there)
                callback.wait()
        seconds = time.perf_counter() - start
        return next(cb for cb in cli.trainer.callbacks if isinstance(cb, getattr(bench, watcher))), seconds


def diagnostics_blocks(steps: int, repeats: int, data_path: str, extra: tuple = ()) -> list[float]:
    """Per-run costs of the diagnostics at their defaults, measured by DiagnosticsBlocks (CPU, the lecture's size)."""
    costs = []
    for r in range(repeats):
        args = ["--trainer.max_steps", str(steps), "--data.path", data_path, "--data.steps_per_epoch", str(steps)]
        args += ["--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu", *extra]
        costs.append(_fit_with("DiagnosticsBlocks", args)[0].cost())
        print(f"  [blocks {r + 1}/{repeats}] diagnostics cost {100 * costs[-1]:+.1f}%", file=sys.stderr)
    return costs


def train_split(data_path: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The names' training split as (contexts, next characters), and its vocabulary: what every loop here trains on."""
    dm = NamesDataModule(path=data_path)
    dm.setup()
    x, y = dm.splits["train"].tensors()
    return x, y, dm.vocab


def lecture_loop(
    x, y, config: MLPConfig, batch_size: int, steps: int, device: str, threads: int | None, compiled: bool = False
) -> float | tuple[float, float]:
    """The lecture's loop on the lecture's model, as nn modules; returns steps/s (compiled: and the seconds its first
    step took, the compile)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(42)
        net = MLP(config).to(device)
        params = list(net.parameters())
        if compiled:
            torch._dynamo.reset()  # a fresh compile each repeat, as a new process would do (and no recompile limit)
        forward = torch.compile(net) if compiled else net
        x, y = x.to(device), y.to(device)
        g = torch.Generator(device=device).manual_seed(2147483647)
        warmup = 20
        for i in range(steps + warmup):
            if i == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            if i == 0:
                first = time.perf_counter()
            ix = torch.randint(0, x.shape[0], (batch_size,), generator=g, device=device)
            loss = F.cross_entropy(forward(x[ix]), y[ix])
            for p in params:
                p.grad = None
            loss.backward()
            lr = 0.1 if i < 150000 else 0.01
            for p in params:
                p.data += -lr * p.grad
            if i == 0:
                if device == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - first
        if device == "cuda":
            torch.cuda.synchronize()
        speed = steps / (time.perf_counter() - start)
        return (speed, first - 1 / speed) if compiled else speed
    finally:
        torch.set_num_threads(previous)


def graph_floor(x, y, config: MLPConfig, batch_size: int, steps: int, device: str) -> float:
    """The lecture's step as one CUDA graph, replayed `steps` times back to back; returns steps/s."""
    torch.manual_seed(42)
    net = MLP(config).to(device)
    params = list(net.parameters())
    x, y = x.to(device), y.to(device)

    def step():
        ix = torch.randint(0, x.shape[0], (batch_size,), device=device)  # graph-safe: philox offsets
        loss = F.cross_entropy(net(x[ix]), y[ix])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-0.1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


class FitTimes(NamedTuple):
    steps_per_s: float  # in the steady window (Stopwatch)
    one_off_s: float  # what the run paid beyond its steady rate
    total_s: float  # the whole fit call, start-up to the last figure (for the marginal rate: bench_marginal.py)


def fit_path(
    batch_size: int, hidden: int, steps: int, device: str, data_path: str, diagnostics: bool, extra: tuple = ()
) -> FitTimes:
    """This project's fit through its CLI (in this process), default settings. The steady window starts after a
    tenth of the steps (a multiple of 100, so it holds whole diagnostics periods)."""
    warm_up = steps // 10 // 100 * 100
    args = ["--trainer.callbacks.warm_up", str(warm_up), "--trainer.max_steps", str(steps), "--data.path", data_path]
    args += ["--data.batch_size", str(batch_size), "--model.net.n_hidden", str(hidden)]
    args += ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1"]
    if not diagnostics:
        args += ["--diagnostics.every_n_steps", "0"]
    if "--model.compile" in extra:
        torch._dynamo.reset()  # a fresh compile each repeat, as a new process would do (and no recompile limit)
    watch, seconds = _fit_with("Stopwatch", args + list(extra))
    return FitTimes(watch.steps_per_s, watch.one_off, seconds)


@torch.no_grad()
def eval_throughput(x, y, config: MLPConfig, device: str, repeats: int = 5) -> float:
    net = MLP(config).to(device).eval()
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        F.cross_entropy(net(x), y).item()
        times.append(time.perf_counter() - start)
    return len(y) / statistics.median(times[1:])


def run(steps: int, repeats: int, device: str, sizes: list[str], data_path: str, compiled: bool = True) -> list[dict]:
    from mm_lightning.cli import _quiet_noise

    _quiet_noise()
    dm = NamesDataModule(path=data_path)
    dm.setup()
    (xtr, ytr), (xva, yva) = dm.splits["train"].tensors(), dm.splits["val"].tensors()
    rows = []
    for size in sizes:
        batch, hidden, size_steps = SIZES[size]
        n = size_steps or steps
        config = MLPConfig(vocab=dm.vocab, n_hidden=hidden)
        runs = {
            "lecture loop": partial(lecture_loop, xtr, ytr, config, batch, n, device, None),
            "lecture loop, 1 thread": partial(lecture_loop, xtr, ytr, config, batch, n, device, 1),
            "fit (defaults)": partial(fit_path, batch, hidden, n, device, data_path, True),
            "fit, no diagnostics": partial(fit_path, batch, hidden, n, device, data_path, False),
            "fit, plain Lightning loop": partial(fit_path, batch, hidden, n, device, data_path, True, PLAIN),
            "lecture loop, compiled, 1 thread": partial(lecture_loop, xtr, ytr, config, batch, n, device, 1, True),
            "fit, compiled": partial(fit_path, batch, hidden, n, device, data_path, True, COMPILED),
        }
        if not compiled:
            del runs["lecture loop, compiled, 1 thread"], runs["fit, compiled"]
        if device == "cuda":
            del runs["lecture loop, 1 thread"]
            if compiled:
                del runs["lecture loop, compiled, 1 thread"]
                runs["lecture loop, compiled"] = partial(lecture_loop, xtr, ytr, config, batch, n, device, None, True)
            runs["one CUDA graph per step"] = partial(graph_floor, xtr, ytr, config, batch, n, device)
            eager = ("--fast_path.cuda_graph", "false")  # what the CUDA graph buys, within fit
            runs["fit, eager steps"] = partial(fit_path, batch, hidden, n, device, data_path, True, eager)
        measured: dict[str, list[float]] = {name: [] for name in runs}
        one_off: dict[str, list[float]] = {}
        for r in range(repeats):  # interleaved, so that slow phases of the machine hit every row alike, and in
            order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternating order: no seat is favoured
            for name in order:
                result = runs[name]()
                if isinstance(result, tuple):  # fit (FitTimes) and the compiled loop: steps/s, one-off seconds
                    result, seconds = result[:2]
                    one_off.setdefault(name, []).append(seconds)
                measured[name].append(result)
                print(f"  [{size} {r + 1}/{repeats}] {name}: {_speed(result)} steps/s", file=sys.stderr)
        row = {"size": size, "batch": batch, "hidden": hidden, "device": device, "steps": n}
        lecture = measured["lecture loop"]
        floor = measured.get("one CUDA graph per step")
        for name, values in measured.items():
            ratios = [v / base for v, base in zip(values, lecture)]  # within a repeat only
            rows.append(
                {**row, "what": name, "steps_per_s": statistics.median(values), **bench_marginal.median_spread(ratios)}
            )
            if floor:
                rows[-1]["vs_floor"] = statistics.median(v / f for v, f in zip(values, floor))
            if name in one_off:
                rows[-1]["one_off_s"] = statistics.median(one_off[name])
        costs = [off / on - 1 for on, off in zip(measured["fit (defaults)"], measured["fit, no diagnostics"])]
        rows.append({**row, "what": "diagnostics cost", "steps_per_s": None, **bench_marginal.median_spread(costs)})
        speed = eval_throughput(xva, yva, config, device)
        rows.append(
            {
                **row,
                "batch": None,
                "what": "eval, whole val split",
                "steps": len(yva),
                "steps_per_s": speed,
                "ratio": None,
                "spread": None,
            }
        )
    return rows


def marginal(n1: int, n2: int, repeats: int, device: str, sizes: list[str], data_path: str, compiled: bool) -> list:
    """--marginal N1,N2 (bench_marginal.py): steps/s as (N2-N1)/(T2-T1), T the wall time of a whole run: the lecture
    loop's whole call (model built, warm-up, loop), fit's whole call (FitTimes.total_s). The base: the lecture loop
    with one thread on CPU (fit's choice for small models), as the lecture loop row of run() on CUDA."""
    from mm_lightning.cli import _quiet_noise

    _quiet_noise()
    x, y, vocab = train_split(data_path)
    threads, one = (1, ", 1 thread") if device == "cpu" else (None, "")

    def variants(size: str) -> tuple[str, dict, dict]:
        batch, hidden, _ = SIZES[size]
        config = MLPConfig(vocab=vocab, n_hidden=hidden)

        def loop(compile_: bool):  # the steps: lecture_loop's fifth argument
            call = (bench_marginal.timed, lecture_loop, x, y, config, batch)
            return partial(*call, device=device, threads=threads, compiled=compile_)

        def fit(diagnostics: bool, extra: tuple = ()):
            return lambda n: fit_path(batch, hidden, n, device, data_path, diagnostics, extra).total_s

        runs = {f"lecture loop{one}": loop(False), "fit (defaults)": fit(True), "fit, no diagnostics": fit(False)}
        if compiled:
            runs |= {f"lecture loop, compiled{one}": loop(True), "fit, compiled": fit(True, COMPILED)}
        return f"lecture loop{one}", runs, {"size": size, "batch": batch, "hidden": hidden, "device": device}

    return bench_marginal.run_marginal(n1, n2, repeats, sizes, variants)


class _DemoLM(L.LightningModule):
    """Lightning's demo Transformer (nn.Transformer, F.relu inside) as a language model on random tokens."""

    def __init__(self):
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=1000, ninp=32, nhead=2, nhid=64, nlayers=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _timed_hooks(callback: L.Callback) -> dict[str, float]:
    """Seconds spent in each of callback's hooks, filled in as they run: the cost that is the callback's own, free
    of the drift between two fits."""
    spent: dict[str, float] = {}
    hooks = ("on_fit_start", "on_train_start", "on_train_batch_start", "on_train_batch_end")
    for name in (*hooks, "on_train_end", "teardown"):  # the last two: what fit waits for at its end
        hook = getattr(callback, name)

        def timed(*args, _hook=hook, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start

        setattr(callback, name, timed)
    return spent


def short_run(steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Per repeat: the wall time of `Trainer.fit` of the demo Transformer for `steps` steps with
    TrainingDiagnostics() at its defaults over the same fit without it (back to back, order alternating), and the
    share of the fit's time spent inside the callback's hooks."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from mm_lightning.diagnostics import TrainingDiagnostics

    shares: list[float] = []

    def fit(diagnostics: bool) -> float:
        torch.manual_seed(0)
        tokens = torch.randint(0, 1000, (2, steps * 8, 16))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tokens), batch_size=8)
        callback = TrainingDiagnostics()
        spent = _timed_hooks(callback)
        with tempfile.TemporaryDirectory() as d:
            trainer = L.Trainer(
                max_steps=steps,
                callbacks=[callback] if diagnostics else [],
                logger=TensorBoardLogger(d),
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
            start = time.perf_counter()
            trainer.fit(_DemoLM(), data)
            elapsed = time.perf_counter() - start
            if diagnostics:  # the figures it draws after fit, before their directory goes
                callback.wait()
                shares.append(sum(spent.values()) / elapsed)
        return elapsed

    ratios = []
    for r in range(repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        times = dict((d, fit(d)) for d in order)
        ratios.append(times[True] / times[False])
        print(
            f"repeat {r}: without {times[False]:.2f} s, with {times[True]:.2f} s, ratio {ratios[-1]:.3f}, "
            f"in the callback's hooks {100 * shares[-1]:.1f}% of its fit",
            flush=True,
        )
    return ratios, shares


def fold_speedup(data_path: str, repeats: int, device: str) -> list[float]:
    """Per repeat: examples/s of the lecture's deep network in eval mode over the whole val split with every
    BatchNorm folded into its Linear (mm_lightning.fold), over the same network unfolded (order alternating)."""
    from mm_lightning.lecture.fold import fold_batchnorm

    data = NamesDataModule(path=data_path)
    data.setup()
    x, y = (t.to(device) for t in data.splits["val"].tensors())
    torch.manual_seed(0)
    net = MLP(MLPConfig(vocab=data.vocab)).eval()
    for m in net.modules():  # running statistics as a trained network has them
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    nets = {"batchnorm": net.to(device), "folded": fold_batchnorm(net.cpu()).to(device)}
    net.to(device)

    @torch.no_grad()
    def speed(model) -> float:
        times = []
        for _ in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            F.cross_entropy(model(x), y).item()
            times.append(time.perf_counter() - start)
        return len(y) / statistics.median(times[1:])

    ratios = []
    for r in range(repeats):
        order = ("batchnorm", "folded") if r % 2 == 0 else ("folded", "batchnorm")
        got = {name: speed(nets[name]) for name in order}
        ratios.append(got["folded"] / got["batchnorm"])
        print(f"repeat {r}: batchnorm {got['batchnorm']:,.0f}/s, folded {got['folded']:,.0f}/s, x{ratios[-1]:.2f}")
    return ratios


def _speed(steps_per_s: float) -> str:
    return f"{steps_per_s:,.0f}" if steps_per_s >= 100 else f"{steps_per_s:.2f}"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| size | device | what | steps/s | vs lecture loop | spread | vs CUDA-graph floor | one-off s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        size = f"{r['size']} (batch {r['batch']}, width {r['hidden']})" if r["batch"] else r["size"]
        if r["what"].startswith("eval"):
            speed, ratio, spread = f"{r['steps_per_s']:,.0f} examples/s", "", ""
        elif r["ratio"] is None:  # a marginal row without a rate: its label says why
            speed, ratio, spread = "", "", ""
        elif r["steps_per_s"] is None:  # the diagnostics' cost: a fraction, per repeat
            speed, ratio, spread = "", f"{100 * r['ratio']:+.1f}% time", f"{100 * r['spread']:.1f} pts"
        else:
            speed, ratio, spread = _speed(r["steps_per_s"]), f"{r['ratio']:.2f}x", f"{r['spread']:.2f}"
        floor = f"{r['vs_floor']:.2f}x" if r.get("vs_floor") is not None else ""
        once = f"{r['one_off_s']:.2f}" if r.get("one_off_s") is not None else ""
        lines.append(f"| {size} | {r['device']} | {r['what']} | {speed} | {ratio} | {spread} | {floor} | {once} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UsageError as e:  # a missing or unusable names file: one line, as the CLI says it
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm_lightning.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps per measurement (small size)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of every variant; medians are reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default=None, help=f"comma-separated, of {', '.join(SIZES)} (default: small,wide)")
    p.add_argument("--data_path", default=DEFAULT_PATH)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--no_compile", action="store_true", help="leave out the torch.compile rows (their compiles)")
    p.add_argument(
        "--blocks",
        type=int,
        default=0,
        metavar="RUNS",
        help="instead: the diagnostics' cost inside RUNS runs of --steps, on/off in alternating 1000-step blocks",
    )
    p.add_argument(
        "--short_run",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead: the default diagnostics' cost on a fit of Lightning's demo Transformer of STEPS steps",
    )
    p.add_argument("--fold", action="store_true", help="instead: eval speed of E02's folded BatchNorm network")
    p.add_argument("--marginal", nargs="?", const=bench_marginal.DEFAULT, metavar="N1,N2", help=bench_marginal.HELP)
    a = p.parse_args(argv)
    # bad arguments first: before any download or work
    lengths = bench_marginal.parse_lengths(a.marginal) if a.marginal is not None else None
    if lengths and (a.fold or a.short_run or a.blocks):
        raise UsageError("--marginal is a mode of its own: leave out --fold, --short_run and --blocks")
    sizes = [s for s in (a.sizes or ("small" if lengths else "small,wide")).split(",") if s]
    if unknown := [s for s in sizes if s not in SIZES]:
        p.error(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if a.data_path == DEFAULT_PATH and not Path(a.data_path).exists() and not a.short_run:
        download_names(Path(a.data_path), instead=" or pass --data_path FILE")  # (the DataModule would name its own)
    if a.fold:
        ratios = fold_speedup(a.data_path, a.repeats, a.device)
        print(
            f"E02, whole val split, eval mode, {a.device}: "
            f"folded over unfolded, median x{statistics.median(ratios):.2f}"
        )
        return 0
    if a.short_run:
        from mm_lightning.cli import _quiet_noise

        _quiet_noise()
        ratios, shares = short_run(a.short_run, a.repeats)
        print(
            f"demo Transformer, {a.short_run} steps, TrainingDiagnostics() at its defaults over none, "
            f"{a.repeats} repeats:"
        )
        print(f"median ratio {statistics.median(ratios):.3f}, per repeat " + ", ".join(f"{x:.3f}" for x in ratios))
        print(f"time inside the callback's hooks: median {100 * statistics.median(shares):.1f}% of its fit")
        return 0
    if a.blocks:
        if a.steps < 4000:
            p.error("--blocks needs --steps 4000 or more (blocks of 1000 steps, the first one left out)")
        from mm_lightning.cli import _quiet_noise

        _quiet_noise()
        costs = diagnostics_blocks(a.steps, a.blocks, a.data_path)
        print(f"diagnostics cost at every_n_steps 100, on/off in alternating 1000-step blocks, {a.blocks} runs:")
        print(f"median {100 * statistics.median(costs):+.1f}%, per run " + ", ".join(f"{100 * c:+.1f}%" for c in costs))
        return 0
    if lengths:
        rows = marginal(*lengths, a.repeats, a.device, sizes, a.data_path, compiled=not a.no_compile)
    else:
        rows = run(a.steps, a.repeats, a.device, sizes, a.data_path, compiled=not a.no_compile)
    hardware = f"{a.device}: " + (
        torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    )
    if a.json:  # first: a table that fails to print loses nothing measured
        a.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{hardware}, torch {torch.__version__}, {a.repeats} repeats")
    print("ratios and spreads are per repeat (median, max - min), never across repeats")
    if lengths:
        print(
            f"marginal rates: (N2-N1)/(T2-T1) of whole runs of {lengths[0]} and {lengths[1]} steps; "
            "one-off s: a run's time beyond its steps at that rate"
        )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
