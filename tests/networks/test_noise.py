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


def test_scale_multiplies_the_standard_deviation_and_stays_out_of_checkpoints():
    torch.manual_seed(0)
    y = torch.full((1, 1, 32, 32, 32), 0.5)
    full = PoissonGaussianNoise(photons_per_unit=50.0, gaussian_sigma=0.02).train()
    half = PoissonGaussianNoise(photons_per_unit=50.0, gaussian_sigma=0.02, scale=0.5).train()
    assert half(y).var().item() == pytest.approx(0.25 * full(y).var().item(), rel=0.1)
    assert half.variance(y).equal(full.variance(y))  # the noise model itself is unchanged
    half.set_parameters(100.0, 0.01)  # a new estimate keeps the scale
    assert half(y).var().item() == pytest.approx(0.25 * (0.5 / 100.0 + 0.01**2), rel=0.1)
    assert set(half.state_dict()) == set(full.state_dict())  # older checkpoints still load
    assert torch.equal(PoissonGaussianNoise(photons_per_unit=50.0, scale=0.0).train()(y), y)
    with pytest.raises(ValueError, match="scale"):
        PoissonGaussianNoise(scale=-0.5)


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


def test_black_level_and_checkpointed_parameters():
    torch.manual_seed(0)
    noise = PoissonGaussianNoise(photons_per_unit=20.0, gaussian_sigma=0.0, black_level=0.2).train()
    below = noise(torch.full((1, 1, 16, 16, 16), 0.1))
    assert below.var().item() < 1e-10  # no shot noise below the black level
    above = noise(torch.full((1, 1, 32, 32, 32), 0.7))
    assert above.var().item() == pytest.approx(0.5 / 20.0, rel=0.1)

    other = PoissonGaussianNoise()
    assert other.photons_per_unit is None and other.gaussian_sigma == 0.0
    y = torch.rand(1, 1, 8, 8, 8)
    assert torch.equal(other.train()(y), y)  # no noise configured: identity
    other.load_state_dict(noise.state_dict())  # the estimated level travels in checkpoints
    assert other.parameters_dict() == pytest.approx({"photons_per_unit": 20.0, "gaussian_sigma": 0.0, "black_level": 0.2})
    other.set_parameters(float("inf"), 0.01)
    assert other.photons_per_unit is None and other.gaussian_sigma == pytest.approx(0.01)


def test_recorruption_gives_input_and_target_with_uncorrelated_noise():
    """y = s + n; input y + αz, target y − z/α: both unbiased for s, their noises uncorrelated, variances
    (1 + α²)σ² and (1 + 1/α²)σ² (σ² from the noise model at the local mean)."""
    from bundle.networks.noise import Recorruption

    torch.manual_seed(0)
    noise = PoissonGaussianNoise(photons_per_unit=200.0, gaussian_sigma=0.02).train()
    s = torch.full((4, 1, 32, 32, 32), 0.4)
    y = noise(s)
    alpha = 0.5
    y_in, y_target = Recorruption(noise=noise, alpha=alpha)(y)
    var = 0.4 / 200.0 + 0.02**2
    n_in, n_target = (y_in - s).flatten(), (y_target - s).flatten()
    assert float(n_in.mean()) == pytest.approx(0.0, abs=1e-3) and float(n_target.mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(n_in.var()) == pytest.approx((1 + alpha**2) * var, rel=0.05)
    assert float(n_target.var()) == pytest.approx((1 + 1 / alpha**2) * var, rel=0.05)
    assert abs(float(torch.corrcoef(torch.stack([n_in, n_target]))[0, 1])) < 0.01
    # the plain copies are perfectly correlated: the noise a blurred cycle against y itself would fit
    assert float(torch.corrcoef(torch.stack([(y - s).flatten(), (y - s).flatten()]))[0, 1]) > 0.99
    assert not y_in.requires_grad and y_in.shape == y.shape == y_target.shape


def test_recorruption_refuses_bad_arguments():
    from bundle.networks.noise import Recorruption

    with pytest.raises(TypeError, match="variance"):
        Recorruption(noise=torch.nn.Identity())
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.5}, {"smooth": 2}, {"smooth": 0}):
        with pytest.raises(ValueError, match="alpha must be in"):
            Recorruption(noise=PoissonGaussianNoise(gaussian_sigma=0.1), **kwargs)
