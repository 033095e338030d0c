"""Lightning's features on the template, each as a plain Lightning project would have them, on the optimizer-step
axis, each checked against a reference computed independently (tests/reference.py: the same training as a plain
PyTorch loop with the feature written out by hand)."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mm_lightning.cli import main
from mm_lightning.data import NamesDataModule
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule
from tests.conftest import flat_tag, scalars
from tests.reference import reference_run, split_loss

NET = MLPConfig(n_hidden=16, n_layers=2)
NET_ARGS = ["--model.net.n_hidden", "16", "--model.net.n_layers", "2", "--trainer.enable_model_summary", "false"]
QUIET = ["--diagnostics.every_n_steps", "0", "--trainer.enable_progress_bar", "false"]


def _cli_fit(root, steps: int, *extra: str) -> dict:
    """fit through the real CLI; returns the last checkpoint."""
    args = ["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *NET_ARGS, *QUIET]
    assert main([*args, "--data.steps_per_epoch", "100", *extra]) == 0
    return torch.load(next(root.glob("lightning_logs/version_0/checkpoints/last.ckpt")), weights_only=True)


def _net_state(checkpoint: dict) -> dict:
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def _assert_states(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key


def _interval_mean(losses: list[float]) -> float:
    total = torch.tensor(losses[0], dtype=torch.float32)
    for loss in losses[1:]:
        total = total + torch.tensor(loss, dtype=torch.float32)
    return (total / len(losses)).item()


def test_default_fit_is_the_lecture_loop_step_for_step(project, names_file, monkeypatch):
    """The template's own training_step, SGD 0.1 -> 0.01 at the milestone, the loss (its mean over each interval)
    and lr logged through self.log and LearningRateMonitor every log_every_n_steps optimizer steps: bitwise the plain
    PyTorch loop."""
    monkeypatch.chdir(project)
    checkpoint = _cli_fit(project / "run", 250, "--model.milestones", "[100]")
    ref = reference_run(
        str(names_file), 250, NET, scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [100]), threads=1
    )
    _assert_states(_net_state(checkpoint), {k: v for k, v in ref.net.state_dict().items()})
    tags = scalars(project / "run" / "lightning_logs" / "version_0")
    steps = [49, 99, 149, 199, 249]
    # train/loss: the mean of the 50 minibatch losses up to each logged step (summed in float32, in order)
    assert tags["train/loss"] == [
        (s, pytest.approx(_interval_mean(ref.losses[s - 49 : s + 1]), rel=1e-6)) for s in steps
    ]
    assert tags["train/lr"] == [(s, pytest.approx(ref.lrs[s])) for s in steps] and ref.lrs[149] == pytest.approx(0.01)


def test_python_api_without_the_cli(names_file, tmp_path):
    """Trainer(...).fit(MakemoreModule(...), NamesDataModule(...)): a plain Lightning project, nothing added."""
    L.seed_everything(42)
    module = MakemoreModule(net=NET)
    trainer = L.Trainer(max_steps=120, default_root_dir=tmp_path, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, NamesDataModule(path=str(names_file), steps_per_epoch=60))
    ref = reference_run(str(names_file), 120, NET)
    _assert_states(module.net.state_dict(), ref.net.state_dict())
    assert trainer.global_step == 120


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.slow
def test_gradient_clipping(project, names_file, monkeypatch, algorithm):
    monkeypatch.chdir(project)
    clip = ["--trainer.gradient_clip_val", "0.05", "--trainer.gradient_clip_algorithm", algorithm]
    checkpoint = _cli_fit(project / "run", 60, *clip)
    ref = reference_run(str(names_file), 60, NET, clip=(algorithm, 0.05), threads=1)
    _assert_states(_net_state(checkpoint), ref.net.state_dict(), exact=False)
    unclipped = reference_run(str(names_file), 60, NET)
    assert not torch.allclose(ref.net.layers[0].weight, unclipped.net.layers[0].weight)  # the clipping did something


@pytest.mark.slow
def test_gradient_accumulation(project, names_file, monkeypatch):
    """accumulate_grad_batches 3: each optimizer step sums the gradients of three minibatches (each loss / 3);
    global_step, the schedule and the logging cadence count optimizer steps."""
    monkeypatch.chdir(project)
    checkpoint = _cli_fit(project / "run", 60, "--trainer.accumulate_grad_batches", "3", "--model.milestones", "[30]")
    ref = reference_run(
        str(names_file),
        60,
        NET,
        accumulate=3,
        scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [30]),
        threads=1,
    )
    assert checkpoint["global_step"] == 60
    _assert_states(_net_state(checkpoint), ref.net.state_dict(), exact=False)
    tags = scalars(project / "run" / "lightning_logs" / "version_0")
    assert [s for s, _ in tags["train/loss"]] == [49]
    # LearningRateMonitor writes at each of the step's three batches (Lightning's own behaviour): the same point
    assert {s for s, _ in tags["train/lr"]} == {49} and all(v == pytest.approx(0.01) for _, v in tags["train/lr"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.slow
def test_mixed_precision_on_cpu_with_the_default_diagnostics(project, names_file, monkeypatch, precision):
    """bf16 autocast (Lightning's 16-mixed on a CPU is bf16 too), the diagnostics on at their defaults."""
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "60", "--trainer.default_root_dir", "run", *NET_ARGS]
    args += ["--data.steps_per_epoch", "100", "--trainer.precision", precision, "--diagnostics.every_n_steps", "20"]
    args += ["--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    checkpoint = torch.load(next(project.glob("run/lightning_logs/version_0/checkpoints/last.ckpt")), weights_only=True)
    ref = reference_run(str(names_file), 60, NET, autocast=torch.bfloat16, threads=1)
    _assert_states(_net_state(checkpoint), ref.net.state_dict(), exact=False)
    tags = scalars(project / "run" / "lightning_logs" / "version_0")
    assert [s for s, _ in tags[flat_tag("act/std/net.layers.2")]] == [
        0,
        20,
        40,
    ]  # the diagnostics measured, in float32
    assert all(math.isfinite(v) and v > 0 for _, v in tags[flat_tag("act/std/net.layers.2")])


@pytest.mark.slow
def test_val_check_interval_counts_optimizer_steps(project, names_file, monkeypatch):
    monkeypatch.chdir(project)
    _cli_fit(project / "run", 90, "--trainer.val_check_interval", "30", "--trainer.check_val_every_n_epoch", "null")
    tags = scalars(project / "run" / "lightning_logs" / "version_0")
    assert [s for s, _ in tags["val/loss"]] == [30, 60, 90]
    ref = reference_run(str(names_file), 90, NET, snapshot_at=(30, 60), threads=1)
    for step in (30, 60):
        expected = split_loss(str(names_file), ref.snapshots[step], NET)
        assert dict(tags["val/loss"])[step] == pytest.approx(expected, rel=1e-5)


class GradNorms(Callback):
    """A callback with per-step hooks, as users write them."""

    def __init__(self):
        self.after_backward, self.before_step = [], []

    def on_after_backward(self, trainer, pl_module):
        self.after_backward.append(torch.stack([p.grad.norm() for p in pl_module.parameters()]).norm().item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step.append(trainer.global_step)


def test_callbacks_with_per_step_hooks_see_every_step(names_file, tmp_path):
    from mm_lightning.speed import FastPath

    L.seed_everything(42)
    module, hooks, fast = MakemoreModule(net=NET), GradNorms(), FastPath()
    trainer = L.Trainer(
        max_steps=40, callbacks=[hooks, fast], logger=False, enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(module, NamesDataModule(path=str(names_file), steps_per_epoch=100))
    ref = reference_run(str(names_file), 40, NET, threads=1)
    assert fast.path == "lean"  # callbacks' step hooks are honoured by the fast path too
    assert hooks.before_step == list(range(40))
    assert hooks.after_backward == pytest.approx(ref.grad_norms, rel=1e-5)


@pytest.mark.slow
def test_csv_logger_beside_tensorboard(project, monkeypatch):
    """Adding a logger keeps the run's own TensorBoard (its directory, checkpoints and resume) beside it."""
    monkeypatch.chdir(project)
    loggers = ["--trainer.logger+=CSVLogger", "--trainer.logger.save_dir", "csv"]
    args = ["fit", "--trainer.max_steps", "100", *NET_ARGS, *QUIET, "--data.steps_per_epoch", "50", *loggers]
    assert main(args) == 0
    run = project / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(next(project.glob("csv/lightning_logs/version_*/metrics.csv")))))
    csv_loss = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    tb = scalars(run)
    assert csv_loss == [(s, pytest.approx(v, rel=1e-6)) for s, v in tb["train/loss"]] and len(csv_loss) == 2
    assert [float(r["val/loss"]) for r in rows if r.get("val/loss")] == pytest.approx([v for _, v in tb["val/loss"]])


@pytest.mark.slow
def test_the_diagnostics_see_the_true_loss_under_accumulation(project, names_file, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "20", "--trainer.default_root_dir", "run", *NET_ARGS]
    args += [
        "--trainer.accumulate_grad_batches",
        "2",
        "--diagnostics.every_n_steps",
        "10",
        "--data.steps_per_epoch",
        "20",
    ]
    assert main([*args, "--trainer.enable_progress_bar", "false", "--diagnostics.figures_every_n_steps", "0"]) == 0
    ref = reference_run(str(names_file), 1, NET, accumulate=2, threads=1)
    loss0 = dict(scalars(project / "run" / "lightning_logs" / "version_0")["sampled/loss"])[0]
    assert loss0 == pytest.approx(ref.losses[0], rel=1e-6)  # the minibatch's loss, not Lightning's loss / 2
    assert "confidently wrong" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_bad_optimizer_or_scheduler_argument_is_one_line(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "5", *NET_ARGS, "--optimizer", "AdamW"]
    assert main([*args, "--lr_scheduler", "OneCycleLR", "--lr_scheduler.max_lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: --optimizer / --lr_scheduler: You must define either total_steps"
    )


ADAMW_ONECYCLE = """
optimizer:
  class_path: torch.optim.AdamW
  init_args:
    lr: 0.003
    weight_decay: 0.01
lr_scheduler:
  class_path: torch.optim.lr_scheduler.OneCycleLR
  init_args:
    max_lr: 0.01
    total_steps: 100
"""


@pytest.mark.parametrize("how", ["command-line", "yaml"])
@pytest.mark.slow
def test_optimizer_and_lr_scheduler_from_the_cli(project, names_file, monkeypatch, how):
    monkeypatch.chdir(project)
    if how == "yaml":
        (project / "adamw.yaml").write_text(ADAMW_ONECYCLE)
        extra = ["--config", "adamw.yaml"]
    else:
        extra = ["--optimizer", "AdamW", "--optimizer.lr", "0.003", "--optimizer.weight_decay", "0.01"]
        extra += ["--lr_scheduler", "OneCycleLR", "--lr_scheduler.max_lr", "0.01", "--lr_scheduler.total_steps", "100"]
    checkpoint = _cli_fit(project / "run", 100, *extra)
    ref = reference_run(
        str(names_file),
        100,
        NET,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.003, weight_decay=0.01),
        scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=100),
        threads=1,
    )
    _assert_states(_net_state(checkpoint), ref.net.state_dict(), exact=False)
    tags = scalars(project / "run" / "lightning_logs" / "version_0")
    assert tags["train/lr"] == [(s, pytest.approx(ref.lrs[s])) for s in (49, 99)]  # stepped every optimizer step
    assert ref.lrs[49] > ref.lrs[99] and ref.lrs[49] != ref.lrs[48]


