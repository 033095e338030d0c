"""TensorBoard events appended by the training thread itself while `fit` runs (speed only: the same bytes, in the
same order, in the same file).

TensorBoard's SummaryWriter hands every event to a writer thread through a queue. Where training runs in one
Python thread on the CPU, each hand-over wakes that thread, which takes the GIL while training waits for it: on a
2-core CPU the default fit ran 6% more steps a second with the events written in the training thread instead
(benchmarks/levers.py). Appending an event to a local file costs an open, a write and a close.

From fit start to fit end, FastPath has each TensorBoard logger's writer append its events itself, under the
writer's own lock, after its queue has been drained (so no two threads write the file, and the order stays). Only
for a log directory on the local filesystem: a remote store (`s3://...`) is left to TensorBoard's thread. A write
slower than SLOW_WRITE (a network mount) hands writing back to the thread for the rest of the fit, saying so.

Private TensorBoard names used (tests/test_tb_writes.py checks they are still there and still mean this): the
FileWriter's `event_writer` (torch), the EventFileWriter's `_async_writer`, and that object's `_writer` (the record
writer its thread calls), `_lock`, `_closed` and `_byte_queue`. A writer laid out otherwise is left as it is.
"""

from __future__ import annotations

import time

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

SLOW_WRITE = 0.005  # seconds: a local append takes ~0.05 ms; an NFS round trip can take this long
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
            queued.flush()  # drained: from here on, only this thread writes (under the writer's lock)
            queued.write = self._writer(queued)
            self._swapped.append(queued)

    def _writer(self, queued):
        record_writer, lock = queued._writer, queued._lock

        def write(bytestring) -> None:
            with lock:
                if queued._closed:
                    raise OSError("Writer is closed")  # as TensorBoard's own write says
                start = time.perf_counter()
                record_writer.write(bytestring)
                took = time.perf_counter() - start
            if took > SLOW_WRITE and vars(queued).get("write") is write:
                del queued.write  # TensorBoard's write again: its thread appends from the next event on
                rank_zero_info(
                    f"TensorBoard: appending an event took {took * 1000:.0f} ms (a network filesystem?); "
                    "TensorBoard's writer thread writes the events from here on"
                )

        return write

    def restore(self) -> None:
        for queued in self._swapped:
            if "write" in vars(queued):
                del queued.write
        self._swapped = []
