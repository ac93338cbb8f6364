"""The vectorial high-NA PSF with learnable optics (NA, wavelength, spherical aberration, ...) and an
optional residual kernel: a kernel for :class:`bundle.networks.PSFLayer`, rendered by
:func:`bundle.physics.pupil.vectorial_psf_torch`."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bundle.networks.kernels._scalar import register_scalar, residual_logits
from bundle.physics.optics import _check_optics, _check_shape, _check_voxel_size
from bundle.physics.pupil import _NA_CAP, vectorial_psf_torch  # _NA_CAP: largest NA / n of a learned NA

__all__ = ["VectorialPSFKernel", "VECTORIAL_LEARNABLE"]

VECTORIAL_LEARNABLE = ("na", "wavelength", "spherical", "secondary_spherical", "defocus", "depth")
logger = logging.getLogger(__name__)


class VectorialPSFKernel(nn.Module):
    """Learnable vectorial PSF: ``forward()`` renders :func:`vectorial_psf_torch` from constrained parameters.

    A blind PSF layer built on the scalar paraxial model fits a wrong NA to data blurred by a
    high-NA microscope (see :mod:`bundle.physics.pupil`); this kernel is the vectorial model with
    a handful of physical parameters, each kept in its valid range by its parameterisation:

    - ``na = lower + (upper − lower) · sigmoid(na_raw)`` with ``(lower, upper) = na_bounds`` (an
      upper bound of ``n_immersion`` is taken as ``0.9999 n_immersion``, so that a saturated
      sigmoid cannot reach the 90° aperture);
    - ``wavelength = exp(wavelength_raw)`` (µm);
    - ``spherical = aberration_bound · tanh(spherical_raw)`` (waves rms of Z11), likewise
      ``secondary_spherical`` (Z22);
    - ``defocus = defocus_raw`` (µm);
    - ``depth = depth_raw`` (µm below the coverslip; needs ``n_sample``): the Gibson-Lanni index-mismatch
      aberration, focus kept at the centre voxel (:func:`vectorial_psf_torch`); at the true optics it
      matches ``psfmodels`` to 0.998, the Zernike terms 0.990 at best, at a wrong NA (``docs/results.md``).

    Parameters named in ``learn`` are ``nn.Parameter`` s, the others buffers (all in the state dict).

    Optional residual: with ``residual=True`` the rendered PSF is convolved with a small
    non-negative unit-sum kernel ``q = softmax(residual_logits)`` (``residual_size``, odd), which
    starts as the identity up to ``residual_floor`` of its mass and can absorb blur the optical
    model lacks (e.g. scattering, detector cross-talk). It is frozen until :meth:`release_residual`:
    before that it is skipped, so it has no effect and receives no gradient (``grad`` stays
    ``None``: an optimizer built over all parameters leaves it untouched, and moves it once it is
    released). Under DDP such an unused parameter needs ``find_unused_parameters=True`` until the
    residual is released.

    Args:
        shape: kernel size ``(Z, Y, X)`` in voxels.
        na: initial numerical aperture, inside ``na_bounds``.
        n_immersion: immersion (= sample) refractive index (fixed).
        wavelength: initial emission wavelength, µm.
        voxel_size: ``(z, y, x)`` µm of the volumes the kernel is applied to.
        spherical: initial primary spherical aberration (Z11), waves rms.
        secondary_spherical: initial secondary spherical aberration (Z22), waves rms.
        defocus: initial focus offset from the centre voxel, µm.
        depth: initial source depth below the coverslip, µm (the index-mismatch aberration;
            needs ``n_sample`` when non-zero or learned; ``depth_raw`` exists only then).
        learn: names of the learned parameters, from ``"na"``, ``"wavelength"``, ``"spherical"``,
            ``"secondary_spherical"``, ``"defocus"``, ``"depth"``.
        na_bounds: ``(lower, upper)`` of the NA; default ``(0.1, n_immersion)``;
            ``0 < lower < na < upper <= n_immersion``.
        aberration_bound: largest magnitude of the spherical coefficients, waves rms.
        residual: add the residual kernel (frozen until :meth:`release_residual`).
        residual_size: ``(z, y, x)`` size of the residual kernel, odd.
        residual_floor: initial mass of the residual kernel outside its centre voxel.
        oversample: sub-pixel samples per lateral axis (see :func:`vectorial_psf_torch`).
        n_theta: θ quadrature nodes (``None``: automatic).
        n_sample: refractive index of the sample (mounting medium), when known. Rays beyond the
            sample's critical angle never leave it, so the effective NA of a fluorophore below the
            coverslip is at most ``n_sample`` (the upper NA bound becomes ``0.9999 n_sample``; an initial
            NA above it starts at ``0.99`` of the bound; what the cap changes for the spectral fit:
            ``docs/results.md``). ``None``: no cap beyond ``n_immersion``.

    Example::

        >>> kernel = VectorialPSFKernel((31, 31, 31), na=1.2, n_immersion=1.515, wavelength=0.52)
        >>> h = kernel()  # (31, 31, 31), sum 1, differentiable w.r.t. kernel.na_raw, kernel.spherical_raw
        >>> blur = PSFLayer(kernel)  # bundle.networks.PSFLayer

    In a config: ``"kernel": {"_target_": "bundle.networks.kernels.VectorialPSFKernel", "shape": ..., ...}``.
    """

    parameterization = "vectorial"

    def __init__(
        self,
        shape: Sequence[int] = (31, 31, 31),
        na: float = 1.4,
        n_immersion: float = 1.5,
        wavelength: float = 0.5,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        spherical: float = 0.0,
        secondary_spherical: float = 0.0,
        defocus: float = 0.0,
        depth: float = 0.0,
        learn: Sequence[str] | str = ("na", "spherical"),
        na_bounds: Sequence[float] | None = None,
        aberration_bound: float = 2.0,
        residual: bool = False,
        residual_size: Sequence[int] = (3, 3, 3),
        residual_floor: float = 1e-4,
        oversample: int = 3,
        n_theta: int | None = None,
        n_sample: float | None = None,
    ) -> None:
        super().__init__()
        self.shape = _check_shape(shape)
        self.voxel_size = _check_voxel_size(voxel_size)
        _check_optics(na, n_immersion, wavelength)
        learn = (learn,) if isinstance(learn, str) else tuple(learn)
        unknown = [name for name in learn if name not in VECTORIAL_LEARNABLE]
        if unknown:
            raise ValueError(f"learn: unknown parameter(s) {unknown}; choose from {VECTORIAL_LEARNABLE}")
        bounds = (0.1, float(n_immersion)) if na_bounds is None else tuple(float(b) for b in na_bounds)
        if len(bounds) != 2:
            raise ValueError(f"na_bounds must be (lower, upper), got {na_bounds}")
        lower, upper = bounds
        if upper <= float(n_immersion):  # keep NA / n below 1 even when the sigmoid saturates
            upper = min(upper, _NA_CAP * float(n_immersion))
        if n_sample is not None:
            if not 0.0 < float(n_sample) <= float(n_immersion) * 2:
                raise ValueError(f"n_sample must be a refractive index (> 0), got {n_sample}")
            if float(n_sample) < upper:  # light beyond the sample's critical angle never leaves it
                upper = _NA_CAP * float(n_sample)
                if float(na) >= upper:
                    logger.info(
                        f"initial NA {na} is above the sample's refractive index {n_sample}: starting at "
                        f"the effective NA {0.99 * upper:.4f}"
                    )
                    na = 0.99 * upper
        if not 0.0 < lower < float(na) < upper <= float(n_immersion):
            raise ValueError(
                f"need 0 < na_bounds[0] < na < na_bounds[1] <= n_immersion, got bounds ({lower}, {upper}), "
                f"na {na}, n_immersion {n_immersion}"
            )
        if not aberration_bound > 0:
            raise ValueError(f"aberration_bound must be positive (waves), got {aberration_bound}")
        for name, value in (("spherical", spherical), ("secondary_spherical", secondary_spherical)):
            if not abs(float(value)) < aberration_bound:
                raise ValueError(f"|{name}| must be below aberration_bound {aberration_bound}, got {value}")
        if not math.isfinite(float(defocus)):
            raise ValueError(f"defocus must be finite, got {defocus}")
        self.uses_depth = float(depth) != 0.0 or "depth" in learn
        if self.uses_depth and n_sample is None:
            raise ValueError("depth (the index-mismatch aberration) needs n_sample, the sample's index")
        self.n_sample = None if n_sample is None else float(n_sample)
        if int(oversample) < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.n_immersion = float(n_immersion)
        self.na_bounds = (lower, upper)
        self.aberration_bound = float(aberration_bound)
        self.learn = learn
        self.oversample = int(oversample)
        self.n_theta = None if n_theta is None else int(n_theta)

        fraction = (float(na) - lower) / (upper - lower)
        register_scalar(self, "na_raw", math.log(fraction / (1.0 - fraction)), "na" in learn)
        register_scalar(self, "wavelength_raw", math.log(float(wavelength)), "wavelength" in learn)
        register_scalar(self, "spherical_raw", math.atanh(float(spherical) / aberration_bound), "spherical" in learn)
        secondary = math.atanh(float(secondary_spherical) / aberration_bound)
        register_scalar(self, "secondary_spherical_raw", secondary, "secondary_spherical" in learn)
        register_scalar(self, "defocus_raw", float(defocus), "defocus" in learn)
        if self.uses_depth:  # only then: checkpoints of kernels without it still load
            register_scalar(self, "depth_raw", float(depth), "depth" in learn)

        self.residual_size: tuple[int, int, int] | None = None
        if residual:
            self.residual_size = residual_logits(self, residual_size, residual_floor)  # type: ignore[assignment]

    # ------------------------------------------------------------------------------------------
    @property
    def na(self) -> torch.Tensor:
        """Numerical aperture, a 0-dim tensor inside ``na_bounds``."""
        lower, upper = self.na_bounds
        return lower + (upper - lower) * torch.sigmoid(self.na_raw)

    @property
    def wavelength(self) -> torch.Tensor:
        """Emission wavelength, µm."""
        return torch.exp(self.wavelength_raw)

    @property
    def spherical(self) -> torch.Tensor:
        """Primary spherical aberration (Z11), waves rms."""
        return self.aberration_bound * torch.tanh(self.spherical_raw)

    @property
    def secondary_spherical(self) -> torch.Tensor:
        """Secondary spherical aberration (Z22), waves rms."""
        return self.aberration_bound * torch.tanh(self.secondary_spherical_raw)

    @property
    def defocus(self) -> torch.Tensor:
        """Focus offset from the centre voxel, µm."""
        return self.defocus_raw

    @property
    def depth(self) -> torch.Tensor:
        """Source depth below the coverslip, µm (0 without ``n_sample``)."""
        return self.depth_raw if self.uses_depth else torch.zeros((), device=self.na_raw.device)

    @property
    def released(self) -> bool:
        """Whether the residual kernel is in use (always False without one)."""
        return self.residual_size is not None and bool(self.residual_released)

    def release_residual(self) -> VectorialPSFKernel:
        """Start using (and training) the residual kernel; returns ``self``."""
        if self.residual_size is None:
            raise RuntimeError("this kernel has no residual: build it with residual=True")
        self.residual_released.fill_(1)
        return self

    def residual_kernel(self) -> torch.Tensor:
        """The residual kernel ``q``: ``residual_size`` tensor, non-negative, sum 1."""
        if self.residual_size is None:
            raise RuntimeError("this kernel has no residual: build it with residual=True")
        return torch.softmax(self.residual_logits.flatten(), dim=0).reshape(self.residual_size)

    def optical_kernel(self) -> torch.Tensor:
        """The vectorial PSF of the current parameters, without the residual: ``(Z, Y, X)``, sum 1."""
        return vectorial_psf_torch(
            self.shape,
            self.na,
            self.n_immersion,
            self.wavelength,
            self.voxel_size,
            zernike={11: self.spherical, 22: self.secondary_spherical},
            defocus=self.defocus,
            **({"depth": self.depth, "n_sample": self.n_sample} if self.uses_depth else {}),
            oversample=self.oversample,
            n_theta=self.n_theta,
            device=self.na_raw.device,
            dtype=self.na_raw.dtype,
        )

    def forward(self) -> torch.Tensor:
        """Render the kernel.

        Returns:
            ``(Z, Y, X)`` tensor, non-negative, sum 1, focus at ``s // 2`` (for zero defocus and
            aberrations), differentiable w.r.t. the learned parameters.
        """
        h = self.optical_kernel()
        if not self.released:
            return h
        q = self.residual_kernel().to(h.dtype).flip(0, 1, 2)  # conv3d correlates: flip to convolve
        pad = [s // 2 for s in self.residual_size]  # type: ignore[union-attr]
        out = F.conv3d(h[None, None], q[None, None], padding=pad)[0, 0]
        return out / out.sum()

    @torch.no_grad()
    def set_na_(self, na: float) -> VectorialPSFKernel:
        """Set the numerical aperture in place (inside ``na_bounds``); returns ``self``."""
        lower, upper = self.na_bounds
        if not lower < na < upper:
            raise ValueError(f"na must be inside na_bounds ({lower}, {upper}), got {na}")
        fraction = (float(na) - lower) / (upper - lower)
        self.na_raw.fill_(math.log(fraction / (1.0 - fraction)))
        return self

    @torch.no_grad()
    def mirror_z_(self) -> VectorialPSFKernel:
        """Mirror the kernel along z in place; returns ``self``.

        Mirroring the PSF in z conjugates the pupil's phase, so it negates every aberration and the
        defocus (exact for this model); the residual kernel, if any, is flipped in z. Used to pick
        the sign of the aberrations that a power spectrum cannot see
        (:class:`~bundle.physics.psf_estimation.SpectralPSFFit`).
        """
        names = ("spherical_raw", "secondary_spherical_raw", "defocus_raw", "depth_raw")
        for name in names[: 3 + self.uses_depth]:
            getattr(self, name).neg_()
        if self.residual_size is not None:
            self.residual_logits.copy_(self.residual_logits.flip(0))
        return self

    def physical_parameters(self) -> dict[str, float]:
        """Current ``na``, ``wavelength`` (µm), ``spherical``, ``secondary_spherical`` (waves rms),
        ``defocus``, ``depth`` (µm) and, with a residual, ``residual_centre`` (its centre weight;
        1 = identity), as plain floats."""
        out = {name: float(getattr(self, name).detach().cpu()) for name in VECTORIAL_LEARNABLE}
        if self.residual_size is not None:
            centre = tuple(s // 2 for s in self.residual_size)
            out["residual_centre"] = float(self.residual_kernel().detach()[centre].cpu())
        return out

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, voxel_size={self.voxel_size}, n_immersion={self.n_immersion}, "
            f"learn={self.learn}, na_bounds={self.na_bounds}, residual_size={self.residual_size}"
        )
