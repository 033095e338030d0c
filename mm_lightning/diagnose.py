"""`diagnose` a config (at init or after K training steps) and get back what a notebook shows, the lecture's
per-layer tables (rendered as HTML tables in Jupyter), the health verdicts, and the four figures as matplotlib
figures shown inline; the `diagnose` command (below) prints the same thing as text. The lecture kit exports the
Jupyter API (mm_lightning.lecture).

    from mm_lightning.lecture import diagnose
    d = diagnose("configs/lecture/deep_nobn.yaml", steps=0, **{"model.net.gain": 3.0})
    d                      # the tables and verdicts
    d.figures()["1_activations"]

Everything goes through the CLI's own parser (same configs, overrides, checks and defaults as `fit`).
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mm_lightning.diagnostics import Snapshot, TrainingDiagnostics, Verdict, format_report
from mm_lightning.errors import UsageError


@dataclass
class Diagnosis:
    """One sampled step of a config: its statistics (snapshot), verdicts and update history."""

    snapshot: Snapshot
    verdicts: list[Verdict]
    update_history: dict[str, list[tuple[int, float]]]
    expected_loss: float

    @property
    def loss(self) -> float | None:
        return self.snapshot.loss

    @property
    def failing(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.ok]

    def __str__(self) -> str:
        return format_report(self.snapshot, self.verdicts, self.expected_loss)

    def figures(self) -> dict:
        """The lecture's four figures of this step, as matplotlib Figures (Jupyter shows one inline)."""
        from mm_lightning.diagnostics import figures

        _show_figures_inline()
        return {tag.split("/")[-1]: fig for tag, fig in figures.render_all(self.snapshot, self.update_history).items()}

    def _repr_html_(self) -> str:
        s = self.snapshot
        rows = [
            [f"{x.name} ({x.kind})", f"{x.mean:+.4f}", f"{x.std:.4f}"]
            + ["n/a" if x.saturation is None else f"{100 * x.saturation:.2f}%", f"{100 * x.dead:.2f}%"]
            + ["n/a" if x.grad_std is None else f"{x.grad_std:.2e}"]
            for x in s.layers
        ]
        weights = [
            [p.name, "x".join(map(str, p.shape)), "n/a" if p.grad_std is None else f"{p.grad_std:.2e}"]
            + ["n/a" if p.grad_data_ratio is None else f"{p.grad_data_ratio:.2e}"]
            + ["n/a" if p.log10_update_ratio is None else f"{p.log10_update_ratio:.2f}"]
            for p in s.weights
        ]
        verdicts = [
            ["ok" if v.ok else "FAIL", v.check, v.message]
            for v in self.verdicts
            if not v.ok or v.check != "update_ratio"
        ]
        loss = "" if s.loss is None else f": loss {s.loss:.4f} (ln(classes) = {self.expected_loss:.4f})"
        return (
            f"<p><b>step {s.step}</b>{html.escape(loss)}</p>"
            + _table(["layer output", "mean", "std", "saturated", "dead", "grad std"], rows)
            + _table(["weight", "shape", "grad std", "grad:data", "log10 update:data"], weights)
            + _table(["", "check", "verdict"], verdicts)
        )


def _show_figures_inline() -> None:
    """In IPython/Jupyter: show a matplotlib Figure as its PNG (the figures are drawn without pyplot, so no
    backend registers that for them)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        from matplotlib.figure import Figure

        from mm_lightning.diagnostics.figures import png

        shell.display_formatter.formatters["image/png"].for_type(Figure, lambda fig: png(fig)[0])


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def diagnose(config: str | None = None, steps: int = 0, **overrides) -> Diagnosis:
    """Build the data and model as `fit --config config` with `--key value` for each override (dots in keys:
    pass them as **{"model.net.gain": 3.0}), train `steps` steps (0: at init), and return the step's Diagnosis."""
    args = ([] if config is None else ["--config", str(config)]) + [
        a for key, value in overrides.items() for a in (f"--{key}", _arg(value))
    ]
    return run_diagnosis(args, steps)


def _cpu_threads(cli) -> int | None:
    """--fast_path.cpu_threads as given to this diagnosis (None: fit's automatic choice)."""
    configured = cli.config_init.get("fast_path")
    return getattr(configured, "cpu_threads", None)


def _arg(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)


def run_diagnosis(args: list[str], steps: int) -> Diagnosis:
    """The `diagnose` command's work, for the command and for diagnose()."""
    from mm_lightning import preflight
    from mm_lightning.lightning_cli import _quiet_noise

    _quiet_noise()  # as the CLI: no warnings that say nothing about this run
    if steps < 0:
        raise UsageError(f"--steps must be 0 (at init) or more, got {steps}")
    preflight.check_config_files(args)  # a missing or broken config: one line naming it, not a parser traceback
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # for this diagnosis only: a later fit in the notebook says its lines
    try:
        return _diagnose(args, steps)
    finally:
        lightning_log.setLevel(level)


