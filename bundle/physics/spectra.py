"""Power spectra of volume batches and transfer functions of small kernels (for the spectral PSF fit).

Written here because the fit needs ``|H(k)|²`` of a learnable kernel of any size at the frequencies of
the crops' grid, differentiably; ``torch.fft`` would need the kernel zero-padded to the grid on every
step, the small DFT matrices below do it one axis at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["dft_matrix", "spatial_volumes", "transfer_power", "welch_power_spectrum"]


def spatial_volumes(volumes: torch.Tensor) -> torch.Tensor:
    """``(N, D, H, W)`` float64 from ``(N, 1, D, H, W)`` or ``(N, D, H, W)``."""
    if volumes.ndim == 5:
        if volumes.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(volumes.shape)}")
        volumes = volumes[:, 0]
    if volumes.ndim != 4:
        raise ValueError(f"expected (N, 1, D, H, W) or (N, D, H, W) volumes, got shape {tuple(volumes.shape)}")
    return volumes.detach().to(torch.float64)


def _hann(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    window = torch.ones((), dtype=torch.float64, device=device)
    for axis, n in enumerate(shape):
        w = torch.hann_window(n, periodic=False, dtype=torch.float64, device=device) if n > 2 else torch.ones(n, dtype=torch.float64, device=device)
        view = [1, 1, 1]
        view[axis] = n
        window = window * w.reshape(view)
    return window


def welch_power_spectrum(volumes: torch.Tensor) -> torch.Tensor:
    """Average periodogram of Hann-windowed, mean-subtracted volumes (Welch's method).

    Args:
        volumes: ``(N, 1, D, H, W)`` or ``(N, D, H, W)`` crops of one domain.

    Returns:
        ``(D, H, W)`` float64 power spectrum (FFT order, DC at index 0).
    """
    v = spatial_volumes(volumes)
    window = _hann(v.shape[1:], v.device)
    v = (v - v.mean(dim=(1, 2, 3), keepdim=True)) * window
    return (torch.fft.fftn(v, dim=(1, 2, 3)).abs() ** 2).mean(dim=0)


def dft_matrix(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` complex DFT at the ``n_out`` frequencies of a length-``n_out`` grid."""
    k = torch.arange(n_out, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    return torch.exp(-2j * math.pi * k * j / n_out)


def transfer_power(h: torch.Tensor, shape: Sequence[int], mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|H(k)|²`` of kernel ``h`` ``(kd, kh, kw)`` at the frequencies of a ``shape`` grid (any kernel size)."""
    hc = h.to(torch.float64).to(torch.complex128)
    spectrum = torch.einsum("cf,def->dec", mats[2], hc)  # one axis at a time (a joint einsum may
    spectrum = torch.einsum("be,dec->dbc", mats[1], spectrum)  # materialise a 6-D product)
    spectrum = torch.einsum("ad,dbc->abc", mats[0], spectrum)
    return spectrum.abs() ** 2
