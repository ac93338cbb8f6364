import pytest
import torch

from bundle.losses import CycleLoss, DiscrepancyCycleLoss, LSGANLoss, WGANGPLoss, adversarial_loss
from bundle.networks import PoissonGaussianNoise


def _preds(value, shapes=((2, 1, 3, 3, 3), (2, 1, 2, 2, 2), (2, 1, 1, 1, 1))):
    return [torch.full(s, float(value)) for s in shapes]


@pytest.mark.parametrize(
    "real,fake,expected_d,expected_g",
    [(1.0, 0.0, 0.0, 1.0), (0.0, 1.0, 1.0, 0.0), (0.5, 0.5, 0.25, 0.25), (2.0, -1.0, 1.0, 4.0)],
)
def test_lsgan_values(real, fake, expected_d, expected_g):
    adv = LSGANLoss()
    assert adv.discriminator_loss(_preds(real), _preds(fake)).item() == pytest.approx(expected_d)
    assert adv.generator_loss(_preds(fake)).item() == pytest.approx(expected_g)


def test_lsgan_is_mean_over_scales_and_accepts_a_tensor():
    adv = LSGANLoss()
    preds = [torch.zeros(1, 1, 4, 4, 4), torch.full((1, 1, 1, 1, 1), 3.0)]  # per-scale (x-1)^2: 1 and 4
    assert adv.generator_loss(preds).item() == pytest.approx(2.5)
    assert adv.generator_loss(torch.zeros(1, 1, 2, 2, 2)).item() == pytest.approx(1.0)
    assert LSGANLoss(fake_label=-1.0).discriminator_loss(_preds(1.0), _preds(-1.0)).item() == pytest.approx(
        0.0
    )


def test_lsgan_gradients_flow():
    p = torch.zeros(1, 1, 2, 2, 2, requires_grad=True)
    LSGANLoss().generator_loss([p]).backward()
    assert p.grad.abs().sum() > 0


def test_wgan_values():
    adv = WGANGPLoss()
    assert adv.discriminator_loss(_preds(2.0), _preds(-1.0)).item() == pytest.approx(-3.0)
    assert adv.generator_loss(_preds(-1.0)).item() == pytest.approx(1.0)


def test_gradient_penalty_zero_for_unit_gradient_linear_critic():
    torch.manual_seed(0)
    real, fake = torch.rand(3, 1, 4, 4, 4), torch.rand(3, 1, 4, 4, 4)
    w = torch.randn(1, 1, 4, 4, 4)
    w = w / w.norm()

    def critic(v):  # linear, ||grad|| = 1 per sample; two "scales" with the same critic
        out = (v * w).flatten(1).sum(1).reshape(-1, 1, 1, 1, 1)
        return [out, out]

    assert WGANGPLoss.gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-8)

    w_param = (3 * w).clone().requires_grad_(True)

    def steep(v):
        return [(v * w_param).flatten(1).sum(1).reshape(-1, 1, 1, 1, 1)]

    gp = WGANGPLoss.gradient_penalty(steep, real, fake, weight=10.0)
    assert gp.item() == pytest.approx(10.0 * (3 - 1) ** 2, rel=1e-5)
    gp.backward()
    assert w_param.grad is not None and w_param.grad.abs().sum() > 0


def test_gradient_penalty_positive_for_conv_critic():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 3)
    gp = WGANGPLoss.gradient_penalty(conv, torch.rand(2, 1, 6, 6, 6), torch.rand(2, 1, 6, 6, 6))
    assert gp.item() > 0


def test_factory():
    assert isinstance(adversarial_loss(), LSGANLoss)
    assert isinstance(adversarial_loss("wgan-gp"), WGANGPLoss)
    with pytest.raises(ValueError, match="adversarial loss"):
        adversarial_loss("hinge")


def test_cycle_loss_value():
    a, b = torch.zeros(2, 1, 4, 4, 4), torch.full((2, 1, 4, 4, 4), 0.5)
    assert CycleLoss()(a, b).item() == pytest.approx(5.0)
    assert CycleLoss(weight=1.0)(b, a).item() == pytest.approx(0.5)


