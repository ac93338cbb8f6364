"""Camera defects of widefield stacks: hot pixels, found and replaced before anything reads the stack.

An sCMOS or CCD pixel with a high dark current adds the same offset to every plane of a Z stack (one
camera pixel records every plane), so in 3D a hot pixel is a one-voxel line along Z. No ``h * x`` makes
such a line: the blur path's synthetic pairs never show one, so a generator trained on them turns it
into a bright streak, and the spectral PSF fit reads its flat lateral spectrum as a sharper PSF (on the
project's microtubule data with 1 % hot pixels the fitted NA fell from 1.39 to 1.32). Written here
because neither MONAI nor scipy has a hot-pixel filter for stacks.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy.ndimage import median_filter

logger = logging.getLogger(__name__)


def find_hot_pixels(stack: np.ndarray, threshold: float = 4.0, quantile: float = 0.25) -> np.ndarray:
    """The ``(Y, X)`` mask of hot pixels of a ``(Z, Y, X)`` stack.

    A hot pixel stands above its 3 × 3 lateral neighbours in *every* plane; structure does so in the
    few planes it passes through. Each pixel's excess over the median of its 8 neighbours is taken
    plane by plane, and the pixel is hot when the ``quantile`` of that excess over Z exceeds
    ``threshold`` times the stack's noise (1.4826 × the median absolute difference of lateral
    neighbours / √2, robust to structure). Candidates are first narrowed to the pixels whose median
    over Z stands above the 3 × 3 median of those medians, so a large stack costs little more than
    two medians over it.

    Args:
        stack: ``(Z, Y, X)`` intensities (Z ≥ 3; with fewer planes a defect cannot be told from
            structure and nothing is found).
        threshold: in noise standard deviations; lower finds fainter hot pixels.
        quantile: in (0, 0.5]; the share of planes in which a hot pixel may fail to stand out
            (noise, or bright structure next to it).

    Returns:
        ``(Y, X)`` bool.
    """
    volume = np.asarray(stack, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"find_hot_pixels expects a (Z, Y, X) stack, got shape {volume.shape}")
    if not threshold > 0 or not 0 < quantile <= 0.5:
        raise ValueError(f"threshold must be > 0 and quantile in (0, 0.5], got {threshold}, {quantile}")
    mask = np.zeros(volume.shape[1:], dtype=bool)
    if volume.shape[0] < 3 or min(volume.shape[1:]) < 3:
        return mask
    noise = 1.4826 * float(np.median(np.abs(np.diff(volume, axis=2)))) / np.sqrt(2.0)
    if not noise > 0:  # noise-free or clipped: any positive excess in every plane counts
        noise = float(np.finfo(np.float64).eps * max(1.0, np.abs(volume).max()))
    columns = np.median(volume, axis=0)
    ys, xs = np.nonzero(columns - median_filter(columns, size=3, mode="reflect") > threshold * noise / np.sqrt(volume.shape[0]))
    if ys.size == 0:
        return mask
    excess = volume[:, ys, xs] - _neighbour_median(volume, ys, xs, None)  # (Z, candidates)
    hot = np.quantile(excess, quantile, axis=0) > threshold * noise
    mask[ys[hot], xs[hot]] = True
    return mask


def _neighbour_median(volume: np.ndarray, ys: np.ndarray, xs: np.ndarray, skip: np.ndarray | None) -> np.ndarray:
    """``(Z, len(ys))``: per plane, the median of the 8 lateral neighbours of each ``(ys, xs)`` (clipped at
    the border; neighbours where ``skip`` is True left out, and 0 where all of them are)."""
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    ny = np.clip(ys[:, None] + np.array([o[0] for o in offsets]), 0, volume.shape[1] - 1)
    nx = np.clip(xs[:, None] + np.array([o[1] for o in offsets]), 0, volume.shape[2] - 1)
    values = volume[:, ny, nx].astype(np.float64, copy=False)  # (Z, n, 8); the fancy index already copied
    if skip is None:
        return np.median(values, axis=2)
    values[:, skip[ny, nx]] = np.nan
    values = np.where(np.isnan(values).all(axis=2, keepdims=True), 0.0, values)
    return np.nanmedian(values, axis=2)


def correct_hot_pixels(stack: np.ndarray, threshold: float = 4.0, quantile: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Replace the hot pixels of a ``(Z, Y, X)`` stack by the median of their 3 × 3 neighbours, plane by plane.

    Args:
        stack: ``(Z, Y, X)``; not modified.
        threshold, quantile: see :func:`find_hot_pixels`.

    Returns:
        ``(corrected, mask)``: a float copy of ``stack`` (its dtype if floating, else float32) and the
        ``(Y, X)`` bool mask of the replaced pixels.
    """
    volume = np.asarray(stack)
    mask = find_hot_pixels(volume, threshold, quantile)
    dtype = volume.dtype if np.issubdtype(volume.dtype, np.floating) else np.float32
    out = volume.astype(dtype, copy=True)
    if mask.any():
        ys, xs = np.nonzero(mask)
        out[:, ys, xs] = _neighbour_median(volume, ys, xs, mask).astype(dtype)  # hot neighbours left out
    return out, mask


