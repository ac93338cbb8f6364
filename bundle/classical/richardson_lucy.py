"""Richardson–Lucy deconvolution, optionally with total variation (its network form: :mod:`bundle.classical.network`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from bundle.classical.spectral import _SpectralBlur

logger = logging.getLogger(__name__)


_PAD_MODES = ("zeros", "reflect", "replicate", "circular")
_NORMALIZE_MODES = ("minmax", "affine", "none")
#: the TV divergence of a unit vector field is bounded by 6 in 3D (forward/backward differences),
#: so ``1 - tv_weight * div`` stays positive for ``tv_weight < 1 / 6``.
_MAX_TV_WEIGHT = 1.0 / 6.0

Array = np.ndarray | torch.Tensor
Callback = Callable[[int, torch.Tensor], "bool | None"]

def _tv_divergence(u: torch.Tensor, eps: float) -> torch.Tensor:
    """``div(∇u / |∇u|)`` over the last three axes (forward differences, Neumann boundary; backward-difference divergence)."""
    grads = []
    for dim in (-3, -2, -1):
        g = torch.diff(u, dim=dim)
        grads.append(torch.cat([g, torch.zeros_like(u.narrow(dim, 0, 1))], dim=dim))
    norm = torch.sqrt(sum(g * g for g in grads) + eps * eps)
    div = torch.zeros_like(u)
    for dim, g in zip((-3, -2, -1), grads, strict=True):
        p = g / norm
        # backward difference with p[-1] := 0, the negative adjoint of the forward difference above
        div = (
            div
            + p
            - torch.cat([torch.zeros_like(p.narrow(dim, 0, 1)), p.narrow(dim, 0, p.shape[dim] - 1)], dim=dim)
        )
    return div


def _as_psf_tensor(psf: Array, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Validate a PSF (3D, finite, non-negative, positive sum) and return it normalised to sum 1."""
    p = torch.as_tensor(np.asarray(psf) if not isinstance(psf, torch.Tensor) else psf.detach())
    if p.ndim != 3:
        raise ValueError(f"psf must be 3D (Z, Y, X), got shape {tuple(p.shape)}")
    p = p.to(device=device, dtype=dtype)
    if not torch.isfinite(p).all():
        raise ValueError("psf contains NaN or infinite values")
    if (p < 0).any():
        raise ValueError(
            f"psf has negative values (min {p.min().item():.3g}): Richardson–Lucy needs a non-negative PSF; "
            "clip it (e.g. after background subtraction) before calling"
        )
    total = p.sum()
    if total <= 0:
        raise ValueError("psf sums to zero")
    return p / total


