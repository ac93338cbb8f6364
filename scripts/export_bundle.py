"""Package a trained bundle into a MONAI model-zoo style zip.

Layout of the zip (``<name>/`` at the top)::

    <name>/configs/   common.json (network settings of the trained model); inference.json and
                      train.json self-contained (common.json's keys merged in, as the model zoo's
                      checks, MONAI Label and ``monai.bundle.load`` read them alone); evaluate.json,
                      train_*.json, simulate*.json, quick.json, ... (overlays after common.json);
                      metadata.json (numeric ``eval_metrics`` from ``--report``), logging.conf
    <name>/bundle/    the Python package the configs import
    <name>/models/    model.pt (generator weights) and, if present, model.ts, model.json, blur.pt/.tif/.json
    <name>/docs/      README.md (the model zoo's template: overview, data, performance with numbers
                      beside Richardson-Lucy's, system configuration, limitations, citation),
                      data_license.txt, project_README.md (the repository's README), user_guide.md, ...
    <name>/large_files.yml  path, sha256 and (empty until uploaded) url of each file under models/
    <name>/LICENSE

The trained model may use other network settings than ``configs/common.json`` (e.g. the quick model,
trained with ``configs/quick.json``): pass the training's config list with ``--config_file``; the
exported ``common.json`` gets the values of its own keys from that list (e.g. ``generator_features``,
``patch_size``), so ``inference`` in the unpacked bundle needs only ``common.json`` + ``inference.json``.
The weights are checked against the exported ``network_def`` before anything is written; the zip is
written to a temporary file and renamed into place.

Usage::

    python scripts/export_bundle.py --ckpt_dir models --output dist/cyclegan_deconv.zip \\
        --config_file "['configs/common.json','configs/quick.json']"

    # in the unpacked bundle folder
    cd cyclegan_deconv && PYTHONPATH=. python -m monai.bundle run inference \\
        --config_file "['configs/common.json','configs/inference.json']" --input stack.tif --output_dir out
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("model.pt", "model.ts", "model.json", "blur.pt", "blur.tif", "blur.json", "refinement.json")


def _config_list(config_file: str | Sequence[str]) -> list[Path]:
    if isinstance(config_file, str):
        text = config_file.strip()
        files = ast.literal_eval(text) if text.startswith("[") else [text]
    else:
        files = list(config_file)
    return [Path(f) for f in files]


def merged_common(bundle_root: Path, config_file: str | Sequence[str]) -> dict:
    """``configs/common.json`` with its keys updated from the later files of ``config_file``."""
    common = json.loads((bundle_root / "configs" / "common.json").read_text())
    for f in _config_list(config_file):
        path = f if f.is_absolute() else bundle_root / f
        if path.resolve() == (bundle_root / "configs" / "common.json").resolve():
            continue
        for key, value in json.loads(path.read_text()).items():
            if key in common:
                common[key] = value
    return common


def eval_metrics(report: dict) -> dict[str, float]:
    """Numeric ``eval_metrics`` for metadata.json from an evaluate ``report.json`` (test-set means)."""
    mean = report.get("mean") or report["test_mean"]
    out = {
        "test_psnr_affine_fit_db": round(float(mean["psnr"]["output_fit"]), 3),
        "test_ssim_affine_fit": round(float(mean["ssim"]["output_fit"]), 4),
        "input_psnr_affine_fit_db": round(float(mean["psnr"]["input_fit"]), 3),
    }
    dim = mean.get("dim_structure", {}).get("output")
    if dim:
        out["dim_structure_recall"] = round(float(dim["dim_recall"]), 4)
        out["dim_structure_precision"] = round(float(dim["dim_precision"]), 4)
    return out


def _large_files(ckpt: Path, name: str) -> str:
    """``large_files.yml``: the zoo stores weights outside git; the url is filled in on upload."""
    lines = ["large_files:"]
    for fname in MODEL_FILES:
        f = ckpt / fname
        if f.is_file() and fname.endswith((".pt", ".ts")):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            lines += [f'  - path: "models/{fname}"', '    url: ""', f'    hash_val: "{digest}"', '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def _zoo_readme(meta: dict, common: dict, report: dict | None, rl_report: dict | None) -> str:
    """docs/README.md in the model zoo's template, with measured numbers where a report is given."""
    import platform

    rows = []
    for label, rep, key in (("widefield input", report, "input"), ("this model", report, "output"),
                            ("Richardson-Lucy", rl_report, "output")):
        if rep is None:
            continue
        mean = rep.get("mean") or rep["test_mean"]
        dim = mean.get("dim_structure", {}).get(key, {})
        dims = f"{dim['dim_recall']:.3f} / {dim['dim_precision']:.3f}" if dim else "-"
        rows.append(f"| {label} | {mean['psnr'][key + '_fit']:.2f} | {mean['ssim'][key + '_fit']:.3f} | {dims} |")
    if rows:
        performance = (
            "Test-set means measured by `configs/evaluate.json` (PSNR/SSIM after a least-squares affine fit of\n"
            "each output to its ground truth; dim-structure recall = share of dim true voxels brought back to\n"
            ">= 50 % of their value, precision = share of dim output voxels where the truth has structure):\n\n"
            "| method | PSNR (dB) | SSIM | dim recall / precision |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
        )
    else:
        performance = "No evaluation was exported with this model: run `configs/evaluate.json` on held-out pairs.\n"
    return f"""# Model Overview
{meta.get("description", "")}

Task: {meta.get("task", "")}. Paper: {"; ".join(meta.get("references", []))}

## Data
{meta.get("data_source", "")}. Voxel size (z, y, x) of the training data: {common.get("voxel_size")} µm;
training patches {common.get("patch_size")} voxels; intensities normalised per stack between the
{common.get("blurred_percentiles")} percentiles (blurred) and {common.get("sharp_percentiles")} (sharp).

## Training configuration
`configs/train.json` (self-contained): a blind cycleGAN with a learnable PSF layer; the exact
training command of this model is in its evaluation report. Non-blind: add `configs/train_nonblind.json`.

## Performance
{performance}
## MONAI Bundle Commands
Deconvolve stacks (TIFF/NIfTI/...; Z, Y, X):

```
PYTHONPATH=. python -m monai.bundle run inference --config_file configs/inference.json --input stack.tif --output_dir out
```

Train (simulated data first: `python -m monai.bundle run simulate --config_file "['configs/common.json','configs/simulate.json']"`):

```
PYTHONPATH=. python -m monai.bundle run training --config_file configs/train.json
```

Export TorchScript: `python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json`

## System configuration
Exported with Python {platform.python_version()}, PyTorch {meta.get("pytorch_version")}, MONAI {meta.get("monai_version")};
runs on CPU or one CUDA GPU (sliding windows bound the memory; see docs/user_guide.md).

## Limitations
Trained for the optics, voxel size and kind of structure of its training data; other data need their own
training (docs/user_guide.md). A learned deconvolution can invent or drop structure: compare with the input
and a classical deconvolution before drawing conclusions. Research use only.

# References
{chr(10).join("- " + r for r in meta.get("references", []))}

# License
{meta.get("copyright", "")}. Code: Apache License 2.0 (LICENSE). Data: docs/data_license.txt.
"""


