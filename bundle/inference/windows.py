"""Window planning and tiling: padding helpers, :func:`plan_roi_size` and :class:`TiledInferer`
(a MONAI ``Inferer`` whose stitching does not depend on the window plan); progress over windows
and its cancellation (:class:`DeconvolutionCancelled`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# the network on a whole volume
# ----------------------------------------------------------------------------------------------------------


def _pad_to(x: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``(B, C, *spatial)`` to at least ``size`` (centred); return the crop back.

    Mirror padding (``reflect``) where the volume is long enough, edge replication otherwise.
    """
    spatial = x.shape[2:]
    pads = [max(int(t) - int(s), 0) for s, t in zip(spatial, size)]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
    if not any(pads):
        return x, crop
    flat: list[int] = []
    for p in reversed(pads):  # F.pad wants the last axis first
        flat += [p // 2, p - p // 2]
    reflect_ok = all(p - p // 2 < s for p, s in zip(pads, spatial))
    return F.pad(x, flat, mode="reflect" if reflect_ok else "replicate"), crop


def _pad_for_tiles(x: torch.Tensor, roi: Sequence[int], halo: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``(B, C, *spatial)`` by ``halo`` on every side (mirror) and at the end up to ``roi + k·(roi − 2·halo)``.

    Then MONAI's sliding window with scan interval ``roi − 2·halo`` puts every window at a multiple of
    the interval (the last one flush with the end falls on the grid too), and the windows' cores
    (``roi`` less ``halo`` on each side) tile the volume exactly. Returns the padded tensor and the crop
    back to the input.
    """
    flat: list[int] = []
    crop = []
    for size, r in zip(reversed(x.shape[2:]), reversed(tuple(roi))):
        step = int(r) - 2 * halo
        total = int(size) + 2 * halo
        k = max(0, math.ceil((total - int(r)) / step))
        flat += [halo, int(r) + k * step - int(size) - halo]
    for size in x.shape[2:]:
        crop.append(slice(halo, halo + int(size)))
    mirror = all(p < s for p, s in zip(flat[::2], reversed(x.shape[2:]))) and all(
        p < s for p, s in zip(flat[1::2], reversed(x.shape[2:]))
    )
    if mirror:
        return F.pad(x, flat, mode="reflect"), tuple(crop)
    # mirror the halo where the axis allows it, replicate the rest (a tiny volume or a long end pad)
    head = [min(p, int(s) - 1) for p, s in zip(flat, [v for v in reversed(x.shape[2:]) for _ in range(2)])]
    y = F.pad(x, head, mode="reflect") if any(head) else x
    rest = [p - h for p, h in zip(flat, head)]
    return (F.pad(y, rest, mode="replicate") if any(rest) else y), tuple(crop)


def _core_weight_map(roi: Sequence[int], halo: int) -> torch.Tensor:
    """``(1, 1, *roi)`` weights: 1 in the window's core, 0 within ``halo`` of its faces."""
    w = torch.zeros((1, 1, *[int(r) for r in roi]))
    w[(slice(None), slice(None), *[slice(halo, int(r) - halo) for r in roi])] = 1.0
    return w


def _overlap_fraction(roi: int, overlap_voxels: int) -> float:
    """The fraction MONAI needs for a scan interval of exactly ``roi - overlap_voxels`` voxels."""
    return min(max(overlap_voxels - 1e-3, 0.0) / roi, 0.999)


def _windows_along(size: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window puts along an axis of ``size`` (padded to ``roi`` if shorter)."""
    if roi >= size:
        return 1
    scan = max(int(roi * (1 - overlap)), 1)  # monai.inferers.utils._get_scan_interval
    return math.ceil((size - roi) / scan) + 1


def plan_roi_size(
    image_size: Sequence[int],
    max_voxels: int = 1 << 22,
    overlap_voxels: int = 16,
    divisor: int = 16,
    min_size: int = 64,
) -> tuple[int, ...]:
    """The window that computes the fewest voxels on ``image_size``, at most ``max_voxels`` large.

    The work of a sliding window is (number of windows) × (window volume): the paper's 64³ windows
    with 16 voxels of overlap compute 2.3× the voxels of a 128×256×256 stack, one 128×256×256 window
    computes each voxel once. Windows overlap by ``overlap_voxels`` (the paper's 16), sides are
    multiples of ``divisor`` between ``min_size`` (the training patch: InstanceNorm statistics and
    context as in training) and the axis length rounded up to ``divisor``. Ties go to fewer windows,
    then to the most cubic window. (MONAI has no such planner; the window count per axis follows
    MONAI's scan-interval rule.)

    Args:
        image_size: ``(D, H, W)``.
        max_voxels: largest window volume (memory grows with it: measured about 1 kB per voxel in
            float32 for the full-size generator, half in bfloat16).
        overlap_voxels: overlap of neighbouring windows in voxels.
        divisor: the network's size divisor.
        min_size: smallest window side (axes shorter than that get one window spanning them).

    Returns:
        ``(d, h, w)``, multiples of ``divisor``.
    """
    axes = []
    for size in image_size:
        top = max(math.ceil(int(size) / divisor) * divisor, 2 * divisor)
        low = min(max(math.ceil(min_size / divisor) * divisor, 2 * divisor), top)
        axes.append(
            [
                (r, _windows_along(int(size), r, _overlap_fraction(r, overlap_voxels)))
                for r in range(low, top + 1, divisor)
            ]
        )
    best: tuple | None = None
    for r0, n0 in axes[0]:
        for r1, n1 in axes[1]:
            cap = max_voxels // (r0 * r1)
            for r2, n2 in axes[2]:
                if r2 > cap:
                    break
                shape = (r0, r1, r2)
                key = (n0 * n1 * n2 * r0 * r1 * r2, n0 * n1 * n2, max(shape) - min(shape))
                if best is None or key < best[0]:
                    best = (key, shape)
    if best is None:
        smallest = tuple(a[0][0] for a in axes)
        raise ValueError(
            f"max_voxels={max_voxels} is smaller than the smallest window {smallest} for {tuple(image_size)}"
        )
    return best[1]


def _inferer_like(base: SlidingWindowInferer, roi: Sequence[int], **changes: Any) -> SlidingWindowInferer:
    """A ``SlidingWindowInferer`` with ``base``'s settings, window ``roi`` and the given ``changes``."""
    settings = {
        name: getattr(base, name)
        for name in (
            "sw_batch_size",
            "overlap",
            "mode",
            "sigma_scale",
            "padding_mode",
            "cval",
            "sw_device",
            "device",
            "progress",
        )
    }
    return SlidingWindowInferer(roi_size=tuple(roi), **{**settings, **changes})


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float]) -> int:
    """Number of sliding windows MONAI's ``sliding_window_inference`` runs over a ``shape`` volume
    (the same scan intervals and ``dense_patch_slices``)."""
    overlaps = [float(o) for o in np.broadcast_to(np.asarray(overlap, dtype=float), (len(shape),))]
    interval = [
        int(r) if int(r) == int(s) else max(int(int(r) * (1 - o)), 1)
        for s, r, o in zip(shape, roi, overlaps, strict=True)
    ]
    return len(dense_patch_slices([int(s) for s in shape], [int(r) for r in roi], interval))


class DeconvolutionCancelled(RuntimeError):
    """Raised by a :class:`Deconvolver` ``callback`` to stop a run (e.g. a Cancel button)."""


class _Reporting:
    """The predictor, calling ``callback(done, total)`` after each forward pass (one batch of windows)."""

    def __init__(self, predictor: Callable[[torch.Tensor], torch.Tensor], callback: Callable[[int, int], None], total: int):
        self.predictor, self.callback, self.total, self.done = predictor, callback, int(total), 0

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        out = self.predictor(windows)
        self.done = min(self.total, self.done + int(windows.shape[0]))
        self.callback(self.done, self.total)
        return out
