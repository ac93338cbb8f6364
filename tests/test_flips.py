"""Test-time view averaging: exact inverses, the group average of a non-symmetric map, the wiring."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.inference import Deconvolver, TiledInferer
from bundle.inference.flips import FLIP_CHOICES, check_flips, flip_average
from bundle.networks import DeblurUNet

from conftest import ROOT

SMALL = (4, 4, 8, 8, 16, 4)


@pytest.mark.parametrize("flips", FLIP_CHOICES)
def test_every_view_is_undone_exactly(flips):
    x = torch.rand(2, 1, 3, 5, 7)
    seen = []
    out = flip_average(lambda v: (seen.append(v.clone()), v * 2.0)[1], x, flips)
    torch.testing.assert_close(out, x * 2.0)  # an equivariant map is unchanged by the average
    assert len(seen) == flips
    assert len({tuple(v.flatten().tolist()) for v in seen}) == flips  # every view differs
    assert {tuple(v.shape) for v in seen} == ({(2, 1, 3, 5, 7)} if flips < 8 else {(2, 1, 3, 5, 7), (2, 1, 3, 7, 5)})


def test_a_map_that_is_not_symmetric_is_averaged_over_the_group():
    """run(x) = x · (index along the last axis): mirrors in X average the ramp to its mean (W − 1)/2,
    transposes turn it into a ramp along Y with mean (H − 1)/2."""
    h, w = 5, 9
    x = torch.rand(1, 1, 2, h, w)

    def ramp(v):
        return v * torch.arange(v.shape[-1], dtype=v.dtype)

    torch.testing.assert_close(flip_average(ramp, x, 1), ramp(x))
    torch.testing.assert_close(flip_average(ramp, x, 2), x * (w - 1) / 2)
    torch.testing.assert_close(flip_average(ramp, x, 4), x * (w - 1) / 2)
    torch.testing.assert_close(flip_average(ramp, x, 8), x * ((w - 1) / 2 + (h - 1) / 2) / 2)


@pytest.mark.parametrize("bad", [0, 3, 16, True, "eight", 2.5])
def test_bad_counts_are_named(bad):
    with pytest.raises(ValueError, match=r"flips must be one of \(1, 2, 4, 8\)"):
        check_flips(bad)
    with pytest.raises(ValueError, match="flips must be one of"):
        Deconvolver(DeblurUNet(features=SMALL), roi_size=(32, 32, 32), flips=bad)
    assert check_flips("8") == 8  # the command line passes strings


def test_the_deconvolver_averages_its_own_tiled_views_and_counts_them_in_its_progress():
    torch.manual_seed(0)
    net = DeblurUNet(features=SMALL).eval()
    x = torch.rand(1, 1, 20, 40, 24)
    once = Deconvolver(net, roi_size=(16, 32, 32), sw_batch_size=2)
    calls = []
    averaged = Deconvolver(net, roi_size=(16, 32, 32), sw_batch_size=2, flips=8, callback=lambda d, t: calls.append((d, t)))
    with torch.no_grad():
        out = averaged(x)
        by_hand = flip_average(once, x, 8)
        plain = once(x)
    torch.testing.assert_close(out, by_hand)
    assert float((out - plain).abs().max()) > 1e-4  # a U-Net is not exactly equivariant: the views differ
    assert calls[-1][0] == calls[-1][1] and calls[-1][1] % 8 == 0 and len(calls) >= 8


def test_inference_averages_eight_views_by_default_and_validation_one():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("common.json", "inference.json")])
    assert parser.get_parsed_content("inference_flips") == 8
    assert parser.get_parsed_content("inferer", lazy=False).flips == 8
    train = ConfigParser()
    train.read_config([str(ROOT / "configs" / f) for f in ("common.json", "train.json")])
    assert "flips" not in train.get("validate#inferer") and TiledInferer().flips == 1  # checkpoints ranked on one view


def test_richardson_lucy_runs_one_view_and_is_not_refined():
    """RL is linear and commutes with the symmetries: eight views would only cost 8×; and a model folder's
    refinement.json must not refine the RL baseline."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("common.json", "inference.json", "inference_rl.json")])
    assert parser.get_parsed_content("inference_flips") == 1
    assert parser.get_parsed_content("refine_iterations") == 0
