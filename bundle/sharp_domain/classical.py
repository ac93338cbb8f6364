"""The sharp domain from the user's own stacks, deconvolved by Richardson–Lucy (see :mod:`bundle.sharp_domain`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.flags import as_flag

logger = logging.getLogger(__name__)


__all__ = ["ClassicalSharpDomain"]


class ClassicalSharpDomain:
    """Sharp-domain volumes made from blurred stacks by Richardson–Lucy, iterations chosen per stack.

    Args:
        blurred_dir: the user's blurred stacks (folder, glob, file or list; as
            :func:`bundle.data.list_volumes`).
        cache_dir: where the deconvolved volumes (``<name>.tif``) and their records (``<name>.json``:
            iterations, misfit, noise estimate, PSF) are written.
        psf_file: a measured PSF (``(Z, Y, X)``, any format :func:`bundle.io.load_volume` reads); ``None``
            for the theoretical vectorial PSF of the optics below (``psfmodels``).
        na: numerical aperture.
        n_immersion: refractive index of the immersion medium.
        wavelength: emission wavelength, µm.
        voxel_size: ``(z, y, x)`` µm, used when a file carries none.
        psf_shape: size of the theoretical PSF, voxels (odd).
        max_iter: most RL iterations per stack.
        min_iter: fewest RL iterations per stack.
        discrepancy: stop when the misfit is at most ``discrepancy`` × the estimated noise variance.
        stall_tol: also stop when the misfit's relative decrease in one iteration is below this.
        background_percentile: percentile of each stack subtracted as the background before RL.
        progress: show a progress bar over the stacks.
        hot_pixel_threshold: replace each stack's hot pixels before RL (:func:`bundle.data.correct_hot_pixels`;
            RL would sharpen each into a bright line along Z); None: the stacks as stored.
    """

    def __init__(
        self,
        blurred_dir: str | os.PathLike | Sequence[str],
        cache_dir: str,
        psf_file: str | None = None,
        na: float = 1.4,
        n_immersion: float = 1.515,
        wavelength: float = 0.52,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        psf_shape: Sequence[int] = (31, 31, 31),
        max_iter: int = 200,
        min_iter: int = 5,
        discrepancy: float = 1.0,
        stall_tol: float = 1e-3,
        background_percentile: float = 1.0,
        progress: bool = True,
        hot_pixel_threshold: float | None = None,
    ) -> None:
        if not 1 <= int(min_iter) <= int(max_iter):
            raise ValueError(f"need 1 <= min_iter <= max_iter, got {min_iter}, {max_iter}")
        if not discrepancy > 0:
            raise ValueError(f"discrepancy must be positive, got {discrepancy}")
        self.blurred_dir = [str(d) for d in blurred_dir] if isinstance(blurred_dir, (list, tuple)) else str(blurred_dir)
        self.cache_dir = Path(cache_dir)
        self.psf_file = psf_file
        self.optics = {"na": float(na), "n_immersion": float(n_immersion), "wavelength": float(wavelength)}
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.psf_shape = tuple(int(s) for s in psf_shape)
        self.max_iter = int(max_iter)
        self.min_iter = int(min_iter)
        self.discrepancy = float(discrepancy)
        self.stall_tol = float(stall_tol)
        self.background_percentile = float(background_percentile)
        self.progress = as_flag(progress, "progress")
        from bundle.data.camera import hot_pixel_setting

        self.hot_pixel_threshold = hot_pixel_setting(hot_pixel_threshold)

    def _settings(self, voxel_size: Sequence[float]) -> dict[str, Any]:
        return {
            "psf_file": self.psf_file,
            **self.optics,
            "voxel_size": [float(v) for v in voxel_size],
            "psf_shape": list(self.psf_shape),
            "max_iter": self.max_iter,
            "min_iter": self.min_iter,
            "discrepancy": self.discrepancy,
            "stall_tol": self.stall_tol,
            "background_percentile": self.background_percentile,
            "hot_pixel_threshold": self.hot_pixel_threshold,
        }

    def psf(self, voxel_size: Sequence[float]) -> np.ndarray:
        """The PSF ``(Z, Y, X)`` (sum 1) for stacks of ``voxel_size``: the file's, or the theoretical one."""
        if self.psf_file is not None:
            from bundle.physics.measured import load_measured_psf

            return np.asarray(
                load_measured_psf(self.psf_file, target_voxel_size=tuple(voxel_size), shape=self.psf_shape), dtype=np.float32
            )
        from bundle.physics.psf import vectorial_psf

        return np.asarray(vectorial_psf(self.psf_shape, voxel_size=tuple(voxel_size), **self.optics), dtype=np.float32)

    def files(self) -> list[str]:
        """Deconvolve every blurred stack not yet in the cache; return the sharp volumes' paths."""
        from tqdm.auto import tqdm

        from bundle.data import list_volumes

        sources = list_volumes(self.blurred_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for source in tqdm(sources, desc="sharp domain (Richardson-Lucy)", unit="stack", disable=not self.progress):
            out.append(str(self._one(Path(source))))
        return out

    def _one(self, source: Path) -> Path:
        from bundle.data.camera import correct_hot_pixels
        from bundle.io import atomic_write_text, load_volume

        stat = source.stat()
        name = source.name.split(".")[0]
        key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
        target = self.cache_dir / f"{name}_{key}.tif"
        record_path = self.cache_dir / f"{name}_{key}.json"
        # the file's voxel size is covered by its size and mtime: the cache is checked before reading it
        stamp = {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **self._settings(self.voxel_size)}
        if target.is_file() and record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
            except ValueError:
                record = {}
            if record.get("stamp") == stamp:
                return target
        volume, meta = load_volume(str(source), dtype=np.float32)
        volume = correct_hot_pixels(volume, self.hot_pixel_threshold)[0]
        voxel_size = meta.get("voxel_size") or self.voxel_size
        y = np.clip(volume - np.percentile(volume, self.background_percentile), 0.0, None)
        record = self._deconvolve(source, volume, y, voxel_size, target)
        record["stamp"] = stamp
        record["voxel_size"] = [float(v) for v in voxel_size]
        atomic_write_text(record_path, json.dumps(record, indent=2))
        logger.info(f"{source.name}: Richardson-Lucy stopped at iteration {record['iterations']} ({record['stopped_by']})")
        return target

    def _deconvolve(
        self, source: Path, raw: np.ndarray, y: np.ndarray, voxel_size: Sequence[float], target: Path
    ) -> dict[str, Any]:
        from bundle.classical import _SpectralBlur, richardson_lucy
        from bundle.io import save_volume
        from bundle.physics.noise_estimation import estimate_poisson_gaussian

        try:  # on the raw stack: the background subtraction clips the dark voxels' noise
            noise = estimate_poisson_gaussian(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: cannot estimate its noise for the stopping rule: {exc}") from exc
        variance = max(noise["slope"] * float(raw.mean()) + noise["intercept"], 1e-12)
        psf = torch.from_numpy(self.psf(voxel_size))
        yt = torch.from_numpy(y)
        history: list[float] = []

        blur = _SpectralBlur(psf, y.shape, "reflect")  # the kernel's spectrum once, not per iteration

        def stop(it: int, estimate: torch.Tensor) -> bool:
            misfit = float(((yt - blur.forward(estimate.float())) ** 2).mean())
            stalled = bool(history) and (history[-1] - misfit) < self.stall_tol * misfit
            history.append(misfit)
            return it >= self.min_iter and (misfit <= self.discrepancy * variance or stalled)

        x = richardson_lucy(yt, psf, num_iter=self.max_iter, pad_mode="reflect", callback=stop)
        iterations = len(history)
        save_volume(target, np.asarray(x, dtype=np.float32), voxel_size=voxel_size)
        return {
            "iterations": iterations,
            "stopped_by": (
                "discrepancy"
                if history[-1] <= self.discrepancy * variance
                else "max_iter" if iterations >= self.max_iter else "stalled"
            ),
            "misfit": history[-1],
            "noise_variance": variance,
            "noise": noise,
            "misfit_history": history,
        }
