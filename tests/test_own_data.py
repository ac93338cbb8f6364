"""The own-data workflow: stacks checked, voxel size settled, split, and the one-command run."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import tifffile
import torch

from bundle.io import load_volume, save_volume
from bundle.ops import fft_convolve
from bundle.own_data import OwnStacks, check_stacks, nyquist_voxel_size, spot_fwhm
from bundle.physics.forward import add_noise
from bundle.physics.phantom import microtubule_phantom
from bundle.physics.psf import vectorial_psf

from conftest import run_bundle

OPTICS = {"na": 1.4, "n_immersion": 1.515, "wavelength": 0.52}
VOXEL = (0.1, 0.1, 0.1)


@pytest.fixture(scope="module")
def filaments():
    """Two blurred, noisy 24x64x64 filament stacks at 100 nm voxels (vectorial PSF of OPTICS)."""
    psf = torch.from_numpy(vectorial_psf((15, 21, 21), voxel_size=VOXEL, **OPTICS))
    stacks = []
    for seed in (0, 1):
        truth = microtubule_phantom((24, 64, 64), seed=seed)
        blurred = fft_convolve(torch.from_numpy(truth)[None, None], psf, pad_mode="reflect")[0, 0].numpy()
        stacks.append(add_noise(blurred, 20.0, seed=seed)[0].astype(np.float32))
    return stacks


def test_nyquist_voxel_size_matches_the_textbook_values():
    dz, dxy = nyquist_voxel_size(1.4, 1.515, 0.52)
    assert dxy == pytest.approx(0.52 / 5.6)
    assert dz == pytest.approx(0.52 / (2 * 1.515 * (1 - np.cos(np.arcsin(1.4 / 1.515)))))
    with pytest.raises(ValueError, match="na"):
        nyquist_voxel_size(1.6, 1.515, 0.52)


def test_spot_fwhm_measures_a_gaussian_spot_across_its_narrowest_direction():
    z, y, x = np.mgrid[:5, :41, :41].astype(np.float64)
    spot = np.exp(-((y - 20) ** 2 + (x - 20) ** 2) / (2 * 2.0**2)) * (z == 2)
    assert spot_fwhm(spot, radius=12)[0] == pytest.approx(2.3548 * 2.0, rel=0.03)
    line = np.exp(-((x - 20) ** 2) / (2 * 1.5**2)) * (z == 2) * (1 + 0.01 * np.sin(y))  # a filament along y
    assert spot_fwhm(line, radius=12)[0] == pytest.approx(2.3548 * 1.5, rel=0.05)


def test_checks_flag_under_sampling_small_stacks_and_optics_that_cannot_be(filaments):
    shapes = [s.shape for s in filaments]
    assert check_stacks(shapes, VOXEL, (16, 32, 32), **OPTICS, volumes=filaments) == []
    z_coarse = check_stacks(shapes, (0.5, 0.1, 0.1), (16, 32, 32), **OPTICS)
    assert len(z_coarse) == 1 and "z step 0.5 um under-samples" in z_coarse[0]
    assert any("laterally" in w for w in check_stacks(shapes, (0.1, 0.2, 0.2), (16, 32, 32), **OPTICS))
    small = check_stacks(shapes, VOXEL, (32, 64, 64), **OPTICS)
    assert any("smaller than the training crop" in w for w in small)
    assert any("training voxels" in w for w in small)
    # a voxel size three times too small: the PSF of the keys would be wider than the stacks' filaments
    wrong = check_stacks(shapes, (0.1, 0.033, 0.033), (16, 32, 32), **OPTICS, volumes=filaments)
    assert any("narrower than the PSF of the optics keys allows" in w for w in wrong)


def test_voxel_size_from_the_files_wins_over_the_configured_one(filaments, tmp_path, caplog):
    for i, s in enumerate(filaments):
        save_volume(tmp_path / "in" / f"s{i}.tif", s, voxel_size=VOXEL)
    with caplog.at_level(logging.WARNING, logger="bundle.own_data"):
        stacks = OwnStacks(tmp_path / "in", tmp_path / "work", voxel_size=(0.2, 0.1, 0.1), patch_size=(16, 32, 32), **OPTICS)
        assert stacks.voxel_size() == pytest.approx(list(VOXEL))
    assert "disagrees with the files' metadata" in caplog.text
    assert stacks.train_files() == [str(tmp_path / "in/s0.tif")] and stacks.held_out_files() == [str(tmp_path / "in/s1.tif")]
    record = json.loads((tmp_path / "work/own_data.json").read_text())
    assert record["voxel_size"] == pytest.approx(list(VOXEL)) and any("metadata" in w for w in record["warnings"])


def test_stacks_without_voxel_size_use_the_configured_one_or_stop(filaments, tmp_path):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in/a.tif", filaments[0])
    tifffile.imwrite(tmp_path / "in/b.tif", filaments[1])
    stacks = OwnStacks(tmp_path / "in", tmp_path / "w1", voxel_size=(0.12, 0.1, 0.1), patch_size=(16, 32, 32), **OPTICS)
    assert stacks.voxel_size() == pytest.approx([0.12, 0.1, 0.1])
    assert any("carry no voxel size" in w for w in stacks.warnings())
    with pytest.raises(ValueError, match="carry no voxel size; pass --voxel_size"):
        OwnStacks(tmp_path / "in", tmp_path / "w2", voxel_size=None).prepare()
    save_volume(tmp_path / "mixed/a.tif", filaments[0], voxel_size=VOXEL)
    save_volume(tmp_path / "mixed/b.tif", filaments[1], voxel_size=(0.2, 0.1, 0.1))
    with pytest.raises(ValueError, match="different voxel sizes"):
        OwnStacks(tmp_path / "mixed", tmp_path / "w3").prepare()
    with pytest.raises(ValueError, match="--blurred_dir"):
        OwnStacks(None, tmp_path / "w4")


def test_a_single_stack_is_split_into_training_and_held_out_parts(filaments, tmp_path):
    source = save_volume(tmp_path / "one.tif", filaments[0], voxel_size=VOXEL)
    before = source.read_bytes()
    stacks = OwnStacks(source, tmp_path / "work", held_out=0.25, patch_size=(16, 32, 32), **OPTICS)
    (train,), (held,) = stacks.train_files(), stacks.held_out_files()
    a, meta_a = load_volume(train)
    b, meta_b = load_volume(held)
    assert a.shape == (24, 48, 64) and b.shape == (24, 16, 64)  # along Y (Y >= X), a quarter held out
    np.testing.assert_array_equal(np.concatenate([a, b], axis=1), filaments[0])
    assert meta_a["voxel_size"] == pytest.approx(VOXEL) and meta_b["voxel_size"] == pytest.approx(VOXEL)
    assert source.read_bytes() == before


@pytest.mark.slow
def test_own_data_command_runs_on_a_folder_of_blurred_stacks_alone(tiny_dataset, tmp_path):
    """The one command of the user guide on blurred stacks only (the ground truth stays hidden)."""
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    for f in [*sorted((tiny_dataset / "train/blurred").glob("*.tif")), *sorted((tiny_dataset / "val/blurred").glob("*.tif"))]:
        shutil.copy(f, stacks / f"{f.parent.parent.name}_{f.name}")
    res = run_bundle(
        "training", "['configs/common.json','configs/train.json','configs/learned_psf.json','configs/quick.json','configs/own_data.json']",
        "--blurred_dir", str(stacks), "--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models"),
        "--voxel_size", "[0.2,0.1,0.1]", "--max_epochs", "2", "--epoch_length", "3", "--val_interval", "1",
        "--psf_kernel_size", "[15,15,15]", "--na", "1.4", "--n_immersion", "1.515", "--wavelength", "0.52",
        "--held_out_flips", "1",  # the report's deconvolution on one view (the views: tests/test_flips.py)
    )  # fmt: skip
    assert "disagrees with the files' metadata" in res.stdout + res.stderr  # the simulator writes 0.1 um voxels
    record = json.loads((tmp_path / "eval/own_data/own_data.json").read_text())
    assert len(record["train"]) == 2 and len(record["held_out"]) == 1
    history = json.loads((tmp_path / "eval/validation.json").read_text())
    assert len(history) == 2 and all(
        {"val_sharp_cycle", "val_noref", "val_input_noref", "val_consistency", "val_cycle", "val_psf_stability", "val_resolution_um"}
        <= set(e)
        for e in history
    )
    assert json.loads((tmp_path / "models/model.json").read_text())["metric"] == "val_sharp_cycle"
    assert all(math.isfinite(e["val_sharp_cycle"]) for e in history)
    held = record["held_out"][0]
    name = held.rsplit("/", 1)[-1].split(".")[0]
    out, meta = load_volume(tmp_path / f"eval/held_out/{name}_deconv.tif")
    src, src_meta = load_volume(held)
    assert out.shape == src.shape and meta["voxel_size"] == pytest.approx(src_meta["voxel_size"])
    assert (tmp_path / f"eval/held_out/{name}.png").stat().st_size > 1000
    report = (tmp_path / "eval/report.md").read_text()
    assert name in report and "val_sharp_cycle" in report and "Learned PSF" in report
    assert len(list((tmp_path / "eval/sharp_domain").glob("*.tif"))) == 2  # RL of the two training stacks


@pytest.mark.parametrize("extra", [[], ["configs/psf_vectorial.json"], ["configs/train_nonblind.json"]])
def test_own_data_config_gives_the_files_voxel_size_to_every_psf(extra, filaments, tmp_path):
    """--voxel_size disagrees with the files: the PSF layer (and a vectorial kernel) use the files'."""
    from monai.bundle import ConfigWorkflow

    from conftest import ROOT

    for i, s in enumerate(filaments):
        save_volume(tmp_path / "in" / f"s{i}.tif", s, voxel_size=(0.15, 0.1, 0.1))
    save_volume(tmp_path / "psf.tif", vectorial_psf((15, 15, 15), voxel_size=(0.15, 0.1, 0.1), **OPTICS), voxel_size=(0.15, 0.1, 0.1))
    files = ["configs/common.json", "configs/train.json", *extra, "configs/quick.json", "configs/own_data.json"]
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in files], logging_file=False, workflow_type="train", bundle_root=str(ROOT),
        blurred_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "models"),
        voxel_size=[0.3, 0.2, 0.2], psf_kernel_size=[15, 15, 15], psf_file=str(tmp_path / "psf.tif"), **OPTICS,
    )  # fmt: skip
    wf.initialize()
    blur = wf.parser.get_parsed_content("blur")
    assert tuple(blur.voxel_size) == pytest.approx((0.15, 0.1, 0.1))
    if extra == ["configs/psf_vectorial.json"]:
        assert tuple(blur.kernel_module.voxel_size) == pytest.approx((0.15, 0.1, 0.1))
    assert tuple(wf.parser.get_parsed_content("network_def").voxel_size) == pytest.approx((0.15, 0.1, 0.1))


