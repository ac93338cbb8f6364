"""Refinement of a generator's output by Richardson–Lucy started from it (bundle.classical.refine)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from bundle_cli import run_script
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from bundle.classical import (
    PSFRefinement,
    best_refinement,
    best_refinement_settings,
    refine_estimate,
    refinement_scores,
    richardson_lucy,
    tuned_refinement,
)
from bundle.classical.tuning import _blend_psnrs, choose_refinement
from bundle.inference import TiledInferer
from bundle.metrics import affine_fit, psnr
from bundle.networks import DeblurUNet

from conftest import run_bundle

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = "['configs/common.json','configs/quick.json','configs/inference.json','configs/evaluate.json']"


def _gaussian_psf(shape=(9, 9, 9), sigma=(2.0, 1.2, 1.2)) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) - s // 2 for s in shape], indexing="ij")
    psf = np.exp(-sum(g**2 / (2 * s**2) for g, s in zip(grids, sigma, strict=True)))
    return psf / psf.sum()


@pytest.fixture(scope="module")
def scene():
    """(object, psf, noisy blurred in [0, 1] units, an under-resolved 'network' estimate in other units)."""
    rng = np.random.default_rng(0)
    obj = np.zeros((24, 32, 32))
    for _ in range(25):
        obj[tuple(rng.integers(4, np.array(obj.shape) - 4))] = rng.uniform(0.2, 1.0)
    obj = gaussian_filter(obj, 0.6)
    psf = _gaussian_psf()
    blurred = fftconvolve(obj, psf, mode="same").clip(0)
    scale = 1.0 / blurred.max()
    noisy = (rng.poisson(blurred * scale * 50) / 50).astype(np.float32)  # peak 50 photons
    # what a half-trained G gives: the object, still blurred a little, on its own scale and offset
    estimate = (0.3 * gaussian_filter(obj, 0.8) / gaussian_filter(obj, 0.8).max() + 0.02).astype(np.float32)
    return obj, psf, noisy, estimate


def _score(u, obj) -> float:
    t = torch.as_tensor(obj, dtype=torch.float64)[None, None]
    return psnr(affine_fit(torch.as_tensor(np.asarray(u), dtype=torch.float64)[None, None], t), t)


def test_refinement_raises_the_score_of_an_under_resolved_estimate_and_beats_rl_alone(scene):
    obj, psf, noisy, estimate = scene
    before = _score(estimate, obj)
    refined = refine_estimate(noisy, estimate, psf, num_iter=30)
    assert refined.shape == estimate.shape and refined.dtype == np.float32
    assert _score(refined, obj) > before + 1.0
    best_rl = max(_score(richardson_lucy(noisy, psf, num_iter=n), obj) for n in (10, 30, 60, 100))
    assert _score(refined, obj) > best_rl


def test_zero_iterations_return_the_estimate_and_the_result_keeps_the_estimates_units(scene):
    _, psf, noisy, estimate = scene
    assert np.array_equal(refine_estimate(noisy, estimate, psf, num_iter=0), estimate)
    once = refine_estimate(noisy, estimate, psf, num_iter=10)
    # the fit absorbs the estimate's scale: twice the estimate gives twice the refined result
    twice = refine_estimate(noisy, 2 * estimate, psf, num_iter=10)
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-3, atol=1e-4 * float(once.max()))
    # and it is in the estimate's range, not the stack's
    assert abs(float(np.median(once)) - float(np.median(estimate))) < 0.05


def test_tensor_in_tensor_out_on_the_inputs_device(scene):
    _, psf, noisy, estimate = scene
    out = refine_estimate(torch.as_tensor(noisy), torch.as_tensor(estimate), torch.as_tensor(psf), num_iter=3)
    assert isinstance(out, torch.Tensor) and out.shape == estimate.shape


def test_refinement_errors(scene):
    _, psf, noisy, estimate = scene
    with pytest.raises(ValueError, match="one shape"):
        refine_estimate(noisy, estimate[:-1], psf, num_iter=3)
    with pytest.raises(ValueError, match="num_iter"):
        refine_estimate(noisy, estimate, psf, num_iter=-1)
    with pytest.raises(ValueError, match="does not explain"):
        refine_estimate(noisy, -estimate, psf, num_iter=3)


def test_richardson_lucy_starts_from_an_array(scene):
    obj, psf, _, _ = scene
    clean = fftconvolve(obj, psf, mode="same").clip(0)
    # the object is RL's fixed point on noise-free data (dark outside, exact adjoint)
    u = richardson_lucy(clean, psf, num_iter=5, pad_mode="zeros", init=obj + 1e-3)
    from_input = richardson_lucy(clean, psf, num_iter=5, pad_mode="zeros")
    assert _score(u, obj) > _score(from_input, obj) + 10.0
    with pytest.raises(ValueError, match="shape"):
        richardson_lucy(clean, psf, num_iter=2, init=obj[:-1])
    with pytest.raises(ValueError, match="NaN"):
        richardson_lucy(clean, psf, num_iter=2, init=np.full_like(obj, np.nan))


def test_best_refinement_curve_starts_at_the_estimate_and_picks_its_maximum(scene):
    obj, psf, noisy, estimate = scene
    best, curves = best_refinement([noisy], [estimate], [obj], psf, max_iter=40, max_recall_loss=None)
    curve = curves["psnr"]
    assert len(curve) == len(curves["dim_recall"]) == 41
    assert curve[0] == pytest.approx(_score(estimate, obj))
    assert best == int(np.argmax(curve)) and best > 0
    assert curve[best] == pytest.approx(_score(refine_estimate(noisy, estimate, psf, num_iter=best), obj), abs=1e-3)
    with pytest.raises(ValueError, match="as many"):
        best_refinement([noisy], [], [obj], psf)


def test_tv_weights_are_scanned_and_the_best_validation_score_wins(scene):
    obj, psf, noisy, estimate = scene
    settings, by_tv = best_refinement_settings([noisy], [estimate], [obj], psf, tv_weights=(0.005, 0.0), max_iter=40,
                                               max_recall_loss=None)  # fmt: skip
    assert sorted(by_tv) == [0.0, 0.005]
    assert by_tv[0.0]["psnr"][0] == by_tv[0.005]["psnr"][0]  # the same estimate before refining
    tops = {tv: max(c["psnr"]) for tv, c in by_tv.items()}
    assert settings["tv_weight"] == max(tops, key=tops.get)
    assert by_tv[settings["tv_weight"]]["psnr"][settings["iterations"]] == max(tops.values())
    plain = refine_estimate(noisy, estimate, psf, num_iter=20)
    tv = refine_estimate(noisy, estimate, psf, num_iter=20, tv_weight=0.005)
    assert np.abs(tv - plain).max() > 1e-3 * float(plain.max())  # the weight reaches RL
    np.testing.assert_allclose(PSFRefinement(psf, 20, tv_weight=0.005)(torch.as_tensor(noisy)[None, None],
                                                                      torch.as_tensor(estimate)[None, None])[0, 0].numpy(),
                               tv, rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="tv_weight"):
        PSFRefinement(psf, 5, tv_weight=0.2)
    with pytest.raises(ValueError, match="TV weight"):
        best_refinement_settings([noisy], [estimate], [obj], psf, tv_weights=())
    # nothing helps (the truth itself as the estimate): 0 iterations at the smallest weight tried
    settings, _ = best_refinement_settings([noisy], [obj], [obj], psf, tv_weights=(0.004, 0.002), max_iter=3)
    assert settings == {"iterations": 0, "tv_weight": 0.002, "blend": 1.0}


def test_a_blend_mixes_the_refined_estimate_with_the_estimate(scene):
    obj, psf, noisy, estimate = scene
    refined = refine_estimate(noisy, estimate, psf, num_iter=25)
    blended = refine_estimate(noisy, estimate, psf, num_iter=25, blend=0.6)
    np.testing.assert_allclose(blended, 0.6 * refined + 0.4 * estimate, rtol=1e-5, atol=1e-6)
    out = PSFRefinement(psf, 25, blend=0.6)(torch.as_tensor(noisy)[None, None], torch.as_tensor(estimate)[None, None])
    np.testing.assert_allclose(out[0, 0].numpy(), blended, rtol=1e-5, atol=1e-6)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="refine_blend"):
            refine_estimate(noisy, estimate, psf, num_iter=3, blend=bad)
        with pytest.raises(ValueError, match="refine_blend"):
            PSFRefinement(psf, 3, blend=bad)


def test_blend_scores_in_closed_form_equal_the_fitted_psnr():
    rng = np.random.default_rng(3)
    truth = torch.as_tensor(rng.random((6, 10, 12)))
    r = (truth * 2 + 0.3 * torch.as_tensor(rng.standard_normal((6, 10, 12)))).float()
    e = (0.5 * truth + 0.1 + 0.2 * torch.as_tensor(rng.random((6, 10, 12)))).float()
    blends = (0.1, 0.5, 0.9, 1.0)
    closed = _blend_psnrs(r, e, truth[None, None], blends)
    for al, value in zip(blends, closed, strict=True):
        assert value == pytest.approx(_score(al * r + (1 - al) * e, truth.numpy()), abs=1e-6)


def test_the_blend_is_tuned_with_the_count_and_weight(scene):
    obj, psf, noisy, estimate = scene
    blends = (0.3, 0.6, 1.0)
    settings, by_tv = best_refinement_settings([noisy], [estimate], [obj], psf, tv_weights=(0.0, 0.002), max_iter=40,
                                               blends=blends, max_recall_loss=None)  # fmt: skip
    only_refined, _ = best_refinement_settings([noisy], [estimate], [obj], psf, tv_weights=(0.0, 0.002), max_iter=40,
                                               max_recall_loss=None)  # fmt: skip
    assert settings["blend"] in blends and settings["iterations"] > 0
    top = max(max(max(row) for row in c["blend_psnr"][1:]) for c in by_tv.values())
    curves = by_tv[settings["tv_weight"]]
    chosen = curves["blend_psnr"][settings["iterations"]][curves["blends"].index(settings["blend"])]
    assert chosen == top  # the best setting of the whole grid
    assert chosen >= by_tv[only_refined["tv_weight"]]["psnr"][only_refined["iterations"]] - 1e-9  # blend 1 is in the grid
    # the closed-form curve is the score of the blended refinement itself
    direct = refine_estimate(noisy, estimate, psf, num_iter=settings["iterations"], tv_weight=settings["tv_weight"],
                             blend=settings["blend"])  # fmt: skip
    assert chosen == pytest.approx(_score(direct, obj), abs=1e-3)
    psnr_own, recall_own = refinement_scores([noisy], [estimate], [obj], psf, settings)
    assert psnr_own == pytest.approx(_score(direct, obj), abs=1e-6) and 0 <= recall_own <= 1
    one = curves["blends"].index(1.0)
    assert [row[one] for row in curves["blend_psnr"]] == pytest.approx(curves["psnr"], abs=1e-6)  # blend 1 alone
    with pytest.raises(ValueError, match="blend"):
        best_refinement_settings([noisy], [estimate], [obj], psf, blends=())


def test_the_choice_refuses_counts_that_lose_dim_recall():
    # microtubules, domain A: PSNR peaks at 15 iterations while the recall falls from 0.876 to 0.825
    psnr_curve = [32.67, 32.92, 33.00, 33.02, 33.02, 32.97]
    recall = [0.876, 0.870, 0.846, 0.825, 0.806, 0.780]
    assert choose_refinement(psnr_curve, recall, None) == 3
    assert choose_refinement(psnr_curve, recall, 0.01) == 1
    assert choose_refinement(psnr_curve, recall, 0.06) == 3
    assert choose_refinement([30.0, 29.0], [0.5, 0.9], 0.01) == 0  # a loss of PSNR is never chosen
    assert choose_refinement([30.0, 31.0], [float("nan"), 0.2], 0.01) == 1  # no dim voxels: PSNR alone


def test_psf_refinement_step(scene, tmp_path):
    _, psf, noisy, estimate = scene
    x, o = torch.as_tensor(noisy)[None, None], torch.as_tensor(estimate)[None, None]
    assert PSFRefinement(None, 0)(x, o) is o  # off: no PSF needed
    with pytest.raises(ValueError, match="needs a PSF"):
        PSFRefinement(None, 5)
    with pytest.raises(ValueError, match=">= 0"):
        PSFRefinement(psf, -1)
    missing = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        PSFRefinement(missing, 5)(x, o)
    out = PSFRefinement(psf, 7)(torch.cat([x, x]), torch.cat([o, o]))
    assert out.shape == (2, 1, *estimate.shape)
    np.testing.assert_allclose(out[1, 0].numpy(), refine_estimate(noisy, estimate, psf, num_iter=7), rtol=1e-5, atol=1e-6)


def test_tiled_inferer_applies_its_refinement_to_the_stitched_output():
    net = DeblurUNet(features=(4, 4, 8, 4), depth=2, norm="batch").eval()
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        plain = TiledInferer(roi_size=(16, 32, 32))(x, net)
        shifted = TiledInferer(roi_size=(16, 32, 32), refinement=lambda inputs, outputs: outputs + inputs)(x, net)
    torch.testing.assert_close(shifted, plain + x)


def test_tuned_refinement_reads_the_file(tmp_path):
    assert tuned_refinement(tmp_path) == 0
    assert tuned_refinement(tmp_path, "tv_weight") == 0.0
    assert tuned_refinement(tmp_path, "blend") == 1.0
    (tmp_path / "refinement.json").write_text(json.dumps({"iterations": 12}))
    assert tuned_refinement(tmp_path) == 12 and tuned_refinement(tmp_path, "tv_weight") == 0.0  # an older file
    (tmp_path / "refinement.json").write_text(json.dumps({"iterations": 12, "tv_weight": 0.002}))
    assert tuned_refinement(tmp_path, "tv_weight") == 0.002
    assert tuned_refinement(tmp_path, "blend") == 1.0  # written before the blend was tuned
    (tmp_path / "refinement.json").write_text(json.dumps({"iterations": 12, "tv_weight": 0.002, "blend": 0.7}))
    assert tuned_refinement(tmp_path, "blend") == 0.7
    (tmp_path / "refinement.json").write_text(json.dumps({"iterations": 12, "blend": 0}))
    with pytest.raises(ValueError, match="blend"):
        tuned_refinement(tmp_path)
    with pytest.raises(ValueError, match="setting"):
        tuned_refinement(tmp_path, "iters")
    (tmp_path / "refinement.json").write_text(json.dumps({"iterations": 12, "tv_weight": 0.5}))
    with pytest.raises(ValueError, match="tv_weight"):
        tuned_refinement(tmp_path)
    (tmp_path / "refinement.json").write_text(json.dumps({"iteration": 12}))
    with pytest.raises(ValueError, match="refinement.json"):
        tuned_refinement(tmp_path)
    (tmp_path / "refinement.json").write_text(json.dumps({"iterations": -2}))
    with pytest.raises(ValueError, match=">= 0"):
        tuned_refinement(tmp_path)


def test_tune_script_then_evaluate_uses_the_tuned_count(quick_model, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    ckpt = tmp_path / "models"  # a copy: the shared model's folder must stay unrefined for other tests
    shutil.copytree(quick_model["ckpt_dir"], ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    cmd = [sys.executable, str(ROOT / "scripts" / "tune_refinement.py"), "--ckpt_dir", str(ckpt),
           "--dataset_dir", str(quick_model["dataset_dir"]), "--flips", "1", "--max_iter", "15", "--tv_weights", "0", "0.002"]
    done = run_script(cmd[1], cmd[2:], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    tuned = json.loads((ckpt / "refinement.json").read_text())
    assert 0 <= tuned["iterations"] <= 15 and len(tuned["val_psnr_curve"]) == len(tuned["val_dim_recall_curve"]) == 16
    assert tuned["tv_weight"] in (0.0, 0.002) and sorted(tuned["curves_by_tv_weight"]) == ["0.0", "0.002"]
    assert tuned["blend"] in tuned["blends"] and len(tuned["blends"]) == 9  # 0.2 ... 1
    plain = tuned["curves_by_tv_weight"][str(tuned["tv_weight"])]["psnr"]
    assert tuned["val_psnr_curve"][0] == pytest.approx(plain[0])
    if tuned["blend"] == 1.0:
        assert tuned["val_psnr_curve"] == pytest.approx(plain)
    # the chosen setting rescored on its own equals its closed-form curve value
    assert tuned["val_psnr_refined"] == pytest.approx(tuned["val_psnr_curve"][tuned["iterations"]], abs=1e-3)
    assert tuned["val_psnr_refined"] >= tuned["val_psnr_unrefined"]
    assert tuned["val_dim_recall_refined"] >= tuned["val_dim_recall_unrefined"] - 0.01
    assert f"{tuned['iterations']} iterations" in done.stdout
    for extra, expected in (([], tuned["iterations"]), (["--refine_iterations", "3"], 3), (["--refine_iterations", "0"], 0)):
        out = tmp_path / f"test_{expected}"
        run_bundle("evaluate", EVALUATE, "--dataset_dir", str(quick_model["dataset_dir"]),
                   "--ckpt_dir", str(ckpt), "--output_dir", str(out), "--figures", "false", "--inference_flips", "1",
                   *extra)  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["refine_iterations"] == expected
        assert report["settings"]["refine_tv_weight"] == tuned["tv_weight"]
        assert report["settings"]["refine_blend"] == tuned["blend"]
    scores = {k: json.loads((tmp_path / f"test_{k}" / "report.json").read_text())["mean"]["psnr"]["output"] for k in (0, 3)}
    assert scores[0] != scores[3]  # the refinement changed the output
    # the errors in-process (the same main(); the command line above already ran it as a script)
    import tune_refinement

    args = cmd[2:]
    assert tune_refinement.main([args[0], str(tmp_path / "empty"), *args[2:]]) == 1
    assert "model.pt" in capsys.readouterr().err
    for bad, flag in (([*args[:-3], "--tv_weights", "0.3"], "--tv_weights"), ([*args, "--blends", "0", "1"], "--blends")):
        with pytest.raises(SystemExit) as exit_info:
            tune_refinement.main(bad)
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    # validation stacks with a camera's hot pixels: --hot_pixel_threshold scores G on them corrected;
    # without the option the threshold is the training's (model.json's preprocessing: the default, 4)
    record = json.loads((ckpt / "model.json").read_text())
    assert record["preprocessing"] == {"hot_pixel_threshold": 4.0} and tuned["hot_pixel_threshold"] == 4.0
    hot_data = tmp_path / "hot_data"
    shutil.copytree(quick_model["dataset_dir"] / "val", hot_data / "val")
    rng = np.random.default_rng(0)
    for f in sorted((hot_data / "val" / "blurred").glob("*.tif")):
        stack = tifffile.imread(f).astype(np.float32)
        stack[:, rng.integers(0, stack.shape[1], 40), rng.integers(0, stack.shape[2], 40)] += stack.max()
        tifffile.imwrite(f, stack)
    short = [args[0], str(ckpt), "--dataset_dir", str(hot_data), "--flips", "1", "--max_iter", "2", "--tv_weights", "0"]
    unrefined = {}
    for extra in (["--hot_pixel_threshold", "0"], ["--hot_pixel_threshold", "4"]):  # 0: no correction
        assert tune_refinement.main(short + extra) == 0
        tuned = json.loads((ckpt / "refinement.json").read_text())
        unrefined[tuned["hot_pixel_threshold"]] = tuned["val_psnr_unrefined"]
    assert unrefined[4.0] > unrefined[None] + 1.0, unrefined
    (ckpt / "model.json").write_text(json.dumps({**record, "preprocessing": {"hot_pixel_threshold": None}}))
    assert tune_refinement.main(short) == 0  # a model trained without the correction: none
    assert json.loads((ckpt / "refinement.json").read_text())["hot_pixel_threshold"] is None
