"""The lecture's init stories side by side: the deep network at init with gain 1, 5/3 and 3, without and with
BatchNorm. One PNG per diagnostic (a grid: one panel per story), and each story as a TensorBoard run of its own
under one log directory, so that TensorBoard overlays them.

    python -m mm_lightning.stories --out stories
    tensorboard --logdir stories --host 127.0.0.1      # runs: deep_nobn_gain1/..., deep_nobn/..., ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STORIES = {  # config (configs/lecture/<name>.yaml): panel title
    "deep_nobn_gain1": "no BatchNorm, gain 1",
    "deep_nobn": "no BatchNorm, gain 5/3",
    "deep_nobn_gain3": "no BatchNorm, gain 3",
    "deep_bn_gain1": "BatchNorm, gain 1",
    "deep_bn": "BatchNorm, gain 5/3",
    "deep_bn_gain3": "BatchNorm, gain 3",
}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "lecture"


def draw(diagnoses: dict, gradients: bool):
    """A 2 x 3 grid of one diagnostic at init: the activation (or gradient) distribution of every tanh layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mm_lightning.diagnostics.figures import _density

    fig = Figure(figsize=(12, 6.5), dpi=72, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, sharex=True, sharey=not gradients)
    for ax, (name, d) in zip(axes.flat, diagnoses.items()):
        for x in d.snapshot.layers:
            hist = x.grad_hist if gradients else x.hist
            detail = f"std {x.grad_std:.1e}" if gradients else f"std {x.std:.2f}, sat {100 * x.saturation:.0f}%"
            ax.plot(hist.centers, _density(hist), label=f"{x.name.removeprefix('net.')}: {detail}")
        verdict = "; ".join(sorted({v.check for v in d.failing})) or "healthy"
        ax.set_title(f"{STORIES[name]}: {verdict}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{'gradient' if gradients else 'activation'} distribution of each tanh layer at init")
    return fig


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import io
    import logging

    from mm_lightning.cli import main as cli
    from mm_lightning.data import DEFAULT_PATH, download_names
    from mm_lightning.diagnostics.figures import png
    from mm_lightning.errors import UsageError
    from mm_lightning.lecture import diagnose

    parser = argparse.ArgumentParser(prog="python -m mm_lightning.stories", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("stories"), help="where the PNGs and the runs go")
    parser.add_argument("--data_path", default="data/names.txt")
    a = parser.parse_args(argv)
    try:  # bad input as one line, exit 2, as every command (offline: the hint names this command's option)
        if a.data_path == DEFAULT_PATH and not Path(a.data_path).exists():
            download_names(Path(a.data_path), instead=" or pass --data_path FILE")
        diagnoses = {name: diagnose(str(CONFIGS / f"{name}.yaml"), 0, **{"data.path": a.data_path}) for name in STORIES}
    except UsageError as e:  # the data's line names fit's option; this command's is --data_path
        print(f"error: {str(e).replace('--data.path', '--data_path')}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    lines = []
    lightning = logging.getLogger("lightning.pytorch")
    level = lightning.level
    for name in STORIES:
        config = str(CONFIGS / f"{name}.yaml")
        args = ["fit", "--config", config, "--data.path", a.data_path, "--trainer.max_steps", "1"]
        args += ["--trainer.default_root_dir", str(a.out / name), "--trainer.enable_progress_bar", "false"]
        args += ["--trainer.enable_model_summary", "false"]
        said = io.StringIO()  # six fits would print six model summaries and their chatter: said only if one fails
        lightning.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                status = cli(args)  # one sampled step: the story at init, as a run of its own
        finally:
            lightning.setLevel(level)
        if status != 0:
            print(said.getvalue(), end="", file=sys.stderr)
            return 1
        failing = sorted({v.check for v in diagnoses[name].failing})
        lines.append(f"  {name:<16} {STORIES[name]:<22} {', '.join(failing) or 'healthy'}")
    for kind in ("activations", "gradients"):
        (a.out / f"{kind}.png").write_bytes(png(draw(diagnoses, gradients=kind == "gradients"))[0])
    print("the deep network at init (failing checks):")
    print("\n".join(lines))
    print(f"wrote {a.out}/activations.png, {a.out}/gradients.png and a run per story under {a.out}/")
    print(f"see them: tensorboard --logdir {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
