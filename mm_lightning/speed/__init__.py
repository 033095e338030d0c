"""The speed add-on: the same module, the same Trainer, the same results, less time around each optimizer step.

Lightning's own loop costs ~1 ms around every optimizer step on a CPU (hook dispatch through profiler scopes, the
optimizer closure, ~0.4 ms per `self.log` call), and a step of the lecture's model costs ~1.5 ms: plain Lightning
runs it at ~0.45x the lecture's own loop. `FastPath`, a callback the CLI adds (add it to your own Trainer too),
decides once at fit start and says so in one line:

- the lean loop, when the run uses nothing it cannot honour exactly: Lightning's own training epoch loop object,
  with `advance` (one batch, one optimizer step) replaced by one that makes the same calls in the same order with
  the same counters, but calls a hook only where a callback or the module overrides it, skips profiler scopes,
  sets `.grad` to None itself (what `zero_grad()` does), steps a plain torch.optim.SGD with the kernel its `step`
  runs but without its per-call wrappers where that is exact (sgd.py, gated per torch release like the loop per
  Lightning release), steps a MultiStepLR by its counters on steps that change no rate (lrstep.py, gated alike),
  and makes `self.log` in `training_step` / `on_train_batch_end` cheap (private.LeanLog). On a CPU, a step of a
  training_step the module declares graphable, on the core MLP, that nothing observes, runs the forward and backward
  as the ops autograd would run, without autograd's graph (handgrad.py: "hand gradients"; autograd took ~25% of
  such a step).
  Otherwise Lightning's own `advance` runs, and the line says why.
- CPU threads, on both paths: one thread when each op of a step is too small to split across cores.
- TensorBoard, on both paths: event checksums in C (tbcrc.py) and, on a CPU, events appended by the training thread
  rather than handed to TensorBoard's writer thread, whose wake-ups took the GIL from training (tbsync.py). The
  files are the same bytes in the same order.

What the lean loop must preserve, and tests/test_fastpath.py checks against the plain loop, bitwise on the CPU:
parameters, BatchNorm buffers, every logged metric (a user's `self.log` too), callback hooks and what they see,
diagnostics, checkpoints (a checkpoint of one path resumes exactly on the other).

It is an add-on that cannot break anything: this package may be deleted, and the rest of the project still works
(the CLI then trains on Lightning's own loop and says so). Only `callback.py` is imported before a fit starts, and
it imports public Lightning only. At fit start the gate (gate.py) lets the lean loop run only on a Lightning
version it was verified against, whose private names import and whose mirrored functions still have their
recorded source fingerprints; otherwise Lightning's own loop trains, and the one line says why. The lean loop
never tests a module's class: it reads what hooks a module overrides, and a CUDA graph replaces a training_step
only where the module declares it graphable (graphed.py, `graphable_training_step`). See docs/speed.md.
"""

from mm_lightning.speed.callback import FastPath

__all__ = ["FastPath"]