DATA_LICENSE = """Third-party data licenses
=========================

The model was trained and evaluated on synthetic data generated by this bundle's own simulator
(configs/simulate.json: microtubule or vesicle phantoms, Born & Wolf or vectorial PSFs, Poisson and
Gaussian noise), unless its evaluation report names other data. No third-party data is included.
If you train it on your own stacks, their license applies to the resulting model.
"""


def _check_weights(common: dict, model_pt: Path, bundle_root: Path) -> None:
    """Raise ValueError naming ``model_pt`` if it does not load into the exported ``network_def``."""
    sys.path.insert(0, str(bundle_root))
    from monai.bundle import ConfigParser

    from bundle.inference import load_checkpoint

    parser = ConfigParser(common)  # an RL-guided model.pt is refused here, with the reason (load_checkpoint)
    load_checkpoint(parser.get_parsed_content("network_def"), model_pt)


def export_bundle(
    output: str | os.PathLike,
    bundle_root: str | os.PathLike = ROOT,
    ckpt_dir: str | os.PathLike | None = None,
    config_file: str | Sequence[str] = "configs/common.json",
    name: str = "cyclegan_deconv",
    report: str | os.PathLike | None = None,
    rl_report: str | os.PathLike | None = None,
) -> Path:
    """Write the model-zoo zip ``output`` (atomically) and return its path.

    Args:
        output: zip file to write.
        bundle_root: the repository / bundle root (configs, bundle, docs, LICENSE, README.md).
        ckpt_dir: folder of the trained weights (``model.pt`` ...); default ``bundle_root/models``.
        config_file: the training's config list (file or ``"['a.json','b.json']"``), for the network settings.
        name: top-level folder name in the zip.
        report: the evaluate ``report.json`` of this model (numeric ``eval_metrics``, README performance).
        rl_report: the same for Richardson-Lucy on the same test set (README performance).

    Raises:
        FileNotFoundError: no ``model.pt``.
        ValueError: the weights do not match the exported network definition.
    """
    root = Path(bundle_root).resolve()
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else root / "models"
    if not (ckpt / "model.pt").is_file():
        raise FileNotFoundError(f"{ckpt / 'model.pt'}: no trained generator to export (train first)")
    common = merged_common(root, config_file)
    _check_weights(common, ckpt / "model.pt", root)

    reports = [json.loads(Path(r).read_text()) if r else None for r in (report, rl_report)]
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    if reports[0] is not None:
        meta["eval_metrics"] = eval_metrics(reports[0])
    generated = {  # arcname -> text
        f"{name}/configs/common.json": json.dumps(common, indent=4) + "\n",
        f"{name}/configs/metadata.json": json.dumps(meta, indent=4) + "\n",
        f"{name}/large_files.yml": _large_files(ckpt, name),
        f"{name}/docs/README.md": _zoo_readme(meta, common, *reports),
        f"{name}/docs/data_license.txt": DATA_LICENSE,
    }
    for config in ("inference.json", "train.json"):  # self-contained: common.json's keys merged in
        own = json.loads((root / "configs" / config).read_text())
        generated[f"{name}/configs/{config}"] = json.dumps({**common, **own}, indent=4) + "\n"

    entries: list[tuple[Path, str]] = []  # (source, arcname)
    for f in sorted((root / "configs").rglob("*")):
        arcname = f"{name}/configs/{f.relative_to(root / 'configs').as_posix()}"
        if f.is_file() and f.suffix in (".json", ".conf", ".yaml") and arcname not in generated:
            entries.append((f, arcname))
    for f in sorted((root / "bundle").rglob("*.py")):
        entries.append((f, f"{name}/bundle/{f.relative_to(root / 'bundle').as_posix()}"))
    for fname in MODEL_FILES:
        if (ckpt / fname).is_file():
            entries.append((ckpt / fname, f"{name}/models/{fname}"))
    docs = root / "docs"
    if docs.is_dir():
        for f in sorted(docs.rglob("*")):
            if f.is_file() and f.suffix in (".md", ".png", ".svg", ".json"):
                entries.append((f, f"{name}/docs/{f.relative_to(docs).as_posix()}"))
    entries = [(src, arc) for src, arc in entries if arc not in generated]
    if (root / "README.md").is_file():
        entries.append((root / "README.md", f"{name}/docs/project_README.md"))
    for extra in ("LICENSE", "pyproject.toml"):
        if (root / extra).is_file():
            entries.append((root / extra, f"{name}/{extra}"))

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for arcname, text in generated.items():
                zf.writestr(arcname, text)
            for src, arcname in entries:
                zf.write(src, arcname)

    from bundle.io import atomic_write  # bundle_root is on sys.path (see _check_weights)

    return atomic_write(output, write_zip)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", default=str(ROOT))
    parser.add_argument("--ckpt_dir", default=None, help="trained weights (default: <bundle_root>/models)")
    parser.add_argument("--config_file", default="configs/common.json", help="the training's config list")
    parser.add_argument("--name", default="cyclegan_deconv")
    parser.add_argument("--output", default=None, help="zip file (default: <bundle_root>/dist/<name>.zip)")
    parser.add_argument("--report", default=None, help="evaluate report.json of this model (eval_metrics, README)")
    parser.add_argument("--rl_report", default=None, help="report.json of Richardson-Lucy on the same test set")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.bundle_root) / "dist" / f"{args.name}.zip")
    path = export_bundle(output, args.bundle_root, args.ckpt_dir, args.config_file, args.name, args.report,
                         args.rl_report)
    print(f"exported {path}")


if __name__ == "__main__":
    main()
