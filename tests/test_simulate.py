import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bundle_cli import run_module

from bundle.io import load_volume
from bundle.simulate import SimulateDataset

from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]


def test_layout_manifest_and_files(tiny_dataset):
    d = tiny_dataset
    manifest = json.loads((d / "dataset.json").read_text())
    assert manifest["parameters"]["na"] == 1.4 and manifest["axes"] == "ZYX"
    assert abs(manifest["achieved_average_snr_db"] - 20.0) < 0.5
    for rel in ["train/sharp/sharp_000.tif", "train/blurred/blurred_001.tif", "val/blurred/val_000.tif",
                "val/ground_truth/val_000.tif", "test/blurred/test_000.tif", "test/ground_truth/test_000.tif"]:
        vol, meta = load_volume(d / rel)
        assert vol.shape == (32, 64, 64) and vol.dtype == np.float32
        assert meta["voxel_size"] == pytest.approx((0.1, 0.1, 0.1))
    psf, _ = load_volume(d / "psf.tif")
    assert psf.shape == (15, 15, 15) and psf.sum() == pytest.approx(1.0, abs=1e-4)
    # ground truth in [0, 1]; blurred is a blurred (lower-peak) version of *its* ground truth
    gt, _ = load_volume(d / "val/ground_truth/val_000.tif")
    bl, _ = load_volume(d / "val/blurred/val_000.tif")
    assert 0.0 <= gt.min() and gt.max() <= 1.0
    assert np.corrcoef(gt.ravel(), bl.ravel())[0, 1] > 0.3
    assert bl.max() < gt.max()


def test_domains_are_unpaired(tiny_dataset):
    sharp, _ = load_volume(tiny_dataset / "train/sharp/sharp_000.tif")
    blurred, _ = load_volume(tiny_dataset / "train/blurred/blurred_000.tif")
    assert abs(np.corrcoef(sharp.ravel(), blurred.ravel())[0, 1]) < 0.2


def test_rerun_keeps_same_dataset_and_refuses_other_parameters(tiny_dataset):
    before = (tiny_dataset / "psf.tif").stat().st_mtime_ns
    SimulateDataset(str(tiny_dataset), shape=(32, 64, 64), eval_shape=(32, 64, 64), n_train=2, n_val=1,
                    n_test=1, psf_shape=(15, 15, 15), seed=3, progress=False).run()
    assert (tiny_dataset / "psf.tif").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match=str(tiny_dataset)):
        SimulateDataset(str(tiny_dataset), shape=(32, 64, 64), seed=4, progress=False).run()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import bundle.simulate as sim

    calls = {"n": 0}
    real = sim.make_phantom

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "make_phantom", failing)
    with pytest.raises(KeyboardInterrupt):
        SimulateDataset(str(tmp_path / "data"), shape=(16, 32, 32), n_train=2, psf_shape=(7, 7, 7), progress=False).run()
    assert list(tmp_path.iterdir()) == []


def test_vesicle_domain_with_an_aberrated_vectorial_psf(tmp_path):
    pytest.importorskip("psfmodels")
    kw = dict(shape=(16, 48, 48), n_train=1, n_val=1, n_test=0, psf_shape=(15, 15, 15), seed=5, progress=False,
              phantom_model="vesicles", psf_model="vectorial", n_immersion=1.515, n_sample=1.33, psf_depth=2.0)
    manifest = SimulateDataset(str(tmp_path / "v"), **kw).run()
    assert manifest["parameters"]["phantom_model"] == "vesicles" and "vesicles" in manifest["description"]
    psf, _ = load_volume(tmp_path / "v/psf.tif")
    axial = psf[:, 7, 7]
    assert np.argmax(axial) == 7 and np.abs(axial - axial[::-1]).max() > 0.1 * axial.max()  # aberrated
    with pytest.raises(ValueError, match="phantom_model"):
        SimulateDataset(str(tmp_path / "w"), phantom_model="beads")
    with pytest.raises(ValueError, match="psf_depth"):
        SimulateDataset(str(tmp_path / "w"), psf_model="born_wolf", psf_depth=2.0)


def test_a_dataset_made_before_the_new_parameters_is_kept(tmp_path):
    kw = dict(shape=(16, 32, 32), n_train=1, n_val=0, n_test=0, psf_shape=(7, 7, 7), seed=2, progress=False)
    SimulateDataset(str(tmp_path / "a"), **kw).run()
    manifest = json.loads((tmp_path / "a/dataset.json").read_text())
    for key in ("phantom_model", "n_sample", "psf_depth"):
        del manifest["parameters"][key]
    (tmp_path / "a/dataset.json").write_text(json.dumps(manifest))
    before = (tmp_path / "a/psf.tif").stat().st_mtime_ns
    SimulateDataset(str(tmp_path / "a"), **kw).run()
    assert (tmp_path / "a/psf.tif").stat().st_mtime_ns == before


def test_same_seed_same_data(tmp_path):
    kw = dict(shape=(16, 32, 32), n_train=1, n_val=0, n_test=0, psf_shape=(7, 7, 7), seed=11, progress=False)
    SimulateDataset(str(tmp_path / "a"), **kw).run()
    SimulateDataset(str(tmp_path / "b"), **kw).run()
    a = tifffile.imread(tmp_path / "a/train/blurred/blurred_000.tif")
    b = tifffile.imread(tmp_path / "b/train/blurred/blurred_000.tif")
    np.testing.assert_array_equal(a, b)


def test_bundle_command_line(tmp_path):
    """`python -m monai.bundle run simulate --config_file configs/simulate.json` with overrides."""
    out = tmp_path / "cli"
    args = ["run", "simulate", "--config_file", "configs/simulate.json",
            "--dataset_dir", str(out), "--shape", "[16,32,32]", "--eval_shape", "[16,32,32]", "--n_train", "1",
            "--n_val", "1", "--n_test", "0", "--psf_shape", "[9,9,9]", "--psf_model", "vectorial"]  # fmt: skip
    res = run_module("monai.bundle", args, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["parameters"]["psf_model"] == "vectorial"
    assert (out / "val/ground_truth/val_000.tif").is_file()
