"""The scalar paraxial Born & Wolf PSF (the paper's eq. 23) with learnable optical parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bundle.networks.kernels._scalar import register_scalar
from bundle.physics.born_wolf import born_wolf_psf_torch
from bundle.physics.optics import _check_shape, _check_voxel_size

__all__ = ["BornWolfKernel", "BORN_WOLF_LEARNABLE"]

BORN_WOLF_LEARNABLE = ("na", "wavelength", "axial_scale", "defocus")


class BornWolfKernel(nn.Module):
    """Born & Wolf PSF rendered at each ``forward()`` (≈ms) from constrained parameters.

    - ``na = n_immersion · sigmoid(na_raw)``, so ``0 < na < n_immersion``;
    - ``wavelength = exp(wavelength_raw)`` (µm), ``axial_scale = exp(axial_scale_raw)`` (> 1
      shortens the PSF along z);
    - ``defocus = defocus_raw`` (µm).

    Parameters named in ``learn`` are ``nn.Parameter`` s, the others buffers (all in the state dict).
    The model tops out at 0.934 correlation with a high-NA vectorial PSF; for such optics use
    :class:`~bundle.networks.kernels.VectorialPSFKernel`.

    Args:
        shape: kernel size ``(Z, Y, X)`` in voxels (31³ in the paper's simulation).
        na: initial numerical aperture, ``0 < na < n_immersion``.
        n_immersion: immersion refractive index (fixed).
        wavelength: initial emission wavelength, µm.
        voxel_size: ``(z, y, x)`` µm of the volumes the kernel is applied to.
        axial_scale: initial axial scale, > 0.
        defocus: initial focus offset from the centre voxel, µm.
        learn: names of the learned parameters, from ``"na"``, ``"wavelength"``, ``"axial_scale"``,
            ``"defocus"``.

    Example::

        >>> kernel = BornWolfKernel((31, 31, 31), na=1.0, n_immersion=1.5, wavelength=0.5)
        >>> h = kernel()  # (31, 31, 31), sum 1, differentiable w.r.t. kernel.na_raw
    """

    parameterization = "parametric"

    def __init__(
        self,
        shape: Sequence[int] = (31, 31, 31),
        na: float = 1.4,
        n_immersion: float = 1.5,
        wavelength: float = 0.5,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        axial_scale: float = 1.0,
        defocus: float = 0.0,
        learn: Sequence[str] | str = ("na",),
    ) -> None:
        super().__init__()
        self.shape = _check_shape(shape)
        self.voxel_size = _check_voxel_size(voxel_size)
        learn = (learn,) if isinstance(learn, str) else tuple(learn)
        unknown = [name for name in learn if name not in BORN_WOLF_LEARNABLE]
        if unknown:
            raise ValueError(f"learn: unknown parameter(s) {unknown}; choose from {BORN_WOLF_LEARNABLE}")
        if not n_immersion >= 1.0:
            raise ValueError(f"n_immersion must be a refractive index >= 1, got {n_immersion}")
        if not 0.0 < na < n_immersion:
            raise ValueError(f"na must satisfy 0 < na < n_immersion ({n_immersion}), got na={na}")
        if not wavelength > 0:
            raise ValueError(f"wavelength must be positive (µm), got {wavelength}")
        if not axial_scale > 0:
            raise ValueError(f"axial_scale must be positive, got {axial_scale}")
        if not math.isfinite(float(defocus)):
            raise ValueError(f"defocus must be finite, got {defocus}")
        self.n_immersion = float(n_immersion)
        self.learn = learn
        register_scalar(self, "na_raw", math.log(na / (n_immersion - na)), "na" in learn)
        register_scalar(self, "wavelength_raw", math.log(wavelength), "wavelength" in learn)
        register_scalar(self, "axial_scale_raw", math.log(axial_scale), "axial_scale" in learn)
        register_scalar(self, "defocus_raw", float(defocus), "defocus" in learn)

    @property
    def na(self) -> torch.Tensor:
        """Numerical aperture, a 0-dim tensor in ``(0, n_immersion)``."""
        return self.n_immersion * torch.sigmoid(self.na_raw)

    @property
    def wavelength(self) -> torch.Tensor:
        """Emission wavelength, µm."""
        return torch.exp(self.wavelength_raw)

    @property
    def axial_scale(self) -> torch.Tensor:
        """Axial scale."""
        return torch.exp(self.axial_scale_raw)

    @property
    def defocus(self) -> torch.Tensor:
        """Focus offset from the centre voxel, µm."""
        return self.defocus_raw

    def forward(self) -> torch.Tensor:
        """Render the kernel: ``(Z, Y, X)`` float32, sum 1, differentiable w.r.t. the learned parameters."""
        return born_wolf_psf_torch(
            self.na,
            shape=self.shape,
            voxel_size=self.voxel_size,
            wavelength=self.wavelength,
            n_immersion=self.n_immersion,
            defocus=self.defocus,
            axial_scale=self.axial_scale,
            device=self.na_raw.device,
            dtype=torch.float32,
        )

    @torch.no_grad()
    def set_na_(self, na: float) -> BornWolfKernel:
        """Set the numerical aperture in place; returns ``self``."""
        if not 0.0 < na < self.n_immersion:
            raise ValueError(f"na must be in (0, n_immersion={self.n_immersion}), got {na}")
        self.na_raw.fill_(math.log(na / (self.n_immersion - na)))
        return self

    @torch.no_grad()
    def mirror_z_(self) -> BornWolfKernel:
        """Mirror the kernel along z in place (the model is symmetric about its focus: negate the
        defocus); returns ``self``."""
        self.defocus_raw.neg_()
        return self

    def physical_parameters(self) -> dict[str, float]:
        """Current ``na``, ``wavelength`` (µm), ``axial_scale``, ``defocus`` (µm) as plain floats."""
        return {name: float(getattr(self, name).detach().cpu()) for name in BORN_WOLF_LEARNABLE}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, voxel_size={self.voxel_size}, n_immersion={self.n_immersion}, learn={self.learn}"
