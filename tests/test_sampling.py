"""Foreground-weighted crops: the crop-centre map, its effect on the crops, and its per-volume cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import Compose
from monai.utils import set_determinism

from bundle.data import DomainCrops, augment_transforms, recropped_dataset, unpaired_dataset
from bundle.sampling import ForegroundWeightd, crop_share, foreground_fraction


def _sparse_volume(seed: int = 0, shape=(16, 48, 48)) -> torch.Tensor:
    """A dark field with a few bright blobs: (1, D, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    for _ in range(4):
        z, y, x = (int(rng.integers(2, s - 2)) for s in shape)
        vol[z - 1 : z + 2, y - 2 : y + 3, x - 2 : x + 3] = 1.0
    return torch.from_numpy(vol)[None]


def test_map_is_a_distribution_with_a_background_floor():
    img = _sparse_volume()
    out = ForegroundWeightd("image", "w", background_share=0.25)({"image": img})
    w = out["w"]
    assert w.shape == img.shape
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-5)
    # every voxel keeps at least the uniform share b / N, and the bright voxels get far more
    assert float(w.min()) >= 0.25 / img.numel() * (1 - 1e-5)
    assert float(w[img > 0].mean()) > 20 * float(w[img == 0].mean())
    # the image itself is left as it was
    assert torch.equal(out["image"], img)


def test_empty_image_and_share_one_give_uniform_maps_and_bad_shares_are_refused():
    zero = torch.zeros(1, 8, 8, 8)
    w0 = ForegroundWeightd("image", "w", background_share=0.25)({"image": zero})["w"]
    w1 = ForegroundWeightd("image", "w", background_share=1.0)({"image": _sparse_volume()})["w"]
    for w in (w0, w1):
        assert torch.allclose(w, torch.full_like(w, 1.0 / w.numel()))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="background_share"):
            ForegroundWeightd("image", "w", background_share=bad)


def test_a_background_offset_or_haze_does_not_spread_the_crops():
    """A blurred stack's camera offset / haze is removed with the smoothed image's median, so the map
    of a sparse volume keeps its share on the structure with a constant offset added; without the
    subtraction the offset flattens it towards uniform."""
    img = _sparse_volume()
    fg = img > 0
    clean = ForegroundWeightd("image", "w", 0.25)({"image": img})["w"]
    hazy = ForegroundWeightd("image", "w", 0.25)({"image": img + 0.05})["w"]
    kept = ForegroundWeightd("image", "w", 0.25, subtract_background=False)({"image": img + 0.05})["w"]
    assert float(hazy[fg].sum()) == pytest.approx(float(clean[fg].sum()), rel=0.05)  # measured 0.200 vs 0.204
    assert float(hazy[fg].sum()) > 1.5 * float(kept[fg].sum())


def _crops(background_share, n=60, weight_key=None):
    set_determinism(seed=0)
    img = _sparse_volume()
    item = {"image": img}
    if weight_key is not None:
        item[weight_key] = ForegroundWeightd("image", weight_key, background_share)({"image": img})[weight_key]
    pipe = Compose(augment_transforms(("image",), (8, 16, 16), background_share=background_share, weight_key=weight_key))
    out = []
    for _ in range(n):
        r = pipe(dict(item))
        out.append((r[0] if isinstance(r, list) else r)["image"])
    set_determinism(seed=None)
    return out


def test_weighted_crops_hold_more_foreground_than_uniform_ones():
    uniform = foreground_fraction(_crops(None))
    weighted = foreground_fraction(_crops(0.25))
    assert weighted > 2 * uniform


def test_a_precomputed_map_gives_the_same_crops_as_computing_it_per_item():
    per_item = _crops(0.25)
    precomputed = _crops(0.25, weight_key="crop_weight")
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(per_item, precomputed, strict=True))


