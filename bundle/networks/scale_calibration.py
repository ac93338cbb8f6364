"""The blur path's gain and offset set once from unpaired samples of the two domains."""

from __future__ import annotations

import math

import numpy as np
import torch

from bundle.ops import fft_convolve

__all__ = ["calibrate_gain_offset"]


@torch.no_grad()
def calibrate_gain_offset(
    layer: torch.nn.Module,
    sharp: torch.Tensor,
    blurred: torch.Tensor,
    low_percentile: float = 1.0,
    high_percentile: float = 99.9,
    statistic: str = "percentile",
) -> dict[str, float]:
    """Initialise ``offset`` and ``gain`` so that ``gain · (h * x) + offset`` matches the blurred domain.

    ``offset`` = the low percentile of the blurred samples (the background), and ``gain`` =
    (high percentile of the blurred samples − offset) / (high percentile of ``h * sharp``), or with
    ``statistic="mean"``: (mean of the blurred samples − offset) / mean of ``h * sharp`` (the total
    light: unbiased by noise, which raises the blurred domain's top percentiles, when both domains
    hold the same density of structure; use it with one intensity scale per domain).

    Why: both domains are normalised by their own percentiles, but blurring a thin filament
    spreads its intensity over the PSF and lowers its peak ~20×. A unit-sum kernel maps a
    sharp volume in [0, 1] to a blurred one peaking near 0.05, while the blurred training data
    peak near 1 over a background offset: ``y = h * x`` cannot hold, the y-cycle loss
    ``‖y − h * G(y)‖`` can only shrink by brightening G(y) everywhere, and the cycleGAN
    collapses (observed: a near-zero output, PSNR below the input's). Matching the intensity
    statistics of the two domains once, then learning gain and offset, removes this.

    Args:
        sharp: ``(B, 1, D, H, W)`` sharp-domain samples x (unpaired with ``blurred``).
        blurred: ``(B, 1, D, H, W)`` blurred-domain samples y (any spatial size).
        low_percentile: percentile of ``blurred`` taken as the background offset.
        high_percentile: percentile used as the bright level of both domains.
        statistic: ``"percentile"`` or ``"mean"`` (see above).

    Returns:
        ``{"gain": float, "offset": float}`` (the new values, also written into ``layer``).
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            f"need 0 <= low_percentile < high_percentile <= 100, got {low_percentile}, {high_percentile}"
        )
    if statistic not in ("percentile", "mean"):
        raise ValueError(f"statistic must be 'percentile' or 'mean', got {statistic!r}")
    device = layer.gain.device
    h = layer.kernel().detach()
    blurred_sharp = fft_convolve(sharp.to(device=device, dtype=torch.float32), h, pad_mode=layer.pad_mode)
    b = blurred.detach().float().cpu().numpy().ravel()
    hx = blurred_sharp.cpu().numpy().ravel()
    offset = float(np.percentile(b, low_percentile))
    level = "mean" if statistic == "mean" else f"{high_percentile}th percentile"
    if statistic == "mean":
        top_b, top_hx = float(b.mean()), float(hx.mean())
    else:
        top_b = float(np.percentile(b, high_percentile))
        top_hx = float(np.percentile(hx, high_percentile))
    if not top_hx > 0:
        raise ValueError(
            f"the {level} of h * sharp is {top_hx:.3g}: the sharp samples are empty"
        )
    gain = (top_b - offset) / top_hx
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(
            f"calibration gave gain {gain:.3g} (blurred {level} {top_b:.3g} <= "
            f"offset {offset:.3g}): the blurred samples look constant"
        )
    layer.gain.fill_(gain)
    layer.offset.fill_(offset)
    return {"gain": gain, "offset": offset}
