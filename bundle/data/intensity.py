"""One intensity scale per domain: percentiles pooled over all of a domain's volumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bundle.data.lists import list_volumes
from bundle.io import VolumeError, load_volume


def domain_intensity_range(
    folder: str | Sequence[str],
    percentiles: Sequence[float] = (0.1, 99.9),
    max_voxels_per_volume: int = 1_000_000,
    seed: int = 0,
) -> list[float]:
    """The ``(lower, upper)`` percentiles of all the domain's volumes pooled: ``[v_lo, v_hi]``.

    Mapping this one range to [0, 1] in every volume keeps the intensity ratios between volumes
    (same camera, exposure and labelling), which per-volume percentiles destroy: the upper percentile
    of a widefield stack depends on how many bright objects overlap in it, so two stacks of one sample
    get gains that differ by tens of percent, and a blur path with one gain then cannot explain every
    stack. Written here because MONAI's percentile transforms work per image.

    Args:
        folder: the domain's folder, glob or file list (as :func:`bundle.data.list_volumes`).
        percentiles: ``(lower, upper)`` in [0, 100].
        max_voxels_per_volume: larger volumes contribute a random subset of this many voxels
            (each volume weighs the same whatever its size).
        seed: seed of the subsets.

    Raises:
        VolumeError: naming the folder when the pooled percentiles are equal (empty volumes).
    """
    lower, upper = (float(p) for p in percentiles)
    rng = np.random.default_rng(seed)
    samples = []
    for path in list_volumes(folder):
        volume, _ = load_volume(path, dtype=np.float32)
        flat = volume.reshape(-1)
        if flat.size > max_voxels_per_volume:
            flat = rng.choice(flat, max_voxels_per_volume, replace=False)
        samples.append(flat)
    pooled = np.concatenate(samples)
    v_lo, v_hi = (float(v) for v in np.percentile(pooled, [lower, upper]))
    if not v_hi > v_lo:
        raise VolumeError(f"{folder}: the pooled {lower} and {upper} percentiles are both {v_lo:g}")
    return [v_lo, v_hi]