def test_domain_crops_compute_each_map_once_and_share_it(monkeypatch):
    volumes = CacheDataset([{"image": _sparse_volume(s)} for s in range(3)], transform=None, progress=False)
    calls = []
    original = ForegroundWeightd.__call__

    def counting(self, data):
        calls.append(1)
        return original(self, data)

    monkeypatch.setattr(ForegroundWeightd, "__call__", counting)
    crops = DomainCrops(volumes, (8, 16, 16), background_share=0.25)
    for _ in range(4):
        for i in range(3):
            item = crops[i]
            assert item[0]["image"].shape == (1, 8, 16, 16)
    assert len(calls) == 3
    bigger = crops.with_patch_size((8, 32, 32))
    assert bigger[1][0]["image"].shape == (1, 8, 32, 32)
    assert len(calls) == 3 and bigger.weights is crops.weights
    # the cached map is the map of the cached volume, untouched by cropping
    expected = ForegroundWeightd("image", "w", 0.25)({"image": volumes[2]["image"]})["w"]
    assert torch.equal(torch.as_tensor(crops.weights[2]), torch.as_tensor(expected))


def test_unpaired_dataset_weighted_crops_cache_in_both_domains_and_recrop(tiny_dataset):
    ds = unpaired_dataset(
        str(tiny_dataset / "train" / "sharp"), str(tiny_dataset / "train" / "blurred"),
        length=6, patch_size=(8, 16, 16), background_share=0.25,
    )
    for i in range(6):
        item = ds[i]
        assert item["sharp"].shape == item["blurred"].shape == (1, 8, 16, 16)
    assert 1 <= len(ds.sharp.weights) <= 2 and 1 <= len(ds.blurred.weights) <= 2
    fit = recropped_dataset(ds, length=2, patch_size=(8, 32, 32))
    assert fit.sharp.weights is ds.sharp.weights and fit[0]["blurred"].shape == (1, 8, 32, 32)


def test_cached_maps_are_padded_with_volumes_smaller_than_the_crop():
    small = _sparse_volume(1, shape=(6, 12, 40))
    crops = DomainCrops(CacheDataset([{"image": small}], transform=None, progress=False), (8, 16, 16), background_share=0.25)
    for _ in range(5):
        assert crops[0][0]["image"].shape == (1, 8, 16, 16)
    assert crops.weights[0].shape == small.shape


def test_crop_share_reads_null_and_one_as_uniform_crops_and_refuses_bad_values():
    assert crop_share(None) is None and crop_share(1) is None and crop_share("1.0") is None
    assert crop_share(0.25) == 0.25 and crop_share("0.25") == 0.25 and crop_share(0) == 0.0
    for bad in (-0.1, 1.5, "uniform", [0.25]):
        with pytest.raises(ValueError, match="background_share"):
            crop_share(bad)
    # 1 takes the paper's uniform crop (no map computed, no cache kept)
    crops = DomainCrops(CacheDataset([{"image": _sparse_volume()}], transform=None, progress=False), (8, 16, 16), background_share=1)
    assert crops.weigh is None and crops[0]["image"].shape == (1, 8, 16, 16) and not crops.weights


def test_the_command_line_turns_weighted_crops_off_with_1(tiny_dataset):
    """MONAI's `run` drops an override whose value is None, so `--background_share None` would keep the
    default 0.25; `--background_share 1` reaches both domains' crops as the paper's uniform crops."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    assert update_kwargs({"background_share": 0.25}, background_share=None) == {"background_share": 0.25}
    configs = Path(__file__).resolve().parents[1] / "configs"
    for value, weighted in ((None, True), (1, False)):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in ("common.json", "train.json", "quick.json")])
        parser.update(update_kwargs({}, background_share=value))
        parser["dataset_dir"] = str(tiny_dataset)
        ds = parser.get_parsed_content("train#dataset")
        assert (ds.sharp.weigh is not None) is weighted and (ds.blurred.weigh is not None) is weighted
