import json
import math

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from bundle.networks.psf_layer import PSFLayer
from bundle.physics.psf import born_wolf_psf_torch, gaussian_psf


def _conv3d_reference(x, h):
    """Direct convolution: conv3d (a cross-correlation) with the flipped kernel, centre k // 2."""
    pads = [p for kk in reversed(h.shape) for p in ((kk - 1) - kk // 2, kk // 2)]
    return F.conv3d(F.pad(x, pads), h.flip(0, 1, 2)[None, None])


@pytest.mark.parametrize("parameterization", ["free", "constrained", "parametric", "fixed"])
@pytest.mark.parametrize("kernel_size", [(7, 7, 7), (6, 8, 5)])
def test_fft_forward_equals_conv3d(parameterization, kernel_size):
    torch.manual_seed(0)
    stored = {"init_fwhm": (0.4, 0.3, 0.3)} if parameterization != "parametric" else {}
    layer = PSFLayer.build(kernel_size=kernel_size, parameterization=parameterization, **stored)
    x = torch.rand(2, 1, 12, 16, 10)
    h = layer.kernel()
    assert h.shape == kernel_size and h.dtype == torch.float32
    with torch.no_grad():
        out = layer(x)
        ref = _conv3d_reference(x, h)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gain_and_offset_are_applied():
    layer = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="fixed", gain=3.0, offset=0.25)
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), 3.0 * _conv3d_reference(x, layer.kernel()) + 0.25, rtol=0, atol=1e-5
        )


def test_constrained_kernel_stays_non_negative_and_normalised_after_a_step():
    torch.manual_seed(0)
    layer = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="constrained")
    opt = torch.optim.Adam(layer.kernel_parameters(), lr=0.5)
    x, target = torch.rand(1, 1, 12, 12, 12), torch.randn(1, 1, 12, 12, 12)
    for _ in range(3):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    h = layer.kernel()
    assert (h >= 0).all()
    assert h.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_free_kernel_receives_gradients_and_starts_from_init():
    layer = PSFLayer.build(
        kernel_size=(7, 7, 7), parameterization="free", init="gaussian", init_fwhm=(0.3, 0.2, 0.2)
    )
    np.testing.assert_allclose(
        layer.kernel().detach().numpy(), gaussian_psf((7, 7, 7), fwhm=(0.3, 0.2, 0.2), voxel_size=(0.1,) * 3)
    )
    layer(torch.rand(1, 1, 8, 8, 8)).pow(2).mean().backward()
    (weight,) = layer.kernel_parameters()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("learn_gain,learn_offset", [(True, True), (False, True), (False, False)])
def test_fixed_has_no_trainable_kernel(learn_gain, learn_offset):
    layer = PSFLayer.build(
        kernel_size=(5, 5, 5), parameterization="fixed", learn_gain=learn_gain, learn_offset=learn_offset
    )
    assert list(layer.kernel_parameters()) == []
    assert not layer.kernel().requires_grad
    assert len(list(layer.scale_parameters())) == int(learn_gain) + int(learn_offset)
    assert len(list(layer.parameters())) == int(learn_gain) + int(learn_offset)
    assert "kernel_module.psf" in layer.state_dict() and "gain" in layer.state_dict()


def test_parametric_parameters_and_na_gradient():
    layer = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="parametric", na=1.2, learn_defocus=True)
    assert layer.physical_parameters() == pytest.approx(
        {"na": 1.2, "wavelength": 0.5, "axial_scale": 1.0, "defocus": 0.0, "gain": 1.0, "offset": 0.0},
        abs=1e-6,
    )
    assert len(list(layer.kernel_parameters())) == 2  # NA and defocus
    torch.testing.assert_close(
        layer.kernel(), born_wolf_psf_torch(1.2, shape=(9, 9, 9), voxel_size=(0.1,) * 3), rtol=0, atol=1e-6
    )
    torch.manual_seed(0)
    x = torch.rand(1, 1, 12, 12, 12)
    (layer(x) - x).pow(2).mean().backward()
    grad = layer.kernel_module.na_raw.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs() > 0


