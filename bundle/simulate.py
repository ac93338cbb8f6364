"""Simulated datasets: synthetic phantoms (microtubules, or vesicles) seen through a widefield microscope.

The paper's simulation (Sec. IV-A): random filament networks blurred by a Born & Wolf PSF
(NA 1.4, n_i 1.5, λ 500 nm, 100 nm voxels, 31³ kernel) with Gaussian then Poisson noise at an
average SNR of 20 dB. The training domains are unpaired: the sharp and the blurred training
volumes come from different phantoms. Validation and test volumes are paired with their ground truth.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bundle.flags import as_flag
from bundle.io import save_volume
from bundle.physics.forward import simulate_acquisition
from bundle.physics.phantom import PHANTOM_MODELS, make_phantom
from bundle.physics.psf import make_psf

__all__ = ["SimulateDataset", "SimulatedValidation"]

logger = logging.getLogger(__name__)

# parameters added after the first datasets were made, with the value those datasets used
_ADDED_DEFAULTS: dict[str, Any] = {"phantom_model": "microtubules", "n_sample": None, "psf_depth": 0.0}


class SimulateDataset:
    """Write a ready-to-train simulated dataset under ``dataset_dir``.

    Layout::

        dataset_dir/
            train/sharp/sharp_000.tif ...      sharp domain X (ground-truth phantoms)
            train/blurred/blurred_000.tif ...  blurred domain Y (other phantoms, blurred + noise)
            train/blurred_ground_truth/...     the phantoms behind train/blurred: only the supervised
                                               baselines read them; the cycleGAN never does
            val/blurred/val_000.tif ...        paired with val/ground_truth/val_000.tif
            test/blurred/test_000.tif ...      paired with test/ground_truth/test_000.tif
            psf.tif                            the PSF used for blurring (voxel size in the file)
            dataset.json                       manifest: every physical parameter, achieved SNRs

    The dataset is built in a temporary folder beside ``dataset_dir`` and renamed into place, so an
    interrupted run leaves nothing half-written. If ``dataset_dir`` already holds a dataset made with
    the same parameters, :meth:`run` keeps it; with other parameters it refuses unless ``overwrite``.

    Args:
        dataset_dir: output folder.
        shape: ``(Z, Y, X)`` of the training volumes.
        eval_shape: ``(Z, Y, X)`` of validation/test volumes (default ``shape``).
        n_train: number of volumes in each training domain.
        n_val: validation volumes.
        n_test: test volumes.
        psf_model: ``"born_wolf"`` (the paper's eq. 23), ``"vectorial"``, ``"scalar"`` or ``"gaussian"``.
        n_sample: sample refractive index of the ``psfmodels`` PSFs (None: the immersion index).
        psf_depth: source depth below the coverslip in µm for the ``psfmodels`` PSFs; with
            ``n_sample`` != ``n_immersion`` it adds the spherical aberration of the mismatch.
        psf_shape: kernel size ``(Z, Y, X)``.
        na: numerical aperture.
        n_immersion: refractive index of the immersion medium.
        wavelength: emission wavelength in µm.
        voxel_size: ``(z, y, x)`` in µm.
        snr_db: target average SNR in dB of the blurred volumes; ``None`` for noise-free.
        poisson_fraction: share of the noise power that is Poisson (the rest Gaussian).
        phantom_model: structure family, a key of :data:`bundle.physics.phantom.PHANTOM_MODELS`
            (``"microtubules"``, the paper's; ``"vesicles"``: shells and puncta, an independent test domain).
        phantom: extra keyword arguments of the phantom function (e.g.
            :func:`bundle.physics.phantom.microtubule_phantom`).
        seed: seed of everything random; the same seed gives the same dataset.
        overwrite: replace an existing dataset made with other parameters.
        progress: show a progress bar.
    """

    def __init__(
        self,
        dataset_dir: str,
        shape: Sequence[int] = (32, 96, 96),
        eval_shape: Sequence[int] | None = None,
        n_train: int = 4,
        n_val: int = 2,
        n_test: int = 1,
        psf_model: str = "born_wolf",
        psf_shape: Sequence[int] = (31, 31, 31),
        na: float = 1.4,
        n_immersion: float = 1.5,
        wavelength: float = 0.5,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        snr_db: float | None = 20.0,
        poisson_fraction: float = 0.5,
        phantom: dict[str, Any] | None = None,
        seed: int = 0,
        phantom_model: str = "microtubules",
        n_sample: float | None = None,
        psf_depth: float = 0.0,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        if min(n_train, n_val, n_test) < 0 or n_train < 1:
            raise ValueError(f"need n_train >= 1 and n_val, n_test >= 0, got {n_train}, {n_val}, {n_test}")
        if phantom_model not in PHANTOM_MODELS:
            raise ValueError(f"unknown phantom_model {phantom_model!r}; choose one of {sorted(PHANTOM_MODELS)}")
        if (n_sample is not None or psf_depth) and psf_model not in ("vectorial", "scalar"):
            raise ValueError(f"n_sample and psf_depth apply to the psfmodels PSFs (vectorial, scalar), not {psf_model!r}")
        self.dataset_dir = Path(dataset_dir)
        self.params: dict[str, Any] = {
            "shape": [int(s) for s in shape],
            "eval_shape": [int(s) for s in (eval_shape or shape)],
            "n_train": int(n_train),
            "n_val": int(n_val),
            "n_test": int(n_test),
            "psf_model": psf_model,
            "psf_shape": [int(s) for s in psf_shape],
            "na": float(na),
            "n_immersion": float(n_immersion),
            "wavelength": float(wavelength),
            "voxel_size": [float(v) for v in voxel_size],
            "snr_db": None if snr_db is None else float(snr_db),
            "poisson_fraction": float(poisson_fraction),
            "phantom": dict(phantom or {}),
            "seed": int(seed),
            "phantom_model": phantom_model,
            "n_sample": None if n_sample is None else float(n_sample),
            "psf_depth": float(psf_depth),
        }
        self.overwrite = as_flag(overwrite, "overwrite")
        self.progress = as_flag(progress, "progress")

    def psf(self) -> np.ndarray:
        """The PSF ``(Z, Y, X)`` float32, sum 1, used to blur every volume."""
        p = self.params
        kwargs: dict[str, Any] = {"shape": p["psf_shape"], "voxel_size": p["voxel_size"]}
        if p["psf_model"] != "gaussian":
            kwargs.update(na=p["na"], n_immersion=p["n_immersion"], wavelength=p["wavelength"])
        if p["psf_model"] in ("vectorial", "scalar"):
            kwargs.update(n_sample=p["n_sample"], depth=p["psf_depth"])
        return make_psf(p["psf_model"], **kwargs)

    def _existing_params(self) -> dict | None:
        manifest = self.dataset_dir / "dataset.json"
        if not manifest.is_file():
            return None
        try:
            params = json.loads(manifest.read_text()).get("parameters")
        except (OSError, json.JSONDecodeError):
            return None
        # datasets made before a parameter existed were made with its default
        return None if params is None else {**_ADDED_DEFAULTS, **params}

    def run(self) -> dict[str, Any]:
        """Simulate and write the dataset; returns the manifest (also written as ``dataset.json``)."""
        existing = self._existing_params()
        if existing == self.params:
            logger.info(f"{self.dataset_dir}: a dataset with these parameters exists, keeping it")
            return json.loads((self.dataset_dir / "dataset.json").read_text())
        if self.dataset_dir.exists() and any(self.dataset_dir.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"{self.dataset_dir}: folder exists and is not a dataset simulated with these parameters; "
                "choose another dataset_dir or set overwrite=True (--simulator#overwrite true)"
            )
        self.dataset_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dataset_dir.name}.", suffix=".tmp", dir=self.dataset_dir.parent))
        try:
            manifest = self._write(tmp)
            if self.dataset_dir.exists():
                old = self.dataset_dir.with_name(f".{self.dataset_dir.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.dataset_dir, old)
                os.replace(tmp, self.dataset_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, self.dataset_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(f"simulated dataset written to {self.dataset_dir}")
        return manifest

    def _write(self, root: Path) -> dict[str, Any]:
        p = self.params
        voxel = tuple(p["voxel_size"])
        psf = self.psf()
        save_volume(root / "psf.tif", psf, voxel_size=voxel, dtype=np.float32)
        jobs: list[tuple[str, str, int, Sequence[int]]] = []  # (split, kind, index, shape)
        jobs += [("train", "sharp", i, p["shape"]) for i in range(p["n_train"])]
        jobs += [("train", "blurred", i, p["shape"]) for i in range(p["n_train"])]
        jobs += [("val", "paired", i, p["eval_shape"]) for i in range(p["n_val"])]
        jobs += [("test", "paired", i, p["eval_shape"]) for i in range(p["n_test"])]
        seeds = np.random.SeedSequence(p["seed"]).spawn(len(jobs))
        records: list[dict[str, Any]] = []
        for (split, kind, i, shape), ss in tqdm(
            list(zip(jobs, seeds)), desc="simulating", disable=not self.progress, unit="vol"
        ):
            rng = np.random.default_rng(ss)
            sharp = make_phantom(p["phantom_model"], shape=tuple(shape), seed=rng, **p["phantom"])
            record: dict[str, Any] = {"split": split}
            if kind == "sharp":
                record["sharp"] = self._save(root, f"train/sharp/sharp_{i:03d}.tif", sharp, voxel)
            else:
                blurred, stats = simulate_acquisition(
                    sharp, psf, p["snr_db"], poisson_fraction=p["poisson_fraction"], seed=rng
                )
                record["noise"] = {k: (None if v is None else float(v)) for k, v in stats.items()}
                if kind == "blurred":
                    record["blurred"] = self._save(root, f"train/blurred/blurred_{i:03d}.tif", blurred, voxel)
                    record["ground_truth"] = self._save(
                        root, f"train/blurred_ground_truth/blurred_{i:03d}.tif", sharp, voxel
                    )
                else:
                    name = f"{split}_{i:03d}.tif"
                    record["blurred"] = self._save(root, f"{split}/blurred/{name}", blurred, voxel)
                    record["ground_truth"] = self._save(root, f"{split}/ground_truth/{name}", sharp, voxel)
            records.append(record)
        snrs = [r["noise"]["average_snr_db"] for r in records if r.get("noise", {}).get("average_snr_db") is not None]
        manifest = {
            "description": f"simulated widefield microscopy of synthetic {p['phantom_model']} phantoms (bundle.simulate)",
            "axes": "ZYX",
            "voxel_size_um": list(voxel),
            "psf": "psf.tif",
            "parameters": p,
            "achieved_average_snr_db": float(np.mean(snrs)) if snrs else None,
            "volumes": records,
        }
        with open(root / "dataset.json", "w") as f:
            json.dump(manifest, f, indent=2)
        return manifest

    @staticmethod
    def _save(root: Path, rel: str, volume: np.ndarray, voxel: tuple[float, ...]) -> str:
        save_volume(root / rel, volume.astype(np.float32), voxel_size=voxel, dtype=np.float32)
        return rel


class SimulatedValidation:
    """Validation pairs simulated at the user's optics: for a run whose stacks have no ground truth.

    Phantoms of ``phantom_model`` rendered at ``voxel_size``, blurred by the vectorial (``psfmodels``)
    PSF of the optics keys and made noisy at ``snr_db``, written once under ``dataset_dir`` by
    :class:`SimulateDataset` (reused while the settings are unchanged). The model is then chosen on
    PSNR against these pairs: on data like the user's, not the user's data — the simulated structures
    and the aberration-free PSF are assumptions (``configs/val_simulated.json`` says so in the user
    guide).

    Args:
        dataset_dir: where the pairs go (e.g. ``<output_dir>/val_simulated``).
        na, n_immersion, wavelength: the optics keys (µm).
        voxel_size: ``(z, y, x)`` µm of the user's stacks.
        shape: ``(Z, Y, X)`` of each pair.
        n_val: number of pairs.
        phantom_model: ``"microtubules"`` or ``"vesicles"``.
        snr_db: average SNR of the simulated noise.
        psf_shape: ``(Z, Y, X)`` of the simulated PSF.
        seed: seed of the phantoms and the noise.
    """

    def __init__(
        self,
        dataset_dir: str,
        na: float = 1.4,
        n_immersion: float = 1.515,
        wavelength: float = 0.52,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        shape: Sequence[int] = (32, 128, 128),
        n_val: int = 2,
        phantom_model: str = "microtubules",
        snr_db: float = 20.0,
        psf_shape: Sequence[int] = (31, 31, 31),
        seed: int = 0,
    ) -> None:
        if int(n_val) < 1:
            raise ValueError(f"need at least one validation pair, got n_val={n_val}")
        # n_train=1: SimulateDataset writes at least one training pair; a small one, never read here
        self.simulator = SimulateDataset(
            dataset_dir, shape=(8, 32, 32), eval_shape=shape, n_train=1, n_val=int(n_val), n_test=0,
            psf_model="vectorial", psf_shape=psf_shape, na=na, n_immersion=n_immersion, wavelength=wavelength,
            voxel_size=voxel_size, snr_db=snr_db, seed=seed, phantom_model=phantom_model, progress=False,
        )  # fmt: skip

    def datalist(self) -> list[dict[str, str]]:
        """Simulate (once) and return ``[{"image": blurred, "label": ground_truth}, ...]``."""
        from bundle.data import paired_datalist

        self.simulator.run()
        root = self.simulator.dataset_dir
        return paired_datalist(str(root / "val" / "blurred"), str(root / "val" / "ground_truth"))
