"""The lecture notebook's own parameter update, for the notebook-exact configs, which select it by class path:

    optimizer:
      class_path: mm_lightning.lecture.NotebookSGD
      init_args: {lr: 0.1}

makemore_part3_bn.ipynb updates with `p.data += -lr * p.grad`: `-lr * p.grad` is rounded to float32 first, then
the sum is rounded again. torch.optim.SGD does `p.add_(p.grad, alpha=-lr)`, a fused multiply-add rounded once. The
two agree to float32 rounding at each step, but after a thousand steps most parameters differ in their last bits,
enough to move the 7th digit of the notebook's printed statistics. This optimizer does the notebook's two
roundings, so that a run's parameters equal the notebook's code's bit for bit on the same machine.

The learning rate is the param group's `lr`, which the config's MultiStepLR sets to `lr` before the first milestone
and `lr * gamma` from it: the notebook's `lr = 0.1 if i < 150000 else 0.01` with lr 0.1, milestones [150000],
gamma 0.1. (In Python 0.1 * 0.1 is 0.010000000000000002, not 0.01, but the multiply rounds its Python scalar to
float32, where the two are the same number: tests/test_notebook_exact.py checks both.)
"""

from __future__ import annotations

import torch


class NotebookSGD(torch.optim.SGD):
    """Plain SGD (no momentum, no weight decay) as the lecture's loop writes it: p.data += -lr * p.grad. A subclass
    of torch's SGD, which it is but for the rounding: what asks for SGD (the diagnostics' update-ratio band, by the
    class's bases) gets it."""

    def __init__(self, params, lr: float):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, lr=lr)  # momentum, dampening, weight decay 0: step() below uses none of them

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is not None:  # a parameter without a gradient is left as it is, as torch's SGD does
                    p.data += -lr * p.grad  # the notebook's line: two roundings (see the module docstring)
        return loss
