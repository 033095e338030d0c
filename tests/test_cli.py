"""The foundation through the real CLI, as a new user runs it: fit, TensorBoard events, restart, sample."""

import shutil

import pytest
import torch

from tests.conftest import SMALL, run_cli, scalars


@pytest.fixture(scope="module")
def trained(tmp_path_factory, names_file):
    """fit 200 steps of the default model, then `fit --ckpt_path last` to 400, in a fresh project directory."""
    project = tmp_path_factory.mktemp("project")
    (project / "data").mkdir()
    shutil.copy(names_file, project / "data" / "names.txt")
    root = project / "out"
    first = run_cli(["fit", "--trainer.max_steps", "200", "--trainer.default_root_dir", str(root)], cwd=project)
    run_dir = root / "lightning_logs" / "version_0"
    after_first = scalars(run_dir)
    first_ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    second = run_cli(
        ["fit", "--ckpt_path", "last", "--trainer.max_steps", "400", "--trainer.default_root_dir", str(root)],
        cwd=project,
    )
    return {
        "project": project,
        "root": root,
        "run_dir": run_dir,
        "first": first,
        "second": second,
        "after_first": after_first,
        "first_ckpt": first_ckpt,
    }


def test_fit_writes_tensorboard_events_and_checkpoints(trained):
    run_dir, tags = trained["run_dir"], trained["after_first"]
    assert [s for s, _ in tags["train/loss"]] == [49, 99, 149, 199]  # every log_every_n_steps optimizer steps
    assert abs(tags["sampled/loss"][0][1] - 3.2958) < 0.1 and tags["sampled/loss"][0][0] == 0  # ln(27) at step 0
    assert [s for s, _ in tags["val/loss"]] == [200]
    assert tags["train/lr"][0][1] == pytest.approx(0.1)
    ckpt = trained["first_ckpt"]  # loads with weights_only=True: plain values only
    assert ckpt["global_step"] == 200
    assert ckpt["hyper_parameters"]["net"]["vocab"] == ".abcdefghijklmnopqrstuvwxyz"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()
    assert "step 200/200" in trained["first"].stderr  # the progress line


def test_restart_continues_the_same_run_directory(trained):
    root, run_dir = trained["root"], trained["run_dir"]
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]  # no new version
    assert f"run {run_dir} at step 200" in trained["second"].stdout
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 400
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 400  # the schedule continued too
    tags = scalars(run_dir)
    steps = [s for s, _ in tags["train/loss"]]
    assert steps == [49, 99, 149, 199, 249, 299, 349, 399]  # one curve, continued, nothing twice
    assert [s for s, _ in tags["val/loss"]] == [200, 400]
    best = list((run_dir / "checkpoints").glob("best-step=*.ckpt"))
    assert len(best) == 1 and "step=400" in best[0].name  # val/loss improved: the best moved on


@pytest.mark.slow
def test_sample_predict_and_test_from_the_checkpoint(trained):
    project, root = trained["project"], str(trained["root"])
    out = run_cli(["sample", "--root_dir", root, "--num_samples", "7", "--seed", "1"], cwd=project).stdout.split()
    assert len(out) == 7 and all(w.isalpha() and w.islower() for w in out)
    again = run_cli(["sample", "--root_dir", root, "--num_samples", "7", "--seed", "1"], cwd=project).stdout.split()
    assert again == out  # seeded
    predicted = run_cli(
        ["predict", "--ckpt_path", "last", "--trainer.default_root_dir", root, "--data.num_samples", "4"], cwd=project
    ).stdout.split("\n")
    assert len([w for w in predicted if w.isalpha()]) >= 4
    tested = run_cli(["test", "--ckpt_path", "last", "--trainer.default_root_dir", root], cwd=project)
    assert "test/loss" in tested.stdout
    assert sorted(p.name for p in (trained["root"] / "lightning_logs").iterdir()) == ["version_0"]
    points = scalars(trained["run_dir"])["test/loss"]
    assert [s for s, _ in points] == [400]  # once, at the step of the checkpoint it evaluated
    assert f"{points[0][1]:.4f}"[:4] in tested.stdout