def richardson_lucy(
    volume: Array,
    psf: Array,
    *,
    num_iter: int = 30,
    tv_weight: float = 0.0,
    pad_mode: str = "reflect",
    eps: float = 1e-6,
    stop_tol: float | None = None,
    clip_negative: bool = True,
    init: str | float | Array = "input",
    boundary_correction: bool = True,
    callback: Callback | None = None,
    device: str | torch.device | None = None,
) -> Array:
    """Richardson–Lucy deconvolution of a 3D stack, optionally with total-variation regularisation.

    The multiplicative update (Richardson 1972, Lucy 1974), with ``A`` the blur by ``psf``::

        u_{k+1} = u_k * A^T( y / (A u_k + eps) ) / A^T 1 / (1 - tv_weight * div(∇u_k / |∇u_k|))

    The TV factor is that of Dey et al. (2006); it is absent for ``tv_weight = 0``. ``A^T 1`` is 1
    except within half a PSF of the edges with ``pad_mode="zeros"``, where part of the light of an
    edge voxel falls outside the volume (``boundary_correction``). The PSF is normalised to sum 1.
    Flux: with ``pad_mode="zeros"`` (``A^T`` the exact adjoint) every iterate's re-blurred flux
    ``sum(A u)`` equals the input's ``sum(y)`` up to the ``eps`` guard, so ``sum(u) ≈ sum(y)`` for
    an object away from the edges (exactly, for ``boundary_correction=False``); the padded modes
    conserve it approximately (see :class:`_SpectralBlur`). The kernel's FFT is computed once per
    call. Runs without autograd, on ``device`` (default: the input tensor's device; CPU for numpy).

    To reproduce ``skimage.restoration.richardson_lucy(image, psf, num_iter, clip=False)`` use
    ``pad_mode="zeros", init=0.5, eps=1e-12, clip_negative=False, boundary_correction=False``
    (and an odd-sized PSF: scipy's 'same' mode centres even kernels at ``(k - 1) // 2``).

    Args:
        volume: the blurred stack, a numpy array or tensor ``(Z, Y, X)``, or a tensor
            ``(B, C, D, H, W)`` (each channel deconvolved with the same PSF). Integer arrays are
            converted to float32; float64 stays float64.
        psf: ``(kd, kh, kw)`` non-negative, finite PSF (numpy or tensor), centre at voxel ``k // 2``;
            normalised to sum 1 here.
        num_iter: maximum number of iterations (>= 1); acts as the regulariser of plain RL.
        tv_weight: λ of the TV term, ``0 <= λ < 1/6`` (so the denominator stays positive);
            Dey et al. use about 0.002. Dimensionless (the TV term only sees gradient directions).
        pad_mode: boundary model of the blur: ``"zeros"`` (dark outside — the simulator's model and
            the one of ``skimage.restoration.richardson_lucy``), ``"reflect"`` (default, fewer edge
            artefacts on real stacks), ``"replicate"`` or ``"circular"``.
        eps: added to the re-blurred estimate before dividing (and the floor of the start estimate
            for ``init="input"``; also the smoothing of ``|∇u|`` in the TV term).
        stop_tol: if given, stop once ``||u_{k+1} - u_k|| / ||u_k||`` (L2 over each volume) is below
            it for every volume of the batch.
        clip_negative: clip negative input values (background-subtracted or Gaussian-noise data) to 0
            and negative iterates (FFT round-off) to 0. RL's model is non-negative data; with
            ``False`` the data are used as they are (like scikit-image).
        init: the start estimate ``u_0``: ``"input"`` (default: the clipped input, floored at
            ``eps`` so no voxel is stuck at 0 — converges in fewer iterations than a flat start),
            ``"mean"`` (a flat volume at the input's mean, the classical EM start), or a number
            (a flat volume at that value; scikit-image uses 0.5), or an array of the volume's shape
            (e.g. a network's output, :func:`bundle.classical.refine.refine_estimate`), floored at ``eps``.
        boundary_correction: divide the update by ``A^T 1``, the ML-EM update for a finite field
            of view (Bertero & Boccacci 2005; only acts with ``pad_mode="zeros"``). Without it,
            light piles up in edge voxels (measured: -2.6 dB after 30 iterations on a 32x40x40
            phantom crossing the edges). ``False`` reproduces scikit-image.
        callback: called as ``callback(iteration, estimate)`` after each iteration (``iteration``
            counts from 1; ``estimate`` is a tensor with the layout of ``volume`` on the working
            device — do not modify it). Returning ``True`` stops the iterations.
        device: where to compute (e.g. ``"cuda"``); the result goes back to the input's device.

    Returns:
        The deconvolved stack, same type (numpy or tensor), shape and device as ``volume``; float
        dtype (float64 for float64 input, float32 otherwise).

    Raises:
        ValueError: if ``volume`` is not 3D or 5D or not finite, the PSF is not 3D, has negative or
            non-finite values or sums to 0, ``num_iter < 1``, or an option is out of range.

    Example::

        >>> est = richardson_lucy(stack, psf, num_iter=20, pad_mode="zeros")
    """
    is_numpy = not isinstance(volume, torch.Tensor)
    x = torch.as_tensor(np.asarray(volume)) if is_numpy else volume.detach()
    if x.ndim not in (3, 5):
        raise ValueError(f"volume must be (Z, Y, X) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    if not 0.0 <= tv_weight < _MAX_TV_WEIGHT:
        raise ValueError(f"tv_weight must be in [0, 1/6), got {tv_weight}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(init, str) and init not in ("input", "mean"):
        raise ValueError(f"init must be 'input', 'mean', a number or an array, got {init!r}")
    if isinstance(init, (np.ndarray, torch.Tensor)) and tuple(init.shape) != tuple(x.shape):
        raise ValueError(f"init array must have the volume's shape {tuple(x.shape)}, got {tuple(init.shape)}")
    in_device = x.device
    work_device = torch.device(device) if device is not None else in_device
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(device=work_device, dtype=dtype)
    if not torch.isfinite(y).all():
        raise ValueError("volume contains NaN or infinite values")
    if isinstance(init, (np.ndarray, torch.Tensor)):
        init = torch.as_tensor(np.asarray(init) if isinstance(init, np.ndarray) else init.detach())
        init = init.to(device=work_device, dtype=dtype)
        if not torch.isfinite(init).all():
            raise ValueError("init contains NaN or infinite values")
    h = _as_psf_tensor(psf, work_device, dtype)
    blur = _SpectralBlur(h, y.shape[-3:], pad_mode)
    with torch.no_grad():
        out = _iterate(
            y,
            blur,
            num_iter=num_iter,
            tv_weight=tv_weight,
            eps=eps,
            stop_tol=stop_tol,
            clip_negative=clip_negative,
            init=init,
            boundary_correction=boundary_correction,
            callback=callback,
        )
    if is_numpy:
        return out.cpu().numpy()
    return out.to(in_device)


def _iterate(
    y: torch.Tensor,
    blur: _SpectralBlur,
    *,
    num_iter: int,
    tv_weight: float,
    eps: float,
    stop_tol: float | None,
    clip_negative: bool,
    init: str | float | torch.Tensor,
    boundary_correction: bool,
    callback: Callback | None,
) -> torch.Tensor:
    """The RL loop on a validated tensor ``y`` ``(..., D, H, W)`` with a prepared :class:`_SpectralBlur`."""
    if clip_negative:
        y = y.clamp(min=0)
    if isinstance(init, torch.Tensor):
        u = init.clamp(min=eps)
    elif init == "input":
        u = y.clamp(min=eps)
    elif init == "mean":
        u = torch.ones_like(y) * y.mean(dim=(-3, -2, -1), keepdim=True).clamp(min=eps)
    else:
        u = torch.full_like(y, float(init))
    sensitivity = blur.sensitivity(eps) if boundary_correction else None
    for it in range(1, num_iter + 1):
        # in place on the fresh buffers the FFTs return (the same values, less memory traffic)
        correction = blur.adjoint(torch.div(y, blur.forward(u).add_(eps)))
        if sensitivity is not None:
            correction.div_(sensitivity)
        if tv_weight > 0:
            correction.div_(1.0 - tv_weight * _tv_divergence(u, eps))
        u_new = correction.mul_(u)
        if clip_negative:
            u_new.clamp_(min=0)
        converged = False
        if stop_tol is not None:
            change = torch.linalg.vector_norm((u_new - u).flatten(-3), dim=-1)
            ref = torch.linalg.vector_norm(u.flatten(-3), dim=-1).clamp(min=eps)
            converged = bool((change / ref).max() < stop_tol)
        u = u_new
        if callback is not None and callback(it, u):
            break
        if converged:
            break
    return u
