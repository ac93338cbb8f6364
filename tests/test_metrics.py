import math

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
    blur = PSFLayer(kernel_size=(7, 7, 7), parameterization="fixed", init="gaussian", init_fwhm=(0.4, 0.2, 0.2), gain=2.0, offset=0.05)
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
    blur = PSFLayer(kernel_size=(7, 7, 7), parameterization="fixed", init="gaussian", init_fwhm=(0.4, 0.2, 0.2))
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
