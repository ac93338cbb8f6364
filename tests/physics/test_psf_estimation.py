from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bundle.handlers import BlurCalibration
from bundle.networks import PSFLayer
from bundle.networks.kernels import VectorialPSFKernel
from bundle.ops import fft_convolve
from bundle.physics.phantom import vesicle_phantom
from bundle.physics.psf import psf_correlation
from bundle.physics.psf_estimation import SpectralPSFFit, welch_power_spectrum

OPTICS = {"n_immersion": 1.515, "wavelength": 0.52, "voxel_size": (0.1, 0.1, 0.1)}


def _crops(kernel: torch.Tensor, n: int = 12, size: int = 32, seed: int = 0, sigma: float = 2e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpaired sharp and blurred crops ``(n, 1, size, size, size)``: other phantoms in each domain."""
    g = torch.Generator().manual_seed(seed)

    def phantoms(first: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(vesicle_phantom((size,) * 3, n_vesicles=2, n_puncta=12, seed=first + i))
                            for i in range(n)])[:, None].float()  # fmt: skip

    sharp, other = phantoms(seed), phantoms(seed + 1000)
    blurred = fft_convolve(other, kernel.float(), pad_mode="zeros") * 3.0 + 0.05
    return sharp, blurred + sigma * torch.randn(blurred.shape, generator=g)


class _StartedEngine:
    """What BlurCalibration reads of an engine at STARTED: a fresh run (iteration 0)."""

    class state:  # noqa: N801
        iteration = 0


def test_welch_spectrum_of_white_noise_is_flat():
    x = torch.randn(16, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    p = welch_power_spectrum(x)
    assert p.shape == (16, 16, 16)
    inner = p[2:-2, 2:-2, 2:-2]
    assert float(inner.std() / inner.mean()) < 0.35  # flat up to the periodogram's scatter
    torch.testing.assert_close(welch_power_spectrum(x + 100.0), p, rtol=1e-5, atol=1e-3)  # each crop's mean is removed


def test_fit_recovers_the_na_of_a_born_wolf_psf():
    """Blurred by Born & Wolf NA 1.2; the layer starts at NA 0.9 (measured: NA 1.20, 1.5 s)."""
    true = PSFLayer.build(kernel_size=(15, 15, 15), parameterization="parametric", na=1.2, **OPTICS).kernel().detach()
    sharp, blurred = _crops(true)
    blur = PSFLayer.build(kernel_size=(15, 15, 15), parameterization="parametric", na=0.9, **OPTICS)
    record = SpectralPSFFit(steps=60, lr=0.05, na_grid=8)(blur, sharp, blurred)
    assert abs(blur.physical_parameters()["na"] - 1.2) < 0.05, record
    assert record["loss_after"] < record["loss_before"]
    assert psf_correlation(blur.kernel().detach(), true) > 0.99
    assert all(p.grad is None for p in blur.kernel_parameters())  # leaves the training's gradients alone


def test_windowed_fit_removes_the_na_bias_of_the_product_model():
    """Born & Wolf NA 1.4 (immersion 1.515), 12 crops 32³: |H|² times the windowed sharp spectrum reads the
    window's smoothing as a wider transfer (measured: NA 1.489); the blurred crops' own estimator does not
    (NA 1.385, correlation 0.9998). On the microtubule training data the same: 1.496 against 1.37-1.40."""
    true = PSFLayer.build(kernel_size=(15, 15, 15), parameterization="parametric", na=1.4, **OPTICS).kernel().detach()
    sharp, blurred = _crops(true)
    found = {}
    for windowed in (False, True):
        blur = PSFLayer.build(kernel_size=(15, 15, 15), parameterization="parametric", na=1.0, **OPTICS)
        SpectralPSFFit(steps=60, lr=0.05, na_grid=8, windowed=windowed)(blur, sharp, blurred)
        found[windowed] = (blur.physical_parameters()["na"], psf_correlation(blur.kernel().detach(), true))
    assert abs(found[True][0] - 1.4) < 0.03, found
    assert found[False][0] > 1.45, found  # the bias the windowed estimator removes
    assert found[True][1] > 0.999 > found[False][1], found


@pytest.mark.parametrize("sign", [1, -1])
def test_aberration_sign_picks_the_branch(sign):
    """Blurred by the vectorial model with spherical +0.15: the spectrum cannot tell ±, the given sign does.

    48 crops: with 12 the phantoms' spectra scatter enough that the (unbiased, windowed) fit lands at NA
    1.09-1.21 (measured), where the product model's bias happened to cancel the scatter."""
    shape = (15, 15, 15)
    true = VectorialPSFKernel(shape, na=1.3, spherical=0.15, oversample=1, **OPTICS)().detach()
    sharp, blurred = _crops(true, n=48)
    kernel = VectorialPSFKernel(shape, na=1.4, oversample=1, **OPTICS)
    blur = PSFLayer(kernel)
    record = SpectralPSFFit(steps=120, lr=0.05, aberration_sign=sign)(blur, sharp, blurred)
    found = record["after"]
    assert np.sign(found["spherical"]) == sign, record
    assert abs(abs(found["spherical"]) - 0.15) < 0.05, record
    assert abs(found["na"] - 1.3) < 0.06, record
    corr = psf_correlation(blur.kernel().detach(), true)
    if sign == 1:
        assert corr > 0.98
    else:  # the mirror image of the right PSF
        assert psf_correlation(blur.kernel().detach().flip(0), true) > 0.98 and corr < 0.98


def test_without_a_sign_the_aberration_is_left_alone():
    shape = (15, 15, 15)
    true = VectorialPSFKernel(shape, na=1.3, spherical=0.15, oversample=1, **OPTICS)().detach()
    sharp, blurred = _crops(true)
    kernel = VectorialPSFKernel(shape, na=1.4, oversample=1, **OPTICS)
    record = SpectralPSFFit(steps=60, lr=0.05)(PSFLayer(kernel), sharp, blurred)
    assert record["after"]["spherical"] == 0.0 and record["after"]["na"] != pytest.approx(1.4, abs=1e-3)


def _psf_2um_deep() -> tuple[tuple[int, int, int], dict, torch.Tensor]:
    """psfmodels' PSF of an oil objective (NA 1.4) imaging 2 µm deep in water: shape, optics, kernel."""
    from bundle.physics.psf import vectorial_psf

    shape, optics = (21, 15, 15), dict(na=1.4, n_immersion=1.515, wavelength=0.52, n_sample=1.33)
    return shape, optics, torch.from_numpy(vectorial_psf(shape, depth=2.0, **optics))


@pytest.mark.parametrize(("start", "grid"), [(1.0, None), (-1.0, ()), (6.0, None)])
def test_fit_recovers_the_depth_of_an_index_mismatch_with_the_na_given(start, grid):
    """psfmodels' PSF of an oil objective (NA 1.4) 2 µm deep in water; the kernel learns the depth only, its
    NA stays the objective's (capped at water's index). Measured: 2.11 µm from +1, −1 and (with the depth
    grid) +6 µm, correlation 0.993; a negative depth (the mirrored PSF, same spectrum) ends mirrored below
    the coverslip when no grid moves it first."""
    shape, optics, true = _psf_2um_deep()
    sharp, blurred = _crops(true)
    kernel = VectorialPSFKernel(shape, depth=start, learn=("depth",), oversample=1, **optics)
    na = kernel.physical_parameters()["na"]
    record = SpectralPSFFit(steps=120, lr=0.05, **({} if grid is None else {"depth_grid": grid}))(PSFLayer(kernel), sharp, blurred)
    assert record["na_grid"] is None and record["after"]["na"] == pytest.approx(na)
    assert 1.5 < record["after"]["depth"] < 2.6, record
    assert record["mirrored"] == (start < 0)
    assert (record["depth_grid"] is None) == (grid == ())
    assert psf_correlation(kernel().detach(), true) > 0.99


def test_without_the_depth_grid_a_far_start_stalls():
    """The reason for the grid: from 10 µm the gradient fit alone stops in a local minimum (measured 10.63 µm,
    correlation 0.935) where the grid-started fit reaches 2.11 µm (previous test). Where the basin ends
    depends on the numerical stack: with one install a 6 µm start stalled at 4.74 µm, with another (session
    27) it reached 2.15 while 8, 10 and 12 µm stalled at 8.38, 10.63 and 12.88."""
    shape, optics, true = _psf_2um_deep()
    kernel = VectorialPSFKernel(shape, depth=10.0, learn=("depth",), oversample=1, **optics)
    record = SpectralPSFFit(steps=120, lr=0.05, depth_grid=())(PSFLayer(kernel), *_crops(true))
    assert record["after"]["depth"] > 3.5 and psf_correlation(kernel().detach(), true) < 0.99
    with pytest.raises(ValueError, match="depth_grid"):
        SpectralPSFFit(depth_grid=(1.0, -2.0))


def test_mirror_z_is_the_z_flip():
    """Mirroring conjugates the pupil phase: negated aberrations and defocus give the z-flipped PSF."""
    kernel = VectorialPSFKernel((15, 15, 15), na=1.3, spherical=0.2, defocus=0.15, oversample=1, **OPTICS)
    before = kernel().detach()
    kernel.mirror_z_()
    assert kernel.physical_parameters()["spherical"] == pytest.approx(-0.2, abs=1e-6)
    torch.testing.assert_close(kernel().detach(), before.flip(0), atol=1e-6, rtol=1e-4)
    layer = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="fixed", init="gaussian", init_fwhm=(0.5, 0.2, 0.3))
    flipped = layer.kernel().flip(0).clone()
    torch.testing.assert_close(layer.mirror_z_().kernel(), flipped)


