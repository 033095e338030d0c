"""The private Lightning names the project's core touches (run directories, resume), each guarded, and the private
torch hook dicts a compiled network checks (modules_are_hooked): where a Lightning
release lacks one, the feature built on it steps back to Lightning's own behaviour and one line says so. The speed
add-on has its own, gated at fit start (mm_lightning/speed/private.py, gate.py); the portable diagnostics package
touches none. tests/test_compat.py checks that each still exists in the installed Lightning.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

# ModelCheckpoint's own methods RunCheckpoint calls (there is no public way to ask it to save last.ckpt now)
MODEL_CHECKPOINT_METHODS = ("_should_skip_saving_checkpoint", "_save_last_checkpoint", "_monitor_candidates")


def model_checkpoint_missing(callback: ModelCheckpoint) -> str | None:
    """The first private ModelCheckpoint name RunCheckpoint uses that this Lightning lacks (None when all are
    there): the step it last saved at is an attribute its __init__ sets, the rest are methods."""
    for name in MODEL_CHECKPOINT_METHODS:
        if not callable(getattr(type(callback), name, None)):
            return f"ModelCheckpoint.{name}"
    if not isinstance(getattr(callback, "_last_global_step_saved", None), int):
        return "ModelCheckpoint._last_global_step_saved"
    return None


def warn_plain_checkpoint(missing: str) -> None:
    import lightning

    rank_zero_warn(
        f"last.ckpt is written as Lightning's own ModelCheckpoint does (only where val/loss improves), because "
        f"Lightning {lightning.__version__} has no {missing}"
    )


def checkpoint_saved_at_this_step(callback: ModelCheckpoint, trainer) -> bool:
    """Whether ModelCheckpoint has already saved at the trainer's current step (or must not save now)."""
    return callback._should_skip_saving_checkpoint(trainer)


def save_last_checkpoint(callback: ModelCheckpoint, trainer) -> None:
    """ModelCheckpoint's own save of last.ckpt, with its own monitor candidates (no public way to ask for it)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step ModelCheckpoint last saved at (not in its state_dict: lost across a restart without this)."""
    return callback._last_global_step_saved


def set_last_saved_step(callback: ModelCheckpoint, step: int) -> None:
    callback._last_global_step_saved = step


def saves_on_train_batches(callback: ModelCheckpoint) -> bool:
    """Whether ModelCheckpoint.on_train_batch_end can ever save: only with every_n_train_steps or
    train_time_interval set (its private attributes; True where this Lightning has neither, so that its hook runs).
    Otherwise that hook does nothing, every step (~8 us on a CPU)."""
    every = getattr(callback, "_every_n_train_steps", None)
    if not isinstance(every, int) or not hasattr(callback, "_train_time_interval"):
        return True
    return every >= 1 or callback._train_time_interval is not None


def realign_logging_step(trainer) -> None:
    """After a restore, put the step loggers write at (`_batches_that_stepped`) back on the optimizer step.

    Lightning 2.6 restores it from the checkpoint and then adds 1 in some restart stages and not in others (its
    _TrainingEpochLoop.reset): a run resumed from a checkpoint written during the epoch's last validation logs
    every later point one step early (the loss of step 150 at x = 149). With automatic optimization and one
    optimizer it counts exactly the optimizer steps taken, so it must equal the global step at a batch's start.
    A Lightning without that counter keeps its own (the attribute is only ever set where it exists)."""
    loop = trainer.fit_loop.epoch_loop
    if not isinstance(getattr(loop, "_batches_that_stepped", None), int):
        return
    if trainer.lightning_module.automatic_optimization and len(trainer.optimizers) == 1:
        loop._batches_that_stepped = trainer.global_step


# ------------------------------------------------------------------------------------------------ torch.compile


def modules_are_hooked(modules: list[torch.nn.Module]) -> bool:
    """Whether a forward or backward hook watches any of these modules (or all modules): a compiled network must
    then run eagerly (MakemoreModule.training_forward). torch keeps the hooks in private dicts and has no public way
    to ask; a torch without them answers True (eager steps: slower, never wrong)."""
    from torch.nn.modules import module as m

    try:  # (attributes read one by one: the lean loop asks every step, mm_lightning/speed/private.py)
        if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks:
            return True
        if m._global_backward_pre_hooks:
            return True
        return any(
            x._forward_hooks or x._forward_pre_hooks or x._backward_hooks or x._backward_pre_hooks for x in modules
        )
    except AttributeError:
        return True


# ------------------------------------------------------------------------------------------------ jsonargparse


def usage_error_within(error: ValueError, kind: type[Exception]) -> Exception | None:
    """The `kind` error (the project's one-line UsageError) that a class-path argument's constructor raised, from the
    ValueError jsonargparse turns it into while it tries each type the argument allows. jsonargparse chains it as the
    context, or keeps it only in a local list named `exceptions` of a frame in the traceback (its internals: no public
    way to get it). Not found (a jsonargparse that keeps it elsewhere): None, and the caller shows the whole error,
    never a wrong line. tests/test_reliability.py's bad --data.path cases check that it still finds it."""
    cause = error.__context__
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__context__
    tb = error.__traceback__
    while cause is None and tb is not None:
        collected = tb.tb_frame.f_locals.get("exceptions")
        if isinstance(collected, list):
            cause = next((x for x in collected if isinstance(x, kind)), None)
        tb = tb.tb_next
    return cause
