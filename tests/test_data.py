import numpy as np
import pytest
import tifffile
import torch
from monai.utils import set_determinism

from bundle.data import (
    UnpairedDataset,
    list_volumes,
    paired_datalist,
    paired_dataset,
    paired_transforms,
    recropped_dataset,
    unpaired_dataset,
)


def test_list_volumes_folder_glob_file_and_errors(tiny_dataset, tmp_path):
    folder = tiny_dataset / "train/sharp"
    files = list_volumes(str(folder))
    assert [f.endswith(".tif") for f in files] == [True, True] and files == sorted(files)
    assert list_volumes(str(folder / "*.tif")) == files
    assert list_volumes(files[0]) == [files[0]]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_volumes(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no volume files"):
        list_volumes(str(tmp_path))


def test_paired_datalist_matches_names_and_reports_missing(tiny_dataset, tmp_path):
    items = paired_datalist(str(tiny_dataset / "val/blurred"), str(tiny_dataset / "val/ground_truth"))
    assert len(items) == 1 and items[0]["image"].endswith("val_000.tif") and items[0]["label"].endswith("val_000.tif")
    (tmp_path / "gt").mkdir()
    with pytest.raises(FileNotFoundError, match="ground truth"):
        paired_datalist(str(tiny_dataset / "val/blurred"), str(tmp_path / "gt"))


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 24, 24)])
def test_unpaired_dataset(tiny_dataset, patch):
    set_determinism(seed=0)
    ds = unpaired_dataset(str(tiny_dataset / "train/sharp"), str(tiny_dataset / "train/blurred"), length=7, patch_size=patch)
    assert len(ds) == 7
    item = ds[0]
    assert set(item) == {"sharp", "blurred"}
    for key in ("sharp", "blurred"):
        x = item[key]
        assert tuple(x.shape) == (1, *patch) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    crops = torch.stack([ds[i]["sharp"] for i in range(6)])
    assert not torch.allclose(crops[0], crops[1])  # random crops differ
    set_determinism(seed=None)


def test_recropped_dataset_shares_the_cache_and_crops_anew(tiny_dataset):
    """The PSF fit's crops: same cached volumes (loaded once), the new size in both domains, no sharp margin,
    and drawing crops leaves the cached volumes as they were."""
    ds = unpaired_dataset(str(tiny_dataset / "train/sharp"), str(tiny_dataset / "train/blurred"), length=3,
                          patch_size=(16, 16, 16), sharp_margin=(0, 4, 4))
    fit = recropped_dataset(ds, length=5, patch_size=(16, 32, 32))
    assert len(fit) == 5 and fit.sharp.volumes is ds.sharp.volumes and fit.blurred.volumes is ds.blurred.volumes
    cached = ds.sharp.volumes[0]["image"].clone()
    item = fit[0]
    assert tuple(item["sharp"].shape) == (1, 16, 32, 32) == tuple(item["blurred"].shape)
    assert tuple(ds[0]["sharp"].shape) == (1, 16, 24, 24)  # the training crops keep their size and margin
    assert torch.equal(ds.sharp.volumes[0]["image"], cached)
    with pytest.raises(TypeError, match="unpaired_dataset"):
        recropped_dataset(UnpairedDataset(ds.sharp.volumes, ds.blurred.volumes), length=1, patch_size=(8, 8, 8))


def test_volumes_smaller_than_the_patch_are_padded(tiny_dataset):
    ds = unpaired_dataset(str(tiny_dataset / "train/sharp"), str(tiny_dataset / "train/blurred"), length=1, patch_size=(48, 48, 48))
    assert tuple(ds[0]["sharp"].shape) == (1, 48, 48, 48)


def test_paired_transforms_keep_zyx_and_normalise(tiny_dataset):
    items = paired_datalist(str(tiny_dataset / "val/blurred"), str(tiny_dataset / "val/ground_truth"))
    out = paired_transforms()(items[0])
    assert tuple(out["image"].shape) == (1, 32, 64, 64) == tuple(out["label"].shape)
    assert float(out["label"].max()) == pytest.approx(1.0, abs=1e-6)
    assert float(out["image"].min()) == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(out["image"].numpy()).all()


