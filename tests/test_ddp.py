"""Scaling out on Lightning's own DDP (CPU, gloo, 2 processes): one run directory, logs and checkpoints written
once, resume, distinct minibatches per rank, and SyncBatchNorm making 2 x 32 the same as 64 in one process."""

import pytest
import torch
import torch.nn.functional as F

from mm_lightning.cli import MakemoreCLI
from mm_lightning.data import StepSampler
from tests.conftest import SMALL, flat_tag, run_cli, scalars

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
pytestmark = pytest.mark.slow


def test_ddp_writes_once_and_resumes(project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = ["--trainer.default_root_dir", "runs", "--data.steps_per_epoch", "100", *SMALL]
    run_cli(["fit", *DDP, "--trainer.max_steps", "200", *root], cwd=project)
    runs = project / "runs" / "lightning_logs"
    assert [p.name for p in runs.iterdir()] == ["version_0"]  # rank 1 claimed no directory of its own
    run = runs / "version_0"
    events = [p.name for p in run.glob("events.out.tfevents.*")]
    assert len(events) == 2 and sum(e.endswith(".figures") for e in events) == 1  # rank 0 and its figures worker
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    layer = scalars(run)[flat_tag("act/std/net.layers.2")]
    assert [s for s, _ in layer] == [0, 100]  # diagnostics logged once per step, in the run itself
    assert [e.step for e in acc.Scalars("0 loss/val/loss")] == [100, 200]  # the losses first in TensorBoard
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.suffix == ".ckpt")[-1] == "last.ckpt"
    proc = run_cli(["fit", *DDP, "--trainer.max_steps", "300", "--ckpt_path", "last", *root], cwd=project)
    assert "at step 200" in proc.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 300
    assert [p.name for p in runs.iterdir()] == ["version_0"]


def _reference(project, monkeypatch, args: list[str], steps: int, per_rank_batchnorm: bool) -> dict:
    """The same model (built by the same CLI from the same seed) trained in one process on both ranks' minibatches.

    per_rank_batchnorm: each rank's 32 examples normalised by their own statistics, and the running statistics
    those of rank 0 (the ones DDP broadcasts and rank 0 saves); otherwise BatchNorm over all 64 (SyncBatchNorm).
    """
    monkeypatch.chdir(project)
    cli = MakemoreCLI(args, run=False)
    net, dm = cli.model.net, cli.datamodule
    dm.setup()
    x, y = dm.splits["train"].tensors()
    samplers = [StepSampler(len(y), dm.batch_size, dm.seed, rank) for rank in (0, 1)]
    assert not torch.equal(samplers[0].indices(0, steps), samplers[1].indices(0, steps))  # distinct per rank
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2], 0.1)
    net.train()
    for step in range(steps):
        halves = [s.indices(step, step + 1)[0] for s in samplers]
        kept = None
        if per_rank_batchnorm:
            loss0 = F.cross_entropy(net(x[halves[0]]), y[halves[0]])
            kept = [b.clone() for b in net.buffers()]
            loss1 = F.cross_entropy(net(x[halves[1]]), y[halves[1]])
            loss = (loss0 + loss1) / 2  # DDP averages the ranks' gradients
        else:
            ix = torch.cat(halves)
            loss = F.cross_entropy(net(x[ix]), y[ix])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if kept is not None:  # rank 1's running statistics are overwritten by rank 0's (after backward, which
            for b, k in zip(net.buffers(), kept):  # holds on to the buffers' versions)
                b.copy_(k)
    return {f"net.{k}": v for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "sync",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                torch.cuda.device_count() < 2, reason="PyTorch runs SyncBatchNorm on GPU modules only (2 GPUs needed)"
            ),
        ),
    ],
    ids=["batchnorm-per-rank", "sync-batchnorm"],
)
def test_ddp_equals_one_process_on_both_ranks_minibatches(project, monkeypatch, sync):
    steps = 40
    args = ["--trainer.max_steps", str(steps), "--data.steps_per_epoch", str(steps), *SMALL]
    args += ["--diagnostics.every_n_steps", "0", "--model.milestones", f"[{steps // 2}]"]  # the LR decay too
    strategy = (
        DDP
        if not sync
        else [
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.sync_batchnorm",
            "true",
            "--trainer.accelerator",
            "gpu",
        ]
    )
    run_cli(["fit", *strategy, "--trainer.default_root_dir", "runs", *args], cwd=project)
    ddp = torch.load(next(project.glob("runs/lightning_logs/version_0/checkpoints/last.ckpt")), weights_only=True)
    reference = _reference(project, monkeypatch, args, steps, per_rank_batchnorm=not sync)
    for name, value in reference.items():
        got = ddp["state_dict"][name].cpu()
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(got, value), name
