"""Does the inference window change the result? PSNR of trained models with fixed vs planned windows.

InstanceNorm statistics depend on the window the generator sees, so the sliding-window size is not
a pure speed setting. This script scores every trained model of a ``scripts/reproduce.py`` run on
all its test volumes with: the training crop as window, the paper's 64³ windows, ``roi_size="auto"``
(:func:`bundle.inference.plan_roi_size`) in float32 and in bfloat16, and writes a markdown table.

Usage::

    python scripts/window_study.py --runs outputs/reproduce_small --out docs/window_study.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name -> Deconvolver keyword arguments
    "training crop 32³": {"roi_size": (32, 32, 32)},
    "paper 64³": {"roi_size": (64, 64, 64)},
    "auto, float32": {"roi_size": "auto"},
    "auto, bfloat16": {"roi_size": "auto", "precision": "bfloat16"},
}


def main() -> None:
    from tqdm import tqdm

    from bundle.inference import Deconvolver, load_network
    from bundle.io import atomic_write_text, load_volume
    from bundle.metrics import affine_fit, psnr

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="outputs/reproduce_small", help="output folder of scripts/reproduce.py")
    parser.add_argument("--out", default="docs/window_study.md", help="markdown report")
    args = parser.parse_args()
    runs = Path(args.runs)
    tests = sorted(runs.glob("data/test/*/test/blurred/*.tif"))
    models = sorted(p for p in runs.glob("runs/*/models/model.pt"))
    if not tests or not models:
        raise SystemExit(f"{runs}: no test volumes (data/test/*/test/blurred) or models (runs/*/models/model.pt)")
    rows = []
    for model in models:
        net = load_network(model, "cpu")
        scores: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for path in tqdm(tests, desc=model.parent.parent.name):
            blurred = load_volume(path)[0]
            truth = torch.from_numpy(load_volume(Path(str(path).replace("/blurred/", "/ground_truth/")))[0]).double()
            lo, hi = np.percentile(blurred, (0.1, 99.9))
            x = torch.from_numpy(np.clip((blurred - lo) / (hi - lo), 0, 1).astype(np.float32))[None, None]
            for name, kwargs in SETTINGS.items():
                with torch.no_grad():
                    y = Deconvolver(net, **kwargs)(x)[0, 0].double()
                scores[name].append(psnr(affine_fit(y, truth), truth))
        rows.append((model.parent.parent.name, {k: float(np.mean(v)) for k, v in scores.items()}))
    shape = "×".join(map(str, load_volume(tests[0])[0].shape))
    lines = [
        "# Inference window vs PSNR",
        "",
        f"Measured by `python scripts/window_study.py --runs {args.runs}` on the models and test data of the "
        "`scripts/reproduce.py` run in that folder (`--scale small`: the run behind `docs/results.md`): mean PSNR "
        "(dB, against the ground truth "
        f"after the least-squares affine fit, as `configs/evaluate.json`) over {len(tests)} test volumes of {shape} "
        "(every noise level and PSF of the run). Windows overlap by 0.25 (fixed) or 16 voxels (auto).",
        "",
        "| model | " + " | ".join(SETTINGS) + " | auto − paper 64³ |",
        "|---|" + "---|" * (len(SETTINGS) + 1),
    ]
    for name, s in rows:
        lines.append(
            f"| {name} | " + " | ".join(f"{s[k]:.2f}" for k in SETTINGS) + f" | {s['auto, float32'] - s['paper 64³']:+.2f} |"
        )
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
