"""Inference precision and the network rewritten for fast inference (bf16/fp16 copies, channels-last,
no-op pads skipped): :func:`resolve_precision`, :class:`InferenceNetwork`."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


PRECISIONS = ("float32", "bfloat16", "float16", "auto")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 conv3d
    runs about 2x faster than float32 (``docs/benchmark.md``); emulated bf16 elsewhere is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: do not guess
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """The precision ``"auto"`` stands for on ``device`` (others are returned unchanged, validated).

    ``"auto"``: bfloat16 on a CUDA device that supports it, else float16; on the CPU bfloat16 where
    the CPU has native bf16 (:func:`cpu_has_native_bf16`), else float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device if device is not None else "cpu")
    if precision == "float16" and dev.type == "cpu":
        raise ValueError("precision='float16' needs a CUDA device; on the CPU use 'bfloat16' or 'float32'")
    if precision != "auto":
        return precision
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if dev.type == "cpu" and cpu_has_native_bf16() else "float32"


class Float32Head(nn.Module):
    """A generator's last 1×1×1 convolution run in float32 on lower-precision features, a slab at a time.

    In bfloat16 the logits have 8 significant bits: near the sigmoid's dark floor (logit −4 to −6) they
    step by 1/32, so the background and dim output move in steps of about 3 %, and a nearly flat output
    (a model early in training) comes out as one constant value. This head is C features → 1 channel,
    so running it in float32 costs almost nothing; the features are converted ``slab`` planes of depth at
    a time so that their float32 copy stays small. Autocast is off inside it (float16 on CUDA). Written
    here because no library offers a mixed-precision output layer for a converted copy.

    Args:
        conv: the float32 convolution (copied, not shared).
        slab: planes of depth converted at once.

    Shapes: ``(B, C, D, H, W)`` any float dtype → float32 ``(B, out, D, H, W)``.
    """

    def __init__(self, conv: nn.Module, slab: int = 8) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv).float()
        self.slab = int(slab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype == torch.float32:
                return self.conv(x)
            return torch.cat([self.conv(x[:, :, z : z + self.slab].float()) for z in range(0, x.shape[2], self.slab)], 2)


def _fold_batch_norm(block: nn.Module) -> None:
    """Fold a MONAI ``Convolution`` block's batch norm (running statistics) into its convolution, in place.

    Only where the norm is the first op on the convolution's output (ADN ordering "N…", dropout aside:
    the identity in eval) and the convolution is a plain ``Conv3d``; the arithmetic is PyTorch's
    ``fuse_conv_bn_eval``. Exact in eval up to float rounding (measured: 7e-9 in float32).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    norm, conv = getattr(block.adn, "N", None), getattr(block, "conv", None)
    first = next((k for k in block.adn._modules if k != "D"), None)
    if (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and norm.track_running_stats
        and norm.running_mean is not None
        and first == "N"
        and type(conv) is nn.Conv3d
    ):
        block.conv = fuse_conv_bn_eval(conv, norm)
        block.adn.N = nn.Identity()


def _inference_copy(
    network: nn.Module,
    dtype: torch.dtype | None,
    channels_last: bool,
    float32_head: bool = False,
    fold_batch_norm: bool = True,
) -> nn.Module:
    """A converted deep copy of ``network`` for inference (see :class:`InferenceNetwork`)."""
    from monai.networks.blocks import Convolution
    from monai.networks.nets.basic_unet import UpCat

    from bundle.networks import DeblurUNet

    net = copy.deepcopy(network).eval()
    sizes_checked = isinstance(network, DeblurUNet)  # it rejects sides that are not multiples of 16
    for module in list(net.modules()):
        if sizes_checked and isinstance(module, UpCat):
            module.is_pad = False  # skip the replicate pad of zero width (a full copy of the upsampled map)
        for name, child in module.named_children():
            if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
                group = nn.GroupNorm(
                    child.num_features, child.num_features, eps=child.eps, affine=child.affine
                )
                if child.affine:
                    group.weight, group.bias = child.weight, child.bias
                setattr(module, name, group)
        if isinstance(module, Convolution) and hasattr(module, "adn"):
            if fold_batch_norm:
                _fold_batch_norm(module)
            for act in module.adn.modules():  # the activation is the last op on the conv's own output
                if isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.ELU)):
                    act.inplace = True
    if dtype is not None:
        net = net.to(dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    unet = getattr(net, "unet", None)
    if float32_head and isinstance(getattr(unet, "final_conv", None), nn.Conv3d):
        unet.final_conv = Float32Head(network.unet.final_conv)  # type: ignore[union-attr]
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class InferenceNetwork(nn.Module):
    """The generator rewritten for fast inference: same function, measured 2-3x faster on the CPU.

    What changes (each measured in ``docs/benchmark.md``, kept because it wins):

    * ``InstanceNorm3d`` becomes ``GroupNorm(C, C)``: the same normalisation (per sample and channel,
      same ``eps`` and affine weights), but PyTorch's GroupNorm has channels-last CPU kernels while
      InstanceNorm reshapes (copies) its input twice;
    * batch norm (running statistics) folded into the convolution before it: exact; on 2 CPU cores
      neutral to slight (0.98x and 1.10x in bfloat16, timed in alternation), kept because it removes a
      pass over every activation map, which is what batch norm costs where memory bandwidth limits;
    * MONAI ``Convolution`` blocks' activations run in place;
    * for a ``DeblurUNet`` (sides are multiples of 16), MONAI ``UpCat``'s zero-width replicate
      padding (which still copies the upsampled map) is skipped;
    * weights and activations in ``channels_last_3d`` (oneDNN's fast conv3d layout);
    * ``precision="bfloat16"``: weights and activations in bfloat16 (2x on CPUs with native bf16,
      output within ~70 dB PSNR of float32); ``"float16"``: CUDA autocast. In both, a
      :class:`DeblurUNet`'s last 1×1×1 convolution and the sigmoid run in float32
      (:class:`Float32Head`): the output keeps its dim and background levels to float32 precision.

    The converted copy is built on first use and rebuilt whenever a parameter or buffer of ``network`` changes
    (load_state_dict, an optimiser step: tracked by tensor versions), so a checkpoint loaded into
    ``network`` after this wrapper was built is used. No library offers this rewrite (``torch.compile``
    was measured at 1.18x after a 60 s compilation, and keeps InstanceNorm's copies).

    Args:
        network: the generator ``(B, 1, D, H, W) -> (B, 1, D, H, W)`` (TorchScript modules are run as
            they are, with autocast for the lower precisions).
        precision: ``"float32"``, ``"bfloat16"``, ``"float16"`` (CUDA) or ``"auto"``
            (:func:`resolve_precision` on the network's device).
        channels_last: use ``channels_last_3d``.
        fold_batch_norm: fold batch norm into the convolutions (False keeps the norms: for comparison).

    Returns (forward): float32 ``(B, 1, D, H, W)``, contiguous.
    """

    def __init__(
        self, network: nn.Module, precision: str = "float32", channels_last: bool = True, fold_batch_norm: bool = True
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.network = network
        self.precision, self.channels_last = precision, bool(channels_last)
        self.fold_batch_norm = bool(fold_batch_norm)
        self._fast: nn.Module | None = None
        self._key: tuple | None = None

    def _device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self._device())

    def fast_network(self) -> nn.Module:
        """The converted copy (rebuilt when ``network``'s parameters or buffers changed since the last call)."""
        tensors = [*self.network.parameters(), *self.network.buffers()]  # buffers: batch norm's folded statistics
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if self._fast is None or key != self._key:
            if isinstance(self.network, torch.jit.ScriptModule):
                object.__setattr__(self, "_fast", self.network.eval())
            else:
                precision = self.resolved_precision()
                dtype = torch.bfloat16 if precision == "bfloat16" else None
                fast = _inference_copy(
                    self.network, dtype, self.channels_last, precision != "float32", self.fold_batch_norm
                )
                object.__setattr__(self, "_fast", fast)  # not a submodule: no duplicate state dict
            self._key = key
        return self._fast  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, C, D, H, W)``. Returns: float32 ``(B, C', D, H, W)``."""
        net = self.fast_network()
        precision = self.resolved_precision()
        x = torch.as_tensor(x)
        scripted = isinstance(self.network, torch.jit.ScriptModule)
        x = x.to(
            torch.bfloat16 if precision == "bfloat16" and not scripted else torch.float32
        )  # any input dtype
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        autocast = precision == "float16" or (scripted and precision == "bfloat16")
        with torch.autocast(x.device.type, dtype=getattr(torch, precision), enabled=autocast):
            y = net(x)
        return y.float().contiguous()
