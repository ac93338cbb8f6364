"""Tests for bundle.io: stack round trips with voxel size, MONAI reader/writer, atomic writes, errors."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from monai.data.image_writer import resolve_writer
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SaveImaged, Spacingd

from bundle.data import list_volumes
from bundle.inference import output_path
from bundle.io import (
    TiffStackReader,
    TiffStackWriter,
    VolumeError,
    load_volume,
    save_volume,
    validate_psf,
    validate_volume,
)

VOXEL = (0.3, 0.1, 0.12)  # (z, y, x) µm


def _volume(dtype, shape=(5, 7, 9), seed=0) -> np.ndarray:
    """Non-cubic, asymmetric test stack in the range of ``dtype``."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(0, 200, size=shape)
    data[0, 0, 0], data[-1, -1, -1] = 0, 250  # asymmetric corners
    return data.astype(dtype)


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_round_trip_keeps_shape_dtype_voxel_size(tmp_path, dtype):
    vol = _volume(dtype)
    path = save_volume(tmp_path / "v.tif", vol, voxel_size=VOXEL)
    loaded, meta = load_volume(path, dtype=None)
    assert loaded.shape == (5, 7, 9) and loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, vol)
    np.testing.assert_allclose(meta["voxel_size"], VOXEL, rtol=1e-6)
    assert meta["original_dtype"] == np.dtype(dtype).name and meta["axes"] == "ZYX"
    with tifffile.TiffFile(path) as tif:  # readable by ImageJ: its metadata carries the calibration
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.3) and tif.imagej_metadata["unit"] == "um"
    assert load_volume(path)[0].dtype == np.float32  # default dtype


def test_tiff_float64_is_written_as_float32_and_dtype_can_be_chosen(tmp_path):
    vol = _volume(np.float64)
    loaded, meta = load_volume(save_volume(tmp_path / "a.tif", vol), dtype=None)
    assert loaded.dtype == np.float32 and meta["voxel_size"] is None
    loaded, _ = load_volume(save_volume(tmp_path / "b.tif", vol + 0.4, dtype=np.uint16), dtype=None)
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, np.rint(vol + 0.4).astype(np.uint16))


def test_ome_tiff_voxel_size_with_units(tmp_path):
    vol = _volume(np.uint16)
    path = tmp_path / "v.ome.tif"
    tifffile.imwrite(
        path,
        vol,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeZ": 300.0,
            "PhysicalSizeZUnit": "nm",
            "PhysicalSizeY": 0.1,
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeX": 0.12,
        },
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and not tif.is_imagej
        pixels = next(e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
        assert pixels.get("PhysicalSizeZUnit") == "nm"
    loaded, meta = load_volume(path, dtype=None)
    np.testing.assert_array_equal(loaded, vol)
    np.testing.assert_allclose(meta["voxel_size"], VOXEL, rtol=1e-9)


@pytest.mark.parametrize("n_pages", [3, 7])
def test_plain_multipage_tiff_is_read_as_zyx_without_voxel_size(tmp_path, n_pages):
    vol = _volume(np.uint16, shape=(n_pages, 6, 8))
    tifffile.imwrite(tmp_path / "plain.tif", vol, photometric="minisblack")
    loaded, meta = load_volume(tmp_path / "plain.tif", dtype=None)
    np.testing.assert_array_equal(loaded, vol)
    assert meta["voxel_size"] is None


def test_imagej_tiff_written_without_axes_is_a_z_stack(tmp_path):
    vol = _volume(np.float32, shape=(6, 5, 4))
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True)  # tifffile labels the first axis 'C'
    np.testing.assert_array_equal(load_volume(tmp_path / "ij.tif")[0], vol)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_round_trip_keeps_zyx_orientation_and_voxel_size(tmp_path, name):
    vol = _volume(np.float32)
    path = save_volume(tmp_path / name, vol, voxel_size=VOXEL)
    img = nib.load(path)  # stored the NIfTI way: (X, Y, Z) with zooms (x, y, z)
    assert img.shape == (9, 7, 5)
    np.testing.assert_allclose(img.header.get_zooms(), VOXEL[::-1], rtol=1e-6)
    loaded, meta = load_volume(path)
    np.testing.assert_array_equal(loaded, vol)
    assert meta["voxel_size"] == pytest.approx(VOXEL)