class CorrectHotPixelsd(MapTransform):
    """Dictionary transform: :func:`correct_hot_pixels` on ``(Z, Y, X)`` or ``(1, Z, Y, X)`` items.

    Put it right after the loader of the *blurred* domain (training, validation and inference alike),
    before the percentile normalisation: a hot pixel then moves neither the percentiles nor the
    spectral PSF fit. The mask of each key is stored under ``<key>_hot_pixels`` when ``mask_key_postfix``
    is set.

    Args:
        keys: keys of the stacks.
        threshold, quantile: see :func:`find_hot_pixels` (the same defaults as it and the script);
            ``threshold=None`` passes the stacks unchanged (the ``hot_pixel_threshold`` config key's
            default, so that a config can switch the correction on or off without editing its lists).
        mask_key_postfix: store each key's ``(Y, X)`` mask under ``key + postfix``; None stores nothing.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float | None = 4.0,
        quantile: float = 0.25,
        mask_key_postfix: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = None if threshold is None else float(threshold)
        self.quantile = float(quantile)
        self.mask_key_postfix = mask_key_postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.threshold is None:
            return d
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            channel = array.ndim == 4
            if channel and array.shape[0] != 1:
                raise ValueError(f"CorrectHotPixelsd: {key!r} has {array.shape[0]} channels; expected 1")
            fixed, mask = correct_hot_pixels(array[0] if channel else array, self.threshold, self.quantile)
            fixed = fixed[None] if channel else fixed
            if isinstance(value, torch.Tensor):
                out = value.clone() if value.is_floating_point() else value.to(torch.float32)
                out.copy_(torch.as_tensor(fixed))  # keeps MONAI's MetaTensor metadata
                d[key] = out
            else:
                d[key] = fixed
            if self.mask_key_postfix is not None:
                d[f"{key}{self.mask_key_postfix}"] = mask
        return d



def warn_hot_pixels(stacks: Iterable[tuple[str, np.ndarray]]) -> int:
    """Log a warning naming the stacks that hold hot pixels (:func:`find_hot_pixels`, default settings).

    For pipelines that run without the correction (``hot_pixel_threshold`` null): training on such
    stacks teaches the generator to draw each hot pixel as a streak along Z.

    Args:
        stacks: ``(name, (Z, Y, X) or (1, Z, Y, X) array)`` pairs of the blurred domain.

    Returns:
        the number of stacks with hot pixels.
    """
    found = []
    for name, stack in stacks:
        array = np.asarray(stack.detach().cpu() if isinstance(stack, torch.Tensor) else stack)
        count = int(find_hot_pixels(array[0] if array.ndim == 4 else array).sum())
        if count:
            found.append(f"{name} ({count})")
    if found:
        logger.warning(
            "%d of the blurred stacks hold hot pixels (a camera's defects: one-voxel lines along Z; count in brackets): %s. "
            "Set hot_pixel_threshold to 4 to correct them when they are read (training and inference alike), "
            "or write corrected copies with scripts/correct_hot_pixels.py.",
            len(found), ", ".join(found),
        )
    return len(found)
