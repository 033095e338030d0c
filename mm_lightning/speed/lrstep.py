"""MultiStepLR's step without its per-call machinery, for the lean loop (lean.py), on the steps where it changes no
learning rate.

`MultiStepLR.step()` runs every optimizer step (the template's schedule has interval "step"): a context manager
around `get_lr`, a warning check, a membership test in its milestones, two lists of the learning rates, and the
learning rates written back unchanged. On a step that is not a milestone, all it leaves changed is its two counters
and a fresh list of the (unchanged) rates in `_last_lr`. `MultiStepLRStep.step` does just that there, some 1% of a
step of the lecture's model on a CPU; on a milestone, on the scheduler's first step (torch's order warnings), with
a tensor learning rate, for a subclass or a replaced method, it calls `scheduler.step()` itself.

Exact only for the torch code it was checked against: TORCH_VERIFIED holds, per torch release, the fingerprints of
the torch functions it mirrors (as sgd.py does for the SGD step). On any other torch the lean loop calls
`scheduler.step()`. tests/test_lr_step.py checks the scheduler's whole state and the learning rates equal.
"""

from __future__ import annotations

from torch.optim.lr_scheduler import MultiStepLR

from mm_lightning.speed import gate

# "module:Qualified.name" of each torch function whose behaviour MultiStepLRStep reproduces
MIRRORED = (
    "torch.optim.lr_scheduler:LRScheduler.step",
    "torch.optim.lr_scheduler:LRScheduler._update_lr",
    "torch.optim.lr_scheduler:MultiStepLR.get_lr",
    "torch.optim.lr_scheduler:_enable_get_lr_call",
    "torch.optim.lr_scheduler:_warn_get_lr_called_within_step",
    "torch.optim.lr_scheduler:_param_groups_val_list",
    "torch.optim.lr_scheduler:_update_param_group_val",
)

# torch releases (without the local "+cpu"/"+cu128" part) it was verified against, with each fingerprint there
TORCH_VERIFIED: dict[str, dict[str, str]] = {
    "2.13.0": {
        "LRScheduler.step": "97b23e541402965a",
        "LRScheduler._update_lr": "6d5315b9758cfdf7",
        "MultiStepLR.get_lr": "7c26f7968230d879",
        "_enable_get_lr_call": "407214e5543fb91d",
        "_warn_get_lr_called_within_step": "fb91062bd4af5a0e",
        "_param_groups_val_list": "000625687d795451",
        "_update_param_group_val": "30daf57cee223e88",
    },
}

# what an instance may not replace for the shortcut to stand in for step()
_METHODS = ("step", "_update_lr", "get_lr")


def why_not_verified() -> str | None:
    """Why MultiStepLR must step through scheduler.step() on this torch (None when the shortcut may run)."""
    return gate.torch_why_not(TORCH_VERIFIED, MIRRORED, "its MultiStepLR step")


class MultiStepLRStep:
    """scheduler.step() for torch's MultiStepLR (see the module docstring); `verified`: why_not_verified() is None,
    read once per fit."""

    def __init__(self, verified: bool):
        self.verified = verified

    def exact(self, scheduler) -> bool:
        """Whether scheduler.step() would now change nothing but the counters and _last_lr."""
        if not self.verified or type(scheduler) is not MultiStepLR or scheduler._step_count < 2:
            return False  # (its first step checks the optimizer stepped first, and may warn)
        if any(name in scheduler.__dict__ for name in _METHODS):
            return False
        if scheduler.last_epoch + 1 in scheduler.milestones:
            return False
        return all(type(group["lr"]) is float for group in scheduler.optimizer.param_groups)

    def step(self, scheduler) -> None:
        if not self.exact(scheduler):
            scheduler.step()
            return
        # LRScheduler.step: the count; _update_lr: the epoch, get_lr under _enable_get_lr_call (which leaves its
        # flag False), each group's lr written back as it was, and _last_lr a new list of them
        scheduler._step_count += 1
        scheduler.last_epoch += 1
        scheduler._get_lr_called_within_step = False
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