def test_domain_intensity_range_pools_volumes_and_keeps_their_ratio(tmp_path):
    from monai.transforms import Compose

    from bundle.data import domain_intensity_range, normalize_transforms
    from bundle.io import VolumeError, save_volume

    rng = np.random.default_rng(0)
    base = rng.random((8, 16, 16)).astype(np.float32)
    a = save_volume(tmp_path / "d" / "a.tif", base)
    b = save_volume(tmp_path / "d" / "b.tif", 2 * base)  # the same sample, twice as bright
    v_lo, v_hi = domain_intensity_range(str(tmp_path / "d"), (0.0, 100.0))
    assert v_lo == pytest.approx(float(base.min())) and v_hi == pytest.approx(float(2 * base.max()))
    fixed = Compose(normalize_transforms(("image",), intensity_range=(v_lo, v_hi)))
    per_volume = Compose(normalize_transforms(("image",), (0.0, 100.0)))
    ratio_fixed = float(fixed({"image": str(b)})["image"].mean() / fixed({"image": str(a)})["image"].mean())
    ratio_volume = float(per_volume({"image": str(b)})["image"].mean() / per_volume({"image": str(a)})["image"].mean())
    assert ratio_fixed == pytest.approx(2.0, rel=0.02) and ratio_volume == pytest.approx(1.0, rel=0.02)
    sparse = np.zeros((8, 16, 16), np.float32)
    sparse[0, 0, 0] = 1.0  # one bright voxel: the 0.1 and 99.9 percentiles are both 0
    save_volume(tmp_path / "e" / "sparse.tif", sparse)
    with pytest.raises(VolumeError, match="pooled"):
        domain_intensity_range(str(tmp_path / "e"))
    with pytest.raises(ValueError, match="v_lo < v_hi"):
        normalize_transforms(("image",), intensity_range=(1.0, 1.0))


def test_unpaired_dataset_and_validation_take_one_range_per_domain(tiny_dataset):
    set_determinism(seed=0)
    ds = unpaired_dataset(
        str(tiny_dataset / "train/sharp"), str(tiny_dataset / "train/blurred"), length=2, patch_size=(16, 16, 16),
        sharp_range=(0.0, 1e6), blurred_range=(0.0, 1e6),
    )  # fmt: skip
    item = ds[0]
    assert float(item["sharp"].max()) < 1e-3 and float(item["blurred"].max()) < 1e-3  # the raw values are ≪ 1e6
    pair = paired_datalist(str(tiny_dataset / "val/blurred"), str(tiny_dataset / "val/ground_truth"))[0]
    out = paired_transforms(image_range=(0.0, 1e6), label_range=None)(pair)
    assert float(out["image"].max()) < 1e-3 and float(out["label"].max()) == pytest.approx(1.0)


def test_unpaired_dataset_sharp_margin_enlarges_only_the_sharp_crops(tiny_dataset):
    ds = unpaired_dataset(str(tiny_dataset / "train/sharp"), str(tiny_dataset / "train/blurred"), length=2,
                          patch_size=(16, 16, 16), sharp_margin=(0, 4, 4))
    item = ds[0]
    assert tuple(item["sharp"].shape) == (1, 16, 24, 24) and tuple(item["blurred"].shape) == (1, 16, 16, 16)


def _write_z_ramps(root, folders) -> None:
    """One 16³ volume ``v.tif`` per folder under ``root``: intensity rising with depth (a Z ramp)."""
    ramp = np.broadcast_to(np.arange(1, 17, dtype=np.float32)[:, None, None], (16, 16, 16)).copy()
    for folder in folders:
        (root / folder).mkdir()
        tifffile.imwrite(root / folder / "v.tif", ramp)


def _z_reversed(crop: torch.Tensor) -> bool:
    """True when a crop of a Z ramp was flipped along Z (its first plane brighter than its last)."""
    return bool(crop[0, 0].mean() > crop[0, -1].mean())


