"""TensorBoard events appended by the training thread itself while `fit` runs (speed only: the same bytes, in the
same order, in the same file).

TensorBoard's SummaryWriter hands every event to a writer thread through a queue. Where training runs in one
Python thread on the CPU, each hand-over wakes that thread, which takes the GIL while training waits for it: on a
2-core CPU the default fit ran 6% more steps a second with the events written in the training thread instead
(benchmarks/levers.py). Appending an event to a local file costs an open, a write and a close.

From fit start to fit end, FastPath has each TensorBoard logger's writer append its events itself, under the
writer's own lock, each once TensorBoard's thread has written whatever was queued before it (an event another
thread queued around the swap included): so no two threads write the file at once, and the order stays. Only for
a log directory on the local filesystem: a remote store (`s3://...`) is left to TensorBoard's thread. When the
median of the last WINDOW appends takes longer than SLOW_WRITE (a network mount, or another thread that keeps
the GIL), writing goes back to TensorBoard's thread for the rest of the fit, and one line says so.

Private TensorBoard names used (tests/test_tb_writes.py checks they are still there and still mean this): the
FileWriter's `event_writer` (torch), the EventFileWriter's `_async_writer`, and that object's `_writer` (the record
writer its thread calls), `_lock`, `_closed` and `_byte_queue`. A writer laid out otherwise is left as it is.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

# seconds: a local append takes ~0.05 ms; the thread's wake-up it saves is worth ~0.06 ms of training. A median
# over WINDOW appends, so that one write that waited for the GIL (Python's switch interval is 5 ms) decides nothing
SLOW_WRITE, WINDOW = 0.001, 5
_PARTS = ("_writer", "_lock", "_closed", "_byte_queue")


def async_writer(experiment):
    """The object behind a torch SummaryWriter that queues events for TensorBoard's writer thread, where it is laid
    out as this module expects; else None."""
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(experiment, SummaryWriter):
        return None  # another writer (tensorboardX's), or a rank's dummy experiment
    queued = getattr(getattr(experiment._get_file_writer(), "event_writer", None), "_async_writer", None)
    if queued is None or not all(hasattr(queued, name) for name in _PARTS):
        return None
    if type(queued).__name__ != "_AsyncWriter" or "write" in vars(queued):
        return None  # not TensorBoard's own, or its write already replaced
    return queued


class TrainingThreadWrites:
    """Events of the trainer's TensorBoard loggers written by the training thread; `restore` gives them back."""

    def __init__(self):
        self._swapped: list = []

    def install(self, loggers) -> None:
        for logger in loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            experiment = logger.experiment
            queued = async_writer(experiment)
            if queued is None or "://" in str(experiment.get_logdir()):
                continue
            queued.write = self._writer(queued)  # (each write first waits for what the queue still holds)
            self._swapped.append(queued)

    def _writer(self, queued):
        record_writer, lock, pending = queued._writer, queued._lock, queued._byte_queue
        times: deque[float] = deque(maxlen=WINDOW)

        def write(bytestring) -> None:
            with lock:
                if queued._closed:
                    raise OSError("Writer is closed")  # as TensorBoard's own write says
                pending.join()  # what TensorBoard's thread still has (queued around a swap) is written first
                start = time.perf_counter()
                record_writer.write(bytestring)
                times.append(time.perf_counter() - start)
                median = statistics.median(times) if len(times) == WINDOW else 0.0
                if median > SLOW_WRITE and vars(queued).pop("write", None) is not None:  # (once, whichever thread)
                    rank_zero_info(
                        f"TensorBoard: appending an event took {median * 1000:.1f} ms (a network "
                        "filesystem, or another thread holding the GIL); TensorBoard's writer thread writes the "
                        "events from here on"
                    )

        return write

    def restore(self) -> None:
        for queued in self._swapped:
            with queued._lock:
                vars(queued).pop("write", None)
        self._swapped = []
