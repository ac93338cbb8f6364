"""Classical non-blind deconvolution: Richardson–Lucy with optional total-variation regularisation.

This is the project's classical reference, the stand-in for the commercial deconvolution
(AutoQuant X3) the paper compares against on real data, and the non-learned baseline on simulated
data. Everything runs with torch FFTs on the device of the input (CPU or CUDA).

References:
    - W. H. Richardson, "Bayesian-based iterative method of image restoration",
      J. Opt. Soc. Am. 62(1), 55–59, 1972.
    - L. B. Lucy, "An iterative technique for the rectification of observed distributions",
      Astron. J. 79(6), 745–754, 1974.
    - N. Dey et al., "Richardson–Lucy algorithm with total variation regularization for 3D confocal
      microscope deconvolution", Microsc. Res. Tech. 69(4), 260–266, 2006.

Modules: :mod:`~bundle.classical.spectral` (the PSF convolution and its adjoint with the kernel's
spectrum computed once, pruned FFTs), :mod:`~bundle.classical.richardson_lucy` (the iteration, the
``RichardsonLucy`` network for inference configs), :mod:`~bundle.classical.tuning` (RL's iterations
and the refinement's settings chosen on data with ground truth) and :mod:`~bundle.classical.refine` (RL started from a generator's
output, the inference pipeline's optional refinement step). Everything public is importable from ``bundle.classical``.
"""

from bundle.classical.network import RichardsonLucy
from bundle.classical.refine import PSFRefinement, refine_estimate, tuned_refinement
from bundle.classical.richardson_lucy import richardson_lucy
from bundle.classical.spectral import _SpectralBlur  # noqa: F401  (used by the classical sharp domain)
from bundle.classical.tuning import (
    best_iteration,
    best_refinement,
    best_refinement_settings,
    psnr,
    refinement_scores,
)

__all__ = [
    "richardson_lucy",
    "RichardsonLucy",
    "best_iteration",
    "psnr",
    "refine_estimate",
    "PSFRefinement",
    "best_refinement",
    "best_refinement_settings",
    "refinement_scores",
    "tuned_refinement",
]
