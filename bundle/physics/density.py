"""How crowded a stack is, and the phantom density that makes simulated stacks look as crowded.

A simulated sharp domain (:class:`bundle.sharp_domain.SimulatedSharpDomain`) should hold about as
much structure per volume as the user's stacks: with far fewer filaments the generator learns to
leave most of a crowded stack dark; with far more, to fill sparse ones. Blurred intensities come in
arbitrary units, so the comparison is on a scale-free statistic, the *occupancy*: the share of voxels
above ``threshold`` of the way from the stack's background (low percentile) to its bright level (high
percentile). Blurring spreads structure, so the occupancy of a stack is compared with that of
simulated phantoms blurred by the same PSF, rendered at a few densities; the density is interpolated
(in log) where the two agree.

Written here because no library estimates a structure density from widefield stacks for a simulator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["occupancy", "match_density", "DENSITY_MULTIPLIERS"]

#: densities tried, as multiples of the phantoms' default
DENSITY_MULTIPLIERS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def occupancy(
    volume: np.ndarray, threshold: float = 0.2, percentiles: Sequence[float] = (1.0, 99.9)
) -> float:
    """Share of voxels above ``threshold`` between the ``percentiles`` of ``volume`` (scale-free).

    Args:
        volume: ``(Z, Y, X)`` stack in any units.
        threshold: fraction of the way from the low to the high percentile.
        percentiles: ``(low, high)`` in [0, 100]: background and bright level.

    Returns:
        a value in [0, 1]; 0 for a constant volume.
    """
    lo, hi = np.percentile(np.asarray(volume, dtype=np.float64), percentiles)
    if not hi > lo:
        return 0.0
    return float(np.mean(volume > lo + threshold * (hi - lo)))


def match_density(
    blurred: Sequence[np.ndarray],
    psf: np.ndarray,
    render: Callable[[float, int], np.ndarray],
    multipliers: Sequence[float] = DENSITY_MULTIPLIERS,
    threshold: float = 0.2,
    renders: int = 3,
) -> dict[str, object]:
    """The phantom density multiplier whose blurred phantoms have the stacks' occupancy.

    Args:
        blurred: the user's ``(Z, Y, X)`` stacks.
        psf: ``(Z, Y, X)`` PSF (sum 1) of the optics, at the stacks' voxel size.
        render: ``render(multiplier, i)`` → the ``i``-th sharp ``(Z, Y, X)`` phantom (its own seed, the same
            for every multiplier, so only the density changes) with that multiple of the default number
            of structures.
        multipliers: densities tried, increasing.
        threshold: see :func:`occupancy`.
        renders: phantoms per density, averaged (few structures per volume make one phantom's
            occupancy vary from seed to seed).

    Returns:
        ``{"multiplier": float, "target": stacks' median occupancy, "table": [[multiplier, occupancy], ...],
        "clipped": bool}`` (``clipped``: the target lies outside the tried range and the nearest end was taken).
    """
    from bundle.physics.forward import blur

    if not blurred:
        raise ValueError("match_density needs at least one blurred stack")
    target = float(np.median([occupancy(v, threshold) for v in blurred]))
    table = [
        (float(m), float(np.mean([occupancy(blur(render(float(m), i), psf), threshold) for i in range(int(renders))])))
        for m in sorted(multipliers)
    ]
    occ = np.maximum.accumulate([o for _, o in table])  # occupancy grows with density; guard against noise
    logs = [math.log(m) for m, _ in table]
    clipped = not occ[0] <= target <= occ[-1]
    if target <= occ[0]:
        chosen = table[0][0]
    elif target >= occ[-1]:
        chosen = table[-1][0]
    else:
        chosen = float(math.exp(np.interp(target, occ, logs)))
    return {"multiplier": chosen, "target": target, "table": [list(t) for t in table], "clipped": clipped}
