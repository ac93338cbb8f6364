"""Blind PSF estimation from unpaired data: fit the PSF model to the two domains' power spectra.

If the blurred stacks are ``y = a · (h * x) + b + n`` with white noise ``n`` and the sharp volumes
``x`` (unpaired, same kind of structures) then their average power spectra obey

    P_y(k) = a² |H(k)|² P_x(k) + s,

whatever the phases of the individual volumes. So the PSF's modulation transfer ``|H|`` can be
estimated without pairs, before any network is trained, by fitting a few physical parameters of
the PSF model (NA, spherical aberration, …) with ``a`` and the noise floor ``s``. This is the
classical spectral way to identify a blur (cf. Cannon 1976, "Blind deconvolution of spatially
invariant image blurs with phase"), here with a parametric optical model and Welch averaging over
training crops (the model's side computed as the data's: the sharp crops blurred by the candidate PSF,
then windowed, since the window's smoothing of a product is not the product of the smoothed parts),
used to start the blind cycleGAN's blur generator near the right PSF (how close it gets, and how
the blind recipe uses it: ``docs/results.md``).

``|H|`` does not change when the PSF is mirrored along z (a PSF with spherical aberration ``+s``
and one with ``-s`` have the same spectrum, and at ``s = 0`` the fit's gradient in ``s`` vanishes),
so the sign of the spherical aberration must come from the optics: ``aberration_sign`` starts the
fit on that branch and the result is mirrored onto it if it crossed over. For a sample of lower
refractive index than the immersion medium (water under oil) imaged below the coverslip the sign is
positive in :class:`~bundle.networks.kernels.VectorialPSFKernel`'s convention (measured against
``psfmodels``' PSF: ``docs/results.md``). Third-order statistics of the data were
tried to pick the sign without that knowledge and varied too much between volumes.

Written here because no maintained library fits a parametric microscope PSF to unpaired power
spectra (psfmodels renders PSFs; MONAI and scikit-image deconvolve with a known PSF).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bundle.flags import as_flag
from bundle.physics.psf_grid import grid_start
from bundle.physics.spectra import (
    BlurredSpectrum,
    CylindricalBins,
    dft_matrix,
    fit_scale_noise,
    spatial_volumes,
    transfer_power,
    welch_power_spectrum,
)

__all__ = ["SpectralPSFFit", "welch_power_spectrum"]  # the latter from bundle.physics.spectra

logger = logging.getLogger(__name__)


def _learned(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a parameter being learned (not a buffer or a frozen parameter)."""
    value = getattr(module, name, None)
    return isinstance(value, nn.Parameter) and value.requires_grad