def _sampling_interval(steps: int, every_n_steps: int) -> int:
    """Sample every --diagnostics.every_n_steps steps, as fit does, so that figure 4 shows the update ratios' course;
    the diagnosis is of step `steps`, which must be sampled: with fewer steps than that (or 0), step 0 and `steps`."""
    from mm_lightning.errors import UsageError

    if every_n_steps and steps > every_n_steps and steps % every_n_steps:
        raise UsageError(
            f"diagnose --steps {steps}: the diagnostics sample every {every_n_steps} steps "
            f"(--diagnostics.every_n_steps) and step {steps} is not one of them; give --steps a multiple of "
            f"{every_n_steps} or a --diagnostics.every_n_steps that divides {steps}"
        )
    return every_n_steps if every_n_steps and steps >= every_n_steps else max(steps, 1)


def _diagnose(args: list[str], steps: int) -> Diagnosis:
    import lightning as L

    from mm_lightning.lightning_cli import MakemoreCLI
    from mm_lightning.speedswitch import fast_path_class

    cli = MakemoreCLI(list(args), run=False)  # the same parser, config files and checks as fit
    configured: TrainingDiagnostics = cli.config_init["diagnostics"]
    every = _sampling_interval(steps, configured.every_n_steps)
    diagnostics = TrainingDiagnostics(
        every_n_steps=every,
        layers=configured.patterns,
        saturation_threshold=configured.saturation_threshold,
        histogram_bins=configured.bins,
        histograms_every_n_steps=max(steps, 1),  # step 0 and step `steps`: the tables' and figures' steps
        figures_every_n_steps=0,
        expected_initial_loss=configured.expected_initial_loss,
        health=configured.health,
        stats_in_worker=False,  # a short run: not worth starting a process
        verbose=False,  # the report lists what was watched and every verdict
    )
    trainer = L.Trainer(
        max_steps=steps + 1,
        accelerator=cli.config["trainer"]["accelerator"],
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        # fit's thread choice (one thread for small steps): its own callback, the lean loop and CUDA graphs left
        # out (speed only, and a diagnosis samples every step it trains)
        callbacks=[
            diagnostics,
            fast_path_class("fit")(lean_loop=False, cpu_threads=_cpu_threads(cli), cuda_graph=False),
        ],
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    expected = configured.expected_initial_loss or math.log(cli.model.num_classes)
    return Diagnosis(diagnostics.last_snapshot, diagnostics.last_verdicts, diagnostics.update_history, expected)


# ---------------------------------------------------------------------------------------- the command

DIAGNOSE_USAGE = """usage: python -m mm_lightning.cli diagnose [--config FILE] [--steps K] [--save_figures DIR] [...]

Build the data and the model exactly as `fit` would (same --config, --model.*, --data.*, --diagnostics.*), train
K steps (default 0: at init), then print the lecture's per-layer tables for step K and the health verdicts.
Training samples every --diagnostics.every_n_steps N steps as fit does (figure 4: the update ratios at 0, N, ...,
K); K is then a multiple of N. Exit status 1 when a verdict fails. --save_figures DIR writes the four lecture
figures there as PNG files."""


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` or `name=VALUE` from args and return VALUE."""
    for i, a in enumerate(args):
        if a == name:
            if i + 1 >= len(args):
                raise UsageError(f"{name} needs a value")
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def diagnose_command(args: list[str]) -> int:
    """`python -m mm_lightning.cli diagnose ...`"""
    from mm_lightning.diagnostics import figures

    if "-h" in args or "--help" in args:
        print(DIAGNOSE_USAGE)
        return 0
    args = list(args)
    steps_text, figures_dir = _pop_option(args, "--steps"), _pop_option(args, "--save_figures")
    if figures_dir and Path(figures_dir).exists() and not Path(figures_dir).is_dir():
        raise UsageError(f"--save_figures {figures_dir} is a file; give a directory (it is created if missing)")
    try:
        steps = int(steps_text or 0)
    except ValueError:
        raise UsageError(f"--steps must be a whole number of training steps, got {steps_text!r}") from None
    diagnosis = run_diagnosis(args, steps)
    print(diagnosis)
    if figures_dir:
        out = Path(figures_dir)
        out.mkdir(parents=True, exist_ok=True)
        for tag, (data, _, _) in figures.render_pngs(diagnosis.snapshot, diagnosis.update_history).items():
            (out / f"{tag.split('/')[-1]}.png").write_bytes(data)
        print(f"figures written to {out}/")
    return 1 if diagnosis.failing else 0