def test_parametric_fit_moves_na_toward_truth():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 24, 24, 24)
    h_true = born_wolf_psf_torch(1.2, shape=(15, 15, 15), voxel_size=(0.1, 0.1, 0.1))
    y = _conv3d_reference(x, h_true)
    layer = PSFLayer.build(
        kernel_size=(15, 15, 15), parameterization="parametric", na=0.9, learn_gain=False, learn_offset=False
    )
    opt = torch.optim.Adam(layer.kernel_parameters(), lr=2e-2)
    for _ in range(40):
        opt.zero_grad()
        (layer(x) - y).pow(2).mean().backward()
        opt.step()
    na = layer.physical_parameters()["na"]
    assert abs(na - 1.2) < 0.5 * abs(0.9 - 1.2), na


def test_calibrate_sets_gain_and_offset():
    torch.manual_seed(0)
    layer = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="fixed", init_fwhm=(0.3, 0.2, 0.2))
    sharp = (torch.rand(2, 1, 16, 16, 16) > 0.97).float()
    blurred_truth = 20.0 * _conv3d_reference(sharp, layer.kernel()) + 0.1
    result = layer.calibrate(sharp, blurred_truth, low_percentile=0.0, high_percentile=100.0)
    assert result["offset"] == pytest.approx(blurred_truth.min().item(), rel=1e-5)
    assert result["gain"] == pytest.approx(20.0, rel=1e-4)
    assert layer.physical_parameters()["gain"] == pytest.approx(20.0, rel=1e-4)
    # percentiles: the stated formula on a different data set
    blurred = torch.rand(1, 1, 16, 16, 16)
    result = layer.calibrate(sharp, blurred)
    hx = _conv3d_reference(sharp, layer.kernel())
    expected_offset = float(np.percentile(blurred.numpy(), 1.0))
    expected_gain = (float(np.percentile(blurred.numpy(), 99.9)) - expected_offset) / float(
        np.percentile(hx.numpy(), 99.9)
    )
    assert result["offset"] == pytest.approx(expected_offset, rel=1e-5)
    assert result["gain"] == pytest.approx(expected_gain, rel=1e-4)
    assert layer.gain.requires_grad  # still a learnable parameter
    with pytest.raises(ValueError, match="empty"):
        layer.calibrate(torch.zeros(1, 1, 8, 8, 8), blurred)


def test_calibrate_by_mean_is_not_biased_by_noise_where_the_top_percentile_is():
    torch.manual_seed(0)
    layer = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="fixed", init_fwhm=(0.3, 0.2, 0.2))
    sharp = (torch.rand(4, 1, 16, 16, 16) > 0.97).float()
    clean = 20.0 * _conv3d_reference(sharp, layer.kernel())
    noisy = torch.poisson(clean * 2.0) / 2.0 + 0.1  # the same light with shot noise, over a background of 0.1
    by_mean = layer.calibrate(sharp, noisy, low_percentile=0.0, statistic="mean")
    expected = (noisy.mean().item() - noisy.min().item()) / clean.div(20.0).mean().item()
    assert by_mean["gain"] == pytest.approx(expected, rel=1e-4) and by_mean["offset"] == pytest.approx(0.1)
    by_top = layer.calibrate(sharp, noisy, low_percentile=0.0, high_percentile=99.9)
    # noise raises the top percentile, not the mean
    assert abs(by_mean["gain"] - 20.0) < 0.05 * 20.0 < abs(by_top["gain"] - 20.0)
    with pytest.raises(ValueError, match="statistic"):
        layer.calibrate(sharp, noisy, statistic="median")


