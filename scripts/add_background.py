#!/usr/bin/env python
"""Copy a simulated dataset and add a smooth background (and, optionally, camera hot pixels) to its blurred volumes.

Real widefield stacks hold light the blur path ``h * x`` cannot produce from the sharp domain:
autofluorescence and out-of-focus haze, smooth over microns. This makes such a dataset from one
written by ``python -m monai.bundle run simulate`` (it needs the manifest's per-volume noise
parameters): every blurred volume (training, validation, test) is re-drawn from its phantom as

    y = Poisson(photons * max(h * x + b + sigma * N(0, 1), 0)) / photons

with the volume's own ``photons`` and ``sigma`` (so the camera and the photon budget of the signal
are unchanged; the background adds its own shot noise) and ``b`` a smooth random field: uniform noise
low-pass filtered by a Gaussian of ``--length`` voxels, mapped to ``[0.2, 1]`` and scaled by
``--amplitude`` × ``max(h * x)``. With ``--hot_fraction`` > 0, ``b`` also holds the camera's hot
pixels: a share ``--hot_fraction`` of the camera's ``(Y, X)`` pixels, each with a dark offset drawn
log-uniformly in ``--hot_range`` × ``max(h * x)`` and the same in every plane of the stack (one camera
pixel records every plane), so each is a one-voxel line along Z — what an sCMOS camera's hot pixels
make and what no ``h * x`` can (``--amplitude 0 --hot_fraction 0.003`` adds hot pixels only). The sharp domain, the ground truths and the PSF are copied
unchanged, so the truth to score against has no background. The copy is written to a temporary
folder and renamed into place; an existing output is never replaced and the input is never written.

Example::

    python scripts/add_background.py --dataset_dir data/vesicles --output data/vesicles_background --amplitude 0.3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def smooth_background(shape: Sequence[int], length: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A smooth random field in ``[0.2, 1]`` of ``shape`` ``(Z, Y, X)``: uniform noise low-pass filtered by a
    Gaussian of ``length`` voxels per axis (periodic), min-max mapped; 0.2 is the floor everywhere."""
    field = gaussian_filter(rng.uniform(size=tuple(shape)), sigma=tuple(float(v) for v in length), mode="wrap")
    span = float(field.max() - field.min())
    unit = (field - field.min()) / span if span > 0 else np.ones_like(field)
    return 0.2 + 0.8 * unit


