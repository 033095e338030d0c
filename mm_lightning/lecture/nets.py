"""The notebook's own network pieces, op for op, for the notebook-exact configs (docs/notebook-exact.md).

A config selects them by class path (configs/lecture/notebook_*.yaml):

    model:
      net:
        class_path: mm_lightning.lecture.NotebookMLPConfig
        init_args: {bn_style: lecture, linear_style: lecture, init_seed: 2147483647, ...}

NotebookMLPConfig is the core MLPConfig plus four fields; it builds a NotebookMLP, the core MLP with the notebook's
BatchNorm and Linear classes and its init drawn from one seeded generator in the notebook's order. Its checkpoints
hold plain values, as every checkpoint (mm_lightning/runs.py tells the two configs apart by their fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from mm_lightning.errors import UsageError
from mm_lightning.model import MLP, MLPConfig

BatchNormStyle = Literal["torch", "lecture", "lecture_first"]
LinearStyle = Literal["torch", "lecture"]
InitDraws = Literal["cell13", "cell6"]  # which of the notebook's init cells init_seed's draws follow
NOTEBOOK_FIELDS = ("bn_style", "linear_style", "init_seed", "init_draws")


@dataclass(frozen=True)
class NotebookMLPConfig(MLPConfig):
    """The core MLPConfig with the notebook's own BatchNorm, Linear and init generator to choose from."""

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

    def __post_init__(self):
        super().__post_init__()

        def need(ok: bool, what: str):
            if not ok:
                raise UsageError(f"--model.net.{what}")

        styles = BatchNormStyle.__args__
        need(self.bn_style in styles, f"bn_style must be one of {', '.join(styles)}; got {self.bn_style!r}")
        kinds = LinearStyle.__args__
        need(self.linear_style in kinds, f"linear_style must be one of {', '.join(kinds)}; got {self.linear_style!r}")
        need(self.init_seed is None or 0 <= self.init_seed < 2**63, f"init_seed must be in [0, 2^63): {self.init_seed}")
        draws = InitDraws.__args__
        need(self.init_draws in draws, f"init_draws must be one of {', '.join(draws)}; got {self.init_draws!r}")
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

    def build(self) -> NotebookMLP:
        return NotebookMLP(self)


class NotebookMLP(MLP):
    """The core MLP with the notebook's layer classes and, with init_seed, its one generator: init_generator_state is
    where the init left it, for the notebook's minibatches (NotebookNamesDataModule) to continue from."""

    config: NotebookMLPConfig

    def make_linear(self, fan_in: int, fan_out: int, bias: bool) -> nn.Linear:
        linear = LectureLinear if self.config.linear_style == "lecture" else nn.Linear
        return linear(fan_in, fan_out, bias=bias)

    def make_batchnorm(self, dim: int) -> nn.BatchNorm1d:
        style, momentum = self.config.bn_style, self.config.bn_momentum
        if style == "lecture":
            return LectureBatchNorm1d(dim, momentum=momentum)
        if style == "lecture_first":
            return LectureFirstBatchNorm1d(dim, momentum=momentum)
        return nn.BatchNorm1d(dim, momentum=momentum)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """With init_seed, the core's init with every draw from one generator, in the notebook's order; without,
        the core's own (torch's global generator)."""
        seed = self.config.init_seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        super().reset_parameters()
        self.init_generator_state = None if self._generator is None else self._generator.get_state()

    def init_embedding(self, weight: torch.Tensor) -> None:
        if self._generator is None:
            return super().init_embedding(weight)
        nn.init.normal_(weight, generator=self._generator)  # C = torch.randn(..., generator=g)

    def init_linear(self, linear: nn.Linear, scheme: str, gain: float, bias_scale: float) -> None:
        if self._generator is None:
            return super().init_linear(linear, scheme, gain, bias_scale)
        cell13 = self.config.init_draws == "cell13"
        _init_linear_from(linear, scheme, gain, bias_scale, generator=self._generator, cell13=cell13)


def _init_linear_from(
    linear: nn.Linear, scheme: str, gain: float, bias_scale: float, generator: torch.Generator, cell13: bool
) -> None:
    """The notebook's W = randn((fan_in, fan_out), generator=g), scaled in its cell's rounding order."""
    fan_in = linear.weight.shape[1]
    if scheme == "zeros":
        nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        return
    w = torch.randn(linear.weight.shape[::-1], generator=generator)
    if cell13:  # Linear.__init__: randn / fan_in**0.5; then, after all layers are built, layer.weight *= gain
        w = (w / fan_in**0.5 if scheme == "kaiming" else w) * gain
    else:  # cell 6: randn * (5/3)/((n_embd * block_size)**0.5), left to right
        w = w * gain / fan_in**0.5 if scheme == "kaiming" else w * gain
    linear.weight.copy_(w.T)
    if linear.bias is not None and cell13:
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


