"""What one sampled step's diagnostics say, as plain numbers (no torch: the figure worker reads these too)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Histogram:
    edges: list[float]  # bins + 1 edges
    counts: list[float]

    @property
    def centers(self) -> list[float]:
        return [(a + b) / 2 for a, b in zip(self.edges[:-1], self.edges[1:])]


@dataclass
class LayerStats:
    """One watched layer's output (forward) and the gradient of the loss with respect to it (backward)."""

    name: str
    kind: str
    mean: float
    std: float
    saturation: float | None  # fraction of values with |t| > threshold; None for unbounded activations
    dead: float  # fraction of units (channels of N-D outputs) saturated or constant over the whole batch
    grad_mean: float | None = None
    grad_std: float | None = None
    hist: Histogram | None = None
    grad_hist: Histogram | None = None
    group: str = ""  # the part of the model it lies in: std-ratio verdicts compare layers of one group and kind
    values_per_unit: int | None = None  # values each unit was seen in (batch x positions): the evidence of "dead"


@dataclass
class ParamStats:
    """One parameter's gradient, and its real change across the optimizer step."""

    name: str
    shape: tuple[int, ...]
    data_std: float
    grad_mean: float | None
    grad_std: float | None
    grad_data_ratio: float | None  # std(grad) / std(data)
    log10_update_ratio: float | None  # log10(std(after - before) / std(before)); None while std(before) == 0
    grad_hist: Histogram | None = None


@dataclass
class Snapshot:
    step: int
    loss: float | None
    layers: list[LayerStats] = field(default_factory=list)
    params: list[ParamStats] = field(default_factory=list)
    end_step: int | None = None  # set on the figures drawn at a run's end: the step it ended at

    @property
    def weights(self) -> list[ParamStats]:
        """Parameters with two or more dimensions: the ones the lecture plots."""
        return [p for p in self.params if len(p.shape) >= 2]

    @property
    def has_histograms(self) -> bool:
        return any(x.hist is not None for x in self.layers) or any(p.grad_hist is not None for p in self.params)
