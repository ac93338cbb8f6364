"""Ignite handlers of the bundle: progress bar, resumable checkpoints, best model, PSF snapshots, history.

Each handler has ``attach(engine)`` so MONAI workflows register it from a config's handler list.
Modules: :mod:`~bundle.handlers.checkpoints` (resumable checkpoints, safe loading),
:mod:`~bundle.handlers.selection` (the model of record), :mod:`~bundle.handlers.records` (PSF
snapshots, figures, validation history), :mod:`~bundle.handlers.calibration` (the blur path before
training), :mod:`~bundle.handlers.common` (progress bar, iteration filter, allocator policy,
attaching a handler defined elsewhere). Everything public is importable from ``bundle.handlers``.
"""

from bundle.handlers.calibration import BlurCalibration
from bundle.handlers.checkpoints import (
    RandomStates,
    ResumableCheckpoint,
    atomic_torch_save,
    load_training_checkpoint,
    transform_random_states,
)
from bundle.handlers.common import AttachHandler, MallocPolicy, ProgressBar, every_n_iterations
from bundle.handlers.records import PSFSnapshot, ValidationHistory, save_orthoslices
from bundle.handlers.selection import BestModelSaver, ModelWithoutValidation
from bundle.handlers.tracking import TrainingMLFlowHandler

__all__ = [
    "ProgressBar",
    "every_n_iterations",
    "ResumableCheckpoint",
    "RandomStates",
    "BestModelSaver",
    "ModelWithoutValidation",
    "PSFSnapshot",
    "ValidationHistory",
    "BlurCalibration",
    "MallocPolicy",
    "AttachHandler",
    "atomic_torch_save",
    "load_training_checkpoint",
    "save_orthoslices",
    "transform_random_states",
    "TrainingMLFlowHandler",
]
