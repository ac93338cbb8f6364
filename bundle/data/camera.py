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
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy.ndimage import median_filter

logger = logging.getLogger(__name__)


def stack_noise(stack: Any) -> float:
    """The noise standard deviation of a ``(Z, Y, X)`` stack as :func:`find_hot_pixels` measures it:
    1.4826 × the median absolute difference of lateral neighbours / √2 (robust to structure), on every
    ``s``-th plane so that at most ~16 M voxels are read (any sliceable array: Zarr too). Noise-free
    or clipped stacks get a floor of machine epsilon × their largest value."""
    step = -(-int(np.prod(stack.shape)) // 2**24)
    planes = np.asarray(stack[::step], dtype=np.float32)
    noise = 1.4826 * float(np.median(np.abs(np.diff(planes, axis=2)))) / np.sqrt(2.0)
    return noise if noise > 0 else float(np.finfo(np.float64).eps * max(1.0, float(np.abs(planes).max())))


def find_hot_pixels(
    stack: np.ndarray,
    threshold: float = 4.0,
    quantile: float = 0.25,
    max_halo: float | None = 0.2,
    noise: float | None = None,
) -> np.ndarray:
    """The ``(Y, X)`` mask of hot pixels of a ``(Z, Y, X)`` stack.

    A hot pixel stands above its 3 × 3 lateral neighbours in *every* plane; structure does so in the
    few planes it passes through. Each pixel's excess over the median of its 8 neighbours is taken
    plane by plane, and the pixel is hot when the ``quantile`` of that excess over Z exceeds
    ``threshold`` times the stack's noise (1.4826 × the median absolute difference of lateral
    neighbours / √2, robust to structure). Candidates are first narrowed to the pixels whose median
    over Z stands above the 3 × 3 median of those medians, so a large stack costs little more than
    two medians over it.

    Structure that runs along Z through the whole stack (a cell's side membrane, a filament normal to
    the coverslip) passes that test too, but it was imaged through the optics: its neighbours share
    its blur, while a camera defect has none. So a candidate is kept only when the median of its 8
    neighbours stands above the median of the next ring (the 16 pixels two away) by less than
    ``max_halo`` times its own excess over those neighbours (a blurred point sampled at Nyquist: ~0.4,
    lines and out-of-focus light more; a hot pixel: 0 ± noise), measured plane by plane (the median
    over Z of each plane's halo) or on the median over Z (each misses some hot pixels on the flank of
    structure that the other finds), and when it does not lie on a line or ring of structure (two
    neighbours at least 90° apart around it as bright as it is: a sheet seen from above, the ring of a
    blurred vertical tube). Measured (sessions 39–40, ``docs/results.md``): without these tests 243
    pixels of three vertical sheets and 124 of twelve vertical tubes (Born & Wolf NA 1.4, 20 dB) and
    6 + 10 structure pixels of a real widefield stack counted as hot; with ``max_halo`` 0.2 none (at
    10 dB one sheet pixel; at 30 / 40 dB 4 / 10 pixels of the tubes' rings), and 99.5–99.7 % of the
    hot pixels of simulated test stacks (offsets 0.1–1 × the peak, log-uniform) still found.

    Args:
        stack: ``(Z, Y, X)`` intensities (Z ≥ 3; with fewer planes a defect cannot be told from
            structure and nothing is found). Worked on in its own float precision (float32 for
            integers): about two copies of the stack at the peak.
        threshold: in noise standard deviations; lower finds fainter hot pixels.
        quantile: in (0, 0.5]; the share of planes in which a hot pixel may fail to stand out
            (noise, or bright structure next to it).
        max_halo: the largest blur halo a hot pixel may show, as above; None skips the structure
            tests, halo and line (a camera sampled so coarsely that the optics' blur falls inside one
            pixel).
        noise: the stack's noise standard deviation; None measures it (:func:`stack_noise`). The
            out-of-core path measures it once and passes it with each tile of a larger stack.

    Returns:
        ``(Y, X)`` bool.
    """
    volume = np.asarray(stack)
    if not np.issubdtype(volume.dtype, np.floating):
        volume = volume.astype(np.float32)
    if volume.ndim != 3:
        raise ValueError(f"find_hot_pixels expects a (Z, Y, X) stack, got shape {volume.shape}")
    if not threshold > 0 or not 0 < quantile <= 0.5 or (max_halo is not None and not max_halo > 0):
        raise ValueError(f"threshold and max_halo must be > 0 and quantile in (0, 0.5], got {threshold}, {max_halo}, {quantile}")
    mask = np.zeros(volume.shape[1:], dtype=bool)
    if volume.shape[0] < 3 or min(volume.shape[1:]) < 3:
        return mask
    noise = stack_noise(volume) if noise is None else float(noise)
    columns = np.median(volume, axis=0).astype(np.float64)
    ys, xs = np.nonzero(columns - median_filter(columns, size=3, mode="reflect") > threshold * noise / np.sqrt(volume.shape[0]))
    if ys.size == 0:
        return mask
    near = _neighbour_median(volume, ys, xs, None)  # (Z, candidates)
    excess = volume[:, ys, xs] - near
    hot = np.quantile(excess, quantile, axis=0) > threshold * noise
    ys, xs, near, excess = ys[hot], xs[hot], near[:, hot], excess[:, hot]
    if max_halo is not None and ys.size:
        # the halo two ways, each missing hot pixels on some backgrounds that the other finds: plane by
        # plane (median over Z of the per-plane halo) and on the median over Z
        halo = np.median(near - _neighbour_median(volume, ys, xs, None, 2), axis=0)
        sharp = halo < max_halo * np.median(excess, axis=0)
        near, far = _ring_median(columns, ys, xs, 1), _ring_median(columns, ys, xs, 2)
        sharp |= near - far < max_halo * (columns[ys, xs] - near)
        sharp &= ~_on_a_line(columns, ys, xs)
        ys, xs = ys[sharp], xs[sharp]
    mask[ys, xs] = True
    return mask


def _ring(shape: tuple[int, ...], ys: np.ndarray, xs: np.ndarray, ring: int) -> tuple[np.ndarray, np.ndarray]:
    """``(len(ys), 8 ring)`` row and column indices of the square ``ring`` pixels around each pixel, clipped at the border."""
    offsets = [(dy, dx) for dy in range(-ring, ring + 1) for dx in range(-ring, ring + 1) if max(abs(dy), abs(dx)) == ring]
    ny = np.clip(ys[:, None] + np.array([o[0] for o in offsets]), 0, shape[0] - 1)
    return ny, np.clip(xs[:, None] + np.array([o[1] for o in offsets]), 0, shape[1] - 1)


def _on_a_line(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``(len(ys),)`` bool: a pixel of a ``(Y, X)`` image lies on a line or ring of structure (a vertical
    sheet seen from above, the ring of a blurred vertical tube) when two of its 8 neighbours at least
    90° apart around it are as bright as it is. A hot pixel stands above them all, or has one bright
    neighbour (a hot neighbour) or two side by side (on the flank of structure)."""
    around = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]  # in order around it
    ny = np.clip(ys[:, None] + np.array([o[0] for o in around]), 0, image.shape[0] - 1)
    nx = np.clip(xs[:, None] + np.array([o[1] for o in around]), 0, image.shape[1] - 1)
    bright = (image[ny, nx] >= image[ys, xs][:, None]) & ((ny != ys[:, None]) | (nx != xs[:, None]))  # clipped onto itself: not a neighbour
    return (bright & (np.roll(bright, 2, axis=1) | np.roll(bright, 3, axis=1) | np.roll(bright, 4, axis=1))).any(axis=1)


def _ring_median(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, ring: int) -> np.ndarray:
    """``(len(ys),)``: the median of a ``(Y, X)`` image on the square ``ring`` pixels around each pixel."""
    return np.median(image[_ring(image.shape, ys, xs, ring)], axis=1)


def _neighbour_median(volume: np.ndarray, ys: np.ndarray, xs: np.ndarray, skip: np.ndarray | None, ring: int = 1) -> np.ndarray:
    """``(Z, len(ys))``: per plane, the median of the lateral neighbours of each ``(ys, xs)`` on the square
    ``ring`` pixels away (1: the 8 next to it; 2: the 16 around those), clipped at the border; neighbours
    where ``skip`` is True left out, and 0 where all of them are."""
    ny, nx = _ring(volume.shape[1:], ys, xs, ring)
    values = volume[:, ny, nx].astype(np.float64, copy=False)  # (Z, n, 8 ring); the fancy index already copied
    if skip is None:
        return np.median(values, axis=2)
    values[:, skip[ny, nx]] = np.nan
    values = np.where(np.isnan(values).all(axis=2, keepdims=True), 0.0, values)
    return np.nanmedian(values, axis=2)


def hot_pixel_setting(value: float | str | None) -> float | None:
    """The ``hot_pixel_threshold`` setting as a threshold, or None for no correction.

    Off is spelled ``0`` (what a command line should pass: MONAI's ``run`` drops an override whose
    value is None, so ``--hot_pixel_threshold None`` would leave the default on), ``None``, or one of
    the strings ``"0"``, ``"none"``, ``"null"``, ``"off"``; a number > 0 (or its string) is the
    threshold in noise standard deviations.

    Raises:
        ValueError: anything else (a negative number, a word), naming the value.
    """
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "off"):
        return None
    try:
        number = None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if value is not None and (number is None or not number >= 0):
        raise ValueError(f"hot_pixel_threshold must be a number > 0, or 0 / None / 'off' for no correction; got {value!r}")
    return None if value is None or number == 0 else number


def correct_hot_pixels(
    stack: np.ndarray, threshold: float | None = 4.0, quantile: float = 0.25, max_halo: float | None = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the hot pixels of a ``(Z, Y, X)`` stack by the median of their 3 × 3 neighbours, plane by plane.

    Args:
        stack: ``(Z, Y, X)``; not modified.
        threshold, quantile, max_halo: see :func:`find_hot_pixels`; ``threshold`` None or 0 (the
            ``hot_pixel_threshold`` key switched off; :func:`hot_pixel_setting`) corrects nothing.

    Returns:
        ``(corrected, mask)``: a float copy of ``stack`` (its dtype if floating, else float32) and the
        ``(Y, X)`` bool mask of the replaced pixels; with ``threshold=None`` the stack as given and an
        empty mask.
    """
    volume = np.asarray(stack)
    threshold = hot_pixel_setting(threshold)
    if threshold is None:
        return volume, np.zeros(volume.shape[-2:], dtype=bool)
    mask = find_hot_pixels(volume, threshold, quantile, max_halo)
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
        threshold, quantile, max_halo: see :func:`find_hot_pixels` (the same defaults as it and the script);
            ``threshold`` None or 0 (or ``"off"``, ``"null"``: :func:`hot_pixel_setting`) passes the
            stacks unchanged, so that the ``hot_pixel_threshold`` config key (4 by default) switches the
            correction on or off without editing the transform lists.
        mask_key_postfix: store each key's ``(Y, X)`` mask under ``key + postfix``; None stores nothing.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float | None = 4.0,
        quantile: float = 0.25,
        max_halo: float | None = 0.2,
        mask_key_postfix: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = hot_pixel_setting(threshold)
        self.quantile = float(quantile)
        self.max_halo = None if max_halo is None else float(max_halo)
        self.mask_key_postfix = mask_key_postfix
        self._reported: set[str] = set()  # stacks whose count was logged (validation re-reads them)

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
            fixed, mask = correct_hot_pixels(array[0] if channel else array, self.threshold, self.quantile, self.max_halo)
            fixed = fixed[None] if channel else fixed
            name = str(getattr(value, "meta", {}).get("filename_or_obj", key))
            if mask.any() and name not in self._reported:
                self._reported.add(name)
                logger.info("%s: %d hot pixels replaced (threshold %g)", name, int(mask.sum()), self.threshold)
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
            "hot_pixel_threshold is off, so they stay in: its default, 4, corrects them as they are read "
            "(training and inference alike), or write corrected copies with scripts/correct_hot_pixels.py.",
            len(found), ", ".join(found),
        )
    return len(found)
