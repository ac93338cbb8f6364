"""Checks of the forward model: blur, noise at a target SNR, SNR measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bundle.physics.forward import add_noise, blur, measure_snr, simulate_acquisition
from bundle.physics.phantom import microtubule_phantom
from bundle.physics.psf import born_wolf_psf, gaussian_psf


@pytest.fixture(scope="module")
def blurred():
    sharp = microtubule_phantom((32, 48, 48), seed=0)
    return blur(sharp, born_wolf_psf(shape=(15, 15, 15)))


def test_blur_numpy_and_torch_agree_and_keep_types():
    vol = microtubule_phantom((16, 24, 20), seed=1)
    psf = gaussian_psf(shape=(7, 9, 9))
    out = blur(vol, psf)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == vol.shape
    t = blur(torch.from_numpy(vol)[None, None], torch.from_numpy(psf))
    assert isinstance(t, torch.Tensor) and t.shape == (1, 1, 16, 24, 20)
    np.testing.assert_allclose(t[0, 0].numpy(), out, atol=1e-6)
    t64 = blur(torch.from_numpy(vol).double(), psf)  # numpy PSF with a tensor volume
    assert t64.dtype == torch.float64


def test_blur_delta_gives_psf_and_conserves_flux():
    psf = born_wolf_psf(shape=(11, 11, 11))
    vol = np.zeros((31, 31, 31), np.float32)
    vol[15, 15, 15] = 2.0
    vol[10, 20, 12] = 1.0  # far from the edges: nothing leaves the volume
    out = blur(vol, psf)
    assert out.sum(dtype=np.float64) == pytest.approx(3.0, rel=1e-5)
    single = blur(vol * (vol == 2.0), psf)  # a delta reproduces the PSF around it
    np.testing.assert_allclose(single[10:21, 10:21, 10:21], 2.0 * psf, atol=1e-7)
    assert abs(single.sum(dtype=np.float64) - 2.0 * psf.sum(dtype=np.float64)) < 1e-5
    edge = np.zeros_like(vol)
    edge[0, 15, 15] = 1.0  # at the edge, the zero boundary loses the flux that leaves the volume
    assert blur(edge, psf).sum() < 0.9


def test_blur_psf_larger_than_volume_is_accepted():
    vol = np.ones((5, 6, 7), np.float32)
    out = blur(vol, gaussian_psf(shape=(9, 9, 9)))
    assert out.shape == vol.shape and np.all(out > 0) and np.all(out < 1)


def test_add_noise_large_volume_path_draws_once(blurred, monkeypatch):
    """Above the coupled-draw size, numpy's Poisson sampler is used once: SNR near the target, still Poisson."""
    import bundle.physics.forward as fwd

    monkeypatch.setattr(fwd, "_COUPLED_MAX_VOXELS", 10)
    calls = []
    draw = fwd._draw
    monkeypatch.setattr(fwd, "_draw", lambda *a: calls.append(a[4]) or draw(*a))
    noisy, info = fwd.add_noise(blurred, 10.0, poisson_fraction=1.0, seed=3)
    assert calls == [None]  # one draw, no uniforms (numpy's sampler)
    assert measure_snr(blurred, noisy)["average_snr_db"] == pytest.approx(10.0, abs=0.3)
    counts = noisy * info["photons_per_unit"]
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)


