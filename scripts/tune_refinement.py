#!/usr/bin/env python
"""Choose how many Richardson–Lucy iterations refine a trained generator's output, on validation pairs.

The inference pipeline can start Richardson–Lucy from G's output and run a few iterations through the
stack's PSF (:func:`bundle.classical.refine_estimate`; the configs' ``refine_iterations``). How many
helps depends on the model and the data, so it is chosen like RL's own count: on validation volumes
with a ground truth, by the mean PSNR after the least-squares affine fit (the score ``run evaluate``
reports), among the counts that keep the dim-structure recall within 0.01 of G's own, for each of a few
total-variation weights of RL (0, 0.002, 0.005 by default) and blends of the refined estimate with G's
output (``blend · refined + (1 − blend) · G``, 0.2 to 1 by default; the best validation PSNR wins).
The count, the weight and the blend go to ``<ckpt_dir>/refinement.json``; from then on
``run inference``, ``run evaluate`` and ``bundle.inference.deconvolve`` of that model refine with them
(``--refine_iterations 0`` switches it off).

Example (simulated data: ``<dataset_dir>/val/blurred`` and ``<dataset_dir>/val/ground_truth``)::

    python scripts/tune_refinement.py --ckpt_dir models --dataset_dir data/simulated

The PSF is the model's ``blur.tif`` (the known PSF of a non-blind model, the learned one of a blind
model) unless ``--psf`` names another file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bundle.classical.refine import REFINEMENT_FILE  # noqa: E402
from bundle.classical.tuning import best_refinement_settings, refinement_scores  # noqa: E402
from bundle.data import correct_hot_pixels, paired_datalist, trained_hot_pixel_threshold  # noqa: E402
from bundle.inference import NormalizePercentilesd  # noqa: E402
from bundle.inference.api import load_deconvolver  # noqa: E402
from bundle.inference.flips import DEFAULT_FLIPS, FLIP_CHOICES  # noqa: E402
from bundle.io import atomic_write_text, load_volume  # noqa: E402

#: the blends of the refined estimate with G's output tried by default (1: the refined estimate alone)
DEFAULT_BLENDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def tune(
    ckpt_dir: Path,
    val_blurred: Path,
    val_truth: Path,
    psf_file: Path,
    max_iter: int = 200,
    percentiles: tuple[float, float] = (0.1, 99.9),
    max_recall_loss: float | None = 0.01,
    tv_weights: tuple[float, ...] = (0.0, 0.002, 0.005),
    flips: int = DEFAULT_FLIPS,
    blends: tuple[float, ...] = DEFAULT_BLENDS,
    hot_pixel_threshold: float | str | None = "auto",
) -> dict:
    """Run G on the validation pairs, scan 0..``max_iter`` refinement iterations for each TV weight and
    blend, write and return the choice. ``hot_pixel_threshold``: ``"auto"`` as the model's training
    (:func:`bundle.data.trained_hot_pixel_threshold`), a number, or None (no correction)."""
    for path, what in ((ckpt_dir / "model.pt", "model"), (psf_file, "PSF")):
        if not path.is_file():
            raise FileNotFoundError(f"no {what} file at {path}")
    if hot_pixel_threshold == "auto":
        hot_pixel_threshold = trained_hot_pixel_threshold(ckpt_dir)
    pairs = paired_datalist(str(val_blurred), str(val_truth))
    deconvolver = load_deconvolver(ckpt_dir / "model.pt", progress=False, flips=flips)
    blurred, estimates, truths = [], [], []
    for item in pairs:
        # as the model's training and inference read its stacks
        stack = correct_hot_pixels(load_volume(item["image"], dtype=np.float32)[0], hot_pixel_threshold)[0]
        d = NormalizePercentilesd("image", percentiles, intensity_range=deconvolver.network)(
            {"image": torch.as_tensor(stack, dtype=torch.float32)[None]}
        )
        image = torch.as_tensor(d["image"])
        with torch.no_grad():
            estimates.append(deconvolver(image[None])[0, 0].numpy())
        blurred.append(image[0].numpy())
        truths.append(np.asarray(load_volume(item["label"])[0], np.float32))
    psf = np.asarray(load_volume(psf_file)[0])
    settings, by_tv = best_refinement_settings(
        blurred, estimates, truths, psf,
        tv_weights=tv_weights, max_iter=max_iter, max_recall_loss=max_recall_loss, blends=blends,
    )  # fmt: skip
    best, curves = settings["iterations"], by_tv[settings["tv_weight"]]
    chosen = curves["blends"].index(settings["blend"])
    # the chosen setting's own scores (the guard looked at the refined estimate before the blend)
    scores = refinement_scores(blurred, estimates, truths, psf, settings)
    result = {
        "iterations": best,
        "tv_weight": settings["tv_weight"],
        "blend": settings["blend"],
        "val_psnr_unrefined": curves["psnr"][0],
        "val_psnr_refined": scores[0],
        "val_dim_recall_unrefined": curves["dim_recall"][0],
        "val_dim_recall_refined": scores[1],
        "max_recall_loss": max_recall_loss,
        "val_psnr_curve": [row[chosen] for row in curves["blend_psnr"]],
        "val_dim_recall_curve": curves["dim_recall"],
        "curves_by_tv_weight": {str(tv): {k: c[k] for k in ("psnr", "dim_recall")} for tv, c in by_tv.items()},
        "blends": curves["blends"],
        "psf": str(psf_file),
        "validation": [item["image"] for item in pairs],
        "max_iter": max_iter,
        "flips": flips,
        "hot_pixel_threshold": hot_pixel_threshold,
    }
    atomic_write_text(ckpt_dir / REFINEMENT_FILE, json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", type=Path, default=Path("models"), help="folder of model.pt (default models)")
    parser.add_argument("--dataset_dir", type=Path, default=Path("data/simulated"), help="holds val/blurred and val/ground_truth")
    parser.add_argument("--psf", type=Path, default=None, help="PSF file (default <ckpt_dir>/blur.tif)")
    parser.add_argument("--max_iter", type=int, default=200, help="largest count tried (default 200)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.1, 99.9), metavar=("LOW", "HIGH"),
                        help="the blurred stacks' normalisation, as the model was trained (blurred_percentiles; default 0.1 99.9)")
    parser.add_argument("--max_recall_loss", type=float, default=0.01,
                        help="the dim-structure recall may fall at most this much under G's own (default 0.01; "
                             "a negative value: PSNR alone)")
    parser.add_argument("--tv_weights", type=float, nargs="+", default=(0.0, 0.002, 0.005),
                        help="total-variation weights of RL tried (default 0 0.002 0.005; each in [0, 1/6))")
    parser.add_argument("--blends", type=float, nargs="+", default=DEFAULT_BLENDS,
                        help="weights of the refined estimate against G's output tried "
                             "(default 0.2 0.3 ... 1; each in (0, 1])")
    parser.add_argument("--flips", type=int, choices=FLIP_CHOICES, default=DEFAULT_FLIPS,
                        help="XY views G's output is averaged over, as inference does (inference_flips; default 8)")
    parser.add_argument("--hot_pixel_threshold", type=float, default=None,
                        help="replace the validation stacks' hot pixels first with this threshold, e.g. 4 "
                             "(default: as the model was trained, from its model.json; 0: no correction)")
    args = parser.parse_args(argv)
    if args.max_iter < 1:
        parser.error(f"--max_iter must be >= 1, got {args.max_iter}")
    if not all(0 <= tv < 1 / 6 for tv in args.tv_weights):
        parser.error(f"--tv_weights must each be in [0, 1/6), got {args.tv_weights}")
    if not all(0 < b <= 1 for b in args.blends):
        parser.error(f"--blends must each be in (0, 1], got {args.blends}")
    try:
        result = tune(
            args.ckpt_dir,
            args.dataset_dir / "val" / "blurred",
            args.dataset_dir / "val" / "ground_truth",
            args.psf or args.ckpt_dir / "blur.tif",
            args.max_iter,
            percentiles=tuple(args.percentiles),
            max_recall_loss=None if args.max_recall_loss < 0 else args.max_recall_loss,
            tv_weights=tuple(args.tv_weights),
            flips=args.flips,
            blends=tuple(args.blends),
            hot_pixel_threshold={None: "auto", 0: None}.get(args.hot_pixel_threshold, args.hot_pixel_threshold),
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"refinement: {result['iterations']} iterations, TV weight {result['tv_weight']:g}, blend {result['blend']:g} "
        f"(validation PSNR {result['val_psnr_unrefined']:.2f} -> "
        f"{result['val_psnr_refined']:.2f} dB, dim recall {result['val_dim_recall_unrefined']:.3f} -> "
        f"{result['val_dim_recall_refined']:.3f}); written to {args.ckpt_dir / REFINEMENT_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
