import pytest
import torch

from bundle.networks.discriminator import MultiScalePatchDiscriminator, patchgan_output_size


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("num_scales", [1, 2, 3])
@pytest.mark.parametrize("kernel_size", [3, 4])
def test_output_shapes(size, num_scales, kernel_size):
    torch.manual_seed(0)
    d = MultiScalePatchDiscriminator(channels=4, num_scales=num_scales, kernel_size=kernel_size)
    outs = d(torch.rand(2, 1, size, size, size))
    assert isinstance(outs, list) and len(outs) == num_scales
    for scale, out in enumerate(outs):
        side = size
        for _ in range(scale):
            side = (side + 1) // 2
        expected, _ = patchgan_output_size(side, d.layers_per_scale[scale], kernel_size)
        assert out.shape == (2, 1, expected, expected, expected)
        assert expected >= 1


def test_default_layers_adapt_to_32_cubed():
    d = MultiScalePatchDiscriminator(channels=4)
    assert d.layers_per_scale == [3, 2, 1]
    outs = d(torch.rand(1, 1, 32, 32, 48))
    assert [tuple(o.shape[2:]) for o in outs] == [(2, 2, 4), (2, 2, 4), (2, 2, 4)]
    d64 = MultiScalePatchDiscriminator(channels=4, min_input_size=64)
    assert d64.layers_per_scale == [3, 3, 2]


def test_scales_have_independent_parameters_and_gradients_flow():
    d = MultiScalePatchDiscriminator(channels=4, num_scales=3)
    ids = [{id(p) for p in disc.parameters()} for disc in d.discriminators]
    assert all(not (ids[i] & ids[j]) for i in range(3) for j in range(i + 1, 3))
    x = torch.rand(1, 1, 32, 32, 32, requires_grad=True)
    sum(o.mean() for o in d(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for disc in d.discriminators:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in d.modules())


def test_bad_arguments():
    d = MultiScalePatchDiscriminator(channels=4)
    with pytest.raises(ValueError, match="min_input_size"):
        d(torch.rand(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        MultiScalePatchDiscriminator(num_scales=4, min_input_size=8)
    with pytest.raises(ValueError, match="num_scales"):
        MultiScalePatchDiscriminator(num_scales=0)


def test_input_gamma_view():
    x = torch.rand(1, 1, 32, 32, 32)
    assert torch.equal(MultiScalePatchDiscriminator(channels=4).view(x), x)  # gamma 1: the input itself
    d = MultiScalePatchDiscriminator(channels=4, input_gamma=0.5)
    v = d.view(torch.tensor([-0.5, 0.0, 0.01, 0.25, 1.0]))
    assert abs(v[0]) < 1e-6 and abs(v[1]) < 1e-6  # negative values clamp to the zero level
    assert torch.allclose(v[2:], torch.tensor([0.01, 0.25, 1.0]).add(1e-3).sqrt() - 1e-3**0.5)
    # faint voxels weigh more in the gamma 0.5 view: 1 % of the maximum becomes ~8 % of it
    assert v[2] / v[4] > 0.07
    # same weights, different view → different logits; gradients reach the input through the view
    torch.manual_seed(0)
    linear = MultiScalePatchDiscriminator(channels=4)
    gamma = MultiScalePatchDiscriminator(channels=4, input_gamma=0.5)
    gamma.load_state_dict(linear.state_dict())  # the view holds no parameters
    xg = x.clone().requires_grad_(True)
    out = gamma(xg)
    assert not torch.allclose(out[0], linear(x)[0])
    sum(o.sum() for o in out).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="input_gamma"):
        MultiScalePatchDiscriminator(channels=4, input_gamma=0.0)


def test_input_noise_only_in_training_mode():
    """Instance noise: two training-mode calls on the same input differ, eval mode and noise 0 are exact;
    a negative level is refused."""
    x = torch.rand(1, 1, 32, 32, 32)
    torch.manual_seed(0)
    d = MultiScalePatchDiscriminator(channels=4, num_scales=2, input_noise=0.05)
    with torch.no_grad():
        assert not torch.equal(d(x)[0], d(x)[0])
        d.eval()
        assert all(torch.equal(a, b) for a, b in zip(d(x), d(x), strict=True))
        plain = MultiScalePatchDiscriminator(channels=4, num_scales=2)
        assert all(torch.equal(a, b) for a, b in zip(plain(x), plain(x), strict=True))
    with pytest.raises(ValueError, match="input_noise"):
        MultiScalePatchDiscriminator(channels=4, input_noise=-0.1)


def test_features_end_in_the_logits_forward_returns():
    """``features`` gives every layer at every scale; its last entries are ``forward``'s logits."""
    torch.manual_seed(0)
    d = MultiScalePatchDiscriminator(channels=4, num_layers_d=2, num_scales=3).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        feats, logits = d.features(x), d(x)
    assert len(feats) == 3
    for layers, logit, n in zip(feats, logits, d.layers_per_scale, strict=True):
        assert len(layers) == n + 2  # first conv, n normalised convs, output conv
        assert torch.equal(layers[-1], logit)
        assert layers[0].shape[:2] == (2, 4)