def test_bad_input():
    fixed = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="fixed")
    with pytest.raises(ValueError, match="cannot fit the PSF"):
        SpectralPSFFit()(fixed, torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8))
    blur = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="parametric", na=1.0)
    with pytest.raises(ValueError, match="differ in size"):
        SpectralPSFFit()(blur, torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="aberration_sign"):
        SpectralPSFFit(aberration_sign=2)
    with pytest.raises(ValueError, match="rounds"):
        SpectralPSFFit(rounds=0)
    with pytest.raises(ValueError, match="windowed"):
        SpectralPSFFit(windowed="maybe")
    with pytest.raises(ValueError, match="depth_grid"):
        SpectralPSFFit(depth_grid=(1.0, -2.0))


def test_blur_calibration_runs_the_fit_and_records_it(tmp_path):
    true = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="parametric", na=1.2, **OPTICS).kernel().detach()
    sharp, blurred = _crops(true, n=8, size=16)
    dataset = [{"sharp": s, "blurred": b} for s, b in zip(sharp, blurred, strict=True)]
    blur = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="parametric", na=0.9, **OPTICS)
    calib = BlurCalibration(blur=blur, dataset=dataset, n_samples=4, psf_fit=SpectralPSFFit(steps=40, lr=0.05, n_samples=8),
                            record_path=str(tmp_path / "calibration.json"))  # fmt: skip

    calib(_StartedEngine())
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["psf_fit"]["crops"] == [8, 8] and record["psf_fit"]["after"]["na"] > 1.0
    assert record["calibration"]["gain"] > 0
    fixed = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="fixed", na=1.2, **OPTICS)
    calib = BlurCalibration(blur=fixed, dataset=dataset, n_samples=4, psf_fit=SpectralPSFFit(),
                            record_path=str(tmp_path / "fixed.json"))  # fmt: skip
    calib(_StartedEngine())
    assert "psf_fit" not in json.loads((tmp_path / "fixed.json").read_text())  # non-blind: the PSF stays


