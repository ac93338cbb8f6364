"""Package a trained bundle into a MONAI model-zoo style zip.

Layout of the zip (``<name>/`` at the top)::

    <name>/configs/   common.json (network settings of the trained model), inference.json,
                      evaluate.json, train*.json, simulate*.json, quick.json, metadata.json, logging.conf
    <name>/bundle/    the Python package the configs import
    <name>/models/    model.pt (generator weights) and, if present, model.ts, model.json, blur.pt/.tif/.json
    <name>/docs/      README.md (the repository's README), model_card.md, user_guide.md, ...
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
import json
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("model.pt", "model.ts", "model.json", "blur.pt", "blur.tif", "blur.json")


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


def _check_weights(common: dict, model_pt: Path, bundle_root: Path) -> None:
    """Raise ValueError naming ``model_pt`` if it does not load into the exported ``network_def``."""
    sys.path.insert(0, str(bundle_root))
    from monai.bundle import ConfigParser

    from bundle.inference import load_checkpoint

    parser = ConfigParser(common)
    load_checkpoint(parser.get_parsed_content("network_def"), model_pt)


def export_bundle(
    output: str | os.PathLike,
    bundle_root: str | os.PathLike = ROOT,
    ckpt_dir: str | os.PathLike | None = None,
    config_file: str | Sequence[str] = "configs/common.json",
    name: str = "cyclegan_deconv",
) -> Path:
    """Write the model-zoo zip ``output`` (atomically) and return its path.

    Args:
        output: zip file to write.
        bundle_root: the repository / bundle root (configs, bundle, docs, LICENSE, README.md).
        ckpt_dir: folder of the trained weights (``model.pt`` ...); default ``bundle_root/models``.
        config_file: the training's config list (file or ``"['a.json','b.json']"``), for the network settings.
        name: top-level folder name in the zip.

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

    entries: list[tuple[Path, str]] = []  # (source, arcname)
    for f in sorted((root / "configs").iterdir()):
        if f.is_file() and f.name != "common.json" and f.suffix in (".json", ".conf", ".yaml"):
            entries.append((f, f"{name}/configs/{f.name}"))
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
    if (root / "README.md").is_file():
        entries.append((root / "README.md", f"{name}/docs/README.md"))
    for extra in ("LICENSE", "pyproject.toml"):
        if (root / extra).is_file():
            entries.append((root / extra, f"{name}/{extra}"))

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{name}/configs/common.json", json.dumps(common, indent=4) + "\n")
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
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.bundle_root) / "dist" / f"{args.name}.zip")
    path = export_bundle(output, args.bundle_root, args.ckpt_dir, args.config_file, args.name)
    print(f"exported {path}")


if __name__ == "__main__":
    main()
