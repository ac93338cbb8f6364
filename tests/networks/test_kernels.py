"""Checks of the PSF kernels (bundle.networks.kernels): the stored and Born & Wolf kernels, the
vectorial kernel, choice by ``_target_`` in the configs, and checkpoints written before the kernels
became modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.networks import PSFLayer
from bundle.networks.kernels import (
    BornWolfKernel,
    ConstrainedKernel,
    FixedKernel,
    FreeKernel,
    VectorialPSFKernel,
    initial_psf,
    make_kernel,
)
from bundle.physics.psf import born_wolf_psf, born_wolf_psf_torch, psf_correlation, vectorial_psf
from bundle.physics.pupil import vectorial_psf_torch


# ----------------------------------------------------------------------------------------------
# stored kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FixedKernel, FreeKernel, ConstrainedKernel])
def test_stored_kernels_start_from_the_given_psf(cls):
    psf = born_wolf_psf((9, 9, 9), na=1.2)
    kernel = cls(psf=psf, shape=(9, 9, 9))
    torch.testing.assert_close(kernel(), torch.from_numpy(psf), rtol=0, atol=1e-6)
    trainable = [p for p in kernel.parameters() if p.requires_grad]
    assert len(trainable) == (0 if cls is FixedKernel else 1)
    kernel.mirror_z_()
    torch.testing.assert_close(kernel(), torch.from_numpy(psf).flip(0), rtol=0, atol=1e-6)
    assert kernel.physical_parameters() == {}


def test_initial_psf_crops_pads_normalises_and_reads_files(tmp_path):
    from bundle.io import save_volume

    big = np.zeros((11, 11, 11), np.float32)
    big[5, 5, 5], big[5, 5, 6] = 3.0, 1.0
    out = initial_psf(big, (5, 5, 5), (0.1, 0.1, 0.1))
    assert out.shape == (5, 5, 5) and out[2, 2, 2] == pytest.approx(0.75) and out.sum() == pytest.approx(1.0)
    padded = initial_psf(out, (7, 6, 7), (0.1, 0.1, 0.1))
    assert padded.shape == (7, 6, 7) and padded[3, 3, 3] == pytest.approx(0.75)
    path = tmp_path / "psf.tif"
    save_volume(path, big, voxel_size=(0.2, 0.1, 0.1))
    with pytest.warns(UserWarning, match="differs from voxel_size"):
        from_file = FixedKernel(psf=str(path), shape=(5, 5, 5), voxel_size=(0.1, 0.1, 0.1))
    np.testing.assert_allclose(from_file().numpy(), out, atol=1e-7)
    with pytest.raises(ValueError, match="all zero"):
        initial_psf(np.zeros((3, 3, 3)), (3, 3, 3), (0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="3D stack"):
        initial_psf(np.ones((3, 3)), (3, 3, 3), (0.1, 0.1, 0.1))


def test_constrained_kernel_stays_a_distribution_while_learning():
    kernel = ConstrainedKernel(shape=(5, 5, 5))  # a Gaussian start
    opt = torch.optim.Adam(kernel.parameters(), lr=0.5)
    target = torch.rand(5, 5, 5)
    for _ in range(5):
        opt.zero_grad()
        (kernel() - target).pow(2).sum().backward()
        opt.step()
    h = kernel()
    assert (h >= 0).all() and h.sum().item() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Born & Wolf kernel
# ----------------------------------------------------------------------------------------------
def test_born_wolf_kernel_renders_learns_and_mirrors():
    kernel = BornWolfKernel((9, 9, 9), na=1.2, defocus=0.1, learn=("na", "defocus"))
    torch.testing.assert_close(
        kernel(), born_wolf_psf_torch(1.2, shape=(9, 9, 9), voxel_size=(0.1,) * 3, defocus=0.1), rtol=0, atol=1e-6
    )
    assert {n for n, p in kernel.named_parameters()} == {"na_raw", "defocus_raw"}
    assert set(dict(kernel.named_buffers())) == {"wavelength_raw", "axial_scale_raw"}
    kernel.set_na_(1.0)
    assert kernel.physical_parameters()["na"] == pytest.approx(1.0, abs=1e-6)
    kernel.mirror_z_()
    assert kernel.physical_parameters()["defocus"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="unknown parameter"):
        BornWolfKernel((9, 9, 9), learn=("spherical",))
    with pytest.raises(ValueError, match="na must satisfy"):
        BornWolfKernel((9, 9, 9), na=1.6, n_immersion=1.5)


def test_make_kernel_names_and_refuses_stray_arguments():
    assert isinstance(make_kernel("fixed", (5, 5, 5)), FixedKernel)
    assert isinstance(make_kernel("vectorial", (5, 5, 5), na=1.2, n_immersion=1.515), VectorialPSFKernel)
    with pytest.raises(ValueError, match="stored kernel"):
        make_kernel("parametric", (5, 5, 5), init="born_wolf")
    with pytest.raises(ValueError, match="unknown parameterization"):
        make_kernel("learned")


# ----------------------------------------------------------------------------------------------
# the configs choose the kernel by _target_; old checkpoints load
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,cls",
    [
        ([], BornWolfKernel),
        (["configs/psf_vectorial.json"], VectorialPSFKernel),
        (["configs/psf_constrained.json"], ConstrainedKernel),
        (["configs/psf_free.json"], FreeKernel),
        (["configs/train_nonblind.json"], FixedKernel),
    ],
)
def test_configs_choose_the_kernel_by_target(tmp_path, extra, cls):
    from bundle.io import save_volume

    psf = born_wolf_psf((31, 31, 31), na=1.1)
    save_volume(tmp_path / "psf.tif", psf, voxel_size=(0.1, 0.1, 0.1))
    parser = ConfigParser()
    parser.read_config(["configs/common.json", "configs/train.json", *extra])
    parser["dataset_dir"] = str(tmp_path)
    parser["psf_init_na"] = 1.1
    blur = parser.get_parsed_content("blur")
    assert isinstance(blur, PSFLayer) and type(blur.kernel_module) is cls
    assert blur.kernel_size == (31, 31, 31) and blur.voxel_size == tuple(parser.get_parsed_content("voxel_size"))
    if cls is not VectorialPSFKernel:  # every other start is Born & Wolf at NA 1.1
        assert psf_correlation(blur.kernel().detach(), psf) > 0.9999


def test_config_learns_the_depth_with_the_sample_index(tmp_path):
    parser = ConfigParser()
    parser.read_config(["configs/common.json", "configs/train.json", "configs/psf_vectorial.json"])
    parser.update({"dataset_dir": str(tmp_path), "n_immersion": 1.515, "n_sample": 1.33, "psf_init_na": 1.4})
    parser.update({"psf_depth": 1.5, "psf_learn": ["depth"]})
    kernel = parser.get_parsed_content("blur").kernel_module
    assert [n for n, _ in kernel.named_parameters()] == ["depth_raw"]
    assert kernel.physical_parameters()["depth"] == pytest.approx(1.5)
    assert kernel.na.item() == pytest.approx(0.99 * 0.9999 * 1.33, abs=1e-4)  # the objective's 1.4, capped


def test_checkpoints_from_before_the_kernel_modules_load():
    layer = PSFLayer.build((7, 7, 7), "parametric", na=1.1)
    legacy = {"na_raw": torch.tensor(0.5), "wavelength_raw": torch.tensor(math.log(0.6)),
              "axial_scale_raw": torch.tensor(0.0), "defocus_raw": torch.tensor(0.0),
              "gain": torch.tensor(2.0), "offset": torch.tensor(0.1)}
    layer.load_state_dict(legacy)
    assert layer.physical_parameters()["na"] == pytest.approx(1.5 * torch.sigmoid(torch.tensor(0.5)).item())
    assert layer.physical_parameters()["wavelength"] == pytest.approx(0.6) and float(layer.gain.detach()) == 2.0
    fixed = PSFLayer.build((5, 5, 5), "fixed")
    old = torch.rand(5, 5, 5)
    fixed.load_state_dict({"fixed_kernel": old, "gain": torch.tensor(1.0), "offset": torch.tensor(0.0)})
    torch.testing.assert_close(fixed.kernel(), old)


# ----------------------------------------------------------------------------------------------
# VectorialPSFKernel
# ----------------------------------------------------------------------------------------------
def test_kernel_renders_the_model_and_reports_parameters():
    kernel = VectorialPSFKernel((11, 12, 13), na=1.25, n_immersion=1.515, wavelength=0.52, spherical=0.1)
    torch.testing.assert_close(
        kernel(), vectorial_psf_torch((11, 12, 13), 1.25, 1.515, 0.52, spherical=0.1), rtol=1e-4, atol=1e-7
    )
    assert kernel.physical_parameters() == pytest.approx(
        dict(na=1.25, wavelength=0.52, spherical=0.1, secondary_spherical=0.0, defocus=0.0, depth=0.0), abs=1e-6
    )
    assert sorted(n for n, _ in kernel.named_parameters()) == ["na_raw", "spherical_raw"]
    assert {"wavelength_raw", "defocus_raw", "secondary_spherical_raw"} <= set(kernel.state_dict())
    assert "depth_raw" not in kernel.state_dict()  # only with a depth: older checkpoints still load
    assert kernel.double()().dtype == torch.float64


def test_kernel_parameters_stay_in_bounds():
    kernel = VectorialPSFKernel(
        (9, 9, 9), na=1.2, n_immersion=1.515, learn=("na", "spherical"), na_bounds=(1.0, 1.515)
    )
    with torch.no_grad():
        kernel.na_raw.fill_(80.0)
        kernel.spherical_raw.fill_(-80.0)
    assert 1.0 < kernel.na.item() < 1.515
    assert kernel.spherical.item() == pytest.approx(-2.0)
    h = kernel()
    assert torch.isfinite(h).all() and h.sum().item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        kernel.na_raw.fill_(-80.0)
    assert kernel.na.item() == pytest.approx(1.0)


def test_sample_index_caps_the_learned_na():
    """A fluorophore in water under an oil objective: the effective NA is at most the sample's index."""
    kernel = VectorialPSFKernel((9, 9, 9), na=1.4, n_immersion=1.515, n_sample=1.33, learn=("na",))
    assert kernel.na_bounds[1] == pytest.approx(1.33, abs=2e-4)
    assert 1.3 < kernel.na.item() < 1.33  # the data sheet's 1.4 starts just below the cap
    with torch.no_grad():
        kernel.na_raw.fill_(80.0)
    assert kernel.na.item() <= 1.33
    assert torch.isfinite(kernel()).all()
    with pytest.raises(ValueError, match="na_bounds"):
        kernel.set_na_(1.35)
    uncapped = VectorialPSFKernel((9, 9, 9), na=1.2, n_immersion=1.515, n_sample=1.6)  # denser sample: no cap
    assert uncapped.na_bounds == VectorialPSFKernel((9, 9, 9), na=1.2, n_immersion=1.515).na_bounds
    assert uncapped.na.item() == pytest.approx(1.2, abs=1e-5)
    with pytest.raises(ValueError, match="n_sample"):
        VectorialPSFKernel((9, 9, 9), na=1.2, n_immersion=1.515, n_sample=0.0)


