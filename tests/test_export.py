"""Sharing: metadata matches the network, TorchScript export, model-zoo zip unpacked elsewhere deconvolves."""

from __future__ import annotations

import os
import site
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


def _monai_bundle(*args: str, cwd: Path = ROOT, env: dict | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *flags, "-m", "monai.bundle", *args], cwd=cwd, env=env,
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
                  "--output_dir", str(tmp_path / "out"), "--progress", "false", "--inference_flips", "1", cwd=root, env=env)
    unpacked, _ = load_volume(tmp_path / "out" / f"{stack.stem}_deconv.tif")
    one_view = dict(device="cpu", progress=False, flips=1)  # the export is under test, not the view averaging
    original = deconvolve(load_volume(stack)[0], model=Path(quick_model["ckpt_dir"]) / "model.pt", **one_view)
    np.testing.assert_allclose(unpacked, original, rtol=0, atol=1e-6 * float(np.abs(original).max()))
    # the bundle folder itself is a model for the Python API (network from its configs)
    np.testing.assert_allclose(deconvolve(load_volume(stack)[0], model=root, **one_view),
                               original, rtol=0, atol=1e-6 * float(np.abs(original).max()))
    # so is the zip itself (what the napari Deconvolve widget accepts), read without unpacking it
    np.testing.assert_allclose(deconvolve(load_volume(stack)[0], model=zip_path, **one_view),
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


# keys and types of a bundle's metadata.json, as MONAI's bundle specification documents them
# (docs.monai.io "MONAI Bundle Specification", metadata.json); written here, not downloaded
_META_KEYS = {"version": str, "changelog": dict, "monai_version": str, "pytorch_version": str, "numpy_version": str,
              "task": str, "description": str, "authors": str, "copyright": str, "network_data_format": dict}
_META_OPTIONAL = {"required_packages_version": dict, "optional_packages_version": dict, "data_source": str,
                  "data_type": str, "image_classes": str, "label_classes": str, "pred_classes": str,
                  "eval_metrics": dict, "intended_use": str, "references": list, "supported_apps": dict,
                  "name": str, "schema": str}
_TENSOR_KEYS = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str,
                "value_range": list, "is_patch_data": bool, "channel_def": dict}