def test_cycle_loss_power_two_is_the_mean_not_the_median():
    """On a skewed noisy target the L1 cycle pulls a constant toward the median, the squared one toward the mean."""
    torch.manual_seed(0)
    target = torch.poisson(torch.full((1, 1, 16, 16, 16), 2.0))  # Poisson(2): mean 2, median 2 but skewed
    target = torch.cat([target, torch.zeros_like(target)]).view(1, 1, 32, 16, 16)  # half empty: median 0.5-1
    estimates = {}
    for power in (1, 2):
        c = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([c], lr=0.05)
        for _ in range(400):
            opt.zero_grad()
            CycleLoss(weight=1.0, power=power)(c.expand_as(target), target).backward()
            opt.step()
        estimates[power] = float(c.detach())
    assert estimates[2] == pytest.approx(float(target.mean()), abs=0.02)
    assert estimates[1] < float(target.mean()) - 0.3  # the median of the target sits well below its mean
    with pytest.raises(ValueError, match="power"):
        CycleLoss(power=3)


def test_discrepancy_cycle_leaves_residuals_at_the_noise_level_alone():
    """A reconstruction that explains y to its noise level costs (almost) nothing, and descending the
    loss does not fit the noise (the paper's L1 cycle does); one that dropped a structure costs, and
    its gradient points at the structure."""
    torch.manual_seed(0)
    noise = PoissonGaussianNoise(photons_per_unit=500.0, gaussian_sigma=0.01).train()
    clean = torch.full((1, 1, 32, 32, 32), 0.1)
    clean[..., 8:12, 8:12, 8:12] = 0.6  # a dim punctum
    y = noise(clean)
    loss = DiscrepancyCycleLoss(noise=noise, weight=1.0, window=8)
    assert loss(clean, y) < 0.05  # measured 0.024: windows of 512 voxels scatter about 1 by +-0.06
    dropped = torch.full_like(clean, 0.1).requires_grad_(True)
    cost = loss(dropped, y)
    assert cost > 1.0
    cost.backward()
    grad = dropped.grad.abs()
    assert grad[..., 8:12, 8:12, 8:12].mean() > 100 * grad[..., 20:, 20:, 20:].mean()

    def descend(fn, lr):  # plain gradient descent from the dropped reconstruction, 200 steps
        v = torch.full_like(clean, 0.1).requires_grad_(True)
        for _ in range(200):
            v.grad = None
            fn(v, y).backward()
            with torch.no_grad():
                v -= lr * v.grad
        v = v.detach()
        return float(((v - y).square() / noise.variance(clean)).mean()), float(v[..., 8:12, 8:12, 8:12].mean())

    # measured: the discrepancy loss brings the punctum back to 0.51 (true 0.6) with the residual at 0.80
    # of the noise; the L1 cycle fits the noise (residual 0.33 of it) and has the punctum at 0.14
    ratio, punctum = descend(loss, 1.0)
    assert punctum > 0.45 and ratio > 0.7, (ratio, punctum)
    ratio_l1, _ = descend(CycleLoss(weight=1.0), 2e-4 * 32**3)
    assert ratio_l1 < 0.45, ratio_l1


def test_discrepancy_cycle_checks_its_arguments():
    with pytest.raises(TypeError, match="variance"):
        DiscrepancyCycleLoss(noise=torch.nn.Identity())
    with pytest.raises(ValueError, match="window"):
        DiscrepancyCycleLoss(noise=PoissonGaussianNoise(100.0), window=0)


def test_discrepancy_cycle_against_the_median_window_finds_a_dropped_structure_under_model_error():
    """With a model error far above the noise everywhere (a 20 % gain error), the noise reference
    penalises every window; the median reference only the window that lost the punctum."""
    torch.manual_seed(0)
    noise = PoissonGaussianNoise(photons_per_unit=500.0, gaussian_sigma=0.01)
    clean = torch.full((1, 1, 32, 32, 32), 0.3)
    clean[..., 8:12, 8:12, 8:12] = 0.9
    y = noise.train()(clean)
    wrong_gain = 1.2 * torch.full_like(clean, 0.3)  # model error everywhere, punctum dropped
    by_noise = DiscrepancyCycleLoss(noise=noise, window=8, reference="noise")
    by_median = DiscrepancyCycleLoss(noise=noise, window=8, margin=1.5, reference="median")
    v = wrong_gain.clone().requires_grad_(True)
    by_noise(v, y).backward()
    assert (v.grad.abs() > 0).float().mean() > 0.9  # every window pushed
    v.grad = None
    by_median(v, y).backward()
    pushed = v.grad.abs() > 0
    assert pushed[..., 8:12, 8:12, 8:12].all() and pushed.float().mean() < 1 / 64 + 1e-6  # the punctum's window only
    with pytest.raises(ValueError, match="reference"):
        DiscrepancyCycleLoss(noise=noise, reference="mean")


