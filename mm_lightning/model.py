"""The makemore part 3 network as a plain nn.Module, its init schemes, and sampling from it.

embedding -> flatten -> n_layers x [Linear -> BatchNorm1d -> Tanh] -> Linear -> BatchNorm1d
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.errors import UsageError

InitScheme = Literal["torch", "kaiming", "normal", "zeros"]  # zeros: the lecture's exercise E01
BatchNormStyle = Literal["torch", "lecture", "lecture_first"]
LinearStyle = Literal["torch", "lecture"]
InitDraws = Literal["cell13", "cell6"]  # which of the notebook's init cells init_seed's draws follow


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
    bn_style: BatchNormStyle = "torch"
    """Which BatchNorm: 'torch' nn.BatchNorm1d (normalises with the biased batch variance); 'lecture' the notebook's
    BatchNorm1d class (unbiased x.var(0), eps 1e-5); 'lecture_first' the lecture's first, inline BatchNorm (unbiased
    x.std(0), no eps, a running std). The notebook-exact configs use the lecture's; see LectureBatchNorm1d."""
    linear_style: LinearStyle = "torch"
    """How a Linear with a bias computes: 'torch' F.linear (addmm: the bias enters the matrix product, whose blocked
    accumulation then rounds differently); 'lecture' x @ W.T, then + b, two ops as the notebook writes them (its
    Linear class, and cell 6's h @ W2 + b2). The notebook-exact configs use the lecture's; see LectureLinear."""
    init_seed: int | None = None
    """Draw the whole init from torch.Generator().manual_seed(init_seed) in the notebook's order (the embedding,
    then each Linear's weight as randn(fan_in, fan_out), and its bias where init_draws says the notebook draws one),
    as makemore_part3_bn.ipynb does with its 2147483647; None: from torch's global generator (seed_everything)."""
    init_draws: InitDraws = "cell13"
    """With init_seed: the notebook cell whose draws and rounding the init follows. 'cell13' (its Linear class, the
    deep network): W = randn / fan_in**0.5, then W *= gain; a bias is torch.zeros, never drawn. 'cell6' (the first
    BatchNorm network): W = randn * gain / fan_in**0.5, and a bias is drawn even when scaled by 0 (b2 = randn * 0)."""
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
        styles = BatchNormStyle.__args__
        need(self.bn_style in styles, f"bn_style must be one of {', '.join(styles)}; got {self.bn_style!r}")
        kinds = LinearStyle.__args__
        need(self.linear_style in kinds, f"linear_style must be one of {', '.join(kinds)}; got {self.linear_style!r}")
        need(self.init_seed is None or 0 <= self.init_seed < 2**63, f"init_seed must be in [0, 2^63): {self.init_seed}")
        draws = InitDraws.__args__
        need(self.init_draws in draws, f"init_draws must be one of {', '.join(draws)}; got {self.init_draws!r}")
        schemes = InitScheme.__args__
        need(self.init in schemes, f"init must be one of {', '.join(schemes)}; got {self.init!r}")
        need(self.output_init in (None, *schemes), f"output_init must be null or one of {', '.join(schemes)}")
        need(self.gain > 0, f"gain must be positive, got {self.gain}")
        for name in ("bias_scale", "output_scale", "output_bias_scale"):
            need(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.init == "torch" and self.bias_scale != 0:
            raise UsageError("--model.net.bias_scale has no effect with init 'torch' (PyTorch draws biases); drop it")
        if self.bn_style != "torch" and not (self.batchnorm or self.output_batchnorm):
            raise UsageError(f"--model.net.bn_style {self.bn_style} has no effect without batchnorm; drop it")
        if self.init_seed is not None and "torch" in (self.init, self.output_init):
            raise UsageError(
                "--model.net.init_seed draws the notebook's init; init 'torch' is PyTorch's own: use kaiming or normal"
            )
        if self.init_draws != "cell13" and self.init_seed is None:
            raise UsageError(f"--model.net.init_draws {self.init_draws} has no effect without init_seed; drop it")
        if self.init_seed is not None and self.init_draws == "cell13":
            # cell 13's Linear never draws a bias: a scaled one would be a draw the notebook does not make
            biases = {"bias_scale": not self.batchnorm, "output_bias_scale": not self.output_batchnorm}
            for name, has_bias in biases.items():
                if has_bias and getattr(self, name) != 0:
                    raise UsageError(
                        f"--model.net.{name}: the notebook's cell 13 draws no biases (zeros); "
                        "use --model.net.init_draws cell6 to draw them as cell 6 does"
                    )

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


class MLP(nn.Module):
    """Maps (B, block_size) character indices to (B, vocab_size) logits."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.n_embd)
        layers: list[nn.Module] = []
        fan_in = c.n_embd * c.block_size
        linear = LectureLinear if c.linear_style == "lecture" else nn.Linear
        for _ in range(c.n_layers):
            layers.append(linear(fan_in, c.n_hidden, bias=not c.batchnorm))
            if c.batchnorm:
                layers.append(_batchnorm(c, c.n_hidden))
            layers.append(nn.Tanh())
            fan_in = c.n_hidden
        layers.append(linear(fan_in, c.vocab_size, bias=not c.output_batchnorm))
        if c.output_batchnorm:
            layers.append(_batchnorm(c, c.vocab_size))
        self.layers = nn.Sequential(*layers)
        self.init_generator_state: torch.Tensor | None = None  # where init_seed's generator stopped (see data.py)
        self.reset_parameters()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embedding(idx).flatten(1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        generator = None if c.init_seed is None else torch.Generator().manual_seed(c.init_seed)
        nn.init.normal_(self.embedding.weight, generator=generator)  # N(0, 1): the lecture's C
        if c.init == "zeros":
            self.embedding.weight.zero_()
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for i, linear in enumerate(linears):
            is_output = i == len(linears) - 1
            own_scheme = is_output and c.output_init is not None
            _init_linear(
                linear,
                scheme=c.output_init if own_scheme else c.init,
                gain=1.0 if own_scheme else c.gain,
                bias_scale=c.output_bias_scale if is_output else c.bias_scale,
                generator=generator,
                cell13=c.init_draws == "cell13",
            )
        for m in self.layers:
            if isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()  # gamma 1, beta 0, fresh running statistics
        last = self.layers[-1]
        (last.weight if isinstance(last, nn.BatchNorm1d) else linears[-1].weight).mul_(c.output_scale)
        self.init_generator_state = None if generator is None else generator.get_state()


def _init_linear(
    linear: nn.Linear,
    scheme: str,
    gain: float,
    bias_scale: float,
    generator: torch.Generator | None,
    cell13: bool = False,
) -> None:
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
    if generator is None:
        nn.init.normal_(linear.weight)
        linear.weight.mul_(gain / math.sqrt(fan_in) if scheme == "kaiming" else gain)
    else:  # the notebook's W = randn((fan_in, fan_out), generator=g), scaled in its cell's rounding order
        w = torch.randn(linear.weight.shape[::-1], generator=generator)
        if cell13:  # Linear.__init__: randn / fan_in**0.5; then, after all layers are built, layer.weight *= gain
            w = (w / fan_in**0.5 if scheme == "kaiming" else w) * gain
        else:  # cell 6: randn * (5/3)/((n_embd * block_size)**0.5), left to right
            w = w * gain / fan_in**0.5 if scheme == "kaiming" else w * gain
        linear.weight.copy_(w.T)
    if linear.bias is not None and generator is not None and cell13:
        nn.init.zeros_(linear.bias)  # cell 13's Linear: self.bias = torch.zeros(fan_out), no draw
    elif linear.bias is not None:
        nn.init.normal_(linear.bias, generator=generator)  # drawn even when scaled by 0, as cell 6's b2
        linear.bias.mul_(bias_scale)


class LectureLinear(nn.Linear):
    """The notebook's Linear, op for op: x @ W, then + b (cell 13's class, cell 6's h @ W2 + b2), with nn.Linear's
    parameters ((fan_out, fan_in) weight: x @ weight.T). F.linear adds the bias inside the matrix product (addmm),
    which can round differently from the product then the sum: on this project's CPU (torch 2.13, one thread) the
    two agree for up to 129 inputs and differ in ~40% of the outputs for 200 (cell 6's W2) and 256."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def _batchnorm(c: MLPConfig, dim: int) -> nn.BatchNorm1d:
    if c.bn_style == "lecture":
        return LectureBatchNorm1d(dim, momentum=c.bn_momentum)
    if c.bn_style == "lecture_first":
        return LectureFirstBatchNorm1d(dim, momentum=c.bn_momentum)
    return nn.BatchNorm1d(dim, momentum=c.bn_momentum)


class LectureBatchNorm1d(nn.BatchNorm1d):
    """The notebook's hand-written BatchNorm1d (makemore_part3_bn.ipynb, cell 13), op for op: in training it
    normalises with the unbiased batch variance x.var(0), where nn.BatchNorm1d uses the biased one, and updates
    the running statistics with it, as nn.BatchNorm1d does. Same parameters and buffers, so checkpoints, the
    diagnostics and fold-batchnorm treat it as any BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
            with torch.no_grad():
                _ema(self.running_mean, mean, self.momentum)
                _ema(self.running_var, var, self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        return self.weight * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias


class LectureFirstBatchNorm1d(nn.BatchNorm1d):
    """The lecture's first BatchNorm, written inline in the notebook's cell 7, op for op: bngain * (x - mean) / std
    + bnbias with the unbiased batch std, no eps, and a running std (bnstd_running) beside the running mean. The
    running std is kept in its own buffer; running_var holds its square, so that code reading a BatchNorm1d's
    running variance (fold-batchnorm) gets the same normalisation."""

    def __init__(self, num_features: int, momentum: float = 0.001):
        super().__init__(num_features, eps=0.0, momentum=momentum)
        self.register_buffer("running_std", torch.ones(num_features))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "running_std"):  # (nn.BatchNorm1d.__init__ calls this before the buffer exists)
            self.running_std.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
            with torch.no_grad():
                _ema(self.running_mean, mean, self.momentum)
                _ema(self.running_std, std, self.momentum)
                torch.square(self.running_std, out=self.running_var)
                self.num_batches_tracked.add_(1)
        else:
            mean, std = self.running_mean, self.running_std
        return self.weight * (x - mean) / std + self.bias


def _ema(running: torch.Tensor, batch: torch.Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, rounded as the notebook's line is."""
    running.copy_((1 - momentum) * running + momentum * batch.squeeze(0))


@torch.no_grad()
def generate(
    net: MLP,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_length: int = 50,
    one_at_a_time: bool = False,
) -> list[str]:
    """Sample words one character at a time until the boundary token (BN in eval mode): all samples in parallel,
    or, one_at_a_time, one word after another as the lecture's notebook does (cell 20: with its generator,
    torch.Generator().manual_seed(2147483647 + 10), its names; one forward pass per character)."""
    if num_samples < 1:
        raise UsageError(f"the number of samples must be at least 1, got {num_samples}")
    if not temperature > 0:
        raise UsageError(f"temperature must be positive, got {temperature}; 1.0 samples the model as trained")
    was_training = net.training
    net.eval()
    try:
        draw = _words_one_at_a_time if one_at_a_time else _words_in_parallel
        words = draw(net, num_samples, temperature, generator, max_length)
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


def _words_one_at_a_time(net: MLP, num_samples: int, temperature: float, generator, max_length: int) -> list[list[int]]:
    device = net.embedding.weight.device
    words = []
    for _ in range(num_samples):
        context, word = [0] * net.config.block_size, []
        while len(word) < max_length:
            probs = F.softmax(net(torch.tensor([context], device=device)) / temperature, dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=generator).item()
            if ix == 0:
                break
            word.append(ix)
            context = context[1:] + [ix]
        words.append(word)
    return words
