"""torch.optim.SGD's step without its per-call wrappers, for the lean loop (lean.py).

With momentum 0 and no weight decay, `SGD.step` runs the closure and adds -lr x grad to each parameter that has a
gradient: with torch's foreach kernel over all of them (foreach=True), or one `add_` each (foreach False, or None on
a CPU). Around that, every call pays ~30 us on a CPU: the LR scheduler's wrapper, the profiler's (a record_function
scope, the step hooks), the grad-mode switch, `_init_group` and `_group_tensors_by_device_and_dtype`, some 5% of a
step of the lecture's model. `SGDStep.step` runs the closure and then the same kernel with the same arguments, where
it can tell that `optimizer.step` would do exactly that; otherwise (a step hook, a torch profiler recording,
momentum, weight decay, a tensor learning rate, a replaced or wrapped `step`, changed param groups) it calls
`optimizer.step(closure)` itself, for that step.

Exact only for the torch code it was checked against: TORCH_VERIFIED holds, per torch release, the fingerprints of
the torch functions it mirrors (as gate.py does for Lightning's). On any other torch the lean loop calls
`optimizer.step`, and its line says so. tests/test_fastpath.py checks both paths bitwise equal.
"""

from __future__ import annotations

import torch

from mm_lightning.speed import gate, private

# "module:Qualified.name" of each torch function whose behaviour SGDStep reproduces
MIRRORED = (
    "torch.optim.sgd:SGD.step",
    "torch.optim.sgd:SGD._init_group",
    "torch.optim.sgd:sgd",
    "torch.optim.sgd:_multi_tensor_sgd",
    "torch.optim.sgd:_single_tensor_sgd",
    "torch.optim.optimizer:Optimizer.profile_hook_step",
    "torch.optim.optimizer:_use_grad_for_differentiable",
    "torch.optim.optimizer:_default_to_fused_or_foreach",  # foreach None: the single-tensor update on a CPU
    "torch.optim.lr_scheduler:LRScheduler.__init__",  # its wrapper of optimizer.step sets the flag mark_stepped sets
)

# torch releases (without the local "+cpu"/"+cu128" part) SGDStep was verified against, with the fingerprint each
# mirrored function had there (gate.fingerprint)
TORCH_VERIFIED: dict[str, dict[str, str]] = {
    "2.13.0": {
        "SGD.step": "ca74f84f0986780d",
        "SGD._init_group": "ffb0d879c5f7195d",
        "sgd": "b877ebaa597023cf",
        "_multi_tensor_sgd": "c96f003b79477a10",
        "_single_tensor_sgd": "e6431c7daa0fbfae",
        "Optimizer.profile_hook_step": "f692ce91e88c5496",
        "_use_grad_for_differentiable": "d0f1dfc940581f41",
        "_default_to_fused_or_foreach": "2867120ebdb0605d",
        "LRScheduler.__init__": "b9c01b4cebb2f2f9",
    },
}


def why_not_verified() -> str | None:
    """Why SGD steps must go through optimizer.step on this torch (None when SGDStep may run)."""
    return gate.torch_why_not(TORCH_VERIFIED, MIRRORED, "its SGD step")


def _one_kind(params: list) -> str | None:
    """The device type of params where torch's grouping by (device, dtype) makes one group of them, in order (one
    device, one dtype, plain tensors); None otherwise."""
    if not all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
        return None
    kinds = {(p.device, p.dtype) for p in params}
    return next(iter(kinds))[0].type if len(kinds) == 1 else None


def _is_torch_step(instance_step, class_step) -> bool:
    """Whether an optimizer's own `step` attribute leaves its class's step as torch made it: none, or the wrapper
    an LR scheduler puts around it (which only sets a flag, see private.mark_stepped)."""
    if instance_step is None:
        return True
    return getattr(instance_step, "_wrapped_by_lr_sched", False) and instance_step.__wrapped__ is class_step


class SGDStep:
    """optimizer.step(closure) for a plain torch.optim.SGD (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.SGD):
        self.optimizer = optimizer
        # optimizer.step as it is now: SGD's own, or an LR scheduler's wrapper of it
        self.instance_step = optimizer.__dict__.get("step")
        self.class_step = type(optimizer).step
        # id of a group's params list -> (the list, its length then, its device type or None): a param group's list
        # stays the same object when a checkpoint's optimizer state is loaded (the group dicts do not)
        self.kinds: dict[int, tuple[list, int, str | None]] = {}

    @staticmethod
    def why_not(optimizer: torch.optim.Optimizer) -> str | None:
        """Why SGDStep cannot stand in for this optimizer's step at all (None when it may, step by step)."""
        if type(optimizer) is not torch.optim.SGD:
            return f"{type(optimizer).__name__} is not torch.optim.SGD"
        if getattr(type(optimizer).step, "hooked", False) is not True:
            return "SGD.step is not torch's own"
        if not _is_torch_step(optimizer.__dict__.get("step"), type(optimizer).step):
            return "optimizer.step is wrapped"
        return None

    def _kind(self, params: list) -> str | None:
        known = self.kinds.get(id(params))
        if known is None or known[0] is not params or known[1] != len(params):
            known = self.kinds[id(params)] = (params, len(params), _one_kind(params))
        return known[2]

    def exact(self) -> bool:
        """Whether optimizer.step would now do just what step() does (checked every step: ~2 us)."""
        optimizer = self.optimizer
        if type(optimizer).step is not self.class_step:
            return False
        step = optimizer.__dict__.get("step")
        if step is not self.instance_step:  # a scheduler made since wraps it; anything else is called as it is
            if not _is_torch_step(step, self.class_step):
                return False
            self.instance_step = step
        if private.optimizer_step_is_hooked(optimizer) or private.profiler_enabled():
            return False
        if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
            return False
        for group in optimizer.param_groups:
            if group["momentum"] != 0 or group["weight_decay"] != 0 or group["maximize"] or group["differentiable"]:
                return False
            lr = group["lr"]
            if group["fused"] or type(lr) not in (float, int):  # not a tensor (nor a bool, nor numpy's)
                return False
            kind = self._kind(group["params"])
            # foreach None picks the single-tensor update on a CPU (_default_to_fused_or_foreach), foreach elsewhere
            if kind is None or (group["foreach"] is not True and kind != "cpu"):
                return False
        return True

    def step(self, closure):
        optimizer = self.optimizer
        if not self.exact():
            return optimizer.step(closure)
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            for group in optimizer.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
                if not params:
                    continue
                alpha = -group["lr"]
                if group["foreach"] is True and not any(g.is_sparse for g in grads):
                    private.foreach_add_(params, grads, alpha=alpha)  # _multi_tensor_sgd, momentum 0
                else:  # _single_tensor_sgd; _multi_tensor_sgd with a sparse gradient in its one group
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=alpha)
        private.mark_stepped(optimizer)
        return loss
