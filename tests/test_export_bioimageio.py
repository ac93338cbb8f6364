"""BioImage Model Zoo export (scripts/export_bioimageio.py): the package passes bioimageio.core's own
test (both weight formats, every input size it tries; on a small generator, as the test runs the network
a dozen times), a failed test writes nothing, and the trained quick model's package gives what the
bundle's inference gives on the same input."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from export_bioimageio import export_bioimageio, scale_range_clip  # noqa: E402

from bundle.inference import deconvolve, load_network  # noqa: E402
from bundle.networks import DeblurUNet  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small generator with random (but non-trivial) weights in a checkpoint folder, with a PSF."""
    from bundle.io import save_volume
    from bundle.physics.psf import born_wolf_psf

    torch.manual_seed(0)
    net = DeblurUNet(features=(4, 8, 8, 4), depth=2, norm="batch", last_bias=0.0, voxel_size=(0.2, 0.1, 0.1))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("models")
    torch.save(net.state_dict(), folder / "model.pt")
    save_volume(folder / "blur.tif", born_wolf_psf((9, 9, 9)), voxel_size=(0.2, 0.1, 0.1))
    return folder


@pytest.mark.slow
def test_package_of_the_trained_model_matches_the_bundle(quick_model, tmp_path):
    """The quick model (trained once per session through the command line) with its PSF. bioimageio.core's
    test of a package is ``test_package_passes_bioimageio_core_test`` below."""
    model_dir = Path(quick_model["ckpt_dir"])
    out = export_bioimageio(model_dir, tmp_path / "pkg.zip", percentiles=(0.1, 99.9), check=False)
    assert out == tmp_path / "pkg.zip" and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pkg.zip"]  # no partial file left behind
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        with z.open("test_input.npy") as f:
            raw = np.load(f)
        with z.open("test_output.npy") as f:
            expected = np.load(f)
    assert {"weights.pt", "weights.torchscript.pt", "README.md", "cover.png", "blur.tif", "environment.yaml"} <= names
    assert rdf["format_version"].startswith("0.5") and set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}
    readme = zipfile.ZipFile(out).read("README.md").decode()
    assert "## Validation" in readme
    assert "`hot_pixel_threshold` 4);" in readme  # the quick model trained with the default correction
    axes = rdf["inputs"][0]["axes"]
    assert [a.get("id", a["type"]) for a in axes] == ["batch", "channel", "z", "y", "x"]
    net = load_network(model_dir / "model.pt")
    assert axes[2]["size"]["step"] == net.divisor and axes[2]["scale"] == pytest.approx(net.trained_voxel_size[0])
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"] if p["id"] != "ensure_dtype"] == ["scale_range", "clip"]
    halo = rdf["outputs"][0]["axes"][2]["halo"]
    assert halo >= net.receptive_radius  # what a consumer's tiles must discard
    # the same stack through the bundle's own inference (float32, [0, 1] output): the package's model
    # mirror-pads by the tiling halo as the bundle does, so the two agree on every voxel
    ours = deconvolve(raw[0, 0], model_dir, axes="ZYX", normalize=(0.1, 99.9), output_range="normalized",
                      precision="float32", progress=False, flips=1)  # the package runs G once: one view
    np.testing.assert_allclose(ours, expected[0, 0], rtol=0, atol=1e-4)
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["pad"] == net.tiling_halo
    assert float(expected.std()) > 1e-3  # not a constant output


def test_package_passes_bioimageio_core_test(tiny_model, tmp_path):
    """``check=True`` runs ``bioimageio.core.test_model`` (test tensors, then batch 1 and 2 at three input
    sizes, for each weight format) and raises if it does not pass: returning is passing."""
    out = export_bioimageio(tiny_model, tmp_path / "pkg.zip", check=True)
    assert [p.name for p in tmp_path.iterdir()] == ["pkg.zip"]
    with zipfile.ZipFile(out) as z:
        assert set(yaml.safe_load(z.read("rdf.yaml"))["weights"]) == {"pytorch_state_dict", "torchscript"}


def test_a_failed_bioimageio_test_writes_nothing(tiny_model, tmp_path, monkeypatch):
    """The summary's failed entries make the error; the partial package is removed."""
    import types

    import bioimageio.core

    failed = types.SimpleNamespace(name="reproduce test outputs", status="failed",
                                   errors=[types.SimpleNamespace(msg="outputs differ")])
    passed = types.SimpleNamespace(name="has a name", status="passed", errors=[])
    monkeypatch.setattr(bioimageio.core, "test_model",
                        lambda source: types.SimpleNamespace(status="failed", details=[passed, failed]))
    with pytest.raises(RuntimeError, match=r"pkg.zip: the package failed bioimageio.core's test: "
                                           r"reproduce test outputs: \['outputs differ'\]$"):
        export_bioimageio(tiny_model, tmp_path / "out" / "pkg.zip", check=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_preprocessing_is_the_bundles_normalisation():
    from bundle.inference.transforms import NormalizePercentilesd

    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 50.0, size=(8, 16, 16)).astype(np.float32)
    ours = NormalizePercentilesd("image", (0.1, 99.9))({"image": torch.from_numpy(volume)[None]})["image"][0]
    np.testing.assert_allclose(scale_range_clip(volume, (0.1, 99.9)), np.asarray(ours), rtol=0, atol=1e-5)


def test_bad_test_input_writes_nothing(tiny_model, tmp_path):
    from bundle.io import save_volume

    small = tmp_path / "small.tif"
    save_volume(small, np.random.default_rng(0).random((8, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="smaller than the test size"):
        export_bioimageio(tiny_model, tmp_path / "out" / "pkg.zip", test_input=str(small), check=False)
    assert not (tmp_path / "out" / "pkg.zip").exists()


def test_an_rl_guided_model_is_refused_with_the_reason(tmp_path):
    """The non-blind default runs Richardson–Lucy inside the network, which TorchScript cannot compile."""
    from bundle.networks import RLGuidedUNet
    from bundle.physics.psf import born_wolf_psf

    net = RLGuidedUNet(psf=born_wolf_psf((9, 9, 9)), rl_iterations=3, features=(4, 8, 8, 4), depth=2, norm="batch")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=f"{tmp_path}: an RL-guided generator"):
        export_bioimageio(tmp_path, tmp_path / "out" / "pkg.zip", check=False)
    assert not (tmp_path / "out" / "pkg.zip").exists()