def test_export_round_trip(tmp_path):
    layer = PSFLayer.build(kernel_size=(9, 8, 7), parameterization="parametric", na=1.1, voxel_size=(0.2, 0.1, 0.1))
    tif, js = layer.export(tmp_path / "psf.tif")
    assert js == tmp_path / "psf.json"
    back = tifffile.imread(tif)
    assert back.dtype == np.float32 and back.shape == (9, 8, 7)
    np.testing.assert_allclose(back, layer.kernel().detach().numpy(), rtol=0, atol=1e-7)
    info = json.loads(js.read_text())
    assert info["physical_parameters"]["na"] == pytest.approx(1.1, abs=1e-6)
    assert info["kernel_size"] == [9, 8, 7] and info["parameterization"] == "parametric"
    assert info["voxel_size"] == [0.2, 0.1, 0.1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psf.json", "psf.tif"]  # no temp files left


@pytest.mark.parametrize("file_shape", [(11, 13, 9), (5, 4, 3)])
def test_file_init_crops_or_pads_centrally(tmp_path, file_shape):
    psf = np.zeros(file_shape, np.float32)
    centre = tuple(s // 2 for s in file_shape)
    psf[centre] = 3.0
    psf[0, 0, 0] = 1.0  # only kept when the file is smaller than the kernel
    path = tmp_path / "psf.tif"
    tifffile.imwrite(
        path, psf, imagej=True, resolution=(10.0, 10.0), metadata={"spacing": 0.1, "unit": "micron"}
    )
    layer = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", init="file", psf_file=str(path))
    h = layer.kernel()
    assert h.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert h.argmax().item() == np.ravel_multi_index((3, 3, 3), (7, 7, 7))
    smaller = all(s <= 7 for s in file_shape)
    assert h[3, 3, 3].item() == pytest.approx(0.75 if smaller else 1.0, abs=1e-6)


@pytest.mark.parametrize("init", ["born_wolf", "vectorial"])
def test_theoretical_inits(init):
    layer = PSFLayer.build(kernel_size=(9, 9, 9), parameterization="constrained", init=init, na=1.2)
    h = layer.kernel()
    assert h.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert h.argmax().item() == np.ravel_multi_index((4, 4, 4), (9, 9, 9))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"parameterization": "learned"}, "parameterization"),
        ({"init": "airy"}, "init"),
        ({"parameterization": "fixed", "init": "file"}, "psf_file"),
        ({"na": 1.5}, "na must satisfy"),
        ({"na": 1.6, "parameterization": "free", "init": "born_wolf"}, "na must satisfy"),
        ({"kernel_size": (5, 5)}, "shape"),
        ({"voxel_size": (0.1, 0.0, 0.1)}, "voxel_size"),
        ({"pad_mode": "mirror"}, "pad_mode"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSFLayer.build(kernel_size=kwargs.pop("kernel_size", (5, 5, 5)), **kwargs)


def test_na_outside_range_is_fine_when_unused():
    layer = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="fixed", init="gaussian", na=1.6)
    assert math.isclose(layer.kernel().sum().item(), 1.0, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------
# the vectorial kernel module
# ----------------------------------------------------------------------------------------------
def _vectorial_layer(na=1.2, residual=False, **kwargs):
    from bundle.networks.kernels import VectorialPSFKernel

    kernel = VectorialPSFKernel(
        (9, 9, 9), na=na, n_immersion=1.515, wavelength=0.52, learn=("na", "spherical"), residual=residual
    )
    return PSFLayer(kernel, **kwargs)


def test_kernel_module_forward_and_parameters():
    layer = _vectorial_layer(gain=2.0, offset=0.1)
    h = layer.kernel()
    assert h.shape == (9, 9, 9) and h.dtype == torch.float32
    assert h.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(h, layer.kernel_module())
    x = torch.rand(2, 1, 12, 10, 11)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 2.0 * _conv3d_reference(x, h) + 0.1, rtol=0, atol=1e-5)
    kernel_params = list(layer.kernel_parameters())
    assert {id(p) for p in kernel_params} == {id(p) for p in layer.kernel_module.parameters()}
    assert len(kernel_params) == 2 and len(list(layer.scale_parameters())) == 2
    assert len(list(layer.parameters())) == 4
    layer(x).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in kernel_params)
    assert layer.kernel_module.na_raw.grad.abs() > 0
    params = layer.physical_parameters()
    assert params["na"] == pytest.approx(1.2, abs=1e-6) and params["gain"] == pytest.approx(2.0)
    assert {"spherical", "wavelength", "offset"} <= set(params)
    assert layer.parameterization == "vectorial" and "VectorialPSFKernel" in repr(layer)
    assert layer.n_immersion == pytest.approx(1.515) and layer.kernel_size == (9, 9, 9)


def test_kernel_module_fit_moves_na_toward_truth():
    from bundle.physics.psf import vectorial_psf

    torch.manual_seed(0)
    x = torch.rand(1, 1, 20, 20, 20)
    h_true = torch.from_numpy(vectorial_psf((9, 9, 9), na=1.35, n_immersion=1.515, wavelength=0.52))
    y = _conv3d_reference(x, h_true)
    layer = _vectorial_layer(na=1.2, learn_gain=False, learn_offset=False)
    opt = torch.optim.Adam(layer.kernel_parameters(), lr=2e-2)
    for _ in range(40):
        opt.zero_grad()
        (layer(x) - y).pow(2).mean().backward()
        opt.step()
    na = layer.physical_parameters()["na"]
    assert abs(na - 1.35) < 0.03, na  # measured 1.338


