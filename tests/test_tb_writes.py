"""TensorBoard events written by the training thread during a CPU fit (mm_lightning/speed/tbsync.py): every event of
the run in the file, in order, each record valid; TensorBoard's writer thread again after fit, after a slow write
(saying so), and for a remote log directory; the private TensorBoard names it uses still what it expects."""

from __future__ import annotations

import logging
import threading

import lightning as L
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.runlogger import RunLogger
from mm_lightning.speed import FastPath, tbsync
from tests.test_tb_checksum import _records


def _fit(tmp_path, monkeypatch, names_file, before=None):
    """A 60-step CPU fit logging every 5 steps; returns the thread of each record written, in order, and the run."""
    writers: list[str] = []
    original = record_writer.RecordWriter.write

    def write(self, data):
        writers.append(threading.current_thread().name)
        return original(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    logger = RunLogger(save_dir=tmp_path, name="runs", version=0)
    queued = tbsync.async_writer(logger.experiment)  # (the writer a fit would make at its start)
    if before is not None:
        before(logger.experiment)
    trainer = L.Trainer(
        max_steps=60, log_every_n_steps=5, callbacks=[FastPath()], limit_val_batches=0, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    dm = NamesDataModule(path=str(names_file), batch_size=8, steps_per_epoch=60)
    trainer.fit(MakemoreModule(net=MLPConfig(n_hidden=16, n_layers=1)), dm)
    assert "write" not in vars(queued), "not given back to TensorBoard after fit"
    (events,) = (tmp_path / "runs" / "version_0").glob("events.out.tfevents*")
    return writers, _records(events)


def _loss_steps(records: list[bytes]) -> list[int]:
    from tensorboard.compat.proto.event_pb2 import Event

    events = [Event.FromString(r) for r in records]
    return [e.step for e in events for v in e.summary.value if v.tag == "0 loss/train/loss"]


def test_a_cpu_fit_writes_its_events_in_the_training_thread_all_of_them_in_order(tmp_path, monkeypatch, names_file):
    writers, records = _fit(tmp_path, monkeypatch, names_file, before=lambda w: w.add_text("note", "before fit", 0))
    assert _loss_steps(records) == list(range(4, 60, 5))  # every logged point, in step order, each record valid
    assert b"before fit" in records[1]  # (records[0]: the file version) what was queued before fit comes first
    main = threading.main_thread().name
    assert writers.count(main) >= 12, writers  # the loss points (and train/lr, epoch) were appended here
    assert set(writers) - {main}, "nothing went through TensorBoard's thread: the text before fit should have"


def test_a_slow_write_gives_writing_back_to_tensorboards_thread_and_says_so(tmp_path, monkeypatch, caplog, names_file):
    monkeypatch.setattr(tbsync, "SLOW_WRITE", 0.0)  # every write is "slow": the first full window hands over
    with caplog.at_level(logging.INFO):
        writers, records = _fit(tmp_path, monkeypatch, names_file)
    assert _loss_steps(records) == list(range(4, 60, 5))
    main = threading.main_thread().name
    assert writers.count(main) == tbsync.WINDOW, writers  # the window that measured slow; later events: the thread
    said = [r.getMessage() for r in caplog.records if "TensorBoard: appending an event took" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("TensorBoard's writer thread writes the events from here on")


def _installed(tmp_path, record_write=None):
    """A SummaryWriter whose events the calling thread writes (its record writer's write replaced first)."""
    writer = SummaryWriter(str(tmp_path))
    queued = tbsync.async_writer(writer)
    if record_write is not None:
        queued._writer.write = record_write
    swap = tbsync.TrainingThreadWrites()

    class Logger(L.pytorch.loggers.TensorBoardLogger):
        @property
        def experiment(self):
            return writer

    swap.install([Logger(str(tmp_path))])
    assert "write" in vars(queued)
    return writer, queued, swap


def test_one_slow_write_decides_nothing_a_slow_median_hands_over(tmp_path, caplog):
    """A write that waited for the GIL (another thread busy in Python: up to the 5 ms switch interval) is one slow
    write among fast ones; a network mount makes them all slow."""
    import time

    calls = []

    def first_slow(data):
        calls.append(len(data))
        time.sleep(0.02 if len(calls) == 1 else 0)

    writer, queued, swap = _installed(tmp_path / "a", first_slow)
    for _ in range(3 * tbsync.WINDOW):
        queued.write(b"event")
    assert "write" in vars(queued) and len(calls) == 3 * tbsync.WINDOW  # still this thread's
    swap.restore()
    writer.close()

    def all_slow(data):
        time.sleep(2 * tbsync.SLOW_WRITE)

    writer, queued, swap = _installed(tmp_path / "b", all_slow)
    with caplog.at_level(logging.INFO):
        for _ in range(tbsync.WINDOW):
            queued.write(b"event")
    assert "write" not in vars(queued)
    assert any("TensorBoard: appending an event took" in r.getMessage() for r in caplog.records)
    swap.restore()
    writer.close()


def test_an_event_queued_around_the_swap_is_written_before_and_never_alongside(tmp_path):
    """A thread that called TensorBoard's own write just before the swap queues its event after the queue was
    drained: TensorBoard's thread writes it. The training thread's next write waits for that first."""
    import time

    active, overlaps, order = [0], [0], []

    def slow_record(data):
        active[0] += 1
        overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.02)  # a window wide enough for a second writer to enter
        order.append(bytes(data))
        active[0] -= 1

    writer, queued, swap = _installed(tmp_path, slow_record)
    straggler = threading.Thread(target=type(queued).write, args=(queued, b"queued by another thread"))
    straggler.start()
    time.sleep(0.005)  # its event is in the queue, TensorBoard's thread is writing it
    queued.write(b"written by this thread")
    straggler.join()
    assert order == [b"queued by another thread", b"written by this thread"] and overlaps[0] == 1
    swap.restore()
    writer.close()


def test_a_remote_log_directory_is_left_to_tensorboards_thread(tmp_path, monkeypatch):
    writer = SummaryWriter(str(tmp_path))
    monkeypatch.setattr(writer, "get_logdir", lambda: "s3://bucket/runs/version_0")

    class Logger(L.pytorch.loggers.TensorBoardLogger):
        @property
        def experiment(self):
            return writer

    swap = tbsync.TrainingThreadWrites()
    swap.install([Logger(str(tmp_path))])
    assert "write" not in vars(tbsync.async_writer(writer))
    writer.close()


def test_the_private_tensorboard_names_are_still_what_tbsync_expects(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    queued = tbsync.async_writer(writer)
    assert queued is not None, "TensorBoard's writer is laid out otherwise now: re-check tbsync.py"
    assert isinstance(queued._writer, record_writer.RecordWriter)
    assert queued._worker._record_writer is queued._writer  # the thread writes with that very record writer
    assert isinstance(queued._lock, type(threading.Lock())) and queued._closed is False
    writer.close()
    assert queued._closed is True
