"""The lecture's four figures as a person reads them: text inside the image, tick labels apart, the run's real end
in the title, and figure 4 with few samples drawn as points with a note (fast: drawn from made-up snapshots)."""

from __future__ import annotations

import dataclasses
import itertools

from mm_lightning.diagnostics import figures
from mm_lightning.diagnostics.snapshot import Histogram, LayerStats, ParamStats, Snapshot

STEPS = 200_000


def _snapshot(step: int, layers: int = 5) -> Snapshot:
    hist = Histogram([-1 + 2 * i / 60 for i in range(61)], [float(min(i, 60 - i)) for i in range(60)])
    xs = [
        LayerStats(f"net.layers.{3 * i + 2}", "Tanh", 0.01, 0.64, 0.02, 0.0, 1e-11, 2.6e-3, hist, hist, "net")
        for i in range(layers)
    ]
    ps = [ParamStats(f"net.layers.{3 * i}.weight", (100, 100), 0.1, 1e-5, 5e-3, 5e-2, -3.0, hist) for i in range(6)]
    return Snapshot(step, 2.0, xs, ps)


def _history(samples: int) -> dict[str, list[tuple[int, float]]]:
    steps = [round(i * STEPS / max(samples - 1, 1)) for i in range(samples)]
    return {f"net.layers.{3 * i}.weight": [(s, -3 + 0.2 * i - s / 1e6) for s in steps] for i in range(6)}


def _shown_ticklabels(axis) -> list:
    """The tick labels matplotlib draws: those of ticks inside the axis's view (it keeps one more each side)."""
    lo, hi = sorted(axis.get_view_interval())
    return [t for loc, t in zip(axis.get_majorticklocs(), axis.get_ticklabels()) if lo <= loc <= hi and t.get_text()]


def _texts_inside_and_apart(fig) -> None:
    """Every text drawn inside the image; an axis's tick labels never overlapping."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text() and a.get_visible())]
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels()}
    shown = [t for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in _shown_ticklabels(axis)]
    for text in [t for t in texts if id(t) not in ticks] + shown:
        extent = text.get_window_extent(renderer)
        assert extent.x0 >= fig.bbox.x0 - 1 and extent.x1 <= fig.bbox.x1 + 1, (text.get_text(), extent)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t.get_window_extent(renderer) for t in _shown_ticklabels(axis)]
            for a, b in itertools.combinations(labels, 2):
                assert not a.overlaps(b), [t.get_text() for t in _shown_ticklabels(axis)]


def test_a_long_runs_figures_read_at_their_size():
    s = dataclasses.replace(_snapshot(STEPS - 100), end_step=STEPS)
    drawn = figures.render_all(s, _history(2001))
    for tag, fig in drawn.items():
        _texts_inside_and_apart(fig)
        data, height, width = figures.png(fig)
        assert width >= 2 * 345, tag  # twice a TensorBoard card's width: an exported PNG keeps legible text
        assert fig.axes[0].get_title().endswith("step 199,900, the last sample; the run ended at 200,000")
    ticks = [t.get_text() for t in _shown_ticklabels(drawn["figures/4_update_ratios"].axes[0].xaxis)]
    assert "200k" in ticks and len(ticks) <= figures.TICKS + 1, ticks
    lines = drawn["figures/4_update_ratios"].axes[0].get_lines()
    assert all(line.get_linestyle() != "None" for line in lines)  # 2001 samples: lines
    reference = lines[-1]
    assert reference.get_label().startswith("1e-3") and reference.get_color() not in {
        line.get_color() for line in lines[:-1]
    }


def test_figure_4_with_few_samples_draws_points_and_says_so():
    fig = figures.update_ratios(_history(2), 1000)
    curves = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("1e-3")]
    assert len(curves) == 6 and all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in curves)
    assert "2 sample(s) a weight: points, not a trend" in fig.axes[0].get_xlabel()
    _texts_inside_and_apart(fig)
    many = figures.update_ratios(_history(figures.FEW), 1000)
    assert "not a trend" not in many.axes[0].get_xlabel()


def test_forty_curves_are_forty_styles():
    styles = {tuple(figures._style(i).values()) for i in range(40)}
    assert len(styles) == 40
