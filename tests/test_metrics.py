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
