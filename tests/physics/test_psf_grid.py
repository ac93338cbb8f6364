from __future__ import annotations

import math

import torch
from torch import nn

from bundle.physics.psf_grid import grid_start


class _Layer(nn.Module):
    """A stand-in PSF layer: ``set_na_`` refuses NAs above 1.5, as a kernel bounded by its immersion index."""

    def __init__(self) -> None:
        super().__init__()
        self.na = 1.0

    def set_na_(self, value: float) -> None:
        if value > 1.5:
            raise ValueError("above the immersion index")
        self.na = value


def test_grid_start_leaves_the_layer_at_the_best_value_and_skips_the_out_of_bounds_ones():
    layer = _Layer()
    log_by = torch.log(torch.linspace(1.0, 2.0, 8, dtype=torch.float64))
    # the model's spectrum matches the data's only at NA 1.3 (up to a scale the fit absorbs)
    model_power = lambda: torch.exp(log_by) * (1.0 + 10.0 * abs(layer.na - 1.3) * torch.linspace(0, 1, 8, dtype=torch.float64))  # noqa: E731
    log_scale = torch.zeros((), dtype=torch.float64)
    log_noise = torch.tensor(math.log(1e-6), dtype=torch.float64)
    record = grid_start(layer, "na", 1.0, [0.9, 1.3, 1.45, 1.6, 1.8], model_power, log_by, log_scale, log_noise, steps=200)
    assert record["best_na"] == 1.3 and layer.na == 1.3
    assert record["start_na"] == 1.0 and record["tried"] == 4  # 1.6 and 1.8 refused by the layer
    assert record["best_loss"] < 1e-3 and abs(float(log_scale)) < 0.05  # the scale of the best value kept
