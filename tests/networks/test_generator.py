import math

import pytest
import torch

from bundle.networks.generator import DeblurUNet

SMALL = (4, 4, 8, 8, 16, 4)


@pytest.mark.parametrize("shape", [(32, 32, 32), (16, 32, 48)])
def test_output_shape_and_range(shape):
    torch.manual_seed(0)
    net = DeblurUNet(features=SMALL)
    out = net(torch.rand(2, 1, *shape))
    assert out.shape == (2, 1, *shape)
    assert out.min() > 0 and out.max() < 1


@pytest.mark.parametrize("last_bias", [-4.0, -2.0, 0.0])
def test_initial_output_near_sigmoid_of_last_bias(last_bias):
    torch.manual_seed(0)
    net = DeblurUNet(features=SMALL, last_bias=last_bias)
    with torch.no_grad():
        out = net(torch.rand(1, 1, 16, 16, 32))
    assert out.mean().item() == pytest.approx(1 / (1 + math.exp(-last_bias)), abs=0.1)


def test_default_parameter_count_and_no_transposed_conv():
    net = DeblurUNet()
    assert sum(p.numel() for p in net.parameters()) == 5_440_097
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.Upsample) and m.mode == "trilinear" for m in net.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())


def test_no_activation_and_gradients_flow():
    net = DeblurUNet(features=SMALL, out_activation="none")
    x = torch.rand(1, 1, 16, 32, 16, requires_grad=True)
    out = net(x)
    assert out.min() < 0  # raw logits around last_bias
    out.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_bad_arguments_and_sizes():
    net = DeblurUNet(features=SMALL)
    with pytest.raises(ValueError, match=r"divisible by 16 \(4 poolings\)"):
        net(torch.rand(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="larger than 16"):
        net(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        net(torch.rand(1, 16, 16, 16))
    with pytest.raises(ValueError, match="out_activation"):
        DeblurUNet(out_activation="tanh")
    with pytest.raises(ValueError, match=r"depth \+ 2 = 6 entries"):
        DeblurUNet(features=(4, 8))


def test_depth_4_is_monai_basic_unet():
    """The levels are BasicUNet's blocks and names: a BasicUNet checkpoint loads and computes the same."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    basic = BasicUNet(spatial_dims=3, out_channels=1, features=SMALL, act="relu", norm=("instance", {"affine": True}), upsample="nontrainable")
    net = DeblurUNet(features=SMALL)
    net.unet.load_state_dict(basic.state_dict())
    x = torch.rand(1, 1, 32, 32, 32)
    torch.testing.assert_close(net.unet(x), basic(x))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_receptive_radius_is_exact(depth):
    """Autograd with the ReLUs removed (no path cut) reaches exactly ``receptive_radius`` voxels."""
    net = DeblurUNet(features=(2,) * (depth + 2), depth=depth, norm="none", align_corners=False).eval()
    for m in net.modules():
        for name, child in m.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(m, name, torch.nn.Identity())
    r = net.receptive_radius
    size = 2 * r + 2 * net.divisor
    size += -size % net.divisor
    x = torch.rand(1, 1, size, size, size, requires_grad=True)
    reach = 0
    out = net(x)  # one forward pass, one backward pass per output position
    for j in range(net.divisor):  # every position within one pooling period
        c = size // 2 + j
        (grad,) = torch.autograd.grad(out[0, 0, c, c, c], x, retain_graph=True)
        reach = max(reach, int(((grad[0, 0].abs() > 0).nonzero() - c).abs().max()))
    assert reach == r


def test_settings_travel_in_the_state_dict():
    from bundle.inference import network_from_state_dict

    net = DeblurUNet(features=(4, 8, 8, 4), depth=2, norm="batch", align_corners=False)
    rebuilt = network_from_state_dict(net.state_dict())
    assert (rebuilt.depth, rebuilt.norm, rebuilt.align_corners) == (2, "batch", False)
    rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match="align_corners': False.*align_corners': True"):
        DeblurUNet(features=(4, 8, 8, 4), depth=2, norm="batch").load_state_dict(net.state_dict())
    older = {k: v for k, v in DeblurUNet(features=SMALL).state_dict().items() if k != "settings"}
    DeblurUNet(features=SMALL).load_state_dict(older)  # checkpoints from before the settings buffer load
    assert network_from_state_dict(older).depth == 4


def test_tiling_halo_only_for_window_free_networks():
    assert DeblurUNet(features=SMALL).tiling_halo == 0  # instance norm: no halo makes it window-free
    assert DeblurUNet(features=(4, 8, 8, 4), depth=2, norm="batch", align_corners=True).tiling_halo == 0
    halo = DeblurUNet(features=(4, 8, 8, 4), depth=2, norm="batch", align_corners=False).tiling_halo
    assert 0 < halo <= 26 and halo % 2 == 0
