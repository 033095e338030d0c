"""The lecture's four diagnostic figures, drawn from a Snapshot (histograms already computed on the device).

Uses matplotlib's object API (Figure + Agg canvas), never pyplot, so no global state and no display is needed.
Drawing takes ~100 ms a figure, all of it holding the GIL, so during training the figures are drawn in the
diagnostics' worker process (worker.py).
"""

from __future__ import annotations

import io
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .snapshot import Histogram, Snapshot

SIZE = (10, 3.2)  # inches, as wide and flat as the lecture's plots
DPI = 80


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _density(h: Histogram) -> list[float]:
    total = sum(h.counts) or 1.0
    width = (h.edges[-1] - h.edges[0]) / max(len(h.counts), 1) or 1.0
    return [c / total / width for c in h.counts]


def _distributions(title: str, curves: list[tuple[Histogram, str]]) -> Figure:
    """One density curve per (histogram, legend label), as the lecture's distribution plots."""
    fig, ax = _figure()
    for hist, label in curves:
        ax.plot(hist.centers, _density(hist), label=label)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def activations(s: Snapshot) -> Figure:
    """Figure 1: distribution of each watched layer's output, with mean, std and saturation in the legend."""
    curves = []
    for x in s.layers:
        sat = "" if x.saturation is None else f", saturated {100 * x.saturation:.2f}%"
        curves.append((x.hist, f"{x.name} ({x.kind}): mean {x.mean:+.2f}, std {x.std:.2f}{sat}"))
    return _distributions(f"activation distribution (step {s.step})", curves)


def gradients(s: Snapshot) -> Figure:
    """Figure 2: distribution of the gradient of the loss with respect to each watched layer's output."""
    curves = [
        (x.grad_hist, f"{x.name} ({x.kind}): mean {x.grad_mean:+.2e}, std {x.grad_std:.2e}")
        for x in s.layers
        if x.grad_hist is not None
    ]
    return _distributions(f"gradient distribution (step {s.step})", curves)


def weight_gradients(s: Snapshot) -> Figure:
    """Figure 3: distribution of each weight's gradient, with the grad:data ratio in the legend."""
    curves = []
    for p in s.weights:
        if p.grad_hist is not None:
            shape = "x".join(map(str, p.shape))
            ratio = "n/a" if p.grad_data_ratio is None else f"{p.grad_data_ratio:.2e}"
            label = f"{p.name} {shape}: mean {p.grad_mean:+.2e}, std {p.grad_std:.2e}, grad:data {ratio}"
            curves.append((p.grad_hist, label))
    return _distributions(f"weight gradient distribution (step {s.step})", curves)


def update_ratios(history: dict[str, list[tuple[int, float]]], step: int) -> Figure:
    """Figure 4: log10(update:data) of each weight over time, against the lecture's 1e-3 line."""
    fig, ax = _figure()
    for name, points in history.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.axhline(-3, color="k", linestyle="--", linewidth=1, label="1e-3")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(update:data)")
    ax.set_title(f"update:data ratio over time (to step {step})")
    ax.legend(fontsize=7)
    return fig


def render_all(s: Snapshot, history: dict[str, list[tuple[int, float]]]) -> dict[str, Figure]:
    return {
        "figures/1_activations": activations(s),
        "figures/2_gradients": gradients(s),
        "figures/3_weight_gradients": weight_gradients(s),
        "figures/4_update_ratios": update_ratios(history, s.step),
    }


def render_pngs(s: Snapshot, history: dict[str, list[tuple[int, float]]]) -> dict[str, tuple[bytes, int, int]]:
    """Every figure of render_all as (PNG bytes, height, width)."""
    return {tag: png(fig) for tag, fig in render_all(s, history).items()}


def png(fig: Figure) -> tuple[bytes, int, int]:
    """The figure as PNG bytes, with its height and width in pixels."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    width, height = fig.canvas.get_width_height()
    return buffer.getvalue(), height, width


def write(pngs: dict[str, tuple[bytes, int, int]], step: int, destination: tuple, writers: dict) -> list[str]:
    """Write the figures of a step to destination: ("tensorboard", run directory), as one event of an event file
    of their own there (writers keeps it open per directory), or ("png", directory), as files named after the
    step and figure. Returns what was written."""
    kind, directory = destination
    if kind == "png":
        os.makedirs(directory, exist_ok=True)
        paths = []
        for tag, (data, _, _) in pngs.items():
            path = os.path.join(directory, f"step{step:07d}_{tag.split('/')[-1]}.png")
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)  # a reader never sees half a file
            paths.append(path)
        return paths
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from .tbwrite import png_event

    if directory not in writers:
        writers[directory] = EventFileWriter(directory, filename_suffix=".figures")
    writers[directory].add_event(png_event(pngs, step))
    writers[directory].flush()
    return [f"{directory} ({', '.join(pngs)})"]
