"""Test-time averaging over the symmetries of the XY plane (mirror flips and quarter turns).

A widefield PSF is (nearly) rotationally symmetric about the optical axis, and training crops are
flipped at random, so G applied to a mirrored or turned stack gives the mirrored or turned answer up
to its own errors; those errors differ between the views, and their average is a better estimate
(on the vesicle domain, non-blind, three seeds: +0.2–0.4 dB for G alone, see ``docs/results.md``).
MONAI's ``TestTimeAugmentation`` draws *random* transforms to estimate uncertainty; this is the
deterministic, exactly inverted group average, which it does not offer, hence written here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLIP_CHOICES = (1, 2, 4, 8)
"""Views averaged: 1 the stack as given; 2 and its mirror in X; 4 the mirrors in X, Y and both;
8 those and their transposes in XY (the whole symmetry group of the square)."""

DEFAULT_FLIPS = 8
"""Views averaged by inference unless told otherwise (``inference_flips`` in ``configs/inference.json``)."""


def check_flips(flips: int, name: str = "flips") -> int:
    """``flips`` as an int, or a ``ValueError`` naming the allowed counts."""
    if isinstance(flips, bool) or not isinstance(flips, (int, str)) or str(flips).strip() not in map(str, FLIP_CHOICES):
        raise ValueError(f"{name} must be one of {FLIP_CHOICES} (views averaged at test time), got {flips!r}")
    return int(flips)


def _views(flips: int) -> list[tuple[bool, bool, bool]]:
    """(transpose YX, mirror Y, mirror X) of each view, the identity first."""
    views = [(False, False, False), (False, False, True), (False, True, False), (False, True, True)]
    return (views + [(True, y, x) for _, y, x in views])[:flips]


def _mirror(x: torch.Tensor, flip_y: bool, flip_x: bool) -> torch.Tensor:
    dims = [d for d, on in ((-2, flip_y), (-1, flip_x)) if on]
    return torch.flip(x, dims) if dims else x


def _apply(x: torch.Tensor, transpose: bool, flip_y: bool, flip_x: bool) -> torch.Tensor:
    x = _mirror(x, flip_y, flip_x)
    return x.transpose(-2, -1) if transpose else x


def _undo(y: torch.Tensor, transpose: bool, flip_y: bool, flip_x: bool) -> torch.Tensor:
    return _mirror(y.transpose(-2, -1) if transpose else y, flip_y, flip_x)


def flip_average(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flips: int = DEFAULT_FLIPS) -> torch.Tensor:
    """Mean of ``run`` over ``flips`` mirrored/transposed views of ``x``, each mapped back.

    Args:
        run: a shape-preserving map of ``(B, C, D, H, W)`` tensors (a :class:`Deconvolver`'s windows).
        x: ``(B, C, D, H, W)``; with ``flips == 8`` H and W swap in half of the views.
        flips: one of :data:`FLIP_CHOICES`; 1 calls ``run(x)`` once.

    Returns:
        ``(B, C, D, H, W)``, ``run``'s dtype and device.
    """
    flips = check_flips(flips)
    if flips == 1:
        return run(x)
    total = None
    for view in _views(flips):
        y = _undo(run(_apply(x, *view).contiguous()), *view)
        total = y.float() if total is None else total + y.float()  # out of place: y may be an inference tensor
    return total / flips
