"""Richardson–Lucy as a parameter-free ``nn.Module``, so inference configs can run it in place of G."""

from __future__ import annotations

import numpy as np
import torch

from bundle.classical.richardson_lucy import _MAX_TV_WEIGHT, _as_psf_tensor, _iterate
from bundle.classical.spectral import _SpectralBlur

__all__ = ["RichardsonLucy"]


class RichardsonLucy(torch.nn.Module):
    """Richardson–Lucy deconvolution as a parameter-free network, for MONAI inference configs.

    Wraps :func:`richardson_lucy` with a fixed PSF so it can stand in for the trained generator
    (``"network_def": {"_target_": "bundle.classical.RichardsonLucy", "psf_file": "...", ...}``),
    e.g. behind a ``SlidingWindowInferer``. The PSF is a non-persistent buffer (it follows
    ``.to(device)`` but is not in ``state_dict``, so no checkpoint is needed); its FFT is cached per
    input shape, device and dtype.

    References: Richardson (1972); Lucy (1974); Dey et al. (2006) for ``tv_weight > 0``.

    Args:
        psf_file: TIFF stack ``(Z, Y, X)`` holding the PSF (read with ``tifffile.imread``; singleton
            axes are squeezed). Exactly one of ``psf_file`` and ``psf`` must be given.
        psf: the PSF as an array or tensor ``(Z, Y, X)``.
        num_iter: RL iterations (pick it with :func:`best_iteration` on the validation volume).
        tv_weight: TV regularisation weight λ in ``[0, 1/6)``.
        pad_mode: boundary model, see :func:`richardson_lucy`.
        eps: denominator guard, see :func:`richardson_lucy`.
        init: start estimate, see :func:`richardson_lucy`.
        boundary_correction: edge normalisation for ``pad_mode="zeros"``, see :func:`richardson_lucy`.

    Example::

        >>> net = RichardsonLucy(psf=psf, num_iter=20)
        >>> out = net(torch.rand(1, 1, 32, 64, 64))  # (B, 1, D, H, W)
    """

    def __init__(
        self,
        psf_file: str | None = None,
        psf: np.ndarray | torch.Tensor | None = None,
        num_iter: int = 30,
        tv_weight: float = 0.0,
        pad_mode: str = "reflect",
        eps: float = 1e-6,
        init: str | float = "input",
        boundary_correction: bool = True,
    ) -> None:
        super().__init__()
        if (psf_file is None) == (psf is None):
            raise ValueError("give exactly one of psf_file and psf")
        if psf_file is not None:
            import tifffile

            psf = np.squeeze(tifffile.imread(psf_file))
        kernel = _as_psf_tensor(psf, torch.device("cpu"), torch.float32)
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {num_iter}")
        self.register_buffer("psf", kernel, persistent=False)
        self.num_iter = num_iter
        self.tv_weight = tv_weight
        self.pad_mode = pad_mode
        self.eps = eps
        self.init = init
        self.boundary_correction = boundary_correction
        self._cache: tuple[tuple, _SpectralBlur] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deconvolve ``x`` ``(B, C, D, H, W)`` → ``(B, C, D, H, W)`` (float32/float64, device of ``x``)."""
        if x.ndim != 5:
            raise ValueError(f"RichardsonLucy expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        if not 0.0 <= self.tv_weight < _MAX_TV_WEIGHT:
            raise ValueError(f"tv_weight must be in [0, 1/6), got {self.tv_weight}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.detach().to(dtype)
        key = (tuple(y.shape[-3:]), y.device, dtype, self.pad_mode)
        if self._cache is None or self._cache[0] != key:
            self._cache = (
                key,
                _SpectralBlur(self.psf.to(device=y.device, dtype=dtype), y.shape[-3:], self.pad_mode),
            )
        with torch.no_grad():
            return _iterate(
                y,
                self._cache[1],
                num_iter=self.num_iter,
                tv_weight=self.tv_weight,
                eps=self.eps,
                stop_tol=None,
                clip_negative=True,
                init=self.init,
                boundary_correction=self.boundary_correction,
                callback=None,
            )