def test_lr_scheduler_without_optimizer_is_refused(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "5", *NET_ARGS, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "2"]
    assert main(args) == 2
    assert "--lr_scheduler needs --optimizer" in capsys.readouterr().err


def test_validate_from_python_after_fit_logs_at_the_trained_step(names_file):
    """`trainer.validate(model, dm)` right after `trainer.fit` (the README's Python use) loads no checkpoint: its
    val/loss belongs to the step the model reached, not to step 0."""
    import lightning as L

    from mm_lightning.data import NamesDataModule
    from mm_lightning.model import MLPConfig
    from mm_lightning.module import MakemoreModule

    dm = NamesDataModule(path=str(names_file), steps_per_epoch=7)
    model = MakemoreModule(net=MLPConfig(vocab=dm.vocab, n_hidden=8, n_layers=1))
    trainer = L.Trainer(
        max_steps=7,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.fit(model, dm)
    trainer.validate(model, dm, verbose=False)
    assert trainer.callback_metrics["step"].item() == 7


@pytest.mark.slow
def test_checkpoint_every_n_train_steps_writes_at_those_steps(project, names_file, monkeypatch):
    """--checkpoint.every_n_train_steps (the run's RunCheckpoint skips ModelCheckpoint's per-batch hook only where
    neither it nor train_time_interval is set): a checkpoint at each multiple, each holding its step's weights."""
    monkeypatch.chdir(project)
    extra = ["--checkpoint.every_n_train_steps", "20", "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null"]
    last = _cli_fit(project / "run", 60, *extra, "--checkpoint.filename", "s{step}")
    directory = project / "run" / "lightning_logs" / "version_0" / "checkpoints"
    steps = sorted(torch.load(p, weights_only=True)["global_step"] for p in directory.glob("s*.ckpt"))
    assert steps == [20, 40, 60]
    ref = reference_run(str(names_file), 60, NET, snapshot_at=(20,), threads=1)
    first = torch.load(next(directory.glob("s*20*.ckpt")), weights_only=True)
    _assert_states(_net_state(first), ref.snapshots[20])
    assert last["global_step"] == 60


@pytest.mark.parametrize("batchnorm", [True, False])
def test_model_summary_counts_the_forwards_flops(batchnorm):
    """Lightning's summary runs example_input_array: its FLOPs are one example's matmuls (2 x in x out for each
    Linear), not the 0 it printed without one, and running it changes no weight, buffer or training mode."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    module = MakemoreModule(MLPConfig(n_layers=3, n_hidden=16, batchnorm=batchnorm, output_batchnorm=batchnorm))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    summary = ModelSummary(module, max_depth=1)
    linears = [m for m in module.net.modules() if isinstance(m, torch.nn.Linear)]
    matmuls = sum(2 * m.in_features * m.out_features for m in linears)
    assert summary.total_flops >= matmuls  # and the biases' and BatchNorms' elementwise work, if counted
    assert summary.total_flops < 1.2 * matmuls
    assert summary.in_sizes[0] == [1, module.net.config.block_size]
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()) and module.training
