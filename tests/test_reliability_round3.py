"""Reliability, round 3 (issue 25): crafted checkpoint paths touch nothing outside the run; signals from process
start to exit; no silent wrong results; one line for every failure class; reading a large names file."""

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
