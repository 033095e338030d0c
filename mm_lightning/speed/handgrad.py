"""Gradients by hand for the lecture's MLP on a CPU: the ops autograd runs, called directly (used by the lean loop).

On a CPU, a step of the lecture's small network spends ~25% of its time recording the autograd graph and running
autograd's engine over it, not in arithmetic. Where a module declares its training_step graphable (graphed.py: the
loss `cross_entropy(self.net(x), y)`, handed to `track_train_loss`) and its net is exactly the core MLP with
BatchNorm (embedding -> [Linear -> BatchNorm1d -> Tanh] x n -> Linear -> BatchNorm1d, torch's own modules), a step
that nothing observes runs the forward with no graph and the backward as the aten ops autograd's derivative formulas
run for these modules, in its order, on the same operands: the same kernels, so the same bits. The ops were read off
a dispatch trace of `loss.backward()` (tests/test_handgrad.py keeps that trace and this code in step).

Three guards keep it exact, and it steps aside (the fast path's line says why, or one warning) where one fails:
- the structure: torch's Embedding / Linear / BatchNorm1d / Tanh classes with the options this code handles, the
  optimizer stepping exactly the net's parameters, none with a tensor hook; checked at fit start, and every step in
  a few attribute reads (a callback may freeze, hook, patch or replace something mid-fit: autograd for that step);
- the code: the torch release in TORCH_VERIFIED, with the recorded fingerprints of the Python forwards it mirrors
  (and MLP.forward's);
- the numbers: the first step of each batch shape is computed both ways (autograd's on the side, every buffer put
  back) and compared bitwise: loss, every gradient, BatchNorm's running statistics.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mm_lightning.model import MLP
from mm_lightning.speed import gate, private

aten = torch.ops.aten

# "module:Qualified.name" of each Python function whose ops the hand step calls itself
MIRRORED = (
    "torch.nn.modules.sparse:Embedding.forward",
    "torch.nn.functional:embedding",
    "torch.nn.modules.linear:Linear.forward",
    "torch.nn.modules.batchnorm:_BatchNorm.forward",
    "torch.nn.functional:batch_norm",
    "torch.nn.modules.activation:Tanh.forward",
    "torch.nn.functional:cross_entropy",
)

# torch releases the hand step was verified against, with each mirrored function's fingerprint there (gate.py)
TORCH_VERIFIED: dict[str, dict[str, str]] = {
    "2.13.0": {
        "Embedding.forward": "1dd1797f482e42eb",
        "embedding": "9daa8d8c26575ac4",
        "Linear.forward": "c0ab8f42cc3bf948",
        "_BatchNorm.forward": "42c3a1d2b356ef16",
        "batch_norm": "93fe25afd4268873",
        "Tanh.forward": "7ed9ec3bbd34ffe5",
        "cross_entropy": "a5ec7a23e87b7e65",
    },
}


# and of the core MLP's forward, which the hand step mirrors too (edit both together)
MLP_FORWARD = "5c4aa31a330306ca"


def why_not_verified() -> str | None:
    """Why hand gradients must not run on this torch, or with this MLP.forward (None when they may)."""
    why = gate.torch_why_not(TORCH_VERIFIED, MIRRORED, "the hand step")
    if why is None and gate.fingerprint(MLP.forward) != MLP_FORWARD:
        why = f"MLP.forward is not the code the hand step mirrors (fingerprint {gate.fingerprint(MLP.forward)})"
    return why


def why_not_hand(net: nn.Module, module_params: list, optimizer_params: list) -> str | None:
    """Why this net's gradients cannot be computed by hand exactly (None when they can)."""
    if type(net).forward is not MLP.forward:
        return f"{type(net).__name__} is not the core MLP (its own forward)"
    c = net.config
    if not (c.batchnorm and c.output_batchnorm):
        return "the MLP has Linear biases (batchnorm or output_batchnorm off)"
    if type(net.embedding) is not nn.Embedding or not _plain_embedding(net.embedding):
        return "the embedding is not a plain nn.Embedding (a padding index, a max norm, scaled or sparse gradients)"
    kinds = [nn.Linear, nn.BatchNorm1d, nn.Tanh] * c.n_layers + [nn.Linear, nn.BatchNorm1d]
    if [type(m) for m in net.layers] != kinds:
        return "the layers are not torch's Linear / BatchNorm1d / Tanh"
    for m in net.layers:
        if isinstance(m, nn.Linear) and m.bias is not None:
            return "a Linear has a bias"
        if isinstance(m, nn.BatchNorm1d) and not _handled_batchnorm(m):
            return "a BatchNorm1d without affine, running statistics or a momentum"
    if any("forward" in vars(m) for m in net.modules()):
        return "a module's forward is replaced on the instance"
    params, expected = list(net.parameters()), _expected_params(net)
    if len(params) != len(expected) or any(a is not b for a, b in zip(params, expected)):
        return "the MLP's parameters are not its layers' own (tied, or one more)"
    ids = {id(p) for p in params}
    if {id(p) for p in module_params} != ids or {id(p) for p in optimizer_params} != ids:
        return "the optimizer or the module holds parameters other than the net's"
    if not all(p.requires_grad and p.device.type == "cpu" for p in params):
        return "a parameter is frozen or not on the CPU"
    return None


