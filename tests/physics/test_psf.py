"""Physics checks of the PSF models in bundle.physics.psf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.physics.psf import (
    born_wolf_psf,
    born_wolf_psf_torch,
    fwhm,
    gaussian_psf,
    make_psf,
    psf_correlation,
    scalar_psf,
    vectorial_psf,
)

# fine sampling (20 nm lateral, 50 nm axial) so that a ~180 nm FWHM spans ~9 voxels
FINE_SHAPE = (41, 61, 61)
FINE_VOXEL = (0.05, 0.02, 0.02)
NA, N_I, WL = 1.4, 1.5, 0.5


@pytest.fixture(scope="module")
def fine_psfs():
    kw = dict(shape=FINE_SHAPE, na=NA, n_immersion=N_I, wavelength=WL, voxel_size=FINE_VOXEL)
    return {"born_wolf": born_wolf_psf(**kw), "vectorial": vectorial_psf(**kw), "scalar": scalar_psf(**kw)}


@pytest.mark.parametrize("model", ["born_wolf", "vectorial", "scalar", "gaussian"])
@pytest.mark.parametrize("shape", [(31, 31, 31), (20, 24, 18), (9, 16, 16)])
def test_psf_conventions(model, shape):
    """float32, requested shape, non-negative, sum 1, brightest voxel at s // 2."""
    psf = make_psf(model, shape=shape)
    assert psf.shape == shape
    assert psf.dtype == np.float32
    assert psf.min() >= 0
    assert abs(float(psf.sum(dtype=np.float64)) - 1.0) < 1e-5
    assert np.unravel_index(np.argmax(psf), psf.shape) == tuple(s // 2 for s in shape)


def test_born_wolf_lateral_fwhm_is_textbook(fine_psfs):
    """In-focus lateral FWHM of eq. (23) ~= 0.51 lambda / NA (182 nm), within 10 %."""
    psf = fine_psfs["born_wolf"]
    expected = 0.51 * WL / NA
    for axis in (1, 2):
        assert fwhm(psf, axis=axis, voxel_size=FINE_VOXEL) == pytest.approx(expected, rel=0.10)


def test_born_wolf_axial_fwhm(fine_psfs):
    """Axial FWHM of eq. (23) = 1.772 n lambda / NA^2 (0.678 um here) within 5 %, and in 0.55-0.80 um.

    On axis eq. (23) is sinc^2(pi NA^2 z / (2 n lambda)), half maximum at sinc argument 1.3916.
    Non-paraxial models give ~0.48 um at NA 1.4 (checked below): the paraxial model is ~40 % longer.
    """
    psf = fine_psfs["born_wolf"]
    theory = 4 * 1.39156 / np.pi * N_I * WL / NA**2
    measured = fwhm(psf, axis=0, voxel_size=FINE_VOXEL)
    assert measured == pytest.approx(theory, rel=0.05)
    assert 0.55 < measured < 0.80


@pytest.mark.parametrize("model", ["vectorial", "scalar"])
def test_non_paraxial_models_agree_with_born_wolf_in_focus(fine_psfs, model):
    """Measured: vectorial lateral FWHM 203 nm vs 184 nm (B&W), in-focus NCC 0.991; scalar 184 nm, 0.99999.

    Tolerances: lateral FWHM within 15 %, in-focus NCC > 0.97; their axial FWHM is shorter
    (~0.48 um, 0.40-0.55 accepted) since eq. (23) is paraxial.
    """
    bw, other = fine_psfs["born_wolf"], fine_psfs[model]
    c = FINE_SHAPE[0] // 2
    assert fwhm(other, axis=2, voxel_size=FINE_VOXEL) == pytest.approx(
        fwhm(bw, axis=2, voxel_size=FINE_VOXEL), rel=0.15
    )
    assert psf_correlation(other[c], bw[c]) > 0.97
    assert 0.40 < fwhm(other, axis=0, voxel_size=FINE_VOXEL) < 0.55
    assert psf_correlation(other, bw) > 0.9


@pytest.mark.parametrize("model", ["born_wolf", "vectorial", "scalar"])
def test_symmetric_in_z_and_laterally(model):
    psf = make_psf(model, shape=(21, 21, 21))
    np.testing.assert_allclose(psf, psf[::-1], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(psf, psf[:, ::-1], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(psf, np.swapaxes(psf, 1, 2), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("model", ["born_wolf", "vectorial", "scalar"])
def test_bigger_na_gives_narrower_psf(model):
    widths = [
        (fwhm(p, axis=2, voxel_size=0.02), fwhm(p, axis=0, voxel_size=0.05))
        for p in (
            make_psf(model, na=na, shape=(41, 41, 41), voxel_size=(0.05, 0.02, 0.02)) for na in (0.9, 1.2)
        )
    ]
    assert widths[1][0] < 0.85 * widths[0][0]  # lateral ~ 1 / NA
    assert widths[1][1] < 0.75 * widths[0][1]  # axial ~ 1 / NA^2


def test_born_wolf_even_shape_and_anisotropic_voxels():
    psf = born_wolf_psf(shape=(16, 20, 30), voxel_size=(0.2, 0.05, 0.04))
    assert np.unravel_index(np.argmax(psf), psf.shape) == (8, 10, 15)
    # same physical widths measured along y and x despite different voxel sizes
    assert fwhm(psf, 1, (0.2, 0.05, 0.04)) == pytest.approx(fwhm(psf, 2, (0.2, 0.05, 0.04)), rel=0.08)


def test_born_wolf_defocus_moves_focus():
    psf = born_wolf_psf(shape=(31, 15, 15), defocus=0.5)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (15 + 5, 7, 7)


def test_born_wolf_torch_matches_numpy_and_axial_scale():
    ref = born_wolf_psf(shape=(21, 21, 21))
    t = born_wolf_psf_torch(NA, shape=(21, 21, 21)).numpy()
    np.testing.assert_allclose(t, ref, rtol=1e-3, atol=1e-7)
    short = born_wolf_psf_torch(NA, shape=(41, 21, 21), axial_scale=2.0).numpy()
    long = born_wolf_psf_torch(NA, shape=(41, 21, 21)).numpy()
    assert fwhm(short, 0) == pytest.approx(fwhm(long, 0) / 2, rel=0.05)


def _objective(h: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 2.0, h.numel(), dtype=h.dtype).reshape(h.shape)
    return (h * w).sum() * 1e3


@pytest.mark.parametrize(
    "name,value", [("na", 1.2), ("wavelength", 0.55), ("defocus", 0.13), ("axial_scale", 1.3)]
)
def test_born_wolf_torch_gradient_matches_finite_difference(name, value):
    kw = dict(na=1.2, wavelength=0.5, defocus=0.05, axial_scale=1.0)
    kw[name] = value

    def f(v):
        args = dict(kw, **{name: v})
        na = args.pop("na")
        return _objective(born_wolf_psf_torch(na, shape=(15, 17, 17), dtype=torch.float64, **args))

    p = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    f(p).backward()
    grad = p.grad.item()
    eps = 1e-5
    fd = (f(value + eps).item() - f(value - eps).item()) / (2 * eps)
    assert np.isfinite(grad) and abs(grad) > 1e-6
    assert grad == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_born_wolf_torch_gradient_float32_and_second_order():
    na = torch.tensor(1.3, requires_grad=True)
    h = born_wolf_psf_torch(na)
    assert h.dtype == torch.float32 and h.shape == (31, 31, 31)
    (g,) = torch.autograd.grad(_objective(h), na, create_graph=True)
    assert torch.isfinite(g) and g.abs() > 0
    (g2,) = torch.autograd.grad(g, na)
    assert torch.isfinite(g2)


def test_born_wolf_quadrature_converged():
    a = born_wolf_psf_torch(NA, shape=(31, 41, 41), dtype=torch.float64)
    b = born_wolf_psf_torch(NA, shape=(31, 41, 41), n_rho=1500, dtype=torch.float64)
    assert (a - b).abs().max() < 1e-6 * b.max()


@pytest.mark.parametrize(
    "fw,vs",
    [((0.5, 0.2, 0.2), (0.1, 0.1, 0.1)), ((0.8, 0.3, 0.25), (0.1, 0.05, 0.05)), (0.6, (0.1, 0.1, 0.1))],
)
def test_gaussian_fwhm_matches_request(fw, vs):
    psf = gaussian_psf(shape=(31, 31, 31), fwhm=fw, voxel_size=vs)
    want = (fw,) * 3 if np.isscalar(fw) else fw
    for axis in range(3):
        assert fwhm(psf, axis=axis, voxel_size=vs) == pytest.approx(want[axis], rel=0.05)


def test_fwhm_on_profiles():
    x = np.arange(101.0)
    tri = np.clip(10 - np.abs(x - 50), 0, None)  # half max 5 at 45 and 55
    assert fwhm(tri) == pytest.approx(10.0)
    assert fwhm(tri, voxel_size=0.1) == pytest.approx(1.0)
    g = np.exp(-0.5 * ((x - 40.3) / 4.0) ** 2)
    assert fwhm(g) == pytest.approx(2.3548 * 4.0, rel=0.01)
    assert np.isnan(fwhm(np.ones(10)))  # never falls to half maximum
    with pytest.raises(ValueError, match="axis"):
        fwhm(np.ones((3, 3, 3)))


def test_psf_correlation():
    a = born_wolf_psf(shape=(21, 21, 21))
    assert psf_correlation(a, a) == pytest.approx(1.0)
    big = born_wolf_psf(shape=(31, 31, 31))
    assert psf_correlation(a, big) > 0.999  # central crop of the same model
    assert psf_correlation(torch.from_numpy(a), gaussian_psf(shape=(21, 21, 21))) < 0.99
    assert psf_correlation(a, np.roll(a, 3, axis=2)) < 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(na=1.5, n_immersion=1.5), "na"),
        (dict(na=1.6), "na"),
        (dict(na=-0.1), "na"),
        (dict(voxel_size=(0.1, 0.0, 0.1)), "voxel_size"),
        (dict(voxel_size=(0.1, -0.1, 0.1)), "voxel_size"),
        (dict(wavelength=0.0), "wavelength"),
        (dict(wavelength=500.0), "nanometres"),
        (dict(shape=(31, 31)), "shape"),
        (dict(shape=(0, 31, 31)), "shape"),
    ],
)
@pytest.mark.parametrize("model", ["born_wolf", "vectorial", "scalar"])
def test_bad_parameters_raise(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_psf(model, **kwargs)


def test_other_bad_parameters_raise():
    with pytest.raises(ValueError, match="unknown PSF model"):
        make_psf("airy")
    with pytest.raises(ValueError, match="square lateral"):
        vectorial_psf(voxel_size=(0.1, 0.1, 0.05))
    with pytest.raises(ValueError, match="fwhm"):
        gaussian_psf(fwhm=(0.5, 0.0, 0.2))
    with pytest.raises(ValueError, match="axial_scale"):
        born_wolf_psf_torch(1.2, axial_scale=0.0)
    with pytest.raises(ValueError, match="na"):
        born_wolf_psf_torch(torch.tensor(1.6, requires_grad=True))


def test_vectorial_psf_with_index_mismatch_is_aberrated_and_peaks_at_the_centre():
    pytest.importorskip("psfmodels")
    from bundle.physics.psf import psf_correlation, vectorial_psf

    free = vectorial_psf((31, 31, 31), na=1.4, n_immersion=1.515, wavelength=0.52)
    deep = vectorial_psf((31, 31, 31), na=1.4, n_immersion=1.515, wavelength=0.52, n_sample=1.33, depth=2.0)
    assert np.unravel_index(np.argmax(deep), deep.shape) == (15, 15, 15)
    assert deep.sum() == pytest.approx(1.0, abs=1e-5)
    assert deep.max() < 0.8 * free.max()  # spherical aberration spreads the focus
    axial = deep[:, 15, 15]
    assert np.abs(axial - axial[::-1]).max() > 0.1 * axial.max()  # no longer symmetric in z (0.19 measured)
    free_axial = free[:, 15, 15]
    assert np.abs(free_axial - free_axial[::-1]).max() < 0.01 * free_axial.max()  # control: symmetric
    assert psf_correlation(deep, free) < 0.95
    with pytest.raises(ValueError, match="depth"):
        vectorial_psf((9, 9, 9), depth=-1.0)
