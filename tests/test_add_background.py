"""scripts/add_background.py: a copy of a simulated dataset whose blurred volumes carry a smooth background."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import add_background as ab  # noqa: E402


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_background_is_added_to_blurred_volumes_only(tiny_dataset, tmp_path):
    before = _snapshot(tiny_dataset)
    out = tmp_path / "bg"
    manifest = ab.add_background(tiny_dataset, out, amplitude=0.5, length=(4, 8, 8), seed=1, progress=False)
    assert _snapshot(tiny_dataset) == before  # the input is never written
    copied = _snapshot(out)
    blurred = {r["blurred"] for r in manifest["volumes"] if "blurred" in r}
    assert len(blurred) == 4  # 2 training, 1 validation, 1 test
    for rel, data in before.items():
        if rel == "dataset.json":
            continue
        assert (copied[rel] == data) == (rel not in blurred), rel  # sharp, truths and PSF unchanged
    for rec in (r for r in manifest["volumes"] if "blurred" in r):
        old, new = (tifffile.imread(root / rec["blurred"]).astype(np.float64) for root in (tiny_dataset, out))
        extra = new.mean() - old.mean()  # noise is zero-mean (clipping aside): the difference is the background
        assert extra == pytest.approx(rec["background"]["mean"], rel=0.1)
        assert rec["background"]["mean"] > rec["background"]["signal_mean"] > 0
        assert rec["background"]["signal_snr_db"] < rec["noise"]["average_snr_db"]  # its shot noise adds
    saved = json.loads((out / "dataset.json").read_text())
    assert saved["background"]["amplitude"] == 0.5 and "background" in saved["description"]
    assert not list(tmp_path.glob(".bg.*"))  # no temporary folder left


def test_smooth_background_range_and_smoothness():
    rng = np.random.default_rng(0)
    field = ab.smooth_background((16, 64, 64), (4, 8, 8), rng)
    assert field.min() == pytest.approx(0.2) and field.max() == pytest.approx(1.0)
    rough = np.abs(np.diff(rng.uniform(size=(16, 64, 64)), axis=2)).mean()
    assert np.abs(np.diff(field, axis=2)).mean() < 0.1 * rough


def test_refuses_an_existing_output_and_a_folder_without_manifest(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert ab.main(["--dataset_dir", str(tiny_dataset), "--output", str(out)]) == 1
    assert "taken: exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ab.add_background(tmp_path / "taken", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_hot_pixels_are_lines_along_z_with_offsets_in_range():
    rng = np.random.default_rng(3)
    hot = ab.hot_pixels((8, 32, 40), 0.01, 0.1, 1.0, rng)
    plane = hot[0]
    assert np.count_nonzero(plane) == round(0.01 * 32 * 40)
    assert (hot == plane[None]).all()  # one camera pixel records every plane: constant along Z
    values = plane[plane > 0]
    assert values.min() >= 0.1 and values.max() <= 1.0 and values.std() > 0


def test_hot_pixels_only_copy(tiny_dataset, tmp_path):
    out = tmp_path / "hot"
    manifest = ab.add_background(tiny_dataset, out, amplitude=0.0, seed=2, progress=False, hot_fraction=0.02, hot_range=(0.5, 1.0))
    for rec in (r for r in manifest["volumes"] if "blurred" in r):
        old, new = (tifffile.imread(root / rec["blurred"]).astype(np.float64) for root in (tiny_dataset, out))
        _, y, x = new.shape
        assert rec["background"]["hot_pixels"] == round(0.02 * y * x) > 0
        # a hot pixel's (Y, X) column is bright in every plane: over Z the median difference to the copy without
        # hot pixels (another noise draw) is >= 0.5 max(h*x) there and about 0 in every other column
        lifted = np.median(new - old, axis=0) > 0.25 * np.percentile(old, 99.9)
        assert int(lifted.sum()) == rec["background"]["hot_pixels"]
    saved = json.loads((out / "dataset.json").read_text())
    assert saved["background"]["hot_fraction"] == 0.02 and "hot pixels" in saved["description"]
    with pytest.raises(ValueError, match="hot_fraction"):
        ab.add_background(tiny_dataset, tmp_path / "bad", amplitude=0.0, hot_fraction=1.5, progress=False)
    assert not (tmp_path / "bad").exists()
