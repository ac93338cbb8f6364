"""MONAI's ``BasicUNet`` with a chosen depth, the body of the deblurring generator
(:class:`bundle.networks.DeblurUNet`).

Written here because ``BasicUNet`` has a fixed four poolings and MONAI's ``UNet`` has other blocks
and state-dict keys; this keeps ``BasicUNet``'s blocks and names so depth-4 checkpoints of either load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

__all__ = ["UNetLevels"]

_MAX_DEPTH = 4


class _NoLevel(nn.Module):
    """Stands in for the levels a shallow U-Net does not have (no parameters, so no state-dict keys),
    so that ``forward`` is one straight piece of code that TorchScript compiles for every depth."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return x


class UNetLevels(nn.Module):
    """MONAI's ``BasicUNet`` with a chosen number of poolings (``BasicUNet`` always has 4).

    Built from ``BasicUNet``'s own blocks and attribute names (``conv_0``, ``down_i``, ``upcat_i``,
    ``final_conv``), so a depth-4 instance has exactly ``BasicUNet``'s state-dict keys (checkpoints of
    either load into the other) and :class:`~bundle.inference.InferenceNetwork` rewrites it the same way.

    Args:
        in_channels, out_channels: channels.
        features: ``depth + 2`` counts: the ``depth + 1`` encoder levels, then the last decoder level.
        depth: poolings by 2.
        act, norm, bias, dropout: as ``BasicUNet``.
        align_corners: of the trilinear upsampling. ``True`` (``BasicUNet``'s default) samples at
            positions that depend on the input's size, so a voxel's value changes with the window it is
            computed in; ``False`` makes the network commute with shifts by multiples of ``2**depth``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features: Sequence[int],
        depth: int,
        act: str | tuple = "relu",
        norm: str | tuple | None = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float = 0.0,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        fea = [int(f) for f in features]
        if not 1 <= depth <= _MAX_DEPTH or len(fea) != depth + 2:
            raise ValueError(f"a U-Net of depth {depth} (1-{_MAX_DEPTH}) needs {depth + 2} features, got {tuple(fea)}")
        self.depth = int(depth)
        self.conv_0 = TwoConv(3, in_channels, fea[0], act, norm, bias, dropout)
        for i in range(1, depth + 1):
            setattr(self, f"down_{i}", Down(3, fea[i - 1], fea[i], act, norm, bias, dropout))
        for i in range(depth, 1, -1):
            up = UpCat(3, fea[i], fea[i - 1], fea[i - 1], act, norm, bias, dropout, "nontrainable", align_corners=align_corners)
            setattr(self, f"upcat_{i}", up)
        self.upcat_1 = UpCat(
            3, fea[1], fea[0], fea[-1], act, norm, bias, dropout, "nontrainable", align_corners=align_corners, halves=False
        )
        for i in range(depth + 1, _MAX_DEPTH + 1):
            setattr(self, f"down_{i}", _NoLevel())
            setattr(self, f"upcat_{i}", _NoLevel())
        self.final_conv = Conv["conv", 3](fea[-1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BasicUNet.forward, with the missing levels passing their input through
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u = self.upcat_4(x4, x3)
        u = self.upcat_3(u, x2)
        u = self.upcat_2(u, x1)
        return self.final_conv(self.upcat_1(u, x0))
