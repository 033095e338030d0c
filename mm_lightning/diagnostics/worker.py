"""The diagnostics' worker process: a sampled step's statistics and the lecture's figures, off the training process.

On a CPU the statistics of one sampled step are ~60 small tensor ops, ~1.4 ms of Python and dispatch overhead
(about 2% of training at every 100 steps, where training uses one core of several), and a figure ~100 ms holding
the GIL. The training process only pickles what it captured (~0.1 ms); this process, one per run, started as
`python -c 'from <this package>.worker import serve; serve()'`, runs the same `summarize` (one thread) or draws
the figures and writes them itself (into the run's TensorBoard directory as an event file of its own, or as PNG
files), and answers. Results come back in the order the jobs went. It exits when its stdin closes, after the jobs
already sent: so training never waits for a figure, and the last figures appear a few seconds after `fit` returns
(`Worker.wait` waits for them), even when the training process has exited. Its stderr is a pipe the training
process copies to its own: a script's output ends when the script does, not when the worker does (what the worker
says after the script has gone is lost).

Frames on the worker's stdin/stdout: the pickle's length, the number of out-of-band buffers and their lengths (8
bytes each), the pickle, then the buffers (numpy arrays' bytes, written straight from their memory). Both ends
are this module, in processes this project starts; nothing from outside is ever unpickled.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import subprocess
import sys
import threading
import time

from .snapshot import Snapshot


def _pack(obj) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """A pickle whose large arrays stay outside it, uncopied (protocol 5 out-of-band buffers)."""
    buffers: list[pickle.PickleBuffer] = []
    return pickle.dumps(obj, protocol=5, buffer_callback=buffers.append), buffers


def _write_frame(stream, packed: tuple[bytes, list]) -> None:
    data, buffers = packed
    raws = [b.raw() for b in buffers]
    sizes = [len(data), len(raws), *(r.nbytes for r in raws)]
    stream.write(b"".join(n.to_bytes(8, "little") for n in sizes) + data)
    for raw in raws:
        stream.write(raw)
    stream.flush()


def _read_exactly(stream, n: int) -> bytearray | None:
    buffer, got = bytearray(n), 0
    view = memoryview(buffer)
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return buffer


def _read_frame(stream):
    header = _read_exactly(stream, 16)
    if header is None:
        return None  # end of stream: the other side has gone
    size, count = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
    sizes = _read_exactly(stream, 8 * count) if count else bytearray()
    data = _read_exactly(stream, size)
    buffers = [_read_exactly(stream, int.from_bytes(sizes[8 * i : 8 * i + 8], "little")) for i in range(count)]
    if data is None or any(b is None for b in buffers):
        return None
    return pickle.loads(data, buffers=buffers)  # writable arrays: bytearrays


# ------------------------------------------------------------------------------------------------- jobs


def _stats_job(step: int, loss, layers: list, params, rows, threshold: float, bins: int, histograms: bool) -> tuple:
    """A sampled step's captured CPU tensors as plain values and numpy arrays. The layers' tensors are the
    callback's own copies, made for this step; `rows` is the parameter rows' copy (see Worker.submit_stats)."""
    return (
        "stats",
        step,
        {
            "loss": None if loss is None else float(loss),
            "layers": [
                (x.name, x.kind, x.bounds, x.group, x.output.numpy(), None if x.grad is None else x.grad.numpy())
                for x in layers
            ],
            "params": None if params is None else (params.names, params.shapes, rows, params.order),
            "threshold": threshold,
            "bins": bins,
            "histograms": histograms,
        },
    )


def figures_job(snapshot: Snapshot, history: dict[str, list[tuple[int, float]]], destination: tuple) -> tuple:
    """Draw the figures of snapshot and write them to destination (see figures.write)."""
    history = {name: list(points) for name, points in history.items()}
    return ("figures", snapshot.step, (snapshot, history, destination))


def _run_stats(step: int, job: dict) -> Snapshot:
    import torch

    from .stats import CapturedLayer, CapturedParams, summarize

    torch.set_num_threads(1)

    layers = [
        CapturedLayer(name, None, torch.from_numpy(out), None if grad is None else torch.from_numpy(grad), *about)
        for name, *about, out, grad in job["layers"]
    ]
    params = None
    if job["params"] is not None:
        names, shapes, rows, order = job["params"]
        params = CapturedParams(names, shapes, torch.from_numpy(rows), order)
    loss = None if job["loss"] is None else torch.tensor(job["loss"])
    return summarize(step, loss, layers, params, job["threshold"], job["bins"], histograms=job["histograms"])


def _run_figures(job: tuple, writers: dict) -> list[str]:
    from . import figures  # matplotlib: imported only when a figure is asked for

    snapshot, history, destination = job
    return figures.write(figures.render_pngs(snapshot, history), snapshot.step, destination, writers)


def serve(stdin=None, stdout=None, nice: int = 0, warm: bool = True) -> None:
    """The worker: answer each job that arrives until stdin ends (closed, or the trainer died); the jobs already
    sent are all done first, whether anyone still reads the answers or not. nice: lower this process's priority
    (a figures worker uses only CPU time training leaves idle); warm: import torch before saying ready (a
    statistics job is then answered in milliseconds)."""
    if nice:
        os.nice(nice)
    if warm:
        import torch

        torch.set_num_threads(1)  # the training process has the other cores
    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    writers: dict = {}  # TensorBoard event files this process writes figures to, per directory
    listening = _answer(stdout, ("ready", -1, None))
    while (job := _read_frame(stdin)) is not None:
        kind, step, payload = job
        try:
            result = _run_stats(step, payload) if kind == "stats" else _run_figures(payload, writers)
        except Exception as e:  # a job that fails must not take training down
            result = f"{type(e).__name__}: {e}"
            if kind == "figures":  # said here: nobody may be reading the answers any more
                _tell(f"[diagnostics] figures of step {step} failed: {result}")
        listening = listening and _answer(stdout, (kind, step, result))
    for writer in writers.values():
        writer.close()


def _tell(message: str) -> None:
    """A line for the training process's stderr (through the pipe it reads: see Worker); lost once it has exited."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _answer(stdout, result: tuple) -> bool:
    """Send result; False when the training process no longer reads (it has exited: the jobs still go on)."""
    try:
        _write_frame(stdout, _pack(result))
        return True
    except (BrokenPipeError, OSError):
        return False


