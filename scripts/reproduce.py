#!/usr/bin/env python
"""Reproduce the paper's simulation study (Lim et al., IEEE TCI 2020, Tables I–II, Figs. 6–9).

Steps (each skipped when its result is already on disk, so an interrupted run resumes):

1. simulate the training data (Born & Wolf PSF, 20 dB average SNR; ``configs/simulate.json``) and
   the test sets: Born & Wolf at every noise level of Fig. 8 (no noise, 20, 10, 5, 2.5, 1.25 dB)
   and the vectorial (Richards & Wolf) PSF at 20 dB (Table II). All test sets hold the *same*
   phantoms (one seed), so every method and condition is scored on identical objects;
2. train every learned method with ``python -m monai.bundle run training`` (a subprocess each, the
   bundle's configs layered: ``common.json + train.json + <method overrides> + <scale overrides>``;
   resumed from the newest checkpoint after an interruption). The best model by validation PSNR
   (``ckpt_dir/model.pt``) is the one tested;
3. choose Richardson–Lucy's iteration count on the validation volume (never on test), for RL with the
   data's true PSF (``rl``) and with the Born & Wolf PSF of the data's nominal optics (``rl_born_wolf``:
   the PSF a user without a measured one would compute; the blind targets compare with it);
4. with ``--refine``: for each model with a PSF layer (the blind ones, non-blind, sharp cycle) choose the
   refinement of its output — Richardson–Lucy started from it through its ``models/blur.tif`` — on the
   validation volumes (``scripts/tune_refinement.py``: iterations, TV weight and the blend with G's
   output, written to ``models/refinement.json``); its rows ``<method>_refined`` are scored beside the method's own;
5. deconvolve every test volume with every method through the inference pipeline of the bundle
   (``configs/inference.json`` [+ ``inference_rl.json``]: same normalisation, sliding window) and
   score it against the ground truth with one normalisation for all (see ``NORMALISATION``);
6. write ``results.json``, ``results.md`` (Table I, Table II, noise sweep, with the paper's numbers
   beside ours), ``noise_sweep.png`` and XY/XZ/YZ figures.

Domains (``--domain``): ``born_wolf`` (default, the paper's study above: microtubules, Born & Wolf
training data) or ``vesicles``, an independent test domain the networks were not tuned on (shells and
puncta, psfmodels' vectorial PSF with the spherical aberration of an oil-to-water index mismatch at
2 µm depth, as ``configs/simulate_vesicles.json``; training and test data of that domain, one
Table II-style table). Every table scores PSNR, SSIM and the dim-structure recall and precision
(:func:`bundle.metrics.dim_structure`). ``sharp_cycle`` is the baseline that tells what the unpaired
terms add: the non-blind model with the blurred cycle and the adversarial losses off, i.e. trained on
the sharp cycle's synthetic pairs alone (h*x + noise -> x, CARE-style). ``blind`` is the blind default
(``configs/train.json``): the PSF fitted to the unpaired power spectra before the first iteration and frozen,
G trained with the non-blind weights; ``blind_learned`` learns the PSF with G from NA 1.0 instead
(``configs/learned_psf.json``, the blind default until session 32); the report gives each blind model's PSF
correlation with the true one.

Scales: ``tiny`` (a test: a few iterations, minutes), ``small`` (2 CPU cores, about an hour),
``paper`` (the paper's sizes: 128×256×512 volumes, 18/1/1, 64³ crops, lr 1e-4, full-size networks;
for a GPU).

Example::

    python scripts/reproduce.py --scale small --output docs/results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # the bundle, and tune_refinement.py beside this script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

logger = logging.getLogger("reproduce")

#: learned methods: config files layered after common.json (the scale's overrides come last)
METHOD_CONFIGS: dict[str, list[str]] = {
    "supervised": ["configs/train.json", "configs/train_supervised.json"],
    "supervised_gan": ["configs/train.json", "configs/train_supervised.json", "configs/train_supervised_gan.json"],
    "conventional": ["configs/train.json", "configs/train_conventional.json"],
    # the blind default: the PSF fitted to the unpaired spectra before the first iteration, then frozen, G trained
    # with the non-blind weights (the domain's PSF model and optics: Domain.psf_configs / psf_args)
    "blind": ["configs/train.json"],
    # the PSF learned with G (Born & Wolf kernel from NA 1.0, blurred cycle 1, adversarial 0.02)
    "blind_learned": ["configs/train.json", "configs/learned_psf.json"],
    "nonblind": ["configs/train.json", "configs/train_nonblind.json"],
    "sharp_cycle": ["configs/train.json", "configs/train_nonblind.json", "configs/sharp_cycle.json"],
}
#: Richardson–Lucy with the training data's PSF (``rl``), and with the Born & Wolf PSF of the data's nominal
#: optics (``rl_born_wolf``: what a user without a measured PSF would assume; the same as ``rl`` on Born & Wolf data)
CLASSICAL = ("rl", "rl_born_wolf")
#: relative time per iteration (measured on 2 CPU cores), to start the longest trainings first with --jobs
RELATIVE_COST = {"conventional": 2.4, "blind_learned": 2.0, "blind": 1.7, "nonblind": 1.6, "sharp_cycle": 1.6,
                 "supervised_gan": 1.3, "supervised": 1.1}  # fmt: skip
ALL_METHODS = ("supervised", "supervised_gan", "conventional", "blind", "blind_learned", "nonblind", "sharp_cycle", "rl",
               "rl_born_wolf")  # fmt: skip
#: methods with a PSF layer (``models/blur.tif``), which ``--refine`` refines; their rows ``<method>_refined``
REFINABLE = ("blind", "blind_learned", "nonblind", "sharp_cycle")
REFINED = "_refined"
LABELS = {
    "input": "input (blurred + noise)",
    "supervised": "supervised U-Net, MSE",
    "supervised_gan": "supervised U-Net, MSE + LS-GAN",
    "conventional": "conventional cycleGAN (two U-Nets)",
    "blind": "proposed, blind (PSF fitted to the spectra, frozen)",
    "blind_learned": "proposed, blind (PSF learned with G)",
    "nonblind": "proposed, non-blind (known PSF)",
    "sharp_cycle": "sharp cycle only (known PSF; unpaired terms off)",
    "rl": "Richardson–Lucy (known PSF)",
    "rl_born_wolf": "Richardson–Lucy (Born & Wolf PSF of the nominal optics)",
    "blind_refined": "proposed, blind, refined by RL from its output, blended with it (fitted PSF)",
    "blind_learned_refined": "proposed, blind, refined by RL from its output, blended with it (learned PSF)",
    "nonblind_refined": "proposed, non-blind, refined by RL from its output, blended with it (known PSF)",
    "sharp_cycle_refined": "sharp cycle only, refined by RL from its output, blended with it (known PSF)",
}
#: the paper's numbers (PAPER.md; Tables I–III, Born & Wolf / Richards & Wolf test PSF, 20 dB)
PAPER = {
    "born_wolf": {
        "input": (22.3020, 0.7275),
        "supervised": (30.232, 0.9826),
        "supervised_gan": (29.0766, 0.9774),
        "conventional": (26.2483, 0.9474),
        "blind": (26.6249, 0.9573),
        "nonblind": (29.2925, 0.9746),
    },
    "vectorial": {
        "input": (22.5202, 0.7348),
        "conventional": (27.2886, 0.9584),
        "blind": (27.5286, 0.9653),
    },
}
NOISE_LEVELS: tuple[float | None, ...] = (None, 20.0, 10.0, 5.0, 2.5, 1.25)
NORMALISATION = (
    "Ground truth: percentiles (0, 99.99) mapped to [0, 1], clipped (as in validation). Input: the blurred "
    "volume with percentiles (0.1, 99.9) mapped to [0, 1], clipped (the network input). Every output and the "
    "input are then mapped onto the ground truth by their least-squares affine fit a·v + b (per volume) "
    "before PSNR (MAX = 1, the ground truth's range) and 3D SSIM (Gaussian window 7, k1 = 0.01, k2 = 0.03, "
    "data range 1). The fit removes each method's arbitrary intensity scale (Richardson–Lucy's output is in "
    "photon units; the networks' in [0, 1]) and scores the input at its most favourable scaling."
)


@dataclass(frozen=True)
class Domain:
    """The simulated data of one reproduction: phantoms and optics of its training and test sets.

    Args:
        description: one line for the report.
        train_folder: folder name of the training data under ``<work>/data``.
        simulate: keywords of :class:`bundle.simulate.SimulateDataset` shared by the training data and
            every test set (phantom family, PSF model and optics).
        test_psfs: PSF models of the 20 dB test sets (the first is the training data's).
        noise_sweep: also test the training PSF at every noise level of the scale (Fig. 8).
        runs_folder: folder of the trained models under the work dir.
        psf_configs: config files of the PSF model ``blind`` fits (after ``train.json``): the kernel
            family that can describe the domain's optics.
        psf_args: ``--key value`` of ``blind``: the optics a user knows (NA, indices, wavelength) and
            which kernel parameters the fit estimates.
    """

    description: str
    train_folder: str
    simulate: dict[str, Any]
    test_psfs: tuple[str, ...]
    noise_sweep: bool
    runs_folder: str
    psf_configs: tuple[str, ...] = ()
    psf_args: tuple[str, ...] = ()


DOMAINS: dict[str, Domain] = {
    "born_wolf": Domain(
        description="microtubules, Born & Wolf PSF (the paper's study); tested on Born & Wolf and vectorial data",
        train_folder="train_born_wolf_20dB", simulate={"psf_model": "born_wolf"},
        test_psfs=("born_wolf", "vectorial"), noise_sweep=True, runs_folder="runs",
    ),
    # configs/simulate_vesicles.json's optics: NA 1.4 oil (1.515), 520 nm, water sample (1.33) 2 µm deep
    "vesicles": Domain(
        description="vesicles (shells and puncta), psfmodels vectorial PSF with the spherical aberration of an "
        "index mismatch (NA 1.4, n 1.515 -> 1.33, 2 µm deep, 520 nm); trained and tested on this domain",
        train_folder="train_vesicles_vectorial_20dB",
        simulate={"psf_model": "vectorial", "phantom_model": "vesicles", "na": 1.4, "n_immersion": 1.515,
                  "wavelength": 0.52, "n_sample": 1.33, "psf_depth": 2.0},  # fmt: skip
        test_psfs=("vectorial",), noise_sweep=False, runs_folder="runs_vesicles",
        # the fit: the vectorial kernel with the optics known, the unknown depth below the coverslip estimated
        psf_configs=("configs/psf_vectorial.json",),
        psf_args=("--n_immersion", "1.515", "--wavelength", "0.52", "--n_sample", "1.33", "--psf_init_na", "1.4",
                  "--psf_learn", "['depth']", "--psf_depth", "1.0"),  # fmt: skip
    ),
}
SCORES = ("psnr", "ssim", "dim_recall", "dim_precision")


@dataclass
class Scale:
    """Sizes and schedule of one experiment scale."""

    shape: tuple[int, int, int]
    eval_shape: tuple[int, int, int]
    n_train: int
    n_val: int
    n_test: int
    psf_shape: tuple[int, int, int] = (31, 31, 31)
    config_overrides: list[str] = field(default_factory=list)  # extra config files after the method's
    epoch_length: int = 100
    max_epochs: int = 200
    val_interval: int = 5
    rl_max_iter: int = 100
    refine_max_iter: int = 200  # largest refinement count tried on validation (--refine)
    noise_levels: tuple[float | None, ...] = NOISE_LEVELS
    extra_args: list[str] = field(default_factory=list)  # more `--key value` for every training
    fit_args: list[str] = field(default_factory=list)  # more `--key value` for `blind`, the training that fits the PSF
    inference_flips: int | None = None  # XY views averaged at test and refinement tuning (None: inference.json's)


SCALES: dict[str, Scale] = {
    # a test of the pipeline: minutes on 2 cores, numbers meaningless
    "tiny": Scale(
        shape=(32, 64, 64), eval_shape=(32, 64, 64), n_train=2, n_val=1, n_test=1,
        config_overrides=["configs/quick.json"], epoch_length=2, max_epochs=1, val_interval=1, rl_max_iter=20,
        noise_levels=(None, 20.0, 2.5), refine_max_iter=10, inference_flips=1,  # one view: 8x less inference
        fit_args=["--psf_fit#n_samples", "16", "--psf_fit#steps", "60"],  # the blind PSF fit: 61 s -> 16 s
    ),
    # 2 CPU cores, ~1 hour on a quiet machine: quick networks (1.4 M-parameter U-Net, 32³ crops, batch 2,
    # lr 1e-3), 400 iterations per method (the run in docs/results.md took 52 min on 2 loaded cores;
    # --max-epochs 24 extends it to 1200), two validation and two test volumes
    "small": Scale(
        shape=(32, 128, 128), eval_shape=(32, 128, 128), n_train=6, n_val=2, n_test=2,
        config_overrides=["configs/quick.json"], epoch_length=50, max_epochs=8, val_interval=2, rl_max_iter=400,
    ),
    # the paper's sizes (Sec. IV): 256x512x128 volumes (ZYX 128x256x512), 18/1/1, 64³ crops, lr 1e-4,
    # full-size networks (common.json + train.json defaults); for a GPU
    "paper": Scale(
        shape=(128, 256, 512), eval_shape=(128, 256, 512), n_train=18, n_val=1, n_test=1,
        config_overrides=[], epoch_length=100, max_epochs=200, val_interval=5, rl_max_iter=400,
    ),
}


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def _atomic_json(obj: Any, path: Path) -> None:
    from bundle.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def _config_list(files: Sequence[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _noise_name(snr: float | None) -> str:
    return "none" if snr is None else f"{snr:g}dB"


def test_set_name(psf_model: str, snr: float | None) -> str:
    """Folder name of a test set, e.g. ``born_wolf_20dB``, ``vectorial_20dB``, ``born_wolf_none``."""
    return f"{psf_model}_{_noise_name(snr)}"


def machine_description() -> dict[str, Any]:
    """CPU/GPU, core count, library versions: stated next to every timing."""
    import monai
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


class Runner:
    """One experiment: paths, steps and their timings.

    Args:
        scale: name in :data:`SCALES`.
        output: folder of the report (``results.md``, ``results.json``, figures).
        work_dir: folder of data, trained models and predictions (default ``outputs/reproduce_<scale>``
            under the repository root, git-ignored).
        methods: methods to run (default all of :data:`ALL_METHODS`).
        threads: torch/OpenMP threads per process (None: the libraries' default).
        jobs: trainings run at the same time (e.g. 2 with ``threads=1`` on a 2-core machine).
        seed: seed of the data and of training.
        max_epochs: override the scale's epochs (``epoch_length`` iterations each). A later run with more
            epochs resumes every training from its last checkpoint and extends it.
        domain: name in :data:`DOMAINS` (default the paper's Born & Wolf study).
        refine: also score the :data:`REFINABLE` methods refined by RL from their output (step 4).
    """

    def __init__(
        self,
        scale: str,
        output: str | Path,
        work_dir: str | Path | None = None,
        methods: Sequence[str] = ALL_METHODS,
        threads: int | None = None,
        jobs: int = 1,
        seed: int = 0,
        max_epochs: int | None = None,
        domain: str = "born_wolf",
        refine: bool = False,
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)}")
        unknown = set(methods) - set(ALL_METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(ALL_METHODS)}")
        self.scale_name = scale
        self.domain_name, self.domain = domain, DOMAINS[domain]
        self.scale = SCALES[scale] if max_epochs is None else replace(SCALES[scale], max_epochs=int(max_epochs))
        self.output = Path(output).resolve()
        self.work = Path(work_dir).resolve() if work_dir else ROOT / "outputs" / f"reproduce_{scale}"
        self.methods = [m for m in ALL_METHODS if m in methods]
        self.refine = bool(refine)
        self.threads = threads
        self.jobs = max(1, int(jobs))
        self.seed = int(seed)
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ)
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            import torch

            torch.set_num_threads(int(threads))

    # paths ---------------------------------------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return self.work / "data" / self.domain.train_folder

    def test_dir(self, name: str) -> Path:
        return self.work / "data" / "test" / name

    def run_dir(self, method: str) -> Path:
        return self.work / self.domain.runs_folder / method

    def test_sets(self) -> dict[str, tuple[str, float | None]]:
        """``{name: (psf_model, snr_db)}``: the domain's 20 dB test sets (the training PSF's first), and for
        the Born & Wolf domain the noise sweep. Names are prefixed by the phantom family unless microtubules."""
        family = self.domain.simulate.get("phantom_model", "microtubules")
        prefix = "" if family == "microtubules" else f"{family}_"
        train_psf = self.domain.test_psfs[0]
        sets = {prefix + test_set_name(train_psf, 20.0): (train_psf, 20.0)}
        if self.domain.noise_sweep:
            sets.update({prefix + test_set_name(train_psf, s): (train_psf, s) for s in self.scale.noise_levels})
        sets.update({prefix + test_set_name(psf, 20.0): (psf, 20.0) for psf in self.domain.test_psfs[1:]})
        return sets

    def report_methods(self) -> list[str]:
        """The methods in the tables: each one, followed by its refined row when ``refine``."""
        return [r for m in self.methods for r in ([m, m + REFINED] if self.refine and m in REFINABLE else [m])]

    def _timed(self, key: str, t0: float) -> None:
        self.timings[key] = round(time.time() - t0, 1)

    # 1. data -------------------------------------------------------------------------------------------
    def simulate(self) -> None:
        """Training data and every test set (``SimulateDataset`` keeps a dataset made with the same parameters)."""
        from bundle.simulate import SimulateDataset

        s = self.scale
        t0 = time.time()
        SimulateDataset(
            str(self.train_dir), shape=s.shape, eval_shape=s.eval_shape, n_train=s.n_train, n_val=s.n_val,
            n_test=s.n_test, psf_shape=s.psf_shape, snr_db=20.0, seed=self.seed, progress=False,
            **self.domain.simulate,
        ).run()
        for name, (psf_model, snr) in self.test_sets().items():
            # one seed for every test set: the same phantoms under each PSF and noise level; another seed
            # than training's, so no test phantom is a training phantom. The simulator needs >= 1 training
            # volume per dataset: a small one is made and never used.
            optics = {**self.domain.simulate, "psf_model": psf_model}
            if psf_model not in ("vectorial", "scalar"):  # the index mismatch is a psfmodels PSF's parameter
                optics = {k: v for k, v in optics.items() if k not in ("n_sample", "psf_depth")}
            SimulateDataset(
                str(self.test_dir(name)), shape=(16, 32, 32), eval_shape=s.eval_shape, n_train=1, n_val=0,
                n_test=s.n_test, psf_shape=s.psf_shape, snr_db=snr, seed=self.seed + 1000, progress=False,
                **optics,
            ).run()
        self._timed("simulate", t0)

    # 2. training ---------------------------------------------------------------------------------------
    def config_files(self, method: str) -> list[str]:
        files = list(METHOD_CONFIGS[method])
        if method == "blind":  # the domain's PSF model
            files[1:1] = self.domain.psf_configs
        return ["configs/common.json", *files, *self.scale.config_overrides]

    def train_command(self, method: str) -> list[str]:
        """The bundle command line that trains ``method`` (resumed from its newest checkpoint if any)."""
        run, s = self.run_dir(method), self.scale
        return [
            sys.executable, "-m", "monai.bundle", "run", "training",
            "--config_file", _config_list(self.config_files(method)),
            "--dataset_dir", str(self.train_dir),
            "--ckpt_dir", str(run / "models"),
            "--output_dir", str(run / "eval"),
            "--max_epochs", str(s.max_epochs),
            "--epoch_length", str(s.epoch_length),
            "--val_interval", str(s.val_interval),
            "--seed", str(self.seed),
            "--resume", "true",
            *s.extra_args,
            *((*self.domain.psf_args, *s.fit_args) if method == "blind" else ()),
        ]  # fmt: skip

    def train(self, method: str) -> None:
        """Train one learned method through the bundle's command line; skipped when done, resumed when interrupted."""
        run = self.run_dir(method)
        marker = run / "train_done.json"
        s = self.scale
        if marker.is_file() and (run / "models" / "model.pt").is_file():
            done = json.loads(marker.read_text())
            if done.get("max_epochs", 0) >= s.max_epochs and done.get("epoch_length") == s.epoch_length:
                logger.info(f"{method}: trained already ({marker})")
                self.timings[f"train_{method}"] = done.get("seconds", 0.0)
                return
            logger.info(f"{method}: extending the finished training to {s.max_epochs} epochs")
        cmd = self.train_command(method)
        run.mkdir(parents=True, exist_ok=True)
        logger.info(f"{method}: training ({' '.join(cmd[1:])})")
        t0 = time.time()
        with open(run / "train.log", "a") as log:
            res = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            raise RuntimeError(f"{method}: training failed ({res.returncode}); see {run / 'train.log'}")
        seconds = round(time.time() - t0, 1)
        self.timings[f"train_{method}"] = seconds
        _atomic_json(
            {"command": cmd, "seconds": seconds, "max_epochs": s.max_epochs, "epoch_length": s.epoch_length}, marker
        )

    # 3. Richardson–Lucy's iteration count ---------------------------------------------------------------
    def rl_psf(self, method: str = "rl") -> Path:
        """The PSF file a classical method deconvolves with: the training data's ``psf.tif`` (``rl``), or
        (``rl_born_wolf``) the Born & Wolf PSF of the NA, immersion index, wavelength, voxel size and kernel
        size in the data's ``dataset.json``, written once under the method's run folder."""
        if method == "rl":
            return self.train_dir / "psf.tif"
        path = self.run_dir(method) / "psf_born_wolf.tif"
        if not path.is_file():
            from bundle.io import save_volume
            from bundle.physics.psf import make_psf

            p = json.loads((self.train_dir / "dataset.json").read_text())["parameters"]
            psf = make_psf("born_wolf", shape=tuple(p["psf_shape"]), na=p["na"], n_immersion=p["n_immersion"],
                           wavelength=p["wavelength"], voxel_size=tuple(p["voxel_size"]))  # fmt: skip
            save_volume(path, psf, voxel_size=tuple(p["voxel_size"]))
        return path

    def choose_rl_iterations(self, method: str = "rl") -> int:
        """Best RL iteration count of a :data:`CLASSICAL` method by PSNR on the validation volume(s) (never
        on test), with its PSF (:meth:`rl_psf`), cached."""
        from bundle.classical import best_iteration
        from bundle.io import load_volume

        path = self.run_dir(method) / "rl.json"
        if path.is_file():
            done = json.loads(path.read_text())
            if done.get("max_iter") == self.scale.rl_max_iter:
                return int(done["num_iter"])
        t0 = time.time()
        psf, _ = load_volume(self.rl_psf(method))
        curves = []
        for image, label in self._pairs(self.train_dir / "val"):
            _, curve = best_iteration(
                image, label, psf, max_iter=self.scale.rl_max_iter, normalize="affine", pad_mode="reflect"
            )
            curves.append(curve)
        mean = np.mean(np.asarray(curves), axis=0)
        num_iter = int(np.argmax(mean)) + 1
        _atomic_json(
            {
                "num_iter": num_iter,
                "max_iter": self.scale.rl_max_iter,
                "val_psnr_curve": [float(c) for c in mean],
                "chosen_on": "validation",
            },
            path,
        )
        self._timed(f"{method}_choose_iterations", t0)
        return num_iter

    # 4. inference and scores ----------------------------------------------------------------------------
    @staticmethod
    def _pairs(split_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(input, ground truth)`` of a split, normalised exactly as in validation (``paired_transforms``)."""
        from bundle.data import paired_datalist, paired_transforms

        t = paired_transforms((0.1, 99.9), (0.0, 99.99))
        out = []
        for item in paired_datalist(str(split_dir / "blurred"), str(split_dir / "ground_truth")):
            d = t(item)
            out.append((np.asarray(d["image"])[0], np.asarray(d["label"])[0]))
        return out

    def tune_refinement(self, method: str) -> dict[str, Any]:
        """The refinement of a :data:`REFINABLE` method's output chosen on validation (never on test):
        ``scripts/tune_refinement.py``'s ``tune`` on the model, cached in its ``models/refinement.json``
        (redone when the model is newer). A model whose output does not explain a validation stack
        (fitted scale <= 0) gets 0 iterations, with the reason recorded."""
        from tune_refinement import tune

        ckpt = self.run_dir(method) / "models"
        path = ckpt / "refinement.json"
        if path.is_file() and path.stat().st_mtime_ns >= (ckpt / "model.pt").stat().st_mtime_ns:
            return json.loads(path.read_text())
        t0 = time.time()
        views = {} if self.scale.inference_flips is None else {"flips": self.scale.inference_flips}
        try:
            result = tune(ckpt, self.train_dir / "val" / "blurred", self.train_dir / "val" / "ground_truth",
                          ckpt / "blur.tif", max_iter=self.scale.refine_max_iter, **views)  # fmt: skip
        except ValueError as err:
            logger.warning(f"{method}: refinement not tuned ({err}); its refined rows equal the method's own")
            result = {"iterations": 0, "tv_weight": 0.0, "error": str(err)}
            _atomic_json(result, path)
        self._timed(f"refine_tune_{method}", t0)
        return result

    def refinement(self, method: str):
        """The :class:`~bundle.classical.PSFRefinement` of ``<method>_refined`` (its tuned settings)."""
        from bundle.classical import PSFRefinement

        tuned = self.tune_refinement(method.removesuffix(REFINED))
        psf = self.run_dir(method.removesuffix(REFINED)) / "models" / "blur.tif"
        return PSFRefinement(psf, num_iter=int(tuned["iterations"]), tv_weight=float(tuned.get("tv_weight", 0.0)),
                             blend=float(tuned.get("blend", 1.0)))  # fmt: skip

    def deconvolver(self, method: str):
        """The inference pipeline of a method (``configs/inference.json`` [+ ``inference_rl.json``]): its
        ``inferer``'s deconvolver for its ``network``."""
        from monai.bundle import ConfigParser

        from bundle.inference import load_checkpoint, network_for_checkpoint

        files = ["configs/common.json", *self.scale.config_overrides, "configs/inference.json"]
        if method in CLASSICAL:
            files.append("configs/inference_rl.json")
        parser = ConfigParser()
        parser.read_config([str(ROOT / f) for f in files])
        parser["bundle_root"] = str(ROOT)
        parser["dataset_dir"] = str(self.train_dir)
        parser["progress"] = False
        if method in CLASSICAL:
            parser["psf_file"] = str(self.rl_psf(method))
            parser["rl_num_iter"] = self.choose_rl_iterations(method)
            # one window holding the whole test volume: RL sees the volume as best_iteration did
            parser["rl_roi_size"] = [-(-int(s) // 16) * 16 for s in self.scale.eval_shape]
            return parser.get_parsed_content("inferer").deconvolver_for(parser.get_parsed_content("network"))
        if self.scale.inference_flips is not None:  # G's views (RL keeps inference_rl.json's one view)
            parser["inference_flips"] = self.scale.inference_flips
        model_pt = self.run_dir(method) / "models" / "model.pt"
        # the configs' network, or the one the checkpoint describes (e.g. the non-blind RLGuidedUNet)
        network = network_for_checkpoint(parser.get_parsed_content("network"), model_pt)
        load_checkpoint(network, model_pt)  # before the optimised copy is made
        return parser.get_parsed_content("inferer").deconvolver_for(network)

    def predict(self, method: str, test_set: str, deconvolver) -> list[np.ndarray]:
        """Predictions of one method on one test set, cached as ``.npy`` under the method's run folder
        (``<method>_refined``: under the method's ``pred_refined``; a volume its output does not explain
        is left unrefined, logged and listed in ``unrefined.json`` there)."""
        from bundle.data import list_volumes
        from bundle.inference import deconvolve_normalized
        from bundle.io import load_volume

        base = method.removesuffix(REFINED)
        refinement = self.refinement(method) if base != method else None
        cache = self.run_dir(base) / ("pred" if refinement is None else "pred_refined") / test_set
        stamp = self._model_stamp(base)
        if self.scale.inference_flips is not None and base not in CLASSICAL:
            stamp.update(flips=self.scale.inference_flips)
        if refinement is not None:
            stamp.update(refine_iterations=refinement.num_iter, refine_tv_weight=refinement.tv_weight)
        stamp_file = cache / "model_stamp.json"
        if cache.is_dir() and (not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp):
            shutil.rmtree(cache)  # predictions of an older model (or RL setting)
        files = list_volumes(str(self.test_dir(test_set) / "test" / "blurred"))
        outs = []
        for f in files:
            target = cache / (Path(f).name.split(".")[0] + ".npy")
            if target.is_file():
                outs.append(np.load(target))
                continue
            volume, _ = load_volume(f)
            try:
                pred = deconvolve_normalized(volume, deconvolver, (0.1, 99.9), "normalized", refinement)
            except ValueError as err:  # raised by the refinement only: G's output does not explain the stack
                if refinement is None:
                    raise
                logger.warning(f"{method}, {Path(f).name}: not refined ({err})")
                pred = deconvolve_normalized(volume, deconvolver, (0.1, 99.9), "normalized")
                unrefined = cache / "unrefined.json"
                names = json.loads(unrefined.read_text()) if unrefined.is_file() else []
                cache.mkdir(parents=True, exist_ok=True)
                _atomic_json(sorted({*names, Path(f).name}), unrefined)
            pred = pred.astype(np.float32)
            cache.mkdir(parents=True, exist_ok=True)
            _atomic_json(stamp, stamp_file)
            np.save(target, pred)
            outs.append(pred)
        return outs

    def _model_stamp(self, method: str) -> dict[str, Any]:
        """What a prediction was made with: the model file's size and time, or RL's iteration count."""
        if method in CLASSICAL:
            return {"rl_num_iter": self.choose_rl_iterations(method)}
        st = (self.run_dir(method) / "models" / "model.pt").stat()
        return {"model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns}

    @staticmethod
    def score(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
        """PSNR, SSIM and the dim-structure recall and precision after the least-squares affine fit onto
        the ground truth (:data:`NORMALISATION`; :func:`bundle.metrics.dim_structure`: dim = 5-30 % of the
        truth's maximum, recovered = at least half its true value)."""
        import torch

        from bundle.metrics import affine_fit, dim_structure, psnr, ssim

        p = torch.as_tensor(pred, dtype=torch.float32)[None, None]
        t = torch.as_tensor(label, dtype=torch.float32)[None, None]
        fitted = affine_fit(p, t)
        dim = dim_structure(fitted, t, fit=False)
        return {"psnr": psnr(fitted, t, data_range=1.0), "ssim": ssim(fitted, t, data_range=1.0),
                "dim_recall": dim["dim_recall"], "dim_precision": dim["dim_precision"]}  # fmt: skip

    def evaluate(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{test_set: {method: {score: value}}}`` (:data:`SCORES`) averaged over the test volumes; ``"input"``
        included."""
        t0 = time.time()
        sets = self.test_sets()
        pairs = {name: self._pairs(self.test_dir(name) / "test") for name in sets}
        ref = pairs[next(iter(sets))]
        for name, p in pairs.items():  # the same objects everywhere
            if any(not np.array_equal(a[1], b[1]) for a, b in zip(p, ref)):
                raise RuntimeError(f"test set {name} does not hold the same ground truth as the others")
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        for name in sets:
            scores = [self.score(image, label) for image, label in pairs[name]]
            metrics[name] = {"input": _mean(scores)}
        deconvolvers: dict[str, Any] = {}
        for method in self.report_methods():
            base = method.removesuffix(REFINED)
            if base not in deconvolvers:
                deconvolvers[base] = self.deconvolver(base)
            deconv = deconvolvers[base]
            for name in sets:
                preds = self.predict(method, name, deconv)
                metrics[name][method] = _mean([self.score(p, lab) for p, (_, lab) in zip(preds, pairs[name])])
        self._timed("evaluate", t0)
        return metrics

    # 5. report -------------------------------------------------------------------------------------------
    def figures(self, metrics: dict) -> list[str]:
        """XY/XZ/YZ central slices (input, every output, ground truth) of the first volume of two test sets."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import torch

        from bundle.metrics import affine_fit

        written = []
        for name in [n for n, (_, snr) in self.test_sets().items() if snr == 20.0]:
            image, label = self._pairs(self.test_dir(name) / "test")[0]
            rows = [("input", image)] + [(m, self.predict(m, name, None)[0]) for m in self.report_methods()]
            rows.append(("ground truth", label))
            z, y, x = (s // 2 for s in label.shape)
            fig, axes = plt.subplots(len(rows), 3, figsize=(9, 2.6 * len(rows)), squeeze=False)
            for r, (method, vol) in enumerate(rows):
                if method != "ground truth":
                    t = torch.as_tensor(label)[None, None]
                    vol = affine_fit(torch.as_tensor(vol)[None, None].float(), t.float())[0, 0].numpy()
                views = (("XY", vol[z]), ("XZ", vol[:, y, :]), ("YZ", vol[:, :, x]))
                for c, (plane, img) in enumerate(views):
                    ax = axes[r, c]
                    ax.imshow(np.clip(img, 0, 1), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if c == 0:
                        m = metrics[name].get(method)
                        extra = f"\n{m['psnr']:.2f} dB, {m['ssim']:.3f}" if m else ""
                        ax.set_ylabel(LABELS.get(method, method).split(" (")[0] + extra, fontsize=8)
                    if r == 0:
                        ax.set_title(plane)
            fig.suptitle(f"test volume, {name} (central slices, affine-fitted to the ground truth)", fontsize=9)
            fig.tight_layout()
            path = self.output / f"slices_{name}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path.name)
        return written

    def noise_plot(self, metrics: dict) -> str:
        """Fig. 8: PSNR and SSIM against the added noise (Born & Wolf PSF, models trained at 20 dB)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        levels = sorted(self.scale.noise_levels, key=lambda s: -np.inf if s is None else -s)  # none first
        names = [test_set_name(self.domain.test_psfs[0], s) for s in levels]
        ticks = [_noise_name(s) for s in levels]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for method in ["input", *self.report_methods()]:
            for ax, key in zip(axes, ("psnr", "ssim")):
                ax.plot(ticks, [metrics[n][method][key] for n in names], marker="o", label=LABELS[method].split(" (")[0])
        axes[0].set_ylabel("PSNR (dB)")
        axes[1].set_ylabel("SSIM")
        for ax in axes:
            ax.set_xlabel("added noise (average SNR)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle("noise sweep: models trained at 20 dB, tested at each level (Born & Wolf PSF)", fontsize=9)
        fig.tight_layout()
        path = self.output / "noise_sweep.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path.name

    def run(self, command: str) -> dict[str, Any]:
        """All steps; returns the JSON report (also written to ``<output>/results.json``)."""
        started = time.time()
        self.output.mkdir(parents=True, exist_ok=True)
        self.simulate()
        learned = sorted((m for m in self.methods if m in METHOD_CONFIGS), key=lambda m: -RELATIVE_COST[m])
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:  # each training is a subprocess
            for future in [pool.submit(self.train, m) for m in learned]:
                future.result()
        for method in CLASSICAL:
            if method in self.methods:
                self.choose_rl_iterations(method)
        refined = {m: self.tune_refinement(m) for m in self.methods if self.refine and m in REFINABLE}
        metrics = self.evaluate()
        report: dict[str, Any] = {
            "scale": self.scale_name,
            "scale_settings": asdict(self.scale),
            "domain": self.domain_name,
            "domain_settings": asdict(self.domain),
            "command": command,
            "machine": machine_description(),
            "threads": self.threads,
            "jobs": self.jobs,
            "seed": self.seed,
            "work_dir": str(self.work),
            "methods": self.report_methods(),
            "configs": {m: self.config_files(m) for m in self.methods if m in METHOD_CONFIGS},
            "normalisation": NORMALISATION,
            "test_sets": {k: {"psf_model": p, "snr_db": s} for k, (p, s) in self.test_sets().items()},
            "achieved_snr_db": {k: self._achieved_snr(k) for k in self.test_sets()},
            "metrics": metrics,
            "best_validation": self._best_validation(),
            "psf_correlation": self._psf_correlation(),
            "paper": {k: {m: {"psnr": v[0], "ssim": v[1]} for m, v in d.items()} for k, d in PAPER.items()},
        }
        for method in CLASSICAL:
            if method in self.methods:
                report[f"{method}_num_iter"] = self.choose_rl_iterations(method)
        if refined:
            keys = ("iterations", "tv_weight", "val_psnr_unrefined", "val_psnr_refined", "val_dim_recall_unrefined",
                    "val_dim_recall_refined", "error")  # fmt: skip
            report["refinement"] = {m: {k: r[k] for k in keys if k in r} for m, r in refined.items()}
            for m in refined:
                report["refinement"][m]["unrefined_test_volumes"] = {
                    name: json.loads(f.read_text()) for name in self.test_sets()
                    if (f := self.run_dir(m) / "pred_refined" / name / "unrefined.json").is_file()
                }  # fmt: skip
        report["figures"] = self.figures(metrics) + ([self.noise_plot(metrics)] if self.domain.noise_sweep else [])
        self.timings["total_this_invocation"] = round(time.time() - started, 1)
        report["timings_s"] = self.timings
        _atomic_json(report, self.output / "results.json")
        (self.output / "results.md").write_text(render_markdown(report))
        return report

    def _achieved_snr(self, test_set: str) -> float | None:
        """Average SNR measured on the test set's noisy volumes; None when noise-free (infinite)."""
        v = json.loads((self.test_dir(test_set) / "dataset.json").read_text())["achieved_average_snr_db"]
        return float(v) if v is not None and np.isfinite(v) else None

    def _psf_correlation(self) -> dict[str, float]:
        """Correlation of each blind model's PSF (``models/blur.tif``) with the training data's true one."""
        import tifffile

        from bundle.physics.psf import psf_correlation

        true = tifffile.imread(self.train_dir / "psf.tif")
        out = {}
        for m in ("blind", "blind_learned"):
            f = self.run_dir(m) / "models" / "blur.tif"
            if m in self.methods and f.is_file():
                out[m] = round(psf_correlation(tifffile.imread(f), true), 5)
        return out

    def _best_validation(self) -> dict[str, Any]:
        out = {}
        for m in self.methods:
            f = self.run_dir(m) / "models" / "model.json"
            if f.is_file():
                rec = json.loads(f.read_text())
                out[m] = {"epoch": rec.get("epoch"), "val_psnr": rec.get("score")}
        return out


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over volumes, NaN (a volume without dim voxels) left out; NaN if all are."""
    out = {}
    for k in scores[0]:
        finite = [s[k] for s in scores if np.isfinite(s[k])]
        out[k] = float(np.mean(finite)) if finite else float("nan")
    return out


# ------------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------------


def _fmt_psnr(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _fmt_ssim(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _fmt_gain(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _fmt_dim(scores: dict[str, float]) -> str:
    """``recall | precision`` cells (3 decimals; — where a score is missing or NaN)."""
    cells = [scores.get(k) for k in ("dim_recall", "dim_precision")]
    return " | ".join("—" if v is None or not np.isfinite(v) else f"{v:.3f}" for v in cells)


DIM_NOTE = (
    "Dim recall: the share of dim ground-truth voxels (5–30 % of the truth's maximum) that the output, "
    "affine-fitted, brings back to at least half their value; dim precision: of the output voxels in that "
    "band, the share where the truth is not background."
)


def _ordering(values: dict[str, float]) -> str:
    return " > ".join(m for m, _ in sorted(values.items(), key=lambda kv: -kv[1]))


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: every number is formatted from ``report`` (``results.json``)."""
    metrics, paper = report["metrics"], PAPER
    bw, vec = test_set_name("born_wolf", 20.0), test_set_name("vectorial", 20.0)
    methods = ["input", *report["methods"]]
    lines = [
        f"# Reproduction of Lim et al. 2020, scale `{report['scale']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['processor']}, {report['machine']['cpu_count']} cores, "
        f"CUDA: {report['machine']['cuda']}, torch {report['machine']['torch']}, MONAI {report['machine']['monai']}"
        f"{', threads ' + str(report['threads']) if report['threads'] else ''}, "
        f"{report['jobs']} training(s) at a time  ",
        "Run time (s; a finished step that was skipped reports the run that made it, a resumed training "
        "its last invocation; with --jobs > 1 trainings overlap): "
        + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()),
        "",
        f"**Normalisation (all methods, all tables).** {report['normalisation']}",
        "",
        f"Domain `{report.get('domain', 'born_wolf')}`: "
        f"{report.get('domain_settings', asdict(DOMAINS['born_wolf']))['description']}. Training data at 20 dB "
        "average SNR; all test sets hold the same phantoms (another seed than training's). " + DIM_NOTE,
        "",
    ]
    if report.get("domain", "born_wolf") != "born_wolf":
        return "\n".join(lines + _domain_table(report))
    lines += [
        "Gains are over the input; the paper's absolute numbers depend on its own phantom and normalisation, "
        "so compare gains and the ordering of methods.",
        "",
        "## Table I — test PSF Born & Wolf, 20 dB",
        "",
        "| method | PSNR (dB) | SSIM | gain (dB) | paper PSNR | paper SSIM | paper gain (dB) | dim recall | dim precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    inp = metrics[bw]["input"]["psnr"]
    p_inp = paper["born_wolf"]["input"][0]
    for m in methods:
        ours = metrics[bw][m]
        pp = paper["born_wolf"].get(m)
        lines.append(
            f"| {LABELS[m]} | {_fmt_psnr(ours['psnr'])} | {_fmt_ssim(ours['ssim'])} | "
            f"{_fmt_gain(ours['psnr'] - inp) if m != 'input' else '—'} | {_fmt_psnr(pp and pp[0])} | "
            f"{_fmt_ssim(pp and pp[1])} | {_fmt_gain(pp[0] - p_inp) if pp and m != 'input' else '—'} | "
            f"{_fmt_dim(ours)} |"
        )
    ours_order = {m: metrics[bw][m]["psnr"] for m in methods if m in paper["born_wolf"]}
    paper_order = {m: v[0] for m, v in paper["born_wolf"].items() if m in ours_order}
    lines += [
        "",
        f"Ordering by PSNR (methods the paper reports) — ours: {_ordering(ours_order)}; "
        f"paper: {_ordering(paper_order)}.",
        "",
        "## Table II — generalisation across PSF models (20 dB; every model trained on Born & Wolf data)",
        "",
        "| method | B&W PSNR | B&W SSIM | vectorial PSNR | vectorial SSIM | vectorial gain (dB) | "
        "paper B&W | paper vectorial | paper vectorial gain (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    v_inp = metrics[vec]["input"]["psnr"]
    pv_inp = paper["vectorial"]["input"][0]
    for m in methods:
        a, b = metrics[bw][m], metrics[vec][m]
        pa, pb = paper["born_wolf"].get(m), paper["vectorial"].get(m)
        lines.append(
            f"| {LABELS[m]} | {_fmt_psnr(a['psnr'])} | {_fmt_ssim(a['ssim'])} | {_fmt_psnr(b['psnr'])} | "
            f"{_fmt_ssim(b['ssim'])} | {_fmt_gain(b['psnr'] - v_inp) if m != 'input' else '—'} | "
            f"{_fmt_psnr(pa[0]) + ' / ' + _fmt_ssim(pa[1]) if pa and pb else '—'} | "
            f"{_fmt_psnr(pb[0]) + ' / ' + _fmt_ssim(pb[1]) if pb else '—'} | "
            f"{_fmt_gain(pb[0] - pv_inp) if pb and m != 'input' else '—'} |"
        )
    levels = [k for k in metrics if k.startswith("born_wolf_")]
    levels.sort(key=lambda k: -np.inf if k.endswith("none") else -float(k.split("_")[-1][:-2]))
    lines += [
        "",
        "The non-blind model and Richardson–Lucy use the Born & Wolf PSF of the training data on the "
        "vectorial test set too (a PSF mismatch, as for a user with a theoretical PSF).",
        "",
        "## Noise sweep (Fig. 8) — Born & Wolf PSF, models trained at 20 dB, PSNR (dB) / SSIM",
        "",
        "| method | " + " | ".join(k.replace("born_wolf_", "") for k in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for m in methods:
        cells = [f"{_fmt_psnr(metrics[k][m]['psnr'])} / {_fmt_ssim(metrics[k][m]['ssim'])}" for k in levels]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _report_footer(report))


def _domain_table(report: dict[str, Any]) -> list[str]:
    """The Table II-style section of a domain other than the paper's: every 20 dB test set, every method."""
    metrics, lines = report["metrics"], []
    for name in [n for n, t in report["test_sets"].items() if t["snr_db"] == 20.0]:
        inp = metrics[name]["input"]["psnr"]
        lines += [
            f"## Independent domain — test set `{name}` (PSF {report['test_sets'][name]['psf_model']}, 20 dB)",
            "",
            "Every model is trained on this domain's data; the non-blind model, the sharp cycle only and "
            "Richardson–Lucy use its true PSF (the training data's `psf.tif`).",
            "",
            "| method | PSNR (dB) | SSIM | gain (dB) | dim recall | dim precision |",
            "|---|---|---|---|---|---|",
        ]
        for m in ["input", *report["methods"]]:
            ours = metrics[name][m]
            gain = _fmt_gain(ours["psnr"] - inp) if m != "input" else "—"
            lines.append(f"| {LABELS[m]} | {_fmt_psnr(ours['psnr'])} | {_fmt_ssim(ours['ssim'])} | {gain} | {_fmt_dim(ours)} |")
        lines.append("")
    return lines + _report_footer(report)


def _report_footer(report: dict[str, Any]) -> list[str]:
    """Achieved SNRs, RL's iteration count, best validation scores and the figures."""
    lines = ["", "Achieved average SNR of the test sets (dB): "
             + ", ".join(f"{k} {'∞' if v is None else f'{v:.2f}'}" for k, v in report["achieved_snr_db"].items()), ""]
    for method in CLASSICAL:
        if f"{method}_num_iter" not in report:
            continue
        cap, n = report["scale_settings"]["rl_max_iter"], report[f"{method}_num_iter"]
        note = f" (the cap of the search, {cap}: more may score higher)" if n >= cap else ""
        psf = "" if method == "rl" else " with the Born & Wolf PSF of the nominal optics"
        lines.append(
            f"Richardson–Lucy iterations{psf}, chosen by PSNR on the validation volume (never on test): {n}{note}."
        )
    if report.get("refinement"):
        lines.append(
            "Refined rows: Richardson–Lucy started from the model's output through its `models/blur.tif`, iterations "
            "and TV weight chosen on the validation volumes (never on test): "
            + ", ".join(f"{m} {r['iterations']} it., TV {r.get('tv_weight', 0.0):g}"
                        + (f" (not tuned: {r['error']})" if "error" in r else "")
                        + (f" ({sum(map(len, r['unrefined_test_volumes'].values()))} test volume(s) left unrefined)"
                           if any(r.get("unrefined_test_volumes", {}).values()) else "")
                        for m, r in report["refinement"].items())
            + "."
        )  # fmt: skip
    if report.get("psf_correlation"):
        lines.append(
            "Correlation of the blind models' PSF (`models/blur.tif`) with the training data's true PSF: "
            + ", ".join(f"{m} {v:.3f}" for m, v in report["psf_correlation"].items())
            + "."
        )
    if report["best_validation"]:
        lines.append(
            "Best validation PSNR (epoch): "
            + ", ".join(f"{m} {v['val_psnr']:.2f} ({v['epoch']})" for m, v in report["best_validation"].items())
            + "."
        )
    return lines + ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]] + [""]


def aggregate_seeds(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of every ``{test_set: {method: {metric}}}`` score.

    Returns ``{"seeds": [...], "metrics": {test_set: {method: {metric: {"mean", "sd", "values"}}}}}``;
    a score missing for a seed is left out of that cell (its ``values`` say how many there are).
    """
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in reports], "metrics": {}}
    for test_set in sorted({t for r in reports for t in r["metrics"]}):
        methods = sorted({m for r in reports for m in r["metrics"].get(test_set, {})})
        out["metrics"][test_set] = {}
        for method in methods:
            cell: dict[str, Any] = {}
            for metric in SCORES:
                values = [float(r["metrics"][test_set][method][metric]) for r in reports
                          if np.isfinite(r["metrics"].get(test_set, {}).get(method, {}).get(metric, np.nan))]  # fmt: skip
                if values:
                    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                    cell[metric] = {"mean": float(np.mean(values)), "sd": sd, "values": values}
            out["metrics"][test_set][method] = cell
    return out


def render_seeds_markdown(summary: dict[str, Any]) -> str:
    """Tables of mean ± sd over seeds, one per test set (targets are met when mean − sd clears them)."""
    lines = [f"# Reproduction over seeds {', '.join(str(s) for s in summary['seeds'])}", "",
             "Mean ± sample standard deviation over the seeds; per-seed reports in `seed_<s>/results.md`.", ""]  # fmt: skip
    for test_set, methods in summary["metrics"].items():
        lines += [f"## {test_set}", "", "| method | PSNR (dB) | SSIM | dim recall | dim precision | PSNR per seed |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for method, cell in methods.items():
            p, q = cell.get("psnr"), cell.get("ssim")
            psnr = f"{p['mean']:.2f} ± {p['sd']:.2f}" if p else "–"
            ssim = f"{q['mean']:.4f} ± {q['sd']:.4f}" if q else "–"
            dims = [cell.get(k) for k in ("dim_recall", "dim_precision")]
            dim = " | ".join(f"{d['mean']:.3f} ± {d['sd']:.3f}" if d else "–" for d in dims)
            per = ", ".join(f"{v:.2f}" for v in p["values"]) if p else ""
            lines.append(f"| {LABELS.get(method, method)} | {psnr} | {ssim} | {dim} | {per} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="experiment size (default small)")
    parser.add_argument("--output", default="docs/results", help="report folder (default docs/results)")
    parser.add_argument("--work-dir", default=None, help="data, models and predictions (default outputs/reproduce_<scale>, "
                        "git-ignored; each domain keeps its own data and runs folders there)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS, metavar="METHOD",
                        help=f"methods to run, from {', '.join(ALL_METHODS)} (default all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per process (1 helps on a busy shared machine)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run in parallel (e.g. --jobs 2 --threads 1 on 2 cores)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="override the scale's epochs (a later run with more epochs extends the trainings)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="born_wolf",
                        help="simulated data: born_wolf (the paper's study, default) or vesicles (an independent "
                             "domain: other structures, a vectorial PSF with spherical aberration)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several seeds: one full run each under <output>/seed_<s> (work dir likewise), then "
                             "seeds.md / seeds.json with mean ± sd; an interrupted campaign resumes per seed")  # fmt: skip
    parser.add_argument("--refine", action="store_true",
                        help="also score blind, non-blind and sharp-cycle models refined by Richardson–Lucy from their "
                             "output, tuned on validation (scripts/tune_refinement.py); rows <method>_refined")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = " ".join(["python", "scripts/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    if not args.seeds:
        runner = Runner(
            args.scale, args.output, args.work_dir, args.methods, args.threads, args.jobs, args.seed, args.max_epochs,
            args.domain, refine=args.refine,
        )
        report = runner.run(command)
        logger.info(f"wrote {runner.output / 'results.md'} and results.json ({report['timings_s']})")
        return 0
    output = Path(args.output)
    work = Path(args.work_dir) if args.work_dir else ROOT / "outputs" / f"reproduce_{args.scale}"
    reports = []
    for seed in args.seeds:
        runner = Runner(
            args.scale, str(output / f"seed_{seed}"), str(work / f"seed_{seed}"), args.methods, args.threads,
            args.jobs, seed, args.max_epochs, args.domain, refine=args.refine,
        )  # fmt: skip
        reports.append(runner.run(command))
    summary = aggregate_seeds(reports)
    summary["command"] = command
    _atomic_json(summary, output / "seeds.json")
    (output / "seeds.md").write_text(render_seeds_markdown(summary))
    logger.info(f"wrote {output / 'seeds.md'} and seeds.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
