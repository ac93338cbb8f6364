"""The deblurring generator G (blurred → sharp): a 3D U-Net with a sigmoid output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bundle.flags import as_flag
from bundle.networks.unet_levels import UNetLevels

__all__ = ["DeblurUNet", "MirrorPaddedDeblurUNet", "UNetLevels"]

_OUT_ACTIVATIONS = ("sigmoid", "none")

# name -> MONAI norm argument of the conv blocks (None: no normalisation layer)
_NORMS = {"instance": ("instance", {"affine": True}), "batch": ("batch", {}), "none": None}


def trained_input_range(network: torch.nn.Module) -> tuple[float, float] | None:
    """A generator's ``input_range`` buffer as ``(v_lo, v_hi)`` (also read from a TorchScript export);
    None when it has none or it is NaN (a model trained on per-volume percentiles)."""
    buffer = getattr(network, "input_range", None)
    if not isinstance(buffer, torch.Tensor) or buffer.numel() != 2 or not bool(torch.isfinite(buffer).all()):
        return None
    return float(buffer[0]), float(buffer[1])

class DeblurUNet(nn.Module):
    """3D U-Net generator G of Lim et al. 2020 ("CycleGAN with a Blur Kernel for Deconvolution Microscopy").

    As in the paper (Sec. III-A, Fig. 3): blocks conv 3×3×3 – norm – ReLU, a pooling layer and a skip
    connection every other convolution, a symmetric encoder/decoder and a sigmoid at the end. Built
    from MONAI's ``BasicUNet`` blocks (two convs per level) with non-trainable upsampling: each decoder
    step is a 1×1×1 conv, trilinear interpolation and two 3×3×3 convs, i.e. no transposed convolution
    and so no checkerboard artefacts.

    ``last_bias`` initialises the bias of the final 1×1×1 conv so the sigmoid output starts near
    ``sigmoid(last_bias)`` (≈ 0.018 for −4), the sparse dark background of fluorescence volumes.
    Trials showed that an output starting at 0.5 lets the L1 cycle loss drive the network to
    "predict background" and collapse.

    **Tiling.** With ``norm="instance"`` (the paper) the statistics are taken over whatever window the
    network sees, and a 4-pooling U-Net sees ±90 voxels: a sliding-window result then depends on the
    window plan. With ``norm="batch"`` (running statistics at inference) or ``"none"``,
    ``align_corners=False`` and a shallow ``depth``, a voxel's value depends only on the input within
    :attr:`receptive_radius` voxels, and :class:`~bundle.inference.Deconvolver` (with a halo of at least
    that) gives the same output for any window plan.

    Input size: every spatial side must be divisible by :attr:`divisor` = ``2**depth``, and (instance
    norm) the input must not be exactly ``divisor``³ (the bottleneck would be a single voxel).

    Args:
        in_channels: input channels (1 for a single-channel stack).
        out_channels: output channels.
        features: ``depth + 2`` feature counts, ``BasicUNet``'s convention: the encoder levels and the
            last decoder level (default: MONAI's ``BasicUNet``, 5.44 M parameters at depth 4).
        dropout: dropout ratio inside the conv blocks.
        last_bias: initial bias of the final conv (pre-sigmoid logit of the initial output).
        out_activation: ``"sigmoid"`` (the paper) or ``"none"`` (raw logits).
        norm: ``"instance"``, ``"batch"`` or ``"none"`` (see *Tiling*).
        depth: poolings by 2 (4 = ``BasicUNet``; 2 is CSBDeep/CARE's default).
        align_corners: of the trilinear upsampling (see :class:`UNetLevels`).
        voxel_size: ``(z, y, x)`` µm of the data it is trained on; kept in the state dict (buffer
            ``voxel_size``, NaN if unknown) so inference can warn about stacks of another voxel size.
        input_range: ``(v_lo, v_hi)`` raw intensities of the blurred domain mapped to [0, 1] in
            training when it used one scale for the whole domain (``blurred_intensity_range``); kept
            in the state dict (buffer ``input_range``, NaN: each volume's own percentiles) so inference
            normalises new stacks the same way.

    Example::

        >>> g_deblur = DeblurUNet(features=(16, 16, 32, 64, 128, 16))
        >>> x_hat = g_deblur(torch.rand(2, 1, 32, 32, 32))  # (B, 1, D, H, W) in (0, 1)
    """

    __jit_unused_properties__ = ["receptive_radius", "tiling_halo", "trained_voxel_size", "trained_input_range"]  # TorchScript export: not compiled

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
        last_bias: float = -4.0,
        out_activation: str = "sigmoid",
        norm: str = "instance",
        depth: int = 4,
        align_corners: bool = True,
        voxel_size: Sequence[float] | None = None,
        input_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if out_activation not in _OUT_ACTIVATIONS:
            raise ValueError(f"out_activation must be one of {_OUT_ACTIVATIONS}, got {out_activation!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {tuple(_NORMS)}, got {norm!r}")
        if len(tuple(features)) != int(depth) + 2:
            raise ValueError(f"features must have depth + 2 = {int(depth) + 2} entries, got {tuple(features)}")
        self.unet = UNetLevels(
            in_channels, out_channels, features, int(depth), "relu", _NORMS[norm], True, dropout, as_flag(align_corners, "align_corners")
        )
        with torch.no_grad():
            self.unet.final_conv.bias.fill_(float(last_bias))
        self.out_activation = out_activation
        self.norm = norm
        self.depth = int(depth)
        self.align_corners = as_flag(align_corners, "align_corners")
        self.divisor = 2 ** int(depth)
        # the settings that the weights do not reveal travel in the state dict (model.pt alone rebuilds
        # the network: bundle.inference.network_from_state_dict); checkpoints without them still load
        self.register_buffer("settings", torch.tensor([self.depth, int(self.align_corners), list(_NORMS).index(norm)]))
        vs = [float("nan")] * 3 if voxel_size is None else [float(v) for v in voxel_size]
        if len(vs) != 3:
            raise ValueError(f"voxel_size must be (z, y, x) in µm, got {voxel_size}")
        self.register_buffer("voxel_size", torch.tensor(vs, dtype=torch.float64))
        ir = [float("nan")] * 2 if input_range is None else [float(v) for v in input_range]
        if len(ir) != 2 or (input_range is not None and not ir[0] < ir[1]):
            raise ValueError(f"input_range must be (v_lo, v_hi) with v_lo < v_hi, got {input_range}")
        self.register_buffer("input_range", torch.tensor(ir, dtype=torch.float64))
        self._register_load_state_dict_pre_hook(self._fill_settings)

    def _fill_settings(self, state_dict, prefix, *args) -> None:
        key = prefix + "settings"
        if prefix + "voxel_size" not in state_dict:  # written before the voxel size was stored: unknown
            state_dict[prefix + "voxel_size"] = torch.full_like(self.voxel_size, float("nan"))
        if prefix + "input_range" not in state_dict:  # written before the input range was stored: per volume
            state_dict[prefix + "input_range"] = torch.full_like(self.input_range, float("nan"))
        if key not in state_dict:  # a checkpoint written before the settings were stored
            state_dict[key] = self.settings.clone()
        elif not torch.equal(state_dict[key].to(self.settings), self.settings):
            raise RuntimeError(
                f"checkpoint of a DeblurUNet with settings {self.describe(state_dict[key])}, "
                f"this one has {self.describe(self.settings)}"
            )

    @property
    def trained_voxel_size(self) -> tuple[float, float, float] | None:
        """``(z, y, x)`` µm the weights were trained at (the ``voxel_size`` buffer), None if unknown."""
        vs = tuple(float(v) for v in self.voxel_size)
        return None if any(math.isnan(v) for v in vs) else vs  # type: ignore[return-value]

    @property
    def trained_input_range(self) -> tuple[float, float] | None:
        """``(v_lo, v_hi)`` mapped to [0, 1] for every training stack, None if training normalised each
        stack by its own percentiles (:func:`trained_input_range`)."""
        return trained_input_range(self)

    @staticmethod
    def describe(settings: torch.Tensor) -> dict[str, object]:
        """``{"depth", "align_corners", "norm"}`` of a ``settings`` buffer."""
        depth, align, norm = (int(v) for v in settings)
        return {"depth": depth, "align_corners": bool(align), "norm": list(_NORMS)[norm]}

    @property
    def tiling_halo(self) -> int:
        """Halo for plan-independent sliding windows (:class:`~bundle.inference.Deconvolver`), 0 if none works.

        Instance norm or corner-aligned upsampling make the output depend on the window whatever the
        halo. Otherwise it is the :attr:`receptive_radius` (rounded up to a multiple of half the
        divisor): no window's border is within reach of a kept voxel, so every window plan gives the same
        output up to float rounding (measured on a trained depth-2 model: identical; a halo of 16 voxels
        instead of 26 already agreed to 71-87 dB).
        """
        if self.norm == "instance" or self.align_corners:
            return 0
        step = max(1, self.divisor // 2)
        return int(math.ceil(self.receptive_radius / step) * step)

    @property
    def receptive_radius(self) -> int:
        """Voxels on each side of an output voxel that can change it: ``8·2**depth − 6``.

        Measured exactly (autograd through the network with its ReLUs removed, so no path is cut, the
        largest reach over the positions within one pooling period): 10, 26, 58, 122 voxels for depths
        1-4; the tests check depths 1-3.
        """
        return 8 * 2**self.depth - 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, in_channels, D, H, W)`` with D, H, W divisible by :attr:`divisor`.

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
                f"DeblurUNet needs spatial sizes divisible by {self.divisor} ({self.depth} poolings), got "
                f"{tuple(x.shape[2:])}; crop/pad the volume or use a sliding-window roi_size that is a multiple "
                f"of {self.divisor}"
            )
        if self.norm == "instance" and all(s == self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"DeblurUNet needs an input larger than {self.divisor}^3 (its bottleneck would be one voxel, "
                f"where instance norm is undefined); use e.g. {2 * self.divisor}^3 patches"
            )


class MirrorPaddedDeblurUNet(DeblurUNet):
    """``DeblurUNet`` that mirror-pads its input by ``pad`` voxels on every side and crops the result.

    This is what the bundle's tiled inference does to a whole stack (:class:`bundle.inference.Deconvolver`
    with the network's ``tiling_halo``): with a pad that is that halo, one forward pass of this module
    equals the bundle's own deconvolution, so a package for other tools (``scripts/export_bioimageio.py``)
    gives the same numbers. The state dict is the ``DeblurUNet``'s (same keys).

    Args:
        pad: voxels mirrored on every side (< every side of the input), a multiple of ``2**(depth-1)``
            keeps the poolings' phase.
        kwargs: the ``DeblurUNet`` arguments.
    """

    def __init__(self, pad: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` with sides divisible by ``divisor`` and larger than ``pad`` -> same shape."""
        p = self.pad
        if p > 0:
            x = torch.nn.functional.pad(x, [p, p, p, p, p, p], mode="reflect")
        out = self.unet(x)
        out = torch.sigmoid(out) if self.out_activation == "sigmoid" else out
        if p > 0:
            out = out[:, :, p:-p, p:-p, p:-p]
        return out
