"""An independent reference: the template's training written as a plain PyTorch loop (no Lightning), for tests to
compare the Trainer's results with. Same initial weights (a MakemoreModule built under the same seed), same
minibatches (minibatch s is the sampler's row s), then the lecture's loop with the feature under test added by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from mm_lightning.data import NamesDataModule, StepSampler
from mm_lightning.model import MLPConfig
from mm_lightning.module import MakemoreModule


@dataclass
class Reference:
    net: torch.nn.Module
    losses: list[float] = field(default_factory=list)  # the loss of every minibatch, in order
    lrs: list[float] = field(default_factory=list)  # the learning rate each optimizer step used
    grad_norms: list[float] = field(default_factory=list)  # total gradient norm at each step, before clipping
    snapshots: dict[int, dict] = field(default_factory=dict)  # state_dict after `step` optimizer steps


def reference_run(
    names: str,
    steps: int,
    net: MLPConfig,
    batch_size: int = 32,
    seed: int = 42,
    data_seed: int = 2147483647,
    optimizer: Callable = lambda params: torch.optim.SGD(params, lr=0.1),
    scheduler: Callable = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [150_000], 0.1),
    clip: tuple[str, float] | None = None,  # ("norm" | "value", threshold), as Lightning's clipping
    accumulate: int = 1,
    autocast: torch.dtype | None = None,
    snapshot_at: tuple[int, ...] = (),
    threads: int | None = None,  # the CLI's fit runs this model on 1 CPU thread (fastpath.py): rounding follows
) -> Reference:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(
            names,
            steps,
            net,
            batch_size,
            seed,
            data_seed,
            optimizer,
            scheduler,
            clip,
            accumulate,
            autocast,
            snapshot_at,
        )
    finally:
        torch.set_num_threads(previous)


def _run(names, steps, net, batch_size, seed, data_seed, optimizer, scheduler, clip, accumulate, autocast, snapshot_at):
    L.seed_everything(seed, verbose=False)
    template = MakemoreModule(net=net)  # its initial weights, drawn exactly as fit draws them
    model = template.net
    dm = NamesDataModule(path=names, batch_size=batch_size, seed=data_seed)
    dm.setup()
    x, y = dm.splits["train"].tensors()
    sampler = StepSampler(len(y), batch_size, data_seed)
    params = list(model.parameters())
    opt = optimizer(params)
    sched = scheduler(opt) if scheduler else None
    ref = Reference(model)
    model.train()
    for step in range(steps):
        ref.lrs.append(opt.param_groups[0]["lr"])
        for micro in range(accumulate):
            ix = sampler.indices(step * accumulate + micro, step * accumulate + micro + 1)[0]
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = F.cross_entropy(model(x[ix]), y[ix])
            ref.losses.append(loss.item())
            if micro == 0:
                opt.zero_grad()
            (loss / accumulate).backward()
        ref.grad_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        if clip is not None and clip[0] == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip[1])
        elif clip is not None:
            torch.nn.utils.clip_grad_value_(params, clip[1])
        opt.step()
        if sched is not None:
            sched.step()
        if step + 1 in snapshot_at:
            ref.snapshots[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    return ref


@torch.no_grad()
def split_loss(names: str, state: dict, net: MLPConfig, split: str = "val") -> float:
    """The loss over a whole split with BatchNorm in eval mode, from a state_dict of the net."""
    module = MakemoreModule(net=net)
    module.net.load_state_dict(state)
    module.eval()
    dm = NamesDataModule(path=names)
    dm.setup()
    x, y = dm.splits[split].tensors()
    return F.cross_entropy(module.net(x), y).item()
