"""The Poisson–Gaussian noise estimate recovers known camera parameters on simulated stacks."""

import numpy as np
import pytest
import torch

from bundle.physics.forward import blur
from bundle.physics.noise_estimation import estimate_poisson_gaussian
from bundle.physics.phantom import microtubule_phantom
from bundle.physics.psf import born_wolf_psf


@pytest.fixture(scope="module")
def clean():
    b = blur(microtubule_phantom((32, 96, 96), seed=0), born_wolf_psf(shape=(31, 31, 31))).astype(np.float64)
    return b / np.percentile(b, 99.9)


@pytest.mark.parametrize("photons,sigma", [(200.0, 0.02), (1000.0, 0.005), (50.0, 0.05)])
def test_recovers_gain_and_read_noise_within_10_percent(clean, photons, sigma):
    rng = np.random.default_rng(1)
    offset = 0.1  # a camera offset: no clipping at zero
    noisy = rng.poisson(photons * (clean + offset)) / photons + sigma * rng.standard_normal(clean.shape)
    est = estimate_poisson_gaussian(noisy.astype(np.float32))
    assert est["photons_per_unit"] == pytest.approx(photons, rel=0.1)
    assert est["gaussian_sigma"] == pytest.approx(sigma, rel=0.1)


def test_pure_shot_and_pure_read_noise(clean):
    rng = np.random.default_rng(2)
    shot = estimate_poisson_gaussian(rng.poisson(500.0 * (clean + 0.1)) / 500.0)
    assert shot["photons_per_unit"] == pytest.approx(500.0, rel=0.1)
    assert shot["gaussian_sigma"] < 0.01
    read = estimate_poisson_gaussian(torch.from_numpy(clean + 0.01 * rng.standard_normal(clean.shape))[None, None])
    assert read["gaussian_sigma"] == pytest.approx(0.01, rel=0.1)
    assert read["photons_per_unit"] > 1e4  # no real shot noise


def test_bad_inputs():
    with pytest.raises(ValueError, match="5 planes"):
        estimate_poisson_gaussian(np.zeros((4, 64, 64)))
    with pytest.raises(ValueError, match="voxels"):
        estimate_poisson_gaussian(np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match="3D"):
        estimate_poisson_gaussian(np.zeros((64, 64)))
