"""The notebook's minibatch stream, for the notebook-exact configs: makemore_part3_bn.ipynb draws its init and
then every minibatch from one generator. A config selects it by class path:

    data:
      class_path: mm_lightning.lecture.NotebookNamesDataModule
      init_args: {batch_size: 32}

with a NotebookMLPConfig net whose init_seed draws the init (the stream continues where the init stopped).
"""

from __future__ import annotations

import torch

from mm_lightning.data import NamesDataModule
from mm_lightning.errors import UsageError
from mm_lightning.lecture.nets import NotebookMLP
from mm_lightning.module import MakemoreModule

DATA = "--data mm_lightning.lecture.NotebookNamesDataModule"
NOTEBOOK_NEEDS_INIT_SEED = (
    f"{DATA} continues the generator of the model's init; "
    "set --model.net.init_seed too (the notebook's is 2147483647; --model.net mm_lightning.lecture.NotebookMLPConfig)"
)
NOTEBOOK_NEEDS_NOTEBOOK_NET = (
    f"{DATA} continues the generator of the notebook network's init, and the model's network is {{}}: use "
    "--model.net mm_lightning.lecture.NotebookMLPConfig and set --model.net.init_seed (the notebook's is 2147483647)"
)
NOTEBOOK_ONE_PROCESS = (
    f"{DATA} is one stream for one process; use sampler steps with DDP (the default NamesDataModule's)"
)


class NotebookSampler:
    """The notebook's minibatches: torch.randint(0, n, (batch_size,), generator=g) once per step, g continuing
    from where the model's init left it (makemore_part3_bn.ipynb draws C, the weights, then the minibatches from
    one generator). Minibatch s is a pure function of (that state, s): a resumed run replays the s earlier draws
    (about a second per 100000 steps)."""

    BLOCK = 100  # steps handed out at once

    def __init__(self, num_examples: int, batch_size: int, state: torch.Tensor):
        self.num_examples, self.batch_size, self.state = num_examples, batch_size, state
        self.generator, self.position = torch.Generator(), None

    def _draw(self) -> torch.Tensor:
        self.position += 1
        return torch.randint(0, self.num_examples, (self.batch_size,), generator=self.generator)

    def indices(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, batch_size) example indices for steps start .. stop-1."""
        if self.position is None or start < self.position:
            self.generator.set_state(self.state)
            self.position = 0
        while self.position < start:
            self._draw()
        return torch.stack([self._draw() for _ in range(start, stop)])


def init_generator_state(model: MakemoreModule) -> torch.Tensor:
    """Where the model's init left its generator: a MakemoreModule whose network is the lecture kit's NotebookMLP
    (--model.net mm_lightning.lecture.NotebookMLPConfig), with init_seed."""
    if not isinstance(model, MakemoreModule):
        what = f"unknown ({type(model).__name__} is not a MakemoreModule)"
        raise UsageError(NOTEBOOK_NEEDS_NOTEBOOK_NET.format(what))
    if not isinstance(model.net, NotebookMLP):
        raise UsageError(NOTEBOOK_NEEDS_NOTEBOOK_NET.format(type(model.net).__name__))
    if model.net.init_generator_state is None:
        raise UsageError(NOTEBOOK_NEEDS_INIT_SEED)
    return model.net.init_generator_state


class NotebookNamesDataModule(NamesDataModule):
    """NamesDataModule whose training minibatches are the notebook's: one generator shared with the model's init
    (its --data.seed is unused), one process only."""

    init_generator_state: torch.Tensor | None = None

    def follow_init_generator(self, state: torch.Tensor | None) -> None:
        """The state the model's init left its generator in (NotebookMLP.init_generator_state); the minibatches
        continue from it, as the notebook's do."""
        if state is None:
            raise UsageError(NOTEBOOK_NEEDS_INIT_SEED)
        self.init_generator_state = state

    def connect(self, model, processes: int) -> None:
        """Called by the CLI once the model exists, before the trainer (and DDP's processes): follow the model's
        init generator, and refuse what the one stream cannot honour."""
        self.follow_init_generator(init_generator_state(model))
        if processes > 1:
            raise UsageError(NOTEBOOK_ONE_PROCESS)

    def train_sampler(self, num_examples: int, rank: int) -> NotebookSampler:
        if self.init_generator_state is None and self.trainer is not None:  # (used from Python, without the CLI)
            self.init_generator_state = init_generator_state(self.trainer.lightning_module)
        if self.init_generator_state is None:
            raise UsageError(NOTEBOOK_NEEDS_INIT_SEED)
        if self.trainer is not None and self.trainer.world_size > 1:
            raise UsageError(NOTEBOOK_ONE_PROCESS)
        return NotebookSampler(num_examples, self.batch_size, self.init_generator_state)