class SpectralPSFFit:
    """Fit a PSF layer's kernel parameters to the power spectra of unpaired sharp and blurred crops.

    Minimises the mean squared log-ratio between the blurred crops' Welch spectrum and
    ``a² |H|² P_sharp + s`` over cylindrical frequency bins (|k_z|, k_r), DC excluded; ``a`` and
    ``s`` (scale and white-noise floor) are fitted first with the PSF held, then jointly with it.
    Only parameterised kernels are fitted (the Born & Wolf ``"parametric"`` mode and kernel modules
    such as :class:`~bundle.networks.kernels.VectorialPSFKernel`): a free-form kernel has one unknown
    per voxel and its phase is not in the spectrum. With ``aberration_sign`` ±1 the kernel's
    spherical aberration starts at ``aberration_sign · seed_aberration`` (when it is 0) and ends with
    that sign (``mirror_z_`` when the fit crossed over); with 0 the spherical aberration keeps its value
    and only the other parameters are fitted. A learned source ``depth`` (the index-mismatch
    aberration of :class:`~bundle.networks.kernels.VectorialPSFKernel`) that ends negative is mirrored
    to the same depth below the coverslip. The NA grid runs only when the NA is learned: a given NA
    (``psf_learn`` without ``"na"``) stays as given; the depth grid likewise only when the depth is.

    Args:
        steps: Adam steps of the joint fit (the scale/noise pre-fit takes ``steps // 2`` more).
        lr: Adam learning rate on the kernel's raw parameters.
        n_samples: training items to draw (crops of each domain) for the spectra.
        aberration_sign: sign of the primary spherical aberration (+1: sample index below the
            immersion index, -1: above, 0: do not fit the aberration).
        seed_aberration: starting magnitude (waves rms) when the aberration is 0.
        na_grid: number of NAs (evenly spaced over ``na_range`` × the immersion index) tried before the
            gradient fit, which starts from the best of them and the current NA (the log-spectral
            loss has local minima in the NA: measured on Born & Wolf data, a start at NA 0.9 for a
            true 1.2 stalled at 1.0); 0 to start from the current NA only.
        na_range: ``(low, high)`` fractions of the immersion index spanned by the grid.
        depth_grid: source depths (µm) tried, after the NA grid, before the gradient fit when the
            kernel learns its ``depth``; the fit starts from the best of them and the current depth
            (measured on the vesicle domain, true depth 2 µm: a start at 4 µm stalled at 4.18 µm,
            correlation 0.983, where a start at 1 µm reached 1.96 µm, 0.996). Empty: current depth only.
        windowed: compare the data with the Welch spectrum of the sharp crops blurred by the kernel
            (:class:`~bundle.physics.spectra.BlurredSpectrum`: the data's own estimator) rather than with
            ``|H|²`` times the sharp crops' spectrum, whose window smoothing biases the NA up (Born & Wolf
            microtubule data, true NA 1.4, three seeds: 1.496 without, 1.37-1.40 with). The grid uses it directly;
            the gradient fit uses ``|H|² P_sharp`` times the ratio of the two, recomputed ``rounds`` times.
        rounds: how often that ratio is recomputed during the gradient fit (``steps`` shared among them).

    Example::

        >>> fit = SpectralPSFFit(steps=300)
        >>> report = fit(blur, sharp_crops, blurred_crops)  # updates blur's kernel parameters in place
    """

    def __init__(
        self,
        steps: int = 300,
        lr: float = 0.02,
        n_samples: int = 64,
        aberration_sign: int = 0,
        seed_aberration: float = 0.02,
        na_grid: int = 16,
        na_range: Sequence[float] = (0.3, 0.97),
        depth_grid: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0),
        windowed: bool = True,
        rounds: int = 10,
    ) -> None:
        low, high = (float(v) for v in na_range)
        checks = {
            f"steps must be >= 1, got {steps}": int(steps) >= 1,
            f"lr must be positive, got {lr}": lr > 0,
            f"n_samples must be >= 1, got {n_samples}": int(n_samples) >= 1,
            f"aberration_sign must be -1, 0 or 1, got {aberration_sign}": aberration_sign in (-1, 0, 1),
            f"seed_aberration must be positive, got {seed_aberration}": seed_aberration > 0,
            f"na_grid must be >= 0, got {na_grid}": int(na_grid) >= 0,
            f"na_range must be 0 < low < high < 1 (fractions of the immersion index), got {na_range}": 0.0 < low < high < 1.0,
            f"depth_grid must hold finite depths >= 0 (µm below the coverslip), got {depth_grid}": all(
                math.isfinite(float(d)) and float(d) >= 0 for d in depth_grid
            ),
            f"rounds must be >= 1, got {rounds}": int(rounds) >= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)
        self.steps, self.lr, self.n_samples, self.rounds = int(steps), float(lr), int(n_samples), int(rounds)
        self.aberration_sign, self.seed_aberration = int(aberration_sign), float(seed_aberration)
        self.na_grid, self.na_range = int(na_grid), (low, high)
        self.depth_grid = tuple(float(d) for d in depth_grid)
        self.windowed = as_flag(windowed, "windowed")

    @staticmethod
    def fittable(blur: nn.Module) -> bool:
        """Whether ``blur`` has a parameterised kernel with trainable parameters."""
        kernel = getattr(blur, "kernel_module", None)
        if not hasattr(kernel, "physical_parameters") or not kernel.physical_parameters():
            return False  # a stored kernel: one unknown per voxel, not fitted from spectra
        return any(p.requires_grad for p in blur.kernel_parameters())

    def __call__(self, blur: nn.Module, sharp: torch.Tensor, blurred: torch.Tensor) -> dict[str, Any]:
        """Fit ``blur``'s kernel parameters in place.

        Args:
            blur: a :class:`~bundle.networks.PSFLayer` (``kernel()``, ``kernel_parameters()``).
            sharp: ``(N, 1, D, H, W)`` sharp-domain crops.
            blurred: ``(M, 1, D', H', W')`` blurred-domain crops of the same spatial size.

        Returns:
            a record: loss before/after, the kernel's physical parameters before/after, the number of
            frequency bins and crops used, whether the kernel was mirrored onto the given sign, and
            whether the gradient fit ended worse than its (grid) start, which is then kept
            (``kept_grid_start``): ``loss_after`` never exceeds the start's.
        """
        if not self.fittable(blur):
            raise ValueError(
                f"cannot fit the PSF of {type(blur).__name__} (parameterization "
                f"{getattr(blur, 'parameterization', None)!r}): needs an optical kernel (Born & Wolf, vectorial) "
                "with learned parameters"
            )
        xs, ys = spatial_volumes(sharp), spatial_volumes(blurred)
        if xs.shape[1:] != ys.shape[1:]:
            raise ValueError(f"sharp and blurred crops differ in size: {tuple(xs.shape[1:])} vs {tuple(ys.shape[1:])}")
        shape = tuple(ys.shape[1:])
        device = next(blur.kernel_parameters()).device
        xs, ys = xs.to(device), ys.to(device)
        p_sharp, p_blurred = welch_power_spectrum(xs), welch_power_spectrum(ys)

        binned = CylindricalBins(shape, device)
        bx, by = binned(p_sharp), binned(p_blurred)
        valid = (binned.counts > 0) & (bx > 0) & (by > 0)
        valid[0] = False  # DC: the means were removed
        if int(valid.sum()) < 4:
            raise ValueError("the crops carry too little structure to estimate a PSF spectrum (fewer than 4 usable frequency bins)")
        log_by = torch.log(by[valid])
        mats = [dft_matrix(n, k, device) for n, k in zip(shape, blur.kernel_size, strict=True)]
        log_scale = torch.zeros((), dtype=torch.float64, device=device, requires_grad=True)
        log_noise = torch.log(torch.median(by[valid])).detach().clone().requires_grad_(True)

        blurred_spectrum = BlurredSpectrum(xs, shape, blur.kernel_size) if self.windowed else None
        correction = [torch.ones_like(bx[valid])]  # windowed: the estimator's spectrum / |H|² P_sharp

        def product_power() -> torch.Tensor:
            return binned(transfer_power(blur.kernel(), shape, mats))[valid] * bx[valid]

        def loss_fn() -> torch.Tensor:
            model = torch.log(torch.exp(2 * log_scale) * product_power() * correction[0] + torch.exp(log_noise))
            return ((model - log_by) ** 2).mean()

        def model_power() -> torch.Tensor:  # the blurred spectrum the current (held) kernel predicts, per bin
            with torch.no_grad():
                return product_power() if blurred_spectrum is None else binned(blurred_spectrum(blur.kernel()))[valid]

        def update_correction() -> None:
            if blurred_spectrum is not None:
                with torch.no_grad():
                    correction[0] = model_power() / product_power().clamp(min=1e-300)

        before = self._parameters(blur)
        all_kernel_params = list(blur.kernel_parameters())
        saved_grads = [p.grad for p in all_kernel_params]  # the fit's backward passes must not leak into training
        kernel_module = getattr(blur, "kernel_module", None)
        spherical_raw = getattr(kernel_module, "spherical_raw", None)
        fit_spherical = isinstance(spherical_raw, nn.Parameter) and self.aberration_sign != 0
        if fit_spherical and float(kernel_module.spherical.detach()) == 0.0:
            with torch.no_grad():
                spherical_raw.fill_(math.atanh(self.aberration_sign * self.seed_aberration / kernel_module.aberration_bound))
        start_loss = fit_scale_noise(model_power(), log_by, log_scale, log_noise, self.steps // 2)
        record_grid = None
        if self.na_grid and hasattr(blur, "set_na_") and _learned(kernel_module, "na_raw"):  # a given NA stays
            record_grid = self._grid_start(blur, model_power, log_by, log_scale, log_noise)
        record_depth = None
        if self.depth_grid and _learned(kernel_module, "depth_raw"):
            record_depth = self._grid_start(blur, model_power, log_by, log_scale, log_noise, "depth")
        # the gradient fit's start (after the grids), kept if the fit ends worse by the data's own estimator
        # (the corrected product model it descends differs a little from it; seen on data the kernel family
        # cannot describe, e.g. a vectorial kernel with the NA capped by n_sample on Born & Wolf data)
        update_correction()
        with torch.no_grad():
            grid_loss = float(loss_fn())
        start_state = [p.detach().clone() for p in all_kernel_params] + [log_scale.detach().clone(), log_noise.detach().clone()]
        with torch.enable_grad():
            kernel_params = [
                p for p in blur.kernel_parameters() if p.requires_grad and (fit_spherical or p is not spherical_raw)
            ]
            opt = torch.optim.Adam([{"params": kernel_params, "lr": self.lr}, {"params": [log_scale, log_noise], "lr": self.lr}])
            rounds = self.rounds if blurred_spectrum is not None else 1
            for step in range(self.steps):
                if step and step % max(1, self.steps // rounds) == 0:  # step 0: updated just above
                    update_correction()
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                opt.step()
        for p, g in zip(all_kernel_params, saved_grads, strict=True):
            p.grad = g
        update_correction()
        with torch.no_grad():
            final_loss = float(loss_fn())
            kept_start = final_loss > grid_loss
            if kept_start:
                for p, v in zip([*all_kernel_params, log_scale, log_noise], start_state, strict=True):
                    p.copy_(v)
                update_correction()
                final_loss = float(loss_fn())
        record: dict[str, Any] = {
            "loss_before": start_loss,
            "loss_after": final_loss,
            "before": before,
            "after": self._parameters(blur),
            "bins": int(valid.sum()),
            "crops": [int(xs.shape[0]), int(ys.shape[0])],
            "mirrored": False,
            "kept_grid_start": kept_start,
            "na_grid": record_grid,
            "depth_grid": record_depth,
        }
        # crossed to the other branch (same spectrum): the optics' sign; a source lies below the coverslip
        crossed = fit_spherical and float(kernel_module.spherical.detach()) * self.aberration_sign < 0
        if crossed or (_learned(kernel_module, "depth_raw") and float(kernel_module.depth_raw.detach()) < 0):
            blur.mirror_z_()
            record["mirrored"] = True
            record["after"] = self._parameters(blur)
        return record

    @staticmethod
    def _parameters(blur: nn.Module) -> dict[str, float]:
        params = blur.physical_parameters() if hasattr(blur, "physical_parameters") else {}
        return {k: v for k, v in params.items() if k not in ("gain", "offset")}

    def _grid_start(self, blur, model_power, log_by, log_scale, log_noise, name: str = "na") -> dict[str, Any]:  # noqa: ANN001
        """Try the grid of ``name`` (``"na"``: ``na_grid`` NAs over ``na_range`` × the immersion index;
        ``"depth"``: ``depth_grid``) and the current value: :func:`~bundle.physics.psf_grid.grid_start`."""
        if name == "na":
            n_imm, (low, high) = float(blur.n_immersion), self.na_range
            grid = [n_imm * (low + (high - low) * i / max(1, self.na_grid - 1)) for i in range(self.na_grid)]
        else:
            grid = list(self.depth_grid)
        current = float(self._parameters(blur)[name])
        return grid_start(blur, name, current, grid, model_power, log_by, log_scale, log_noise, self.steps // 2)
