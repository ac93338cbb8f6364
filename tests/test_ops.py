import pytest
import torch
import torch.nn.functional as F

from bundle.ops import fast_fft_shape, fft_convolve


def _conv3d_reference(x, h, mode="constant"):
    """Direct convolution: conv3d (a cross-correlation) with the flipped kernel, centre k // 2."""
    pads = [p for kk in reversed(h.shape) for p in ((kk - 1) - kk // 2, kk // 2)]
    return F.conv3d(F.pad(x, pads, mode=mode), h.flip(0, 1, 2)[None, None])


@pytest.mark.parametrize("kshape", [(5, 5, 5), (4, 6, 3), (1, 1, 1), (7, 2, 9)])
@pytest.mark.parametrize("pad_mode,ref_mode", [("zeros", "constant"), ("reflect", "reflect"), ("replicate", "replicate")])
def test_fft_convolve_matches_direct_convolution(kshape, pad_mode, ref_mode):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 13, 11, dtype=torch.float64)
    h = torch.rand(*kshape, dtype=torch.float64)
    out = fft_convolve(x, h, pad_mode=pad_mode)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _conv3d_reference(x, h, ref_mode), rtol=0, atol=1e-10)


def test_delta_kernel_is_identity_and_zero_padding_does_not_wrap():
    x = torch.zeros(1, 1, 8, 8, 8)
    x[..., 0, 0, 0] = 1.0
    delta = torch.zeros(5, 5, 5)
    delta[2, 2, 2] = 1.0
    torch.testing.assert_close(fft_convolve(x, delta), x, atol=1e-6, rtol=0)
    box = torch.ones(5, 5, 5) / 125
    out = fft_convolve(x, box)
    # a point at the corner spreads only inward: the opposite corner stays dark (no circular wrap)
    assert out[..., -1, -1, -1].abs().item() < 1e-7
    assert out[..., :3, :3, :3].sum().item() == pytest.approx(27 / 125, abs=1e-6)


def test_gradients_flow_to_kernel_and_volume():
    x = torch.rand(1, 1, 6, 6, 6, requires_grad=True)
    h = torch.rand(3, 3, 3, requires_grad=True)
    fft_convolve(x, h).sum().backward()
    assert x.grad is not None and h.grad is not None
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="pad_mode"):
        fft_convolve(torch.rand(4, 4, 4), torch.rand(3, 3, 3), pad_mode="mirror")
    with pytest.raises(ValueError, match="3 spatial dims"):
        fft_convolve(torch.rand(4, 4), torch.rand(3, 3, 3))


def test_fast_fft_shape_is_not_smaller():
    shape = fast_fft_shape((97, 64, 131))
    assert all(s >= t for s, t in zip(shape, (97, 64, 131)))
    assert shape[1] == 64
