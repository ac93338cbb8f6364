"""The blur generator h (sharp → blurred): a PSF kernel applied by FFT, with a gain and an offset."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bundle.networks.kernels import BORN_WOLF_LEARNABLE, FixedKernel, make_kernel
from bundle.networks.kernels._scalar import register_scalar
from bundle.networks.scale_calibration import calibrate_gain_offset
from bundle.ops import fft_convolve

__all__ = ["PSFLayer"]

_PAD_MODES = ("zeros", "reflect", "replicate", "circular")
# state-dict names of the kernel parameters when they lived on the layer itself (before the kernels
# became modules of their own): checkpoints written then still load
_LEGACY_KEYS = {
    "na_raw": "na_raw",
    "wavelength_raw": "wavelength_raw",
    "axial_scale_raw": "axial_scale_raw",
    "defocus_raw": "defocus_raw",
    "weight": "weight",
    "logits": "logits",
    "fixed_kernel": "psf",
}


class PSFLayer(nn.Module):
    """The linear blur generator h of Lim et al. 2020, applied by FFT: ``gain · (h * x) + offset``.

    In "CycleGAN with a Blur Kernel for Deconvolution Microscopy" (Lim et al., IEEE TCI 2020) the
    sharp → blurred generator is a single 3D convolution whose weights are the PSF (31³ in
    simulation). Here the same linear operator is applied by FFT (:func:`bundle.ops.fft_convolve`,
    true convolution with the kernel's centre at ``k // 2``, identical to ``conv3d`` with the
    flipped kernel). The PSF itself is a kernel module (``forward()`` → ``(Z, Y, X)``), one class
    per parameterisation in :mod:`bundle.networks.kernels`, chosen in a config by its ``_target_``:
    Born & Wolf with a learned NA (blind default), vectorial high-NA with learned NA and spherical
    aberration, a fixed PSF (non-blind), raw weights (the paper's) or a softmax-constrained kernel.
    A fixed kernel's FFT is computed once per FFT size instead of at every call.

    Gain and offset: the blurred domain is percentile-normalised like the sharp one, but blurring
    a thin filament spreads its intensity and lowers its peak ~20×, so the blurred training data
    do not obey ``y = h * x`` with a unit-sum kernel. Without a scale the y-cycle cannot be
    satisfied and training collapses to a near-zero output; :meth:`calibrate` initialises
    ``gain`` and ``offset`` from data and they are then learned (see :meth:`scale_parameters`).

    Args:
        kernel: the PSF kernel module; its ``shape`` (else the shape it returns) is the layer's
            ``kernel_size``, its ``voxel_size`` and ``n_immersion`` (when it has them) the layer's.
        gain: initial intensity gain.
        offset: initial background offset.
        learn_gain: make ``gain`` a trainable parameter (else a buffer).
        learn_offset: make ``offset`` a trainable parameter (else a buffer).
        pad_mode: boundary model of the convolution (``"zeros"``, ``"reflect"``, ``"replicate"``,
            ``"circular"``).

    Example::

        >>> from bundle.networks.kernels import BornWolfKernel, VectorialPSFKernel
        >>> blur = PSFLayer(BornWolfKernel((31, 31, 31), na=1.0))
        >>> y_hat = blur(torch.rand(2, 1, 32, 32, 32))  # (B, 1, D, H, W) -> (B, 1, D, H, W)
        >>> h = blur.kernel()  # (31, 31, 31), sum 1
        >>> opt = torch.optim.Adam([{"params": blur.kernel_parameters(), "lr": 2e-2},
        ...                         {"params": blur.scale_parameters(), "lr": 1e-3}])
        >>> vectorial = PSFLayer(VectorialPSFKernel((31, 31, 31), na=1.2, n_immersion=1.515))
        >>> legacy = PSFLayer.build((31, 31, 31), "fixed", init="born_wolf", na=1.2)  # by name

    In a config: ``"blur": {"_target_": "bundle.networks.PSFLayer", "kernel": {"_target_":
    "bundle.networks.kernels.BornWolfKernel", ...}}`` (``configs/train.json``).
    """

    def __init__(
        self,
        kernel: nn.Module,
        gain: float = 1.0,
        offset: float = 0.0,
        learn_gain: bool = True,
        learn_offset: bool = True,
        pad_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if not isinstance(kernel, nn.Module):
            raise TypeError(f"kernel must be an nn.Module returning the (Z, Y, X) kernel, got {type(kernel)}")
        if pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
        shape = getattr(kernel, "shape", None)
        if shape is None:
            with torch.no_grad():
                shape = kernel().shape
        self.kernel_size = tuple(int(s) for s in shape)
        if len(self.kernel_size) != 3 or any(k < 1 for k in self.kernel_size):
            raise ValueError(f"the kernel's shape must be three positive sizes (Z, Y, X), got {tuple(shape)}")
        vs = getattr(kernel, "voxel_size", None)
        self.voxel_size = tuple(float(v) for v in vs) if vs is not None else None
        self.kernel_module = kernel
        self.pad_mode = pad_mode
        register_scalar(self, "gain", float(gain), learn_gain)
        register_scalar(self, "offset", float(offset), learn_offset)

    @classmethod
    def build(
        cls,
        kernel_size: Sequence[int] = (31, 31, 31),
        parameterization: str = "parametric",
        gain: float = 1.0,
        offset: float = 0.0,
        learn_gain: bool = True,
        learn_offset: bool = True,
        pad_mode: str = "zeros",
        **kernel_args: Any,
    ) -> PSFLayer:
        """A layer whose kernel is named by ``parameterization`` (a shorthand for Python use; configs
        give the kernel by ``_target_``): see :func:`bundle.networks.kernels.make_kernel` for the
        names and the kernel arguments (``init``, ``init_fwhm``, ``psf_file``, ``na``, ``voxel_size``, ...).
        For the Born & Wolf kernel, ``learn_na`` (default True), ``learn_wavelength``,
        ``learn_axial_scale`` and ``learn_defocus`` (default False) may replace ``learn``.
        """
        if parameterization == "parametric" and "learn" not in kernel_args:
            kernel_args["learn"] = tuple(
                name for name in BORN_WOLF_LEARNABLE if kernel_args.pop(f"learn_{name}", name == "na")
            )
        kernel = make_kernel(parameterization, kernel_size, **kernel_args)
        return cls(kernel, gain=gain, offset=offset, learn_gain=learn_gain, learn_offset=learn_offset, pad_mode=pad_mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN202
        """Load checkpoints written when the kernel's tensors were the layer's own (``na_raw``,
        ``fixed_kernel``, ...): renamed to their place in ``kernel_module``."""
        for old, new in _LEGACY_KEYS.items():
            if prefix + old in state_dict and prefix + "kernel_module." + new not in state_dict:
                state_dict[prefix + "kernel_module." + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------------
    @property
    def parameterization(self) -> str:
        """The kernel's ``parameterization`` name (``"fixed"``, ``"parametric"``, ...; ``"module"``
        for a kernel class without one)."""
        return str(getattr(self.kernel_module, "parameterization", "module"))

    @property
    def n_immersion(self) -> float | None:
        """The kernel's immersion refractive index, when it has one."""
        n = getattr(self.kernel_module, "n_immersion", None)
        return float(n) if n is not None else None

    def kernel(self) -> torch.Tensor:
        """The current PSF h.

        Returns:
            ``(Z, Y, X)`` float32 tensor (differentiable w.r.t. the kernel parameters); sums to one
            except for a free kernel.
        """
        h = self.kernel_module()
        if tuple(h.shape) != self.kernel_size:
            raise ValueError(
                f"{type(self.kernel_module).__name__} returned a kernel of shape {tuple(h.shape)}, "
                f"expected kernel_size {self.kernel_size}"
            )
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur a sharp volume: ``gain · (h * x) + offset``.

        Args:
            x: ``(B, 1, D, H, W)`` (any leading dims) sharp volume.

        Returns:
            ``(B, 1, D, H, W)`` float32/float64 blurred volume. Half/bfloat16 inputs (e.g. under
            ``torch.autocast``) are convolved in float32 with autocast disabled: FFTs in half
            precision lose the PSF's faint tails. The kernel and its FFT are computed once per call;
            a fixed kernel's FFT is cached per FFT size (see :meth:`_fixed_spectrum`).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            fixed = isinstance(self.kernel_module, FixedKernel)
            h = self.kernel_module.psf if fixed else self.kernel()
            blurred = fft_convolve(x, h, pad_mode=self.pad_mode, spectrum=self._fixed_spectrum if fixed else None)
            return self.gain * blurred + self.offset

    def _fixed_spectrum(self, fft_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``rfftn`` of the fixed kernel at ``fft_shape``, cached per (FFT size, device, dtype) (the
        trainer applies h twice per iteration: h*x and h*G(y); measured by scripts/benchmark.py);
        recomputed when the buffer changes (``load_state_dict`` / in-place edits bump its version,
        ``.to()`` gives a new storage)."""
        h = self.kernel_module.psf
        key = (fft_shape, h.device, dtype, h._version, h.data_ptr())
        cache = self.__dict__.setdefault("_spectrum_cache", {})
        if key not in cache:
            if len(cache) >= 4:  # a few sizes in use at once (training crops, validation windows)
                cache.pop(next(iter(cache)))
            cache[key] = torch.fft.rfftn(h.detach().to(dtype), s=fft_shape, dim=(-3, -2, -1))
        return cache[key]

    @torch.no_grad()
    def set_na_(self, na: float) -> PSFLayer:
        """Set the numerical aperture in place (a kernel with ``set_na_``); returns ``self``."""
        if not hasattr(self.kernel_module, "set_na_"):
            raise TypeError(f"the {type(self.kernel_module).__name__} PSF has no NA to set")
        self.kernel_module.set_na_(na)
        return self

    @torch.no_grad()
    def mirror_z_(self) -> PSFLayer:
        """Mirror the kernel along z in place (the kernel's ``mirror_z_``); returns ``self``."""
        if not hasattr(self.kernel_module, "mirror_z_"):
            raise TypeError(f"{type(self.kernel_module).__name__} has no mirror_z_")
        self.kernel_module.mirror_z_()
        return self

    # ------------------------------------------------------------------------------------------
    def kernel_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters that shape the kernel (for their own optimiser group / learning rate)."""
        return iter(list(self.kernel_module.parameters()))

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable gain / offset parameters (those with ``learn_gain`` / ``learn_offset``)."""
        params = dict(self.named_parameters(recurse=False))
        return iter([params[n] for n in ("gain", "offset") if n in params])

    def physical_parameters(self) -> dict[str, float]:
        """The kernel's ``physical_parameters()`` (NA, wavelength, ...; none for a stored kernel),
        ``gain`` and ``offset``, as plain floats."""
        out: dict[str, float] = {}
        if hasattr(self.kernel_module, "physical_parameters"):
            out.update(self.kernel_module.physical_parameters())
        out["gain"] = float(self.gain.detach().cpu())
        out["offset"] = float(self.offset.detach().cpu())
        return out

    #: ``calibrate(sharp, blurred, low_percentile, high_percentile, statistic)``: set gain and offset
    #: from unpaired samples of both domains (see :func:`~bundle.networks.scale_calibration.calibrate_gain_offset`)
    calibrate = calibrate_gain_offset

    def export(
        self, tif_path: str | os.PathLike, json_path: str | os.PathLike | None = None
    ) -> tuple[Path, Path]:
        """Write the current kernel as a ``(Z, Y, X)`` float32 TIFF and its parameters as JSON (atomically).

        Args:
            tif_path: output TIFF (ImageJ, with the voxel size).
            json_path: output JSON; default ``tif_path`` with suffix ``.json``. It holds
                ``physical_parameters``, ``kernel_size``, ``parameterization`` (the kernel's
                ``parameterization``: ``"fixed"`` in non-blind training), ``voxel_size``,
                ``n_immersion``, ``pad_mode``, ``kernel_sum`` and the kernel's class as
                ``kernel_module`` (e.g. ``"bundle.networks.kernels.vectorial.VectorialPSFKernel"``).

        Returns:
            ``(tif_path, json_path)`` as written.
        """
        tif_path = Path(tif_path)
        json_path = Path(json_path) if json_path is not None else tif_path.with_suffix(".json")
        h = self.kernel().detach().float().cpu().numpy()
        from bundle.io import atomic_write_text, save_volume  # lazy: bundle.io imports MONAI's readers

        save_volume(tif_path, h, voxel_size=self.voxel_size, dtype=np.float32)
        cls = type(self.kernel_module)
        info = {
            "physical_parameters": self.physical_parameters(),
            "kernel_size": list(self.kernel_size),
            "parameterization": self.parameterization,
            "kernel_module": f"{cls.__module__}.{cls.__qualname__}",
            "voxel_size": list(self.voxel_size) if self.voxel_size is not None else None,
            "n_immersion": self.n_immersion,
            "pad_mode": self.pad_mode,
            "kernel_sum": float(h.sum()),
        }
        atomic_write_text(json_path, json.dumps(info, indent=2))
        return tif_path, json_path

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, voxel_size={self.voxel_size}, pad_mode={self.pad_mode!r}"
