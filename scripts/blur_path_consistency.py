#!/usr/bin/env python
"""How well one blur path ``gain · h*x + offset`` explains every blurred stack, per normalisation.

For stacks with their ground truth (simulated data: ``train/blurred`` + ``train/blurred_ground_truth``)
and the true PSF, normalise both as training does — each volume by its own percentiles, or one range
per domain (``configs/domain_scale.json``) — blur the truth with the PSF, and fit ``gain, offset`` by
least squares: once per stack and once for all stacks together. A blur path has one gain and one
offset, so when the per-stack gains differ, the common fit leaves a residual above the noise: a
model error that a data term on the blurred stacks (the blurred cycle) then asks G to explain.

Example::

    python scripts/blur_path_consistency.py --blurred data/simulated/train/blurred \\
        --truth data/simulated/train/blurred_ground_truth --psf data/simulated/psf.tif
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bundle.data import domain_intensity_range, paired_datalist  # noqa: E402
from bundle.io import load_volume  # noqa: E402
from bundle.physics.forward import blur  # noqa: E402


def _scale(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0)


def _fit(hx: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    a = np.stack([hx.ravel(), np.ones(hx.size)], 1)
    (gain, offset), *_ = np.linalg.lstsq(a, y.ravel(), rcond=None)
    return float(gain), float(offset), float(np.var(y.ravel() - a @ (gain, offset)))


def consistency(
    blurred: str, truth: str, psf: str, blurred_percentiles=(0.1, 99.9), sharp_percentiles=(0.0, 99.99)
) -> dict:
    """Per-stack and common gain/offset fits and residual variances for both normalisations."""
    h, _ = load_volume(psf, dtype=np.float32)
    pairs = paired_datalist(blurred, truth)
    ranges = {
        "dataset": (domain_intensity_range(blurred, blurred_percentiles), domain_intensity_range(truth, sharp_percentiles))
    }
    out = {}
    for mode in ("volume", "dataset"):
        ys, hxs, stacks = [], [], []
        for item in pairs:
            y, _ = load_volume(item["image"], dtype=np.float32)
            x, _ = load_volume(item["label"], dtype=np.float32)
            if mode == "volume":
                y = _scale(y, *np.percentile(y, blurred_percentiles))
                x = _scale(x, *np.percentile(x, sharp_percentiles))
            else:
                (y_lo, y_hi), (x_lo, x_hi) = ranges["dataset"]
                y, x = _scale(y, y_lo, y_hi), _scale(x, x_lo, x_hi)
            hx = np.asarray(blur(x, h))
            gain, offset, var = _fit(hx, y)
            stacks.append({"stack": Path(item["image"]).name, "gain": gain, "offset": offset, "residual_var": var})
            ys.append(y)
            hxs.append(hx)
        gain, offset, var = _fit(np.concatenate([v.ravel() for v in hxs]), np.concatenate([v.ravel() for v in ys]))
        out[mode] = {
            "per_stack": stacks,
            "common": {"gain": gain, "offset": offset, "residual_var": var},
            "common_over_per_stack_residual": var / float(np.mean([s["residual_var"] for s in stacks])),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blurred", required=True, help="blurred stacks (folder)")
    parser.add_argument("--truth", required=True, help="their ground truth, same file names")
    parser.add_argument("--psf", required=True, help="the true PSF (TIFF)")
    parser.add_argument("--output", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    result = consistency(args.blurred, args.truth, args.psf)
    for mode, r in result.items():
        gains = [s["gain"] for s in r["per_stack"]]
        print(
            f"{mode:8s} per-stack gains {min(gains):.2f}-{max(gains):.2f}; common gain {r['common']['gain']:.3f}, "
            f"residual {r['common']['residual_var']:.3g} = {r['common_over_per_stack_residual']:.2f}x the per-stack fits'"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
