"""Pure statistics of activations, gradients and parameters: tensors in, numbers out, no hooks and no logging.

Cheap by construction: layers of one shape are stacked, and parameters of one shape are views of one buffer, so
each statistic is one kernel per group, however deep the model, and each round of results is one
device-to-host copy. Under DDP the numbers describe the whole global batch: sums, minima and
maxima are all-reduced in packed tensors, and means and stds are derived from the reduced sums.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .snapshot import Histogram, LayerStats, ParamStats, Snapshot

# Activations whose output is bounded, mapped to [-1, 1] (t * scale + shift) before thresholding |t| > threshold.
# Unbounded ones (ReLU, GELU, ...) have no saturation, only dead units.
BOUNDED_ACTIVATIONS: dict[type, tuple[float, float]] = {
    nn.Tanh: (1.0, 0.0),
    nn.Hardtanh: (1.0, 0.0),
    nn.Softsign: (1.0, 0.0),
    nn.Sigmoid: (2.0, -1.0),
    nn.Hardsigmoid: (2.0, -1.0),
}
# classes in torch.nn.modules.activation that are not element-wise activations
NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)

ReduceFn = Callable[[torch.Tensor, str], torch.Tensor]  # (tensor, "sum" | "min" | "max") -> all-reduced tensor


def is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, NOT_ACTIVATIONS)


def bounds_of(module: nn.Module) -> tuple[float, float] | None:
    """(scale, shift) mapping the module's output range to [-1, 1], or None if it is unbounded."""
    if isinstance(module, nn.RNNBase):  # tanh cells (LSTM's and GRU's outputs stay in (-1, 1) too)
        return None if getattr(module, "nonlinearity", "tanh") == "relu" else (1.0, 0.0)
    return BOUNDED_ACTIVATIONS.get(type(module))


# --------------------------------------------------------------------------------------------- captured input


@dataclass
class CapturedLayer:
    name: str
    module: nn.Module | None  # None in the worker process, which gets kind and bounds instead
    output: torch.Tensor
    grad: torch.Tensor | None = None
    kind: str = ""  # the module's class name
    bounds: tuple[float, float] | None = None  # see bounds_of
    group: str = ""  # the part of the model it lies in (see select.groups): ratio verdicts stay within one

    def __post_init__(self):
        if self.module is not None:
            self.kind, self.bounds = type(self.module).__name__, bounds_of(self.module)


@dataclass
class CapturedParams:
    """Every parameter of an optimizer step, laid end to end in the rows of one (3, n) tensor."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    rows: torch.Tensor  # [0] the parameters before the step, [1] after - before, [2] the gradients at the step
    order: list[int] | None = None  # each parameter's position in the optimizer (rows are grouped by shape)


# ------------------------------------------------------------------------------------------- segment maths


_CACHE: dict[tuple, torch.Tensor] = {}  # index tensors, per layout: the same every sampled step


def _cached(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _row_histograms(x: torch.Tensor, lo: Sequence[float], hi: Sequence[float], bins: int) -> torch.Tensor:
    """(m, bins) counts of the m rows of x, row i binned over [lo[i], hi[i]] (values outside go to the end bins)."""
    lo_t = torch.tensor(lo, dtype=x.dtype, device=x.device)[:, None]
    width = (torch.tensor(hi, dtype=x.dtype, device=x.device)[:, None] - lo_t) / bins
    b = ((torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) - lo_t) / width).floor_().clamp_(0, bins - 1).long()
    b += torch.arange(x.shape[0], device=x.device)[:, None] * bins
    return torch.bincount(b.reshape(-1), minlength=x.shape[0] * bins).view(x.shape[0], bins)


class _Packer:
    """Device tensors to reduce by sum/min/max, reduced (optionally across processes) and copied to the host at once."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {"sum": [], "min": [], "max": []}
        self.used = {"sum": 0, "min": 0, "max": 0}

    def add(self, op: str, t: torch.Tensor) -> tuple[str, int, int]:
        t = t.detach().reshape(-1)
        t = t if t.dtype == torch.float64 else t.to(torch.float64)
        handle = (op, self.used[op], t.numel())
        self.parts[op].append(t)
        self.used[op] += t.numel()
        return handle

    def resolve(self, reduce: ReduceFn | None) -> Callable[[tuple[str, int, int]], list[float]]:
        self.host = {}
        for op, parts in self.parts.items():
            if parts:
                packed = torch.cat(parts)
                self.host[op] = (reduce(packed, op) if reduce is not None else packed).cpu().tolist()
        return lambda handle: self.host[handle[0]][handle[1] : handle[1] + handle[2]]

    def all_finite(self) -> bool:
        """Whether the resolved sums are all finite (minima and maxima are exact whatever they hold)."""
        return all(map(math.isfinite, self.host.get("sum", [])))


