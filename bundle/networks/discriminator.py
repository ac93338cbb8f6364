"""Multi-scale PatchGAN discriminator (pix2pixHD style): PatchGANs at full, ½ and ¼ resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator
from torch import nn

__all__ = ["MultiScalePatchDiscriminator", "patchgan_output_size"]

_PADDING = 1
_GAMMA_EPS = 1e-3


def _conv_out(n: int, kernel_size: int, stride: int, padding: int = _PADDING) -> int:
    return (n + 2 * padding - kernel_size) // stride + 1


def patchgan_output_size(n: int, num_layers_d: int, kernel_size: int = 4) -> tuple[int, int]:
    """Side of MONAI ``PatchDiscriminator``'s output and of its last normalised feature map.

    The network is: a stride-2 conv, ``num_layers_d`` normalised convs (stride 2 except the last,
    stride 1), a stride-1 output conv; all with padding 1.

    Args:
        n: input side length.
        num_layers_d: ``PatchDiscriminator``'s ``num_layers_d``.
        kernel_size: conv kernel size.

    Returns:
        ``(output side, smallest side seen by an instance norm)``; sizes ≤ 0 mean "too small".
    """
    n = _conv_out(n, kernel_size, 2)
    normed = n
    for layer in range(num_layers_d):
        n = _conv_out(n, kernel_size, 1 if layer == num_layers_d - 1 else 2)
        normed = min(normed, n)
    out = _conv_out(n, kernel_size, 1, padding=(kernel_size - 1) // 2)
    return out, normed


class MultiScalePatchDiscriminator(nn.Module):
    """Independent PatchGANs that see the input at full, ½, ¼, … resolution (pix2pixHD).

    Lim et al. 2020 (Sec. III-B, Fig. 4) follow cycleGAN's multi-PatchGAN: three PatchGANs see the
    input at original, half and quarter size (Wang et al., pix2pixHD, CVPR 2018). Each scale is a
    MONAI ``PatchDiscriminator`` (LeakyReLU 0.2, no final activation) with its own parameters;
    the input of scale ``s`` is downsampled ``s`` times by 3D average pooling (kernel 3, stride 2,
    padding 1, ``count_include_pad=False``). MONAI's own ``MultiScalePatchDiscriminator`` is
    multi-scale by depth, not by resolution, hence this module.

    Small inputs: the ¼ scale of a 32³ patch is 8³. Each scale therefore uses the largest number of
    normalised layers ``≤ num_layers_d`` for which a patch of side ``min_input_size / 2**s`` still
    gives ≥ 1 output voxel and every instance norm sees ≥ 2 voxels per side (e.g. with
    ``kernel_size=4`` and ``min_input_size=32``: 3, 2 and 1 layers). Inputs smaller than
    ``min_input_size`` raise ``ValueError``; larger inputs give larger patch maps.

    Args:
        in_channels: input channels.
        channels: filters of the first conv (doubled at each layer).
        num_layers_d: normalised conv layers per PatchGAN (at most; see above).
        num_scales: number of PatchGANs / resolutions (1–4).
        norm: MONAI norm name, e.g. ``"INSTANCE"`` (the paper) or ``"BATCH"``.
        kernel_size: conv kernel size (4 as in pix2pix, or 3).
        dropout: dropout ratio inside the PatchGANs.
        min_input_size: smallest spatial side the discriminator must accept (the training crop).
        input_gamma: the PatchGANs see ``(max(x, 0) + ε)^γ − ε^γ`` (ε = 1e-3) instead of ``x``; 1
            (default) is ``x`` itself. γ < 1 (e.g. 0.5) stretches faint intensities, so faint
            structure is as visible to the discriminator as bright structure (a linear view lets it
            judge mostly the bright voxels, and a generator may then give faint ones up for a clean
            background); γ > 1 hides them. Scale-free: with instance norm, ``a·x`` and ``x`` look
            alike up to ε. Written here rather than MONAI's ``AdjustContrast``, which rescales by each
            volume's own min and range, so a crop's view would depend on what else it holds.
        input_noise: standard deviation of Gaussian "instance noise" added to the view in training mode
            only, to real and generated inputs alike (Sønderby et al., ICLR 2017; Arjovsky & Bottou,
            ICLR 2017): differences below it — a generator's dark floor against exactly-zero real
            background, faint noise-like residue — are hidden from the discriminator, which then judges
            structure above that level. 0 (default) adds nothing; in eval mode nothing is added.

    Example::

        >>> d_sharp = MultiScalePatchDiscriminator(channels=16, num_scales=3)
        >>> logits = d_sharp(torch.rand(2, 1, 32, 32, 32))  # list of 3 tensors (B, 1, d, h, w)
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        num_layers_d: int = 3,
        num_scales: int = 3,
        norm: str = "INSTANCE",
        kernel_size: int = 4,
        dropout: float = 0.0,
        min_input_size: int = 32,
        input_gamma: float = 1.0,
        input_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not input_gamma > 0:
            raise ValueError(f"input_gamma must be > 0, got {input_gamma}")
        if not float(input_noise) >= 0:
            raise ValueError(f"input_noise must be >= 0, got {input_noise}")
        self.input_gamma = float(input_gamma)
        self.input_noise = float(input_noise)
        if not 1 <= num_scales <= 4:
            raise ValueError(f"num_scales must be between 1 and 4, got {num_scales}")
        if kernel_size not in (3, 4, 5):
            raise ValueError(f"kernel_size must be 3, 4 or 5, got {kernel_size}")
        if num_layers_d < 0:
            raise ValueError(f"num_layers_d must be >= 0, got {num_layers_d}")
        self.num_scales = num_scales
        self.min_input_size = int(min_input_size)
        self.kernel_size = kernel_size
        self.layers_per_scale: list[int] = []
        for scale in range(num_scales):
            side = self._downsampled(self.min_input_size, scale)
            layers = num_layers_d
            while layers >= 0 and not self._fits(side, layers):
                layers -= 1
            if layers < 0:
                raise ValueError(
                    f"min_input_size={min_input_size} is too small for {num_scales} scales: at scale {scale} "
                    f"the input is {side} voxels, too small for a PatchGAN with kernel_size={kernel_size}"
                )
            self.layers_per_scale.append(layers)
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(
                spatial_dims=3,
                channels=channels,
                in_channels=in_channels,
                out_channels=1,
                num_layers_d=layers,
                kernel_size=kernel_size,
                norm=norm,
                dropout=dropout,
                padding=_PADDING,
            )
            for layers in self.layers_per_scale
        )

    def _fits(self, side: int, layers: int) -> bool:
        out, normed = patchgan_output_size(side, layers, self.kernel_size)
        return out >= 1 and (layers == 0 or normed >= 2)

    @staticmethod
    def _downsampled(side: int, times: int) -> int:
        for _ in range(times):
            side = _conv_out(side, 3, 2)
        return side

    @staticmethod
    def downsample(x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution: ``(B, C, D, H, W)`` → ``(B, C, ⌈D/2⌉, ⌈H/2⌉, ⌈W/2⌉)``."""
        return F.avg_pool3d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The intensities the PatchGANs see: ``x`` for ``input_gamma`` 1, else the power law above (same shape)."""
        if self.input_gamma == 1.0:
            return x
        return (x.clamp(min=0) + _GAMMA_EPS) ** self.input_gamma - _GAMMA_EPS**self.input_gamma

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x: ``(B, in_channels, D, H, W)``, every side ≥ ``min_input_size``.

        Returns: list of ``num_scales`` patch logits ``(B, 1, d_s, h_s, w_s)`` (no activation),
        full resolution first.
        """
        return [layers[-1] for layers in self.features(x)]

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Every layer's output at every scale, for a feature-matching loss (:class:`bundle.losses.FeatureMatchingLoss`).

        Args: x: as :meth:`forward`.

        Returns: per scale (full resolution first), the outputs of the PatchGAN's layers in order
        ``(B, C_l, d_l, h_l, w_l)``, the last being the logits :meth:`forward` returns.
        """
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(
                f"input {tuple(x.shape[2:])} is smaller than min_input_size={self.min_input_size}; "
                "build the discriminator with a smaller min_input_size"
            )
        x = self.view(x)
        if self.training and self.input_noise > 0:
            x = x + self.input_noise * torch.randn_like(x)
        outputs: list[list[torch.Tensor]] = []
        for scale, disc in enumerate(self.discriminators):
            if scale > 0:
                x = self.downsample(x)
            outputs.append(list(disc(x)))
        return outputs
