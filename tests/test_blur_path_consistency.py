"""scripts/blur_path_consistency.py: per-volume normalisation breaks the blur path's single gain; one range per domain does not."""

import sys

import numpy as np

from bundle.io import save_volume
from bundle.physics.forward import blur
from bundle.physics.psf import gaussian_psf

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from blur_path_consistency import consistency  # noqa: E402


def test_per_volume_percentiles_give_each_stack_its_own_gain(tmp_path):
    rng = np.random.default_rng(0)
    psf = gaussian_psf((9, 9, 9), voxel_size=(0.1, 0.1, 0.1), fwhm=(0.4, 0.2, 0.2))
    save_volume(tmp_path / "psf.tif", psf)
    for i, n_points in enumerate((3, 60)):  # sparse and crowded: overlapping blur raises the top percentile
        x = np.zeros((16, 32, 32), np.float32)
        x[tuple(rng.integers(2, 14, n_points)), tuple(rng.integers(2, 30, n_points)), tuple(rng.integers(2, 30, n_points))] = 1.0
        x[0, 0, 0] = 0.0
        y = np.asarray(blur(x, psf)) + 0.001 * rng.standard_normal(x.shape).astype(np.float32) + 0.01
        save_volume(tmp_path / "truth" / f"s{i}.tif", x)
        save_volume(tmp_path / "blurred" / f"s{i}.tif", y.astype(np.float32))
    result = consistency(str(tmp_path / "blurred"), str(tmp_path / "truth"), str(tmp_path / "psf.tif"))
    per_volume = [s["gain"] for s in result["volume"]["per_stack"]]
    per_domain = [s["gain"] for s in result["dataset"]["per_stack"]]
    assert max(per_volume) / min(per_volume) > 1.3  # the crowded stack's percentiles squeeze it
    assert max(per_domain) / min(per_domain) < 1.05
    assert result["volume"]["common_over_per_stack_residual"] > 2.0
    assert result["dataset"]["common_over_per_stack_residual"] < 1.2
