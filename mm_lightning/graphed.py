"""One CUDA graph per SGD training step, for the GPU.

A step of this model is ~60 tiny kernels; on a GPU their launches and the Python around them, not the arithmetic,
set the speed (eager: ~365 steps/s on an H100). Captured once as a CUDA graph, a whole step (read minibatch i of
the chunk, forward, loss, gradients, SGD update, loss into slot i, i += 1) is one replay with no host sync.

Everything the graph touches lives at fixed addresses: the model's parameters and buffers (which the eager path
also updates in place, so eager and graphed steps interleave freely: diagnostics observe their sampled steps
eagerly) and this object's chunk buffers. The SGD update is torch's own foreach kernel with the captured learning
rate, so a graphed step computes what `optimizer.step()` computes; a new learning rate (an LR milestone) is
captured anew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


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
    """Steps of `loss = cross_entropy(net(x), y)` + SGD over chunks of minibatches, one CUDA graph replay each."""

    def __init__(self, net: nn.Module, params: list[torch.Tensor], capacity: int = 1):
        self.net, self.params, self.capacity = net, params, capacity  # capacity: the most steps a chunk holds
        self.state = [*params, *net.buffers()]  # what a step changes: the non-finite report restores it
        self.saved: list[torch.Tensor] | None = None
        self.xs = self.ys = self.losses = None  # chunk buffers, allocated for the first chunk
        self.index = torch.zeros(1, dtype=torch.long, device=params[0].device)  # the next step's slot
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lr: float | None = None  # the learning rate the graph was captured with
        self.failed = False  # a capture failed: eager steps from then on

    # ------------------------------------------------------------------------------------------------ chunks

    @torch.no_grad()
    def begin(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Load a chunk (k steps' minibatches) into the graph's buffers; returns the k loss slots."""
        k = len(xs)
        if self.xs is None or xs.shape[1:] != self.xs.shape[1:] or k > len(self.xs) or xs.dtype != self.xs.dtype:
            n = max(k, self.capacity)  # new addresses: the graph must be captured again
            self.xs = xs.new_empty((n, *xs.shape[1:]))
            self.ys = ys.new_empty((n, *ys.shape[1:]))
            self.losses = torch.empty(n, dtype=torch.float32, device=xs.device)
            self.graph = None
        self.xs[:k].copy_(xs)
        self.ys[:k].copy_(ys)
        self.index.zero_()
        if self.saved is None:
            self.saved = [t.clone() for t in self.state]
        else:
            torch._foreach_copy_(self.saved, self.state)
        return self.losses[:k]

    def seek(self, i: int) -> None:
        """The next replay runs slot i (after steps that ran eagerly)."""
        self.index.fill_(i)

    def ready(self, lr: float) -> bool:
        """Whether a graph for this learning rate is there (captured now if needed). A capture that fails (an
        autograd graph of an earlier step kept alive, say) leaves the eager path in charge, with a warning."""
        if self.failed:
            return False
        if self.graph is None or lr != self.lr:
            try:
                self._capture(lr)
            except Exception as e:  # noqa: BLE001 - whatever broke the capture, the eager path still trains
                self.failed, self.graph = True, None
                rank_zero_warn(f"CUDA graph capture failed, training steps run eagerly from here: {e}".split("\n")[0])
                return False
        return True

    def replay(self) -> None:
        self.graph.replay()

    @torch.no_grad()
    def rewind(self) -> None:
        """Parameters and buffers back to where the chunk began (to re-run it up to a non-finite step)."""
        torch._foreach_copy_(self.state, self.saved)

    # ------------------------------------------------------------------------------------------------ capture

    def step(self, lr: float) -> None:
        """One step on slot `index`, the function the graph holds (also runnable eagerly)."""
        x = self.xs.index_select(0, self.index)[0]
        y = self.ys.index_select(0, self.index)[0]
        loss = F.cross_entropy(self.net(x), y)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            torch._foreach_add_(self.params, grads, alpha=-lr)  # what SGD(momentum=0).step() runs on CUDA
            self.losses.index_copy_(0, self.index, loss.detach().view(1))
            self.index.add_(1)

    def _capture(self, lr: float) -> None:
        with torch.no_grad():
            before = [t.clone() for t in (*self.state, self.index)]
        side = torch.cuda.Stream()  # warm-up (lazy inits, cuBLAS workspaces) off the default stream, as torch asks
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(lr)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():  # the warm-up trained: put everything back
                torch._foreach_copy_([*self.state, self.index], before)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, runs nothing
            self.step(lr)
        self.lr = lr


def observed(optimizer: torch.optim.Optimizer, modules: list[nn.Module]) -> bool:
    """Whether anything watches the next step (hooks on the optimizer or on a module): it must then run eagerly."""
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return True
    if o._global_optimizer_pre_hooks or o._global_optimizer_post_hooks:
        return True
    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks:
        return True
    return any(x._forward_hooks or x._forward_pre_hooks or x._backward_hooks for x in modules)