def _real_widefield_stack(folder) -> tuple:
    """The 525 nm channel of ``toxo.dv``: a DeltaVision widefield stack (Olympus 100x/1.35 oil, IX70;
    Toxoplasma, 17 x 128 x 128, 0.3 x 0.133 x 0.133 um) shipped in the ``napari-dv`` wheel. Its header
    says softWoRx deconvolved it: out-of-focus haze remains, but it is not a raw stack."""
    import importlib.util
    import os

    import mrc

    spec = importlib.util.find_spec("napari_dv")  # located, not imported (its napari hooks are not needed)
    dv = mrc.DVFile(os.path.join(spec.submodule_search_locations[0], "_tests", "toxo.dv"))
    voxel = (float(dv.voxel_size.z), float(dv.voxel_size.y), float(dv.voxel_size.x))
    return save_volume(folder / "toxo_525.tif", np.asarray(dv.asarray())[0], voxel_size=voxel), voxel


@pytest.mark.slow
def test_own_data_command_runs_on_a_real_widefield_stack(tmp_path):
    """One real stack from a registry package: split into sub-volumes, voxel size from the file kept."""
    (tmp_path / "stack").mkdir()
    source, voxel = _real_widefield_stack(tmp_path / "stack")
    run_bundle(
        "training", "['configs/common.json','configs/train.json','configs/learned_psf.json','configs/psf_vectorial.json','configs/quick.json','configs/own_data.json']",
        "--blurred_dir", str(tmp_path / "stack"), "--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models"),
        "--max_epochs", "2", "--epoch_length", "3", "--val_interval", "1", "--patch_size", "[16,64,64]",
        "--psf_kernel_size", "[15,31,31]", "--na", "1.35", "--n_immersion", "1.515", "--wavelength", "0.525", "--held_out", "0.25",
        "--held_out_flips", "1",
    )  # fmt: skip
    record = json.loads((tmp_path / "eval/own_data/own_data.json").read_text())
    assert record["voxel_size"] == pytest.approx(list(voxel)) and voxel[0] == pytest.approx(0.3)
    held, _ = load_volume(record["held_out"][0])
    assert held.shape == (17, 32, 128)  # a quarter of Y held out
    out, meta = load_volume(tmp_path / "eval/held_out/toxo_525_deconv.tif")
    assert out.shape == held.shape and meta["voxel_size"] == pytest.approx(voxel)
    assert np.isfinite(out).all()
    whole, meta = load_volume(tmp_path / "eval/held_out/toxo_525_whole_deconv.tif")  # the split stack shown whole
    assert whole.shape == (17, 128, 128) and meta["voxel_size"] == pytest.approx(voxel)
    assert "toxo_525" in (tmp_path / "eval/report.md").read_text()