def test_high_pass_cycle_ignores_a_smooth_background_and_keeps_structure():
    from bundle.losses import HighPassCycleLoss

    torch.manual_seed(0)
    y = torch.rand(2, 1, 32, 32, 32)
    z, r, c = torch.meshgrid(*[torch.linspace(0, 1, 32)] * 3, indexing="ij")
    background = (0.3 + 0.2 * c + 0.1 * z + 0.2 * torch.exp(-((r - 0.5) ** 2) / 0.5))[None, None]
    punctate = (torch.rand_like(y) > 0.99).float()  # dropped puncta: the error the cycle must see
    high, plain = HighPassCycleLoss(weight=1.0, sigma=4.0), CycleLoss(weight=1.0)
    assert high(y + background, y) < 0.02 * plain(y + background, y)
    assert high(y + punctate, y) > 0.8 * plain(y + punctate, y)
    assert high(y, y) == 0
    # squared error and per-axis sigma; gradients reach the reconstruction
    rec = (y + punctate).requires_grad_()
    HighPassCycleLoss(weight=2.0, sigma=(2.0, 4.0, 4.0), power=2)(rec, y).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0


def test_high_pass_cycle_checks_its_arguments():
    from bundle.losses import HighPassCycleLoss

    for bad in (0.0, -1.0, (1.0, 2.0)):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            HighPassCycleLoss(sigma=bad)
    with pytest.raises(ValueError, match="power must be 1"):
        HighPassCycleLoss(power=3)


def _features(means, shapes=((2, 3, 4, 4, 4), (2, 5, 2, 2, 2), (2, 1, 2, 2, 2))):
    """One scale's layer outputs with the given per-layer constant values (the last is the logits)."""
    return [torch.full(s, float(m)) for s, m in zip(shapes, means, strict=True)]


def test_feature_matching_compares_mean_features_and_leaves_the_logits_out():
    """Equal means give 0 whatever the layout; the value is the mean |Δ mean| over layers, then scales;
    the logits (last layer) do not count; the weight scales it."""
    from bundle.losses import FeatureMatchingLoss

    fm = FeatureMatchingLoss()
    real = [_features((1.0, 2.0, 7.0))]
    assert fm(real, [_features((1.0, 2.0, -3.0))]).item() == 0.0  # only the logits differ
    shuffled = [[t.flip(-1) for t in real[0]]]
    assert fm(real, shuffled).item() == 0.0
    assert fm(real, [_features((1.5, 1.0, 0.0))]).item() == pytest.approx((0.5 + 1.0) / 2)
    two_scales = fm(real + real, [_features((1.5, 1.0, 0.0)), _features((1.0, 2.0, 0.0))])
    assert two_scales.item() == pytest.approx((0.75 + 0.0) / 2)
    assert FeatureMatchingLoss(weight=0.1)(real, [_features((1.5, 1.0, 0.0))]).item() == pytest.approx(0.075)
    smaller = [[torch.full((1, 3, 2, 2, 2), 1.0), torch.full((1, 5, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1, 1)]]
    assert fm(real, smaller).item() == 0.0  # a batch or crop of another size: the means still compare
    with pytest.raises(ValueError, match="scales"):
        fm(real, real + real)


def test_feature_matching_moves_only_the_generated_side():
    from bundle.losses import FeatureMatchingLoss

    real = [[torch.rand(2, 3, 4, 4, 4, requires_grad=True), torch.rand(2, 1, 2, 2, 2)]]
    fake = [[torch.rand(2, 3, 4, 4, 4, requires_grad=True), torch.rand(2, 1, 2, 2, 2)]]
    FeatureMatchingLoss()(real, fake).backward()
    assert real[0][0].grad is None and fake[0][0].grad.abs().sum() > 0