def test_blur_bad_inputs():
    with pytest.raises(ValueError, match="psf"):
        blur(np.zeros((4, 4, 4)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="volume"):
        blur(np.zeros((4, 4)), np.ones((3, 3, 3)))


@pytest.mark.parametrize("snr_db", [5.0, 10.0, 20.0])
@pytest.mark.parametrize("poisson_fraction", [0.0, 0.5, 1.0])
def test_add_noise_hits_target_average_snr(blurred, snr_db, poisson_fraction):
    noisy, info = add_noise(blurred, snr_db, poisson_fraction=poisson_fraction, seed=7)
    assert noisy.shape == blurred.shape and noisy.dtype == np.float32
    measured = measure_snr(blurred, noisy)
    assert measured["average_snr_db"] == pytest.approx(info["average_snr_db"], abs=1e-6)
    assert measured["average_snr_db"] == pytest.approx(snr_db, abs=0.5)
    assert measured["average_snr_db"] == pytest.approx(snr_db, abs=0.02)  # measured: < 0.01 dB over 20 seeds
    assert info["peak_snr_db"] > info["average_snr_db"]
    if poisson_fraction > 0:
        assert noisy.min() >= 0  # clipped at 0 before the Poisson stage
        assert math.isfinite(info["photons_per_unit"])
    else:
        assert noisy.min() < 0  # Gaussian only: negative values kept
        assert info["photons_per_unit"] == math.inf
    assert (info["gaussian_sigma"] == 0) == (poisson_fraction == 1.0)


def test_noise_parts_follow_poisson_fraction(blurred):
    """Pure Poisson noise grows with the signal; pure Gaussian noise does not."""
    bright = blurred > np.quantile(blurred, 0.9)
    dark = blurred < np.quantile(blurred, 0.3)
    ratios = {}
    for f in (0.0, 1.0):
        noise = add_noise(blurred, 10.0, poisson_fraction=f, seed=3)[0] - blurred
        ratios[f] = noise[bright].std() / max(noise[dark].std(), 1e-12)
    assert ratios[0.0] == pytest.approx(1.0, rel=0.2)
    assert ratios[1.0] > 3.0


def test_noise_free_path_is_exact(blurred):
    noisy, info = add_noise(blurred, None, seed=0)
    np.testing.assert_array_equal(noisy, blurred)
    assert noisy is not blurred
    assert info["average_snr_db"] == math.inf and info["gaussian_sigma"] == 0.0
    sim, _ = simulate_acquisition(
        microtubule_phantom((16, 16, 16), seed=0), gaussian_psf(shape=(5, 5, 5)), None
    )
    np.testing.assert_array_equal(
        sim, blur(microtubule_phantom((16, 16, 16), seed=0), gaussian_psf(shape=(5, 5, 5)))
    )


def test_seed_determinism(blurred):
    a, _ = add_noise(blurred, 10.0, seed=11)
    b, _ = add_noise(blurred, 10.0, seed=11)
    c, _ = add_noise(blurred, 10.0, seed=12)
    d, _ = add_noise(blurred, 10.0, seed=np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert not np.array_equal(a, c)


def test_simulate_acquisition_on_phantom():
    sharp = microtubule_phantom((24, 40, 40), seed=5)
    noisy, info = simulate_acquisition(sharp, born_wolf_psf(shape=(15, 15, 15)), 20.0, seed=0)
    assert noisy.shape == sharp.shape and noisy.dtype == np.float32
    assert info["average_snr_db"] == pytest.approx(20.0, abs=0.1)
    assert set(info) == {"average_snr_db", "peak_snr_db", "photons_per_unit", "gaussian_sigma"}


def test_measure_snr_known_values():
    clean = np.full((4, 4, 4), 2.0)
    noisy = clean + np.where(np.indices(clean.shape).sum(0) % 2 == 0, 0.2, -0.2)
    snr = measure_snr(clean, noisy)
    assert snr["average_snr_db"] == pytest.approx(10 * math.log10(4 / 0.04))
    assert snr["peak_snr_db"] == pytest.approx(snr["average_snr_db"])
    assert measure_snr(clean, clean)["average_snr_db"] == math.inf
    with pytest.raises(ValueError, match="shape"):
        measure_snr(clean, clean[:2])


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros((4, 4, 4)), 10.0), {}, "all zero"),
        ((np.ones((4, 4, 4)), 10.0), {"poisson_fraction": 1.5}, "poisson_fraction"),
        ((np.ones((4, 4, 4)), float("nan")), {}, "snr_db"),
        ((np.full((4, 4, 4), np.nan), 10.0), {}, "NaN"),
    ],
)
def test_add_noise_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_noise(*args, **kwargs)
