"""Where the sharp domain comes from when the user has no sharp volumes: their own stacks, deconvolved.

The paper trained on real data against sharp volumes made by a commercial deconvolution package
from the same kind of stacks. :class:`ClassicalSharpDomain` does that with the bundle's
Richardson–Lucy (:func:`bundle.classical.richardson_lucy`) and a theoretical PSF from the optics keys
(or a measured PSF file), and stops each stack's iterations by Morozov's discrepancy principle: at
the first iteration whose data misfit ``mean((y − h * x_k)²)`` falls to the noise variance that
:func:`bundle.physics.noise_estimation.estimate_poisson_gaussian` measures on that stack (further
iterations would fit the noise), or, when the PSF model cannot bring the misfit that low (a wrong
NA, aberrations, a background the model lacks), at the first iteration where the misfit stalls
(relative decrease below ``stall_tol``). No ground truth is needed. Results are cached next to a record of
how they were made, and reused while the source file and the settings are unchanged.

:class:`SimulatedSharpDomain` instead renders the bundle's phantoms (filaments or vesicles and
puncta) at the user's voxel size, with their physical sizes kept.

In a config (``configs/sharp_from_rl.json``)::

    "sharp_domain": {"_target_": "bundle.sharp_domain.ClassicalSharpDomain", "blurred_dir": ..., ...},
    "train#dataset#sharp_dir": "$@sharp_domain.files()"
"""

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

__all__ = ["ClassicalSharpDomain", "SimulatedSharpDomain"]

logger = logging.getLogger(__name__)


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


