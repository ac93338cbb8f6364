"""PSF kernels stored voxel by voxel: fixed (non-blind), free (the paper's raw weights), constrained.

Each is an ``nn.Module`` whose ``forward()`` returns the ``(Z, Y, X)`` kernel, handed to
:class:`bundle.networks.PSFLayer` as ``kernel`` and chosen in a config by its ``_target_``. The
starting kernel ``psf`` is an array (e.g. from a nested ``_target_`` such as
:func:`bundle.physics.psf.born_wolf_psf`), a PSF file, or ``None`` for a Gaussian of ``init_fwhm``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bundle.physics.optics import _check_shape, _check_voxel_size

__all__ = ["FixedKernel", "FreeKernel", "ConstrainedKernel", "initial_psf", "center_crop_or_pad"]

PSFSource = np.ndarray | torch.Tensor | str | os.PathLike | None


def center_crop_or_pad(psf: np.ndarray, shape: Sequence[int]) -> np.ndarray:
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
    from bundle.io import load_volume  # lazy: bundle.io imports MONAI's readers

    volume, meta = load_volume(path, dtype=np.float32)
    vs = meta.get("voxel_size")
    return volume, (tuple(float(v) for v in vs) if vs is not None else None)


def initial_psf(
    psf: PSFSource,
    shape: Sequence[int],
    voxel_size: Sequence[float],
    init_fwhm: Sequence[float] = (0.5, 0.2, 0.2),
) -> np.ndarray:
    """The starting kernel of a stored PSF: cropped or zero-padded about its centre to ``shape``,
    clipped at 0, normalised to sum 1.

    Args:
        psf: a ``(Z, Y, X)`` array or tensor; a PSF stack file (TIFF/NIfTI/..., resampled to
            ``voxel_size`` beforehand, e.g. with :mod:`bundle.physics.measured`: a differing voxel
            size in the file's metadata is warned about); or ``None`` for a Gaussian of ``init_fwhm``.
        shape: kernel size ``(Z, Y, X)``.
        voxel_size: ``(z, y, x)`` µm.
        init_fwhm: ``(z, y, x)`` FWHM in µm of the Gaussian used when ``psf`` is None.

    Returns:
        ``(Z, Y, X)`` float32 array of ``shape``, non-negative, sum 1.
    """
    shape, voxel_size = _check_shape(shape), _check_voxel_size(voxel_size)
    source = "psf"
    if psf is None:
        from bundle.physics.psf import gaussian_psf

        return gaussian_psf(shape, fwhm=tuple(init_fwhm), voxel_size=voxel_size)
    if isinstance(psf, (str, os.PathLike)):
        source = str(psf)
        array, file_vs = _load_psf_file(source)
        if file_vs is not None and not np.allclose(file_vs, voxel_size, rtol=1e-3):
            warnings.warn(
                f"{source}: PSF voxel size {file_vs} µm differs from voxel_size {voxel_size} µm; "
                "resample it first (bundle.physics.measured.load_measured_psf)",
                stacklevel=3,
            )
    else:
        array = psf.detach().cpu().numpy() if isinstance(psf, torch.Tensor) else np.asarray(psf)
    if array.ndim != 3:
        raise ValueError(f"{source}: PSF must be a 3D stack (Z, Y, X), got shape {array.shape}")
    array = np.clip(center_crop_or_pad(np.asarray(array, dtype=np.float64), shape), 0.0, None)
    total = array.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"{source}: PSF is all zero (or not finite) within kernel size {shape}")
    return (array / total).astype(np.float32)


class _StoredKernel(nn.Module):
    """Shared checks and z-mirroring of the voxel-wise kernels (not used on its own)."""

    parameterization = "stored"
    stored_name = ""  # the attribute holding the stored tensor
    learned = False  # stored as an nn.Parameter (else a buffer)

    def __init__(
        self,
        psf: PSFSource = None,
        shape: Sequence[int] = (31, 31, 31),
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        init_fwhm: Sequence[float] = (0.5, 0.2, 0.2),
    ) -> None:
        super().__init__()
        self.shape = _check_shape(shape)
        self.voxel_size = _check_voxel_size(voxel_size)
        self.source = str(psf) if isinstance(psf, (str, os.PathLike)) else ("gaussian" if psf is None else "array")
        value = self._from_kernel(torch.as_tensor(initial_psf(psf, self.shape, self.voxel_size, init_fwhm)))
        if self.learned:
            self.register_parameter(self.stored_name, nn.Parameter(value))
        else:
            self.register_buffer(self.stored_name, value)

    @staticmethod
    def _from_kernel(h0: torch.Tensor) -> torch.Tensor:
        """The stored tensor for a starting kernel ``h0`` (the kernel itself unless a subclass says otherwise)."""
        return h0.clone()

    def _stored(self) -> torch.Tensor:
        return getattr(self, self.stored_name)

    @torch.no_grad()
    def mirror_z_(self) -> _StoredKernel:
        """Flip the stored kernel along z in place; returns ``self``."""
        stored = self._stored()
        stored.copy_(stored.flip(0))
        return self

    def physical_parameters(self) -> dict[str, float]:
        """A stored kernel has no physical parameters: ``{}``."""
        return {}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, voxel_size={self.voxel_size}, source={self.source!r}"


class FixedKernel(_StoredKernel):
    """A non-trainable PSF (the paper's non-blind mode): a buffer ``psf`` returned as is.

    Args:
        psf: the PSF (array, file or ``None`` for a Gaussian; see :func:`initial_psf`).
        shape: kernel size ``(Z, Y, X)``.
        voxel_size: ``(z, y, x)`` µm.
        init_fwhm: ``(z, y, x)`` FWHM in µm of the Gaussian used when ``psf`` is None.

    In a config (``configs/train_nonblind.json``)::

        "blur#kernel": {"_target_": "bundle.networks.kernels.FixedKernel", "psf": "@psf_file",
                        "shape": "@psf_kernel_size", "voxel_size": "@psf_voxel_size"}
    """

    parameterization = "fixed"
    stored_name = "psf"

    def forward(self) -> torch.Tensor:
        """The PSF: ``(Z, Y, X)``, sum 1."""
        return self.psf


class FreeKernel(_StoredKernel):
    """Raw learnable weights, as in the paper's blur generator (may go negative, need not sum to 1).

    Args: as :class:`FixedKernel` (``psf`` is the starting kernel).
    """

    parameterization = "free"
    stored_name = "weight"
    learned = True

    def forward(self) -> torch.Tensor:
        """The weights: ``(Z, Y, X)``."""
        return self.weight


class ConstrainedKernel(_StoredKernel):
    """Learnable non-negative unit-sum kernel: a softmax over log-weights (the paper's unspecified
    regulariser Q(h) made a constraint).

    Log-weights start at ``log(max(psf, 1e-6 · max(psf)))``: the floor keeps far tails able to grow
    (softmax updates are multiplicative).

    Args: as :class:`FixedKernel` (``psf`` is the starting kernel).
    """

    parameterization = "constrained"
    stored_name = "logits"
    learned = True

    @staticmethod
    def _from_kernel(h0: torch.Tensor) -> torch.Tensor:
        return torch.log(h0.clamp(min=1e-6 * float(h0.max())))

    def forward(self) -> torch.Tensor:
        """``softmax(logits)``: ``(Z, Y, X)``, non-negative, sum 1."""
        return torch.softmax(self.logits.flatten(), dim=0).reshape(self.shape)
