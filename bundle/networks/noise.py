"""Differentiable Poisson–Gaussian noise for the blur path (sharp → blurred) of the cycleGAN."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PoissonGaussianNoise"]


class PoissonGaussianNoise(nn.Module):
    """Add Poisson (shot) + Gaussian (read) noise to a blurred volume, in training mode only.

    The forward model of Lim et al. 2020 (IEEE TCI, "CycleGAN with a Blur Kernel for
    Deconvolution Microscopy") is ``y = h * x + w`` with Gaussian and Poisson noise ``w``. The
    paper lets the learned kernel absorb the noise; here (the paper's stated future work) the noise
    is an explicit module placed after the PSF layer so the kernel can stay physical. Poisson noise
    is replaced by its Gaussian approximation so the module is differentiable (reparameterisation):

        ``y + sqrt(clamp(y, 0) / photons_per_unit) * eps + gaussian_sigma * eps'``,
        ``eps, eps' ~ N(0, 1)``,

    i.e. an intensity of ``y`` corresponds to ``y * photons_per_unit`` detected photons. In eval
    mode (``module.eval()``) it is the identity.

    Args:
        photons_per_unit: photons per unit of intensity (higher = less shot noise); ``None``
            disables the Poisson part.
        gaussian_sigma: standard deviation of the additive Gaussian read noise (intensity units).

    Example::

        >>> noise = PoissonGaussianNoise(photons_per_unit=100.0, gaussian_sigma=0.01)
        >>> y_noisy = noise(torch.rand(2, 1, 16, 16, 16))  # (B, 1, D, H, W), same shape
    """

    def __init__(self, photons_per_unit: float | None = None, gaussian_sigma: float = 0.0) -> None:
        super().__init__()
        if photons_per_unit is not None and not photons_per_unit > 0:
            raise ValueError(f"photons_per_unit must be > 0 or None, got {photons_per_unit}")
        if not gaussian_sigma >= 0:
            raise ValueError(f"gaussian_sigma must be >= 0, got {gaussian_sigma}")
        self.photons_per_unit = None if photons_per_unit is None else float(photons_per_unit)
        self.gaussian_sigma = float(gaussian_sigma)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Args: y: ``(B, C, D, H, W)`` noise-free blurred intensities. Returns: same shape."""
        if not self.training:
            return y
        out = y
        if self.photons_per_unit is not None:
            # clamp away from 0: d sqrt / dy is infinite at 0 (and the clamp's zero gradient times inf is NaN)
            std = torch.sqrt(y.clamp(min=1e-12) / self.photons_per_unit)
            out = out + std * torch.randn_like(y)
        if self.gaussian_sigma > 0:
            out = out + self.gaussian_sigma * torch.randn_like(y)
        return out

    def extra_repr(self) -> str:
        return f"photons_per_unit={self.photons_per_unit}, gaussian_sigma={self.gaussian_sigma}"
