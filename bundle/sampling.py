"""Where training crops are drawn: foreground-weighted crop centres with a floor of background crops.

Sparse fluorescence volumes are mostly background (on the simulated microtubules ~25 % of 32³ crops
are nearly empty, the median crop 0.7 % foreground), so with uniform crops the L1 cycle loss is
dominated by dark voxels and the generator learns "predict background" first. MONAI's
``RandWeightedCropd`` draws crop centres in proportion to a weight map; :class:`ForegroundWeightd`
makes that map from the image itself (MONAI has no transform for an intensity-proportional map with a
guaranteed background share).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import GaussianSmooth, MapTransform

__all__ = ["CROP_WEIGHT_KEY", "ForegroundWeightd", "crop_share"]

CROP_WEIGHT_KEY = "crop_weight"  # where the crop-centre map lives in an item, for ``RandWeightedCropd(w_key=...)``


def crop_share(background_share: float | str | None) -> float | None:
    """The share of uniformly drawn crop centres as the pipelines take it: ``None`` for the paper's
    uniform crops, else a float in [0, 1).

    ``None`` and 1 both mean uniform crops. 1 is the spelling for the command line, where MONAI's
    ``run`` drops an override whose value is ``None`` (``--background_share None`` would silently
    keep the config's value). A string holding a number is read as that number.

    Raises:
        ValueError: not a number in [0, 1].
    """
    if background_share is None:
        return None
    try:
        share = float(background_share)
    except (TypeError, ValueError):
        raise ValueError(f"background_share must be a number in [0, 1] or null, got {background_share!r}") from None
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"background_share must be a number in [0, 1] (1: uniform crops), got {background_share!r}")
    return None if share == 1.0 else share


class ForegroundWeightd(MapTransform):
    """Add a crop-centre weight map: a smoothed intensity share plus a uniform background share.

    ``w = (1 − b) · s / Σ s + b / N`` with ``s`` the image smoothed by a Gaussian of ``sigma`` voxels,
    less its median (``subtract_background``), clipped at 0, and ``N`` its voxel count, so a share ``b``
    of the crop centres is uniform (the discriminators and the cycle still see background) and the rest
    is drawn where the signal is. An empty image gets a uniform map.

    The median is the background level of a sparse stack: a widefield stack's out-of-focus haze and
    camera offset would otherwise spread its intensity-proportional crops over background, so that its
    crops held less structure than the sharp domain's (whose median is ~0) and the sharp discriminator
    could tell ``G(y)`` from real sharp crops by how much structure they hold rather than how it looks.
    On the simulated vesicles (20 dB, 32³ crops) the blurred crops' true foreground share went from
    0.84 of the sharp crops' to 0.91 with the median removed.

    Args:
        keys: the image key (one key; the map is computed from its first channel).
        weight_key: key of the output map ``(1, D, H, W)``, for ``RandWeightedCropd(w_key=...)``.
        background_share: ``b`` in [0, 1]; 1 gives uniform crops.
        sigma: smoothing in voxels (a centre next to a filament counts as foreground).
        subtract_background: subtract the smoothed image's median before the map is made.
        allow_missing_keys: as ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        weight_key: str = CROP_WEIGHT_KEY,
        background_share: float = 0.25,
        sigma: float = 2.0,
        subtract_background: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= background_share <= 1.0:
            raise ValueError(f"background_share must be in [0, 1], got {background_share}")
        self.weight_key = weight_key
        self.background_share = float(background_share)
        self.smooth = GaussianSmooth(sigma=float(sigma)) if sigma > 0 else None
        self.subtract_background = bool(subtract_background)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).float()[:1]
            s = self.smooth(img) if self.smooth is not None else img
            s = torch.as_tensor(s)
            if self.subtract_background:
                s = s - s.median()
            s = s.clamp_min(0.0)
            total = float(s.sum())
            uniform = torch.full_like(s, 1.0 / s.numel())
            if total <= 0.0:
                d[self.weight_key] = uniform
            else:
                b = self.background_share
                d[self.weight_key] = (1.0 - b) * s / total + b * uniform
        return d


def foreground_fraction(crops: Sequence[torch.Tensor], threshold: float = 0.1) -> float:
    """Mean share of voxels above ``threshold`` in a list of crops (to compare crop samplers)."""
    return float(torch.stack([(torch.as_tensor(c) > threshold).float().mean() for c in crops]).mean())
