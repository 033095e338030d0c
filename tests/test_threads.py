"""fit's CPU thread choice (one thread for small steps, unless OMP_NUM_THREADS is set) in every command that
computes outside fit's loop: diagnose and lecture.diagnose (through FastPath), sample (threads.py)."""

from __future__ import annotations

import pytest
import torch

from mm_lightning.model import MLP, MLPConfig
from mm_lightning.threads import one_thread_if_small


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads to start from, OMP_NUM_THREADS unset (so the automatic choice decides), and every
    torch.set_num_threads call recorded."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    calls: list[int] = []
    original = torch.set_num_threads

    def record(n: int) -> None:
        calls.append(n)
        original(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    yield calls
    original(before)


def _net(hidden: int) -> torch.nn.Module:
    return MLP(MLPConfig(n_hidden=hidden, n_layers=2))


def test_small_work_runs_on_one_thread_and_restores(two_threads, monkeypatch):
    seen = []
    with one_thread_if_small(_net(16), rows=32):
        seen.append(torch.get_num_threads())
    assert seen == [1] and torch.get_num_threads() == 2 and two_threads == [1, 2]
    with one_thread_if_small(_net(16), rows=100_000):  # whole splits: large matmuls, all threads
        seen.append(torch.get_num_threads())
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    with one_thread_if_small(_net(16), rows=32):
        seen.append(torch.get_num_threads())
    assert seen == [1, 2, 2] and two_threads == [1, 2]


@pytest.mark.slow
def test_lecture_diagnose_trains_on_fits_threads(two_threads, names_file):
    from mm_lightning.lecture import diagnose

    d = diagnose(steps=2, **{"data.path": str(names_file), "model.net.n_hidden": 16, "model.net.n_layers": 2})
    assert d.snapshot.step == 2
    assert two_threads[:1] == [1] and torch.get_num_threads() == 2, two_threads  # one thread, then restored
