"""The CLI's `--fast_path` options, with the speed add-on (mm_lightning/speed) behind them only where a command
trains: `fit` gets the add-on's FastPath; `validate`, `test` and `predict` a stand-in with the same options that
does nothing; and a tree without the add-on (or with one that fails to import) trains on Lightning's own loop, one
line saying why. No other command imports the add-on.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from mm_lightning.errors import UsageError


class NoFastPath(Callback):
    """The fast path's options where it does not run (see the module docstring)."""

    why: str | None = None  # said at fit start (a fit only gets this class when the add-on is missing)

    def __init__(
        self,
        lean_loop: bool = True,
        cpu_threads: int | None = None,
        cuda_graph: bool = True,
        hand_gradients: bool = True,
    ):
        """
        Args:
            lean_loop: the speed add-on's lean loop (mm_lightning/speed), when a fit runs and it is installed.
            cpu_threads: CPU threads for training steps (the speed add-on's choice when null).
            cuda_graph: CUDA graph steps in the lean loop on one GPU.
            hand_gradients: hand-computed gradients in the lean loop on a CPU.
        """
        if cpu_threads is not None and cpu_threads < 1:
            raise UsageError(f"--fast_path.cpu_threads must be at least 1 (or null for automatic), got {cpu_threads}")
        self.lean_loop, self.cpu_threads, self.cuda_graph = lean_loop, cpu_threads, cuda_graph
        self.hand_gradients = hand_gradients
        self.path: str | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.path = "plain"
        rank_zero_info(f"training path: plain Lightning loop, because {self.why or 'the speed add-on is not used'}")


class SpeedAddOnMissing(NoFastPath):
    """The fast path's options on a tree whose speed add-on (mm_lightning/speed) does not import: Lightning's own
    loop trains, and one line says why."""


def fast_path_class(subcommand: str | None) -> type[Callback]:
    """The callback class behind `--fast_path` for this subcommand."""
    if subcommand != "fit":
        return NoFastPath
    try:
        from mm_lightning.speed import FastPath
    except Exception as e:  # noqa: BLE001 - deleted, or broken by whatever it imports: training must still run
        SpeedAddOnMissing.why = f"the speed add-on mm_lightning.speed does not import ({type(e).__name__}: {e})"
        return SpeedAddOnMissing
    return FastPath
