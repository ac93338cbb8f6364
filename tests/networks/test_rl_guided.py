import numpy as np
import pytest
import tifffile
import torch

from bundle.classical import richardson_lucy
from bundle.inference import deconvolve, load_network, network_from_state_dict
from bundle.networks import DeblurUNet, RLGuidedUNet
from bundle.physics.psf import gaussian_psf

SMALL = dict(features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False)


def _psf() -> np.ndarray:
    return gaussian_psf((9, 9, 9), (0.6, 0.25, 0.25), voxel_size=(0.1, 0.1, 0.1)).astype(np.float32)


def _net(**kwargs) -> RLGuidedUNet:
    torch.manual_seed(0)
    return RLGuidedUNet(psf=_psf(), rl_iterations=kwargs.pop("rl_iterations", 5), **SMALL, **kwargs).eval()


def test_the_unet_sees_the_input_and_its_richardson_lucy_deconvolution():
    net = _net()
    x = torch.rand(2, 1, 16, 32, 32)
    rl = richardson_lucy(x, _psf(), num_iter=5, pad_mode="reflect")
    torch.testing.assert_close(net.guide(x), rl)
    with torch.no_grad():
        expected = torch.sigmoid(net.unet(torch.cat([x, rl], 1)))
        torch.testing.assert_close(net(x), expected)
        # the guide channel matters: the same U-Net fed the input twice gives other logits
        assert (net.unet(torch.cat([x, x], 1)) - net.unet(torch.cat([x, rl], 1))).abs().max() > 1e-3
    assert net.unet.conv_0.conv_0.conv.weight.shape[1] == 2


def test_gradients_reach_the_input_through_the_plain_channel():
    net = _net().train()
    x = torch.rand(1, 1, 16, 16, 16, requires_grad=True)
    net(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_state_dict_rebuilds_the_same_network(tmp_path):
    net = _net(rl_iterations=7)
    state = net.state_dict()
    assert int(state["guide_iterations"]) == 7 and state["guide_psf"].shape == (9, 9, 9)
    rebuilt = network_from_state_dict(state)
    assert isinstance(rebuilt, RLGuidedUNet) and int(rebuilt.guide_iterations) == 7
    rebuilt.load_state_dict(state)
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), net(x))
    # model.pt alone is enough: the bundle's loader and deconvolve() run it with its PSF
    torch.save(state, tmp_path / "model.pt")
    loaded = load_network(tmp_path / "model.pt")
    assert isinstance(loaded, RLGuidedUNet)
    stack = np.random.default_rng(0).random((16, 40, 48)).astype(np.float32)
    out = deconvolve(stack, model=tmp_path / "model.pt")
    assert out.shape == stack.shape and np.isfinite(out).all()


def test_a_plain_state_dict_still_rebuilds_a_plain_unet():
    net = DeblurUNet(**SMALL)
    assert type(network_from_state_dict(net.state_dict())) is DeblurUNet


def test_psf_from_a_file_equals_the_array(tmp_path):
    tifffile.imwrite(tmp_path / "psf.tif", _psf())
    a = RLGuidedUNet(psf_file=str(tmp_path / "psf.tif"), **SMALL)
    torch.testing.assert_close(a.guide_psf, _net().guide_psf)


def test_bad_arguments_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of psf and psf_file"):
        RLGuidedUNet(**SMALL)
    with pytest.raises(ValueError, match="rl_iterations"):
        RLGuidedUNet(psf=_psf(), rl_iterations=0, **SMALL)
    with pytest.raises(ValueError, match="one-channel input"):
        RLGuidedUNet(psf=_psf(), in_channels=3, **SMALL)
    with pytest.raises(ValueError, match="negative"):
        RLGuidedUNet(psf=-_psf(), **SMALL)
    (tmp_path / "psf.tif").write_text("not a tiff")
    with pytest.raises(ValueError, match="psf.tif: cannot read the PSF"):
        RLGuidedUNet(psf_file=str(tmp_path / "psf.tif"), **SMALL)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        _net()(torch.rand(1, 2, 16, 16, 16))
