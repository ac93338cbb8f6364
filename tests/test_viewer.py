"""The napari plugin, driven in a real viewer (napari's ``make_napari_viewer``; Qt on Xvfb via pytest-xvfb)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bundle.inference import deconvolve
from bundle.io import load_volume, save_volume
from bundle.networks import DeblurUNet
from bundle.viewer.reader import napari_get_reader, read_stacks
from bundle.viewer.sample import simulated_stack
from bundle.viewer.widgets import DeconvolveWidget, PSFWidget, TrainWidget

from conftest import ROOT

TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    net = DeblurUNet(features=(4, 4, 8, 8, 16, 4)).eval()
    path = tmp_path_factory.mktemp("viewer_model") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sample():
    return simulated_stack(shape=(16, 64, 64), voxel_size=(0.2, 0.1, 0.1), seed=3)


def _notifications():
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def test_manifest_is_valid_and_names_every_contribution():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "bundle" / "viewer" / "napari.yaml")
    manifest.validate_imports()  # every python_name resolves
    assert {w.display_name for w in manifest.contributions.widgets} == {"Deconvolve", "PSF", "Train"}
    assert manifest.contributions.readers and manifest.contributions.sample_data
    from importlib.metadata import entry_points

    assert any(e.value == "bundle.viewer:napari.yaml" for e in entry_points(group="napari.manifest"))


def test_reader_gives_the_voxel_size_as_scale(tmp_path):
    vol = np.random.default_rng(0).random((6, 20, 24)).astype(np.float32)
    for name in ("stack.tif", "stack.nii.gz", "stack.nrrd"):
        save_volume(tmp_path / name, vol, voxel_size=(0.3, 0.1, 0.12))
        reader = napari_get_reader(str(tmp_path / name))
        assert reader is read_stacks, name
        [(data, meta, kind)] = reader(str(tmp_path / name))
        assert kind == "image" and data.shape == (6, 20, 24) and meta["name"] == "stack"
        np.testing.assert_allclose(meta["scale"], (0.3, 0.1, 0.12), rtol=1e-5)
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None  # folders: another reader


def test_sample_data_and_reader_in_the_viewer(make_napari_viewer, sample, tmp_path):
    viewer = make_napari_viewer()
    for data, meta, kind in sample:
        getattr(viewer, f"add_{kind}")(data, **meta)
    assert [layer.name for layer in viewer.layers] == ["simulated widefield", "ground truth", "PSF (Born & Wolf)"]
    assert tuple(viewer.layers["simulated widefield"].scale) == (0.2, 0.1, 0.1)
    blurred, truth = sample[0][0], sample[1][0]
    assert blurred.shape == truth.shape == (16, 64, 64) and float(np.corrcoef(blurred.ravel(), truth.ravel())[0, 1]) > 0.2
    save_volume(tmp_path / "opened.tif", blurred, voxel_size=(0.25, 0.08, 0.08))
    [layer] = viewer.open(str(tmp_path / "opened.tif"), plugin="cyclegan-blur-kernel-deconv")
    assert tuple(layer.scale) == pytest.approx((0.25, 0.08, 0.08))


def test_deconvolve_widget_matches_the_python_api(make_napari_viewer, qtbot, sample, small_model):
    viewer = make_napari_viewer()
    data, meta, _ = sample[0]
    layer = viewer.add_image(data, **meta, translate=(1.0, 2.0, 3.0))
    widget = DeconvolveWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Deconvolve")
    widget.set_model(small_model)
    widget.image.value = layer
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert widget.result is not None, widget.last_message
    result = viewer.layers[f"{layer.name} deconvolved"]
    assert result.data.shape == data.shape
    assert tuple(result.scale) == tuple(layer.scale) and tuple(result.translate) == (1.0, 2.0, 3.0)
    expected = deconvolve(data, small_model, axes="ZYX", progress=False)
    np.testing.assert_allclose(result.data, expected, rtol=1e-5, atol=1e-6)
    assert widget.progress.value == widget.progress.max > 0  # every window reported
    lo, hi = result.contrast_limits
    assert lo < hi


def test_deconvolve_widget_refines_as_the_model_folder_says(make_napari_viewer, qtbot, sample, small_model, tmp_path):
    """A model folder with ``refinement.json`` and ``blur.tif``: "tuned" gives what ``deconvolve`` gives with
    that refinement and says so; "off" gives G alone."""
    import shutil

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(small_model, folder / "model.pt")
    psf = np.einsum("i,j,k->ijk", *[np.array(v, np.float32) for v in ([1, 2, 1], [1, 2, 3, 2, 1], [1, 2, 3, 2, 1])])
    psf /= psf.sum()
    save_volume(folder / "blur.tif", psf)
    (folder / "refinement.json").write_text('{"iterations": 3, "blend": 0.5}')
    viewer = make_napari_viewer()
    data, meta, _ = sample[0]
    layer = viewer.add_image(data, **meta)
    widget = DeconvolveWidget(viewer)
    widget.set_model(folder / "model.pt")
    widget.image.value = layer
    results = {}
    for choice in ("tuned", "off"):
        widget.refinement.value = choice
        widget.start()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
        assert widget.result is not None, widget.last_message
        results[choice] = np.asarray(widget.result.data)
        assert ("refined by 3 Richardson-Lucy iterations (blend 0.5" in widget.status.value) == (choice == "tuned")
    np.testing.assert_allclose(results["tuned"], deconvolve(data, folder, progress=False), rtol=1e-5, atol=1e-5)
    # the tuned blend is applied: refined alone (blend 1) is another result, and the blend lies halfway
    refined_only = deconvolve(data, folder, progress=False, refine_blend=1.0)
    np.testing.assert_allclose(results["tuned"], 0.5 * refined_only + 0.5 * results["off"], rtol=1e-4, atol=1e-4)
    assert np.abs(refined_only - results["tuned"]).max() > 1e-3 * np.ptp(results["off"])
    np.testing.assert_allclose(results["off"], deconvolve(data, small_model, progress=False), rtol=1e-5, atol=1e-5)
    assert np.abs(results["tuned"] - results["off"]).max() > 1e-3 * np.ptp(results["off"])
    assert widget.views.value == 8  # inference's default: eight XY views averaged
    widget.views.value = 1
    widget.refinement.value = "off"
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    one_view = np.asarray(widget.result.data)
    np.testing.assert_allclose(one_view, deconvolve(data, small_model, progress=False, flips=1), rtol=1e-5, atol=1e-5)
    assert np.abs(one_view - results["off"]).max() > 1e-4 * np.ptp(results["off"])
    (folder / "refinement.json").write_text('{"iterations": "many"}')
    widget.refinement.value = "tuned"
    widget.start()
    assert widget.worker is None and "refinement.json" in widget.last_message


def test_cancel_after_the_first_window_stops_the_run(make_napari_viewer, qtbot, sample, small_model):
    viewer = make_napari_viewer()
    data = np.tile(sample[0][0], (2, 2, 2))  # 32 x 128 x 128: several windows
    layer = viewer.add_image(data, name="big")
    widget = DeconvolveWidget(viewer)
    widget.set_model(small_model)
    widget.image.value = layer
    widget.max_pass_voxels.value = 1 << 17  # small windows, one per pass

    seen = []
    original = widget._set_progress

    def first_window_then_cancel(done, total, text=""):
        seen.append(done)
        widget.cancel()
        original(done, total, text)

    widget._set_progress = first_window_then_cancel
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert widget.result is None and len(viewer.layers) == 1  # no result layer
    assert seen == [1], seen  # the next window's callback stopped the run
    assert "cancelled" in widget.last_message


def test_a_2d_layer_gives_the_cli_message_and_no_layer(make_napari_viewer, small_model):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(0).random((32, 32)).astype(np.float32), name="flat")
    widget = DeconvolveWidget(viewer)
    widget.set_model(small_model)
    widget.image.value = layer
    widget.start()
    assert widget.worker is None and len(viewer.layers) == 1
    assert widget.last_message == "layer 'flat': is 2D (shape (32, 32)); a 3D stack (Z, Y, X) is needed"
    assert widget.last_message in _notifications()
    stack = viewer.add_image(np.random.default_rng(0).random((8, 32, 32)).astype(np.float32), name="stack")
    no_model = DeconvolveWidget(viewer)
    no_model.image.value = stack
    no_model.start()
    assert no_model.worker is None and "model not found" in no_model.last_message and len(viewer.layers) == 2


def test_psf_widget_shows_the_model_psf_and_makes_a_theoretical_one(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    folder = tmp_path / "models"
    folder.mkdir()
    from bundle.physics.psf import born_wolf_psf

    psf = born_wolf_psf((15, 15, 15), na=1.2, voxel_size=(0.2, 0.1, 0.1))
    save_volume(folder / "blur.tif", psf, voxel_size=(0.2, 0.1, 0.1))
    (folder / "blur.json").write_text(json.dumps({"parameterization": "parametric", "physical_parameters": {"na": 1.2, "gain": 3.0}}))
    widget = PSFWidget(viewer)
    widget.models_folder.value = folder
    widget.show_model_psf()
    layer = viewer.layers["PSF (model)"]
    assert tuple(layer.scale) == pytest.approx((0.2, 0.1, 0.1))
    assert "learned PSF: na 1.2" in widget.info.value and "gain" not in widget.info.value
    assert "FWHM (µm): z" in widget.info.value
    assert len(widget._canvas.figure.axes) == 3  # XY, XZ, YZ

    widget.kind.value = "Born & Wolf"
    widget.size.value = 15
    widget.make_psf()
    made = viewer.layers["PSF (Born & Wolf)"]
    assert made.data.shape == (15, 15, 15) and made.data.sum() == pytest.approx(1.0, abs=1e-4)
    widget.save_path.value = tmp_path / "theoretical.tif"
    widget.save_psf()
    saved, meta = load_volume(tmp_path / "theoretical.tif")
    np.testing.assert_allclose(saved, made.data, rtol=1e-6)
    assert meta["voxel_size"] == pytest.approx((0.1, 0.1, 0.1))
    widget.models_folder.value = tmp_path / "empty"
    widget.show_model_psf()
    assert "no blur.tif" in widget.last_message

    # an oil objective in water, 2 µm deep: the index-mismatch aberration, from either vectorial model
    from bundle.physics.psf import psf_correlation, vectorial_psf

    widget.na.value, widget.n_immersion.value, widget.voxel_z.value = 1.4, 1.515, 0.1
    widget.n_sample.value, widget.depth.value, widget.size.value = 1.33, 2.0, 21
    widget.kind.value = "vectorial pupil"
    widget.make_psf()
    pupil = viewer.layers["PSF (vectorial pupil)"].data
    truth = vectorial_psf((21,) * 3, na=1.4, n_immersion=1.515, wavelength=0.52, voxel_size=(0.1,) * 3, n_sample=1.33, depth=2.0)
    assert psf_correlation(pupil, truth) > 0.995 and "2.0 µm deep" in widget.info.value
    widget.kind.value = "vectorial (psfmodels)"
    widget.make_psf()
    np.testing.assert_allclose(viewer.layers["PSF (vectorial (psfmodels))"].data, truth, rtol=1e-5, atol=1e-8)
    widget.n_sample.value = 0.0
    widget.make_psf()
    assert "needs the sample index" in widget.last_message


TINY = {
    "batch_size": 1, "patch_size": [32, 32, 32], "generator_features": [4, 8, 16, 4], "discriminator_channels": 4,
    "discriminator_layers": 2, "discriminator_scales": 1, "psf_kernel_size": [15, 15, 15], "num_workers": 0,
}  # fmt: skip


@pytest.mark.slow
def test_train_widget_trains_and_hands_its_model_to_deconvolve(make_napari_viewer, qtbot, tiny_dataset, tmp_path):
    viewer = make_napari_viewer()
    deconvolve_widget = DeconvolveWidget(viewer)
    widget = TrainWidget(viewer)
    widget.blurred_dir.value = tiny_dataset / "train" / "blurred"
    widget.sharp_dir.value = tiny_dataset / "train" / "sharp"
    widget.output_dir.value = tmp_path
    widget.iterations.value = 3
    widget.overrides = dict(TINY)
    files, overrides, total = widget.workflow_arguments()
    assert total == 3 and overrides["max_epochs"] * overrides["epoch_length"] == 3
    assert [f.rsplit("/", 1)[-1] for f in files] == ["common.json", "train.json", "quick.json"]
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert widget.model_path == tmp_path / "models" / "model.pt" and widget.model_path.is_file(), widget.last_message
    assert widget.progress.value == widget.progress.max == 3
    assert deconvolve_widget.model.value == widget.model_path  # handed over
    widget.mode.value = "non-blind"
    widget.start()
    assert widget.worker is None and "PSF file" in widget.last_message


def test_napari_finds_the_widgets_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for name, cls in (("Deconvolve", DeconvolveWidget), ("PSF", PSFWidget), ("Train", TrainWidget)):
        dock, widget = viewer.window.add_plugin_dock_widget("cyclegan-blur-kernel-deconv", name)
        assert isinstance(widget, cls), (name, type(widget))


def test_a_4d_layer_is_deconvolved_at_the_chosen_channel(make_napari_viewer):
    viewer = make_napari_viewer()
    data = np.random.default_rng(1).random((3, 8, 32, 32)).astype(np.float32)
    layer = viewer.add_image(data, name="channels")
    widget = DeconvolveWidget(viewer)
    widget.channel.value = 2
    np.testing.assert_array_equal(widget.volume_of(layer), data[2])
    widget.channel.value = 5
    with pytest.raises(ValueError, match="channel=5 requested but it has 3"):
        widget.volume_of(layer)


def test_deconvolve_widget_corrects_hot_pixels_as_the_model_was_trained(make_napari_viewer, qtbot, sample, small_model, tmp_path):
    """A model folder whose ``model.json`` records ``hot_pixel_threshold``: the widget gives what ``deconvolve``
    gives ("auto": the stack corrected first) and says so."""
    import json
    import shutil

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(small_model, folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({"score": 30.0, "preprocessing": {"hot_pixel_threshold": 4.0}}))
    data, meta, _ = sample[0]
    data = np.array(data, dtype=np.float32)
    rng = np.random.default_rng(0)
    data[:, rng.integers(0, data.shape[1], 30), rng.integers(0, data.shape[2], 30)] += float(data.max())  # hot pixels
    viewer = make_napari_viewer()
    widget = DeconvolveWidget(viewer)
    widget.set_model(folder / "model.pt")
    widget.image.value = viewer.add_image(data, **meta)
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert widget.result is not None, widget.last_message
    assert "hot pixels replaced first (threshold 4" in widget.status.value
    got = np.asarray(widget.result.data)
    np.testing.assert_allclose(got, deconvolve(data, folder, progress=False), rtol=1e-5, atol=1e-5)
    assert np.abs(got - deconvolve(data, folder, progress=False, hot_pixel_threshold=None)).max() > 1e-3 * np.ptp(got)