def test_kernel_module_state_dict_round_trip(tmp_path):
    layer = _vectorial_layer(na=1.3, residual=True)
    with torch.no_grad():
        layer.kernel_module.spherical_raw.fill_(0.05)
        layer.gain.fill_(3.0)
    layer.kernel_module.release_residual()
    path = tmp_path / "blur.pt"
    torch.save(layer.state_dict(), path)
    assert {"kernel_module.na_raw", "kernel_module.residual_logits", "gain"} <= set(layer.state_dict())
    other = _vectorial_layer(na=1.0, residual=True)
    other.load_state_dict(torch.load(path))
    assert other.kernel_module.released
    torch.testing.assert_close(other.kernel(), layer.kernel())
    assert other.physical_parameters() == pytest.approx(layer.physical_parameters())


def test_kernel_module_residual_frozen_until_released():
    torch.manual_seed(0)
    layer = _vectorial_layer(residual=True, learn_gain=False, learn_offset=False)
    logits = layer.kernel_module.residual_logits
    assert any(p is logits for p in layer.kernel_parameters())  # in the optimizer from the start
    opt = torch.optim.Adam(layer.kernel_parameters(), lr=5e-2)
    x, y = torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12)
    before = logits.detach().clone()
    optical = layer.kernel_module.optical_kernel()

    def step():
        opt.zero_grad()
        (layer(x) - y).pow(2).mean().backward()
        opt.step()

    torch.testing.assert_close(layer.kernel(), optical)
    step()
    assert logits.grad is None and torch.equal(logits.detach(), before)
    layer.kernel_module.release_residual()
    step()
    step()
    assert logits.grad is not None and not torch.equal(logits.detach(), before)
    h = layer.kernel()
    assert (h >= 0).all() and h.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_kernel_module_export(tmp_path):
    layer = _vectorial_layer(na=1.25)
    tif, js = layer.export(tmp_path / "psf.tif")
    np.testing.assert_allclose(tifffile.imread(tif), layer.kernel().detach().numpy(), rtol=0, atol=1e-7)
    info = json.loads(js.read_text())
    assert info["kernel_module"] == "bundle.networks.kernels.vectorial.VectorialPSFKernel"
    assert info["parameterization"] == "vectorial" and info["n_immersion"] == pytest.approx(1.515)
    assert info["physical_parameters"]["na"] == pytest.approx(1.25, abs=1e-6)


def test_kernel_module_from_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "blur": {
                "_target_": "bundle.networks.PSFLayer",
                "kernel": {
                    "_target_": "bundle.networks.kernels.VectorialPSFKernel",
                    "shape": [9, 9, 9],
                    "na": 1.1,
                    "n_immersion": 1.33,
                    "wavelength": 0.6,
                    "voxel_size": [0.2, 0.1, 0.1],
                    "learn": ["na"],
                },
            }
        }
    )
    layer = parser.get_parsed_content("blur")
    assert layer.physical_parameters()["na"] == pytest.approx(1.1, abs=1e-6)
    assert len(list(layer.kernel_parameters())) == 1
    assert layer.kernel_size == (9, 9, 9) and layer.voxel_size == (0.2, 0.1, 0.1)


class _OddKernel(torch.nn.Module):
    """A kernel module without ``shape``: the layer takes the shape it returns."""

    def __init__(self, shape):
        super().__init__()
        self.h = torch.nn.Parameter(torch.full(shape, 1.0 / math.prod(shape)))
        self.grow = False

    def forward(self):
        return torch.nn.functional.pad(self.h, (0, 1)) if self.grow else self.h


def test_any_kernel_module_and_bad_arguments():
    layer = PSFLayer(_OddKernel((3, 5, 7)))
    assert layer.kernel_size == (3, 5, 7) and layer.voxel_size is None and layer.n_immersion is None
    assert layer.parameterization == "module" and layer.physical_parameters().keys() == {"gain", "offset"}
    layer.kernel_module.grow = True
    with pytest.raises(ValueError, match="expected kernel_size"):
        layer.kernel()
    with pytest.raises(TypeError, match="nn.Module"):
        PSFLayer(torch.ones(3, 3, 3))
    with pytest.raises(ValueError, match="pad_mode"):
        PSFLayer(_OddKernel((3, 3, 3)), pad_mode="edge")
    with pytest.raises(TypeError, match="no NA"):
        PSFLayer(_OddKernel((3, 3, 3))).set_na_(1.0)
