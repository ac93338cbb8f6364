"""The optimisers' parameter groups of the cycleGAN: G and h (the PSF with its own learning rate), the discriminators."""

from __future__ import annotations

from typing import Any

import torch


def generator_param_groups(
    g_deblur: torch.nn.Module,
    blur: torch.nn.Module,
    lr: float = 1e-4,
    psf_lr: float | None = None,
    scale_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of G and h: the PSF parameters get their own learning rate.

    A parametric PSF has a handful of physical parameters (NA, ...) that move far per unit gradient
    compared with network weights; the trials used 2e-2 for them against 1e-3 for the networks.

    Args:
        g_deblur: G.
        blur: h — a ``PSFLayer`` (with ``kernel_parameters()``/``scale_parameters()``) or any module
            (the conventional cycleGAN's second U-Net), which then shares ``lr``.
        lr: learning rate of G (and of a network ``blur``).
        psf_lr: learning rate of the PSF kernel parameters (default ``lr``).
        scale_lr: learning rate of the blur path's gain and offset (default ``lr``).
    """
    groups: list[dict[str, Any]] = [{"params": [p for p in g_deblur.parameters() if p.requires_grad], "lr": lr}]
    if hasattr(blur, "kernel_parameters") and hasattr(blur, "scale_parameters"):
        kernel = [p for p in blur.kernel_parameters() if p.requires_grad]
        scale = [p for p in blur.scale_parameters() if p.requires_grad]
        groups.append({"params": kernel, "lr": lr if psf_lr is None else psf_lr})
        groups.append({"params": scale, "lr": lr if scale_lr is None else scale_lr})
    else:
        groups.append({"params": [p for p in blur.parameters() if p.requires_grad], "lr": lr})
    return [g for g in groups if g["params"]]


def discriminator_parameters(*discriminators: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """Parameters of the given discriminators, skipping ``None`` (non-blind mode has no ``d_blurred``)."""
    return [p for d in discriminators if d is not None for p in d.parameters()]
