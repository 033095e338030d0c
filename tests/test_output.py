"""What the commands print for a person: the run a fit writes, the checkpoint an evaluation reads, a help whose
first screen holds the common options, and hints that fit the situation."""

from __future__ import annotations

import re

import pytest
import torch

from mm_lightning.cli import COMMON_OPTIONS, main
from tests.conftest import SMALL, run_cli


@pytest.mark.slow
def test_help_first_screen_is_the_common_options(project):
    text = run_cli(["fit", "--help"], project).stdout
    first_screen = "\n".join(text.splitlines()[:24])
    for option in ("--config", "--ckpt_path", "--trainer.max_steps", "--model.net.n_hidden", "--data.path"):
        assert option in first_screen, option
    full = text.split(COMMON_OPTIONS, 1)[1]  # the parser's own list follows: every common option is a real one
    for option in set(re.findall(r"--[a-z_.]+", COMMON_OPTIONS)):
        assert re.search(rf"{re.escape(option)}\b", full), option


@pytest.mark.slow
def test_each_command_names_the_run_or_checkpoint_it_uses(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "60", *SMALL, "--data.steps_per_epoch", "60"]
    assert main([*args, "--trainer.enable_progress_bar", "false", "--diagnostics.every_n_steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "fit: new run lightning_logs/version_0 " in out, out  # which version_N it writes, before training
    last = "lightning_logs/version_0/checkpoints/last.ckpt"
    assert main(["sample", "--num_samples", "3"]) == 0
    said = capsys.readouterr()
    assert said.err.startswith(f"sample: {last} (step 60)") and len(said.out.split()) == 3  # names alone on stdout
    assert main(["fold-batchnorm", "--ckpt_path", "last", "--out", "folded.ckpt"]) == 0
    capsys.readouterr()
    # a folded checkpoint outside a run: evaluated with its own settings (no BatchNorm), not refused
    assert main(["validate", "--ckpt_path", "folded.ckpt"]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("validate: checkpoint at step 60 (folded.ckpt, written ") and "val/loss" in said.out
    assert main(["validate", "--ckpt_path", "folded.ckpt", "--model.net.batchnorm", "true"]) == 2
    err = capsys.readouterr().err
    assert "folded.ckpt holds a model with model.net.batchnorm=False but this command gives True" in err, err
    assert "resumed" not in err and "new run" not in err  # no resume hint for an evaluation


def test_sample_without_a_run_says_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample"]) == 2
    err = capsys.readouterr().err
    assert "train one first (python -m mm_lightning.cli fit)" in err and "drop --ckpt_path" not in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["validate", "test", "fold-batchnorm"])
def test_evaluating_without_a_run_says_to_train_one(tmp_path, monkeypatch, capsys, command):
    """An evaluation cannot start a new run: the hint is to train one (it said "drop --ckpt_path to start a new
    run", fit's hint), with the command's own option for where runs are."""
    monkeypatch.chdir(tmp_path)
    args = ["--out", "folded.ckpt"] if command == "fold-batchnorm" else ["--ckpt_path", "last"]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert f"no trained run for {command}: " in err and "train one first (python -m mm_lightning.cli fit)" in err
    assert "drop --ckpt_path" not in err and err.count("\n") == 1, err
    where = "--root_dir DIR" if command == "fold-batchnorm" else "--trainer.default_root_dir DIR"
    assert f"({where} if the runs are elsewhere)" in err, err


def test_tensorboard_files_the_losses_in_a_group_that_sorts_first(tmp_path):
    """TensorBoard opens the first two groups in its name order (digits first): the losses go to "0 loss", before
    the diagnostics' "1 activations"; the metric keeps its name elsewhere (tests/test_browser.py: the page)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mm_lightning.runlogger import RunLogger

    logger = RunLogger(save_dir=tmp_path, name="lightning_logs", version=0)
    metrics = {"train/loss": 2.5, "val/loss": 2.4, "test/loss": 2.3, "train/lr": 0.1, "epoch": 0, "health/x_loss": 1}
    logger.log_metrics(metrics, step=7)
    logger.finalize("success")
    acc = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    # test/loss (one point, after `test`) stays in its own group: in "0 loss" it would sort before train/loss
    assert tags == ["0 loss/train/loss", "0 loss/val/loss", "epoch", "health/x_loss", "test/loss", "train/lr"]
    assert [(e.step, e.value) for e in acc.Scalars("0 loss/train/loss")] == [(7, 2.5)]


def test_logged_points_reach_the_event_file_within_flush_secs_and_at_every_checkpoint(tmp_path, monkeypatch):
    """Lightning calls save() after every logging step; RunLogger flushes there at most every FLUSH_SECS (each flush
    made training wait for TensorBoard's writer thread), and what is logged must still reach the file: at the
    first save (hparams.yaml too), from the writer thread soon after, at a checkpoint (after_save_checkpoint: a run
    killed after it has its curve up to it), and at the end."""
    import time

    from mm_lightning import runlogger
    from tests.conftest import tb_tags

    clock = [100.0]  # the throttle's clock, moved by hand: the writer thread's own clock is the real one
    monkeypatch.setattr(runlogger.time, "monotonic", lambda: clock[0])
    logger = runlogger.RunLogger(save_dir=tmp_path, name="lightning_logs", version=0)
    run = tmp_path / "lightning_logs" / "version_0"
    on_disk = lambda: [s for s, _ in tb_tags(run).get("train/lr", [])]  # noqa: E731

    logger.log_metrics({"train/lr": 0.1}, step=1)
    logger.save()
    assert on_disk() == [1] and (run / "hparams.yaml").exists()
    flushes = []
    real_flush = logger.experiment.flush
    monkeypatch.setattr(logger.experiment, "flush", lambda: (flushes.append(1), real_flush()))
    logger.log_metrics({"train/lr": 0.1}, step=2)
    logger.save()  # within FLUSH_SECS of the last: no flush from here
    assert flushes == []
    clock[0] += runlogger.FLUSH_SECS
    logger.log_metrics({"train/lr": 0.1}, step=3)
    logger.save()
    assert flushes == [1] and on_disk() == [1, 2, 3]
    logger.log_metrics({"train/lr": 0.1}, step=4)
    logger.save()  # throttled again: the writer thread flushes it on its own, within flush_secs
    deadline = time.monotonic() + runlogger.FLUSH_SECS * 3
    while on_disk() != [1, 2, 3, 4] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert on_disk() == [1, 2, 3, 4] and flushes == [1]
    logger.log_metrics({"train/lr": 0.1}, step=5)
    logger.after_save_checkpoint(None)  # a checkpoint: flushed at once, whatever the clock says
    assert flushes == [1, 1] and on_disk()[-1] == 5
    logger.log_metrics({"train/lr": 0.1}, step=6)
    logger.finalize("success")
    assert on_disk() == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_resuming_a_finished_run_says_it_is_complete_and_how_to_go_on(project, monkeypatch, capsys):
    """`fit --ckpt_path last` on a run at its --trainer.max_steps: one line (Lightning said only "`Trainer.fit`
    stopped: max_steps=40 reached", after writing to the run), exit 0 (the run is where it was asked to be: a
    loop or reproduce.py continuing runs is done), nothing written; the hint's larger max_steps trains on."""
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "40", *SMALL, "--data.steps_per_epoch", "40"]
    assert main([*args, "--trainer.enable_progress_bar", "false", "--diagnostics.every_n_steps", "0"]) == 0
    run = project / "lightning_logs" / "version_0"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main(["fit", "--ckpt_path", "last"]) == 0
    out = capsys.readouterr().out
    assert out == (
        "fit: run lightning_logs/version_0 is already complete at step 40 (--trainer.max_steps 40): nothing to "
        "train; to train further, give a larger --trainer.max_steps, e.g. `fit --ckpt_path last --trainer.max_steps "
        "80`\n"
    ), out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # no event file, lock or checkpoint
    assert [p.name for p in (project / "lightning_logs").iterdir()] == ["version_0"]
    assert main(["fit", "--ckpt_path", "last", "--trainer.max_steps", "50", "--trainer.enable_progress_bar=false"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 50
