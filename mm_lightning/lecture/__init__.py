"""The lecture kit: everything that exists to reproduce makemore part 3 and its notebook, beside the template core
(model.py, data.py, module.py), which knows nothing of it. Configs select its classes by class path
(configs/lecture/notebook_*.yaml; docs/notebook-exact.md):

- nets.py: NotebookMLPConfig / NotebookMLP, the notebook's BatchNorm and Linear classes, its seeded init;
- data.py: NotebookNamesDataModule, the notebook's one minibatch stream;
- optim.py: NotebookSGD, the notebook's update `p.data += -lr * p.grad` (selected as the config's `optimizer:`);
- sampling.py: names one at a time, as the notebook samples (`sample --one_at_a_time`);
- reproduce.py, stories.py, fold.py: the lecture's table, its init stories, exercise E02 (fold-batchnorm);
- the Jupyter API, below (mm_lightning/diagnose.py):

    from mm_lightning.lecture import diagnose
    d = diagnose("configs/lecture/deep_nobn.yaml", steps=0, **{"model.net.gain": 3.0})
    d                      # the tables and verdicts
    d.figures()["1_activations"]
"""

from mm_lightning.diagnose import Diagnosis, diagnose, run_diagnosis
from mm_lightning.lecture.data import NotebookNamesDataModule, NotebookSampler
from mm_lightning.lecture.nets import (
    LectureBatchNorm1d,
    LectureFirstBatchNorm1d,
    LectureLinear,
    NotebookMLP,
    NotebookMLPConfig,
)
from mm_lightning.lecture.optim import NotebookSGD

__all__ = [
    "Diagnosis",
    "LectureBatchNorm1d",
    "LectureFirstBatchNorm1d",
    "LectureLinear",
    "NotebookMLP",
    "NotebookMLPConfig",
    "NotebookNamesDataModule",
    "NotebookSGD",
    "NotebookSampler",
    "diagnose",
    "run_diagnosis",
]
