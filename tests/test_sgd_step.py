"""The lean loop's SGD step (mm_lightning/speed/sgd.py): bitwise what torch.optim.SGD.step does, for every setting it
runs on; optimizer.step itself wherever something else would happen in it (a hook, a profiler, momentum, a replaced
step); on a torch it was not verified against, never, with the reason in the fast path's line."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from mm_lightning.speed import FastPath, sgd
from mm_lightning.speed.sgd import SGDStep


def _model(sparse: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(27, 8, sparse=sparse),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 27, bias=False),
    )


def _train(model, optimizer, step, steps: int = 25) -> list[torch.Tensor]:
    """`steps` steps of a closure like Lightning's (zero_grad, forward, backward) through step(closure)."""
    g = torch.Generator().manual_seed(1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10], 0.3)
    for _ in range(steps):
        x, y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        step(closure)
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def _both(make_optimizer, sparse: bool = False):
    """Parameters after training with optimizer.step and with SGDStep.step, from the same start."""
    a, b = _model(sparse), _model(sparse)
    opt_a, opt_b = make_optimizer(a), make_optimizer(b)
    expected = _train(a, opt_a, opt_a.step)
    shortcut = SGDStep(opt_b)
    return expected, _train(b, opt_b, shortcut.step), shortcut


SETTINGS = {
    "foreach": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, foreach=True),
    "foreach-None-on-cpu": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "foreach-False": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, foreach=False),
    "two-groups": lambda m: torch.optim.SGD(
        [{"params": list(m[0].parameters()), "lr": 0.5}, {"params": list(m[2:].parameters())}], lr=0.1, foreach=True
    ),
    "int-lr": lambda m: torch.optim.SGD(m.parameters(), lr=1, foreach=True),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_sgd_step_is_bitwise_optimizer_step(setting):
    expected, got, shortcut = _both(SETTINGS[setting])
    assert shortcut.exact(), "the shortcut did not run: the comparison would prove nothing"
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert not all(torch.equal(e, p) for e, p in zip(expected, _model().parameters()))  # it did train


def test_a_sparse_gradient_is_added_as_sgd_adds_it():
    expected, got, shortcut = _both(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, foreach=True), sparse=True)
    assert shortcut.exact()
    assert all(torch.equal(e, g) for e, g in zip(expected, got))


FALLBACKS = {
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True),
    "weight-decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01, foreach=True),
    "maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, maximize=True, foreach=True),
    "tensor-lr": lambda m: torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1), foreach=False),
}


@pytest.mark.parametrize("setting", FALLBACKS)
def test_other_settings_step_through_optimizer_step_with_the_same_results(setting):
    expected, got, shortcut = _both(FALLBACKS[setting])
    assert not shortcut.exact()
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    if setting == "momentum":  # its state is the optimizer's own, as optimizer.step keeps it
        optimizer = shortcut.optimizer
        assert all("momentum_buffer" in optimizer.state[p] for p in optimizer.param_groups[0]["params"])


def test_step_hooks_run_where_one_is_registered():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    shortcut, calls = SGDStep(optimizer), []
    _train(model, optimizer, shortcut.step, steps=3)
    handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    post = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    try:
        _train(model, optimizer, shortcut.step, steps=3)
    finally:
        handle.remove(), post.remove()
    assert calls == ["pre", "post"] * 3
    assert shortcut.exact()  # and none once they are gone


def test_a_torch_profiler_sees_the_optimizer_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    shortcut = SGDStep(optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train(model, optimizer, shortcut.step, steps=2)
    assert sum(e.key == "Optimizer.step#SGD.step" for e in prof.key_averages()) == 1


def test_a_replaced_step_is_called_as_it_is():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    shortcut, calls = SGDStep(optimizer), []
    step = optimizer.step

    def counting(closure=None):
        calls.append(1)
        return step(closure)

    optimizer.step = counting  # a user's wrapper, installed after the shortcut was made
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randint(0, 27, (8, 3), generator=g), torch.randint(0, 27, (8,), generator=g)
        shortcut.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(model(x), y).backward())
    assert calls == [1, 1, 1]


def test_the_scheduler_does_not_warn_that_the_optimizer_did_not_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        _train(model, optimizer, SGDStep(optimizer).step, steps=3)


def test_only_a_plain_torch_sgd_is_stood_in_for():
    class MySGD(torch.optim.SGD):
        pass

    params = list(_model().parameters())
    assert SGDStep.why_not(torch.optim.SGD(params, lr=0.1)) is None
    assert SGDStep.why_not(MySGD(params, lr=0.1)) == "MySGD is not torch.optim.SGD"
    assert SGDStep.why_not(torch.optim.AdamW(params)) == "AdamW is not torch.optim.SGD"


# ----------------------------------------------------------------------------------------------- inside a fit


def _fit(names, root, lean: bool = True) -> tuple[MakemoreModule, FastPath, list[str]]:
    L.seed_everything(3)
    module = MakemoreModule(net=MLPConfig(n_hidden=16, n_layers=2), milestones=[20])
    fast = FastPath(lean_loop=lean)
    trainer = L.Trainer(
        max_steps=40,
        default_root_dir=root,
        callbacks=[fast],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        trainer.fit(module, NamesDataModule(path=str(names), steps_per_epoch=25))
    finally:
        logger.removeHandler(handler)
    return module, fast, [line for line in lines if "training path:" in line]


def test_on_an_unverified_torch_sgd_steps_through_optimizer_step_and_says_so(names_file, tmp_path, monkeypatch):
    calls = []
    original = SGDStep.step
    monkeypatch.setattr(SGDStep, "step", lambda self, closure: calls.append(1) or original(self, closure))
    shortcut, _, _ = _fit(names_file, tmp_path / "a")
    assert len(calls) == 40  # it ran every step of the verified torch
    plain, _, _ = _fit(names_file, tmp_path / "plain", lean=False)
    monkeypatch.setattr(sgd, "TORCH_VERIFIED", {"2.0.0": {}})
    calls.clear()
    other, fast, lines = _fit(names_file, tmp_path / "b")
    assert fast.path == "lean" and calls == []
    version = torch.__version__.split("+")[0]
    assert lines == [
        "training path: fast (lean loop: Lightning's loop minus per-step overhead, hand gradients (autograd's ops "
        "without its graph, docs/speed.md); SGD steps through "
        f"optimizer.step: torch {version} is not a version its SGD step was verified against (2.0.0))"
    ], lines
    for a, b in [(shortcut, plain), (other, plain)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