class SimulatedSharpDomain:
    """Sharp-domain volumes rendered by the bundle's simulator at the data's voxel size (cached).

    Physical sizes are kept whatever the voxel size: filaments of 0.1 µm Gaussian radius and 3 µm
    persistence length (``"microtubules"``), shells of 0.3–0.9 µm radius and puncta of 60–120 nm
    (``"vesicles"``), converted to voxels per axis. Intensities are in [0, 1]; the training
    normalisation matches the two domains' scales. The number of structures is the phantom
    functions' default (density per voxel at 0.1 µm voxels, rescaled to the volume's physical size)
    times ``density``; with ``match_blurred`` the multiplier is chosen so that the phantoms, blurred by
    the optics' PSF, are as crowded as the user's stacks (:func:`bundle.physics.density.match_density`;
    the choice is logged and kept in ``sharp_sim.json``).

    Args:
        cache_dir: where ``sharp_sim_<i>.tif`` are written (reused while the settings are unchanged).
        phantom_model: ``"microtubules"`` or ``"vesicles"`` (:data:`bundle.physics.phantom.PHANTOM_MODELS`).
        n_volumes: how many volumes.
        shape: ``(Z, Y, X)`` voxels of each volume.
        voxel_size: ``(z, y, x)`` µm.
        seed: seed of the first volume (volume ``i`` uses ``seed + i``).
        density: multiple of the default number of structures (> 0); ignored with ``match_blurred``.
        match_blurred: the user's blurred stacks (folder, glob, file or list) to match the density to;
            ``None``: use ``density``.
        na: numerical aperture of the PSF used for matching (vectorial, ``psfmodels``).
        n_immersion: immersion refractive index.
        wavelength: emission wavelength, µm.
        psf_shape: PSF size for matching, voxels.
    """

    def __init__(
        self,
        cache_dir: str,
        phantom_model: str = "microtubules",
        n_volumes: int = 8,
        shape: Sequence[int] = (32, 128, 128),
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        seed: int = 0,
        density: float = 1.0,
        match_blurred: str | os.PathLike | Sequence[str] | None = None,
        na: float = 1.4,
        n_immersion: float = 1.515,
        wavelength: float = 0.52,
        psf_shape: Sequence[int] = (31, 31, 31),
    ) -> None:
        from bundle.physics.phantom import PHANTOM_MODELS

        if phantom_model not in PHANTOM_MODELS:
            raise ValueError(f"unknown phantom_model {phantom_model!r}; choose one of {sorted(PHANTOM_MODELS)}")
        if int(n_volumes) < 1:
            raise ValueError(f"n_volumes must be >= 1, got {n_volumes}")
        self.cache_dir = Path(cache_dir)
        self.phantom_model = phantom_model
        self.n_volumes = int(n_volumes)
        self.shape = tuple(int(s) for s in shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        if len(self.shape) != 3 or len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"need a 3D shape and positive voxel sizes, got {shape}, {voxel_size}")
        self.seed = int(seed)
        if not float(density) > 0:
            raise ValueError(f"density must be a positive multiple of the default, got {density}")
        self.density = float(density)
        self.match_blurred = (
            None if match_blurred is None
            else [str(d) for d in match_blurred] if isinstance(match_blurred, (list, tuple)) else str(match_blurred)
        )
        self.optics = {"na": float(na), "n_immersion": float(n_immersion), "wavelength": float(wavelength)}
        self.psf_shape = tuple(int(s) for s in psf_shape)
        self.density_match: dict[str, Any] | None = None

    def matched_density(self) -> dict[str, Any]:
        """Choose the density multiplier from ``match_blurred`` (see :func:`~bundle.physics.density.match_density`)."""
        from bundle.data import list_volumes
        from bundle.io import load_volume
        from bundle.physics.density import match_density
        from bundle.physics.phantom import make_phantom
        from bundle.physics.psf import vectorial_psf

        stacks = [load_volume(f, dtype=np.float32)[0] for f in list_volumes(self.match_blurred)]
        psf = vectorial_psf(self.psf_shape, voxel_size=self.voxel_size, **self.optics)
        result = match_density(
            stacks, psf, lambda m, i: make_phantom(self.phantom_model, shape=self.shape, seed=self.seed + 1000 + i,
                                                   **self.phantom_arguments(m))
        )
        note = " (outside the tried range: the nearest end)" if result["clipped"] else ""
        logger.info(
            f"simulated sharp domain: density x{result['multiplier']:.3g} of the default{note}, matching the "
            f"occupancy {result['target']:.4f} of {len(stacks)} blurred stacks"
        )
        return result

    def phantom_arguments(self, density: float | None = None) -> dict[str, Any]:
        """Keyword arguments of the phantom function for this voxel size (sizes in voxels), with
        ``density`` (default: the chosen multiplier) times the default number of structures."""
        if density is None:
            density = self.density_match["multiplier"] if self.density_match else self.density
        vz, vy, vx = self.voxel_size
        lateral = (vy + vx) / 2
        volume_um3 = np.prod(self.shape) * vz * vy * vx
        per_reference_voxel = density * volume_um3 / 1e-3  # the phantoms' default densities are per (0.1 µm)³ voxel
        if self.phantom_model == "microtubules":
            return {
                "radius": (0.1 / vz, 0.1 / vy, 0.1 / vx),
                "persistence_length": 3.0 / lateral,
                "n_filaments": max(1, round(28 * per_reference_voxel / (64 * 128 * 128))),
            }
        return {
            "radius_range": (0.3 / lateral, 0.9 / lateral),
            "shell_width": 0.08 / lateral,
            "punctum_radius_range": (0.06 / lateral, 0.12 / lateral),
            "z_scale": vz / lateral,
            "n_vesicles": max(1, round(per_reference_voxel / 40000)),
            "n_puncta": max(1, round(per_reference_voxel / 5000)),
        }

    def files(self) -> list[str]:
        """Render the volumes not yet in the cache; return their paths."""
        from bundle.io import atomic_write_text, save_volume
        from bundle.physics.phantom import make_phantom

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        record = self.cache_dir / "sharp_sim.json"
        try:
            previous = json.loads(record.read_text()) if record.is_file() else {}
        except ValueError:
            previous = {}
        if self.match_blurred is not None and self.density_match is None:
            sources = {"match_blurred": self.match_blurred, **self.optics, "psf_shape": list(self.psf_shape)}
            kept = previous.get("density_match")
            if kept and kept.get("sources") == sources:
                self.density_match = kept
            else:
                self.density_match = {**self.matched_density(), "sources": sources}
        stamp = {"phantom_model": self.phantom_model, "shape": list(self.shape), "voxel_size": list(self.voxel_size),
                 "seed": self.seed, "arguments": {k: list(v) if isinstance(v, tuple) else v for k, v in self.phantom_arguments().items()},
                 "density_match": self.density_match}  # fmt: skip
        same = previous == stamp
        out = []
        for i in range(self.n_volumes):
            path = self.cache_dir / f"sharp_sim_{i:03d}.tif"
            if not (same and path.is_file()):
                volume = make_phantom(self.phantom_model, shape=self.shape, seed=self.seed + i, **self.phantom_arguments())
                save_volume(path, np.asarray(volume, dtype=np.float32), voxel_size=self.voxel_size)
            out.append(str(path))
        atomic_write_text(record, json.dumps(stamp, indent=2))
        return out
