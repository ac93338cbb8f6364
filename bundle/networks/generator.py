"""The deblurring generator G (blurred → sharp): a 3D U-Net with a sigmoid output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn

__all__ = ["DeblurUNet"]

_OUT_ACTIVATIONS = ("sigmoid", "none")
# name -> MONAI norm argument of BasicUNet (None: no normalisation layer)
_NORMS = {"instance": ("instance", {"affine": True}), "batch": ("batch", {}), "none": None}


class DeblurUNet(nn.Module):
    """3D U-Net generator G of Lim et al. 2020 ("CycleGAN with a Blur Kernel for Deconvolution Microscopy").

    As in the paper (Sec. III-A, Fig. 3): blocks conv 3×3×3 – InstanceNorm – ReLU, a pooling layer
    and a skip connection every other convolution, a symmetric encoder/decoder and a sigmoid at
    the end. Built from MONAI's ``BasicUNet`` (two convs per level, 4 max-poolings) with
    ``upsample="nontrainable"``: each decoder step is a 1×1×1 conv, trilinear interpolation
    (BasicUNet's ``"linear"`` interp mode, ``align_corners=True``) and two 3×3×3 convs, i.e. no
    transposed convolution and so no checkerboard artefacts.

    ``last_bias`` initialises the bias of the final 1×1×1 conv so the sigmoid output starts near
    ``sigmoid(last_bias)`` (≈ 0.018 for −4), the sparse dark background of fluorescence volumes.
    Trials showed that an output starting at 0.5 lets the L1 cycle loss drive the network to
    "predict background" and collapse.

    Input size: every spatial side must be divisible by 16 (4 poolings by 2), and the input must
    not be exactly 16³ (the bottleneck would be a single voxel, where instance norm is undefined);
    e.g. 32³ or 64³ patches and a sliding-window ``roi_size`` that is a multiple of 16.

    Args:
        in_channels: input channels (1 for a single-channel stack).
        out_channels: output channels.
        features: six feature counts, BasicUNet's convention: five encoder levels and the last
            decoder level. The paper's U-Net is larger; the default is MONAI's (5.44 M parameters;
            ``(16, 16, 32, 64, 128, 16)`` has 1.36 M).
        dropout: dropout ratio inside the conv blocks.
        last_bias: initial bias of the final conv (pre-sigmoid logit of the initial output).
        out_activation: ``"sigmoid"`` (the paper) or ``"none"`` (raw logits).
        norm: normalisation after each conv: ``"instance"`` (the paper; its statistics are taken over
            whatever window the network sees, so a sliding-window result depends on the window plan),
            ``"batch"`` (running statistics at inference) or ``"none"``; the last two give the same value
            for a voxel whatever window it is computed in.

    Example::

        >>> g_deblur = DeblurUNet(features=(16, 16, 32, 64, 128, 16))
        >>> x_hat = g_deblur(torch.rand(2, 1, 32, 32, 32))  # (B, 1, D, H, W) in (0, 1)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
        last_bias: float = -4.0,
        out_activation: str = "sigmoid",
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if len(tuple(features)) != 6:
            raise ValueError(f"features must have 6 entries (BasicUNet convention), got {tuple(features)}")
        if out_activation not in _OUT_ACTIVATIONS:
            raise ValueError(f"out_activation must be one of {_OUT_ACTIVATIONS}, got {out_activation!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {tuple(_NORMS)}, got {norm!r}")
        self.unet = BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(int(f) for f in features),
            act="relu",
            norm=_NORMS[norm],
            bias=True,
            dropout=dropout,
            upsample="nontrainable",
        )
        with torch.no_grad():
            self.unet.final_conv.bias.fill_(float(last_bias))
        self.out_activation = out_activation
        self.norm = norm
        self.divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, in_channels, D, H, W)`` with D, H, W divisible by 16, not 16³.

        Returns: ``(B, out_channels, D, H, W)``, in (0, 1) with the sigmoid.
        """
        if not torch.jit.is_scripting():  # TorchScript (ckpt_export) cannot compile the checks' messages
            self._check_input(x)
        out = self.unet(x)
        return torch.sigmoid(out) if self.out_activation == "sigmoid" else out

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError explaining a wrong input shape (not compiled by TorchScript)."""
        if x.ndim != 5:
            raise ValueError(f"DeblurUNet expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(
                f"DeblurUNet needs spatial sizes divisible by {self.divisor} (4 poolings), got "
                f"{tuple(x.shape[2:])}; crop/pad the volume or use a sliding-window roi_size that is a multiple "
                f"of {self.divisor}"
            )
        if all(s == self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"DeblurUNet needs an input larger than {self.divisor}^3 (its bottleneck would be one voxel, "
                "where instance norm is undefined); use e.g. 32^3 patches"
            )
