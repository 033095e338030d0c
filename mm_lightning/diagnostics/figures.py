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
# ticked: a figure is laid out for that width (9-10 pt text, its legend below the plot, one line per curve, the
# figure growing taller with the number of curves) and rendered at twice the pixels, so the card shows it as
# before while an exported PNG (691 px wide) or "actual size" has legible text.
WIDTH, PLOT_HEIGHT, LINE = 4.8, 2.6, 0.17  # inches: the figure's width, the plot's height, a legend line
DPI = 144
FONT = 9
TICKS = 5  # at most this many ticks an axis: labels such as 175,000 never overlap at this width
FEW = 10  # figure 4 with fewer samples a weight draws points, not lines: two points make no trend
COLORS = [f"C{i}" for i in range(10)]  # matplotlib's 10-colour cycle; past 10 curves the line style changes too
STYLES = ["-", "--", ":", "-."]


def _style(i: int) -> dict:
    """The i-th curve's colour and line style: no two of up to 40 curves alike."""
    return {"color": COLORS[i % 10], "linestyle": STYLES[(i // 10) % len(STYLES)]}


def _steps(x: float, _pos=None) -> str:
    """A step count short: 950, 12.5k, 200k, 1.2M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def _figure(curves: int) -> tuple[Figure, object]:
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(WIDTH, PLOT_HEIGHT + LINE * (curves + 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.tick_params(labelsize=FONT)
    ax.xaxis.set_major_locator(MaxNLocator(TICKS))
    ax.yaxis.set_major_locator(MaxNLocator(TICKS))
    return fig, ax


def _legend(fig: Figure, ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower left", fontsize=FONT, frameon=False, handlelength=1.8, borderaxespad=0)


def _title(what: str, when: str) -> str:
    """A figure's title, on two lines when one would not fit the figure's width at FONT + 1."""
    return f"{what} ({when})" if len(what) + len(when) < 52 else f"{what}\n{when}"


def _when(s: Snapshot) -> str:
    """The step a figure shows; at a run's end, the step the run ended at too (the last sample is before it)."""
    if s.end_step is not None and s.end_step != s.step:
        return f"step {s.step:,}, the last sample; the run ended at {s.end_step:,}"
    return f"step {s.step:,}"


def _density(h: Histogram) -> list[float]:
    total = sum(h.counts) or 1.0
    width = (h.edges[-1] - h.edges[0]) / max(len(h.counts), 1) or 1.0
    return [c / total / width for c in h.counts]


def _distributions(title: str, curves: list[tuple[Histogram, str]]) -> Figure:
    """One density curve per (histogram, legend label), as the lecture's distribution plots."""
    fig, ax = _figure(len(curves))
    for i, (hist, label) in enumerate(curves):
        ax.plot(hist.centers, _density(hist), label=label, **_style(i))
    ax.set_title(title, fontsize=FONT + 1)
    _legend(fig, ax)
    return fig


def activations(s: Snapshot) -> Figure:
    """Figure 1: distribution of each watched layer's output, with mean, std and saturation in the legend."""
    curves = []
    for x in s.layers:
        sat = "" if x.saturation is None else f", sat {100 * x.saturation:.1f}%"
        curves.append((x.hist, f"{x.name} ({x.kind}): mean {x.mean:+.2f}, std {x.std:.2f}{sat}"))
    return _distributions(_title("activation distribution", _when(s)), curves)


def gradients(s: Snapshot) -> Figure:
    """Figure 2: distribution of the gradient of the loss with respect to each watched layer's output."""
    curves = [
        (x.grad_hist, f"{x.name} ({x.kind}): mean {x.grad_mean:+.2e}, std {x.grad_std:.2e}")
        for x in s.layers
        if x.grad_hist is not None
    ]
    return _distributions(_title("gradient distribution", _when(s)), curves)


def weight_gradients(s: Snapshot) -> Figure:
    """Figure 3: distribution of each weight's gradient, with the grad:data ratio in the legend."""
    curves = []
    for p in s.weights:
        if p.grad_hist is not None:
            shape = "x".join(map(str, p.shape))
            ratio = "n/a" if p.grad_data_ratio is None else f"{p.grad_data_ratio:.1e}"
            label = f"{p.name} {shape}: std {p.grad_std:.1e}, grad:data {ratio}"
            curves.append((p.grad_hist, label))
    return _distributions(_title("weight gradient distribution", _when(s)), curves)


def update_ratios(history: dict[str, list[tuple[int, float]]], step: int, when: str | None = None) -> Figure:
    """Figure 4: log10(update:data) of each weight over time, against the lecture's 1e-3 line. With fewer than FEW
    samples a weight, points only, and a note saying so: a line through two points would look like a trend."""
    from matplotlib.ticker import FuncFormatter

    drawn = {name: points for name, points in history.items() if points}
    few = max((len(points) for points in drawn.values()), default=0) < FEW
    fig, ax = _figure(len(drawn) + 1)
    for i, (name, points) in enumerate(drawn.items()):
        style = _style(i) | ({"linestyle": "none", "marker": "o", "markersize": 4} if few else {})
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    ax.axhline(-3, color="k", linestyle=(0, (4, 2)), linewidth=1.5, label="1e-3 (the lecture's guide)", zorder=0)
    note = ""
    if drawn and few:  # below the step axis, where it hides no point
        samples = max(len(points) for points in drawn.values())
        note = f"\n{samples} sample(s) a weight: points, not a trend"
    ax.xaxis.set_major_formatter(FuncFormatter(_steps))
    ax.set_xlabel("step" + note, fontsize=FONT)
    ax.set_ylabel("log10(update:data)", fontsize=FONT)
    ax.set_title(_title("update:data ratio over time", when or f"to step {step:,}"), fontsize=FONT + 1)
    _legend(fig, ax)
    return fig


def render_all(s: Snapshot, history: dict[str, list[tuple[int, float]]]) -> dict[str, Figure]:
    return {
        "figures/1_activations": activations(s),
        "figures/2_gradients": gradients(s),
        "figures/3_weight_gradients": weight_gradients(s),
        "figures/4_update_ratios": update_ratios(history, s.step, _when(s) if s.end_step is not None else None),
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
