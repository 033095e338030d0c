"""Which layers to watch, and what each one's output means (bounded? channels where? comparable with which?).

The default, chosen when fit starts (after `configure_model`, where large models build their layers):
1. every torch.nn activation module (Tanh, ReLU, GELU, ...): what the lecture watches, where the nonlinearity is;
2. every recurrent layer (RNN, LSTM, GRU): its output sequence (the first element of the tuple it returns);
3. if the model has no activation module (it calls F.relu, F.gelu: nn.Transformer does), the outputs of its
   repeated blocks instead (the elements of a ModuleList or Sequential that are themselves made of modules: a
   TransformerEncoderLayer, a ResNet block), and failing those, of every Linear and Conv layer.
Why: activations are where saturation and dead units happen; a block's output is the residual stream whose
scale the lecture's "activations shrink or grow layer by layer" is about; a Linear's output is the
pre-activation, the last resort that still shows scale and vanishing gradients.
"""

from __future__ import annotations

import fnmatch

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from .stats import bounds_of, is_activation

# modules whose 3-D output is (batch, channels, length), as their 4-D and 5-D outputs are (batch, channels, ...)
CHANNELS_FIRST = (_ConvNd, _BatchNorm, _MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, nn.GroupNorm)


class Watched:
    """A watched module: its path, and how to read its output."""

    def __init__(self, name: str, module: nn.Module, group: str, after_channels_first: bool = False):
        self.name, self.module, self.group = name, module, group
        self.kind = type(module).__name__
        self.bounds = bounds_of(module)
        # an element-wise activation keeps its input's layout: after a Conv1d, its 3-D output is (batch, channels, L)
        self.channels_first_3d = isinstance(module, CHANNELS_FIRST) or after_channels_first

    def channel_dim(self, ndim: int) -> int:
        """Where a unit's values lie in an output of ndim dimensions: dim 1 for (batch, channels, ...) outputs of 4
        or more dimensions and for conv-like modules' 3-D ones, the last dim for (batch, features) and (batch,
        time, features)."""
        return 1 if ndim >= 4 or (ndim == 3 and self.channels_first_3d) else ndim - 1


def _blocks(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Elements of a ModuleList/Sequential that are made of modules, outermost only (a block's own sub-blocks,
    if any, are its business)."""
    elements = {
        id(child) for _, m in modules if isinstance(m, (nn.ModuleList, nn.Sequential)) for child in m.children()
    }
    found = [(n, m) for n, m in modules if id(m) in elements and any(True for _ in m.children())]
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]


def default_layers(root: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """The default's choice and, in words, which rule chose it."""
    modules = [(n, m) for n, m in root.named_modules() if n]
    recurrent = [(n, m) for n, m in modules if isinstance(m, nn.RNNBase)]
    also = " and its recurrent layers" if recurrent else ""
    if any(is_activation(m) for _, m in modules):
        return [
            (n, m) for n, m in modules if is_activation(m) or isinstance(m, nn.RNNBase)
        ], f"activation modules{also}"
    fallback, rule = _blocks(modules), "the outputs of its repeated blocks"
    if not fallback:
        fallback = [(n, m) for n, m in modules if isinstance(m, (nn.Linear, _ConvNd))]
        rule = "the outputs of its Linear/Conv layers, before their activation"
    keep = {n for n, _ in recurrent} | {n for n, _ in fallback}
    return [(n, m) for n, m in modules if n in keep], f"{rule}{also}: it has no activation module"


def after_channels_first(root: nn.Module, name: str) -> bool:
    """Whether the sibling just before module `name` in its parent (skipping activations and dropouts) is
    conv-like: an activation module after a Conv1d or BatchNorm1d of a conv stack gets (batch, channels, L)."""
    parent_name, _, own = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    before = None
    for child_name, child in parent.named_children():
        if child_name == own:
            break
        if not (is_activation(child) or isinstance(child, nn.modules.dropout._DropoutNd)):
            before = child
    return isinstance(before, CHANNELS_FIRST)


def untrained_parts(root: nn.Module, trained: set[int]) -> list[str]:
    """The outermost modules that hold parameters none of which trains (requires_grad=False, or in no optimizer):
    an EMA or teacher copy kept on the module, a frozen backbone. `trained`: ids of the optimizers' parameters
    that require a gradient. Their activations change only with their input: not watched by default."""
    found: list[str] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        params = list(module.parameters())
        if params and not any(id(p) in trained and p.requires_grad for p in params):
            found.append(name)
    return found


def normalised_groups(root: nn.Module, group_of: dict[str, str]) -> set[str]:
    """The parts of the model (values of select.groups) holding a normalisation layer (a class named *Norm*:
    torch's BatchNorm/LayerNorm/GroupNorm/RMSNorm and a project's own LayerNorm or RMSNorm alike)."""
    norms = [n for n, m in root.named_modules() if n and "norm" in type(m).__name__.lower()]
    out = set()
    for group in set(group_of.values()):
        if any(not group or n == group or n.startswith(group + ".") for n in norms):
            out.add(group)
    return out


def chosen_layers(root: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in root.named_modules()
        if n and any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(type(m).__name__, p) for p in patterns)
    ]


def groups(root: nn.Module, names: list[str]) -> dict[str, str]:
    """Each watched layer's part of the model: the child it lies in, at the first level below the root (skipping
    wrappers with a single child, as `self.net = ...`) where the model splits; layers that are themselves children
    at that level (a flat model, a Sequential's elements) belong to the level's container. Ratio verdicts compare
    layers of one part only (a GAN's generator is not compared with its discriminator)."""
    prefix, module = "", root
    while True:
        children = list(module.named_children())
        if len(children) != 1:
            break
        prefix, module = f"{prefix}{children[0][0]}.", children[0][1]
    out = {}
    for name in names:
        rest = name[len(prefix) :] if name.startswith(prefix) else name
        out[name] = prefix + rest.split(".")[0] if "." in rest else prefix.rstrip(".")
    return out


def describe(watched: list[Watched], limit: int = 6) -> str:
    """'a (Tanh), b (Tanh), ... (12 layers)' for the line printed at train start."""
    shown = [f"{w.name} ({w.kind})" for w in watched]
    if len(shown) > limit:
        shown = [*shown[: limit // 2], "...", *shown[-(limit // 2) :]]
    return f"{', '.join(shown)} ({len(watched)} layer{'s' * (len(watched) != 1)})"
