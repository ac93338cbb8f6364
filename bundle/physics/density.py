"""How crowded and how bright a stack is, and the phantom settings that make simulated stacks match.

A simulated sharp domain (:class:`bundle.sharp_domain.SimulatedSharpDomain`) should hold about as
much structure per volume as the user's stacks: with far fewer filaments the generator learns to
leave most of a crowded stack dark; with far more, to fill sparse ones. Blurred intensities come in
arbitrary units, so the comparison is on a scale-free statistic, the *occupancy*: the share of voxels
above ``threshold`` of the way from the stack's background (low percentile) to its bright level (high
percentile). Blurring spreads structure, so the occupancy of a stack is compared with that of
simulated phantoms blurred by the same PSF, rendered at a few densities; the density is interpolated
(in log) where the two agree. Brightness is matched the same way on a second scale-free statistic,
the *brightness spread*: the share of the structure's voxels that are bright (occupancy at 30 % over
occupancy at 10 %) — low when many structures are dim, high when all are about equally bright — by
the low end of the phantoms' intensity range.

Written here because no library estimates a structure density from widefield stacks for a simulator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["occupancy", "brightness_spread", "match_density", "match_brightness", "DENSITY_MULTIPLIERS", "INTENSITY_LOWS"]

#: densities tried, as multiples of the phantoms' default
DENSITY_MULTIPLIERS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: low ends of the phantoms' intensity range tried (the high end is 1)
INTENSITY_LOWS = (0.03, 0.06, 0.12, 0.25, 0.5, 1.0)


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


def brightness_spread(
    volume: np.ndarray, thresholds: Sequence[float] = (0.1, 0.3), percentiles: Sequence[float] = (1.0, 99.9)
) -> float:
    """Share of the structure's voxels that are bright: ``occupancy(high) / occupancy(low)`` for
    ``thresholds = (low, high)`` (scale-free; lower when many structures are dim).

    It grows with the low end of the phantoms' intensity range for both phantom families (the median
    of the structure, tried first, did not for filaments); ``docs/user_guide.md`` gives the accuracy
    of the match.

    Args:
        volume: ``(Z, Y, X)`` stack in any units.
        thresholds: ``(low, high)`` fractions of the way from background to bright level.
        percentiles: ``(low, high)`` in [0, 100]: background and bright level.

    Returns:
        a value in [0, 1]; 0 for a constant volume or one without structure.
    """
    lo, hi = (float(t) for t in thresholds)
    if not 0 <= lo < hi < 1:
        raise ValueError(f"thresholds must satisfy 0 <= low < high < 1, got {tuple(thresholds)}")
    base = occupancy(volume, lo, percentiles)
    return occupancy(volume, hi, percentiles) / base if base > 0 else 0.0


def _match(
    statistic: Callable[[np.ndarray], float],
    blurred: Sequence[np.ndarray],
    psf: np.ndarray,
    render: Callable[[float, int], np.ndarray],
    values: Sequence[float],
    renders: int,
) -> tuple[float, float, list[list[float]], bool]:
    """The value (interpolated in log) whose blurred renders have the stacks' median ``statistic``,
    assumed to grow with the value; returns ``(value, target, table, clipped)``."""
    from bundle.physics.forward import blur

    target = float(np.median([statistic(v) for v in blurred]))
    table = [
        (float(m), float(np.mean([statistic(blur(render(float(m), i), psf)) for i in range(int(renders))])))
        for m in sorted(values)
    ]
    stat = np.maximum.accumulate([o for _, o in table])  # guard against render-to-render noise
    logs = [math.log(m) for m, _ in table]
    clipped = not stat[0] <= target <= stat[-1]
    if target <= stat[0]:
        chosen = table[0][0]
    elif target >= stat[-1]:
        chosen = table[-1][0]
    else:
        chosen = float(math.exp(np.interp(target, stat, logs)))
    return chosen, target, [list(t) for t in table], clipped


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
    if not blurred:
        raise ValueError("match_density needs at least one blurred stack")
    chosen, target, table, clipped = _match(
        lambda v: occupancy(v, threshold), blurred, psf, render, multipliers, renders
    )
    return {"multiplier": chosen, "target": target, "table": table, "clipped": clipped}


def match_brightness(
    blurred: Sequence[np.ndarray],
    psf: np.ndarray,
    render: Callable[[float, int], np.ndarray],
    lows: Sequence[float] = INTENSITY_LOWS,
    thresholds: Sequence[float] = (0.1, 0.3),
    renders: int = 3,
) -> dict[str, object]:
    """The low end of the phantoms' intensity range whose blurred phantoms have the stacks' brightness spread.

    Args:
        blurred: the user's ``(Z, Y, X)`` stacks.
        psf: ``(Z, Y, X)`` PSF (sum 1) of the optics, at the stacks' voxel size.
        render: ``render(low, i)`` → the ``i``-th sharp ``(Z, Y, X)`` phantom (its own seed, the same for
            every ``low``) with structure intensities drawn in ``(low, 1)``.
        lows: low ends tried, in (0, 1].
        thresholds: see :func:`brightness_spread`.
        renders: phantoms per value, averaged.

    Returns:
        ``{"low": float, "target": stacks' median spread, "table": [[low, spread], ...], "clipped": bool}``.
    """
    if not blurred:
        raise ValueError("match_brightness needs at least one blurred stack")
    chosen, target, table, clipped = _match(
        lambda v: brightness_spread(v, thresholds), blurred, psf, render, lows, renders
    )
    return {"low": chosen, "target": target, "table": table, "clipped": clipped}