def hot_pixels(shape: Sequence[int], fraction: float, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """Dark offsets of a camera's hot pixels, ``(Z, Y, X)`` float64: ``round(fraction * Y * X)`` distinct
    ``(Y, X)`` pixels, each with an offset log-uniform in ``[low, high]``, constant along Z; 0 elsewhere."""
    z, y, x = (int(v) for v in shape)
    count = int(round(fraction * y * x))
    plane = np.zeros(y * x)
    where = rng.choice(y * x, size=count, replace=False)
    plane[where] = np.exp(rng.uniform(np.log(low), np.log(high), size=count))
    return np.broadcast_to(plane.reshape(1, y, x), (z, y, x)).copy()


def add_background(
    dataset_dir: str | Path,
    output: str | Path,
    amplitude: float = 0.3,
    length: Sequence[float] = (8.0, 24.0, 24.0),
    seed: int = 77,
    progress: bool = True,
    hot_fraction: float = 0.0,
    hot_range: Sequence[float] = (0.05, 0.5),
) -> dict:
    """Write the copy (see the module docstring); returns its manifest (also ``<output>/dataset.json``)."""
    from bundle.io import load_volume, save_volume
    from bundle.physics.forward import blur

    src, dst = Path(dataset_dir), Path(output)
    manifest_file = src / "dataset.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file}: no manifest; the input must be a dataset written by the simulate workflow")
    if dst.exists():
        raise FileExistsError(f"{dst}: exists; choose a new output folder (nothing is replaced)")
    if not amplitude >= 0:
        raise ValueError(f"--amplitude must be >= 0, got {amplitude}")
    if not 0 <= hot_fraction < 1 or not 0 < hot_range[0] <= hot_range[1]:
        raise ValueError(f"--hot_fraction must be in [0, 1) and --hot_range 0 < low <= high, got {hot_fraction}, {list(hot_range)}")
    manifest = json.loads(manifest_file.read_text())
    records = [r for r in manifest["volumes"] if "blurred" in r]
    missing = [r["blurred"] for r in records if not (r.get("noise") or {}).get("photons_per_unit")]
    if missing:
        raise ValueError(f"{manifest_file}: no noise parameters for {missing[:3]} (a noise-free dataset?)")
    psf, _ = load_volume(src / manifest.get("psf", "psf.tif"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        rng = np.random.default_rng(seed)
        for rec in tqdm(records, desc="adding background", unit="vol", disable=not progress):
            truth, meta = load_volume(src / rec["ground_truth"])
            clean = blur(truth.astype(np.float32), psf.astype(np.float32)).astype(np.float64)
            background = amplitude * float(clean.max()) * smooth_background(clean.shape, length, rng)
            hot = float(clean.max()) * hot_pixels(clean.shape, hot_fraction, *hot_range, rng) if hot_fraction else 0.0
            background = background + hot
            photons, sigma = rec["noise"]["photons_per_unit"], rec["noise"]["gaussian_sigma"]
            gauss = np.maximum(clean + background + sigma * rng.standard_normal(clean.shape), 0.0)
            noisy = (rng.poisson(photons * gauss) / photons).astype(np.float32)
            save_volume(tmp / rec["blurred"], noisy, voxel_size=meta["voxel_size"], dtype=np.float32)
            noise_power = float(np.mean((noisy - clean - background) ** 2))
            rec["background"] = {"mean": float(background.mean()), "signal_mean": float(clean.mean()),
                                 "signal_snr_db": float(10 * np.log10(np.mean(clean**2) / noise_power)),
                                 "hot_pixels": int(np.count_nonzero(np.asarray(hot)[0])) if hot_fraction else 0}  # fmt: skip
        hot_text = f", hot pixels ({hot_fraction} of the camera, {list(hot_range)} x max(h*x))" if hot_fraction else ""
        manifest["description"] += f"; blurred volumes + a smooth background ({amplitude} x max(h*x){hot_text}, scripts/add_background.py)"
        manifest["background"] = {"source": str(src.resolve()), "amplitude": float(amplitude),
                                  "length_voxels": [float(v) for v in length], "seed": int(seed),
                                  "hot_fraction": float(hot_fraction), "hot_range": [float(v) for v in hot_range]}  # fmt: skip
        (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2))
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, help="a dataset written by the simulate workflow (read only)")
    parser.add_argument("--output", required=True, help="new folder for the copy (must not exist)")
    parser.add_argument("--amplitude", type=float, default=0.3, help="background peak as a fraction of max(h*x) (default 0.3)")
    parser.add_argument("--length", type=float, nargs=3, default=(8.0, 24.0, 24.0), metavar=("Z", "Y", "X"),
                        help="smoothness: Gaussian low-pass sigma in voxels (default 8 24 24)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=77, help="seed of the background fields and the noise")
    parser.add_argument("--hot_fraction", type=float, default=0.0,
                        help="share of the camera's pixels that are hot, one-voxel lines along Z (default 0: none)")  # fmt: skip
    parser.add_argument("--hot_range", type=float, nargs=2, default=(0.05, 0.5), metavar=("LOW", "HIGH"),
                        help="hot pixels' dark offsets, log-uniform, as fractions of max(h*x) (default 0.05 0.5)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        manifest = add_background(args.dataset_dir, args.output, args.amplitude, args.length, args.seed,
                                  hot_fraction=args.hot_fraction, hot_range=args.hot_range)  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    bg = [r["background"] for r in manifest["volumes"] if "background" in r]
    print(f"wrote {args.output}: {len(bg)} blurred volumes, background mean / signal mean "
          f"{np.mean([b['mean'] / b['signal_mean'] for b in bg]):.2f}, average SNR of h*x against the noise "
          f"{np.mean([b['signal_snr_db'] for b in bg]):.1f} dB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
