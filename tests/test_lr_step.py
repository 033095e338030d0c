"""The lean loop's MultiStepLR step (mm_lightning/speed/lrstep.py): the scheduler's whole state and the learning rates
exactly as scheduler.step() leaves them, milestones included; scheduler.step() itself wherever the shortcut would
differ (first step, milestone, tensor lr, a subclass, a replaced method); never on a torch it was not verified
against, with the reason in the fast path's line; and the torch code it mirrors unchanged."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.optim.lr_scheduler import MultiStepLR

from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.speed import FastPath, gate, lrstep
from mm_lightning.speed.lrstep import MultiStepLRStep


def _scheduler(milestones=(3, 5, 5, 9), lr=0.1, groups: int = 2, cls=MultiStepLR):
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(groups)]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr)
    return cls(optimizer, list(milestones), gamma=0.3)


def _state(scheduler) -> tuple:
    """Everything step() may change: the scheduler's own attributes and the optimizer's learning rates."""
    own = {k: v for k, v in vars(scheduler).items() if k != "optimizer"}
    return own, [group["lr"] for group in scheduler.optimizer.param_groups]


def _run(scheduler, step, steps: int = 12) -> list[tuple]:
    seen = []
    for _ in range(steps):
        scheduler.optimizer.step()  # (so that the first scheduler.step() finds the optimizer stepped)
        step(scheduler)
        seen.append(_state(scheduler))
    return seen


def test_the_shortcut_leaves_what_scheduler_step_leaves_across_milestones():
    expected = _run(_scheduler(), lambda s: s.step())
    shortcut = MultiStepLRStep(verified=True)
    took = []

    def step(s):
        took.append(shortcut.exact(s))
        shortcut.step(s)

    got = _run(_scheduler(), step)
    assert got == expected  # dicts and lists of plain values: equal means every attribute and rate equal
    assert took.count(True) >= 6, "the shortcut hardly ran: the comparison would prove little"
    assert took[0] is False  # the first step: torch's order checks
    rates = [lrs[0] for _, lrs in expected]  # rates[i]: after step i + 1 (last_epoch i + 1)
    assert rates[1] == 0.1 and rates[2] == pytest.approx(0.03)  # the milestones applied, 5 twice
    assert rates[4] == pytest.approx(0.1 * 0.3**3) and rates[8] == pytest.approx(0.1 * 0.3**4)
    assert math.isclose(got[-1][0]["_last_lr"][1], 0.2 * 0.3**4)


@pytest.mark.parametrize(
    "case",
    ["milestone next", "first step", "tensor lr", "subclass", "replaced step", "not verified"],
)
def test_scheduler_step_runs_where_the_shortcut_would_differ(case):
    cls = type("MyMultiStepLR", (MultiStepLR,), {}) if case == "subclass" else MultiStepLR
    scheduler = _scheduler(milestones=(2,) if case == "milestone next" else (50,), cls=cls)
    for _ in range(0 if case == "first step" else 1):
        scheduler.optimizer.step()
        scheduler.step()
    if case == "tensor lr":
        scheduler.optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
    calls = []
    if case == "replaced step":
        original = scheduler.step
        scheduler.step = lambda *a: (calls.append(1), original(*a))
    shortcut = MultiStepLRStep(verified=case != "not verified")
    assert not shortcut.exact(scheduler)
    before = scheduler.last_epoch
    if case == "replaced step":
        shortcut.step(scheduler)
        assert calls == [1]
    else:
        scheduler.optimizer.step()
        shortcut.step(scheduler)
    assert scheduler.last_epoch == before + 1


@pytest.mark.parametrize("path", lrstep.MIRRORED, ids=[p.partition(":")[2] for p in lrstep.MIRRORED])
def test_the_torch_code_the_lr_step_mirrors_is_unchanged(path):
    name = path.partition(":")[2]
    expected = lrstep.TORCH_VERIFIED.get(torch.__version__.split("+")[0], {}).get(name)
    assert gate.fingerprint(gate.resolve(path)) == expected, f"torch changed {name}: re-check lrstep.py against it"


def test_another_torch_or_changed_code_is_refused_and_said(monkeypatch, tmp_path, caplog, names_file):
    import torch.optim.lr_scheduler as torch_lr

    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert (
        lrstep.why_not_verified() == "torch 2.99.0 is not a version its MultiStepLR step was verified against (2.13.0)"
    )
    monkeypatch.undo()
    original = torch_lr.MultiStepLR.get_lr
    monkeypatch.setattr(torch_lr.MultiStepLR, "get_lr", lambda self: original(self))
    assert lrstep.why_not_verified().startswith("torch's MultiStepLR.get_lr is not the code its MultiStepLR step")

    # a fit on that torch: steps through scheduler.step, and its fast path line says why
    import lightning as L

    dm = NamesDataModule(path=str(names_file), batch_size=8, steps_per_epoch=20)
    model = MakemoreModule(net=MLPConfig(n_hidden=16, n_layers=1), milestones=[5])
    trainer = L.Trainer(
        max_steps=8, callbacks=[FastPath()], logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(model, dm)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training path: fast"))
    assert "MultiStepLR steps through scheduler.step: torch's MultiStepLR.get_lr is not the code" in line
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)  # the milestone at 5 applied