def _check_metadata(meta: dict) -> list[str]:
    problems = [f"missing {k}" for k in _META_KEYS if k not in meta]
    for key, kind in {**_META_KEYS, **_META_OPTIONAL}.items():
        if key in meta and not isinstance(meta[key], kind):
            problems.append(f"{key} is {type(meta[key]).__name__}, not {kind.__name__}")
    for side in ("inputs", "outputs"):
        for tensor, spec in meta.get("network_data_format", {}).get(side, {}).items():
            for key, kind in _TENSOR_KEYS.items():
                if not isinstance(spec.get(key), kind):
                    problems.append(f"network_data_format.{side}.{tensor}.{key} is not {kind.__name__}")
    for key, value in meta.get("eval_metrics", {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f"eval_metrics.{key} is not a number: {value!r}")
    return problems


def test_metadata_checker_catches_bad_metadata():
    import json

    good = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert _check_metadata(good) == [] and good["eval_metrics"] == {}  # an export fills in measured numbers
    bad = {**good, "eval_metrics": {"psnr": "see docs"}, "authors": ["a"]}
    bad.pop("task")
    assert set(_check_metadata(bad)) == {"missing task", "authors is list, not str",
                                         "eval_metrics.psnr is not a number: 'see docs'"}


@pytest.mark.slow
def test_zip_passes_the_model_zoo_checks(quick_model, tmp_path):
    """What the zoo's verify_bundle does, on the unpacked export with inference.json alone, in a process
    whose ``bundle`` package is the export's own copy."""
    import hashlib
    import json

    import yaml

    from conftest import run_bundle

    reports = {}
    for name, extra in (("model", []), ("rl", ["configs/inference_rl.json"])):
        files = str(["configs/common.json", "configs/inference.json", *extra, "configs/evaluate.json"])
        run_bundle("evaluate", files, "--dataset_dir", str(quick_model["dataset_dir"]), "--ckpt_dir",
                   str(quick_model["ckpt_dir"]), "--output_dir", str(tmp_path / name), "--rl_num_iter", "10",
                   "--inference_flips", "1", "--figures", "false")  # fmt: skip
        reports[name] = tmp_path / name / "report.json"
    zip_path = export_bundle(tmp_path / "deconv.zip", ROOT, quick_model["ckpt_dir"], QUICK_COMMON, "deconv",
                             reports["model"], reports["rl"])
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unpacked")
    root = tmp_path / "unpacked" / "deconv"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert _check_metadata(meta) == []
    model_psnr = json.loads(reports["model"].read_text())["mean"]["psnr"]["output_fit"]
    assert meta["eval_metrics"]["test_psnr_affine_fit_db"] == pytest.approx(model_psnr, abs=1e-3)
    readme = (root / "docs" / "README.md").read_text()
    for section in ("# Model Overview", "## Data", "## Performance", "## System configuration", "## Limitations",
                    "# References"):
        assert section in readme, section
    assert "| Richardson-Lucy |" in readme and f"{model_psnr:.2f}" in readme
    assert (root / "docs" / "data_license.txt").stat().st_size > 100 and (root / "LICENSE").is_file()
    large = yaml.safe_load((root / "large_files.yml").read_text())["large_files"]
    for entry in large:
        assert entry["hash_val"] == hashlib.sha256((root / entry["path"]).read_bytes()).hexdigest()
    assert "models/model.pt" in {e["path"] for e in large}
    for config in ("inference.json", "train.json"):  # formatted, and self-contained
        text = (root / "configs" / config).read_text()
        assert text.startswith("{\n    ") and "network_def" in json.loads(text)

    # an environment without the editable install: -S skips site (so the editable install's .pth finder),
    # the installed libraries come back through PYTHONPATH, the bundle's code only from the export
    libraries = os.pathsep.join(p for p in site.getsitepackages() if Path(p).is_dir())
    bare = {**os.environ, "PYTHONPATH": libraries}
    res = subprocess.run([sys.executable, "-S", "-c", "import bundle"], cwd=tmp_path, env=bare,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "No module named 'bundle'" in res.stderr, res.stderr  # no editable install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), libraries])}
    res = subprocess.run([sys.executable, "-S", "-c", "import bundle; print(bundle.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert Path(res.stdout.strip()).resolve().is_relative_to(root.resolve()), res.stdout  # the export's own code
    _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", cwd=root, env=env, flags=("-S",))
    _monai_bundle("ckpt_export", "network_def", "--filepath", "models/model_zoo.ts", "--ckpt_file", "models/model.pt",
                  "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", cwd=root, env=env,
                  flags=("-S",))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(root / "models" / "model_zoo.ts"))(x).numpy(),
                                   load_network(Path(quick_model["ckpt_dir"]) / "model.pt")(x).numpy(), atol=1e-5)
    # and the self-contained inference.json runs alone (as MONAI Label and monai.bundle.load read it)
    stack = next((Path(quick_model["dataset_dir"]) / "test" / "blurred").iterdir())
    _monai_bundle("run", "inference", "--config_file", "configs/inference.json", "--input", str(stack),
                  "--output_dir", str(tmp_path / "out"), "--progress", "false", "--inference_flips", "1", cwd=root, env=env,
                  flags=("-S",))
    assert (tmp_path / "out" / f"{stack.stem}_deconv.tif").is_file()


def test_an_rl_guided_model_is_refused_with_the_reason(tmp_path):
    from bundle.networks import RLGuidedUNet
    from bundle.physics.psf import gaussian_psf

    net = RLGuidedUNet(psf=gaussian_psf((9, 9, 9)), rl_iterations=3, features=(16, 32, 64, 16), depth=2, norm="batch",
                       align_corners=False)  # fmt: skip
    (tmp_path / "models").mkdir()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    with pytest.raises(ValueError, match="model.pt: an RL-guided generator"):
        export_bundle(tmp_path / "dist" / "deconv.zip", ROOT, tmp_path / "models", QUICK_COMMON, "deconv")
    assert not (tmp_path / "dist" / "deconv.zip").exists()
