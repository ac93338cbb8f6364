"""Evaluation report: numbers recomputed, markdown per volume, figures with content, bad pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from bundle.evaluate import DeconvolutionReport, psf_report
from bundle.inference import TiledInferer, deconvolve
from bundle.io import load_volume, save_volume
from bundle.metrics import affine_fit, psnr, ssim
from bundle.networks import DeblurUNet
from bundle.physics.psf import gaussian_psf

from conftest import run_bundle

EVALUATE = "['configs/common.json','configs/quick.json','configs/inference.json','configs/evaluate.json']"


def _png(path: Path, height: int) -> None:
    img = imread(path)
    assert img.shape[:2] == (height, 900), path
    assert float(img[..., :3].std()) > 0.05, f"{path} looks blank"


@pytest.mark.slow
def test_evaluate_report(quick_model, tmp_path):
    out = tmp_path / "report"
    run_bundle("evaluate", EVALUATE, "--dataset_dir", str(quick_model["dataset_dir"]),
               "--ckpt_dir", str(quick_model["ckpt_dir"]), "--output_dir", str(out))
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    test_dir = Path(quick_model["dataset_dir"]) / "test"
    names = sorted(p.name for p in (test_dir / "blurred").iterdir())
    assert [r["name"] for r in report["volumes"]] == names
    assert "0.1, 99.9" in report["normalisation"] and "MAX" in report["normalisation"]
    for row in report["volumes"]:
        assert f"| {row['name']} |" in md
        blurred, meta = load_volume(row["input"])
        sharp, _ = load_volume(row["ground_truth"])
        pred = deconvolve(blurred, model=Path(quick_model["ckpt_dir"]) / "model.pt",  # the config's defaults
                          output_range="normalized", device="cpu", progress=False)
        lo, hi = np.percentile(blurred, 0.1), np.percentile(blurred, 99.9)
        x = torch.from_numpy(np.clip((blurred - lo) / (hi - lo), 0, 1))[None, None]
        gt = torch.from_numpy(np.clip((sharp - sharp.min()) / (np.percentile(sharp, 99.99) - sharp.min()), 0, 1))[None, None]
        y = torch.from_numpy(pred)[None, None]
        assert row["psnr"]["output"] == pytest.approx(psnr(y, gt), abs=1e-3)
        assert row["ssim"]["output"] == pytest.approx(ssim(y, gt), abs=1e-4)
        assert row["psnr"]["input_raw"] == pytest.approx(psnr(x, gt), abs=1e-3)
        assert row["psnr"]["input_fit"] == pytest.approx(psnr(affine_fit(x, gt).float(), gt), abs=1e-3)
        assert row["psnr"]["output"] > row["psnr"]["input_fit"]
        saved, saved_meta = load_volume(row["prediction"])
        np.testing.assert_allclose(saved, pred * (hi - lo) + lo, rtol=1e-5, atol=1e-4 * hi)
        assert saved_meta["voxel_size"] == pytest.approx(meta["voxel_size"])
        _png(out / row["figure"], 960)  # 3 rows: input / output / ground truth
    assert report["mean"]["psnr"]["output"] == pytest.approx(np.mean([r["psnr"]["output"] for r in report["volumes"]]))
    # non-blind: the exported blur.tif is the true PSF (on the kernel grid)
    assert report["psf"]["correlation"] > 0.99
    assert report["psf"]["fwhm_um"]["learned"]["z"] > report["psf"]["fwhm_um"]["learned"]["x"]
    assert "## PSF (fixed: non-blind mode)" in md and "## Learned PSF" not in md and "figures/psf.png" in md
    _png(out / "figures" / "psf.png", 640)


def test_psf_report_numbers():
    true = gaussian_psf(shape=(15, 15, 15), fwhm=(0.6, 0.25, 0.25), voxel_size=(0.1, 0.1, 0.1))
    wide = gaussian_psf(shape=(15, 15, 15), fwhm=(0.8, 0.3, 0.3), voxel_size=(0.1, 0.1, 0.1))
    numbers, *_ = psf_report(wide, true, voxel_size=(0.1, 0.1, 0.1))
    assert 0.5 < numbers["correlation"] < 1
    assert numbers["fwhm_um"]["true"]["z"] == pytest.approx(0.6, abs=0.02)
    assert numbers["fwhm_um"]["learned"]["x"] == pytest.approx(0.3, abs=0.02)


def test_missing_ground_truth_writes_nothing(tmp_path):
    save_volume(tmp_path / "blurred" / "a.tif", np.random.default_rng(0).random((8, 24, 24)).astype(np.float32))
    (tmp_path / "gt").mkdir()
    report = DeconvolutionReport(
        DeblurUNet(features=(4, 4, 8, 8, 16, 4)).eval(), TiledInferer(roi_size=(32, 32, 32)),
        str(tmp_path / "blurred"), str(tmp_path / "gt"), str(tmp_path / "out"),
    )
    with pytest.raises(FileNotFoundError, match="a.tif"):
        report.run()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parameterization", ["fixed", "parametric"])
def test_a_fixed_psf_is_not_reported_as_learned(tmp_path, parameterization):
    rng = np.random.default_rng(0)
    for d in ("blurred", "truth"):
        save_volume(tmp_path / d / "v.tif", rng.random((8, 16, 16), dtype=np.float32), voxel_size=(0.1, 0.1, 0.1))
    psf = gaussian_psf((7, 7, 7), fwhm=(0.4, 0.2, 0.2))
    save_volume(tmp_path / "blur.tif", psf, voxel_size=(0.1, 0.1, 0.1))
    (tmp_path / "blur.json").write_text(json.dumps({"parameterization": parameterization}))
    save_volume(tmp_path / "psf.tif", psf, voxel_size=(0.1, 0.1, 0.1))
    net = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False).eval()
    DeconvolutionReport(
        net, None, str(tmp_path / "blurred"), str(tmp_path / "truth"), str(tmp_path / "report"),
        learned_psf=str(tmp_path / "blur.tif"), true_psf=str(tmp_path / "psf.tif"), figures=False,
    ).run()  # fmt: skip
    report = (tmp_path / "report" / "report.md").read_text()
    fixed = parameterization == "fixed"
    assert ("## PSF (fixed: non-blind mode)" in report) == fixed
    assert ("## Learned PSF" in report) == (not fixed)
    report_json = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report_json["psf"]["fixed"] == fixed
    # the faint-structure score is reported per volume and on average
    row = report_json["volumes"][0]["dim_structure"]["input"]
    assert set(row) >= {"dim_recall", "dim_precision"} and "Faint structure" in report
