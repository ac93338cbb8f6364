#!/usr/bin/env python
"""Find and replace a camera's hot pixels in blurred stacks, writing corrected copies.

A hot pixel adds the same offset to every plane of a stack, a one-voxel line along Z that no blur of
a sample makes; a model trained on simulated pairs sharpens it into a streak, and the spectral PSF
fit reads it as a sharper PSF. Run this on every blurred stack (training, validation and the stacks to
deconvolve) before training and inference; the sharp volumes need nothing. Each input's hot pixels
(:func:`bundle.data.camera.find_hot_pixels`) are replaced plane by plane by the median of their
lateral neighbours; the copy keeps the file name, format and voxel size. ``<output>/hot_pixels.json``
lists the pixels found per file. Inputs are never written; an existing output file is never replaced;
each file is written to a temporary file and renamed.

Example::

    python scripts/correct_hot_pixels.py --input data/train/blurred --output data_fixed/train/blurred
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def correct_folder(
    source: str | Sequence[str],
    output: str | Path,
    threshold: float = 4.0,
    quantile: float = 0.25,
    progress: bool = True,
    max_halo: float | None = 0.2,
) -> dict:
    """Correct every volume of ``source`` (a folder, glob or file list) into ``output``; returns the summary
    (also written to ``<output>/hot_pixels.json``)."""
    from bundle.data import list_volumes
    from bundle.data.camera import correct_hot_pixels
    from bundle.io import load_volume, save_volume

    files = [Path(f) for f in list_volumes(source if isinstance(source, str) else list(source))]
    out = Path(output)
    taken = [str(out / f.name) for f in files if (out / f.name).exists()]
    if taken:
        raise FileExistsError(f"{taken[0]}: exists ({len(taken)} of the outputs do); choose a new output folder")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: two inputs share a file name; correct them into separate folders")
    summary: dict = {"threshold": threshold, "quantile": quantile, "max_halo": max_halo, "files": {}}
    for f in tqdm(files, desc="hot pixels", unit="vol", disable=not progress):
        volume, meta = load_volume(f)
        fixed, mask = correct_hot_pixels(volume, threshold, quantile, max_halo)
        save_volume(out / f.name, fixed, voxel_size=meta.get("voxel_size"), dtype=volume.dtype, protect=files)
        ys, xs = np.nonzero(mask)
        summary["files"][f.name] = {"source": str(f.resolve()), "hot_pixels": int(mask.sum()),
                                    "share": float(mask.mean()), "yx": [[int(y), int(x)] for y, x in zip(ys, xs)]}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".hot_pixels.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "hot_pixels.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, nargs="+", help="a folder, a glob or files of blurred stacks (read only)")
    parser.add_argument("--output", required=True, help="folder for the corrected copies (existing files are never replaced)")
    parser.add_argument("--threshold", type=float, default=4.0, help="in noise standard deviations (default 4)")
    parser.add_argument("--quantile", type=float, default=0.25,
                        help="share of planes in which a hot pixel may fail to stand out (default 0.25)")  # fmt: skip
    parser.add_argument("--max_halo", type=float, default=0.2,
                        help="largest blur halo a hot pixel may show, as a share of its excess (default 0.2; 0 or less: "
                             "no halo or line test, for cameras whose pixels are coarser than the optics' blur)")  # fmt: skip
    args = parser.parse_args(argv)
    source = args.input[0] if len(args.input) == 1 else args.input
    try:
        summary = correct_folder(source, args.output, args.threshold, args.quantile,
                                 max_halo=args.max_halo if args.max_halo > 0 else None)
    except (OSError, ValueError) as err:  # bundle.io.VolumeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = [v["hot_pixels"] for v in summary["files"].values()]
    print(f"wrote {len(counts)} corrected stacks to {args.output}: {sum(counts)} hot pixels "
          f"({min(counts, default=0)}-{max(counts, default=0)} per stack); list in hot_pixels.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
