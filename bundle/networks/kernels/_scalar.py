"""A 0-dim float32 tensor registered as a parameter (learned) or a buffer (kept in the state dict)."""

from __future__ import annotations

import torch
from torch import nn


def register_scalar(module: nn.Module, name: str, value: float, learn: bool) -> None:
    """Register ``name`` on ``module``: an ``nn.Parameter`` if ``learn``, else a buffer; both are saved."""
    tensor = torch.tensor(float(value), dtype=torch.float32)
    if learn:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)
