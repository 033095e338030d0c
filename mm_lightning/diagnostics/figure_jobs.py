"""Figures: where the lecture's four figures go (TensorBoard's Images, or PNG files next to another logger's run),
and handing them to the figures worker process, which draws and writes them (drawn here if it cannot run)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from . import figures
from .snapshot import Snapshot
from .worker import figures_job


class FigureJobs:
    """The figures part of TrainingDiagnostics (a mixin: the callback's state, set up by _init_figures)."""

    def _init_figures(self) -> None:
        self._last_drawable: Snapshot | None = None  # the latest snapshot with histograms, for the figures
        self._last_drawn: int | None = None
        self._figure_jobs: list[tuple] = []  # figures asked for before the figures worker starts
        self._writers: dict = {}  # TensorBoard event files of figures drawn in this process

    def _figure_destination(self, trainer: L.Trainer) -> tuple[str, str] | None:
        """Where figures go: the TensorBoard run directory; else PNG files in the artifact directory of an MLflow
        run (file store) or a W&B run (its files, synced with it), else in the run directory of another logger;
        nowhere without a logger."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return ("tensorboard", logger.log_dir)
        for logger in trainer.loggers:
            if (directory := _artifact_dir(logger)) is not None:
                return ("png", os.path.join(directory, "diagnostics_figures"))
        if trainer.loggers:
            return ("png", os.path.join(trainer.log_dir or trainer.default_root_dir, "diagnostics_figures"))
        return None

    def _log_figures(self, trainer: L.Trainer, s: Snapshot) -> None:
        """Hand the figures of s to the worker process, which writes them (drawn here if it cannot be started)."""
        destination = self._figure_destination(trainer)
        if destination is None:
            return
        self._last_drawn = s.step
        self._figure_jobs.append(figures_job(s, self.update_history, destination))
        if self._samples >= self.INLINE_SAMPLES or self._running is None:
            self._draw_figures()  # else later: a short run draws its figures after training, not during it

    def _draw_figures(self) -> None:
        """Send the figures asked for to their worker (drawn here if it cannot be started)."""
        while self._figure_jobs:
            job = self._figure_jobs.pop(0)
            worker = self._start_worker("figures")  # a dead worker's undrawn jobs come back to the front
            if worker is not None:
                worker.submit(job)
            else:
                snapshot, history, destination = job[2]
                figures.write(figures.render_pngs(snapshot, history), job[1], destination, self._writers)


def _artifact_dir(logger) -> str | None:
    """A local directory whose files the logger's run keeps as artifacts: an MLflow run's (file store) or a W&B
    run's files directory. Found by the logger's class name: neither package is needed to import this one."""
    try:
        if type(logger).__name__ == "MLFlowLogger":
            uri = logger.experiment.get_run(logger.run_id).info.artifact_uri
            return uri.removeprefix("file://").removeprefix("file:") if uri.startswith(("file:", "/")) else None
        if type(logger).__name__ == "WandbLogger":
            return logger.experiment.dir
    except Exception:  # a logger that cannot say: the run directory instead
        return None
    return None
