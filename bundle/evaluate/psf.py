"""The learned PSF against the true one: correlation, FWHMs, and whether it was learned at all."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import PathLike

from bundle.io import load_volume, validate_psf
from bundle.physics.psf import fwhm, psf_correlation

__all__ = ["psf_report"]


def psf_report(
    learned: PathLike | np.ndarray | torch.nn.Module,
    true: PathLike | np.ndarray,
    voxel_size: Sequence[float] | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Compare a learned PSF with the true one: correlation and FWHM along z, y, x (µm).

    Args:
        learned: ``blur.tif`` exported by training, a ``(Z, Y, X)`` array, or a PSF layer (``kernel()``).
        true: the true PSF file (``dataset_dir/psf.tif``) or array.
        voxel_size: ``(z, y, x)`` µm; default from the files (the true PSF's first).

    Returns:
        ``(numbers, learned array, true array, voxel size)``; numbers has ``correlation`` (normalised
        cross-correlation, :func:`bundle.physics.psf.psf_correlation`) and ``fwhm_um`` of both PSFs.
    """

    def read(src: Any) -> tuple[np.ndarray, tuple[float, ...] | None]:
        if isinstance(src, torch.nn.Module):
            with torch.no_grad():
                return src.kernel().detach().float().cpu().numpy(), tuple(getattr(src, "voxel_size", ())) or None
        if isinstance(src, (str, os.PathLike)):
            arr, meta = load_volume(src, dtype=np.float32)
            validate_psf(arr, src)
            return arr, meta["voxel_size"]
        return np.asarray(src, np.float32), None

    h_learned, v_learned = read(learned)
    h_true, v_true = read(true)
    voxel = tuple(voxel_size or v_true or v_learned or (1.0, 1.0, 1.0))

    def widths(h: np.ndarray) -> dict[str, float]:
        return {name: fwhm(h, axis=i, voxel_size=voxel) for i, name in enumerate("zyx")}

    numbers = {
        "correlation": psf_correlation(h_learned, h_true),
        "fwhm_um": {"learned": widths(h_learned), "true": widths(h_true)},
        "voxel_size_um": list(voxel),
    }
    return numbers, h_learned, h_true, voxel  # type: ignore[return-value]


def _psf_was_fixed(learned: Any) -> bool:
    """True when the PSF layer was fixed in training (non-blind): its ``parameterization``, or the
    ``blur.json`` that training exports beside ``blur.tif``."""
    if isinstance(learned, torch.nn.Module):
        return getattr(learned, "parameterization", None) == "fixed"
    if isinstance(learned, (str, os.PathLike)):
        record = Path(learned).with_suffix(".json")
        try:
            return json.loads(record.read_text()).get("parameterization") == "fixed"
        except (OSError, ValueError, AttributeError):
            return False
    return False