def _mean_std(n: float, s: float, ss: float, bad: float = 0.0) -> tuple[float, float]:
    if bad or n < 1:
        return math.nan, math.nan  # a NaN/Inf inside: the statistics are not defined
    mean = s / n
    var = (ss - n * mean * mean) / (n - 1) if n > 1 else 0.0  # unbiased, like torch.std
    return mean, (math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan)


def _safe_range(lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


# ------------------------------------------------------------------------------------------------- the parts


class _Layers:
    """Layer outputs and the gradients with respect to them: different on every DDP process, so reduced.

    Layers of the same shape and kind (the hidden layers of an MLP) are stacked into one (layers, examples, units)
    tensor, so each statistic is one kernel per group of layers, not one per layer.
    """

    def __init__(self, layers: list[CapturedLayer], threshold: float):
        self.layers, self.threshold = layers, threshold
        self.bounds = [x.bounds for x in layers]
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(layers):
            groups.setdefault((tuple(x.output.shape), self.bounds[i]), []).append(i)
        self.groups = list(groups.values())
        self.with_grad = [i for i, x in enumerate(layers) if x.grad is not None]
        self._stacks: dict[tuple, torch.Tensor] = {}  # made once, read by every round of statistics

    def _stack(self, idx: list[int], grads: bool = False) -> torch.Tensor:
        key = (tuple(idx), grads)
        if key not in self._stacks:
            ts = [(self.layers[i].grad if grads else self.layers[i].output).detach() for i in idx]
            units = ts[0].shape[-1] if ts[0].dim() > 1 else 1  # outputs come channels last (see the callback)
            self._stacks[key] = torch.stack(ts).reshape(len(ts), -1, units)  # (layers, examples, units)
        return self._stacks[key]

    def collect(self, p: _Packer, robust: bool = False) -> None:
        self.h = []
        for idx in self.groups:
            x = self._stack(idx)
            h = {"m": p.add("sum", _moments(x, robust)), "lo": p.add("min", x.amin(1)), "hi": p.add("max", x.amax(1))}
            bounds = self.bounds[idx[0]]
            if bounds is not None:
                sat = (x * bounds[0] + bounds[1]).abs() > self.threshold
                h["n"], h["all"] = p.add("sum", sat.sum((1, 2))), p.add("min", sat.all(1))  # all: every example
            self.h.append(h)
        self.hg = [(idx, p.add("sum", _moments(self._stack(idx, grads=True), robust))) for idx in self._grad_groups()]

    def stats(self, get) -> list[LayerStats]:
        out: list[LayerStats | None] = [None] * len(self.layers)
        for idx, h in zip(self.groups, self.h):
            m, lo, hi = get(h["m"]), get(h["lo"]), get(h["hi"])
            k, units = len(idx), len(lo) // len(idx)
            n_sat, every = (get(h["n"]), get(h["all"])) if "n" in h else (None, None)
            for j, i in enumerate(idx):
                x = self.layers[i]
                u = slice(j * units, (j + 1) * units)
                constant = [a == b for a, b in zip(lo[u], hi[u])]
                saturation = None
                if n_sat is not None:
                    saturation = n_sat[j] / (m[j] + m[3 * k + j])  # over every process's values (NaN included)
                    constant = [c or s >= 1.0 for c, s in zip(constant, every[u])]
                mean, std = _mean_std(*m[j::k])
                out[i] = LayerStats(x.name, x.kind, mean, std, saturation, sum(constant) / units, group=x.group)
                out[i].values_per_unit = self._stack(idx).shape[1]
        for idx, handle in self.hg:
            g, k = get(handle), len(idx)
            for j, i in enumerate(idx):
                out[i].grad_mean, out[i].grad_std = _mean_std(*g[j::k])
        return out

    def _grad_groups(self) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for i in self.with_grad:
            groups.setdefault(tuple(self.layers[i].grad.shape), []).append(i)
        return list(groups.values())

    def collect_ranges(self, p: _Packer) -> None:
        self.h_ext = []
        for idx in self.groups:
            x = self._stack(idx).reshape(len(idx), -1)
            self.h_ext.append((idx, p.add("min", x.amin(1)), p.add("max", x.amax(1)), False))
        for idx in self._grad_groups():
            x = self._stack(idx, grads=True).reshape(len(idx), -1)
            self.h_ext.append((idx, p.add("min", x.amin(1)), p.add("max", x.amax(1)), True))

    def collect_histograms(self, p: _Packer, get, bins: int) -> None:
        self.h_hist = []
        for idx, lo_h, hi_h, grads in self.h_ext:
            bounds = None if grads else self.bounds[idx[0]]
            if bounds is not None:  # a bounded activation: its fixed range, so every step bins alike
                ranges = [(-1.0, 1.0) if bounds == (1.0, 0.0) else (0.0, 1.0)] * len(idx)
            else:
                ranges = [_safe_range(a, z) for a, z in zip(get(lo_h), get(hi_h))]
            x = self._stack(idx, grads=grads).reshape(len(idx), -1)
            self.h_hist.append((idx, ranges, grads, p.add("sum", _row_histograms(x, *zip(*ranges), bins))))

    def fill_histograms(self, stats: list[LayerStats], get, bins: int) -> None:
        for idx, ranges, grads, handle in self.h_hist:
            counts = get(handle)
            for j, i in enumerate(idx):
                hist = Histogram(_edges(*ranges[j], bins), counts[j * bins : (j + 1) * bins])
                if grads:
                    stats[i].grad_hist = hist
                else:
                    stats[i].hist = hist


def _moments(x: torch.Tensor, robust: bool) -> torch.Tensor:
    """(4, L) moments of each slice x[l], as float64 sums that add up across DDP processes: count n, sum n*m and
    sum of squares n*m^2 + M2 (M2 = sum (x - m)^2 about the slice's own mean m), and the NaN/Inf count.

    M2 is taken about the mean (two passes, corrected), not as sum x^2 - n*m^2 from one: where the mean dwarfs
    the std (a Sigmoid behind a saturated layer, a nearly constant gradient) the one-pass float32 form loses digits
    (a std off by 1e-4 relative, varying with the CPU's summation order). n*m and n*m^2 are made from the same
    float64 m, so that _mean_std's ss - n*mean^2 gives back M2 in float64."""
    flat = x.reshape(x.shape[0], -1)
    n = torch.full((flat.shape[0],), float(flat.shape[1]), dtype=torch.float64, device=x.device)
    if robust:  # float64: finite values above ~1e18 overflow float32 sums of squares (they are not NaN/Inf)
        finite = torch.isfinite(flat)
        bad = (~finite).sum(1).to(torch.float64)
        flat = torch.where(finite, flat, 0.0).to(torch.float64)
        n = n - bad
        mean = flat.sum(1) / n.clamp(min=1)
        centred = torch.where(finite, flat - mean[:, None], 0.0)
    else:
        bad = torch.zeros_like(n)
        # float32 passes (vectorised: 9x faster than accumulating in float64), their results kept as float64
        mean = flat.mean(1, keepdim=True)
        centred = flat - mean
        mean = mean.squeeze(1).to(torch.float64)
    # float64 sums of the float32 squares: vector_norm accumulates in float32 on a CPU, 1e-3 of a std off over
    # 4M values (a CNN's activations), where these stay within 1e-8
    m2 = centred.square().sum(1, dtype=torch.float64)
    # the corrected two-pass form: the centred values still sum to n x (the mean's own rounding error), which is
    # not small against a std of a few float32 ulps (a Sigmoid at 0.999994 +- 2e-6); moved into the mean, and out
    # of M2 (sum (c - r/n)^2 = sum c^2 - r^2/n)
    residual = centred.sum(1, dtype=torch.float64)
    mean, m2 = mean + residual / n.clamp(min=1), m2 - residual * residual / n.clamp(min=1)
    total = n * mean
    return torch.stack([n, total, m2 + total * mean, bad])


CONSTANT_REL_STD = 1e-6  # a parameter whose std is below this fraction of its mean is constant (float32 eps ~1.2e-7)


class _Params:
    """Parameters, their gradients and updates: identical on every DDP process (DDP averages gradients before the
    step), so not reduced. Their mean and std come from one var_mean per run of same-shaped parameters, reading
    the (3, n) rows in place (a NaN stays inside its own parameter: each is reduced on its own)."""

    def __init__(self, params: CapturedParams):
        self.p, self.rows = params, params.rows
        self.runs, start = [], 0  # (rows, count, size) views of consecutive parameters of one shape
        for shape, group in itertools.groupby(params.shapes):
            count, size = len(list(group)), math.prod(shape)
            self.runs.append(self.rows[:, start : start + count * size].reshape(self.rows.shape[0], count, size))
            start += count * size

    def collect(self, p: _Packer, robust: bool = False) -> None:
        if robust:  # again after a NaN/Inf or an overflow: float64, so finite values above ~1e18 stay finite
            means = [v.to(torch.float64).mean(2) for v in self.runs]
            variances = [
                v.to(torch.float64).var(2) if v.shape[2] > 1 else torch.zeros_like(m) for v, m in zip(self.runs, means)
            ]
            self.h = {"var": p.add("sum", torch.cat(variances, 1)), "mean": p.add("sum", torch.cat(means, 1))}
            return
        runs = self.runs
        # two passes: the float32 mean, then the centred values' squares summed in float64 (accurate for a gamma
        # near 1 with a tiny spread, where sum-of-squares minus mean squared cancels)
        work = _cached(
            ("centred", tuple(self.rows.shape), self.rows.dtype, str(self.rows.device)),
            lambda: torch.empty_like(self.rows),
        )
        means, variances, start = [], [], 0
        for v in runs:
            mean = v.mean(2, keepdim=True)
            centred = torch.sub(v, mean, out=work[:, start : start + v[0].numel()].view_as(v))
            start += v[0].numel()
            means.append(mean.squeeze(2))
            variances.append(centred.square().sum(2, dtype=torch.float64) / max(v.shape[2] - 1, 1))  # as _moments
        self.h = {"var": p.add("sum", torch.cat(variances, 1)), "mean": p.add("sum", torch.cat(means, 1))}

    def stats(self, get) -> list[ParamStats]:
        k = len(self.p.names)
        var, mean = get(self.h["var"]), get(self.h["mean"])
        std = [math.sqrt(v) if v >= 0 else math.nan for v in var]  # NaN stays NaN
        out = []
        for i, name in enumerate(self.p.names):
            data_std, delta_std, grad_std = std[i], std[k + i], std[2 * k + i]
            grad_mean = mean[2 * k + i]
            # constant up to float32 rounding (a fresh BatchNorm beta, gamma, or gamma x 0.1, whose float32 mean is
            # not exactly 0.1: a std of ~1e-8): the ratios are undefined, not 1e5
            constant = data_std <= CONSTANT_REL_STD * abs(mean[i])
            ratio = grad_std / data_std if data_std > 0 and not constant else None
            if not (math.isfinite(data_std) and math.isfinite(delta_std)):
                update = math.nan
            elif constant:
                update = None  # undefined while a parameter is constant
            else:
                update = math.log10(delta_std / data_std) if delta_std > 0 else -math.inf
            out.append(ParamStats(name, self.p.shapes[i], data_std, grad_mean, grad_std, ratio, update))
        return out if self.p.order is None else [out[i] for i in sorted(range(k), key=self.p.order.__getitem__)]

    def collect_ranges(self, p: _Packer) -> None:
        grads = [v[2] for v in self.runs]  # (count, size) gradient views
        self.h["lo"] = p.add("min", torch.cat([g.amin(1) for g in grads]))
        self.h["hi"] = p.add("max", torch.cat([g.amax(1) for g in grads]))

    def collect_histograms(self, p: _Packer, get, bins: int) -> None:
        self.ranges = [_safe_range(a, z) for a, z in zip(get(self.h["lo"]), get(self.h["hi"]))]
        counts, start = [], 0
        for v in self.runs:
            count = v.shape[1]
            counts.append(_row_histograms(v[2], *zip(*self.ranges[start : start + count]), bins))
            start += count
        self.h["gh"] = p.add("sum", torch.cat(counts))

    def fill_histograms(self, stats: list[ParamStats], get, bins: int) -> None:
        """stats are in the optimizer's order (see stats()), the histograms in the rows' order (grouped by shape):
        row i is the parameter at optimizer position order[i]."""
        counts = get(self.h["gh"])
        for i in range(len(self.p.names)):
            s = stats[i if self.p.order is None else self.p.order[i]]
            if len(s.shape) >= 2:
                s.grad_hist = Histogram(_edges(*self.ranges[i], bins), counts[i * bins : (i + 1) * bins])


def summarize(
    step: int,
    loss: torch.Tensor | None,
    layers: list[CapturedLayer],
    params: CapturedParams | None,
    saturation_threshold: float = 0.97,
    bins: int = 60,
    histograms: bool = True,
    reduce: ReduceFn | None = None,
) -> Snapshot:
    """One sampled step's captured tensors as numbers. reduce all-reduces across processes (DDP), or is None."""
    lay = _Layers(layers, saturation_threshold) if layers else None
    par = _Params(params) if params is not None else None

    def first_round(robust: bool):
        shared, local = _Packer(), _Packer()  # reduced across processes / the same on every process
        loss_h = None
        if loss is not None:
            one = torch.ones((), dtype=torch.float64, device=loss.device)
            loss_h = shared.add("sum", torch.stack([loss.detach().to(torch.float64).reshape(()), one]))
        for part, packer in ((lay, shared), (par, local)):
            if part is not None:
                part.collect(packer, robust=robust)
        get, get_local = shared.resolve(reduce), local.resolve(None)
        return loss_h, get, get_local, shared.all_finite() and local.all_finite()

    loss_h, get, get_local, finite = first_round(robust=False)
    if not finite:  # a NaN/Inf somewhere: again, with sums that skip and count them
        loss_h, get, get_local, _ = first_round(robust=True)
    snapshot = Snapshot(step=step, loss=None)
    if loss_h is not None:
        total, count = get(loss_h)
        snapshot.loss = total / count
    snapshot.layers = lay.stats(get) if lay else []
    snapshot.params = par.stats(get_local) if par else []
    if histograms:  # two more rounds: the (global) ranges, then the histograms over them
        rounds = [(_Packer(), _Packer()), (_Packer(), _Packer())]
        for part, which in ((lay, 0), (par, 1)):
            if part is not None:
                part.collect_ranges(rounds[0][which])
        ranges = (rounds[0][0].resolve(reduce), rounds[0][1].resolve(None))
        for part, which in ((lay, 0), (par, 1)):
            if part is not None:
                part.collect_histograms(rounds[1][which], ranges[which], bins)
        counts = (rounds[1][0].resolve(reduce), rounds[1][1].resolve(None))
        if lay:
            lay.fill_histograms(snapshot.layers, counts[0], bins)
        if par:
            par.fill_histograms(snapshot.params, counts[1], bins)
    return snapshot


# ------------------------------------------------------------------------------------------------ non-finite


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
