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

# TensorBoard's Images tab shows an image at its card's width (~345 px) unless "Show actual image size" is
# ticked: so a figure is drawn that wide (no downscaling), with 9-10 px text, and its legend below the plot, one
# line per curve, the figure growing taller with the number of curves.
WIDTH, PLOT_HEIGHT, LINE = 4.8, 2.6, 0.17  # inches: the figure's width, the plot's height, a legend line
DPI = 72
FONT = 9


def _figure(curves: int) -> tuple[Figure, object]:
    fig = Figure(figsize=(WIDTH, PLOT_HEIGHT + LINE * (curves + 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.tick_params(labelsize=FONT)
    return fig, ax


def _legend(fig: Figure, ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower left", fontsize=FONT, frameon=False, handlelength=1.2, borderaxespad=0)


def _density(h: Histogram) -> list[float]:
    total = sum(h.counts) or 1.0
    width = (h.edges[-1] - h.edges[0]) / max(len(h.counts), 1) or 1.0
    return [c / total / width for c in h.counts]


def _distributions(title: str, curves: list[tuple[Histogram, str]]) -> Figure:
    """One density curve per (histogram, legend label), as the lecture's distribution plots."""
    fig, ax = _figure(len(curves))
    for hist, label in curves:
        ax.plot(hist.centers, _density(hist), label=label)
    ax.set_title(title, fontsize=FONT + 1)
    _legend(fig, ax)
    return fig


def activations(s: Snapshot) -> Figure:
    """Figure 1: distribution of each watched layer's output, with mean, std and saturation in the legend."""
    curves = []
    for x in s.layers:
        sat = "" if x.saturation is None else f", sat {100 * x.saturation:.1f}%"
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
            ratio = "n/a" if p.grad_data_ratio is None else f"{p.grad_data_ratio:.1e}"
            label = f"{p.name} {shape}: std {p.grad_std:.1e}, grad:data {ratio}"
            curves.append((p.grad_hist, label))
    return _distributions(f"weight gradient distribution (step {s.step})", curves)


def update_ratios(history: dict[str, list[tuple[int, float]]], step: int) -> Figure:
    """Figure 4: log10(update:data) of each weight over time, against the lecture's 1e-3 line."""
    drawn = {name: points for name, points in history.items() if points}
    fig, ax = _figure(len(drawn) + 1)
    for name, points in drawn.items():  # markers: at step 0 each line is a single point
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, marker="o", markersize=2.5)
    ax.axhline(-3, color="k", linestyle="--", linewidth=1, label="1e-3 (the lecture's guide)")
    ax.set_xlabel("step", fontsize=FONT)
    ax.set_ylabel("log10(update:data)", fontsize=FONT)
    ax.set_title(f"update:data ratio over time (to step {step})", fontsize=FONT + 1)
    _legend(fig, ax)
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
