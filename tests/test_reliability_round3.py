"""Reliability, round 3 (issue 25): crafted checkpoint paths touch nothing outside the run; signals from process
start to exit; no silent wrong results; one line for every failure class; reading a large names file."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from mm_lightning.cli import main
from mm_lightning.runs import PATH_KEYS
from tests.conftest import SMALL

FAST = [*SMALL, "--diagnostics.every_n_steps", "50", "--diagnostics.figures_every_n_steps", "0"]
FAST += ["--trainer.enable_progress_bar", "false"]


def _fit(root, steps: int, *extra: str) -> int:
    return main(["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *FAST, *extra])


def _checkpoints(root) -> Path:
    return Path(root) / "lightning_logs" / "version_0" / "checkpoints"


# ----------------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("symlinked", [False, True], ids=["dotdot", "symlink"])
def test_a_crafted_checkpoint_cannot_delete_files_outside_its_run(project, monkeypatch, capsys, symlinked):
    """A run folder someone sent, whose last.ckpt says its last/best checkpoints are <dirpath>/../../../../VICTIM:
    Lightning deletes the previous last and the worst best when it writes new ones; none of those files may go."""
    monkeypatch.chdir(project)
    assert _fit("runs", 200, "--data.steps_per_epoch", "100") == 0
    checkpoints = _checkpoints(project / "runs")
    victims = [project / f"VICTIM{i}" for i in range(3)]
    (project / "elsewhere").mkdir()
    (checkpoints / "link").symlink_to(project / "elsewhere")  # inside by name, outside once resolved
    for victim in [*victims, *(project / "elsewhere" / v.name for v in victims)]:
        victim.write_text("precious")
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    key = next(k for k in last["callbacks"] if k.startswith("RunCheckpoint"))
    state = last["callbacks"][key]
    escape = f"{state['dirpath']}/../../../../"
    state.update(  # a consistent state (the kth best is one of the best k, worse than any real val/loss)
        last_model_path=escape + "VICTIM0",
        best_model_path=escape + "VICTIM1",
        kth_best_model_path=escape + "VICTIM2",
        kth_value=torch.tensor(99.0),
        best_model_score=torch.tensor(99.0),
        best_k_models={escape + "VICTIM2": torch.tensor(99.0)},
    )
    if symlinked:  # the same, through a directory symlink inside the checkpoints directory
        state.update({k: state[k].replace(escape, f"{state['dirpath']}/link/") for k in PATH_KEYS})
        state["best_k_models"] = {state["kth_best_model_path"]: torch.tensor(99.0)}
        victims = [project / "elsewhere" / v.name for v in victims]
    torch.save(last, checkpoints / "last.ckpt")
    capsys.readouterr()
    assert _fit("runs", 400, "--ckpt_path", "last", "--data.steps_per_epoch", "100") == 0
    err = capsys.readouterr().err
    assert all(v.read_text() == "precious" for v in victims), [str(v) for v in victims if not v.exists()]
    lines = [x for x in err.splitlines() if "lead outside" in x]
    assert len(lines) == 1 and "ignored 4 checkpoint path(s)" in lines[0], err[-2000:]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 400


# ------------------------------------------------------------------------------------------------------ signals


def _signal_at(monkeypatch, hook: str, sig: int, when=lambda trainer: True, times: int = 1) -> None:
    """Send this process a real signal from a Lightning hook (a moment a timer cannot hit reliably)."""
    from mm_lightning.runs import StopOnSignal

    sent = []

    def send(self, trainer, *args):
        if len(sent) < times and when(trainer):
            for _ in range(times):
                sent.append(sig)
                os.kill(os.getpid(), sig)
                time.sleep(0.01)  # the handler runs between bytecodes; the second signal comes after the first

    monkeypatch.setattr(StopOnSignal, hook, send, raising=False)


def _lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [x for x in err.splitlines() if x.startswith("error:")]


@pytest.mark.parametrize("resumed", [False, True], ids=["new-run", "resumed-run"])
def test_sigterm_before_the_first_step_exits_143_with_a_line(project, monkeypatch, capsys, resumed):
    """Lightning's sanity check runs before training starts: a SIGTERM there used to end the fit with status 0 and
    no line, so a requeue-on-143 recipe thought the job had finished."""
    monkeypatch.chdir(project)
    if resumed:
        assert _fit("runs", 100, "--data.steps_per_epoch", "100") == 0
    before = (_checkpoints(project / "runs") / "last.ckpt").read_bytes() if resumed else None
    _signal_at(monkeypatch, "on_fit_start", signal.SIGTERM)
    capsys.readouterr()
    extra = ["--ckpt_path", "last"] if resumed else []
    assert _fit("runs", 200, "--data.steps_per_epoch", "100", *extra) == 143
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "interrupted by SIGTERM before the first step: no checkpoint written" in lines[0], lines
    if resumed:
        assert (_checkpoints(project / "runs") / "last.ckpt").read_bytes() == before  # untouched
    else:
        assert not list((project / "runs").rglob("*.ckpt"))
        assert not (project / "runs" / "lightning_logs" / "version_0").exists()  # the empty claim is removed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() gives the caller its handlers back
