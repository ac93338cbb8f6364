"""Tensor operations shared by the simulator, the PSF layer and the classical baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len

__all__ = ["fft_convolve", "fast_fft_shape"]

_PAD_MODES = ("zeros", "reflect", "replicate", "circular")


def fast_fft_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Smallest sizes >= ``shape`` whose prime factors suit the FFT (``scipy.fft.next_fast_len``)."""
    return tuple(next_fast_len(int(s), real=True) for s in shape)


def fft_convolve(
    volume: torch.Tensor,
    kernel: torch.Tensor,
    pad_mode: str = "zeros",
    spectrum: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Linear 3D convolution ``volume * kernel`` computed by FFT, same size as ``volume``.

    This is true convolution (the kernel is flipped relative to ``torch.nn.functional.conv3d``,
    which computes a cross-correlation); the kernel's centre is voxel ``k // 2`` along each axis,
    so a kernel that is a delta at its centre returns ``volume`` unchanged. The FFT size is at
    least ``n + k - 1`` along each axis, so the circular wrap of the FFT never leaks across the
    volume: the boundary model is set by ``pad_mode`` alone.

    Hand-written because neither MONAI nor PyTorch offers an FFT convolution with 'same' output
    and a choice of boundary model; for a 31^3 kernel it is ~1000x cheaper than ``conv3d``.

    Args:
        volume: ``(..., D, H, W)`` real tensor (e.g. ``(B, 1, D, H, W)``).
        kernel: ``(kd, kh, kw)`` or broadcastable ``(..., kd, kh, kw)`` real tensor, any sizes
            (odd or even) no larger than needed; on the same device as ``volume``.
        pad_mode: boundary model outside the volume: ``"zeros"`` (the object is dark outside,
            the physical model of the simulator), ``"reflect"``, ``"replicate"`` or ``"circular"``
            (``torch.nn.functional.pad`` modes; they reduce edge artefacts on real stacks).
        spectrum: optional ``(fft_shape, dtype) -> rfftn(kernel, s=fft_shape)``, for a caller that
            caches the spectrum of a kernel that does not change (the non-blind PSF layer); by
            default the kernel's spectrum is computed here.

    Returns:
        ``(..., D, H, W)`` tensor, dtype of ``volume`` (float32 or float64).
    """
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    if volume.ndim < 3 or kernel.ndim < 3:
        raise ValueError(f"volume and kernel need 3 spatial dims, got {tuple(volume.shape)} and {tuple(kernel.shape)}")
    n = volume.shape[-3:]
    k = kernel.shape[-3:]
    centre = [s // 2 for s in k]
    if pad_mode == "zeros":
        x = volume
        offset = centre
    else:
        # indices i + c - j for j in [0, k) reach from -(k - 1 - c) to n - 1 + c
        pads: list[int] = []
        for kk, c in zip(reversed(k), reversed(centre)):
            pads += [kk - 1 - c, c]
        lead = volume.shape[:-3]
        flat = volume.reshape(-1, 1, *n)
        x = F.pad(flat, pads, mode=pad_mode).reshape(*lead, *[a + b - 1 for a, b in zip(n, k)])
        offset = [kk - 1 for kk in k]
    fft_shape = fast_fft_shape([a + b - 1 for a, b in zip(n, k)])
    real_dtype = volume.dtype if volume.dtype in (torch.float32, torch.float64) else torch.float32
    xf = torch.fft.rfftn(x.to(real_dtype), s=fft_shape, dim=(-3, -2, -1))
    if spectrum is not None:
        kf = spectrum(fft_shape, real_dtype)
    else:
        kf = torch.fft.rfftn(kernel.to(real_dtype), s=fft_shape, dim=(-3, -2, -1))
    full = torch.fft.irfftn(xf * kf, s=fft_shape, dim=(-3, -2, -1))
    return full[..., offset[0] : offset[0] + n[0], offset[1] : offset[1] + n[1], offset[2] : offset[2] + n[2]]
