#!/usr/bin/env python
"""Score every kept checkpoint of a training run without ground truth, and choose one.

For each ``<ckpt_dir>/checkpoints/checkpoint_<iteration>.pt`` the run's own blur path (PSF layer with
its gain and offset, and its noise model) makes synthetic stacks from the run's sharp domain, and the
checkpoint's (EMA) generator is scored on them: :class:`bundle.metrics.SharpCycleScore`, the
``val_sharp_cycle`` of the training logs, recomputed here for checkpoints of runs that did not log it.
When the configuration's validation pairs have a ground truth (simulated data), every checkpoint is
also scored on them (PSNR after the affine fit), so that the no-reference choice can be compared with
the ground-truth choice and with the last checkpoint. Keep checkpoints with
``--train#handlers#0#n_saved 100`` at training time.

Example (the configuration files and keys of the training run)::

    python scripts/choose_checkpoint.py \\
        --config_file "['configs/common.json','configs/train.json','configs/quick.json']" \\
        --ckpt_dir runs/mine/models --set dataset_dir='"data/simulated"' --output runs/mine/choice.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from monai.bundle import ConfigParser  # noqa: E402

from bundle.handlers import load_training_checkpoint  # noqa: E402
from bundle.io import atomic_write_text  # noqa: E402
from bundle.metrics import SharpCycleScore, affine_fit, psnr  # noqa: E402


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in (ckpt_dir / "checkpoints").glob("checkpoint_*.pt") if (m := re.search(r"_(\d+)\.pt$", p.name))]
    if not found:
        raise SystemExit(f"{ckpt_dir / 'checkpoints'}: no checkpoint_<iteration>.pt files")
    return sorted(found)


def _parser(config_files: list[str], ckpt_dir: Path, settings: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files)
    parser["ckpt_dir"] = str(ckpt_dir)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=<JSON value>")
        parser[key] = json.loads(value)
    return parser


def score_checkpoints(parser: ConfigParser, ckpt_dir: Path, max_volumes: int | None = None) -> list[dict[str, Any]]:
    """One row per kept checkpoint: ``iteration``, ``sharp_cycle`` (dB) and, with labelled validation
    pairs, ``val_psnr`` (dB, after the affine fit)."""
    kept = _checkpoints(ckpt_dir)  # before the config is resolved: a wrong folder is said first
    network = parser.get_parsed_content("network_def")
    blur = parser.get_parsed_content("blur")
    noise = parser.get_parsed_content("blur_noise")
    volumes = parser.get_parsed_content("sharp_cycle_volumes")
    limit = max_volumes or parser.get_parsed_content("sharp_cycle_max_volumes")
    inferer = parser.get_parsed_content("validate#inferer")
    pairs = [item for item in parser.get_parsed_content("validate#dataset") if "label" in item]
    metric = SharpCycleScore(  # one metric: the sharp volumes are read once, each checkpoint's weights go into the same modules
        network=network, blur=blur, noise=noise, volumes=volumes, max_volumes=limit,
        roi_size=parser.get_parsed_content("sharp_cycle_roi_size"),
    )  # fmt: skip
    rows = []
    for iteration, path in kept:
        state = load_training_checkpoint(path)
        network.load_state_dict(state["g_deblur_ema"] if "g_deblur_ema" in state else state["g_deblur"])
        blur.load_state_dict(state["blur"])
        noise.load_state_dict(state["blur_noise"])
        network.eval()
        metric.reset()
        metric(torch.zeros(1, 1, 1, 1, 1))
        row: dict[str, Any] = {"iteration": iteration, "sharp_cycle": float(metric.aggregate())}
        if pairs:
            with torch.no_grad():
                scores = [psnr(affine_fit(inferer(p["image"][None], network), p["label"][None]).float(), p["label"][None]) for p in pairs]
            row["val_psnr"] = float(np.mean(scores))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def choices(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sharp-cycle choice, the last checkpoint and, with ``val_psnr``, the ground-truth choice."""
    out: dict[str, Any] = {"sharp_cycle_choice": max(rows, key=lambda r: r["sharp_cycle"]), "last": rows[-1]}
    if all("val_psnr" in r for r in rows):
        psnrs = [r["val_psnr"] for r in rows]
        out["ground_truth_choice"] = max(rows, key=lambda r: r["val_psnr"])
        out["spread_db"] = max(psnrs) - min(psnrs)
        out["correlation"] = float(np.corrcoef([r["sharp_cycle"] for r in rows], psnrs)[0, 1]) if len(rows) > 2 else None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config_file", required=True, help="the training run's config files, as MONAI takes them")
    ap.add_argument("--ckpt_dir", required=True, type=Path, help="the run's ckpt_dir (holds checkpoints/)")
    ap.add_argument("--set", action="append", default=[], help="key=<JSON value>: the run's other keys")
    ap.add_argument("--max_volumes", type=int, default=None, help="sharp volumes scored (default: the config's)")
    ap.add_argument("--output", type=Path, default=None, help="JSON file for the rows and the choices")
    args = ap.parse_args(argv)
    files = ast.literal_eval(args.config_file) if args.config_file.startswith("[") else [args.config_file]
    rows = score_checkpoints(_parser(list(files), args.ckpt_dir, args.set), args.ckpt_dir, args.max_volumes)
    result = {"command": " ".join(sys.argv), "rows": rows, **choices(rows)}
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return result


if __name__ == "__main__":
    main()
