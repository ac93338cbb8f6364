"""The blur generator h (sharp → blurred): a learnable 3D PSF applied by FFT, with gain and offset."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bundle.ops import fast_fft_shape, fft_convolve

__all__ = ["PSFLayer", "PARAMETERIZATIONS", "INITS"]

PARAMETERIZATIONS = ("free", "constrained", "parametric", "fixed")
INITS = ("gaussian", "born_wolf", "vectorial", "file")


def _center_crop_or_pad(psf: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Crop or zero-pad each axis about its centre voxel ``n // 2``, which lands at ``k // 2``."""
    out = psf
    for axis, k in enumerate(shape):
        n = out.shape[axis]
        if n > k:
            start = n // 2 - k // 2
            out = np.take(out, np.arange(start, start + k), axis=axis)
        elif n < k:
            before = k // 2 - n // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, k - n - before)
            out = np.pad(out, pad)
    return out


def _load_psf_file(path: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """``(Z, Y, X)`` float array and its voxel size (µm) or None."""
    try:
        from bundle.io import load_volume
    except ImportError:  # bundle.io not available: plain tifffile
        import tifffile

        return np.asarray(tifffile.imread(path), dtype=np.float32), None
    volume, meta = load_volume(path, dtype=np.float32)
    vs = meta.get("voxel_size")
    return volume, (tuple(float(v) for v in vs) if vs is not None else None)


class PSFLayer(nn.Module):
    """The linear blur generator h of Lim et al. 2020, applied by FFT: ``gain · (h * x) + offset``.

    In "CycleGAN with a Blur Kernel for Deconvolution Microscopy" (Lim et al., IEEE TCI 2020) the
    sharp → blurred generator is a single 3D convolution whose weights are the PSF (31³ in
    simulation). Here the same linear operator is applied by FFT (:func:`bundle.ops.fft_convolve`,
    true convolution with the kernel's centre at ``k // 2``, identical to ``conv3d`` with the
    flipped kernel), and the kernel can be parameterised four ways:

    - ``"free"``: raw weights, as in the paper (may go negative and need not sum to one);
    - ``"constrained"``: a softmax over log-weights, so the kernel is non-negative and sums to one
      by construction (the paper's unspecified regulariser Q(h));
    - ``"parametric"``: a scalar paraxial Born & Wolf PSF (the paper's eq. 23, via
      :func:`bundle.physics.psf.born_wolf_psf_torch`) with a learned NA (kept in
      ``(0, n_immersion)`` by ``na = n_immersion · sigmoid(θ)``) and optionally learned wavelength,
      axial scale and defocus; recomputed (≈ms) at each forward;
    - ``"fixed"``: a non-trainable buffer (the paper's non-blind mode);
    - a kernel module (``kernel=``, which replaces ``parameterization``): any ``nn.Module`` whose
      ``forward()`` returns the ``(Z, Y, X)`` kernel, e.g. the vectorial high-NA model with a learned
      NA and spherical aberration (:class:`bundle.physics.pupil.VectorialPSFKernel`), built in a
      config by its own ``_target_``; its parameters are the layer's kernel parameters (the
      layer's ``parameterization`` attribute then reads ``"module"``).

    ``init`` sets the starting kernel of the free, constrained and fixed modes (Gaussian of
    ``init_fwhm``, Born & Wolf or vectorial at ``na``, or a file); the parametric mode always
    starts from Born & Wolf at ``na``.

    Gain and offset: the blurred domain is percentile-normalised like the sharp one, but blurring
    a thin filament spreads its intensity and lowers its peak ~20×, so the blurred training data
    do not obey ``y = h * x`` with a unit-sum kernel. Without a scale the y-cycle cannot be
    satisfied and training collapses to a near-zero output; :meth:`calibrate` initialises
    ``gain`` and ``offset`` from data and they are then learned (see :meth:`scale_parameters`).

    Args:
        kernel_size: ``(Z, Y, X)`` kernel size in voxels, odd or even (31³ in the paper's simulation).
        parameterization: ``"free"``, ``"constrained"``, ``"parametric"`` or ``"fixed"``.
        init: ``"gaussian"``, ``"born_wolf"``, ``"vectorial"`` or ``"file"`` (not used by "parametric").
        init_fwhm: ``(z, y, x)`` FWHM in µm of the Gaussian init.
        psf_file: PSF stack for ``init="file"`` (TIFF/NIfTI/...; cropped or zero-padded about its
            centre to ``kernel_size``, clipped at 0, normalised to sum 1; resample it to
            ``voxel_size`` first with ``bundle.physics.measured`` if its voxels differ).
        na: numerical aperture (initial value when learned); ``0 < na < n_immersion``.
        n_immersion: immersion refractive index.
        wavelength: emission wavelength in µm (initial value when learned).
        voxel_size: ``(z, y, x)`` voxel size in µm of the volumes the layer is applied to.
        axial_scale: initial axial scale of the parametric PSF (> 1 shortens it along z).
        defocus: initial focus offset in µm of the parametric PSF.
        learn_na: learn NA (parametric only).
        learn_wavelength: learn the wavelength (parametric only).
        learn_axial_scale: learn the axial scale (parametric only).
        learn_defocus: learn the defocus (parametric only).
        gain: initial intensity gain.
        offset: initial background offset.
        learn_gain: make ``gain`` a trainable parameter (else a buffer).
        learn_offset: make ``offset`` a trainable parameter (else a buffer).
        pad_mode: boundary model of the convolution (``"zeros"``, ``"reflect"``, ``"replicate"``,
            ``"circular"``).
        kernel: a kernel module (``forward()`` → ``(Z, Y, X)`` tensor of size ``kernel_size``) used
            instead of the built-in parameterisations; then ``parameterization`` must be left at its
            default, and ``init``, ``na``, ``wavelength``, ``axial_scale``, ``defocus`` and the
            ``learn_*`` flags of the kernel are not used. A module with ``shape`` / ``voxel_size``
            attributes must agree with ``kernel_size`` / ``voxel_size``.

    Example::

        >>> blur = PSFLayer(kernel_size=(31, 31, 31), parameterization="parametric", na=1.0)
        >>> y_hat = blur(torch.rand(2, 1, 32, 32, 32))  # (B, 1, D, H, W) -> (B, 1, D, H, W)
        >>> h = blur.kernel()  # (31, 31, 31), sum 1
        >>> opt = torch.optim.Adam([{"params": blur.kernel_parameters(), "lr": 2e-2},
        ...                         {"params": blur.scale_parameters(), "lr": 1e-3}])
        >>> from bundle.physics.pupil import VectorialPSFKernel
        >>> vectorial = PSFLayer(kernel_size=(31, 31, 31), kernel=VectorialPSFKernel((31, 31, 31), na=1.2))
    """

    def __init__(
        self,
        kernel_size: Sequence[int] = (31, 31, 31),
        parameterization: str = "parametric",
        init: str = "gaussian",
        init_fwhm: Sequence[float] = (0.5, 0.2, 0.2),
        psf_file: str | None = None,
        na: float = 1.4,
        n_immersion: float = 1.5,
        wavelength: float = 0.5,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        axial_scale: float = 1.0,
        defocus: float = 0.0,
        learn_na: bool = True,
        learn_wavelength: bool = False,
        learn_axial_scale: bool = False,
        learn_defocus: bool = False,
        gain: float = 1.0,
        offset: float = 0.0,
        learn_gain: bool = True,
        learn_offset: bool = True,
        pad_mode: str = "zeros",
        kernel: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}"
            )
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        ks = tuple(int(k) for k in kernel_size)
        if len(ks) != 3 or any(k < 1 for k in ks):
            raise ValueError(f"kernel_size must be three positive sizes (Z, Y, X), got {tuple(kernel_size)}")
        vs = tuple(float(v) for v in voxel_size)
        if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
            raise ValueError(
                f"voxel_size must be three positive sizes (z, y, x) in µm, got {tuple(voxel_size)}"
            )
        if pad_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"pad_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {pad_mode!r}"
            )
        if not n_immersion >= 1.0:
            raise ValueError(f"n_immersion must be a refractive index >= 1, got {n_immersion}")
        if kernel is not None:
            if parameterization != "parametric":
                raise ValueError(
                    f"kernel= replaces parameterization; leave parameterization at its default, got "
                    f"{parameterization!r} with kernel {type(kernel).__name__}"
                )
            parameterization = "module"
            self._check_kernel_module(kernel, ks, vs)
        uses_optics = parameterization == "parametric" or (
            parameterization != "module" and init in ("born_wolf", "vectorial")
        )
        if uses_optics and not 0.0 < na < n_immersion:
            raise ValueError(f"na must satisfy 0 < na < n_immersion ({n_immersion}), got na={na}")
        if uses_optics and not wavelength > 0:
            raise ValueError(f"wavelength must be positive (µm), got {wavelength}")
        if parameterization == "parametric" and not axial_scale > 0:
            raise ValueError(f"axial_scale must be positive, got {axial_scale}")
        if parameterization not in ("parametric", "module") and init == "file" and not psf_file:
            raise ValueError("init='file' needs psf_file (a PSF stack, e.g. a TIFF)")

        self.kernel_size = ks
        self.parameterization = parameterization
        self.init = {"parametric": "born_wolf", "module": "module"}.get(parameterization, init)
        self.voxel_size = vs
        self.n_immersion = float(getattr(kernel, "n_immersion", n_immersion))
        self.pad_mode = pad_mode
        self.psf_file = psf_file

        if kernel is not None:
            self.kernel_module = kernel
        elif parameterization == "parametric":
            # unconstrained raw values: na = n_i sigmoid(θ), wavelength = exp(θ), axial_scale = exp(θ)
            self._register("na_raw", math.log(na / (n_immersion - na)), learn_na)
            self._register("wavelength_raw", math.log(wavelength), learn_wavelength)
            self._register("axial_scale_raw", math.log(axial_scale), learn_axial_scale)
            self._register("defocus_raw", float(defocus), learn_defocus)
        else:
            h0 = torch.as_tensor(
                self._initial_kernel(init, init_fwhm, psf_file, na, n_immersion, wavelength),
                dtype=torch.float32,
            )
            if parameterization == "free":
                self.weight = nn.Parameter(h0.clone())
            elif parameterization == "constrained":
                # softmax(log h) = h; a floor keeps far tails able to grow (softmax updates are multiplicative)
                self.logits = nn.Parameter(torch.log(h0.clamp(min=1e-6 * float(h0.max()))))
            else:
                self.register_buffer("fixed_kernel", h0.clone())
        self._register("gain", float(gain), learn_gain)
        self._register("offset", float(offset), learn_offset)

    # ------------------------------------------------------------------------------------------
    def _register(self, name: str, value: float, learn: bool) -> None:
        tensor = torch.tensor(float(value), dtype=torch.float32)
        if learn:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    def _initial_kernel(
        self,
        init: str,
        init_fwhm: Sequence[float],
        psf_file: str | None,
        na: float,
        n_immersion: float,
        wavelength: float,
    ) -> np.ndarray:
        from bundle.physics import psf as psf_models

        optics = {
            "na": na,
            "n_immersion": n_immersion,
            "wavelength": wavelength,
            "voxel_size": self.voxel_size,
        }
        if init == "gaussian":
            return psf_models.gaussian_psf(
                self.kernel_size, fwhm=tuple(init_fwhm), voxel_size=self.voxel_size
            )
        if init == "born_wolf":
            return psf_models.born_wolf_psf(self.kernel_size, **optics)
        if init == "vectorial":
            return psf_models.vectorial_psf(self.kernel_size, **optics)
        psf, file_vs = _load_psf_file(str(psf_file))
        if psf.ndim != 3:
            raise ValueError(f"{psf_file}: PSF must be a 3D stack (Z, Y, X), got shape {psf.shape}")
        if file_vs is not None and not np.allclose(file_vs, self.voxel_size, rtol=1e-3):
            warnings.warn(
                f"{psf_file}: PSF voxel size {file_vs} µm differs from voxel_size {self.voxel_size} µm; "
                "resample it first (bundle.physics.measured.load_measured_psf)",
                stacklevel=3,
            )
        psf = np.clip(_center_crop_or_pad(np.asarray(psf, dtype=np.float64), self.kernel_size), 0.0, None)
        total = psf.sum()
        if not (np.isfinite(total) and total > 0):
            raise ValueError(
                f"{psf_file}: PSF is all zero (or not finite) within kernel_size {self.kernel_size}"
            )
        return (psf / total).astype(np.float32)

    @staticmethod
    def _check_kernel_module(kernel: nn.Module, ks: tuple[int, ...], vs: tuple[float, ...]) -> None:
        if not isinstance(kernel, nn.Module):
            raise TypeError(f"kernel must be an nn.Module returning the (Z, Y, X) kernel, got {type(kernel)}")
        shape = getattr(kernel, "shape", None)
        if shape is not None and tuple(int(s) for s in shape) != ks:
            raise ValueError(f"kernel module's shape {tuple(shape)} differs from kernel_size {ks}")
        kvs = getattr(kernel, "voxel_size", None)
        if kvs is not None and not np.allclose(tuple(float(v) for v in kvs), vs, rtol=1e-6):
            raise ValueError(f"kernel module's voxel_size {tuple(kvs)} µm differs from voxel_size {vs} µm")

    # ------------------------------------------------------------------------------------------
    @property
    def na(self) -> torch.Tensor:
        """Numerical aperture (parametric only), a 0-dim tensor in ``(0, n_immersion)``."""
        return self.n_immersion * torch.sigmoid(self.na_raw)

    @property
    def wavelength(self) -> torch.Tensor:
        """Emission wavelength in µm (parametric only)."""
        return torch.exp(self.wavelength_raw)

    @property
    def axial_scale(self) -> torch.Tensor:
        """Axial scale (parametric only)."""
        return torch.exp(self.axial_scale_raw)

    @property
    def defocus(self) -> torch.Tensor:
        """Focus offset in µm (parametric only)."""
        return self.defocus_raw

    def kernel(self) -> torch.Tensor:
        """The current PSF h.

        Returns:
            ``(Z, Y, X)`` float32 tensor (differentiable w.r.t. the kernel parameters); sums to one
            except in the "free" mode (and as the kernel module makes it).
        """
        if self.parameterization == "module":
            h = self.kernel_module()
            if tuple(h.shape) != self.kernel_size:
                raise ValueError(
                    f"{type(self.kernel_module).__name__} returned a kernel of shape {tuple(h.shape)}, "
                    f"expected kernel_size {self.kernel_size}"
                )
            return h
        if self.parameterization == "free":
            return self.weight
        if self.parameterization == "constrained":
            return torch.softmax(self.logits.flatten(), dim=0).reshape(self.kernel_size)
        if self.parameterization == "fixed":
            return self.fixed_kernel
        from bundle.physics.psf import born_wolf_psf_torch

        return born_wolf_psf_torch(
            self.na,
            shape=self.kernel_size,
            voxel_size=self.voxel_size,
            wavelength=self.wavelength,
            n_immersion=self.n_immersion,
            defocus=self.defocus,
            axial_scale=self.axial_scale,
            device=self.na_raw.device,
            dtype=torch.float32,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur a sharp volume: ``gain · (h * x) + offset``.

        Args:
            x: ``(B, 1, D, H, W)`` (any leading dims) sharp volume.

        Returns:
            ``(B, 1, D, H, W)`` float32/float64 blurred volume. Half/bfloat16 inputs (e.g. under
            ``torch.autocast``) are convolved in float32 with autocast disabled: FFTs in half
            precision lose the PSF's faint tails. The kernel and its FFT are computed once per call;
            a "fixed" kernel's FFT is cached per FFT size (see :meth:`_fixed_spectrum`).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            if self.parameterization == "fixed":
                blurred = self._convolve_fixed(x)
            else:
                blurred = fft_convolve(x, self.kernel(), pad_mode=self.pad_mode)
            return self.gain * blurred + self.offset

    # ------------------------------------------------------------------------------------------
    # Fixed-kernel fast path: same arithmetic as ``bundle.ops.fft_convolve`` with the kernel's
    # spectrum computed once per (FFT size, device, dtype) instead of on every call (the trainer
    # applies h twice per iteration: h*x and h*G(y)). Measured by scripts/benchmark.py.
    def _fixed_spectrum(self, fft_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``rfftn`` of the fixed kernel at ``fft_shape``, cached; recomputed when the buffer changes
        (``load_state_dict`` / in-place edits bump its version, ``.to()`` gives a new storage)."""
        h = self.fixed_kernel
        key = (fft_shape, h.device, dtype, h._version, h.data_ptr())
        cache = self.__dict__.setdefault("_spectrum_cache", {})
        if key not in cache:
            if len(cache) >= 4:  # a few sizes in use at once (training crops, validation windows)
                cache.pop(next(iter(cache)))
            cache[key] = torch.fft.rfftn(h.detach().to(dtype), s=fft_shape, dim=(-3, -2, -1))
        return cache[key]

    def _convolve_fixed(self, x: torch.Tensor) -> torch.Tensor:
        n = tuple(x.shape[-3:])
        k = self.kernel_size
        centre = [s // 2 for s in k]
        if self.pad_mode == "zeros":
            offset = centre
        else:  # as in fft_convolve: indices i + c - j for j in [0, k) reach -(k - 1 - c) .. n - 1 + c
            pads = [p for kk, c in zip(reversed(k), reversed(centre)) for p in (kk - 1 - c, c)]
            lead = x.shape[:-3]
            x = F.pad(x.reshape(-1, 1, *n), pads, mode=self.pad_mode).reshape(
                *lead, *[a + b - 1 for a, b in zip(n, k)]
            )
            offset = [kk - 1 for kk in k]
        fft_shape = fast_fft_shape([a + b - 1 for a, b in zip(n, k)])
        kf = self._fixed_spectrum(fft_shape, x.dtype)
        full = torch.fft.irfftn(
            torch.fft.rfftn(x, s=fft_shape, dim=(-3, -2, -1)) * kf, s=fft_shape, dim=(-3, -2, -1)
        )
        return full[
            ..., offset[0] : offset[0] + n[0], offset[1] : offset[1] + n[1], offset[2] : offset[2] + n[2]
        ]

    @torch.no_grad()
    def set_na_(self, na: float) -> PSFLayer:
        """Set the numerical aperture in place (parametric mode, or a kernel module with ``set_na_``)."""
        if self.parameterization == "module" and hasattr(self.kernel_module, "set_na_"):
            self.kernel_module.set_na_(na)
        elif self.parameterization == "parametric":
            if not 0.0 < na < self.n_immersion:
                raise ValueError(f"na must be in (0, n_immersion={self.n_immersion}), got {na}")
            self.na_raw.fill_(math.log(na / (self.n_immersion - na)))
        else:
            raise TypeError(f"the {self.parameterization!r} PSF has no NA to set")
        return self

    @torch.no_grad()
    def mirror_z_(self) -> PSFLayer:
        """Mirror the kernel along z in place (the kernel module's ``mirror_z_``; for the Born & Wolf
        model, negate the defocus; a stored kernel is flipped); returns ``self``."""
        if self.parameterization == "module":
            if not hasattr(self.kernel_module, "mirror_z_"):
                raise TypeError(f"{type(self.kernel_module).__name__} has no mirror_z_")
            self.kernel_module.mirror_z_()
        elif self.parameterization == "parametric":
            self.defocus_raw.neg_()
        elif self.parameterization == "free":
            self.weight.copy_(self.weight.flip(0))
        elif self.parameterization == "constrained":
            self.logits.copy_(self.logits.flip(0))
        else:
            self.fixed_kernel.copy_(self.fixed_kernel.flip(0))
        return self

    # ------------------------------------------------------------------------------------------
    def kernel_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters that shape the kernel (for their own optimiser group / learning rate)."""
        if self.parameterization == "module":
            return iter(list(self.kernel_module.parameters()))
        names = {
            "free": ("weight",),
            "constrained": ("logits",),
            "parametric": ("na_raw", "wavelength_raw", "axial_scale_raw", "defocus_raw"),
            "fixed": (),
        }[self.parameterization]
        params = dict(self.named_parameters(recurse=False))
        return iter([params[n] for n in names if n in params])

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable gain / offset parameters (those with ``learn_gain`` / ``learn_offset``)."""
        params = dict(self.named_parameters(recurse=False))
        return iter([params[n] for n in ("gain", "offset") if n in params])

    def physical_parameters(self) -> dict[str, float]:
        """Current ``na``, ``wavelength`` (µm), ``axial_scale``, ``defocus`` (µm) (parametric only),
        the kernel module's ``physical_parameters()`` (if it has them), ``gain`` and ``offset``, as
        plain floats."""
        out: dict[str, float] = {}
        if self.parameterization == "module" and hasattr(self.kernel_module, "physical_parameters"):
            out.update(self.kernel_module.physical_parameters())
        if self.parameterization == "parametric":
            for name in ("na", "wavelength", "axial_scale", "defocus"):
                out[name] = float(getattr(self, name).detach().cpu())
        out["gain"] = float(self.gain.detach().cpu())
        out["offset"] = float(self.offset.detach().cpu())
        return out

    @torch.no_grad()
    def calibrate(
        self,
        sharp: torch.Tensor,
        blurred: torch.Tensor,
        low_percentile: float = 1.0,
        high_percentile: float = 99.9,
    ) -> dict[str, float]:
        """Initialise ``offset`` and ``gain`` so that ``gain · (h * x) + offset`` matches the blurred domain.

        ``offset`` = the low percentile of the blurred samples (the background), and ``gain`` =
        (high percentile of the blurred samples − offset) / (high percentile of ``h * sharp``).

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

        Returns:
            ``{"gain": float, "offset": float}`` (the new values, also written into the layer).
        """
        if not 0.0 <= low_percentile < high_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= low_percentile < high_percentile <= 100, got {low_percentile}, {high_percentile}"
            )
        device = self.gain.device
        h = self.kernel().detach()
        blurred_sharp = fft_convolve(sharp.to(device=device, dtype=torch.float32), h, pad_mode=self.pad_mode)
        b = blurred.detach().float().cpu().numpy().ravel()
        hx = blurred_sharp.cpu().numpy().ravel()
        offset = float(np.percentile(b, low_percentile))
        top_b = float(np.percentile(b, high_percentile))
        top_hx = float(np.percentile(hx, high_percentile))
        if not top_hx > 0:
            raise ValueError(
                f"the {high_percentile}th percentile of h * sharp is {top_hx:.3g}: the sharp samples are empty"
            )
        gain = (top_b - offset) / top_hx
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(
                f"calibration gave gain {gain:.3g} (blurred {high_percentile}th pct {top_b:.3g} <= "
                f"offset {offset:.3g}): the blurred samples look constant"
            )
        self.gain.fill_(gain)
        self.offset.fill_(offset)
        return {"gain": gain, "offset": offset}

    def export(
        self, tif_path: str | os.PathLike, json_path: str | os.PathLike | None = None
    ) -> tuple[Path, Path]:
        """Write the current kernel as a ``(Z, Y, X)`` float32 TIFF and its parameters as JSON (atomically).

        Args:
            tif_path: output TIFF (ImageJ, with the voxel size).
            json_path: output JSON; default ``tif_path`` with suffix ``.json``. It holds
                ``physical_parameters``, ``kernel_size``, ``parameterization``, ``init``,
                ``voxel_size``, ``n_immersion``, ``pad_mode`` and, with a kernel module, its class
                as ``kernel_module`` (``"bundle.physics.pupil.VectorialPSFKernel"``).

        Returns:
            ``(tif_path, json_path)`` as written.
        """
        tif_path = Path(tif_path)
        json_path = Path(json_path) if json_path is not None else tif_path.with_suffix(".json")
        h = self.kernel().detach().float().cpu().numpy()
        from bundle.io import atomic_write_text, save_volume  # lazy: bundle.io imports MONAI's readers

        save_volume(tif_path, h, voxel_size=self.voxel_size, dtype=np.float32)
        info = {
            "physical_parameters": self.physical_parameters(),
            "kernel_size": list(self.kernel_size),
            "parameterization": self.parameterization,
            "init": self.init,
            "voxel_size": list(self.voxel_size),
            "n_immersion": self.n_immersion,
            "pad_mode": self.pad_mode,
            "kernel_sum": float(h.sum()),
        }
        if self.parameterization == "module":
            cls = type(self.kernel_module)
            info["kernel_module"] = f"{cls.__module__}.{cls.__qualname__}"
        atomic_write_text(json_path, json.dumps(info, indent=2))
        return tif_path, json_path

    def extra_repr(self) -> str:
        init = f"init={self.init!r}, " if self.parameterization != "module" else ""  # a module prints itself
        return (
            f"kernel_size={self.kernel_size}, parameterization={self.parameterization!r}, {init}"
            f"voxel_size={self.voxel_size}, pad_mode={self.pad_mode!r}"
        )