def test_kernel_fit_recovers_na_of_psfmodels():
    """60 Adam steps from NA 1.2 to a psfmodels NA 1.35 kernel (measured: NA 1.346, 0.2 s on one idle core).

    Not the same model: psfmodels interpolates its radial profile and integrates θ by Simpson's rule.
    """
    shape = (17, 17, 17)
    target = torch.from_numpy(vectorial_psf(shape, na=1.35, n_immersion=1.515, wavelength=0.52))
    kernel = VectorialPSFKernel(shape, na=1.2, n_immersion=1.515, wavelength=0.52, learn=("na", "spherical"))
    opt = torch.optim.Adam(kernel.parameters(), lr=2e-2)
    for _ in range(60):
        opt.zero_grad()
        (((kernel() - target) ** 2).sum() / (target**2).sum()).backward()
        opt.step()
    found = kernel.physical_parameters()
    assert abs(found["na"] - 1.35) < 0.03, found
    assert abs(found["spherical"]) < 0.02, found
    assert psf_correlation(kernel(), target) > 0.999


def test_kernel_learns_the_depth_of_an_index_mismatch():
    """The source depth of a psfmodels PSF (oil objective, water sample, 2 µm deep) learned from 0.5 µm
    with the NA at the sample's cap: measured 2.62 µm after 40 Adam steps, correlation 0.996 (the
    least-squares optimum of this small crop lies near 2.6 µm: the model's amplitudes are those of a
    homogeneous medium; on 31³ voxels the correlation peaks at 2.0-2.25 µm)."""
    shape = (21, 15, 15)
    optics = dict(na=1.4, n_immersion=1.515, wavelength=0.52, n_sample=1.33)
    target = torch.from_numpy(vectorial_psf(shape, depth=2.0, **optics))
    kernel = VectorialPSFKernel(shape, depth=0.5, learn=("depth",), **optics)
    assert [n for n, _ in kernel.named_parameters()] == ["depth_raw"]
    start = psf_correlation(kernel(), target)
    opt = torch.optim.Adam(kernel.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        (((kernel() - target) ** 2).sum() / (target**2).sum()).backward()
        opt.step()
    found = kernel.physical_parameters()["depth"]
    assert abs(found - 2.0) < 0.75, found
    assert psf_correlation(kernel(), target) > max(0.99, start)
    mirrored = kernel.mirror_z_().physical_parameters()["depth"]
    assert mirrored == pytest.approx(-found)
    with pytest.raises(ValueError, match="n_sample"):
        VectorialPSFKernel(shape, na=1.2, n_immersion=1.515, learn=("na", "depth"))


def test_residual_is_frozen_until_released_then_learns():
    torch.manual_seed(0)
    kernel = VectorialPSFKernel((9, 9, 9), na=1.2, n_immersion=1.515, learn=("na",), residual=True)
    logits0 = kernel.residual_logits.detach().clone()
    target = vectorial_psf_torch((9, 9, 9), 1.2, 1.515, 0.5).detach()
    target = torch.nn.functional.avg_pool3d(target[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    opt = torch.optim.Adam(kernel.parameters(), lr=5e-2)

    def step():
        opt.zero_grad()
        ((kernel() - target) ** 2).sum().backward()
        opt.step()

    torch.testing.assert_close(kernel(), kernel.optical_kernel())  # no effect before release
    step()
    assert kernel.residual_logits.grad is None
    torch.testing.assert_close(kernel.residual_logits.detach(), logits0, rtol=0, atol=0)
    kernel.release_residual()
    assert kernel.physical_parameters()["residual_centre"] == pytest.approx(1.0, abs=2e-4)
    assert (kernel() - kernel.optical_kernel()).abs().max() < 1e-3 * kernel().max()  # starts as identity
    for _ in range(5):
        step()
    assert kernel.residual_logits.grad is not None
    assert not torch.equal(kernel.residual_logits.detach(), logits0)
    h = kernel()
    assert (h >= 0).all() and h.sum().item() == pytest.approx(1.0, abs=1e-5)
    q = kernel.residual_kernel()
    assert (q >= 0).all() and q.sum().item() == pytest.approx(1.0, abs=1e-5)
    # the released state is part of the state dict
    fresh = VectorialPSFKernel((9, 9, 9), na=1.0, n_immersion=1.515, learn=("na",), residual=True)
    fresh.load_state_dict(kernel.state_dict())
    assert fresh.released
    torch.testing.assert_close(fresh(), kernel())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learn=("na", "tilt")), "learn"),
        (dict(na=1.2, na_bounds=(1.3, 1.5)), "na_bounds"),
        (dict(na_bounds=(0.5, 1.6)), "na_bounds"),
        (dict(spherical=2.5), "aberration_bound"),
        (dict(residual=True, residual_size=(3, 4, 3)), "residual_size"),
        (dict(residual=True, residual_size=(11, 3, 3)), "larger than the kernel"),
        (dict(na=1.6), "na"),
    ],
)
def test_kernel_bad_arguments(kwargs, match):
    args = dict(shape=(9, 9, 9), na=1.2, n_immersion=1.515)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        VectorialPSFKernel(**args)
    with pytest.raises(RuntimeError, match="residual"):
        VectorialPSFKernel((9, 9, 9), na=1.2, n_immersion=1.515).release_residual()