@pytest.mark.slow
def test_resume_with_nothing_to_resume_fails_without_training(project):
    proc = run_cli(
        ["fit", "--ckpt_path", "last", "--trainer.default_root_dir", "runs", *SMALL], cwd=project, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no checkpoint to resume")
    assert "Traceback" not in proc.stderr
    assert not (project / "runs" / "lightning_logs").exists() or not any(
        (project / "runs" / "lightning_logs").iterdir()
    )


def test_module_entry_point_and_console_script_agree(project):
    help_text = run_cli(["--help"], cwd=project).stdout
    for sub in ("fit", "validate", "test", "predict", "sample", "download"):
        assert sub in help_text
    assert shutil.which("mm-lightning") is not None


@pytest.mark.slow
def test_help_shows_every_model_fields_docstring(project):
    """litgpt-style: the MLPConfig dataclass documents each field under it, and `--help` shows that text."""
    import dataclasses

    from mm_lightning.model import MLPConfig

    text = " ".join(run_cli(["fit", "--help"], project).stdout.split())
    fields = [f.name for f in dataclasses.fields(MLPConfig) if f.name not in ("vocab", "block_size")]
    for name in fields:
        entry = text.split(f"--model.net.{name} ", 1)[1].split("(type:", 1)[0]
        assert len(entry.split()) > 3, (name, entry)  # the metavar, then the field's docstring
    assert "Multiplier of the hidden weights" in text
    # the lecture kit's network (a class path) documents its own fields under its class's help
    lecture = run_cli(["fit", "--model.net.help", "mm_lightning.lecture.NotebookMLPConfig"], project).stdout
    lecture = " ".join(lecture.split())
    assert "Which BatchNorm:" in lecture and "--model.net.init_seed" in lecture


@pytest.mark.parametrize(
    "args, line",
    [
        (["--optimizer", "Adamw"], "error: --optimizer Adamw: no such class; did you mean AdamW?"),
        (
            ["--optimizer", "SGD", "--lr_scheduler", "StepLr"],
            "error: --lr_scheduler StepLr: no such class; did you mean StepLR?",
        ),
        (
            ["--optimizer", "Frobnicate"],
            "error: --optimizer Frobnicate: no such class; give one of torch.optim (e.g. SGD",
        ),
        (
            ["--optimizer", "AdamW", "--lr_scheduler", "OneCycleLR"],
            "error: --lr_scheduler OneCycleLR needs max_lr: add --lr_scheduler.max_lr VALUE",
        ),
        (["--optimizer.lr", "0.01"], "error: --optimizer.lr needs --optimizer CLASS first (e.g. --optimizer SGD)"),
        (
            ["--optimizer", "SGD", "--lr_scheduler", "StepLR", "--lr_scheduler.gama", "0.5"],
            "error: --lr_scheduler.gama: StepLR takes no argument 'gama'; its arguments: step_size, gamma, last_epoch",
        ),
    ],
    ids=["optimizer-case", "scheduler-case", "nothing-close", "missing-argument", "no-class", "unknown-argument"],
)
def test_a_misspelt_optimizer_or_scheduler_is_named_in_one_short_line(tmp_path, capsys, args, line):
    from mm_lightning.cli import main

    assert main(["fit", "--trainer.default_root_dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line) and len(err[0]) < 200, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_misspelt_command_names_the_closest_and_every_command(capsys):
    from mm_lightning.cli import COMMANDS, main

    assert main(["sampel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no command 'sampel'; did you mean sample?"), err
    assert all(command in err[0] for command in ["fit", "validate", "test", "predict", *COMMANDS])
    assert "sampel --help" not in err[0]


@pytest.mark.parametrize(
    "args, yaml_text, line",
    [
        (["--model.lrr", "0.1"], None, "error: unrecognized arguments: --model.lrr 0.1; did you mean --model.lr?"),
        (
            [],
            "trainer:\n  max_step: 10\n",
            "does not accept option 'trainer.max_step'; did you mean --trainer.max_steps?",
        ),
        (
            ["--data.batchsize", "3"],
            None,
            "error: --data.batchsize: NamesDataModule takes no argument 'batchsize'; did you mean batch_size?",
        ),
        (
            ["--model.net.n_hiden", "3"],
            None,
            "error: --model.net.n_hiden: MLPConfig takes no argument 'n_hiden'; did you mean n_hidden?",
        ),
        (["--zzzz", "3"], None, "error: unrecognized arguments: --zzzz 3 (see"),
    ],
    ids=["option", "yaml-key", "data-argument", "net-argument", "nothing-close"],
)
def test_a_misspelt_option_names_the_closest_one(tmp_path, capsys, args, yaml_text, line):
    from mm_lightning.cli import main

    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args = ["--config", str(tmp_path / "c.yaml")]
    assert main(["fit", "--trainer.default_root_dir", str(tmp_path / "runs"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0] and len(err[0]) < 200, err
    assert not (tmp_path / "runs").exists()
