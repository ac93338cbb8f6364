"""A camera's hot pixels corrected out of core, exactly as in memory.

:func:`bundle.data.correct_hot_pixels` needs the whole stack: the noise, and each pixel's profile
over every plane. Out of core the ``(Y, X)`` mask is found once, tile by tile over full-depth columns
with a margin of context and the noise measured once for the whole stack (:func:`find_hot_pixels_tiled`:
the in-memory mask, tested), and every later read of the stack goes through
:class:`HotPixelCorrectedVolume`, which replaces the hot pixels of the region it reads by the median of
their 8 neighbours, reading one pixel more on each side. Written here because the correction itself is
this bundle's (:mod:`bundle.data.camera`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from bundle.data.camera import _neighbour_median, find_hot_pixels, hot_pixel_setting, stack_noise
from bundle.data.record import trained_hot_pixel_threshold

__all__ = ["HotPixelCorrectedVolume", "find_hot_pixels_tiled", "hot_pixel_corrected"]

logger = logging.getLogger(__name__)

#: context around each tile: the 3 × 3 median of the column medians (1), the ring two pixels away (2)
MARGIN = 3


def find_hot_pixels_tiled(
    volume: Any, threshold: float = 4.0, quantile: float = 0.25, max_halo: float | None = 0.2, tile: int = 256
) -> np.ndarray:
    """:func:`bundle.data.find_hot_pixels` of a sliceable ``(Z, Y, X)`` array larger than memory.

    Args:
        volume: a Zarr or numpy array (anything with ``.shape`` and slicing).
        threshold, quantile, max_halo: as :func:`~bundle.data.find_hot_pixels`.
        tile: lateral tile size; each read is ``(Z, tile + 6, tile + 6)`` voxels.

    Returns:
        ``(Y, X)`` bool, the mask :func:`~bundle.data.find_hot_pixels` finds on the whole stack.
    """
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise ValueError(f"need a (Z, Y, X) volume, got shape {shape}")
    mask = np.zeros(shape[1:], dtype=bool)
    if shape[0] < 3 or min(shape[1:]) < 3:
        return mask
    noise = stack_noise(volume)
    for y0 in range(0, shape[1], tile):
        for x0 in range(0, shape[2], tile):
            y1, x1 = min(y0 + tile, shape[1]), min(x0 + tile, shape[2])
            ya, xa = max(0, y0 - MARGIN), max(0, x0 - MARGIN)
            part = np.asarray(volume[:, ya : min(y1 + MARGIN, shape[1]), xa : min(x1 + MARGIN, shape[2])])
            found = find_hot_pixels(part, threshold, quantile, max_halo, noise=noise)
            mask[y0:y1, x0:x1] = found[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    return mask


class HotPixelCorrectedVolume:
    """A ``(Z, Y, X)`` array-like whose reads come with the hot pixels of ``mask`` replaced, plane by
    plane, by the median of their 8 neighbours (hot neighbours left out), as
    :func:`bundle.data.correct_hot_pixels` does on the whole stack.

    Reads with a lateral step (the percentile subsample of a large stack) replace each hot pixel by the
    median of its neighbours on that coarser grid instead.

    Args:
        volume: the source (Zarr, numpy: ``.shape``, ``.dtype`` and slicing).
        mask: ``(Y, X)`` bool, e.g. from :func:`find_hot_pixels_tiled`.
    """

    def __init__(self, volume: Any, mask: np.ndarray) -> None:
        self.volume = volume
        self.mask = np.asarray(mask, dtype=bool)
        self.shape = tuple(int(s) for s in volume.shape)
        if len(self.shape) != 3 or self.mask.shape != self.shape[1:]:
            raise ValueError(f"need a (Z, Y, X) volume and a (Y, X) mask, got {self.shape} and {self.mask.shape}")
        source = np.dtype(volume.dtype)
        self.dtype = source if np.issubdtype(source, np.floating) else np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"HotPixelCorrectedVolume takes up to three slices, got {key!r}")
        z, y, x = (*key, *(slice(None),) * (3 - len(key)))
        (y0, y1, ys), (x0, x1, xs) = y.indices(self.shape[1]), x.indices(self.shape[2])
        if ys < 1 or xs < 1:
            raise TypeError(f"HotPixelCorrectedVolume takes positive steps, got {key!r}")
        if ys > 1 or xs > 1:  # a subsample: the hot pixels of the coarse grid against their grid neighbours
            return self._corrected(np.asarray(self.volume[z, y, x]), self.mask[y, x])
        ya, yb, xa, xb = max(0, y0 - 1), min(self.shape[1], y1 + 1), max(0, x0 - 1), min(self.shape[2], x1 + 1)
        region = self._corrected(np.asarray(self.volume[z, ya:yb, xa:xb]), self.mask[ya:yb, xa:xb])
        return region[:, y0 - ya : y0 - ya + max(0, y1 - y0), x0 - xa : x0 - xa + max(0, x1 - x0)]

    def _corrected(self, block: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = block.astype(self.dtype, copy=True)
        if block.size and mask.any():
            ys, xs = np.nonzero(mask)
            out[:, ys, xs] = _neighbour_median(block, ys, xs, mask).astype(self.dtype)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:, :, :]
        return whole if dtype is None else whole.astype(dtype)


def hot_pixel_corrected(volume: Any, model: Any, hot_pixel_threshold: float | str | None = "auto") -> Any:
    """``volume`` as the out-of-core paths read it: through :class:`HotPixelCorrectedVolume` when a
    threshold applies, else unchanged.

    Args:
        volume: the source array.
        model: the model as given to the out-of-core call (a folder or file records the threshold
            its training used; a module records nothing).
        hot_pixel_threshold: ``"auto"`` (the model's, :func:`bundle.data.trained_hot_pixel_threshold`),
            a number, or None (no correction).
    """
    if hot_pixel_threshold == "auto":
        hot_pixel_threshold = trained_hot_pixel_threshold(model if isinstance(model, (str, os.PathLike)) else None)
    hot_pixel_threshold = hot_pixel_setting(hot_pixel_threshold)
    if hot_pixel_threshold is None:
        return volume
    mask = find_hot_pixels_tiled(volume, hot_pixel_threshold)
    logger.info(f"hot pixels: {int(mask.sum())} of the camera's {mask.size} pixels replaced as the stack is read")
    return HotPixelCorrectedVolume(volume, mask)
