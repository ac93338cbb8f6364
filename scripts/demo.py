"""The README's main job: simulate data, train the quick non-blind model, evaluate it, print a summary.

Each step is an ordinary MONAI bundle command (printed before it runs), so the demo shows how to use
the bundle on one's own data::

    python scripts/demo.py                 # ~5 minutes on 2 idle CPU cores (280 s measured)
    python scripts/demo.py --epochs 4      # shorter
    python scripts/demo.py --blind         # learn the PSF too (parametric Born & Wolf, NA from 1.0)

Outputs (relative to the repository root, i.e. the bundle root): ``data/simulated/`` (dataset),
``models/`` (``model.pt`` = best generator, ``blur.tif`` = PSF, ``checkpoints/``), ``eval/``
(``validation.json``, PSF snapshots, ``test/report.md`` + figures).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bundle_run(run_id: str, configs: list[str], *overrides: str) -> None:
    """Run ``python -m monai.bundle run <run_id>`` from the bundle root, echoing the command."""
    config_arg = "[" + ",".join(f"'{c}'" for c in configs) + "]" if len(configs) > 1 else configs[0]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg, *overrides]
    shown = [f'"{c}"' if c.startswith("[") else shlex.quote(c) for c in ["python", *cmd[1:]]]
    print("\n$ " + " ".join(shown), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def print_summary(output_dir: Path) -> None:
    """Print the best validation scores and the test report under ``output_dir`` (any folder: paths
    inside the repository are shown relative to it, others as given)."""
    history = json.loads((output_dir / "validation.json").read_text())
    best = max(history, key=lambda e: e["val_psnr"])
    print("\n=== validation (best epoch {epoch}, iteration {iteration}) ===".format(**best))
    print(f"{'':8s} {'PSNR dB':>8s} {'SSIM':>7s}")
    print(f"{'input':8s} {best['val_input_psnr']:8.2f} {best['val_input_ssim']:7.4f}   (input at its best affine scaling)")
    print(f"{'output':8s} {best['val_psnr']:8.2f} {best['val_ssim']:7.4f}")
    if "psf" in best:
        print("PSF parameters:", {k: round(v, 4) for k, v in best["psf"].items()})
    report = output_dir / "test" / "report.md"
    if report.is_file():
        resolved = report.resolve()
        shown = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved
        print(f"\n=== test set: {shown} ===\n" + report.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of 25 iterations (default 12)")
    parser.add_argument("--val_interval", type=int, default=3, help="validate every this many epochs (default 3)")
    parser.add_argument("--blind", action="store_true", help="blind mode: learn the PSF (default: non-blind)")
    parser.add_argument("--dataset_dir", default="data/simulated", help="where the simulated data go")
    parser.add_argument("--ckpt_dir", default="models", help="where the trained weights go")
    parser.add_argument("--output_dir", default="eval", help="where logs, PSF snapshots and reports go")
    args = parser.parse_args()

    start = time.time()
    bundle_run("simulate", ["configs/simulate.json"], "--dataset_dir", args.dataset_dir)
    train = ["configs/common.json", "configs/train.json"] + ([] if args.blind else ["configs/train_nonblind.json"])
    paths = ["--dataset_dir", args.dataset_dir, "--ckpt_dir", args.ckpt_dir, "--output_dir", args.output_dir]
    # the demo owns its folders: a re-run replaces its earlier model (--overwrite true)
    bundle_run(
        "training", train + ["configs/quick.json"], *paths,
        "--max_epochs", str(args.epochs), "--val_interval", str(args.val_interval), "--overwrite", "true",
    )
    bundle_run(
        "evaluate",
        ["configs/common.json", "configs/quick.json", "configs/inference.json", "configs/evaluate.json"],
        *paths[:4], "--output_dir", f"{args.output_dir}/test",
    )

    print_summary(ROOT / args.output_dir)
    print(f"demo finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
