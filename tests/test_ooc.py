"""Out-of-core inference (bundle.ooc) equals in-memory inference (bundle.inference.deconvolve)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr  # a dependency of the bundle: a missing install must fail, not skip

from bundle.inference import deconvolve
from bundle.networks import DeblurUNet
from bundle.ooc import deconvolve_zarr, estimate_percentiles, open_volume, window_grid, write_ome_zarr


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = DeblurUNet(features=(4, 4, 8, 8, 16, 4), last_bias=0.0).eval()
    return net


def _volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 50.0, size=shape) + 100).astype(np.float32)


@pytest.mark.parametrize(
    "shape,block_size,overlap,precision",
    [
        ((40, 72, 56), (32, 32, 32), 0.25, "float32"),  # many groups, halos in every direction
        ((20, 70, 45), (16, 48, 16), 0.5, "float32"),  # z shorter than the window: padded like in memory
        ((40, 72, 56), (16, 32, 48), (0.25, 0.5, 0.4), "bfloat16"),  # per-axis overlap (as "auto" plans it)
    ],
)
def test_equals_in_memory(tmp_path, tiny_net, shape, block_size, overlap, precision):
    volume = _volume(shape)
    src = write_ome_zarr(tmp_path / "in.ome.zarr", volume, voxel_size=(0.2, 0.1, 0.1), chunks=(16, 32, 32))
    assert src.shape == shape
    kwargs = dict(roi_size=(32, 32, 32), overlap=overlap, sw_batch_size=2, normalize=(0.1, 99.9), precision=precision)
    ref = deconvolve(volume, tiny_net, device="cpu", progress=False, output_range="normalized", flips=1, **kwargs)
    out = deconvolve_zarr(
        tmp_path / "in.ome.zarr",
        tmp_path / "out.ome.zarr",
        tiny_net,
        device="cpu",
        block_size=block_size,
        chunks=(16, 32, 32),
        output_range="normalized",
        **kwargs,
    )
    got = np.asarray(out[...])
    assert got.shape == shape and got.dtype == np.float32
    # bfloat16: the same windows through the same converted network, only batched differently
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 if precision == "float32" else 1e-2)
    arr, voxel = open_volume(tmp_path / "out.ome.zarr")
    assert voxel == (0.2, 0.1, 0.1) and arr.attrs["complete"] is True


def test_output_range_input_restores_intensities(tmp_path, tiny_net):
    volume = _volume((32, 48, 40), seed=1)
    kwargs = dict(roi_size=(32, 32, 32), overlap=0.25, sw_batch_size=2)
    ref = deconvolve(volume, tiny_net, device="cpu", progress=False, flips=1, **kwargs)
    out = deconvolve_zarr(
        volume, tmp_path / "o.zarr", tiny_net, device="cpu", block_size=(32, 16, 16), **kwargs
    )
    np.testing.assert_allclose(np.asarray(out[...]), ref, rtol=1e-6, atol=1e-5 * float(np.ptp(volume)))


def test_window_grid_is_monais():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size, roi = (70, 130, 64), (32, 64, 64)
    expected = dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, (0.25,) * 3))
    assert window_grid(size, roi, 0.25) == list(expected)


def test_percentiles_exact_then_subsampled():
    volume = _volume((20, 30, 40), seed=2)
    lo, hi = estimate_percentiles(volume, (1.0, 99.0))
    np.testing.assert_allclose([lo, hi], np.percentile(volume, [1.0, 99.0]), rtol=1e-5)
    lo2, hi2 = estimate_percentiles(volume, (1.0, 99.0), max_samples=2000)
    assert abs(lo2 - lo) < 0.2 * (hi - lo) and abs(hi2 - hi) < 0.2 * (hi - lo)


def test_refuses_to_overwrite(tmp_path, tiny_net):
    volume = _volume((32, 32, 32))
    deconvolve_zarr(volume, tmp_path / "o.zarr", tiny_net, roi_size=(32, 32, 32), device="cpu")
    with pytest.raises(FileExistsError):
        deconvolve_zarr(volume, tmp_path / "o.zarr", tiny_net, roi_size=(32, 32, 32), device="cpu")


def test_window_free_network_equals_in_memory_with_default_settings(tmp_path):
    """The bundle's default generator (depth 2, batch norm): blocks with a halo = in-memory defaults."""
    torch.manual_seed(1)
    net = DeblurUNet(features=(2, 4, 4, 2), depth=2, norm="batch", align_corners=False, last_bias=0.0).eval()
    volume = _volume((20, 70, 45), seed=2)
    write_ome_zarr(tmp_path / "in.ome.zarr", volume, voxel_size=(0.2, 0.1, 0.1), chunks=(16, 32, 32))
    ref = deconvolve(volume, net, device="cpu", progress=False, precision="float32", flips=1)  # out of core: one view
    out = deconvolve_zarr(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", net, device="cpu",
                          block_size=(16, 32, 32), precision="float32")
    assert out.attrs["halo"] == net.tiling_halo == 26
    np.testing.assert_allclose(np.asarray(out[...]), ref, rtol=1e-5, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_round_trip_read_by_ome_zarr_py(tmp_path, tiny_net, version):
    """Written as OME-Zarr 0.5 (Zarr v3, the default) or 0.4 (Zarr v2); read back by an independent
    reader (ome-zarr-py) with the voxel size, and by ``open_volume``."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    volume = _volume((20, 40, 36), seed=4)
    write_ome_zarr(tmp_path / "in.ome.zarr", volume, voxel_size=(0.3, 0.11, 0.11), chunks=(8, 16, 16), ome_version=version)
    deconvolve_zarr(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", tiny_net, device="cpu", block_size=(16, 32, 32),
                    chunks=(8, 16, 16), ome_version=version)  # fmt: skip
    for name in ("in.ome.zarr", "out.ome.zarr"):
        group = zarr.open_group(str(tmp_path / name), mode="r")
        assert group.metadata.zarr_format == (3 if version == "0.5" else 2)
        attrs = dict(group.attrs)
        assert (attrs["ome"]["version"] if version == "0.5" else attrs["multiscales"][0]["version"]) == version
        [node] = [n for n in Reader(parse_url(str(tmp_path / name)))() if n.load(Multiscales)]
        [transform] = node.metadata["coordinateTransformations"][0]
        assert transform["type"] == "scale" and transform["scale"] == pytest.approx([0.3, 0.11, 0.11])
        assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
        data = np.asarray(node.data[0])
        assert data.shape == (20, 40, 36)
        arr, voxel = open_volume(tmp_path / name)
        assert voxel == pytest.approx((0.3, 0.11, 0.11))
        np.testing.assert_array_equal(np.asarray(arr[...]), data)
    np.testing.assert_array_equal(np.asarray(open_volume(tmp_path / "in.ome.zarr")[0][...]), volume)
    with pytest.raises(ValueError, match="ome_version"):
        write_ome_zarr(tmp_path / "bad.ome.zarr", volume, ome_version="0.3")


def test_dask_graph_on_a_two_worker_cluster_equals_in_memory(tmp_path):
    """``deconvolve_dask`` on a ``LocalCluster`` of 2 worker processes, 2 chunks per axis: the in-memory
    result; each worker loads the model once; the output is a complete OME-Zarr 0.5 with the voxel size."""
    from distributed import Client, LocalCluster

    from bundle.ooc import deconvolve_dask

    torch.manual_seed(1)
    net = DeblurUNet(features=(2, 4, 4, 2), depth=2, norm="batch", align_corners=False, last_bias=0.0).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    volume = _volume((60, 64, 64), seed=5)
    write_ome_zarr(tmp_path / "in.ome.zarr", volume, voxel_size=(0.2, 0.1, 0.1), chunks=(30, 32, 32))
    ref = deconvolve(volume, net, device="cpu", progress=False, precision="float32", flips=1)  # out of core: one view
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        out = deconvolve_dask(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", str(tmp_path / "model.pt"),
                              chunks=(30, 32, 32), precision="float32", scheduler=client)  # fmt: skip
        loaded = client.run(lambda: len(__import__("bundle.ooc.dask_graph", fromlist=["_"])._DECONVOLVERS))
    assert len(loaded) == 2 and all(n <= 1 for n in loaded.values()) and sum(loaded.values()) >= 1, loaded
    got = np.asarray(out[...])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * float(np.abs(ref).max()))
    arr, voxel = open_volume(tmp_path / "out.ome.zarr")
    assert voxel == (0.2, 0.1, 0.1) and arr.attrs["complete"] is True and arr.chunks == (30, 32, 32)
    with pytest.raises(ValueError, match="window-free"):
        deconvolve_dask(volume, tmp_path / "no.ome.zarr", DeblurUNet(features=(4, 4, 8, 8, 16, 4)).eval())


def _hot_model_folder(folder, threshold):
    """A window-free generator saved as a training saves it, its record naming the hot-pixel threshold."""
    import json

    torch.manual_seed(1)
    net = DeblurUNet(features=(2, 4, 4, 2), depth=2, norm="batch", align_corners=False, last_bias=0.0).eval()
    folder.mkdir()
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({"score": 30.0, "preprocessing": {"hot_pixel_threshold": threshold}}))
    return folder


def _with_hot_columns(volume, count, seed):
    rng = np.random.default_rng(seed)
    out = volume.copy()
    ys, xs = rng.integers(0, volume.shape[1], count), rng.integers(0, volume.shape[2], count)
    ys[:3], xs[:3] = (0, 31, 63), (0, 32, 63)  # at the stack's corners and across tile and chunk borders
    out[:, ys, xs] += float(volume.max())
    return out


def test_hot_pixels_found_and_corrected_out_of_core_as_in_memory():
    from bundle.data import correct_hot_pixels, find_hot_pixels
    from bundle.ooc import HotPixelCorrectedVolume, find_hot_pixels_tiled

    volume = _with_hot_columns(_volume((24, 64, 64), seed=7), 20, seed=7)
    mask = find_hot_pixels(volume)
    assert mask.sum() >= 18 and mask[0, 0] and mask[31, 32] and mask[63, 63]
    for tile in (16, 20, 64):
        assert (find_hot_pixels_tiled(volume, tile=tile) == mask).all()
    fixed = correct_hot_pixels(volume)[0]
    view = HotPixelCorrectedVolume(volume, mask)
    for key in [(slice(None),) * 3, (slice(2, 9), slice(30, 33), slice(31, 40)), (slice(0, 24), slice(60, 64), slice(0, 1))]:
        np.testing.assert_array_equal(view[key], fixed[key])
    strided = view[::4, ::4, ::4]  # a percentile subsample: no hot pixel left at full strength
    assert strided.shape == (6, 16, 16) and strided.max() < volume.max()
    with pytest.raises(TypeError, match="slices"):
        view[0]


def test_out_of_core_paths_correct_hot_pixels_as_the_model_was_trained(tmp_path):
    """A model folder whose record names a threshold: deconvolve_zarr and deconvolve_dask read the stack
    corrected, as in-memory ``deconvolve`` of that folder does ("auto" everywhere)."""
    from bundle.ooc import deconvolve_dask

    folder = _hot_model_folder(tmp_path / "models", 4.0)
    volume = _with_hot_columns(_volume((30, 64, 64), seed=8), 25, seed=8)
    write_ome_zarr(tmp_path / "in.ome.zarr", volume, voxel_size=(0.2, 0.1, 0.1), chunks=(30, 32, 32))
    ref = deconvolve(volume, folder, device="cpu", progress=False, precision="float32", flips=1)
    raw = deconvolve(volume, folder, device="cpu", progress=False, precision="float32", flips=1, hot_pixel_threshold=None)
    tol = 1e-4 * float(np.abs(ref).max())
    assert np.abs(raw - ref).max() > 100 * tol  # the correction matters on this stack
    out = deconvolve_zarr(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", folder, device="cpu",
                          block_size=(16, 32, 32), precision="float32")  # fmt: skip
    np.testing.assert_allclose(np.asarray(out[...]), ref, rtol=1e-5, atol=tol)
    out = deconvolve_dask(tmp_path / "in.ome.zarr", tmp_path / "dask.ome.zarr", str(folder / "model.pt"),
                          chunks=(30, 32, 32), precision="float32", scheduler="synchronous")  # fmt: skip
    np.testing.assert_allclose(np.asarray(out[...]), ref, rtol=1e-5, atol=tol)
    out = deconvolve_zarr(tmp_path / "in.ome.zarr", tmp_path / "none.ome.zarr", folder, device="cpu",
                          block_size=(16, 32, 32), precision="float32", hot_pixel_threshold=None)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out[...]), raw, rtol=1e-5, atol=tol)
