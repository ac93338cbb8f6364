import math

import numpy as np
import pytest
import torch

from bundle.metrics import AffineFitPSNRMetric, AffineFitSSIMMetric, affine_fit, psnr, ssim


def test_affine_fit_recovers_scaling():
    torch.manual_seed(0)
    t = torch.rand(2, 1, 8, 8, 8)
    p = 0.25 * t - 3.0
    torch.testing.assert_close(affine_fit(p, t), t, atol=1e-5, rtol=0)


def test_affine_fit_of_constant_prediction_is_the_mean():
    t = torch.rand(1, 1, 4, 4, 4)
    out = affine_fit(torch.zeros_like(t), t)
    torch.testing.assert_close(out, torch.full_like(t, float(t.mean())), atol=1e-6, rtol=0)


def test_psnr_definition_uses_ground_truth_range():
    t = torch.zeros(1, 1, 4, 4, 4)
    t[..., 0, 0, 0] = 2.0
    p = t + 0.1
    mse = 0.01
    assert psnr(p, t) == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-3)
    assert psnr(p[0, 0], t[0, 0], data_range=1.0) == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-3)


def test_affine_fit_metrics_score_a_rescaled_input_as_perfect():
    torch.manual_seed(1)
    t = torch.rand(1, 1, 16, 16, 16)
    m = AffineFitPSNRMetric(max_val=1.0)
    m(3 * t + 1, t)
    assert float(m.aggregate()) > 80
    s = AffineFitSSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)
    s(3 * t + 1, t)
    assert float(s.aggregate()) == pytest.approx(1.0, abs=1e-4)
    assert ssim(3 * t + 1, t) < 0.9  # plain SSIM is not scale invariant


def test_dim_structure_on_a_hand_made_case():
    from bundle.metrics import dim_structure

    truth = torch.zeros(4, 4, 4, dtype=torch.float64)
    truth[0, 0, :] = 1.0  # bright: outside the dim band
    truth[1, 0, :] = 0.2  # four dim voxels
    pred = truth.clone()
    pred[1, 0, :2] = 0.05  # two of them lost (below half their value)
    pred[3, 3, 3] = 0.2  # a dim voxel where the truth is background
    scores = dim_structure(pred, truth, fit=False)
    assert scores["dim_voxels"] == 4
    assert scores["dim_recall"] == pytest.approx(0.5)
    # output voxels in the 5-30 % band: two kept dim voxels, two lost ones at 0.05, one false: 4 of 5 on structure
    assert scores["dim_precision"] == pytest.approx(4 / 5)
    perfect = dim_structure(truth * 3.0 + 1.0, truth)  # the affine fit undoes a scaling
    assert perfect["dim_recall"] == pytest.approx(1.0) and perfect["dim_precision"] == pytest.approx(1.0)


def test_data_consistency_is_one_at_the_truth_and_above_one_for_the_input():
    """No reference: re-blurring the true object explains the blurred stack to its noise level."""
    from bundle.metrics import DataConsistencyMetric
    from bundle.networks import PoissonGaussianNoise, PSFLayer

    torch.manual_seed(0)
    blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", init="gaussian", init_fwhm=(0.4, 0.2, 0.2), gain=2.0, offset=0.05)
    noise = PoissonGaussianNoise(photons_per_unit=200.0, gaussian_sigma=0.01)
    x = (torch.rand(2, 1, 16, 24, 24) > 0.97).float()
    with torch.no_grad():
        y = noise(blur(x))
    metric = DataConsistencyMetric(blur=blur, noise=noise)
    at_truth = float(metric(x, y).mean())
    at_input = float(DataConsistencyMetric(blur=blur, noise=noise)(y, y).mean())
    assert 0.85 < at_truth < 1.15
    assert at_input > 1.5 * at_truth  # the blurred input does not explain itself once re-blurred
    metric.reset()
    metric(x, y)
    assert float(metric.aggregate()) == pytest.approx(at_truth, rel=1e-4)
    assert torch.isnan(DataConsistencyMetric(blur=None)(x, y)).all()  # supervised: no blur path


