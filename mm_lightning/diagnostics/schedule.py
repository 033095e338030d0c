"""Scheduling: which steps are sampled, and where a sampled step's statistics are computed and its figures drawn.

Step 0 and every every_n_steps are sampled (capture.py attaches the hooks). At the end of a sampled batch the captured
tensors are summarised in this process (the first INLINE_SAMPLES of a fit, and whatever is not on one CPU process)
or handed to the statistics worker process, whose answers are recorded a batch or more later, in order (worker.py).
Figures always go to a figures worker process of their own (figure_jobs.py), which writes them itself: training,
and a script's exit (EXIT_WAIT), never wait long for them.
"""

from __future__ import annotations

import atexit
import os
import time

import lightning as L
import torch
import torch.distributed as dist

from . import figures
from .capture import _merge
from .logs import _say
from .stats import CapturedParams, summarize
from .worker import Worker

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    dist.all_reduce(t, op=_OPS[op])
    return t


_FINISHING: list[Worker] = []  # workers still drawing after their fit returned, in any TrainingDiagnostics


def _settle(worker: Worker, timeout: float) -> bool:
    """Wait for a finished worker to exit; the figures it died without drawing are drawn here. True when done."""
    if not worker.wait(timeout):
        return False
    if worker in _FINISHING:
        _FINISHING.remove(worker)
    jobs = [job for kind, job in worker.unanswered if kind == "figures"]
    worker.unanswered.clear()
    if jobs:
        _say(
            f"the figures worker process stopped (exit code {worker.process.returncode}) before drawing step(s) "
            f"{', '.join(str(job[1]) for job in jobs)}; drawing them in this process"
        )
        writers: dict = {}
        for _, step, (snapshot, history, destination) in jobs:
            figures.write(figures.render_pngs(snapshot, history), step, destination, writers)
        for writer in writers.values():
            writer.close()
    return True


EXIT_WAIT = 0.5  # seconds a script's exit waits for figures still being drawn (TrainingDiagnostics.wait() for more)


