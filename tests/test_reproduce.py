"""The reproduce command end to end, at a few steps: it trains each config, evaluates, and writes both tables."""

import csv
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_reproduce_writes_the_table_in_the_lectures_order(project):
    configs = [str(ROOT / "configs" / "lecture" / f"{name}.yaml") for name in ("kaiming", "original")]
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.reproduce", *configs, "--max_steps", "60", "--out", "out"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(project / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["original", "kaiming"]  # the lecture's order, not the command line's
    assert all(int(r["steps"]) == 60 for r in rows)
    assert float(rows[0]["initial_loss"]) > 20 > 4 > float(rows[1]["initial_loss"])  # confidently wrong, then fixed
    assert float(rows[0]["lecture_train"]) == 2.1245
    assert "Runs shortened to 60 steps" in (project / "out" / "results.md").read_text()  # said beside the table
    assert "| original | 60 |" in (project / "out" / "results.md").read_text()


def test_reproduce_refuses_a_missing_config(project, monkeypatch, capsys):
    from mm_lightning.lecture.reproduce import main  # in-process: the refusal is tested, not the interpreter's start

    monkeypatch.chdir(project)
    assert main(["nope.yaml"]) == 2
    assert "config nope.yaml does not exist" in capsys.readouterr().err