def test_no_reference_score_is_highest_at_the_truth_and_symmetric_in_log_consistency():
    from bundle.metrics import DataConsistencyMetric, NoReferenceScore
    from bundle.networks import PoissonGaussianNoise, PSFLayer

    torch.manual_seed(0)
    blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", init="gaussian", init_fwhm=(0.4, 0.2, 0.2))
    noise = PoissonGaussianNoise(photons_per_unit=200.0, gaussian_sigma=0.01)
    x = (torch.rand(2, 1, 16, 24, 24) > 0.97).float()
    with torch.no_grad():
        y = noise(blur(x))
    at_truth = float(NoReferenceScore(blur=blur, noise=noise)(x, y).mean())
    at_input = float(NoReferenceScore(blur=blur, noise=noise)(y, y).mean())
    dark = float(NoReferenceScore(blur=blur, noise=noise)(torch.zeros_like(x), y).mean())
    assert -0.15 < at_truth <= 0 and at_input < at_truth - 0.3 and dark < at_input
    # -|ln c|: a consistency of c and of 1/c score the same
    c = DataConsistencyMetric(blur=blur, noise=noise)(y, y)
    score = NoReferenceScore(blur=blur, noise=noise)(y, y)
    torch.testing.assert_close(score, -torch.log(c).abs())


def test_decorrelation_resolution_follows_the_blur_and_finds_none_in_noise():
    from scipy import ndimage

    from bundle.metrics import decorrelation_resolution

    rng = np.random.default_rng(0)
    points = np.zeros((128, 128))
    idx = rng.integers(0, 128, (300, 2))
    points[idx[:, 0], idx[:, 1]] = 1
    found = []
    for sigma in (1.5, 3.0, 5.0):
        image = ndimage.gaussian_filter(points, sigma) * 100
        image += rng.normal(0, image.max() * 0.01, image.shape)
        found.append(decorrelation_resolution(torch.from_numpy(image)))
    for res, sigma in zip(found, (1.5, 3.0, 5.0), strict=True):  # about the FWHM (2.355 sigma)
        assert 0.8 * 2.355 * sigma < res < 1.3 * 2.355 * sigma
    assert decorrelation_resolution(torch.from_numpy(rng.normal(size=(128, 128)))) == float("inf")


def test_cycle_error_and_psf_stability():
    from bundle.metrics import CycleErrorMetric, DecorrelationResolutionMetric, PSFStabilityMetric
    from bundle.networks import PSFLayer

    torch.manual_seed(0)
    blur = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="free", init="gaussian", init_fwhm=(0.3, 0.2, 0.2))
    x = torch.rand(1, 1, 8, 16, 16)
    identity = torch.nn.Identity()
    identity.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # a device to read
    # G = identity: G(h(x)) = h(x), so the cycle error is |h(x) - x| / |x| > 0; G = the exact inverse would give 0
    err = float(CycleErrorMetric(identity, blur)(x).mean())
    with torch.no_grad():
        expected = float((blur(x) - x).abs().mean() / x.abs().mean())
    assert err == pytest.approx(expected, rel=1e-5) and err > 0.05
    stability = PSFStabilityMetric(blur)
    stability(x)
    assert torch.isnan(stability.aggregate())  # nothing to compare with yet
    assert float(stability.aggregate()) == pytest.approx(1.0)  # unchanged kernel
    with torch.no_grad():
        for p in blur.parameters():
            p.add_(torch.randn_like(p))
    assert float(stability.aggregate()) < 0.99
    res = DecorrelationResolutionMetric(voxel_size=(0.2, 0.1, 0.1), planes=2)(torch.rand(1, 1, 4, 32, 32))
    assert res.shape == (1, 1)


class _Box(torch.nn.Module):
    """A 3x3x3 box blur (the blur path h of the tests)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Scaled(torch.nn.Module):
    """G stand-ins: ``factor * x`` (1: identity, 0: a collapsed, constant output)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(float(factor)))

    def forward(self, x):
        return self.factor * x


