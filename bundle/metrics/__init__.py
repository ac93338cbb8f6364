"""Image-quality metrics for deconvolution: PSNR/SSIM in 3D, and the input scored at its best scaling.

PSNR and SSIM themselves come from MONAI (``PSNRMetric``, ``SSIMMetric``); this module adds what MONAI
does not have: the least-squares affine fit that scores a blurred input at its most favourable
intensity scaling, so that a method cannot beat the input by a mere rescaling.

Modules: :mod:`~bundle.metrics.reference` (scores against a ground truth: affine fit, PSNR, SSIM,
dim structure, and their MONAI metric classes) and :mod:`~bundle.metrics.no_reference` (scores
without one, for the user's own stacks: data consistency, cycle error, PSF stability, decorrelation
resolution) and :mod:`~bundle.metrics.sharp_cycle` (the sharp-domain score that chooses models
without a ground truth). Everything public is importable from ``bundle.metrics``.
"""

from bundle.metrics.no_reference import (
    CycleErrorMetric,
    DataConsistencyMetric,
    DecorrelationResolutionMetric,
    NoReferenceScore,
    PSFStabilityMetric,
    decorrelation_resolution,
)
from bundle.metrics.reference import (
    AffineFitPSNRMetric,
    AffineFitSSIMMetric,
    affine_fit,
    dim_structure,
    psnr,
    ssim,
)
from bundle.metrics.sharp_cycle import SharpCycleScore

__all__ = [
    "affine_fit",
    "psnr",
    "ssim",
    "dim_structure",
    "AffineFitPSNRMetric",
    "AffineFitSSIMMetric",
    "DataConsistencyMetric",
    "NoReferenceScore",
    "CycleErrorMetric",
    "PSFStabilityMetric",
    "DecorrelationResolutionMetric",
    "SharpCycleScore",
    "decorrelation_resolution",
]