@pytest.mark.slow
def test_simulated_validation_at_the_users_optics_is_one_config_away(tiny_dataset, tmp_path):
    """own_data.json + val_simulated.json: pairs simulated at the optics keys, the model chosen on PSNR."""
    res = run_bundle(
        "training",
        "['configs/common.json','configs/train.json','configs/learned_psf.json','configs/quick.json','configs/own_data.json','configs/val_simulated.json']",
        "--blurred_dir", str(tiny_dataset / "train/blurred"), "--output_dir", str(tmp_path / "eval"),
        "--ckpt_dir", str(tmp_path / "models"), "--max_epochs", "2", "--epoch_length", "2", "--val_interval", "1",
        "--psf_kernel_size", "[15,15,15]", "--val_simulated_shape", "[16,64,64]", "--na", "1.3",
        "--n_immersion", "1.515", "--wavelength", "0.52",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "eval/val_simulated/dataset.json").read_text())
    assert manifest["parameters"]["na"] == 1.3 and manifest["parameters"]["psf_model"] == "vectorial"
    assert manifest["parameters"]["voxel_size"] == pytest.approx([0.1, 0.1, 0.1])  # the stacks' own
    history = json.loads((tmp_path / "eval/validation.json").read_text())
    assert all({"val_psnr", "val_input_psnr", "val_consistency"} <= set(e) for e in history), history[0].keys()
    assert json.loads((tmp_path / "models/model.json").read_text())["metric"] == "val_psnr"
    assert (tmp_path / "eval/report.md").is_file(), res.stdout[-2000:]