def _sharp_volumes(n=2, seed=0):
    """Blobs a few voxels wide in [0, 1] (wider than the box blur, so the blurred stack still resembles them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seeds = (torch.rand(1, 1, 8, 16, 16, generator=g) > 0.97).float()
        blobs = torch.nn.functional.max_pool3d(seeds, 3, stride=1, padding=1)[0]
        out.append(blobs)
    return out


def test_sharp_cycle_score_ranks_generators_and_its_baseline_is_the_synthetic_stack():
    from bundle.metrics import SharpCycleScore
    from bundle.networks import PoissonGaussianNoise

    volumes, blur = _sharp_volumes(), _Box()
    noise = PoissonGaussianNoise(photons_per_unit=200.0, gaussian_sigma=0.01).eval()

    def score(network, baseline=False):
        metric = SharpCycleScore(network=network, blur=blur, noise=noise, volumes=volumes, seed=3, baseline=baseline)
        metric(torch.zeros(1, 1, 4, 4, 4))
        return float(metric.aggregate())

    identity, collapsed = score(_Scaled(1.0)), score(_Scaled(0.0))
    assert identity > collapsed + 3.0  # a constant output is only worth the mean after the fit
    assert score(_Scaled(1.0), baseline=True) == pytest.approx(identity, abs=1e-6)  # same noise draw
    assert not noise.training  # the noise model is put back in eval mode

    # hand-made: the identity network's score is the PSNR of the fitted synthetic stack itself
    torch.manual_seed(3)
    expected = []
    noise.train()
    for x in volumes:
        y = noise(blur(x[None]))
        expected.append(psnr(affine_fit(y.double(), x[None].double()).float(), x[None]))
    noise.eval()
    assert identity == pytest.approx(float(np.mean(expected)), abs=1e-4)


def test_sharp_cycle_score_once_per_validation_leaves_training_rng_alone_and_checks_inputs():
    from bundle.metrics import SharpCycleScore

    calls = []

    class Counting(_Scaled):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    volumes = [{"image": v} for v in _sharp_volumes(3)]  # a MONAI Dataset's items
    metric = SharpCycleScore(network=Counting(1.0), blur=_Box(), volumes=volumes, max_volumes=2)
    state = torch.get_rng_state()
    for _ in range(3):  # three validation batches
        metric(torch.zeros(1, 1, 4, 4, 4))
    first = float(metric.aggregate())
    assert len(calls) == 2 and math.isfinite(first)  # two volumes, scored once
    assert torch.equal(torch.get_rng_state(), state)
    metric.reset()
    metric(torch.zeros(1, 1, 4, 4, 4))
    assert len(calls) == 4 and float(metric.aggregate()) == pytest.approx(first)  # same pairs next time

    shapes = []

    class Divisible(_Scaled):
        divisor = 4

        def forward(self, x):
            shapes.append(tuple(x.shape[2:]))
            return super().forward(x)

    cropped = SharpCycleScore(network=Divisible(1.0), blur=_Box(), volumes=[torch.rand(1, 10, 19, 30)], roi_size=(16, 16, 16))
    cropped(torch.zeros(1, 1, 4, 4, 4))
    assert shapes == [(8, 16, 16)]  # the centre, at most roi_size, sides multiples of the divisor

    no_blur = SharpCycleScore(network=_Scaled(1.0), blur=None, volumes=[])
    no_blur(torch.zeros(1, 1, 4, 4, 4))
    assert math.isnan(float(no_blur.aggregate()))
    bad = SharpCycleScore(network=_Scaled(1.0), blur=_Box(), volumes=[torch.zeros(8, 16, 16)])
    with pytest.raises(ValueError, match="sharp volume 0"):
        bad(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="max_volumes"):
        SharpCycleScore(network=_Scaled(1.0), blur=_Box(), volumes=volumes, max_volumes=0)