def test_blur_calibration_fits_the_psf_on_its_own_larger_crops(tmp_path):
    """``fit_dataset`` feeds the fit (larger crops resolve the transfer function better); the
    calibration keeps the training items."""
    true = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="parametric", na=1.2, **OPTICS).kernel().detach()
    small = [{"sharp": s, "blurred": b} for s, b in zip(*_crops(true, n=4, size=16), strict=True)]
    sharp, blurred = _crops(true, n=6, size=24, seed=1)
    large = [{"sharp": s, "blurred": b} for s, b in zip(sharp, blurred, strict=True)]
    blur = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="parametric", na=0.9, **OPTICS)
    calib = BlurCalibration(blur=blur, dataset=small, n_samples=4, fit_dataset=large,
                            psf_fit=SpectralPSFFit(steps=40, lr=0.05, n_samples=6),
                            record_path=str(tmp_path / "calibration.json"))  # fmt: skip

    calib(_StartedEngine())
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["psf_fit"]["crops"] == [6, 6] and record["psf_fit"]["after"]["na"] > 1.0
    assert record["psf_fit"]["bins"] > 9 * 13  # a 24-voxel grid: more bins than 16-voxel crops give
    assert record["calibration"]["gain"] > 0


def test_offset_shift_moves_the_calibrated_offset_and_is_recorded(tmp_path):
    true = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="fixed", na=1.2, **OPTICS).kernel().detach()
    dataset = [{"sharp": s, "blurred": b} for s, b in zip(*_crops(true, n=4, size=16), strict=True)]
    offsets = {}
    for shift in (0.0, -0.19):
        blur = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="fixed", na=1.2, **OPTICS)
        record = tmp_path / f"calibration_{shift}.json"
        BlurCalibration(blur=blur, dataset=dataset, n_samples=4, offset_shift=shift, record_path=str(record))(_StartedEngine())
        offsets[shift] = float(blur.offset.detach())
        assert json.loads(record.read_text())["calibration"]["offset"] == pytest.approx(offsets[shift])
    assert offsets[-0.19] == pytest.approx(offsets[0.0] - 0.19, abs=1e-6)
    assert "offset_shift" in json.loads((tmp_path / "calibration_-0.19.json").read_text())["calibration"]
    assert "offset_shift" not in json.loads((tmp_path / "calibration_0.0.json").read_text())["calibration"]


