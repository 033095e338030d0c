"""fit's CPU thread choice, for the commands and the notebook API that compute outside `fit`'s training loop.

`fit` (FastPath, in the speed add-on mm_lightning/speed) trains with one CPU thread when each op of a step is too
small to split across cores (rows x the widest Linear's multiply-adds under SINGLE_THREAD_WORK), unless
OMP_NUM_THREADS is set: on a loaded machine the default thread count made the same small ops 10-25x slower (OpenMP
spin-waits). `diagnose` and `lecture.diagnose` train through fit's own callback (lecture.run_diagnosis); `sample`
and `reproduce`'s evaluation use one_thread_if_small here, the same rule.
"""

from __future__ import annotations

import contextlib
import os

import torch

# Below this many multiply-adds in the widest Linear of a step, one CPU thread beats several (each op is too small
# to split): measured 1.27x faster at batch 32 x width 100; two threads win from about batch 2048 x width 100.
# (Here, in the core, so that the rule holds with the speed add-on deleted; FastPath reads it from here.)
SINGLE_THREAD_WORK = 2_500_000


def suits_one_thread(net: torch.nn.Module, rows: int) -> bool:
    """fit's rule: one thread when rows x the widest Linear's multiply-adds is under SINGLE_THREAD_WORK, unless
    OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return False  # the user's choice stands
    widest = max((m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)), default=0)
    return 0 < rows * widest < SINGLE_THREAD_WORK


@contextlib.contextmanager
def one_thread_if_small(net: torch.nn.Module, rows: int):
    """Inside: one CPU thread where fit would train with one (suits_one_thread); the previous count after."""
    previous = torch.get_num_threads()
    change = suits_one_thread(net, rows) and previous != 1
    if change:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(previous)
