"""Registration helpers of the kernels: a 0-dim float32 tensor as a parameter (learned) or a buffer (kept
in the state dict), and a residual kernel's logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def register_scalar(module: nn.Module, name: str, value: float, learn: bool) -> None:
    """Register ``name`` on ``module``: an ``nn.Parameter`` if ``learn``, else a buffer; both are saved."""
    tensor = torch.tensor(float(value), dtype=torch.float32)
    if learn:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


def residual_logits(module: nn.Module, size: Sequence[int], floor: float) -> tuple[int, int, int]:
    """Register a residual kernel on ``module``: the parameter ``residual_logits`` (``size``, odd), whose
    softmax is the identity up to ``floor`` of its mass, and the buffer ``residual_released`` (0: frozen).

    Returns:
        the residual's ``(z, y, x)`` size.
    """
    rs = tuple(int(s) for s in size)
    if len(rs) != 3 or any(s < 1 or s % 2 == 0 for s in rs):
        raise ValueError(f"residual_size must be three odd positive sizes, got {tuple(size)}")
    if any(r > s for r, s in zip(rs, module.shape)):
        raise ValueError(f"residual_size {rs} is larger than the kernel {module.shape}")
    if not 0.0 < floor < 1.0:
        raise ValueError(f"residual_floor must be in (0, 1), got {floor}")
    count = rs[0] * rs[1] * rs[2]
    logits = torch.zeros(rs)
    if count > 1:
        logits.fill_(math.log(floor / ((count - 1) * (1.0 - floor))))
        logits[rs[0] // 2, rs[1] // 2, rs[2] // 2] = 0.0
    module.residual_logits = nn.Parameter(logits)
    module.register_buffer("residual_released", torch.tensor(0, dtype=torch.uint8))  # 1 = released
    return rs  # type: ignore[return-value]
