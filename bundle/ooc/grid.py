"""The window grid of the whole (virtually padded) volume, blocks, and the whole volume's percentiles."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.data.utils import dense_patch_slices

logger = logging.getLogger(__name__)


OUTPUT_RANGES = ("input", "normalized")

def window_grid(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]
) -> list[tuple[slice, ...]]:
    """The sliding windows of MONAI's ``sliding_window_inference`` on an image of ``image_size`` (in order).

    Args:
        image_size: ``(D, H, W)``, each at least ``roi_size`` (pad first).
        roi_size: window size ``(d, h, w)``.
        overlap: overlap fraction in [0, 1), one or one per axis.
    """
    if any(i < r for i, r in zip(image_size, roi_size)):
        raise ValueError(f"image_size {tuple(image_size)} must be >= roi_size {tuple(roi_size)} (pad first)")
    overlaps = [float(o) for o in np.broadcast_to(np.asarray(overlap, dtype=float), (len(roi_size),))]
    scan = []  # monai.inferers.utils._get_scan_interval
    for i, r, o in zip(image_size, roi_size, overlaps):
        scan.append(int(r) if r == i else max(int(r * (1 - o)), 1))
    return list(dense_patch_slices(tuple(image_size), tuple(roi_size), tuple(scan)))


def _padding(shape: Sequence[int], roi_size: Sequence[int]) -> tuple[list[int], str]:
    """Per-axis total padding to reach the window, and the mode, as ``bundle.inference.windows._pad_to``."""
    pads = [max(int(r) - int(s), 0) for s, r in zip(shape, roi_size)]
    reflect_ok = all(p - p // 2 < s for p, s in zip(pads, shape))
    return pads, "reflect" if reflect_ok else "replicate"


# ----------------------------------------------------------------------------------------------------------
# Zarr I/O
# ----------------------------------------------------------------------------------------------------------

def estimate_percentiles(
    volume: Any, percentiles: Sequence[float], max_samples: int = 1 << 21, slab: int = 16
) -> tuple[float, float]:
    """Values of a volume at two percentiles, read slab by slab.

    Exact (the same numbers as ``bundle.inference.NormalizePercentilesd``) when the volume has at most
    ``max_samples`` voxels; otherwise computed on a regular subsample (every ``s``-th voxel along
    each axis, ``s`` chosen so that at most ``max_samples`` voxels are read into memory).
    """
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    shape = tuple(int(s) for s in volume.shape)
    n = math.prod(shape)
    stride = 1 if n <= max_samples else math.ceil((n / max_samples) ** (1.0 / 3.0))
    parts = []
    step = max(slab, 1) * stride
    for z0 in range(0, shape[0], step):
        block = np.asarray(
            volume[z0 : min(z0 + step, shape[0]) : stride, ::stride, ::stride], dtype=np.float32
        )
        parts.append(block)
    sample = torch.from_numpy(np.concatenate(parts, axis=0))
    lo, hi = (float(percentile(sample, p)) for p in percentiles)  # type: ignore[arg-type]
    return lo, hi


def normalization_range(
    volume: Any,
    normalize: Sequence[float] | None,
    intensity_range: Sequence[float] | None,
    output_range: str,
    max_samples: int = 1 << 21,
) -> tuple[float, float, str]:
    """``(v_lo, v_hi, output_range)`` of an out-of-core run: the given ``intensity_range``, else the
    volume's values at the ``normalize`` percentiles, else (0, 1) (already normalised: then
    ``output_range="input"`` becomes ``"normalized"``, there is nothing to undo).

    Raises:
        ValueError: the range is empty (a constant volume).
    """
    if intensity_range is not None:
        lo, hi = (float(v) for v in intensity_range)
    elif normalize is not None:
        lo, hi = estimate_percentiles(volume, normalize, max_samples=max_samples)
    else:
        lo, hi = 0.0, 1.0
    if normalize is None and intensity_range is None and output_range == "input":
        output_range = "normalized"
    if not hi > lo:
        raise ValueError(f"intensity range ({lo:g}, {hi:g}) is empty: the volume is (nearly) constant")
    return lo, hi, output_range


# ----------------------------------------------------------------------------------------------------------
# the out-of-core loop
# ----------------------------------------------------------------------------------------------------------


def _groups(windows: list[tuple[slice, ...]], block_size: Sequence[int]) -> Iterator[list[tuple[slice, ...]]]:
    """Windows grouped by the block holding their first voxel, in raster order of the blocks."""
    groups: dict[tuple[int, ...], list[tuple[slice, ...]]] = {}
    for w in windows:
        groups.setdefault(tuple(s.start // b for s, b in zip(w, block_size)), []).append(w)
    for key in sorted(groups):
        yield groups[key]


def _blocks(shape: Sequence[int], block_size: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    for z in range(0, shape[0], block_size[0]):
        for y in range(0, shape[1], block_size[1]):
            for x in range(0, shape[2], block_size[2]):
                yield tuple(slice(o, min(o + b, s)) for o, b, s in zip((z, y, x), block_size, shape))


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = tuple(slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(a, b))
    return out if all(s.start < s.stop for s in out) else None


def _shift(region: tuple[slice, ...], origin: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s.start - o, s.stop - o) for s, o in zip(region, origin))
