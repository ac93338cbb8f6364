"""The blur path calibrated before the first iteration: scale and offset, noise, optionally the PSF from spectra."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from bundle.flags import as_flag
from bundle.handlers.checkpoints import _atomic_json

logger = logging.getLogger(__name__)


class BlurCalibration:
    """Before the first iteration, set the blur path's gain and offset from the data.

    Percentile-normalised blurred volumes do not obey ``y = h * x`` with a unit-sum PSF and a sharp
    domain in [0, 1] (blurring a thin filament lowers its peak ~20×); without this calibration the
    generator collapses to a near-zero output (DESIGN.md findings). Draws ``n_samples`` training
    items and calls ``blur.calibrate(sharp, blurred, ...)``. Skipped when training resumes
    (iteration > 0: the calibrated values come from the checkpoint) or when ``blur`` has no
    ``calibrate`` (the conventional cycleGAN's network).

    With ``noise`` (the blur path's :class:`~bundle.networks.PoissonGaussianNoise`) and
    ``estimate_noise``, it also estimates the blurred domain's Poisson–Gaussian noise from the same
    samples (:func:`~bundle.physics.noise_estimation.estimate_poisson_gaussian`, in the normalised
    units that the PSF layer outputs after its gain and offset) and sets the noise module to it, so the
    sharp cycle trains G on ``h * x`` with the noise of real stacks. Both results are logged and
    written to ``record_path`` (JSON) when given.

    Args:
        blur: the PSF layer.
        dataset: the unpaired training dataset (items ``{"sharp", "blurred"}``).
        n_samples: number of items drawn.
        low_percentile: percentile of the blurred domain taken as background offset.
        high_percentile: percentile matched between the blurred domain and ``h * x``.
        statistic: ``"percentile"`` (the high percentiles matched) or ``"mean"`` (the mean intensities);
            see :func:`bundle.networks.scale_calibration.calibrate_gain_offset`.
        noise: the blur path's noise module (or ``None``).
        estimate_noise: set ``noise`` from the data (False keeps the level it was built with, e.g.
            from a camera's known gain and read noise).
        record_path: JSON file for the calibration and noise estimate (e.g. ``<output_dir>/calibration.json``).
        psf_fit: optional blind PSF estimate run first (e.g.
            :class:`~bundle.physics.psf_estimation.SpectralPSFFit`): called as
            ``psf_fit(blur, sharp, blurred)`` on ``max(n_samples, psf_fit.n_samples)`` items when
            ``psf_fit.fittable(blur)`` (a fixed, non-blind PSF is left as it is); its record is logged
            and written with the calibration.
        fit_dataset: items ``{"sharp", "blurred"}`` for the PSF fit (default ``dataset``). The fit's
            spectra resolve the PSF's transfer function better from crops larger than the training
            crops: on the vesicle data of ``docs/results.md`` 32×64×64 crops gave correlations
            0.967-0.973 with the true PSF where the 32³ training crops gave 0.958-0.965.
        offset_shift: added to the calibrated offset (normalised units; 0: the calibration's value). A
            training knob for measuring how the offset's level acts on G (``docs/results.md``, session 51).
    """

    def __init__(
        self,
        blur: torch.nn.Module,
        dataset: Any,
        n_samples: int = 16,
        low_percentile: float = 1.0,
        high_percentile: float = 99.9,
        noise: torch.nn.Module | None = None,
        estimate_noise: bool = True,
        record_path: str | None = None,
        psf_fit: Any | None = None,
        fit_dataset: Any | None = None,
        statistic: str = "percentile",
        offset_shift: float = 0.0,
    ) -> None:
        self.blur = blur
        self.psf_fit = psf_fit
        self.dataset = dataset
        self.fit_dataset = dataset if fit_dataset is None else fit_dataset
        self.n_samples = int(n_samples)
        self.low_percentile = low_percentile
        self.high_percentile = high_percentile
        self.statistic = statistic
        self.offset_shift = float(offset_shift)
        self.noise = noise
        self.estimate_noise = as_flag(estimate_noise, "estimate_noise")
        self.record_path = None if record_path is None else Path(record_path)

    @staticmethod
    def _draw(dataset: Any, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` items of ``dataset`` as ``(count, 1, D, H, W)`` sharp and blurred batches."""
        items = [dataset[i % len(dataset)] for i in range(count)]
        sharp = torch.stack([torch.as_tensor(it["sharp"]) for it in items]).float().to(device)
        blurred = torch.stack([torch.as_tensor(it["blurred"]) for it in items]).float().to(device)
        return sharp, blurred

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration > 0 or not hasattr(self.blur, "calibrate"):
            return
        fit_psf = self.psf_fit is not None and self.psf_fit.fittable(self.blur)
        device = next(self.blur.parameters(), torch.empty(0)).device
        sharp, blurred = self._draw(self.dataset, self.n_samples, device)
        record: dict[str, Any] = {}
        if fit_psf:
            fit_sharp, fit_blurred = self._draw(self.fit_dataset, self.psf_fit.n_samples, device)
            record["psf_fit"] = self.psf_fit(self.blur, fit_sharp, fit_blurred)
            logger.info(
                f"PSF fitted to the power spectra of {fit_sharp.shape[0]} crops {tuple(fit_sharp.shape[2:])} per domain: "
                f"{record['psf_fit']['before']} -> {record['psf_fit']['after']} "
                f"(loss {record['psf_fit']['loss_before']:.4f} -> {record['psf_fit']['loss_after']:.4f})"
            )
        elif self.psf_fit is not None:
            logger.info("PSF fit skipped: the blur path's PSF is fixed (non-blind) or has no fitted parameters")
        with torch.no_grad():
            result = self.blur.calibrate(
                sharp, blurred, self.low_percentile, self.high_percentile, self.statistic
            )
        if self.offset_shift:
            with torch.no_grad():
                self.blur.offset.add_(self.offset_shift)
            result = {**result, "offset": float(self.blur.offset.detach()), "offset_shift": self.offset_shift}
        logger.info(f"blur path calibrated from {self.n_samples} samples: {result}")
        record["calibration"] = result
        if self.noise is not None and self.estimate_noise:
            from bundle.physics.noise_estimation import estimate_poisson_gaussian

            try:
                est = estimate_poisson_gaussian(blurred)
            except ValueError as exc:
                raise ValueError(f"cannot estimate the blurred domain's noise from the training crops: {exc}") from exc
            self.noise.set_parameters(est["photons_per_unit"], est["gaussian_sigma"], est["black_level"])
            record["noise_estimate"] = est
            logger.info(f"blur-path noise estimated from {est['voxels']} voxels: {self.noise.parameters_dict()}")
        elif self.noise is not None:
            logger.info(f"blur-path noise as configured (estimation off): {self.noise.parameters_dict()}")
        if self.noise is not None:
            record["blur_noise"] = self.noise.parameters_dict()
            scale = float(getattr(self.noise, "scale", 1.0))
            if scale != 1.0:
                record["blur_noise_scale"] = scale
                logger.info(f"blur-path noise added at {scale} times that standard deviation (blur_noise_scale)")
        # ignite's rank (as MONAI's handlers use): bundle.distributed builds on this module, not the reverse
        if self.record_path is not None and idist.get_rank() == 0:  # it runs on every rank; rank 0 writes
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_json(record, self.record_path)
