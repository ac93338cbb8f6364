"""The training mode a config declares (``mode``), checked against what the configs build."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


#: the training modes a config can declare with its ``mode`` key
MODES = ("blind", "nonblind", "conventional", "supervised", "supervised_gan")


def check_mode(
    mode: str, blur: torch.nn.Module | None, psf_fit: Any | None = None, psf_learning_rate: float | None = None
) -> None:
    """Check that the config's declared ``mode`` matches the blur path it builds; raise if not.

    The configs set ``mode`` (``train.json``: blind; ``train_nonblind.json``: nonblind; …) but what is
    trained is decided by the config files layered, so ``--mode nonblind`` on the blind list would
    otherwise train blind without a word. Runs first in the ``training`` / ``initialize`` lists.
    In blind mode the PSF must be estimated somehow: fitted to the spectra before training (``psf_fit``,
    the default; only parameterised kernels can be) or learned with G (``psf_learning_rate`` > 0,
    ``configs/learned_psf.json``). A free-form kernel with the fit's frozen default would stay at its
    start without a word, so that raises too.

    Args:
        mode: one of :data:`MODES`.
        blur: the built blur path (``@blur_path``): a PSF layer, the conventional cycleGAN's second
            generator, or ``None`` (supervised).
        psf_fit: the config's ``psf_fit`` (a :class:`~bundle.physics.psf_estimation.SpectralPSFFit` or ``None``).
        psf_learning_rate: the PSF kernel's learning rate; ``None`` skips the blind-PSF check.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    fix = {
        "blind": "use configs/train.json without configs/train_nonblind.json",
        "nonblind": "add configs/train_nonblind.json to --config_file (it fixes the PSF to --psf_file)",
        "conventional": "add configs/train_conventional.json to --config_file",
        "supervised": "add configs/train_supervised.json to --config_file",
        "supervised_gan": "add configs/train_supervised.json and configs/train_supervised_gan.json to --config_file",
    }[mode]
    if mode in ("supervised", "supervised_gan"):
        found = "no blur path" if blur is None else f"a blur path ({type(blur).__name__})"
        ok = blur is None
    elif blur is None:
        found, ok = "no blur path", False
    elif not hasattr(blur, "kernel_parameters"):
        found, ok = f"a network blur path ({type(blur).__name__})", mode == "conventional"
    else:
        learned = any(p.requires_grad for p in blur.kernel_parameters())
        found = "a PSF layer that learns its PSF" if learned else "a PSF layer with a fixed PSF"
        ok = (mode == "blind") == learned and mode in ("blind", "nonblind")
    if not ok:
        raise ValueError(f"mode {mode!r} does not match the configs, which build {found}: {fix}")
    if mode == "blind" and psf_learning_rate is not None and float(psf_learning_rate) <= 0:
        fitted = psf_fit is not None and psf_fit.fittable(blur)
        if not fitted:
            kernel = type(getattr(blur, "kernel_module", blur)).__name__
            why = "psf_fit is null" if psf_fit is None else f"{kernel} has no physical parameters to fit to the spectra"
            raise ValueError(
                f"blind mode would keep the PSF at its start: {why} and psf_learning_rate is 0; add "
                "configs/learned_psf.json after train.json to learn it with G (or give --psf_learning_rate 0.02)"
            )