def test_the_fit_never_ends_worse_than_its_start():
    """Data the kernel family cannot describe (Born & Wolf NA 1.4; a vectorial kernel whose NA the water
    sample caps at 1.33, only its depth fitted): the gradient fit's descent on the corrected product model
    ended above its grid start by the data's own estimator (0.1172 against 0.1146 on the documents' tiny
    dataset, session 32). The start is then kept, and the loss reported never exceeds the first one."""
    from bundle.physics.psf import born_wolf_psf

    shape = (21, 15, 15)
    true = torch.from_numpy(born_wolf_psf(shape, na=1.4, n_immersion=1.515, wavelength=0.52, voxel_size=(0.1, 0.1, 0.1)))
    kernel = VectorialPSFKernel(shape, na=1.4, depth=1.0, learn=("depth",), oversample=1, n_sample=1.33, **OPTICS)
    layer = PSFLayer(kernel)
    record = SpectralPSFFit(steps=60, lr=0.05)(layer, *_crops(true, n=8))
    assert record["loss_after"] <= record["loss_before"] + 1e-12, record
    # not above the grid's best (its record holds its own scale/noise refit: equal within 1e-4 here; 0.159 without the guard)
    assert record["loss_after"] <= record["depth_grid"]["best_loss"] + 1e-3, record
    if record["kept_grid_start"]:  # the kernel is the grid's best depth, not where the descent ended
        assert record["after"]["depth"] == pytest.approx(record["depth_grid"]["best_depth"], abs=1e-6)
    print(f"\nkept the grid start: {record['kept_grid_start']}, loss {record['loss_before']:.4f} -> {record['loss_after']:.4f}")
