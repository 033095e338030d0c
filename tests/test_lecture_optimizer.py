"""The notebook's update as the lecture kit's optimizer (mm_lightning.lecture.NotebookSGD, which the notebook-exact
configs select as their optimizer:), and what the kit asks of the model: runs and checkpoints written while it was
the module's own option (model.update: lecture) still evaluate and resume with it; the diagnostics judge it as the
SGD it is; the notebook's minibatch stream names the network it needs. Bit for bit against the notebook:
test_notebook_exact.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mm_lightning.errors import UsageError
from mm_lightning.lecture import NotebookMLPConfig, NotebookNamesDataModule, NotebookSGD
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from tests.conftest import ROOT

FIRST_BN = ROOT / "configs" / "lecture" / "notebook_batchnorm.yaml"


def test_notebook_sgd_is_sgd_to_the_diagnostics():
    """The update-ratio verdicts judge SGD-like optimizers against the lecture's band; an unknown family is not
    judged. The notebook's update is plain SGD but for its rounding."""
    from mm_lightning.diagnostics.verdicts import optimizer_family

    assert optimizer_family(NotebookSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)) == "sgd"
    with pytest.raises(ValueError, match="lr must be positive"):
        NotebookSGD([torch.nn.Parameter(torch.ones(2))], lr=0.0)


def test_the_notebook_stream_names_the_network_it_needs(names_file):
    """NotebookNamesDataModule continues the generator of NotebookMLP's init: with another network, or another
    LightningModule, it says which and what to use (not "set init_seed", which that network does not have)."""
    data = NotebookNamesDataModule(path=str(names_file))
    core = MakemoreModule(net=MLPConfig(n_hidden=8, n_layers=1))
    with pytest.raises(UsageError, match="the model's network is MLP: use --model.net mm_lightning.lecture.Notebook"):
        data.connect(core, processes=1)
    data.trainer = SimpleNamespace(lightning_module=torch.nn.Linear(1, 1), world_size=1)  # from Python, no CLI
    with pytest.raises(UsageError, match=r"network is unknown \(Linear is not a MakemoreModule\)"):
        data.train_sampler(10, rank=0)
    unseeded = MakemoreModule(net=NotebookMLPConfig(n_hidden=8, n_layers=1))
    with pytest.raises(UsageError, match="set --model.net.init_seed too"):
        data.connect(unseeded, processes=1)
    seeded = MakemoreModule(net=NotebookMLPConfig(n_hidden=8, n_layers=1, init_seed=7))
    data.connect(seeded, processes=1)
    assert torch.equal(data.init_generator_state, seeded.net.init_generator_state)


def test_reproduce_shortens_the_configs_own_schedule():
    """reproduce --max_steps scales the learning-rate milestones: the lr_scheduler's where the config has one (the
    CLI refuses --model.milestones beside its --optimizer), the module's otherwise."""
    from mm_lightning.lecture.reproduce import _fit_command

    cmd = _fit_command(FIRST_BN, Path("out"), 2000)
    assert cmd[cmd.index("--lr_scheduler.init_args.milestones") + 1] == "[1000]" and "--model.milestones" not in cmd
    cmd = _fit_command(ROOT / "configs" / "lecture" / "kaiming.yaml", Path("out"), 2000)  # milestones [100000]
    assert cmd[cmd.index("--model.milestones") + 1] == "[1000]" and "--lr_scheduler.init_args.milestones" not in cmd


def as_written_before(run: Path) -> None:
    """A run of notebook_batchnorm.yaml as the version with model.update wrote it (the same weights and states: that
    version's NotebookSGD did the same arithmetic): its config.yaml with model.lr, milestones, lr_decay and update
    lecture, no optimizer:; its checkpoints' hyperparameters with them, no optimizer record, and the optimizer's
    param groups as its NotebookSGD (a plain Optimizer) saved them: lr and initial_lr only."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    scheduler = config.pop("lr_scheduler")["init_args"]
    lr = config.pop("optimizer")["init_args"]["lr"]
    config.update(optimizer=None, lr_scheduler=None)
    model = {"lr": lr, "milestones": scheduler["milestones"], "lr_decay": scheduler["gamma"], "update": "lecture"}
    config["model"].update(model)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for path in (run / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["hyper_parameters"].update(model)
        del checkpoint["optimizer_class"]
        for group in checkpoint["optimizer_states"][0]["param_groups"]:
            for key in set(group) - {"lr", "initial_lr", "params"}:
                del group[key]
        torch.save(checkpoint, path)


@pytest.mark.slow
def test_a_run_written_with_model_update_lecture_evaluates_and_resumes_with_the_notebooks_update(
    project, monkeypatch, capsys
):
    """Stopped at step 10 under the earlier layout and resumed to 20 (`fit --ckpt_path last`): bit for bit the
    uninterrupted run, so the notebook's update went on (torch's SGD differs in the last bits); it validates and
    samples; resumed from elsewhere without its config, it is refused in one line naming the fix."""
    from mm_lightning.cli import main

    monkeypatch.chdir(project)
    common = ["--config", str(FIRST_BN), "--data.steps_per_epoch", "10", "--trainer.enable_model_summary", "false"]
    common += ["--diagnostics.every_n_steps", "0", "--trainer.max_steps", "20"]
    assert main(["fit", *common, "--trainer.default_root_dir", "whole"]) == 0
    assert main(["fit", *common, "--trainer.default_root_dir", "old", "--trainer.max_steps", "10"]) == 0
    old_run = project / "old" / "lightning_logs" / "version_0"
    as_written_before(old_run)
    moved = shutil.copy(old_run / "checkpoints" / "last.ckpt", project / "elsewhere.ckpt")  # (no run config)
    capsys.readouterr()

    assert main(["validate", "--ckpt_path", str(old_run / "checkpoints" / "last.ckpt")]) == 0
    assert main(["sample", "--ckpt_path", str(moved), "--num_samples", "3"]) == 0
    assert len(capsys.readouterr().out.split("\n")) > 3
    network = yaml.safe_load(FIRST_BN.read_text())  # its network and data, not its optimizer
    del network["optimizer"], network["lr_scheduler"]
    (project / "network.yaml").write_text(yaml.safe_dump(network))
    assert main(["fit", "--config", "network.yaml", "--ckpt_path", str(moved), "--trainer.max_steps", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained with the optimizer mm_lightning.lecture.optim.NotebookSGD" in err, err
    assert "give the run's --config" in err

    assert main(["fit", "--ckpt_path", "last", "--trainer.default_root_dir", "old", "--trainer.max_steps", "20"]) == 0
    resumed = torch.load(old_run / "checkpoints" / "last.ckpt", weights_only=True)
    whole = torch.load(project / "whole/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 20
    assert resumed["optimizer_class"] == "mm_lightning.lecture.optim.NotebookSGD"
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
