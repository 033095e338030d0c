"""FastPath: the callback that decides, once at fit start, whether the lean loop runs, and says which path in one
line. This module imports public Lightning only: the lean loop and the private names it needs are imported at fit
start, after the gate (gate.py) has checked the installed Lightning, so nothing else ever depends on them.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from mm_lightning.threads import SINGLE_THREAD_WORK  # the core's thread rule, which every command applies


class FastPath(Callback):
    """Chooses the training path at fit start (see mm_lightning/speed/__init__.py) and says which, in one line:
    `training path: fast (...)` or `training path: plain Lightning loop, because <why>`."""

    def __init__(
        self,
        lean_loop: bool = True,
        cpu_threads: int | None = None,
        cuda_graph: bool = True,
        hand_gradients: bool = True,
    ):
        """
        Args:
            lean_loop: run the lean loop whenever it can honour the run exactly (speed only: results are bitwise
                the same) on a Lightning it was verified against; False always runs Lightning's own loop.
            cuda_graph: in the lean loop on one CUDA device, run each unobserved step of a training_step the
                module declares graphable with plain SGD as one CUDA graph replay (graphed.py; the same updates, to
                float rounding); False runs every step eagerly.
            hand_gradients: in the lean loop on a CPU, compute each unobserved step of a training_step the module
                declares graphable, on the core MLP, with the ops autograd runs but no autograd graph (handgrad.py;
                bitwise the same, checked against autograd at the first step of each batch shape); False runs
                autograd every step.
            cpu_threads: CPU threads for training steps; None picks one thread when each step's ops are too small
                to split (under 2.5M multiply-adds in the widest layer), unless OMP_NUM_THREADS is set.
        """
        if cpu_threads is not None and cpu_threads < 1:
            from mm_lightning.errors import UsageError

            raise UsageError(f"--fast_path.cpu_threads must be at least 1 (or null for automatic), got {cpu_threads}")
        self.lean_loop, self.cpu_threads, self.cuda_graph = lean_loop, cpu_threads, cuda_graph
        self.hand_gradients = hand_gradients
        self._restore_loop = None  # undoes the lean loop's installation (lean.install)
        self._threads: tuple[int, int] | None = None  # (threads for training, threads to restore)
        self._threads_decided = False
        self._crc = None  # TensorBoard's checksums in C during fit (tbcrc.py), on either path
        self._writes = None  # TensorBoard's events written by the training thread during fit (tbsync.py)
        self.path: str | None = None  # "lean" or "plain", for tests and the benchmark
        self.why: str | None = None  # why the plain loop runs

    def why_plain(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """Why this fit runs on Lightning's own loop (None when the lean loop can run it exactly)."""
        if not self.lean_loop:
            return "lean_loop=False (--fast_path.lean_loop false)"
        from mm_lightning.speed import gate

        why = gate.why_not_verified()
        if why is not None:
            return why
        from mm_lightning.speed import lean  # imports the private names: the gate has checked them

        return lean.why_plain(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        why = self.why_plain(trainer, pl_module)
        if why is None:
            from mm_lightning.speed import lean

            try:
                self._restore_loop, extra = lean.install(trainer, pl_module, self.cuda_graph, self.hand_gradients)
            except Exception as e:  # noqa: BLE001 - a Lightning the gate did not foresee: its own loop still trains
                why = f"the lean loop could not start ({type(e).__name__}: {str(e).splitlines()[0]})"
        if why is None:
            self.path, self.why = "lean", None
            rank_zero_info(f"training path: fast (lean loop: Lightning's loop minus per-step overhead{extra})")
        else:
            self.path, self.why = "plain", why
            rank_zero_info(f"training path: plain Lightning loop, because {why}")
        self._threads_decided = False
        from mm_lightning.speed.tbcrc import CRCSwap  # the same event bytes; nothing to say where it cannot
        from mm_lightning.speed.tbsync import TrainingThreadWrites

        self._crc = CRCSwap()
        self._crc.install()
        if trainer.strategy.root_device.type == "cpu":  # (on a GPU the training thread mostly waits anyway)
            self._writes = TrainingThreadWrites()
            self._writes.install(trainer.loggers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._threads_decided:  # the first batch tells the batch size: both paths decide alike
            self._threads_decided = True
            self._choose_threads(trainer, pl_module, batch)

    def _choose_threads(self, trainer: L.Trainer, module: L.LightningModule, batch) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        threads = self.cpu_threads
        if threads is None:
            if "OMP_NUM_THREADS" in os.environ:
                return
            first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
            rows = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 0
            linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
            widest = max((m.in_features * m.out_features for m in linears), default=0)
            if not rows or rows * widest >= SINGLE_THREAD_WORK:
                return
            threads = 1
        if threads != torch.get_num_threads():
            self._threads = (threads, torch.get_num_threads())
            torch.set_num_threads(threads)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._threads is not None:  # evaluating a whole split is large matmuls: all threads
            torch.set_num_threads(self._threads[1])

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._threads is not None:  # back to training (on_fit_end restores them for good)
            torch.set_num_threads(self._threads[0])

    def _restore(self, trainer: L.Trainer) -> None:
        if self._restore_loop is not None:
            self._restore_loop()
            self._restore_loop = None
        if self._threads is not None:
            torch.set_num_threads(self._threads[1])
            self._threads = None
        if self._crc is not None:
            self._crc.restore()
            self._crc = None
        if self._writes is not None:
            self._writes.restore()
            self._writes = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore(trainer)
