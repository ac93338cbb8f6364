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
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="larger than 16"):
        net(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        net(torch.rand(1, 16, 16, 16))
    with pytest.raises(ValueError, match="out_activation"):
        DeblurUNet(out_activation="tanh")
    with pytest.raises(ValueError, match="6 entries"):
        DeblurUNet(features=(4, 8))