def test_held_out_report_flags_a_flat_output(filaments, tmp_path):
    """A model of record whose output has (almost) no contrast is named in the report's checks: here a
    generator with a zero last layer (every voxel at its dark floor); a contrasted model is not flagged."""
    from bundle.networks import DeblurUNet
    from bundle.own_data import HeldOutReport

    for i, s in enumerate(filaments[:2]):
        save_volume(tmp_path / "in" / f"s{i}.tif", s[:16, :64, :64], voxel_size=(0.2, 0.1, 0.1))
    stacks = OwnStacks(str(tmp_path / "in"), tmp_path / "own", patch_size=(16, 32, 32), spot_check=False)
    reports = {}
    for name, scale in (("flat", 0.0), ("contrasted", 1.0)):
        torch.manual_seed(0)
        net = DeblurUNet(features=(4, 8, 8, 4), depth=2)
        with torch.no_grad():
            net.unet.final_conv.weight.mul_(scale)
        (tmp_path / name).mkdir()
        torch.save(net.state_dict(), tmp_path / name / "model.pt")
        report = HeldOutReport(stacks, tmp_path / name, tmp_path / f"out_{name}", flips=1).run()
        reports[name] = report.read_text()
    assert "s1.tif: the output is nearly flat" in reports["flat"]
    assert "nearly flat" not in reports["contrasted"]


def test_held_out_report_views_are_checked(tmp_path):
    """The report's views (``held_out_flips``): 8 by default, as inference; a count inference does not know is refused."""
    from bundle.own_data import HeldOutReport

    with pytest.raises(ValueError, match=r"held_out_flips must be one of \(1, 2, 4, 8\)"):
        HeldOutReport(None, tmp_path, tmp_path, flips=3)
    assert HeldOutReport(None, tmp_path, tmp_path).flips == 8  # as inference
    assert HeldOutReport(None, tmp_path, tmp_path, flips="2").flips == 2  # the command line passes strings


def test_checks_name_stacks_with_hot_pixels_and_keep_them_out_of_the_spot_check(filaments):
    shapes = [s.shape for s in filaments]
    rng = np.random.default_rng(0)
    hot = [s.copy() for s in filaments]
    columns = hot[1].reshape(hot[1].shape[0], -1)  # a view: 1 % of the camera's pixels bright in every plane
    columns[:, rng.choice(columns.shape[1], 41, replace=False)] += float(hot[1].max()) * rng.uniform(0.3, 1.0, 41)
    warnings = check_stacks(shapes, VOXEL, (16, 32, 32), **OPTICS, volumes=hot)
    # one warning, naming the stack and the fix; measured on the raw stacks the one-pixel-wide lines would
    # also pass for spots sharper than the optics allow ("narrower than the PSF"): they are replaced first
    assert len(warnings) == 1 and f"in 1 of {len(hot)} stacks (stack 1: 41 (1.00%))" in warnings[0]
    assert "scripts/correct_hot_pixels.py" in warnings[0]
