"""Tests for bundle.physics.measured: bead stack -> centred, resampled, unit-sum PSF."""

from __future__ import annotations

import numpy as np
import pytest

from bundle.io import VolumeError, save_volume
from bundle.physics.measured import border_background, load_measured_psf

SOURCE_VOXEL = (0.25, 0.08, 0.08)  # (z, y, x) µm of the bead stack
SIGMA_UM = (0.6, 0.15, 0.15)  # Gaussian bead image, µm
FWHM_UM = tuple(2.0 * np.sqrt(2.0 * np.log(2.0)) * s for s in SIGMA_UM)
BACKGROUND = 100.0


def _bead_stack(shape=(40, 48, 48), centre=(17.3, 20.6, 28.2), seed=0) -> np.ndarray:
    """Off-centre Gaussian bead (peak 1000) on a background of 100 with noise of std 3."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r2 = sum(((g - c) * v / s) ** 2 for g, c, v, s in zip(grids, centre, SOURCE_VOXEL, SIGMA_UM, strict=True))
    rng = np.random.default_rng(seed)
    return (BACKGROUND + 1000.0 * np.exp(-0.5 * r2) + rng.normal(0, 3.0, shape)).astype(np.float32)


def _fwhm_um(psf: np.ndarray, axis: int, voxel: float) -> float:
    """FWHM in µm of the profile through the centre voxel along ``axis`` (linear interpolation)."""
    index = [s // 2 for s in psf.shape]
    index[axis] = slice(None)
    profile = psf[tuple(index)].astype(np.float64)
    half = profile.max() / 2.0
    above = np.flatnonzero(profile >= half)
    lo, hi = above[0], above[-1]
    left = lo - 1 + (half - profile[lo - 1]) / (profile[lo] - profile[lo - 1])
    right = hi + (profile[hi] - half) / (profile[hi] - profile[hi + 1])
    return float((right - left) * voxel)


@pytest.fixture
def bead_file(tmp_path):
    return save_volume(tmp_path / "bead.tif", _bead_stack(), voxel_size=SOURCE_VOXEL)


@pytest.mark.parametrize(
    "target,shape",
    [((0.15, 0.05, 0.05), (31, 31, 31)), ((0.3, 0.1, 0.1), (21, 17, 19)), ((0.25, 0.08, 0.08), (32, 24, 24))],
)
def test_measured_psf_is_centred_unit_sum_and_keeps_fwhm(bead_file, target, shape):
    psf = load_measured_psf(bead_file, target_voxel_size=target, shape=shape)
    assert psf.shape == shape and psf.dtype == np.float32
    assert psf.sum() == pytest.approx(1.0, abs=1e-5) and psf.min() >= 0
    centre = tuple(s // 2 for s in shape)
    assert np.unravel_index(np.argmax(psf), shape) == centre
    com = np.array([(psf.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(n)).sum()
                    for ax, n in enumerate(shape)]) / psf.sum()  # fmt: skip
    np.testing.assert_allclose(com, centre, atol=0.3)
    for axis in range(3):
        assert _fwhm_um(psf, axis, target[axis]) == pytest.approx(FWHM_UM[axis], rel=0.10)
    # background (10 % of the peak) removed: far from the bead only clipped noise (~0.1 %) is left
    assert psf[0].mean() < 3e-3 * psf.max() and psf[:, :, 0].mean() < 3e-3 * psf.max()


def test_background_matters_and_can_be_given(bead_file):
    target = (0.25, 0.08, 0.08)
    kept = load_measured_psf(bead_file, target_voxel_size=target, background=None)
    assert kept[0].mean() > 0.05 * kept.max()  # without subtraction the offset dominates the edges
    given = load_measured_psf(bead_file, target_voxel_size=target, background=BACKGROUND)
    auto = load_measured_psf(bead_file, target_voxel_size=target)
    np.testing.assert_allclose(given, auto, atol=2e-3 * auto.max())
    assert border_background(_bead_stack()) == pytest.approx(BACKGROUND, abs=1.0)


def test_center_false_keeps_the_stack_centre(tmp_path):
    path = save_volume(tmp_path / "b.tif", _bead_stack(centre=(20, 24, 24)), voxel_size=SOURCE_VOXEL)
    psf = load_measured_psf(path, target_voxel_size=SOURCE_VOXEL, shape=(15, 15, 15), center=False)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (7, 7, 7)
    off = save_volume(tmp_path / "o.tif", _bead_stack(), voxel_size=SOURCE_VOXEL)
    psf = load_measured_psf(off, target_voxel_size=SOURCE_VOXEL, shape=(15, 15, 15), center=False)
    assert np.unravel_index(np.argmax(psf), psf.shape) != (7, 7, 7)


def test_voxel_size_argument_and_missing_voxel_size(tmp_path):
    path = save_volume(tmp_path / "nocal.tif", _bead_stack())  # no calibration in the file
    with pytest.raises(VolumeError, match=r"nocal.tif: the file has no voxel size; pass voxel_size"):
        load_measured_psf(path, target_voxel_size=(0.2, 0.1, 0.1))
    psf = load_measured_psf(path, target_voxel_size=(0.15, 0.05, 0.05), voxel_size=SOURCE_VOXEL)
    assert _fwhm_um(psf, 2, 0.05) == pytest.approx(FWHM_UM[2], rel=0.10)


def test_stack_without_bead_raises(tmp_path):
    path = save_volume(tmp_path / "flat.tif", np.full((8, 9, 10), 50, np.uint16), voxel_size=SOURCE_VOXEL)
    with pytest.raises(VolumeError, match="flat.tif: volume is constant"):
        load_measured_psf(path, target_voxel_size=SOURCE_VOXEL, shape=(5, 5, 5))
    noise = 50 + np.random.default_rng(1).normal(0, 1, (8, 9, 10))
    path = save_volume(tmp_path / "noise.tif", noise, voxel_size=SOURCE_VOXEL)
    with pytest.raises(VolumeError, match=r"noise.tif: nothing above the background \(80.0\)"):
        load_measured_psf(path, target_voxel_size=SOURCE_VOXEL, shape=(5, 5, 5), background=80.0)


def _vectorial_bead(tmp_path, *, shift=(0, 0, 0), n_sample=1.515, seed=None):
    """An aberrated (n_sample != immersion) vectorial bead, peak at voxel 24 + shift, peak 15000 over 100."""
    psfmodels = pytest.importorskip("psfmodels")
    zv = (np.arange(64) - 32) * 0.1
    params = {"NA": 1.4, "ni": 1.515, "ni0": 1.515, "ns": n_sample}
    raw = np.asarray(psfmodels.vectorial_psf(zv=zv, nx=65, dxy=0.1, pz=1.0, wvl=0.52, params=params))
    peak = np.unravel_index(np.argmax(raw), raw.shape)
    start = [p - 24 - s for p, s in zip(peak, shift, strict=True)]
    raw = raw[tuple(slice(a, a + 48) for a in start)]
    stack = raw / raw.max() * 15000.0 + 100.0
    if seed is not None:
        stack = np.random.default_rng(seed).poisson(stack)
    path = save_volume(tmp_path / f"bead_{shift}_{seed}.tif", stack.astype(np.float32), voxel_size=(0.1, 0.1, 0.1))
    crop = tuple(slice(24 + s - 15, 24 + s + 16) for s in shift)
    return path, np.clip(raw[crop], 0, None)


def test_an_already_centred_aberrated_bead_keeps_its_kernel(tmp_path):
    """The centre is the peak, not the centre of mass (0.988 for an aberrated bead): re-centring keeps the kernel."""
    from bundle.physics.psf import psf_correlation

    path, raw = _vectorial_bead(tmp_path, n_sample=1.38, seed=0)
    psf = load_measured_psf(path, target_voxel_size=(0.1, 0.1, 0.1), shape=(31, 31, 31))
    assert psf_correlation(psf, raw) >= 0.99
    assert np.unravel_index(np.argmax(psf), psf.shape) == (15, 15, 15)
    near = np.abs(np.indices(psf.shape) - 15).max(axis=0) <= 3
    assert np.all(psf[near] > 0)  # no holes next to the centre


def test_a_known_shift_is_recovered_exactly(tmp_path):
    centred, _ = _vectorial_bead(tmp_path)
    shifted, _ = _vectorial_bead(tmp_path, shift=(3, -4, 5))
    a = load_measured_psf(centred, target_voxel_size=(0.1, 0.1, 0.1), shape=(31, 31, 31), background=100.0)
    b = load_measured_psf(shifted, target_voxel_size=(0.1, 0.1, 0.1), shape=(31, 31, 31), background=100.0)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