def _plain_embedding(embedding: nn.Embedding) -> bool:
    """No padding index, max norm, frequency-scaled or sparse gradient: the embedding the hand step's ops assume."""
    e = embedding
    return e.padding_idx is None and e.max_norm is None and not e.scale_grad_by_freq and not e.sparse


def _handled_batchnorm(bn: nn.BatchNorm1d) -> bool:
    """Affine, with running statistics updated by a momentum: the BatchNorm the hand step's ops assume."""
    return bn.affine and bn.track_running_stats and bn.momentum is not None


def _expected_params(net: nn.Module) -> list[nn.Parameter]:
    """The core MLP's parameters, in the order the hand step returns their gradients: the embedding's weight, then
    each block's Linear weight, BatchNorm weight and bias (net.parameters() lists them so, where none is shared)."""
    modules = list(net.layers)
    params = [net.embedding.weight]
    for i in range(0, len(modules), 3):
        params += [modules[i].weight, modules[i + 1].weight, modules[i + 1].bias]
    return params


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (a NaN equals the same NaN, and 0.0 differs from -0.0, unlike torch.equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class HandGradStep:
    """`loss = cross_entropy(net(x), y)` and every parameter's gradient, with autograd's ops but no autograd graph;
    with a compile mode, that whole function compiled by torch.compile (--model.compile)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, compile_mode: str | None = None):
        self.module, self.optimizer = module, optimizer  # (what why_not_hand is asked again, if the net changes)
        self.net = module.net
        self._bind()
        self.compile_mode = compile_mode
        # compiled lazily, at its first call (the comparison of the first batch shape)
        self.compiled = None if compile_mode is None else torch.compile(self.loss_and_grads, mode=compile_mode)
        self.checked: set[tuple] = set()  # batch shapes whose step was compared with autograd's
        self.off: str | None = None  # why hand steps stopped
        self.steps = 0  # steps run by hand

    def _bind(self) -> None:
        """Record the net's pieces, and what the per-step check (`_unchanged`) compares with them."""
        net = self.net
        self.embedding, self.layers = net.embedding, net.layers
        self.layer_modules = tuple(net.layers._modules.values())
        modules = self.layer_modules
        self.blocks = [(modules[i], modules[i + 1]) for i in range(0, len(modules), 3)]  # (Linear, BatchNorm1d)
        self.params = _expected_params(net)  # = list(net.parameters()), which why_not_hand checked
        self.modules = (net, self.embedding, self.layers, *modules)
        self.kinds = tuple((type(m), len(m._parameters)) for m in self.modules)
        self.slots = [(m._parameters, n, p) for m in self.modules for n, p in m._parameters.items() if p is not None]

    def _unchanged(self) -> bool:
        """Whether the net is still what why_not_hand approved (a callback may change it mid-fit: freeze a
        parameter, replace a layer, set a BatchNorm's momentum to None as StochasticWeightAveraging does, hook or
        patch a module). A few attribute reads per module, every step."""
        net = self.net
        if net._modules.get("embedding") is not self.embedding or net._modules.get("layers") is not self.layers:
            return False
        if tuple(self.layers._modules.values()) != self.layer_modules:
            return False
        for m, (kind, count) in zip(self.modules, self.kinds):
            if type(m) is not kind or len(m._parameters) != count or "forward" in m.__dict__ or not m.training:
                return False
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
        for params, name, p in self.slots:
            if params.get(name) is not p or not p.requires_grad:
                return False
        return all(_handled_batchnorm(bn) for _, bn in self.blocks) and _plain_embedding(self.embedding)

    def ready(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether this batch's step may run by hand (compared with autograd's first, for a new batch shape)."""
        if self.off is not None or private.autograd_is_watched(self.params):
            return False
        if x.dim() != 2 or y.dim() != 1 or x.shape[0] < 2:
            return False  # (a one-row batch: BatchNorm raises, as the eager step will say)
        if not self._unchanged():
            if not all(m.training for m in self.net.modules()):
                return False  # a training step in eval mode: autograd runs what was asked
            optimizer_params = [p for group in self.optimizer.param_groups for p in group["params"]]
            if why_not_hand(self.net, list(self.module.parameters()), optimizer_params) is not None:
                return False  # this step runs autograd (and the next asks again)
            self._bind()  # changed, and still the core MLP: compared with autograd anew
            self.checked.clear()
        key = (tuple(x.shape), tuple(y.shape), x.dtype, y.dtype)
        if key not in self.checked:
            why = self._compare(x, y)
            if why is not None:
                self.off = why
                rank_zero_warn(f"hand gradients differ from autograd's ({why}): steps run autograd from here")
                return False
            self.checked.add(key)
        return True

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One training step's loss and gradients (in `self.params` order); updates BatchNorm's buffers."""
        self.steps += 1
        return (self.compiled or self.loss_and_grads)(x, y)

    def set_grads(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g

    @torch.no_grad()
    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward, as torch's modules run it in training mode, then the backward, as autograd runs it."""
        # forward: what Embedding, flatten, Linear (no bias), BatchNorm1d (training), Tanh and cross_entropy call
        h = torch.embedding(self.embedding.weight, x)
        emb_shape = h.shape
        h = h.view(h.shape[0], -1)
        saved = []
        last = len(self.blocks) - 1
        for i, (linear, bn) in enumerate(self.blocks):
            a = torch.mm(h, linear.weight.t())
            bn.num_batches_tracked.add_(1)
            out, mean, invstd = torch.native_batch_norm(
                a, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps
            )
            saved.append((h, a, mean, invstd))
            h = torch.tanh(out) if i < last else out
        logp = torch._log_softmax(h, 1, False)
        loss, total_weight = aten.nll_loss_forward.default(logp, y, None, 1, -100)
        # backward: each op's derivative formula, as autograd runs them from the loss down
        grads: list[torch.Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        g = aten.nll_loss_backward.default(torch.ones_like(loss), logp, y, None, 1, -100, total_weight)
        g = torch._log_softmax_backward_data(g, logp, 1, logp.dtype)
        for i in reversed(range(len(self.blocks))):
            linear, bn = self.blocks[i]
            h, a, mean, invstd = saved[i]
            if i < last:
                g = aten.tanh_backward.default(g, saved[i + 1][0])  # the tanh's output is the next Linear's input
            g, grads[2 + 3 * i], grads[3 + 3 * i] = aten.native_batch_norm_backward.default(
                g, a, bn.weight, bn.running_mean, bn.running_var, mean, invstd, True, bn.eps, [True, True, True]
            )
            # mm's mat2 is weight.t(), column-major: autograd takes (grad.t() @ mat1).t(), and t's backward .t()
            grads[1 + 3 * i] = g.t().mm(h)
            g = g.mm(linear.weight)  # mm's mat1: grad.mm(mat2.t())
        grads[0] = aten.embedding_dense_backward.default(
            g.view(emb_shape), x, self.embedding.weight.shape[0], -1, False
        )
        return loss, grads

    def _compare(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """Autograd's step and the hand step on this batch, each from the same state, compared bitwise (and the
        compiled step, where there is one, to float rounding); the buffers are put back after each (the training
        step that follows updates them). None when they agree."""
        buffers = list(self.net.buffers())
        with torch.no_grad():
            before = [b.clone() for b in buffers]

        def put_back() -> list[torch.Tensor]:
            with torch.no_grad():
                after = [b.clone() for b in buffers]
                for b, old in zip(buffers, before):
                    b.copy_(old)
            return after

        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            grads = torch.autograd.grad(loss, self.params)
        expected = (loss.detach(), list(grads), put_back())
        hand_loss, hand_grads = self.loss_and_grads(x, y)
        why = _differs(expected, (hand_loss, hand_grads, put_back()), self.net, _same_bits)
        if why is None and self.compiled is not None:
            compiled_loss, compiled_grads = self.compiled(x, y)
            why = _differs(expected, (compiled_loss, compiled_grads, put_back()), self.net, _close)
            why = why and f"compiled: {why}"
        return why


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float rounding: what a compiled step promises (its fused kernels round in another order)."""
    finite = a[torch.isfinite(a)] if a.is_floating_point() else a
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(scale, 1e-30), equal_nan=True)


def _differs(expected: tuple, found: tuple, net: nn.Module, same) -> str | None:
    """What of (loss, gradients, buffers) differs, by `same`, with gradients' strides (None: nothing)."""
    if not same(expected[0], found[0]):
        return "the loss"
    for (name, p), g, h in zip(net.named_parameters(), expected[1], found[1]):
        if h is None or h.stride() != p.stride() or not same(g, h):
            return f"{name}'s gradient"
    if not all(same(a, b) for a, b in zip(expected[2], found[2])):
        return "BatchNorm's running statistics"
    return None
