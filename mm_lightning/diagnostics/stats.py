"""Pure statistics of activations, gradients and parameters: tensors in, tensors out, no logging."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, *inputs) -> str | None:
    """Run the model once (its buffers left as they were) and name the first leaf module, in call order, whose
    output holds NaN or Inf."""
    found: list[str] = []
    handles = []

    def watch(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                found.append(f"{name} ({type(module).__name__})")

        return hook

    for name, module in model.named_modules():
        if name and not list(module.children()):  # leaf modules: where values are actually computed
            handles.append(module.register_forward_hook(watch(name, module)))
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm would update its running stats
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return found[0] if found else None
