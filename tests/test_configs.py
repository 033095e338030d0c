"""Every YAML in configs/ parses, says what it is, and trains; default.yaml is exactly the built-in default."""

from pathlib import Path

import pytest
import yaml

from mm_lightning.cli import MakemoreCLI, main
from tests.conftest import ROOT, scalars

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _parsed(args: list[str]) -> dict:
    cli = MakemoreCLI(args, run=False)
    config = cli.config.as_dict()
    config.pop("config", None)
    return config


def test_default_yaml_is_the_builtin_default(project, monkeypatch):
    monkeypatch.chdir(project)
    assert _parsed(["--config", str(ROOT / "configs" / "default.yaml")]) == _parsed([])


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
@pytest.mark.slow
def test_config_is_documented_and_fits_a_few_steps(path: Path, project, monkeypatch):
    head = path.read_text().splitlines()
    assert head[0].startswith("# "), "each config starts with a comment saying what it is"
    assert any("python -m mm_lightning" in line for line in head[:8] if line.startswith("#")), "and how to run it"
    yaml.safe_load(path.read_text())
    monkeypatch.chdir(project)
    root = project / "out"
    args = ["fit", "--config", str(path), "--trainer.max_steps", "20", "--data.steps_per_epoch", "10"]
    args += ["--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false"]
    args += ["--trainer.log_every_n_steps", "5"]
    assert main(args) == 0
    run = root / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    tags = scalars(run)
    assert [s for s, _ in tags["val/loss"]] == [10, 20]
    assert [s for s, _ in tags["train/loss"]] == [4, 9, 14, 19]
    assert all(v == v for _, v in tags["train/loss"])  # finite (NaN != NaN)


LECTURE = sorted((ROOT / "configs" / "lecture").glob("*.yaml"))


@pytest.mark.parametrize("path", LECTURE, ids=[p.stem for p in LECTURE])
@pytest.mark.slow
def test_loss_at_step_0_tells_the_lectures_story(path: Path, project, monkeypatch):
    """original: confidently wrong, far above ln(27); every fixed init: within 0.15 of it."""
    import math

    monkeypatch.chdir(project)
    args = ["fit", "--config", str(path), "--trainer.max_steps", "1", "--trainer.default_root_dir", "out"]
    args += ["--trainer.log_every_n_steps", "1"]  # train/loss at every step: step 0's is the one
    assert main([*args, "--trainer.enable_model_summary", "false", "--diagnostics.every_n_steps", "0"]) == 0
    loss0 = dict(scalars(project / "out" / "lightning_logs" / "version_0")["train/loss"])[0]
    if path.stem == "original":
        assert loss0 > 15, loss0
    else:
        assert abs(loss0 - math.log(27)) < 0.15, loss0


def test_every_lecture_step_has_a_config():
    names = {p.stem for p in LECTURE}
    assert {"original", "fix_softmax", "fix_tanh", "kaiming", "batchnorm"} <= names
    assert {"deep_bn", "deep_nobn_gain1", "deep_nobn", "deep_nobn_gain3", "deep_bn_gain1", "deep_bn_gain3"} <= names