@pytest.mark.parametrize("name", ["v.mha", "v.nrrd"])
def test_itk_round_trip(tmp_path, name):
    vol = _volume(np.uint16)
    path = save_volume(tmp_path / name, vol, voxel_size=VOXEL)
    loaded, meta = load_volume(path, dtype=None)
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, vol)
    assert meta["voxel_size"] == pytest.approx(VOXEL)


@pytest.mark.parametrize(
    "reader", [TiffStackReader(), TiffStackReader, "TiffStackReader", "bundle.io.TiffStackReader"]
)
def test_monai_load_gives_channel_first_zyx_with_affine(tmp_path, reader):
    vol = _volume(np.uint16)
    path = save_volume(tmp_path / "v.tif", vol, voxel_size=VOXEL)
    load = Compose([LoadImaged(keys="img", reader=reader), EnsureChannelFirstd(keys="img")])
    img = load({"img": str(path)})["img"]
    assert tuple(img.shape) == (1, 5, 7, 9)
    np.testing.assert_array_equal(img[0].numpy(), vol)
    np.testing.assert_allclose(img.affine.numpy(), np.diag([*VOXEL, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(img.pixdim.numpy(), VOXEL, rtol=1e-6)
    np.testing.assert_allclose(img.meta["voxel_size"], VOXEL, rtol=1e-6)


def test_monai_load_without_reader_uses_tiff_stack_reader(tmp_path):
    vol = _volume(np.uint8)
    path = save_volume(tmp_path / "v.tif", vol)
    img = LoadImaged(keys="img", ensure_channel_first=True)({"img": str(path)})["img"]
    assert tuple(img.shape) == (1, 5, 7, 9)
    np.testing.assert_array_equal(img[0].numpy(), vol)


def test_monai_multichannel_and_channel_choice(tmp_path):
    vol = np.stack([_volume(np.uint16, seed=1), _volume(np.uint16, seed=2)], axis=1)  # (Z, C, Y, X)
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, vol, imagej=True, metadata={"axes": "ZCYX", "mode": "composite"})
    img = LoadImaged(keys="img", reader=TiffStackReader(), ensure_channel_first=True)({"img": str(path)})[
        "img"
    ]
    assert tuple(img.shape) == (2, 5, 7, 9)
    np.testing.assert_array_equal(img[1].numpy(), vol[:, 1])
    img = LoadImaged(keys="img", reader=TiffStackReader(channel=1), ensure_channel_first=True)(
        {"img": str(path)}
    )
    np.testing.assert_array_equal(img["img"][0].numpy(), vol[:, 1])


def test_monai_save_writes_3d_tiff_with_voxel_size(tmp_path):
    assert resolve_writer(".tif")[0] is TiffStackWriter and resolve_writer("tiff")[0] is TiffStackWriter
    assert len(resolve_writer(".nii.gz")) > 0  # MONAI's own registrations are kept
    vol = _volume(np.float32)
    path = save_volume(tmp_path / "in" / "v.tif", vol, voxel_size=VOXEL)
    pipeline = Compose(
        [
            LoadImaged(keys="img", reader=TiffStackReader()),
            EnsureChannelFirstd(keys="img"),
            SaveImaged(keys="img", output_dir=tmp_path / "out", output_ext=".tif", separate_folder=False),
        ]
    )
    pipeline({"img": str(path)})
    assert _files(tmp_path / "out") == ["v_trans.tif"]
    loaded, meta = load_volume(tmp_path / "out" / "v_trans.tif", dtype=None)
    assert loaded.shape == (5, 7, 9) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vol)
    np.testing.assert_allclose(meta["voxel_size"], VOXEL, rtol=1e-6)


@pytest.mark.parametrize(
    "resample,shape,voxel", [(False, (3, 4, 4), (0.6, 0.2, 0.36)), (True, (5, 7, 9), VOXEL)]
)
def test_monai_save_follows_spacing_or_resamples_back(tmp_path, resample, shape, voxel):
    path = save_volume(tmp_path / "v.tif", _volume(np.float32), voxel_size=VOXEL)
    pipeline = Compose(
        [
            LoadImaged(keys="img", reader="bundle.io.TiffStackReader", ensure_channel_first=True),
            Spacingd(keys="img", pixdim=(0.6, 0.2, 0.36)),
            SaveImaged(
                keys="img", output_dir=tmp_path, output_ext=".tif", resample=resample, mode="bilinear"
            ),
        ]
    )
    pipeline({"img": str(path)})
    loaded, meta = load_volume(tmp_path / "v" / "v_trans.tif")
    assert loaded.shape == shape
    np.testing.assert_allclose(meta["voxel_size"], voxel, rtol=1e-6)


def test_writer_uint8_with_scale_and_multichannel(tmp_path):
    writer = TiffStackWriter(output_dtype=np.uint8, scale=255)
    data = np.stack([np.linspace(0, 1, 60).reshape(3, 4, 5)] * 2).astype(np.float32)  # (2, Z, Y, X)
    writer.set_data_array(data, channel_dim=0)
    writer.set_metadata({"affine": np.diag([*VOXEL, 1.0]), "original_affine": np.diag([*VOXEL, 1.0])})
    writer.write(tmp_path / "w.tif")
    loaded, meta = load_volume(tmp_path / "w.tif", channel=1, dtype=None)
    assert loaded.dtype == np.uint8 and loaded.shape == (3, 4, 5) and loaded.max() == 255
    np.testing.assert_allclose(meta["voxel_size"], VOXEL, rtol=1e-6)
    assert _files(tmp_path) == ["w.tif"]


def test_save_is_atomic_and_creates_folders(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "v.tif"
    save_volume(out, _volume(np.float32))
    assert _files(out.parent) == ["v.tif"]

    def broken_write(file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken_write)
    before = out.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_volume(out, _volume(np.float32, seed=3))
    assert _files(out.parent) == ["v.tif"] and out.read_bytes() == before
    with pytest.raises(OSError):
        save_volume(tmp_path / "new.tif", _volume(np.float32))
    assert not (tmp_path / "new.tif").exists() and _files(tmp_path) == ["a"]


def test_save_refuses_protected_input(tmp_path, monkeypatch):
    src = save_volume(tmp_path / "in.tif", _volume(np.uint16), voxel_size=VOXEL)
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    for target in (src, "in.tif", tmp_path / "sub" / ".." / "in.tif"):
        with pytest.raises(VolumeError, match="in.tif: refusing to overwrite an input"):
            save_volume(target, _volume(np.uint16, seed=5), protect=[str(src)])
    assert src.read_bytes() == before and _files(tmp_path) == ["in.tif"]


@pytest.mark.parametrize(
    "bad", [np.full((4, 5, 6), np.nan, np.float32), np.zeros((5, 6), np.float32), np.zeros((0, 5, 6))]
)
def test_save_refuses_bad_volume(tmp_path, bad):
    with pytest.raises(VolumeError, match="out.tif"):
        save_volume(tmp_path / "out.tif", bad)
    assert _files(tmp_path) == []


def _write_bad_input(folder, case: str):
    """Create the file for one bad-input case; returns its path."""
    vol = _volume(np.float32)
    if case == "2d":
        tifffile.imwrite(folder / "flat.tif", vol[0])
        return folder / "flat.tif"
    if case == "4d_no_channel":
        path = folder / "multi.tif"
        tifffile.imwrite(path, np.stack([vol, vol], axis=1), imagej=True, metadata={"axes": "ZCYX"})
        return path
    if case == "4d_nifti_no_channel":
        path = folder / "multi.nii.gz"
        nib.save(nib.Nifti1Image(np.stack([vol, vol]).T, np.eye(4)), path)
        return path
    if case == "nan":
        vol[1, 2, 3], vol[0, 0, 0] = np.nan, np.inf
        tifffile.imwrite(folder / "nan.tif", vol)
        return folder / "nan.tif"
    if case == "constant":
        tifffile.imwrite(folder / "const.tif", np.full((4, 5, 6), 7, np.uint16))
        return folder / "const.tif"
    if case in ("empty_tif", "empty_nii"):
        path = folder / ("empty.tif" if case == "empty_tif" else "empty.nii.gz")
        path.write_bytes(b"")
        return path
    if case in ("truncated_tif", "truncated_nii", "truncated_mha"):
        ext = {"truncated_tif": ".tif", "truncated_nii": ".nii.gz", "truncated_mha": ".mha"}[case]
        good = save_volume(folder / f"good{ext}", _volume(np.float32, shape=(6, 20, 30)), voxel_size=VOXEL)
        path = folder / f"cut{ext}"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        good.unlink()
        return path
    if case == "unknown_ext":
        path = folder / "vol.xyz"
        path.write_bytes(b"not an image")
        return path
    if case == "missing":
        return folder / "missing.tif"
    raise ValueError(case)


@pytest.mark.parametrize(
    "case,message",
    [
        ("2d", r"is 2D \(shape \(7, 9\)\); a 3D stack \(Z, Y, X\) is needed"),
        ("4d_no_channel", "has 2 channels.*`channel` argument"),
        ("4d_nifti_no_channel", "has 2 channels.*`channel` argument"),
        ("nan", "contains 2 NaN/Inf voxels"),
        ("constant", "constant"),
        ("empty_tif", r"empty \(0 bytes\)"),
        ("empty_nii", r"empty \(0 bytes\)"),
        ("truncated_tif", "cannot read TIFF"),
        ("truncated_nii", "cannot read NIfTI"),
        ("truncated_mha", "cannot read image"),
        ("unknown_ext", r"unsupported file extension '.xyz'; supported: .tif, .tiff"),
        ("missing", "file not found"),
    ],
)
def test_bad_input_raises_volume_error_naming_the_file(tmp_path, case, message):
    path = _write_bad_input(tmp_path, case)
    listing = _files(tmp_path)
    with pytest.raises(VolumeError, match=message) as err:
        load_volume(path)
    assert str(err.value).startswith(str(path)) and path.name in str(err.value)
    assert _files(tmp_path) == listing  # nothing written


def test_channel_choice_makes_multichannel_usable(tmp_path):
    path = _write_bad_input(tmp_path, "4d_no_channel")
    loaded, _ = load_volume(path, channel=1)
    np.testing.assert_array_equal(loaded, _volume(np.float32))
    with pytest.raises(VolumeError, match="channel=2 requested but the file has 2 channel"):
        load_volume(path, channel=2)
    path = _write_bad_input(tmp_path, "4d_nifti_no_channel")
    np.testing.assert_array_equal(load_volume(path, channel=0)[0], _volume(np.float32))


def test_validate_volume_direct_messages():
    with pytest.raises(VolumeError, match=r"^x.tif: has 4 dimensions.*`channel` argument"):
        validate_volume(np.zeros((2, 3, 4, 5)), "x.tif")
    validate_volume(np.ones((2, 3, 4)), "x.tif", allow_constant=True)
    with pytest.raises(VolumeError, match="x.tif: volume is constant"):
        validate_volume(np.ones((2, 3, 4)), "x.tif")


def _psf(shape=(5, 5, 5)) -> np.ndarray:
    psf = np.zeros(shape, np.float32)
    psf[tuple(s // 2 for s in shape)] = 1.0
    return psf


@pytest.mark.parametrize(
    "psf,volume_shape,message",
    [
        (_psf((9, 5, 5)), (8, 64, 64), r"larger than the volume \(8, 64, 64\) along Z"),
        (_psf() - 0.01 * (np.arange(125).reshape(5, 5, 5) % 2), None, "62 negative voxels"),
        (np.where(_psf() > 0, np.inf, 0).astype(np.float32), None, "1 NaN/Inf"),
        (np.zeros((5, 5, 5), np.float32), None, "all zero"),
        (_psf()[0], None, "3D stack"),
    ],
)
def test_bad_psf_raises_volume_error(psf, volume_shape, message):
    with pytest.raises(VolumeError, match=f"^beads/psf.tif: .*{message}"):
        validate_psf(psf, "beads/psf.tif", volume_shape=volume_shape)


def test_valid_psf_passes_with_rounding_negatives():
    psf = _psf()
    psf[0, 0, 0] = -1e-9
    validate_psf(psf, "psf.tif", volume_shape=(5, 5, 5))


@pytest.mark.parametrize("ext", [".tif", ".nii.gz", ".nii", ".mha", ".nrrd"])
def test_training_loader_reads_every_format_as_zyx(tmp_path, ext):
    """Training's MONAI pipeline and load_volume agree on (Z, Y, X) for every format (NIfTI was transposed)."""
    from monai.transforms import Compose

    from bundle.data import normalize_transforms

    vol = np.random.default_rng(0).random((5, 7, 9)).astype(np.float32)
    path = save_volume(tmp_path / f"v{ext}", vol, voxel_size=(0.3, 0.1, 0.05))
    loaded, meta = load_volume(path)
    np.testing.assert_allclose(loaded, vol, rtol=1e-6)
    assert meta["voxel_size"] == pytest.approx((0.3, 0.1, 0.05))
    train = Compose(normalize_transforms(("image",), (0.0, 100.0)))({"image": str(path)})["image"]
    assert tuple(train.shape) == (1, 5, 7, 9)
    expected = (vol - vol.min()) / (vol.max() - vol.min())
    np.testing.assert_allclose(np.asarray(train)[0], expected, atol=1e-5)


def test_training_loader_names_a_file_with_nan(tmp_path):
    from monai.transforms import Compose

    from bundle.data import normalize_transforms

    vol = np.random.default_rng(0).random((5, 7, 9)).astype(np.float32)
    vol[2, 3, 4] = np.nan
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, vol)
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps it; the cause names the file
        Compose(normalize_transforms(("image",)))({"image": str(path)})
    assert isinstance(info.value.__cause__, VolumeError)
    assert str(info.value.__cause__).startswith(str(path)) and "NaN" in str(info.value.__cause__)


@pytest.mark.parametrize("ext,data_ext", [(".mhd", ".raw"), (".nhdr", ".raw")])
def test_header_and_data_file_are_written_as_a_pair(tmp_path, ext, data_ext):
    """The header names the final data file, not a hidden temporary one; nothing else is left."""
    volume = np.random.default_rng(0).random((5, 7, 9), dtype=np.float32)
    path = save_volume(tmp_path / f"out{ext}", volume, voxel_size=(0.3, 0.1, 0.1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"out{ext}", f"out{data_ext}"])
    header = path.read_bytes().decode("latin-1")
    assert f"out{data_ext}" in header and ".tmp" not in header
    again, meta = load_volume(path)
    np.testing.assert_array_equal(again, volume)
    assert meta["voxel_size"] == pytest.approx((0.3, 0.1, 0.1))


def test_a_killed_write_leaves_nothing_that_is_read_as_input(tmp_path):
    """A hidden temporary file (what a kill during saving leaves) is not listed as an input."""
    from bundle.data import list_volumes

    save_volume(tmp_path / "a.tif", np.ones((4, 8, 8), dtype=np.float32))
    (tmp_path / ".b.tif.0123456789ab.tmp.tif").write_bytes(b"")  # 0-byte leftover
    assert list_volumes(str(tmp_path)) == [str(tmp_path / "a.tif")]
    assert list_volumes(str(tmp_path / "*.tif")) == [str(tmp_path / "a.tif")]


def test_a_2d_rgb_tiff_is_called_2d_not_sent_to_the_channel_argument(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((32, 32, 3), np.uint8) + 7, photometric="rgb")
    with pytest.raises(VolumeError, match=r"rgb\.tif: is a 2D image with 3 channels") as err:
        load_volume(tmp_path / "rgb.tif")
    assert "channel" not in str(err.value).split("channels", 1)[1]


def _toxo_dv() -> Path:
    """A real DeltaVision stack shipped in the napari-dv wheel (a dev extra): 2 channels, 17 x 128 x 128."""
    import importlib.util

    spec = importlib.util.find_spec("napari_dv")  # located, not imported
    return Path(spec.submodule_search_locations[0]) / "_tests" / "toxo.dv"


def test_deltavision_stacks_load_with_their_voxel_size_and_channels(tmp_path):
    import mrc

    path = _toxo_dv()
    with pytest.raises(VolumeError, match="2 channels"):
        load_volume(path)
    volume, meta = load_volume(path, channel=1, dtype=None)
    with mrc.DVFile(str(path)) as dv:
        expected = np.asarray(dv.asarray())[1]
    np.testing.assert_array_equal(volume, expected)
    assert volume.shape == (17, 128, 128) and volume.dtype == np.uint16
    assert meta["voxel_size"] == pytest.approx((0.3, 0.13262, 0.13262), rel=1e-4)
    assert str(path) in list_volumes(str(path.parent))  # folders of .dv stacks are listed
    # read, not written: a .dv input's outputs are TIFF; writing .dv is refused with the reason
    assert output_path(path, tmp_path).name == "toxo_deconv.tif"
    with pytest.raises(VolumeError, match="read, not written"):
        save_volume(tmp_path / "out.dv", volume)


def _write_czi(path: Path, volume: np.ndarray, voxel_size: tuple[float, float, float]) -> None:
    """A Zeiss CZI written with Zeiss' own open writer (pylibCZIrw, a dev extra): (C, Z, Y, X) planes."""
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True) as doc:
        for c in range(volume.shape[0]):
            for z in range(volume.shape[1]):
                doc.write(data=volume[c, z], plane={"C": c, "Z": z, "T": 0})
        z_um, y_um, x_um = voxel_size
        doc.write_metadata(document_name=path.stem, channel_names={c: f"ch{c}" for c in range(volume.shape[0])},
                           scale_x=x_um * 1e-6, scale_y=y_um * 1e-6, scale_z=z_um * 1e-6)  # fmt: skip


def test_czi_stacks_load_through_bioio_with_voxel_size_and_channels(tmp_path, monkeypatch):
    volume = (np.random.default_rng(0).random((2, 6, 24, 32)) * 4000).astype(np.uint16)
    path = tmp_path / "cells.czi"
    _write_czi(path, volume, (0.3, 0.11, 0.11))
    with pytest.raises(VolumeError, match="2 channels"):
        load_volume(path)
    one, meta = load_volume(path, channel=1, dtype=None)
    np.testing.assert_array_equal(one, volume[1])
    assert one.dtype == np.uint16 and meta["voxel_size"] == pytest.approx((0.3, 0.11, 0.11))
    single = tmp_path / "one.czi"
    _write_czi(single, volume[:1], (0.2, 0.1, 0.1))
    assert load_volume(single)[0].shape == (6, 24, 32)
    assert str(single) in list_volumes(str(tmp_path))  # folders of vendor stacks are listed
    assert output_path(path, tmp_path).name == "cells_deconv.tif"  # read, not written: outputs are TIFF
    monkeypatch.setitem(__import__("sys").modules, "bioio", None)  # bioio missing: the error names the extra
    with pytest.raises(VolumeError, match=r"cells\.czi: reading \.czi files needs bioio and bioio-czi"):
        load_volume(path, channel=0)
