"""Differentiable Poisson–Gaussian noise for the blur path (sharp → blurred) of the cycleGAN."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PoissonGaussianNoise", "Recorruption"]


class PoissonGaussianNoise(nn.Module):
    """Add Poisson (shot) + Gaussian (read) noise to a blurred volume, in training mode only.

    The forward model of Lim et al. 2020 (IEEE TCI, "CycleGAN with a Blur Kernel for
    Deconvolution Microscopy") is ``y = h * x + w`` with Gaussian and Poisson noise ``w``. The
    paper lets the learned kernel absorb the noise; here (the paper's stated future work) the noise
    is an explicit module placed after the PSF layer so the kernel can stay physical, and the sharp
    cycle ``x → h*x + w → G(h*x + w)`` shows G the noise it meets at inference. Poisson noise is
    replaced by its Gaussian approximation so the module is differentiable (reparameterisation):

        ``y + sqrt(clamp(y − black_level, 0) / photons_per_unit + gaussian_sigma²) · eps``,
        ``eps ~ N(0, 1)``,

    i.e. an intensity of ``y`` above ``black_level`` corresponds to ``(y − black_level) ·
    photons_per_unit`` detected photons. The three parameters are buffers (saved in checkpoints) and
    can be set from data with :meth:`set_parameters` (``bundle.handlers.BlurCalibration`` does, from
    :func:`bundle.physics.noise_estimation.estimate_poisson_gaussian`). In eval mode it is the identity.

    Args:
        photons_per_unit: photons per unit of intensity (higher = less shot noise); ``None``
            disables the Poisson part.
        gaussian_sigma: standard deviation of the additive Gaussian read noise (intensity units).
        black_level: intensity without shot noise (a camera offset left after normalisation).
        scale: factor on the added noise's standard deviation (1: the set level; < 1 trains G on
            less noise than the stacks have). A training knob, not part of the noise model: it is not
            saved in checkpoints, :meth:`variance` and :meth:`set_parameters` ignore it.

    Example::

        >>> noise = PoissonGaussianNoise(photons_per_unit=100.0, gaussian_sigma=0.01)
        >>> y_noisy = noise(torch.rand(2, 1, 16, 16, 16))  # (B, 1, D, H, W), same shape
    """

    def __init__(
        self,
        photons_per_unit: float | None = None,
        gaussian_sigma: float = 0.0,
        black_level: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, got {scale}")
        self.scale = float(scale)
        self.register_buffer("inv_photons", torch.tensor(0.0))
        self.register_buffer("sigma", torch.tensor(0.0))
        self.register_buffer("black", torch.tensor(0.0))
        self.set_parameters(photons_per_unit, gaussian_sigma, black_level)

    def set_parameters(
        self, photons_per_unit: float | None = None, gaussian_sigma: float = 0.0, black_level: float = 0.0
    ) -> None:
        """Set the noise level (``photons_per_unit`` ``None`` or ``inf``: no shot noise)."""
        if photons_per_unit is not None and not photons_per_unit > 0:
            raise ValueError(f"photons_per_unit must be > 0 or None, got {photons_per_unit}")
        if not gaussian_sigma >= 0:
            raise ValueError(f"gaussian_sigma must be >= 0, got {gaussian_sigma}")
        if not math.isfinite(black_level):
            raise ValueError(f"black_level must be finite, got {black_level}")
        inv = 0.0 if photons_per_unit is None or math.isinf(photons_per_unit) else 1.0 / float(photons_per_unit)
        self.inv_photons.fill_(inv)
        self.sigma.fill_(float(gaussian_sigma))
        self.black.fill_(float(black_level))

    @property
    def photons_per_unit(self) -> float | None:
        inv = float(self.inv_photons)
        return None if inv == 0.0 else 1.0 / inv

    @property
    def gaussian_sigma(self) -> float:
        return float(self.sigma)

    @property
    def black_level(self) -> float:
        return float(self.black)

    def parameters_dict(self) -> dict[str, float | None]:
        """The current noise level, for logs and reports."""
        return {
            "photons_per_unit": self.photons_per_unit,
            "gaussian_sigma": self.gaussian_sigma,
            "black_level": self.black_level,
        }

    def variance(self, y: torch.Tensor) -> torch.Tensor:
        """The noise variance at noise-free intensities ``y`` (any shape): ``clamp(y − black, 0) /
        photons_per_unit + gaussian_sigma²`` (in any mode)."""
        return (y - self.black).clamp(min=0.0) * self.inv_photons + self.sigma**2

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Args: y: ``(B, C, D, H, W)`` noise-free blurred intensities. Returns: same shape."""
        silent = float(self.inv_photons) == 0.0 and float(self.sigma) == 0.0
        if not self.training or self.scale == 0.0 or silent:
            return y
        # clamp away from 0: d sqrt / dy is infinite at 0 (and the clamp's zero gradient times inf is NaN)
        return y + self.scale * torch.sqrt(self.variance(y).clamp(min=1e-12)) * torch.randn_like(y)

    def extra_repr(self) -> str:
        return (
            f"photons_per_unit={self.photons_per_unit}, gaussian_sigma={self.gaussian_sigma}, "
            f"black_level={self.black_level}, scale={self.scale}"
        )


class Recorruption(nn.Module):
    """Two copies of a noisy blurred crop whose noises are independent: the blurred cycle without noise fitting.

    The blurred cycle ``‖y − h*G(y)‖`` compares ``h*G(y)`` with a *noisy* stack, so its minimum asks G to
    explain the noise of ``y`` within the PSF's pass band. Recorrupted-to-recorrupted training (Pang et
    al., CVPR 2021) draws ``z`` with the noise's variance and splits ``y`` into

        input ``y + alpha · z`` and target ``y − z / alpha``,

    whose noises are uncorrelated (``Cov = σ² − σ² = 0``; independent for Gaussian noise). A squared-error
    cycle ``‖(y − z/α) − h*G(y + αz)‖²`` then equals, in expectation, ``‖h*s − h*G(y + αz)‖²`` plus a
    constant (``s`` the noise-free stack): an unbiased data term with no noise to fit. G sees a slightly
    noisier input (variance ``(1 + α²) σ²``) in that cycle. ``σ²`` comes from the blur path's calibrated
    noise model at the crop's local mean (a ``smooth``³ box). Written here: MONAI has no recorruption.

    Args:
        noise: the blur path's noise module (``PoissonGaussianNoise``; its ``variance(v)``).
        alpha: the split (0.5 in the paper; smaller: input closer to ``y``, target noisier).
        smooth: side of the box whose mean estimates the noise-free intensity (1: the voxel itself).

    Example::

        >>> y_in, y_target = Recorruption(noise=blur_noise, alpha=0.5)(y)  # (B, 1, D, H, W) each
        >>> loss = ((blur(g_deblur(y_in)) - y_target) ** 2).mean()
    """

    def __init__(self, noise: nn.Module, alpha: float = 0.5, smooth: int = 3) -> None:
        super().__init__()
        if not callable(getattr(noise, "variance", None)):
            raise TypeError(f"noise must have a variance(v) method (PoissonGaussianNoise), got {type(noise).__name__}")
        if not 0 < float(alpha) <= 1 or int(smooth) < 1 or int(smooth) % 2 == 0:
            raise ValueError(f"alpha must be in (0, 1] and smooth an odd number >= 1, got alpha={alpha}, smooth={smooth}")
        self.noise, self.alpha, self.smooth = noise, float(alpha), int(smooth)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: y: ``(B, C, D, H, W)`` noisy blurred crops. Returns: ``(input, target)``, each like ``y``."""
        with torch.no_grad():
            k = self.smooth
            mean = nn.functional.avg_pool3d(y, k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else y
            z = torch.sqrt(self.noise.variance(mean).clamp(min=0.0)) * torch.randn_like(y)
        return y + self.alpha * z, y - z / self.alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, smooth={self.smooth}"
