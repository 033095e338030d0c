"""SIGTERM and Ctrl-C from process start to exit: never exit 0, never a traceback, one line saying what was kept.

A scheduler's requeue recipe reruns a job that exits 143 and treats 0 as finished, so every moment needs an answer:
- while Python imports torch and Lightning (seconds): `install_early` (called by mm_lightning/__init__.py when the
  process is the CLI) exits 128 + signal with one line: nothing has been written yet;
- from `main()` to the first training step (parsing, building, Lightning's sanity check), during evaluation and
  sampling, and after training: the signal raises `Interrupted` where the program is, and the CLI prints one line;
- during training, runs.StopOnSignal takes over: training stops at the end of the optimizer step under way and
  last.ckpt is written there; a second Ctrl-C stops at once (raising `Interrupted`);
- once the CLI is cleaning up and printing its answer, `hold` notes a signal instead of raising: cleanup finishes,
  and a command that had succeeded still exits 128 + signal;
- after `main()` returns, while Python shuts down: the default action (the process ends by the signal; 128 + signal
  in a shell).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


class Interrupted(BaseException):
    """A signal stopped the command where it was. A BaseException, as KeyboardInterrupt: `except Exception` in any
    library on the way does not swallow it; Lightning passes it on after its own teardown."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def status(self) -> int:
        return 128 + self.signum


_held: list[int] = []  # signals noted by `hold`, first first
defer = False  # set while Lightning's own SIGTERM handling runs (several processes): it stops every rank itself


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _starting(signum, frame) -> None:
    sys.stderr.write(f"error: interrupted by {NAMES.get(signum, signum)} while starting: nothing was written\n")
    sys.stderr.flush()
    # at once, not by raising SystemExit: raised inside an extension module's import (numpy's, under torch's), an
    # exception can be caught on the way and the module imported a second time ("cannot load module more than once
    # per process": a traceback and exit 1). Nothing is written yet, so there is nothing to clean up.
    os._exit(128 + signum)


def _raise(signum, frame) -> None:
    if defer and signum == signal.SIGTERM:
        return  # Lightning's handler (which called this one) has noted it; its loops stop all ranks together
    raise Interrupted(signum)


def _note(signum, frame) -> None:
    if not _held:
        _held.append(signum)


def install_early() -> None:
    if _main_thread():
        for sig in NAMES:
            signal.signal(sig, _starting)


@contextmanager
def handled():
    """While the CLI runs a command: a signal raises Interrupted. The handlers found are put back at the end (a test
    or a notebook calling main() keeps its own)."""
    if not _main_thread():
        yield
        return
    global defer
    previous = {sig: signal.getsignal(sig) for sig in NAMES}
    _held.clear()
    defer = False
    for sig in NAMES:
        signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # the CLI process is about to exit: Python's own shutdown (atexit flushes, thread joins) would run a
            # Python handler late or not at all, and exit 0; the default action ends it by the signal (shell: 143)
            handler = signal.SIG_DFL if handler in (None, _starting) else handler
            signal.signal(sig, handler)


def hold() -> None:
    """From now on a signal is noted (see `held`), not raised: what the CLI is doing now must finish."""
    if _main_thread():
        for sig in NAMES:
            signal.signal(sig, _note)


def held() -> int | None:
    return _held[0] if _held else None
