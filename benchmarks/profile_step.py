"""Where a step of the default `fit` spends its CPU time, beside the lecture's own loop (docs/speed.md).

CPU time (time.thread_time_ns) at segment boundaries of the lean loop's `advance`, median per segment over the
steady steps (from step 500) of one 5500-step fit, then the same for the lecture's loop. For profiling only: it
replaces the lean loop's `advance` and the module's `training_step` by copies with clock reads between their lines.
The machine drifts: compare fit and lecture rows from one run, and run it twice.

    python benchmarks/profile_step.py [--data_path data/names.txt]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from mm_lightning import bench
from mm_lightning import module as module_file
from mm_lightning.cli import MakemoreCLI, _quiet_noise
from mm_lightning.model import MLP, MLPConfig
from mm_lightning.speed import lean, private

WARM_UP, STEPS = 500, 5500
clock = time.thread_time_ns
segments: dict[str, list[int]] = defaultdict(list)
state = {"t": 0, "end": None, "steady": False}


def mark(name: str) -> None:
    now = clock()
    if state["steady"]:
        segments[name].append(now - state["t"])
    state["t"] = now


def advance(self, data_fetcher) -> None:
    """lean.LeanEpochLoop.advance (CPU, one process), with clock reads between its parts."""
    trainer = self.trainer
    now = clock()
    state["steady"] = trainer.global_step >= WARM_UP
    if state["end"] is not None and state["steady"]:
        segments["0 the loop between two batches (on_advance_end, done)"].append(now - state["end"])
    state["t"] = now
    if self.restarting:
        return original_advance(self, data_fetcher)
    batch, _, __ = next(data_fetcher)
    mark("1 the batch (data fetcher)")
    batch_idx = self.batch_idx + 1
    self.batch_progress.is_last_batch = data_fetcher.done
    self.batch_progress.increment_ready()
    connector = private.logger_connector(trainer)
    connector.on_batch_start(batch)
    self._callbacks("on_train_batch_start", batch, batch_idx)
    mark("2 counters, connector, callbacks' on_train_batch_start")
    self.batch_progress.increment_started()
    batch_output = self._optimizer_step(batch, batch_idx)
    self.batch_progress.increment_processed()
    self._step_schedulers()
    mark("9 the SGD step's exit, the scheduler's step")
    if self._num_ready_batches_reached():
        self.update_lr_schedulers("epoch", update_plateau_schedulers=False)
    self._callbacks("on_train_batch_end", batch_output, batch, batch_idx)
    self._module_hook("on_train_batch_end", batch_output, batch, batch_idx)
    private.end_batch(trainer, refresh=self._is_training_done or private.validation_may_run(self))
    self.batch_progress.increment_completed()
    if private.logs_this_step(trainer):
        connector.update_train_step_metrics()
    mark("A callbacks' and module's on_train_batch_end, logging")
    state["end"] = clock()


def training_step(self, batch, batch_idx):
    mark("3 the SGD step's checks, the closure's entry")
    x, y = batch
    logits = self.training_forward(x)
    mark("4 forward")
    loss = F.cross_entropy(logits, y)
    mark("5 cross entropy")
    self.track_train_loss(loss)
    mark("6 track_train_loss")
    return loss


def backward_with_hooks(self, loss):
    mark("7 the closure's bookkeeping, zero_grad")
    original_backward(self, loss)
    mark("8 backward (with its hooks)")


def foreach_add_(*args, **kwargs):
    mark("8b SGDStep: the parameters with a gradient")
    out = original_foreach_add_(*args, **kwargs)
    mark("8c the SGD update (torch's foreach kernel)")
    return out


original_advance, original_backward, original_foreach_add_ = (
    lean.LeanEpochLoop.advance,
    lean.LeanEpochLoop._backward_with_hooks,
    private.foreach_add_,
)


def profile_fit(data_path: str) -> dict[str, float]:
    lean.LeanEpochLoop.advance, lean.LeanEpochLoop._backward_with_hooks = advance, backward_with_hooks
    module_file.MakemoreModule.training_step = module_file.MakemoreModule.graphable_training_step = training_step
    private.foreach_add_ = foreach_add_  # what SGDStep calls (mm_lightning/speed/sgd.py)
    with tempfile.TemporaryDirectory() as root:
        MakemoreCLI(
            ["fit", "--trainer.default_root_dir", root, "--trainer.max_steps", str(STEPS), "--data.path", data_path]
            + ["--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false"]
            + ["--diagnostics.every_n_steps", "0", "--trainer.enable_progress_bar", "false"]
        )
    return {name: statistics.median(v) / 1000 for name, v in sorted(segments.items())}


def profile_lecture(data_path: str) -> dict[str, float]:
    torch.set_num_threads(1)
    x, y, vocab = bench.train_split(data_path)
    torch.manual_seed(42)
    net = MLP(MLPConfig(vocab=vocab))
    params = list(net.parameters())
    g = torch.Generator().manual_seed(1)
    segments.clear()
    for i in range(STEPS):
        state["steady"], state["t"] = i >= WARM_UP, clock()
        ix = torch.randint(0, x.shape[0], (32,), generator=g)
        xb, yb = x[ix], y[ix]
        mark("1 the batch (torch.randint, indexing)")
        logits = net(xb)
        mark("4 forward")
        loss = F.cross_entropy(logits, yb)
        mark("5 cross entropy")
        for p in params:
            p.grad = None
        mark("7 zero_grad")
        loss.backward()
        mark("8 backward")
        lr = 0.1 if i < 150000 else 0.01
        for p in params:
            p.data += -lr * p.grad
        mark("8c the update (p.data += -lr * p.grad)")
    return {name: statistics.median(v) / 1000 for name, v in sorted(segments.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="data/names.txt")
    a = parser.parse_args()
    _quiet_noise()
    for title, result in (("fit", profile_fit(a.data_path)), ("lecture loop", profile_lecture(a.data_path))):
        print(f"\n{title}: CPU us per step, median over steps {WARM_UP}..{STEPS}")
        for name, us in result.items():
            print(f"  {name:58s} {us:7.1f}")
        print(f"  {'a step (sum of the medians)':58s} {sum(result.values()):7.1f}")


if __name__ == "__main__":
    main()
