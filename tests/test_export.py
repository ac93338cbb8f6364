"""Sharing: metadata matches the network, TorchScript export, model-zoo zip unpacked elsewhere deconvolves."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SUBPROCESS_TIMEOUT

sys.path.insert(0, str(ROOT / "scripts"))
from export_bundle import export_bundle  # noqa: E402

from bundle.inference import deconvolve, load_network  # noqa: E402
from bundle.io import load_volume  # noqa: E402

QUICK_COMMON = "['configs/common.json','configs/quick.json']"


def _monai_bundle(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, f"{args}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.mark.slow
def test_verify_and_torchscript(quick_model, tmp_path):
    ckpt = Path(quick_model["ckpt_dir"]) / "model.pt"
    _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", QUICK_COMMON)
    ts = tmp_path / "model.ts"
    _monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt),
                  "--meta_file", "configs/metadata.json", "--config_file", QUICK_COMMON)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(load_network(ts)(x).numpy(), load_network(ckpt)(x).numpy(), atol=1e-5)


@pytest.mark.slow
def test_zip_unpacked_elsewhere_deconvolves(quick_model, tmp_path):
    zip_path = export_bundle(tmp_path / "dist" / "deconv.zip", ROOT, quick_model["ckpt_dir"], QUICK_COMMON, "deconv")
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unpacked")
    for required in ("configs/common.json", "configs/inference.json", "configs/metadata.json", "models/model.pt",
                     "bundle/inference/__init__.py", "bundle/inference/deconvolver.py", "docs/model_card.md", "LICENSE"):
        assert f"deconv/{required}" in names, required
    assert not [n for n in os.listdir(zip_path.parent) if n != "deconv.zip"]  # no temporary leftovers

    root = tmp_path / "unpacked" / "deconv"
    stack = next((Path(quick_model["dataset_dir"]) / "test" / "blurred").iterdir())
    env = {**os.environ, "PYTHONPATH": str(root)}
    _monai_bundle("run", "inference", "--bundle_root", str(root), "--config_file",
                  "['configs/common.json','configs/inference.json']", "--input", str(stack),
                  "--output_dir", str(tmp_path / "out"), "--progress", "false", cwd=root, env=env)
    unpacked, _ = load_volume(tmp_path / "out" / f"{stack.stem}_deconv.tif")
    original = deconvolve(load_volume(stack)[0], model=Path(quick_model["ckpt_dir"]) / "model.pt",
                          device="cpu", progress=False)
    np.testing.assert_allclose(unpacked, original, rtol=0, atol=1e-6 * float(np.abs(original).max()))
    # the bundle folder itself is a model for the Python API (network from its configs)
    np.testing.assert_allclose(deconvolve(load_volume(stack)[0], model=root, device="cpu", progress=False),
                               original, rtol=0, atol=1e-6 * float(np.abs(original).max()))
    # so is the zip itself (what the napari Deconvolve widget accepts), read without unpacking it
    np.testing.assert_allclose(deconvolve(load_volume(stack)[0], model=zip_path, device="cpu", progress=False),
                               original, rtol=0, atol=1e-6 * float(np.abs(original).max()))
    with pytest.raises(ValueError, match="not an exported bundle"):
        empty = tmp_path / "empty.zip"
        zipfile.ZipFile(empty, "w").close()
        load_network(empty)


def test_export_refuses_mismatched_weights(tmp_path):
    from bundle.networks import DeblurUNet

    (tmp_path / "ckpt").mkdir()
    torch.save(DeblurUNet(features=(4, 4, 8, 8, 16, 4)).state_dict(), tmp_path / "ckpt" / "model.pt")
    with pytest.raises(ValueError, match="model.pt: checkpoint does not match"):
        export_bundle(tmp_path / "x.zip", ROOT, tmp_path / "ckpt", QUICK_COMMON)
    assert not (tmp_path / "x.zip").exists()
