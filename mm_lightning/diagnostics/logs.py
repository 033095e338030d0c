"""Logging: a sampled step's verdicts, and its statistics in every logger (TensorBoard: one event, histograms and
the verdicts' text; see outputs.py for the tags), new failing verdicts on stderr."""

from __future__ import annotations

import math
import sys

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from . import tbwrite
from .outputs import flat_scalars, snapshot_histograms, snapshot_scalars, tensorboard_scalars
from .select import describe
from .snapshot import Snapshot
from .verdicts import CHECKS, Context, Verdict, judge


def _say(message: str) -> None:
    print(f"[diagnostics] {message}", file=sys.stderr)


class Logging:
    """The logging part of TrainingDiagnostics (a mixin: the callback's state, set up by _init_logging)."""

    def _init_logging(self) -> None:
        # across the run (saved in checkpoints)
        self.update_history: dict[str, list[tuple[int, float]]] = {}
        self.warned: set[tuple[str, str]] = set()
        # results
        self.last_snapshot: Snapshot | None = None
        self.last_verdicts: list[Verdict] = []
        self._depth: dict[str, int] = {}  # each watched layer's and parameter's position: TensorBoard tags sort by it

    def _say_what_is_watched(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = type(pl_module).__name__
        if self.watched:
            _say(f"watching {describe(self.watched)} of {model} every {self.every_n_steps} steps ({self._rule})")
        else:
            _say(
                f"no layer to watch in {model}: no torch.nn activation module, block, Linear or Conv layer; "
                "activation and gradient statistics are off, weights and updates are measured; pass "
                "layers=[...] (module paths or class names) to choose layers"
            )
        if not trainer.loggers:
            _say("no logger (logger=False): nothing is recorded; failing verdicts are printed here only")
        elif self._writer(trainer) is None:
            kinds = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            figures_note = ""
            if self.figures_every_n_steps:
                figures_note = f"; the figures are written as PNG files to {self._figure_destination(trainer)[1]}"
            _say(f"no TensorBoard logger: scalars go to {kinds}; histograms are not recorded{figures_note}")

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, s: Snapshot) -> None:
        shortfall, frozen = self._at_step.pop(s.step, ({}, set()))
        for p in s.weights:
            if p.log10_update_ratio is not None and not math.isnan(p.log10_update_ratio):
                self.update_history.setdefault(p.name, []).append((s.step, p.log10_update_ratio))
                self.lr_shortfall.setdefault(p.name, []).append((s.step, shortfall.get(p.name, 0.0)))
        expected = self.expected_initial_loss
        if expected is None and getattr(pl_module, "num_classes", None):
            expected = math.log(pl_module.num_classes)
        window = self.health.update_ratio_window
        history = {name: [v for _, v in points[-window:]] for name, points in self.update_history.items()}
        context = Context(
            optimizer=self._trained_how,
            lr_shortfall={name: [v for _, v in points[-window:]] for name, points in self.lr_shortfall.items()},
            lr_set=self._lr_set,
            frozen=frozen,
            output_layers=self.output_layers,
            normalised_groups=self._normalised,
            history_steps={name: [i for i, _ in points[-window:]] for name, points in self.update_history.items()},
            tables=self._tables,
        )
        verdicts = judge(s, self.health, expected, history, context)
        self.last_snapshot, self.last_verdicts = s, verdicts
        if not trainer.is_global_zero:
            return
        self._log(trainer, s, verdicts)
        if s.has_histograms:
            self._last_drawable = s
            if self.figures_every_n_steps and s.step % self.figures_every_n_steps == 0:  # step 0 included
                self._log_figures(trainer, s)

    def _log(self, trainer: L.Trainer, s: Snapshot, verdicts: list[Verdict]) -> None:
        """Scalars to every logger (in TensorBoard, a chart per layer in the run itself: see outputs.py);
        histograms and the verdicts' text to TensorBoard; new failures to stderr."""
        health = {}
        for check in CHECKS:
            mine = [v for v in verdicts if v.check == check]
            if mine:
                health[f"health/{check}"] = float(any(not v.ok for v in mine))
        writer = self._writer(trainer)
        for logger in trainer.loggers:
            if writer is not None and isinstance(logger, TensorBoardLogger) and logger.experiment is writer:
                scalars = {**snapshot_scalars(s), **tensorboard_scalars(s, self._depth), **health}
                tbwrite.add_scalars(writer, scalars, s.step)  # one event for all
            else:
                logger.log_metrics({**flat_scalars(s), **health}, step=s.step)
        if writer is not None:
            for tag, hist in snapshot_histograms(s).items():
                tbwrite.add_histogram(writer, tag, hist, s.step)
        new = [v for v in verdicts if not v.ok and (v.check, v.subject) not in self.warned]
        for v in new:
            self.warned.add((v.check, v.subject))
            if self.verbose:
                _say(f"step {s.step}: {v.message}")
        if writer is not None:  # one entry per check and step: TensorBoard shows only the last of a tag and step
            for check in dict.fromkeys(v.check for v in new):
                lines = [f"- step {s.step}: {v.message}" for v in new if v.check == check]
                writer.add_text(f"health/{check}", "\n".join(lines), s.step)

    @staticmethod
    def _writer(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None
