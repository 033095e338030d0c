"""TensorBoard's event checksums in C during fit (mm_lightning/speed/tbcrc.py): the same masked CRC32C as
TensorBoard's own on any data, swapped in at fit start and back at the end, event files that verify record by record
with TensorBoard's own checksum, and TensorBoard's own wherever google-crc32c's C extension is missing."""

from __future__ import annotations

import random
import struct
import sys

import lightning as L
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.runlogger import RunLogger
from mm_lightning.speed import FastPath, tbcrc

TENSORBOARD_CRC = pywrap_tensorflow.masked_crc32c


def test_the_c_checksum_is_tensorboards_on_any_data():
    fast = tbcrc.c_masked_crc32c()
    assert fast is not None, "google-crc32c's C extension is a dependency (pyproject.toml): reinstall the project"
    rng = random.Random(1)
    for n in [0, 1, 2, 3, 4, 5, 15, 16, 17, 100, 4096, 5000]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert fast(data) == TENSORBOARD_CRC(data), n
    assert tbcrc._mask(0xE3069283) == TENSORBOARD_CRC(b"123456789")  # CRC32C's check value, masked


def _records(path) -> list[bytes]:
    """The records of a TFRecord file, each checked with TensorBoard's own (pure-Python) masked CRC32C."""
    data, at, out = path.read_bytes(), 0, []
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8 : at + 12])
        body = data[at + 12 : at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length : at + 16 + length])
        assert header_crc == TENSORBOARD_CRC(header) and body_crc == TENSORBOARD_CRC(body), f"record at byte {at}"
        out.append(body)
        at += 16 + length
    return out


class SeesTheChecksum(L.Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        self.during = record_writer.masked_crc32c


def _fit(tmp_path, names_file):
    seen = SeesTheChecksum()
    trainer = L.Trainer(
        max_steps=60, log_every_n_steps=5, callbacks=[FastPath(), seen], limit_val_batches=0,
        logger=RunLogger(save_dir=tmp_path, name="runs", version=0), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    dm = NamesDataModule(path=str(names_file), batch_size=8, steps_per_epoch=60)
    trainer.fit(MakemoreModule(net=MLPConfig(n_hidden=16, n_layers=1)), dm)
    (events,) = (tmp_path / "runs" / "version_0").glob("events.out.tfevents*")
    return seen.during, _records(events)


def test_fit_writes_with_the_c_checksum_and_puts_tensorboards_back(tmp_path, names_file):
    assert record_writer.masked_crc32c is TENSORBOARD_CRC  # (the test relies on a process where nobody swapped it)
    during, records = _fit(tmp_path, names_file)
    assert during is not TENSORBOARD_CRC and during.__module__ == tbcrc.__name__
    assert record_writer.masked_crc32c is TENSORBOARD_CRC  # back after fit
    assert sum(b"0 loss/train/loss" in r for r in records) == 12  # every 5th of 60 steps, each verified


def test_without_the_c_extension_tensorboards_own_runs(tmp_path, monkeypatch, names_file):
    monkeypatch.setitem(sys.modules, "google_crc32c", None)  # import fails, as where it is not installed
    assert tbcrc.c_masked_crc32c() is None
    assert tbcrc.CRCSwap().install() == "google-crc32c's C extension is not installed"
    during, records = _fit(tmp_path, names_file)
    assert during is TENSORBOARD_CRC and sum(b"0 loss/train/loss" in r for r in records) == 12


def test_a_checksum_someone_else_replaced_is_left_alone(monkeypatch):
    theirs = lambda data: TENSORBOARD_CRC(data)  # noqa: E731
    monkeypatch.setattr(record_writer, "masked_crc32c", theirs)
    swap = tbcrc.CRCSwap()
    assert swap.install() == "TensorBoard's record writer checksum is not TensorBoard's own (replaced, or moved)"
    swap.restore()
    assert record_writer.masked_crc32c is theirs


def test_tensorboards_record_writer_still_calls_its_module_checksum():
    """The swap works only while RecordWriter.write looks the checksum up in its module at each call."""
    import inspect

    source = inspect.getsource(record_writer.RecordWriter.write)
    assert "masked_crc32c(header)" in source and "masked_crc32c(data)" in source
    calls = []
    swap = tbcrc.CRCSwap()
    assert swap.install() is None
    try:
        fast = record_writer.masked_crc32c
        record_writer.masked_crc32c = lambda data: (calls.append(len(data)), fast(data))[1]

        class Sink:
            def write(self, data):
                pass

        record_writer.RecordWriter(Sink()).write(b"x" * 10)
    finally:
        record_writer.masked_crc32c = fast
        swap.restore()
    assert calls == [8, 10] and record_writer.masked_crc32c is TENSORBOARD_CRC


def test_the_agreement_check_refuses_a_wrong_checksum():
    assert not tbcrc._agrees(lambda data: TENSORBOARD_CRC(data) ^ 1, TENSORBOARD_CRC)
    assert tbcrc._agrees(TENSORBOARD_CRC, TENSORBOARD_CRC)
