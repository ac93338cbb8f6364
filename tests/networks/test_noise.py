import pytest
import torch

from bundle.networks.noise import PoissonGaussianNoise


def test_identity_in_eval_mode():
    noise = PoissonGaussianNoise(photons_per_unit=10.0, gaussian_sigma=0.1).eval()
    y = torch.rand(1, 1, 8, 8, 8)
    assert torch.equal(noise(y), y)


@pytest.mark.parametrize(
    "photons,sigma,level",
    [(100.0, 0.0, 0.5), (None, 0.05, 0.5), (50.0, 0.02, 0.3), (20.0, 0.1, 2.0)],
)
def test_variance_matches_formula_on_constant_volume(photons, sigma, level):
    torch.manual_seed(0)
    noise = PoissonGaussianNoise(photons_per_unit=photons, gaussian_sigma=sigma).train()
    y = torch.full((1, 1, 32, 32, 32), level)
    out = noise(y)
    expected = (level / photons if photons else 0.0) + sigma**2
    assert out.var().item() == pytest.approx(expected, rel=0.1)
    assert out.mean().item() == pytest.approx(level, abs=3 * expected**0.5 / 32**1.5 + 1e-6)


def test_gradients_flow_including_at_zero():
    noise = PoissonGaussianNoise(photons_per_unit=10.0, gaussian_sigma=0.1).train()
    y = torch.rand(1, 1, 8, 8, 8)
    y[..., 0, 0, 0] = 0.0
    y[..., 0, 0, 1] = -0.1
    y.requires_grad_(True)
    noise(y).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="photons_per_unit"):
        PoissonGaussianNoise(photons_per_unit=0.0)
    with pytest.raises(ValueError, match="gaussian_sigma"):
        PoissonGaussianNoise(gaussian_sigma=-1.0)