@pytest.mark.parametrize("blurred_flip_axes", [(0, 1, 2), (1, 2)])
def test_blurred_crops_are_flipped_along_z_only_when_asked(tmp_path, blurred_flip_axes):
    """A Z ramp (intensity rising with depth) stays rising in every blurred crop unless Z flips are allowed;
    the sharp crops keep all three flip axes."""
    _write_z_ramps(tmp_path, ("sharp", "blurred"))
    set_determinism(seed=0)
    ds = unpaired_dataset(str(tmp_path / "sharp"), str(tmp_path / "blurred"), length=40, patch_size=(8, 8, 8),
                          blurred_flip_axes=blurred_flip_axes)
    items = [ds[i] for i in range(40)]
    set_determinism(seed=None)

    assert any(_z_reversed(it["sharp"]) for it in items)
    assert any(_z_reversed(it["blurred"]) for it in items) == (0 in blurred_flip_axes)


@pytest.mark.parametrize("flip_axes", [(0, 1, 2), (1, 2)])
def test_paired_crops_are_flipped_along_z_only_when_asked(tmp_path, flip_axes):
    """The supervised pairs: a Z ramp stays rising in both crops unless Z flips are allowed, and the
    blurred crop and its ground truth are always flipped together."""
    _write_z_ramps(tmp_path, ("image", "label"))
    set_determinism(seed=0)
    ds = paired_dataset(str(tmp_path / "image"), str(tmp_path / "label"), patch_size=(8, 8, 8), flip_axes=flip_axes)
    items = [ds[0] for _ in range(40)]
    set_determinism(seed=None)

    assert [_z_reversed(it["image"]) for it in items] == [_z_reversed(it["label"]) for it in items]
    assert any(_z_reversed(it["image"]) for it in items) == (0 in flip_axes)


def test_unpaired_background_share_adds_other_crops_for_the_unpaired_terms(tmp_path):
    """``unpaired_background_share=1``: each item also holds uniform crops of both domains, from the same
    cached volumes, while the sharp cycle's crops stay foreground-weighted (more structure in them);
    ``"same"`` (the default) adds nothing; a share outside [0, 1] is refused."""
    rng = np.random.default_rng(0)
    for domain in ("sharp", "blurred"):
        (tmp_path / domain).mkdir()
        vol = np.zeros((24, 96, 96), np.float32)
        vol[8:16, 10:18, 10:18] = 1.0  # one bright block in a dark volume: uniform crops mostly miss it
        tifffile.imwrite(tmp_path / domain / "v.tif", vol + 0.01 * rng.random(vol.shape, dtype=np.float32))
    kwargs = {"length": 60, "patch_size": (16, 16, 16), "background_share": 0.25}
    set_determinism(seed=0)
    plain = unpaired_dataset(str(tmp_path / "sharp"), str(tmp_path / "blurred"), **kwargs)
    assert set(plain[0]) == {"sharp", "blurred"} and plain.sharp_unpaired is None
    ds = unpaired_dataset(str(tmp_path / "sharp"), str(tmp_path / "blurred"), unpaired_background_share=1, **kwargs)
    assert ds.sharp_unpaired.volumes is ds.sharp.volumes and ds.blurred_unpaired.volumes is ds.blurred.volumes
    items = [ds[i] for i in range(60)]
    assert set(items[0]) == {"sharp", "blurred", "sharp_unpaired", "blurred_unpaired"}
    for key in ("sharp", "blurred"):
        weighted = np.mean([float((it[key] > 0.5).float().mean()) for it in items])
        uniform = np.mean([float((it[f"{key}_unpaired"] > 0.5).float().mean()) for it in items])
        assert tuple(items[0][f"{key}_unpaired"].shape) == (1, 16, 16, 16)
        assert weighted > 3 * uniform, (key, weighted, uniform)
    set_determinism(seed=None)
    with pytest.raises(ValueError, match="background_share"):
        unpaired_dataset(str(tmp_path / "sharp"), str(tmp_path / "blurred"), unpaired_background_share=2.0)
    with pytest.raises(ValueError, match="both"):
        UnpairedDataset(ds.sharp, ds.blurred, sharp_unpaired=ds.sharp)
