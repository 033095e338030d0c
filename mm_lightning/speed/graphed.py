"""One CUDA graph per optimizer step of a graphable training step, for the GPU (used by the lean loop, lean.py).

A step of this model is ~60 tiny kernels; on a GPU their launches and the Python around them, not the arithmetic,
set the speed (eager: ~300 steps/s on an H100). Captured once as a CUDA graph, the whole step (forward, loss,
gradients, SGD update, loss into a slot) is one replay.

A module declares that its training_step is this step (see `why_not_graphable`): the loss
`cross_entropy(self.net(x), y)`, handed to `self.track_train_loss(loss)` and returned. What a graph must preserve,
step for step, is that training_step followed by plain SGD's `optimizer.step()`:
- the loss, and BatchNorm's running statistics updated by that forward;
- the update `p -= lr * grad`, torch's own foreach kernel (what SGD with momentum 0 runs on CUDA);
- what a non-finite loss leaves behind: the update is masked out when the loss is not finite, so the parameters
  that produced it are still there when the non-finite stop (StopOnNonFiniteLoss) reports it.
Everything the graph touches lives at fixed addresses: the parameters and buffers (which eager steps also update
in place, so eager and graphed steps interleave freely: the diagnostics' sampled steps run eagerly) and this
object's input and loss slots. A new learning rate (an LR milestone) is captured anew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mm_lightning.speed import private

MAX_CAPTURES = 4  # a learning rate that changes more often than this (OneCycleLR, say) is not worth a graph


def why_not_graphable(module: nn.Module) -> str | None:
    """Why a CUDA graph or hand gradients (handgrad.py) may not replace the module's training_step (None when they
    may). A module declares it with the class attribute `graphable_training_step = training_step` (the very
    function), and has `net` and `track_train_loss`; a subclass that overrides training_step without declaring its
    own is run as written."""
    cls = type(module)
    declared = getattr(cls, "graphable_training_step", None)
    if declared is None:
        return f"{cls.__name__} declares no graphable_training_step"
    if declared is not getattr(cls, "training_step", None):
        why = "the declared step would not run its code"
        return f"{cls.__name__}.training_step is not the one it declares graphable ({why})"
    if not isinstance(getattr(module, "net", None), nn.Module) or not callable(getattr(module, "track_train_loss", 0)):
        return f"{cls.__name__} declares a graphable training_step but has no net or track_train_loss"
    # what the declared step calls, as the class that declared it has them (MakemoreModule.training_step calls
    # training_forward; a declared step hands a loss without autograd's graph to track_train_loss)
    owner = next(c for c in cls.__mro__ if "graphable_training_step" in vars(c))
    for name in ("training_forward", "track_train_loss"):
        if getattr(cls, name, None) is not getattr(owner, name, None):
            return f"{cls.__name__} overrides {name} (the declared step would not run its code)"
    return None


def can_graph(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> str | None:
    """Why a step cannot be one graph (None when it can): plain SGD on CUDA float32 parameters only."""
    if not torch.cuda.is_available() or any(p.device.type != "cuda" for p in params):
        return "not on a CUDA device"
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return "not plain SGD with one parameter group"
    group = optimizer.param_groups[0]
    if group["momentum"] or group["weight_decay"] or group["maximize"] or group.get("differentiable"):
        return "SGD with momentum, weight decay, maximize or differentiable"
    if group.get("fused") or isinstance(group["lr"], torch.Tensor):
        return "fused SGD or a tensor learning rate"
    if any(p.dtype != torch.float32 for p in params):
        return "parameters are not float32"
    return None


class GraphedSGDStep:
    """`loss = cross_entropy(net(x), y)` + an SGD step, one CUDA graph replay each."""

    def __init__(self, net: nn.Module, params: list[torch.Tensor]):
        self.net, self.params = net, params
        self.state = [*params, *net.buffers()]  # what a step changes (the warm-up before a capture restores it)
        self.x = self.y = None  # input slots, allocated for the first batch
        self.loss = torch.zeros((), dtype=torch.float32, device=params[0].device)  # the last step's loss
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lr: float | None = None  # the learning rate the graph was captured with
        self.captures = 0
        self.off: str | None = None  # why graphs stopped (eager steps from then on)

    def ready(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> bool:
        """Load the batch into the input slots; whether a graph for this learning rate is there (captured now if
        needed). A capture that fails leaves the eager path in charge, with a warning."""
        if self.off is not None:
            return False
        if self.x is None or x.shape != self.x.shape or y.shape != self.y.shape or x.dtype != self.x.dtype:
            self.x, self.y, self.graph = torch.empty_like(x), torch.empty_like(y), None  # new addresses
        with torch.no_grad():
            self.x.copy_(x, non_blocking=True)
            self.y.copy_(y, non_blocking=True)
        if self.graph is None or lr != self.lr:
            if self.captures >= MAX_CAPTURES:
                return self._stop(f"the learning rate changed {self.captures} times")
            try:
                self._capture(lr)
            except Exception as e:  # noqa: BLE001 - whatever broke the capture, the eager path still trains
                return self._stop(f"CUDA graph capture failed ({str(e).splitlines()[0]})")
        return True

    def _stop(self, why: str) -> bool:
        self.off, self.graph = why, None
        rank_zero_warn(f"{why}: training steps run eagerly from here")
        return False

    def replay(self) -> torch.Tensor:
        """One step on the loaded batch; returns the loss slot (overwritten by the next step)."""
        self.graph.replay()
        return self.loss

    def step(self, lr: float) -> None:
        """The function the graph holds (also runnable eagerly, on any device)."""
        loss = F.cross_entropy(self.net(self.x), self.y)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            finite = torch.isfinite(loss)
            grads = [torch.where(finite, g, torch.zeros_like(g)) for g in grads]  # no update from a NaN/Inf loss
            private.foreach_add_(self.params, grads, alpha=-lr)  # what SGD(momentum=0).step() runs on CUDA
            self.loss.copy_(loss.detach())

    def _capture(self, lr: float) -> None:
        with torch.no_grad():
            before = [t.clone() for t in self.state]
        side = torch.cuda.Stream()  # warm-up (lazy inits, cuBLAS workspaces) off the default stream, as torch asks
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(lr)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():  # the warm-up trained: put everything back
                private.foreach_copy_(self.state, before)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, runs nothing
            self.step(lr)
        self.lr, self.captures = lr, self.captures + 1