# ------------------------------------------------------------------------------------------ training side


class Worker:
    """The training side. submit() pickles the job and never blocks: a thread feeds the worker, another reads
    back."""

    def __init__(self, nice: int = 0, warm: bool = True):
        # this package, under whatever name it has in the project it was copied into, importable from the folder
        # that holds its top-level package (the training process imported it from there)
        # (found from this file, not the top package's __file__: a namespace package, with no __init__.py, has none)
        root = os.path.abspath(__file__)
        for _ in range(len(__package__.split(".")) + 1):  # worker.py, then each package folder above it
            root = os.path.dirname(root)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            # -c, not -m: the package's name is only known here (it may have been copied under another one)
            [sys.executable, "-c", f"from {__package__}.worker import serve; serve(nice={nice}, warm={warm})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # its own pipe, copied to this process's stderr while it lives: an inherited stderr would keep whatever
            # reads this process's output (a shell pipe, `tee`, subprocess.run) waiting until the worker's last
            # figure is written, 0.8-5 s after this process exited (measured, a loaded 2-core machine)
            stderr=subprocess.PIPE,
            env=env,
        )
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.pending = {"stats": 0, "figures": 0}  # jobs sent, not yet answered
        self.unanswered: collections.deque = collections.deque()  # (kind, the job if figures), in order
        self.ready_event = threading.Event()  # set once the worker is up (and warm: statistics jobs are then fast)
        self._staging: dict[tuple, list] = {}  # per shape: two [array, written-out event] slots, used in turn
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        self._forwarder = threading.Thread(target=self._forward_stderr, daemon=True)
        self._forwarder.start()

    def _forward_stderr(self) -> None:
        for line in self.process.stderr:
            try:
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()
            except (ValueError, OSError):  # this process's stderr closed (exiting): keep draining the pipe
                pass

    def _feed(self) -> None:
        while (item := self.jobs.get()) is not None:
            data, written = item
            try:
                _write_frame(self.process.stdin, data)
            except (BrokenPipeError, OSError):
                return
            if written is not None:
                written.set()
        self.process.stdin.close()

    def submit_stats(self, step: int, loss, layers: list, params, threshold: float, bins: int, histograms: bool):
        """Queue the statistics of a sampled step (see stats.summarize for the arguments)."""
        rows, written = self._stage(params.rows) if params is not None else (None, None)
        self.submit(_stats_job(step, loss, layers, params, rows, threshold, bins, histograms), written)

    def _stage(self, t):
        """A copy of CPU tensor t in one of two arrays kept for its shape, used in turn (a fresh array costs page
        faults every sample), unless the feeding thread has not yet written that slot's last contents out. Returns
        (array, the event to hand to submit)."""
        import numpy as np

        slots = self._staging.get((tuple(t.shape), str(t.dtype)))
        if slots is None:
            slots = self._staging[(tuple(t.shape), str(t.dtype))] = [
                [np.empty_like(t.numpy()), threading.Event()] for _ in range(2)
            ]
            for slot in slots:
                slot[1].set()
        slots.append(slots.pop(0))  # rotate: this call uses the least recently used slot
        array, written = slots[-1]
        if not written.is_set():  # still queued (the worker is starting, say): a fresh slot rather than a wait
            array, written = np.empty_like(array), threading.Event()
            slots[-1] = [array, written]
        written.clear()
        np.copyto(array, t.numpy())
        return array, written

    def _collect(self) -> None:
        while (result := _read_frame(self.process.stdout)) is not None:
            if result[0] == "ready":
                self.ready_event.set()
            else:
                self.results.put(result)

    def submit(self, job: tuple, written: threading.Event | None = None) -> None:
        """Queue a job; its arrays are written to the pipe by the feeding thread, uncopied (then `written` is set)."""
        self.jobs.put((_pack(job), written))
        self.pending[job[0]] += 1
        self.unanswered.append((job[0], job if job[0] == "figures" else None))

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self, wait: float = 0.0, kinds: tuple[str, ...] = ("stats", "figures")) -> list[tuple[str, int, object]]:
        """(kind, step, result or an error message) for every job answered so far, in order; with wait > 0, wait
        up to that many seconds in all until no job of these kinds is pending (less if the worker has died)."""
        out, deadline = [], time.monotonic() + wait
        while sum(self.pending.values()):
            waiting = wait and any(self.pending[k] for k in kinds)
            try:
                result = self.results.get(timeout=0.2) if waiting else self.results.get_nowait()
            except queue.Empty:
                if waiting and time.monotonic() < deadline and self.alive():
                    continue
                if not waiting or self.results.empty():  # a dead worker's last answers may still be queued
                    break
                continue
            self.pending[result[0]] -= 1
            self.unanswered.popleft()
            out.append(result)
        return out

    def finish(self, timeout: float = 10.0) -> None:
        """No more jobs: the worker does the ones already sent (figures included), then exits on its own. Returns
        once they are all in the pipe (up to timeout seconds), without waiting for the worker."""
        self.jobs.put(None)
        self._feeder.join(timeout)

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait up to timeout seconds for a finished worker to exit (its last figures written); True if it has.
        Its answers are then all read: `unanswered` holds what it never did (it died)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self._collector.join(5.0)
        self._forwarder.join(5.0)  # its last lines copied
        self.ready()
        return True


if __name__ == "__main__":
    serve()
