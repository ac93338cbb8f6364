"""napari dock widgets: *Deconvolve*, *PSF* and *Train*, on the bundle's Python API and workflows.

Each long computation runs in a napari thread worker (the viewer stays responsive), reports progress
to a progress bar through a callback, and stops at the next step when Cancel is pressed. Errors
become napari notifications with the same text as the command line's (the same functions raise
them). Written with magicgui containers (napari's own widget toolkit); the computations are the
bundle's: :func:`bundle.inference.deconvolve`, :mod:`bundle.physics` PSFs, the ``training`` workflow
of ``configs/train.json``.
"""

from bundle.viewer.widgets._base import BUNDLE_ROOT, TrainingCancelled
from bundle.viewer.widgets.deconvolve import DeconvolveWidget
from bundle.viewer.widgets.psf import PSFWidget
from bundle.viewer.widgets.train import TrainWidget

__all__ = ["DeconvolveWidget", "PSFWidget", "TrainWidget", "TrainingCancelled", "BUNDLE_ROOT"]
