"""Deconvolve volumes with a trained generator: MONAI components for ``configs/inference.json`` and a
CSBDeep-style Python function, :func:`deconvolve`, built from the same pieces.

Pipeline (identical from the command line and from Python)::

    volume (Z, Y, X), any intensity
      -> NormalizePercentilesd   the training normalisation of the blurred domain: percentiles
                                 (p_lo, p_hi) of the volume -> [0, 1], clipped (values recorded)
      -> TiledInferer            a Deconvolver for the network: pad every axis to at least the
                                 window, MONAI SlidingWindowInferer (windows of roi_size, overlap 0.25, Gaussian blending, windows on
                                 ``sw_device``, stitched on the CPU), crop back; output in [0, 1]
      -> RestoreIntensityd       "undo" the normalisation: out * (v_hi - v_lo) + v_lo, where v_lo, v_hi
                                 are the input's values at the percentiles p_lo, p_hi; so the output
                                 is in the input's [v_lo, v_hi] range (``output_range="normalized"``
                                 keeps the network's [0, 1] output)
      -> SaveVolumed             ``<name>_deconv<ext>`` with the input's voxel size, atomic, never
                                 over an input

Modules, one job each (everything public is importable from ``bundle.inference``):

- :mod:`~bundle.inference.precision`: precision choice and the network rewritten for fast inference
  (:class:`InferenceNetwork`);
- :mod:`~bundle.inference.windows`: window planning (:func:`plan_roi_size`) and padding helpers;
- :mod:`~bundle.inference.deconvolver`: :class:`Deconvolver` (one in-memory ``(B, 1, D, H, W)``
  block in [0, 1] -> sharp block in [0, 1], any size);
- :mod:`~bundle.inference.tiled`: :class:`TiledInferer`, the same as a MONAI ``Inferer`` —
  ``inferer(inputs, network)``, the ``inferer`` of ``configs/inference.json`` and of validation;
- :mod:`~bundle.inference.checkpoints`: :func:`load_network` (checkpoint / bundle folder /
  TorchScript -> module) and MONAI's ``CheckpointLoader`` with the same checks;
- :mod:`~bundle.inference.transforms`: normalisation and its inverse, output paths, the writer, the
  datalist;
- :mod:`~bundle.inference.api`: :func:`deconvolve` and :func:`deconvolve_normalized`, :func:`model_refinement` (the
  tuned Richardson–Lucy refinement of a model folder, which :func:`deconvolve` applies).
"""

from bundle.inference.api import checkpoint_folder, deconvolve, deconvolve_normalized, model_refinement
from bundle.inference.checkpoints import (
    CheckpointLoader,
    load_checkpoint,
    load_network,
    network_for_checkpoint,
    network_from_state_dict,
)
from bundle.inference.deconvolver import Deconvolver
from bundle.inference.precision import PRECISIONS, InferenceNetwork, cpu_has_native_bf16, resolve_precision
from bundle.inference.tiled import TiledInferer
from bundle.inference.transforms import (
    OUTPUT_RANGES,
    NormalizePercentilesd,
    RestoreIntensityd,
    SaveVolumed,
    check_output_dir,
    inference_datalist,
    output_path,
)
from bundle.inference.windows import DeconvolutionCancelled, plan_roi_size, window_count
from bundle.io import LoadVolumed  # the one loader transform, re-exported for inference configs

__all__ = [
    "OUTPUT_RANGES",
    "PRECISIONS",
    "DeconvolutionCancelled",
    "Deconvolver",
    "TiledInferer",
    "CheckpointLoader",
    "InferenceNetwork",
    "LoadVolumed",
    "NormalizePercentilesd",
    "RestoreIntensityd",
    "SaveVolumed",
    "check_output_dir",
    "checkpoint_folder",
    "cpu_has_native_bf16",
    "deconvolve",
    "deconvolve_normalized",
    "inference_datalist",
    "load_checkpoint",
    "load_network",
    "model_refinement",
    "network_for_checkpoint",
    "network_from_state_dict",
    "output_path",
    "plan_roi_size",
    "resolve_precision",
    "window_count",
]