@atexit.register
def _settle_all(timeout: float = EXIT_WAIT) -> None:
    """At exit, for up to EXIT_WAIT seconds: the last figures written (or drawn here, if their worker died).
    Longer is not needed: a worker that is alive finishes the figures already sent to it and writes them itself
    after this process has gone (its stdin closes; see worker.py). Waiting for it cost a short script's exit 1.4 s
    on a quiet machine and up to 42 s under load (issue 21); `wait()` waits on purpose, as the CLI does."""
    deadline = time.monotonic() + timeout
    for worker in list(_FINISHING):
        _settle(worker, max(deadline - time.monotonic(), 0.0))


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class Scheduling:
    """The scheduling part of TrainingDiagnostics (a mixin: the callback's state, set up by _init_scheduling)."""

    INLINE_SAMPLES = 10  # the first samples of a fit are computed inline: a short run never starts a stats worker
    # CPUs this process may run on for a stats worker to pay: with two, it shares the core training does not use
    # with everything else, and on a 2-vCPU machine (often one core's two hyperthreads) a busy process on the other
    # CPU slowed a one-thread training loop by ~25%; its start alone (importing torch, ~1.5 s of CPU) then costs more
    # than its ~1.4 ms a sample saves in a run of under ~50000 steps
    WORKER_MIN_CPUS = 3

    def _init_scheduling(self) -> None:
        self._workers: dict[str, Worker] = {}  # "stats" and "figures" processes, see worker.py
        self._no_worker: set[str] = set()  # kinds whose worker could not be started or died: done inline
        self._samples = 0  # sampled steps so far in this fit
        self._finishing: list[Worker] = []  # workers drawing its last figures after fit (see wait())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._sampling is not None:  # accumulating: this sample's first micro-batch is the one measured
            self._later_micro_batch = True
        if not self.every_n_steps or step % self.every_n_steps or self._sampling is not None:
            return
        self._attach_hooks(trainer, pl_module, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self._workers.get("stats")
        if stats is not None and stats.pending["stats"]:  # (every step: so nothing else before the sample check)
            self._collect(trainer, pl_module)  # record what the worker has finished, if anything
        if self._sampling is None:
            return
        if self._loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands on the loss / accumulation steps
            self._loss = loss.detach() if isinstance(loss, torch.Tensor) else None
        if not self._stepped and trainer.global_step == self._sampling:
            return  # e.g. accumulating gradients: the optimizer has not stepped yet
        self._remove_hooks()
        self._find_outputs()
        step, params = self._sampling, _merge(self._params)
        if params is None:  # Lightning counted a step no optimizer made: the GradScaler skipped it
            for x in self._layers:
                x.grad = None
            _say(
                f"step {step}: the optimizer step was skipped (the gradient scaler found inf/NaN gradients at "
                f"scale {self._grad_scale:g}): its loss and activations are recorded, not its gradients or update"
            )
        self._report_unmeasured(trainer)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        last = step + self.every_n_steps >= total  # the run's last sample: its histograms make the end's figures
        histograms = bool(self.histograms_every_n_steps and (step % self.histograms_every_n_steps == 0 or last))
        self._samples += 1
        if self._samples == self.INLINE_SAMPLES:
            self._draw_figures()  # a long run: the figures of step 0 now
        worker = self._worker_for(trainer, params)
        if worker is not None:
            worker.submit_stats(
                step, self._loss, self._layers, params, self.saturation_threshold, self.bins, histograms
            )
        else:
            reduce = _all_reduce if trainer.world_size > 1 and dist.is_available() and dist.is_initialized() else None
            snapshot = summarize(
                step,
                self._loss,
                self._layers,
                params,
                self.saturation_threshold,
                self.bins,
                histograms=histograms,
                reduce=reduce,
            )
        self._sampling, self._layers, self._params, self._before = None, [], [], {}
        if worker is None:
            self._record(trainer, pl_module, snapshot)

    def _worker_for(self, trainer: L.Trainer, params: CapturedParams | None) -> Worker | None:
        """The statistics worker, when this sample may go there: one process (no all-reduce), tensors on the CPU
        (a GPU reduces them faster than it could copy them out), past the first INLINE_SAMPLES samples, a machine
        with WORKER_MIN_CPUS CPUs or more for this process, the worker up (torch imported). Otherwise inline
        (~1.4 ms), unless earlier samples are still queued there (steps stay in order)."""
        on_cpu = all(x.output.device.type == "cpu" for x in self._layers) and (params is None or params.rows.is_cpu)
        if not (self.stats_in_worker and trainer.world_size == 1 and on_cpu) or self._samples < self.INLINE_SAMPLES:
            return None
        if _usable_cpus() < self.WORKER_MIN_CPUS:
            return None
        worker = self._start_worker("stats")
        if worker is not None and (worker.pending["stats"] or worker.ready_event.is_set()):
            return worker
        return None

    def _drop_dead_worker(self, kind: str) -> None:
        """A worker that died is said so once; its work is then done inline (the figures it had not drawn too)."""
        worker = self._workers.get(kind)
        if worker is not None and not worker.alive():
            worker.wait(1.0)  # its last answers read
            del self._workers[kind]
            self._no_worker.add(kind)
            code = worker.process.returncode
            if kind == "figures":
                jobs = [job for k, job in worker.unanswered if k == "figures"]
                self._figure_jobs[:0] = jobs
                steps = ", ".join(str(job[1]) for job in jobs) or "none"
                _say(
                    f"the figures worker process stopped (exit code {code}) before drawing step(s) {steps}; "
                    "drawing them in this process"
                )
            else:
                _say(
                    f"the stats worker process stopped (exit code {code}) with {worker.pending['stats']} sampled "
                    "step(s) unanswered (lost); statistics in the training process from here"
                )

    def _start_worker(self, kind: str) -> Worker | None:
        self._drop_dead_worker(kind)
        if kind not in self._workers and kind not in self._no_worker:
            try:  # figures: at the lowest priority, on CPU time that training leaves idle; no torch needed
                self._workers[kind] = Worker(nice=19, warm=False) if kind == "figures" else Worker()
            except OSError as e:
                self._no_worker.add(kind)
                _say(f"no {kind} worker process ({e}); {kind} in the training process")
        return self._workers.get(kind)

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, wait: float = 0.0) -> None:
        """Record the statistics worker's answers, in order; with wait > 0, until none is pending or the time is
        up. (Figures are never waited for: their worker writes them itself and says when one fails.)"""
        deadline = time.monotonic() + wait
        while (worker := self._workers.get("stats")) is not None and worker.pending["stats"]:
            answers = worker.ready(max(deadline - time.monotonic(), 0.0) if wait else 0.0)
            for kind, step, result in answers:
                if isinstance(result, str):
                    _say(f"{kind} of step {step} failed: {result}")
                else:
                    self._record(trainer, pl_module, result)
            if not wait or not answers:
                break
        if wait:
            self._drop_dead_worker("stats")
        if wait and (worker := self._workers.get("stats")) is not None and worker.pending["stats"]:  # too slow
            _say(f"the worker process did not answer for {worker.pending['stats']} sampled step(s); they are lost")

    def _finish_workers(self) -> None:
        for worker in self._workers.values():
            worker.finish()
            _FINISHING.append(worker)
            self._finishing.append(worker)
        self._workers = {}
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait up to timeout seconds for the figures still being drawn after fit returned (the worker writes them
        on its own, so training never waits for them); True when they are all written."""
        deadline = time.monotonic() + timeout
        done = [_settle(w, max(deadline - time.monotonic(), 0.0)) for w in self._finishing]
        self._finishing = [w for w, settled in zip(self._finishing, done) if not settled]
        return all(done)
