"""Evaluate a trained generator on volumes with ground truth: PSNR/SSIM report, figures, learned PSF.

``configs/evaluate.json`` builds a :class:`DeconvolutionReport` from the inference config's
``network`` and ``inferer`` (so evaluation deconvolves exactly like ``inference`` and
:func:`bundle.inference.deconvolve`) and runs it::

    python -m monai.bundle run evaluate \\
        --config_file "['configs/common.json','configs/inference.json','configs/evaluate.json']"

Normalisation of the scores (stated in the report): the blurred input is percentile-normalised like
the training data (``blurred_percentiles`` -> [0, 1], clipped); the ground truth like the sharp
domain (``sharp_percentiles`` -> [0, 1], clipped); the output is the network's [0, 1] output. PSNR
and SSIM are computed in 3D with MAX (and the SSIM data range) = the dynamic range of the normalised
ground truth (:func:`bundle.metrics.psnr` / :func:`bundle.metrics.ssim`). The input is scored twice:
raw (normalised as above) and at its most favourable intensity scaling (least-squares affine fit to
the ground truth, :func:`bundle.metrics.affine_fit`); the output's affine-fit score is reported too.

Modules: :mod:`~bundle.evaluate.report` (:class:`DeconvolutionReport`), :mod:`~bundle.evaluate.psf`
(:func:`psf_report`).
"""

from bundle.evaluate.psf import psf_report
from bundle.evaluate.report import NORMALISATION, DeconvolutionReport

__all__ = ["DeconvolutionReport", "psf_report", "NORMALISATION"]
