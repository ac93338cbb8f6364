"""The sharp domain rendered by the bundle's simulator, matched to the user's stacks (see :mod:`bundle.sharp_domain`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.flags import as_flag

logger = logging.getLogger(__name__)


__all__ = ["SimulatedSharpDomain"]


class SimulatedSharpDomain:
    """Sharp-domain volumes rendered by the bundle's simulator at the data's voxel size (cached).

    Physical sizes are kept whatever the voxel size: filaments of 0.1 µm Gaussian radius and 3 µm
    persistence length (``"microtubules"``), shells of 0.3–0.9 µm radius and puncta of 60–120 nm
    (``"vesicles"``), converted to voxels per axis. Intensities are in [0, 1]; the training
    normalisation matches the two domains' scales. The number of structures is the phantom
    functions' default (density per voxel at 0.1 µm voxels, rescaled to the volume's physical size)
    times ``density``; with ``match_blurred`` the multiplier is chosen so that the phantoms, blurred by
    the optics' PSF, are as crowded as the user's stacks (:func:`bundle.physics.density.match_density`)
    and, with ``match_brightness``, the low end of the structures' intensity range so that as large a
    share of the structure is dim (:func:`bundle.physics.density.match_brightness`): density at the
    phantoms' default brightness, then brightness at that density, then density again. The choices are
    logged and kept in ``sharp_sim.json``.

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
        match_brightness: with ``match_blurred``, match the structures' brightness spread too
            (False: the phantoms' default intensity range).
        na: numerical aperture of the PSF used for matching (vectorial, ``psfmodels``).
        n_immersion: immersion refractive index.
        wavelength: emission wavelength, µm.
        psf_shape: PSF size for matching, voxels.
        hot_pixel_threshold: replace the camera's hot pixels of the ``match_blurred`` stacks before
            matching (:func:`bundle.data.correct_hot_pixels`; the ``hot_pixel_threshold`` key, as the
            training reads those stacks); None: as stored.
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
        match_brightness: bool = True,
        na: float = 1.4,
        n_immersion: float = 1.515,
        wavelength: float = 0.52,
        psf_shape: Sequence[int] = (31, 31, 31),
        hot_pixel_threshold: float | None = None,
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
        self.match_brightness = as_flag(match_brightness, "match_brightness")
        self.optics = {"na": float(na), "n_immersion": float(n_immersion), "wavelength": float(wavelength)}
        self.psf_shape = tuple(int(s) for s in psf_shape)
        self.density_match: dict[str, Any] | None = None
        from bundle.data.camera import hot_pixel_setting

        self.hot_pixel_threshold = hot_pixel_setting(hot_pixel_threshold)

    def matched_density(self) -> dict[str, Any]:
        """Choose the density multiplier (and, with ``match_brightness``, the intensity range's low end)
        from ``match_blurred`` (see :mod:`bundle.physics.density`)."""
        from bundle.data import correct_hot_pixels, list_volumes
        from bundle.io import load_volume
        from bundle.physics.density import match_brightness, match_density
        from bundle.physics.phantom import make_phantom
        from bundle.physics.psf import vectorial_psf

        # a hot pixel would count as crowded, bright structure
        stacks = [correct_hot_pixels(load_volume(f, dtype=np.float32)[0], self.hot_pixel_threshold)[0]
                  for f in list_volumes(self.match_blurred)]  # fmt: skip
        psf = vectorial_psf(self.psf_shape, voxel_size=self.voxel_size, **self.optics)

        def render(density: float, low: float | None, i: int) -> np.ndarray:
            return make_phantom(self.phantom_model, shape=self.shape, seed=self.seed + 1000 + i,
                                **self.phantom_arguments(density, low))

        result: dict[str, Any] = match_density(stacks, psf, lambda m, i: render(m, None, i))
        if self.match_brightness:
            density = result["multiplier"]
            brightness = match_brightness(stacks, psf, lambda low, i: render(density, low, i))
            result = {**match_density(stacks, psf, lambda m, i: render(m, brightness["low"], i)), "brightness": brightness}
        note = " (outside the tried range: the nearest end)" if result["clipped"] else ""
        bright = (
            f"; structure intensities in ({result['brightness']['low']:.3g}, 1), matching the bright share "
            f"{result['brightness']['target']:.3f}" if "brightness" in result else ""
        )
        logger.info(
            f"simulated sharp domain: density x{result['multiplier']:.3g} of the default{note}, matching the "
            f"occupancy {result['target']:.4f} of {len(stacks)} blurred stacks{bright}"
        )
        return result

    def phantom_arguments(self, density: float | None = None, low: float | None = None) -> dict[str, Any]:
        """Keyword arguments of the phantom function for this voxel size (sizes in voxels), with
        ``density`` (default: the chosen multiplier) times the default number of structures and
        intensities in ``(low, 1)`` (default: the matched low end, else the phantoms' own range)."""
        if density is None:
            density = self.density_match["multiplier"] if self.density_match else self.density
        if low is None and self.density_match and "brightness" in self.density_match:
            low = self.density_match["brightness"]["low"]
        brightness = {} if low is None else {"intensity_range": (float(low), 1.0)}
        vz, vy, vx = self.voxel_size
        lateral = (vy + vx) / 2
        volume_um3 = np.prod(self.shape) * vz * vy * vx
        per_reference_voxel = density * volume_um3 / 1e-3  # the phantoms' default densities are per (0.1 µm)³ voxel
        if self.phantom_model == "microtubules":
            return {
                "radius": (0.1 / vz, 0.1 / vy, 0.1 / vx),
                "persistence_length": 3.0 / lateral,
                "n_filaments": max(1, round(28 * per_reference_voxel / (64 * 128 * 128))),
                **brightness,
            }
        return {
            "radius_range": (0.3 / lateral, 0.9 / lateral),
            "shell_width": 0.08 / lateral,
            "punctum_radius_range": (0.06 / lateral, 0.12 / lateral),
            "z_scale": vz / lateral,
            "n_vesicles": max(1, round(per_reference_voxel / 40000)),
            "n_puncta": max(1, round(per_reference_voxel / 5000)),
            **brightness,
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
            sources = {"match_blurred": self.match_blurred, "match_brightness": self.match_brightness, **self.optics,
                       "psf_shape": list(self.psf_shape), "hot_pixel_threshold": self.hot_pixel_threshold}
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
