from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigWorkflow

from bundle.io import load_volume, save_volume
from bundle.metrics import affine_fit, psnr
from bundle.ops import fft_convolve
from bundle.physics.forward import add_noise
from bundle.physics.phantom import vesicle_phantom
from bundle.physics.psf import vectorial_psf
from bundle.sharp_domain import ClassicalSharpDomain, SimulatedSharpDomain

from conftest import ROOT

OPTICS = {"na": 1.3, "n_immersion": 1.515, "wavelength": 0.52}
VOXEL = (0.15, 0.1, 0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A blurred, noisy 16x40x40 stack made with the optics the component is given, and its truth."""
    folder = tmp_path_factory.mktemp("own_stacks")
    truth = vesicle_phantom((16, 40, 40), n_vesicles=2, n_puncta=10, seed=3)
    psf = vectorial_psf((11, 15, 15), voxel_size=VOXEL, **OPTICS)
    blurred = fft_convolve(torch.from_numpy(truth)[None, None], torch.from_numpy(psf), pad_mode="reflect")[0, 0].numpy()
    noisy, _ = add_noise(blurred, 25.0, seed=0)
    save_volume(folder / "cell_01.tif", (noisy * 1000 + 100).astype(np.float32), voxel_size=VOXEL)
    return folder, truth, float(((noisy - blurred) * 1000).var())


def _score(volume: np.ndarray, truth: np.ndarray) -> float:
    t = torch.from_numpy(truth).double()
    return float(psnr(affine_fit(torch.from_numpy(volume).double()[None], t[None])[0].float(), t.float()))


def test_deconvolves_stops_on_the_noise_level_and_caches(stack, tmp_path):
    folder, truth, noise_variance = stack
    domain = ClassicalSharpDomain(folder, str(tmp_path / "cache"), psf_shape=(11, 15, 15), max_iter=150, progress=False, **OPTICS)
    (path,) = domain.files()
    record = json.loads((tmp_path / "cache" / (path.split("/")[-1][:-4] + ".json")).read_text())
    assert record["stopped_by"] in ("discrepancy", "stalled") and 5 <= record["iterations"] < 150, record
    assert 0.7 < record["noise_variance"] / noise_variance < 1.3  # the stack's own noise, estimated
    assert 0.6 < record["misfit"] / noise_variance < 1.3  # stopped at the noise level, not fitting the noise
    sharp, meta = load_volume(path)
    assert meta["voxel_size"] == pytest.approx(VOXEL)  # read from the file, carried through
    blurred, _ = load_volume(folder / "cell_01.tif")
    assert _score(sharp, truth) > _score(blurred, truth) + 1.0
    # unchanged source and settings: the cached volume is reused, not recomputed
    mtime = (tmp_path / "cache").joinpath(path.split("/")[-1]).stat().st_mtime_ns
    assert domain.files() == [path]
    assert (tmp_path / "cache").joinpath(path.split("/")[-1]).stat().st_mtime_ns == mtime
    # other settings: recomputed
    other = ClassicalSharpDomain(folder, str(tmp_path / "cache"), psf_shape=(11, 15, 15), max_iter=3, min_iter=3, progress=False, **OPTICS)
    other.files()
    assert json.loads((tmp_path / "cache" / (path.split("/")[-1][:-4] + ".json")).read_text())["iterations"] == 3


def test_hot_pixels_are_replaced_before_richardson_lucy(stack, tmp_path):
    """RL sharpens a hot pixel into a bright line along Z; with ``hot_pixel_threshold`` the stack is
    corrected first, and the setting is part of the cache stamp."""
    folder, _, _ = stack
    clean, _ = load_volume(folder / "cell_01.tif")
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(2, 38, 12), rng.integers(2, 38, 12)
    hot = clean.copy()
    hot[:, ys, xs] += 0.5 * clean.max()
    save_volume(tmp_path / "hot.tif", hot, voxel_size=VOXEL)
    options = {"psf_shape": (11, 15, 15), "max_iter": 20, "progress": False, **OPTICS}
    (raw,) = ClassicalSharpDomain(str(tmp_path / "hot.tif"), str(tmp_path / "cache"), **options).files()
    streaks = load_volume(raw)[0][:, ys, xs].mean()
    (fixed,) = ClassicalSharpDomain(str(tmp_path / "hot.tif"), str(tmp_path / "cache"), hot_pixel_threshold=4.0, **options).files()
    assert fixed == raw  # same cache file, recomputed: the threshold is in the stamp
    record = json.loads(Path(fixed[:-4] + ".json").read_text())
    assert record["stamp"]["hot_pixel_threshold"] == 4.0
    assert load_volume(fixed)[0][:, ys, xs].mean() < 0.3 * streaks


def test_simulated_domain_matches_the_stacks_with_their_hot_pixels_replaced(stack, tmp_path):
    """Hot pixels left in count as crowded, bright structure; with ``hot_pixel_threshold`` the density is
    matched to the corrected stacks, as to the stacks without them, and the setting is in the record."""
    folder, _, _ = stack
    clean, _ = load_volume(folder / "cell_01.tif")
    rng = np.random.default_rng(1)
    hot = clean.copy()
    hot[:, rng.integers(0, 40, 16), rng.integers(0, 40, 16)] += rng.uniform(0.3, 1.0, 16) * clean.max()
    save_volume(tmp_path / "hot" / "cell_01.tif", hot, voxel_size=VOXEL)
    save_volume(tmp_path / "clean" / "cell_01.tif", clean, voxel_size=VOXEL)
    targets = {}
    for name, source, threshold in (("clean", tmp_path / "clean", None), ("hot", tmp_path / "hot", None), ("fixed", tmp_path / "hot", 4.0)):
        domain = SimulatedSharpDomain(str(tmp_path / f"{name}_cache"), "vesicles", n_volumes=1, shape=(16, 40, 40), voxel_size=VOXEL,
                                      match_blurred=str(source), psf_shape=(11, 15, 15), hot_pixel_threshold=threshold, **OPTICS)  # fmt: skip
        domain.files()
        record = json.loads((tmp_path / f"{name}_cache" / "sharp_sim.json").read_text())["density_match"]
        assert record["sources"]["hot_pixel_threshold"] == threshold
        targets[name] = (record["target"], record["brightness"]["target"])
    assert targets["fixed"] == pytest.approx(targets["clean"], rel=0.02)
    assert targets["hot"] != pytest.approx(targets["clean"], rel=0.05), targets


def test_bad_stacks_are_named(tmp_path):
    bad = np.ones((8, 16, 16), np.float32)
    bad[2, 3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    with pytest.raises(ValueError, match="nan.tif: volume contains 1 NaN"):
        ClassicalSharpDomain(str(tmp_path / "nan.tif"), str(tmp_path / "c"), psf_shape=(5, 5, 5), progress=False).files()
    tifffile.imwrite(tmp_path / "flat.tif", np.ones((8, 16, 16), np.float32))
    with pytest.raises(ValueError, match="flat.tif: volume is constant"):
        ClassicalSharpDomain(str(tmp_path / "flat.tif"), str(tmp_path / "c"), psf_shape=(5, 5, 5), progress=False).files()
    with pytest.raises(FileNotFoundError, match="missing"):
        ClassicalSharpDomain(str(tmp_path / "missing"), str(tmp_path / "c"), progress=False).files()
    with pytest.raises(ValueError, match="min_iter"):
        ClassicalSharpDomain(str(tmp_path), str(tmp_path / "c"), min_iter=5, max_iter=2)


def test_the_config_trains_against_the_deconvolved_stacks(tiny_dataset, tmp_path):
    files = ["configs/common.json", "configs/train.json", "configs/sharp_from_rl.json"]
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in files], logging_file=False, workflow_type="train", bundle_root=str(ROOT),
        dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "models"),
        psf_kernel_size=[9, 9, 9], **{"sharp_domain#max_iter": 5},
    )  # fmt: skip
    wf.initialize()
    dataset = wf.parser.get_parsed_content("train#dataset")
    made = sorted((tmp_path / "eval/sharp_domain").glob("*.tif"))
    blurred = sorted((tiny_dataset / "train/blurred").glob("*.tif"))
    assert len(made) == len(blurred) > 0
    item = dataset[0]
    margin = wf.parser.get_parsed_content("sharp_margin")  # the sharp crops are that much larger per side
    assert set(item) >= {"sharp", "blurred"}
    assert list(item["sharp"].shape[1:]) == [n + 2 * m for n, m in zip(item["blurred"].shape[1:], margin)]


@pytest.mark.parametrize("model", ["microtubules", "vesicles"])
def test_simulated_domain_keeps_physical_sizes_and_caches(model, tmp_path):
    fine = SimulatedSharpDomain(str(tmp_path / "fine"), model, n_volumes=2, shape=(16, 32, 32), voxel_size=(0.1, 0.1, 0.1))
    coarse = SimulatedSharpDomain(str(tmp_path / "coarse"), model, n_volumes=2, shape=(8, 32, 32), voxel_size=(0.2, 0.1, 0.1))
    a, b = fine.phantom_arguments(), coarse.phantom_arguments()
    if model == "microtubules":  # 0.1 µm radius: 1 voxel at 0.1 µm, half a voxel along a 0.2 µm z step
        assert a["radius"] == pytest.approx((1.0, 1.0, 1.0)) and b["radius"] == pytest.approx((0.5, 1.0, 1.0))
        assert a["n_filaments"] == b["n_filaments"]  # the same physical volume
    else:
        assert a["radius_range"] == pytest.approx((3.0, 9.0)) and b["z_scale"] == pytest.approx(2.0) and a["z_scale"] == 1.0
    paths = coarse.files()
    assert len(paths) == 2
    volume, meta = load_volume(paths[0])
    assert volume.shape == (8, 32, 32) and meta["voxel_size"] == pytest.approx((0.2, 0.1, 0.1))
    assert 0 < volume.max() <= 1 and (volume > 0.25).mean() > 0
    mtime = Path(paths[0]).stat().st_mtime_ns
    assert coarse.files() == paths and Path(paths[0]).stat().st_mtime_ns == mtime  # cached
    with pytest.raises(ValueError, match="unknown phantom_model"):
        SimulatedSharpDomain(str(tmp_path), "beads")


def test_the_simulated_config_builds_the_training_dataset(tiny_dataset, tmp_path):
    files = ["configs/common.json", "configs/train.json", "configs/sharp_simulated.json"]
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in files], logging_file=False, workflow_type="train", bundle_root=str(ROOT),
        dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "models"),
        psf_kernel_size=[9, 9, 9], **{"sharp_domain#n_volumes": 2, "sharp_domain#shape": [16, 48, 48]},
    )  # fmt: skip
    wf.initialize()
    item = wf.parser.get_parsed_content("train#dataset")[0]
    assert len(list((tmp_path / "eval/sharp_domain").glob("sharp_sim_*.tif"))) == 2
    margin = wf.parser.get_parsed_content("sharp_margin")
    assert list(item["sharp"].shape[1:]) == [n + 2 * m for n, m in zip(item["blurred"].shape[1:], margin)]
    record = json.loads((tmp_path / "eval/sharp_domain/sharp_sim.json").read_text())
    assert record["density_match"]["sources"]["match_blurred"] == str(tiny_dataset / "train" / "blurred")
    assert record["density_match"]["multiplier"] > 0  # matched to the training's blurred stacks
    assert record["density_match"]["sources"]["hot_pixel_threshold"] == 4.0  # the key's default reaches it
