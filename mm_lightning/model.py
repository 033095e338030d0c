"""The makemore part 3 network as a plain nn.Module, its init schemes, and sampling from it.

embedding -> flatten -> n_layers x [Linear -> BatchNorm1d -> Tanh] -> Linear -> BatchNorm1d
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.errors import UsageError

InitScheme = Literal["torch", "kaiming", "normal", "zeros"]  # zeros: the lecture's exercise E01


@dataclass(frozen=True)
class MLPConfig:
    """Architecture and initialisation of the MLP. Defaults: the lecture's deep network."""

    vocab: str = "." + string.ascii_lowercase
    """Characters read and predicted, the boundary token first (set from the data)."""
    block_size: int = 3
    """Characters of context (set from --data.block_size)."""
    n_embd: int = 10
    """Embedding dimensions per character."""
    n_hidden: int = 100
    """Units per hidden layer."""
    n_layers: int = 5
    """Hidden [Linear -> BatchNorm1d -> Tanh] layers (0 gives a linear model)."""
    batchnorm: bool = True
    """BatchNorm1d after each hidden Linear (whose bias is then dropped)."""
    output_batchnorm: bool = True
    """BatchNorm1d after the output Linear, as in the lecture's deep network."""
    bn_momentum: float = 0.1
    """Running-statistics momentum of every BatchNorm1d (torch's 0.1; the lecture's first BN used 0.001)."""
    init: InitScheme = "kaiming"
    """Hidden weights: 'kaiming' N(0,1)*gain/sqrt(fan_in), 'normal' N(0,1)*gain, 'torch' PyTorch's default * gain,
    'zeros' every weight and bias (the embedding's too) zero: exercise E01."""
    gain: float = 5 / 3
    """Multiplier of the hidden weights (5/3 is the tanh gain)."""
    bias_scale: float = 0.0
    """Hidden biases (when present) are N(0,1)*bias_scale; 0 gives zeros. Not used with init 'torch'."""
    output_init: InitScheme | None = None
    """Scheme of the output weights, with gain 1; None: the hidden scheme and gain."""
    output_scale: float = 0.1
    """'Less confident' last layer: multiplies the output BatchNorm's gamma, or the output weights without it."""
    output_bias_scale: float = 0.0
    """Output bias (without output BatchNorm) is N(0,1)*output_bias_scale. Not used with init 'torch'."""

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise UsageError(f"--model.net.{what}")

        need(len(self.vocab) >= 2 and self.vocab[0] == ".", "vocab must be '.' followed by at least one character")
        need(len(set(self.vocab)) == len(self.vocab), "vocab must not repeat characters")
        for name in ("block_size", "n_embd", "n_hidden"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        need(self.n_layers >= 0, f"n_layers must be 0 or more, got {self.n_layers}")
        need(0.0 <= self.bn_momentum <= 1.0, f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        schemes = InitScheme.__args__
        need(self.init in schemes, f"init must be one of {', '.join(schemes)}; got {self.init!r}")
        need(self.output_init in (None, *schemes), f"output_init must be null or one of {', '.join(schemes)}")
        need(self.gain > 0, f"gain must be positive, got {self.gain}")
        for name in ("bias_scale", "output_scale", "output_bias_scale"):
            need(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.init == "torch" and self.bias_scale != 0:
            raise UsageError("--model.net.bias_scale has no effect with init 'torch' (PyTorch draws biases); drop it")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def build(self) -> MLP:
        """The network this config describes (a subclass of the config may build a subclass of MLP)."""
        return MLP(self)


class MLP(nn.Module):
    """Maps (B, block_size) character indices to (B, vocab_size) logits."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.n_embd)
        layers: list[nn.Module] = []
        fan_in = c.n_embd * c.block_size
        for _ in range(c.n_layers):
            layers.append(self.make_linear(fan_in, c.n_hidden, bias=not c.batchnorm))
            if c.batchnorm:
                layers.append(self.make_batchnorm(c.n_hidden))
            layers.append(nn.Tanh())
            fan_in = c.n_hidden
        layers.append(self.make_linear(fan_in, c.vocab_size, bias=not c.output_batchnorm))
        if c.output_batchnorm:
            layers.append(self.make_batchnorm(c.vocab_size))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def make_linear(self, fan_in: int, fan_out: int, bias: bool) -> nn.Linear:
        return nn.Linear(fan_in, fan_out, bias=bias)

    def make_batchnorm(self, dim: int) -> nn.BatchNorm1d:
        return nn.BatchNorm1d(dim, momentum=self.config.bn_momentum)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embedding(idx).flatten(1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        self.init_embedding(self.embedding.weight)
        if c.init == "zeros":
            self.embedding.weight.zero_()
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for i, linear in enumerate(linears):
            is_output = i == len(linears) - 1
            own_scheme = is_output and c.output_init is not None
            self.init_linear(
                linear,
                scheme=c.output_init if own_scheme else c.init,
                gain=1.0 if own_scheme else c.gain,
                bias_scale=c.output_bias_scale if is_output else c.bias_scale,
            )
        self.finish_init()

    def init_embedding(self, weight: torch.Tensor) -> None:
        """Draw the embedding table: N(0, 1), the lecture's C (a subclass may draw it otherwise)."""
        nn.init.normal_(weight)

    def init_linear(self, linear: nn.Linear, scheme: str, gain: float, bias_scale: float) -> None:
        """Draw one Linear's weights (and bias) by the config's scheme (a subclass may draw them otherwise)."""
        _init_linear(linear, scheme, gain, bias_scale)

    @torch.no_grad()
    def finish_init(self) -> None:
        """After the Linear layers: fresh BatchNorms, and the 'less confident' last layer (output_scale)."""
        for m in self.layers:
            if isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()  # gamma 1, beta 0, fresh running statistics
        last = self.layers[-1]
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        (last.weight if isinstance(last, nn.BatchNorm1d) else linears[-1].weight).mul_(self.config.output_scale)


def _init_linear(linear: nn.Linear, scheme: str, gain: float, bias_scale: float) -> None:
    fan_in = linear.weight.shape[1]
    if scheme == "zeros":
        nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        return
    if scheme == "torch":
        linear.reset_parameters()  # weights and biases as nn.Linear draws them
        linear.weight.mul_(gain)
        return
    nn.init.normal_(linear.weight)
    linear.weight.mul_(gain / math.sqrt(fan_in) if scheme == "kaiming" else gain)
    if linear.bias is not None:
        nn.init.normal_(linear.bias)
        linear.bias.mul_(bias_scale)


@torch.no_grad()
def generate(
    net: MLP,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_length: int = 50,
    draw: Callable[..., list[list[int]]] | None = None,
) -> list[str]:
    """Sample words one character at a time until the boundary token (BN in eval mode), all samples in parallel.
    `draw(net, num_samples, temperature, generator, max_length)` replaces how the words are drawn (the lecture kit's
    one-at-a-time order: mm_lightning.lecture.sampling)."""
    if num_samples < 1:
        raise UsageError(f"the number of samples must be at least 1, got {num_samples}")
    if not temperature > 0:
        raise UsageError(f"temperature must be positive, got {temperature}; 1.0 samples the model as trained")
    was_training = net.training
    net.eval()
    try:
        words = (draw or _words_in_parallel)(net, num_samples, temperature, generator, max_length)
    finally:
        net.train(was_training)
    return ["".join(net.config.vocab[i] for i in word) for word in words]


def _words_in_parallel(net: MLP, num_samples: int, temperature: float, generator, max_length: int) -> list[list[int]]:
    device = net.embedding.weight.device
    context = torch.zeros(num_samples, net.config.block_size, dtype=torch.long, device=device)
    out = torch.zeros(num_samples, max_length, dtype=torch.long, device=device)
    for t in range(max_length):
        probs = F.softmax(net(context) / temperature, dim=-1)
        ix = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        out[:, t] = ix
        context = torch.cat([context[:, 1:], ix[:, None]], dim=1)
        if (out[:, : t + 1] == 0).any(dim=1).all():
            break
    return [row[: row.index(0)] if 0 in row else row for row in out.tolist()]
