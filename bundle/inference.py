"""Deconvolve volumes with a trained generator: MONAI components for ``configs/inference.json`` and a
CSBDeep-style Python function, :func:`deconvolve`, built from the same pieces.

Pipeline (identical from the command line and from Python)::

    volume (Z, Y, X), any intensity
      -> NormalizePercentilesd   the training normalisation of the blurred domain: percentiles
                                 (p_lo, p_hi) of the volume -> [0, 1], clipped (values recorded)
      -> Deconvolver             pad every axis to at least the window, MONAI SlidingWindowInferer
                                 (windows of roi_size, overlap 0.25, Gaussian blending, windows on
                                 ``sw_device``, stitched on the CPU), crop back; output in [0, 1]
      -> RestoreIntensityd       "undo" the normalisation: out * (v_hi - v_lo) + v_lo, where v_lo, v_hi
                                 are the input's values at the percentiles p_lo, p_hi; so the output
                                 is in the input's [v_lo, v_hi] range (``output_range="normalized"``
                                 keeps the network's [0, 1] output)
      -> SaveVolumed             ``<name>_deconv<ext>`` with the input's voxel size, atomic, never
                                 over an input

Building blocks for other front ends (e.g. out-of-core or multi-GPU inference): :func:`load_network`
(checkpoint / bundle folder / TorchScript -> module), :class:`Deconvolver` (one in-memory
``(B, 1, D, H, W)`` block in [0, 1] -> sharp block in [0, 1], any size), :func:`deconvolve_normalized`
and :func:`deconvolve`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import MapTransform, ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile
from torch import nn

from bundle.allocator import check_malloc_policy, malloc_policy
from bundle.data import list_volumes
from bundle.io import (
    SUPPORTED_EXTENSIONS,
    LoadVolumed,
    VolumeError,
    _extension,
    load_volume,
    save_volume,
    validate_volume,
)

__all__ = [
    "Deconvolver",
    "TiledInferer",
    "CheckpointLoader",
    "InferenceNetwork",
    "LoadVolumed",
    "NormalizePercentilesd",
    "RestoreIntensityd",
    "SaveVolumed",
    "deconvolve",
    "deconvolve_normalized",
    "inference_datalist",
    "load_checkpoint",
    "load_network",
    "network_from_state_dict",
    "output_path",
    "plan_roi_size",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

OUTPUT_RANGES = ("input", "normalized")


# ----------------------------------------------------------------------------------------------------------
# the network on a whole volume
# ----------------------------------------------------------------------------------------------------------


def _pad_to(x: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``(B, C, *spatial)`` to at least ``size`` (centred); return the crop back.

    Mirror padding (``reflect``) where the volume is long enough, edge replication otherwise.
    """
    spatial = x.shape[2:]
    pads = [max(int(t) - int(s), 0) for s, t in zip(spatial, size)]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
    if not any(pads):
        return x, crop
    flat: list[int] = []
    for p in reversed(pads):  # F.pad wants the last axis first
        flat += [p // 2, p - p // 2]
    reflect_ok = all(p - p // 2 < s for p, s in zip(pads, spatial))
    return F.pad(x, flat, mode="reflect" if reflect_ok else "replicate"), crop


def _pad_for_tiles(
    x: torch.Tensor, roi: Sequence[int], halo: int
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``(B, C, *spatial)`` by ``halo`` on every side (mirror) and at the end up to ``roi + k·(roi − 2·halo)``.

    Then MONAI's sliding window with scan interval ``roi − 2·halo`` puts every window at a multiple of
    the interval (the last one flush with the end falls on the grid too), and the windows' cores
    (``roi`` less ``halo`` on each side) tile the volume exactly. Returns the padded tensor and the crop
    back to the input.
    """
    flat: list[int] = []
    crop = []
    for size, r in zip(reversed(x.shape[2:]), reversed(tuple(roi))):
        step = int(r) - 2 * halo
        total = int(size) + 2 * halo
        k = max(0, math.ceil((total - int(r)) / step))
        flat += [halo, int(r) + k * step - int(size) - halo]
    for size in x.shape[2:]:
        crop.append(slice(halo, halo + int(size)))
    mirror = all(p < s for p, s in zip(flat[::2], reversed(x.shape[2:]))) and all(
        p < s for p, s in zip(flat[1::2], reversed(x.shape[2:]))
    )
    if mirror:
        return F.pad(x, flat, mode="reflect"), tuple(crop)
    # mirror the halo where the axis allows it, replicate the rest (a tiny volume or a long end pad)
    head = [min(p, int(s) - 1) for p, s in zip(flat, [v for v in reversed(x.shape[2:]) for _ in range(2)])]
    y = F.pad(x, head, mode="reflect") if any(head) else x
    rest = [p - h for p, h in zip(flat, head)]
    return (F.pad(y, rest, mode="replicate") if any(rest) else y), tuple(crop)


def _core_weight_map(roi: Sequence[int], halo: int) -> torch.Tensor:
    """``(1, 1, *roi)`` weights: 1 in the window's core, 0 within ``halo`` of its faces."""
    w = torch.zeros((1, 1, *[int(r) for r in roi]))
    w[(slice(None), slice(None), *[slice(halo, int(r) - halo) for r in roi])] = 1.0
    return w


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


def _inference_copy(network: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> nn.Module:
    """A converted deep copy of ``network`` for inference (see :class:`InferenceNetwork`)."""
    import copy

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
                group = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    group.weight, group.bias = child.weight, child.bias
                setattr(module, name, group)
        if isinstance(module, Convolution) and hasattr(module, "adn"):
            for act in module.adn.modules():  # the activation is the last op on the conv's own output
                if isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.ELU)):
                    act.inplace = True
    if dtype is not None:
        net = net.to(dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class InferenceNetwork(nn.Module):
    """The generator rewritten for fast inference: same function, measured 2-3x faster on the CPU.

    What changes (each measured in ``docs/benchmark.md``, kept because it wins):

    * ``InstanceNorm3d`` becomes ``GroupNorm(C, C)``: the same normalisation (per sample and channel,
      same ``eps`` and affine weights), but PyTorch's GroupNorm has channels-last CPU kernels while
      InstanceNorm reshapes (copies) its input twice;
    * MONAI ``Convolution`` blocks' activations run in place;
    * for a ``DeblurUNet`` (sides are multiples of 16), MONAI ``UpCat``'s zero-width replicate
      padding (which still copies the upsampled map) is skipped;
    * weights and activations in ``channels_last_3d`` (oneDNN's fast conv3d layout);
    * ``precision="bfloat16"``: weights and activations in bfloat16 (2x on CPUs with native bf16,
      output within ~70 dB PSNR of float32); ``"float16"``: CUDA autocast.

    The converted copy is built on first use and rebuilt whenever a parameter of ``network`` changes
    (load_state_dict, an optimiser step: tracked by tensor versions), so a checkpoint loaded into
    ``network`` after this wrapper was built is used. No library offers this rewrite (``torch.compile``
    was measured at 1.18x after a 60 s compilation, and keeps InstanceNorm's copies).

    Args:
        network: the generator ``(B, 1, D, H, W) -> (B, 1, D, H, W)`` (TorchScript modules are run as
            they are, with autocast for the lower precisions).
        precision: ``"float32"``, ``"bfloat16"``, ``"float16"`` (CUDA) or ``"auto"``
            (:func:`resolve_precision` on the network's device).
        channels_last: use ``channels_last_3d``.

    Returns (forward): float32 ``(B, 1, D, H, W)``, contiguous.
    """

    def __init__(self, network: nn.Module, precision: str = "float32", channels_last: bool = True) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.network = network
        self.precision, self.channels_last = precision, bool(channels_last)
        self._fast: nn.Module | None = None
        self._key: tuple | None = None

    def _device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self._device())

    def fast_network(self) -> nn.Module:
        """The converted copy (rebuilt when ``network``'s parameters changed since the last call)."""
        params = list(self.network.parameters())
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if self._fast is None or key != self._key:
            if isinstance(self.network, torch.jit.ScriptModule):
                object.__setattr__(self, "_fast", self.network.eval())
            else:
                dtype = torch.bfloat16 if self.resolved_precision() == "bfloat16" else None
                fast = _inference_copy(self.network, dtype, self.channels_last)
                object.__setattr__(self, "_fast", fast)  # not a submodule: no duplicate state dict
            self._key = key
        return self._fast  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, C, D, H, W)``. Returns: float32 ``(B, C', D, H, W)``."""
        net = self.fast_network()
        precision = self.resolved_precision()
        x = torch.as_tensor(x)
        scripted = isinstance(self.network, torch.jit.ScriptModule)
        x = x.to(torch.bfloat16 if precision == "bfloat16" and not scripted else torch.float32)  # any input dtype
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        autocast = precision == "float16" or (scripted and precision == "bfloat16")
        with torch.autocast(x.device.type, dtype=getattr(torch, precision), enabled=autocast):
            y = net(x)
        return y.float().contiguous()


def _overlap_fraction(roi: int, overlap_voxels: int) -> float:
    """The fraction MONAI needs for a scan interval of exactly ``roi - overlap_voxels`` voxels."""
    return min(max(overlap_voxels - 1e-3, 0.0) / roi, 0.999)


def _windows_along(size: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window puts along an axis of ``size`` (padded to ``roi`` if shorter)."""
    if roi >= size:
        return 1
    scan = max(int(roi * (1 - overlap)), 1)  # monai.inferers.utils._get_scan_interval
    return math.ceil((size - roi) / scan) + 1


def plan_roi_size(
    image_size: Sequence[int],
    max_voxels: int = 1 << 22,
    overlap_voxels: int = 16,
    divisor: int = 16,
    min_size: int = 64,
) -> tuple[int, ...]:
    """The window that computes the fewest voxels on ``image_size``, at most ``max_voxels`` large.

    The work of a sliding window is (number of windows) × (window volume): the paper's 64³ windows
    with 16 voxels of overlap compute 2.3× the voxels of a 128×256×256 stack, one 128×256×256 window
    computes each voxel once. Windows overlap by ``overlap_voxels`` (the paper's 16), sides are
    multiples of ``divisor`` between ``min_size`` (the training patch: InstanceNorm statistics and
    context as in training) and the axis length rounded up to ``divisor``. Ties go to fewer windows,
    then to the most cubic window. (MONAI has no such planner; the window count per axis follows
    MONAI's scan-interval rule.)

    Args:
        image_size: ``(D, H, W)``.
        max_voxels: largest window volume (memory grows with it: measured about 1 kB per voxel in
            float32 for the full-size generator, half in bfloat16).
        overlap_voxels: overlap of neighbouring windows in voxels.
        divisor: the network's size divisor.
        min_size: smallest window side (axes shorter than that get one window spanning them).

    Returns:
        ``(d, h, w)``, multiples of ``divisor``.
    """
    axes = []
    for size in image_size:
        top = max(math.ceil(int(size) / divisor) * divisor, 2 * divisor)
        low = min(max(math.ceil(min_size / divisor) * divisor, 2 * divisor), top)
        axes.append(
            [(r, _windows_along(int(size), r, _overlap_fraction(r, overlap_voxels))) for r in range(low, top + 1, divisor)]
        )
    best: tuple | None = None
    for r0, n0 in axes[0]:
        for r1, n1 in axes[1]:
            cap = max_voxels // (r0 * r1)
            for r2, n2 in axes[2]:
                if r2 > cap:
                    break
                shape = (r0, r1, r2)
                key = (n0 * n1 * n2 * r0 * r1 * r2, n0 * n1 * n2, max(shape) - min(shape))
                if best is None or key < best[0]:
                    best = (key, shape)
    if best is None:
        smallest = tuple(a[0][0] for a in axes)
        raise ValueError(f"max_voxels={max_voxels} is smaller than the smallest window {smallest} for {tuple(image_size)}")
    return best[1]


def _inferer_like(base: SlidingWindowInferer, roi: Sequence[int], **changes: Any) -> SlidingWindowInferer:
    """A ``SlidingWindowInferer`` with ``base``'s settings, window ``roi`` and the given ``changes``."""
    settings = {
        name: getattr(base, name)
        for name in ("sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval", "sw_device", "device", "progress")
    }
    return SlidingWindowInferer(roi_size=tuple(roi), **{**settings, **changes})


class Deconvolver(nn.Module):
    """Apply the deblurring generator G to a volume of any size: pad, sliding window, crop.

    ``DeblurUNet`` needs sides divisible by 16; MONAI's ``SlidingWindowInferer`` only ever feeds it
    windows of ``roi_size`` (a multiple of 16), and pads a volume smaller than a window itself, but
    with a mirror pad that fails when the volume is less than half the window. So every axis
    shorter than the window is padded here first (mirror, or edge replication for tiny volumes),
    the sliding window runs, and the result is cropped back to the input's shape. The stitched
    output lives on the inferer's ``device`` (the CPU in ``configs/inference.json``), so volumes
    larger than GPU memory work.

    Speed (``docs/benchmark.md`` measures each): the network runs as an :class:`InferenceNetwork`
    (GroupNorm rewrite, channels-last, optional bfloat16) under ``torch.inference_mode``;
    ``roi_size="auto"`` picks, per volume, the window that computes the fewest voxels
    (:func:`plan_roi_size`) within ``max_pass_voxels``, and windows per pass are limited so that a
    pass never exceeds ``max_pass_voxels`` either. InstanceNorm statistics depend on the window, so
    larger windows change the output slightly: the benchmark reports the PSNR change against the
    paper's 64³ windows (fixed ``roi_size=(64, 64, 64)`` reproduces them exactly).

    Args:
        network: the generator, ``(B, 1, d, h, w) -> (B, 1, d, h, w)`` in [0, 1].
        inferer: a ``SlidingWindowInferer`` (e.g. ``common.json``'s ``inferer``); if None one is
            built from the arguments below. With ``roi_size="auto"`` or a given ``roi_size`` its
            settings are kept and its window replaced by the planned or given one.
        roi_size: window size ``(D, H, W)``, multiples of ``divisor`` (default: ``"auto"`` for a
            network with a halo, else 64³ or the ``inferer``'s), or ``"auto"``.
        sw_batch_size: windows per forward pass (keep it >= 2 on CPU for windows of 32³ or less:
            PyTorch's conv3d takes a slow path for batch 1 at small sizes).
        overlap: window overlap fraction (0.25 = 16 voxels at 64³, as in the paper).
        mode: blending, ``"gaussian"`` or ``"constant"``.
        sw_device: device of the windows (the network's device); None = the input's.
        device: device of the stitched output; None = the input's.
        progress: tqdm bar over the windows.
        divisor: the network's size divisor (default: its ``divisor`` attribute, else 16 for 4 poolings).
        precision: ``"float32"``, ``"bfloat16"``, ``"float16"`` (CUDA) or ``"auto"`` (see
            :func:`resolve_precision`).
        channels_last: run the network in ``channels_last_3d``.
        optimize: False runs ``network`` exactly as given (no rewrite, no layout or precision change).
        max_pass_voxels: voxels per forward pass at most (windows × window volume) with
            ``roi_size="auto"``; bounds the memory (about 1 kB per voxel in float32 for the full-size
            generator, half in bfloat16). Mid-sized windows are also the fastest: 4 Mi voxels ran
            0.89 Mvoxel/s, one 8 Mi-voxel window 0.79 (bfloat16, 128×256×256, cache effects).
        auto_overlap: overlap of planned windows in voxels (``overlap`` applies to fixed windows).
        auto_min_size: smallest side of a planned window (axes shorter than that are spanned whole).
        allocator: CPU ``malloc`` policy during a call (:mod:`bundle.allocator`): ``"reuse"`` keeps
            freed activations for the next window instead of re-faulting fresh pages (glibc; 1.05-1.3x
            faster CPU inference, ``docs/benchmark.md``; the heap is trimmed after the call),
            ``"release"`` unmaps them at once (lowest peak RSS), ``"system"`` leaves glibc's default.
        halo: voxels of context discarded at each face of every window (0: MONAI's blending of
            overlapping windows, the paper's setting). With a halo the volume is mirror-padded by it,
            windows step by ``roi − 2·halo`` on a grid aligned with the network's poolings, and only
            each window's core is kept: for a network whose output at a voxel depends on the input
            within ``halo`` voxels (:attr:`DeblurUNet.tiling_halo`: batch or no norm,
            ``align_corners=False``), the result does not depend on the window plan. ``"auto"``: the
            network's ``tiling_halo`` (0 for networks without one, e.g. instance norm).

    Example::

        >>> g = DeblurUNet(features=(16, 16, 32, 64, 128, 16)).eval()
        >>> deconv = Deconvolver(g, roi_size=(32, 32, 32))
        >>> with torch.no_grad():
        ...     y = deconv(torch.rand(1, 1, 20, 70, 45))  # (B, 1, D, H, W) in [0, 1] -> same shape
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: SlidingWindowInferer | None = None,
        roi_size: Sequence[int] | str | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = "cpu",
        progress: bool = False,
        divisor: int | None = None,
        precision: str = "float32",
        channels_last: bool = True,
        optimize: bool = True,
        max_pass_voxels: int = 1 << 22,
        auto_overlap: int = 16,
        auto_min_size: int = 64,
        allocator: str = "reuse",
        halo: int | str = "auto",
    ) -> None:
        super().__init__()
        self.allocator = check_malloc_policy(allocator, "allocator")
        divisor = int(getattr(network, "divisor", 16)) if divisor is None else int(divisor)
        if halo == "auto":
            halo = int(getattr(network, "tiling_halo", 0))
        if isinstance(halo, str) or int(halo) < 0 or int(halo) % max(1, int(divisor) // 2):
            raise ValueError(f"halo must be 'auto' or a multiple of {max(1, int(divisor) // 2)} voxels >= 0, got {halo!r}")
        self.halo = int(halo)
        if roi_size is None and inferer is None and halo not in (0, "0") and (
            halo != "auto" or getattr(network, "tiling_halo", 0)
        ):
            roi_size = "auto"  # fixed 64³ windows would keep only 64 - 2·halo voxels of each
        self.auto = isinstance(roi_size, str)
        if self.auto and roi_size != "auto":
            raise ValueError(f"roi_size must be 'auto' or a window size (D, H, W), got {roi_size!r}")
        if inferer is not None and roi_size is not None and not self.auto:
            # a window given with an inferer: the window wins, the inferer's other settings stay
            window = tuple(int(r) for r in np.broadcast_to(np.asarray(roi_size), (3,)))
            inferer = _inferer_like(inferer, window)
        if roi_size is None:
            roi_size = (64, 64, 64)
        self.divisor, self.max_pass_voxels = int(divisor), int(max_pass_voxels)
        self.auto_overlap = 2 * self.halo if self.halo else int(auto_overlap)
        self.auto_min_size = int(auto_min_size)
        if inferer is None:
            inferer = SlidingWindowInferer(
                roi_size=(2 * divisor,) * 3 if self.auto else tuple(int(r) for r in roi_size),  # type: ignore[union-attr]
                sw_batch_size=int(sw_batch_size),
                overlap=overlap,
                mode=mode,
                padding_mode="reflect",
                sw_device=sw_device,
                device=device,
                progress=progress,
            )
        self.inferer = inferer
        if self.auto:
            self.roi_size: tuple[int, ...] | str = "auto"
        else:
            roi = tuple(int(r) for r in np.broadcast_to(inferer.roi_size, (3,)))
            self._check_roi(roi)
            self.roi_size = roi
        self.last_roi_size: tuple[int, ...] | None = None if self.auto else self.roi_size  # type: ignore[assignment]
        self.predictor = InferenceNetwork(network, precision, channels_last) if optimize else network
        self.optimize = optimize
        self._inferers: dict[tuple[int, ...], SlidingWindowInferer] = {}

    @property
    def network(self) -> nn.Module:
        """The generator as given (load checkpoints into this one)."""
        return self.predictor.network if self.optimize else self.predictor

    def _check_roi(self, roi: tuple[int, ...]) -> None:
        d = self.divisor
        if any(r <= 0 or r % d for r in roi) or all(r == d for r in roi):
            raise ValueError(f"roi_size must be multiples of {d} (and not {d}^3), got {roi}")
        if any(r - 2 * self.halo < d for r in roi):
            raise ValueError(
                f"roi_size {roi} leaves a core smaller than {d} after a halo of {self.halo} voxels on each side; "
                f"use windows of at least {2 * self.halo + d}"
            )
        if self.halo:
            work = float(np.prod([r / (r - 2 * self.halo) for r in roi]))
            if work > 4.0:
                logger.warning(
                    f"windows of {roi} with a halo of {self.halo} voxels keep only their "
                    f"{tuple(r - 2 * self.halo for r in roi)} cores: {work:.0f}x the work of one pass; "
                    "roi_size='auto' plans larger windows"
                )

    def inferer_for(self, shape: Sequence[int]) -> tuple[tuple[int, ...], SlidingWindowInferer]:
        """The window and the ``SlidingWindowInferer`` used for a volume of spatial ``shape``."""
        if self.halo:
            return self._halo_inferer_for(shape)
        if not self.auto:
            return self.roi_size, self.inferer  # type: ignore[return-value]
        roi = plan_roi_size(shape, self.max_pass_voxels, self.auto_overlap, self.divisor, self.auto_min_size)
        if roi not in self._inferers:
            base = self.inferer
            batch = max(1, min(int(base.sw_batch_size), self.max_pass_voxels // int(np.prod(roi))))
            overlap = [_overlap_fraction(r, self.auto_overlap) for r in roi]
            self._inferers[roi] = _inferer_like(base, roi, sw_batch_size=batch, overlap=overlap)
        return roi, self._inferers[roi]

    def _halo_inferer_for(self, shape: Sequence[int]) -> tuple[tuple[int, ...], SlidingWindowInferer]:
        """Windows whose cores tile the volume (see ``halo``): no blending, the cores' grid aligned."""
        h = self.halo
        if self.auto:
            padded = [int(s) + 2 * h for s in shape]
            roi = plan_roi_size(padded, self.max_pass_voxels, 2 * h, self.divisor, max(self.auto_min_size, 2 * h + self.divisor))
        else:
            roi = self.roi_size  # type: ignore[assignment]
        key = ("halo", *roi)
        if key not in self._inferers:
            base = self.inferer
            batch = max(1, min(int(base.sw_batch_size), self.max_pass_voxels // int(np.prod(roi)))) if self.auto else int(base.sw_batch_size)
            inferer = SlidingWindowInferer(
                roi_size=roi,
                sw_batch_size=batch,
                overlap=[_overlap_fraction(r, 2 * h) for r in roi],
                mode="constant",
                sw_device=base.sw_device,
                device=base.device,
                progress=base.progress,
            )
            inferer.roi_weight_map = _core_weight_map(roi, h)  # read by SlidingWindowInferer.__call__
            self._inferers[key] = inferer
        return roi, self._inferers[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, 1, D, H, W)`` normalised to [0, 1], any D, H, W >= 1.

        Returns: ``(B, 1, D, H, W)`` float32 on the inferer's ``device`` (the input's if None).
        """
        if x.ndim != 5:
            raise ValueError(f"Deconvolver expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        roi, inferer = self.inferer_for(x.shape[2:])
        self.last_roi_size = roi
        if self.halo:
            padded, crop = _pad_for_tiles(torch.as_tensor(x), roi, self.halo)
        else:
            padded, crop = _pad_to(torch.as_tensor(x), roi)
        with malloc_policy(self.allocator), torch.inference_mode(not torch.is_grad_enabled()):
            out = inferer(padded, self.predictor)
        return out[(slice(None), slice(None), *crop)]


class TiledInferer(Inferer):
    """MONAI ``Inferer`` running a network over a whole volume the way :class:`Deconvolver` does.

    For evaluators (``SupervisedEvaluator(inferer=...)``): validation then sees the same windows,
    halo and padding as inference, so a window-free generator is scored on exactly what users get. The
    network runs as given (no inference rewrite), in the evaluator's precision, so it always reflects
    the current weights.

    Args:
        roi_size: window ``(D, H, W)`` or ``"auto"``.
        halo: as :class:`Deconvolver` (``"auto"``: the network's ``tiling_halo``).
        sw_batch_size: windows per forward pass.
        max_pass_voxels: as :class:`Deconvolver`.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | str = "auto",
        halo: int | str = "auto",
        sw_batch_size: int = 2,
        max_pass_voxels: int = 1 << 22,
    ) -> None:
        super().__init__()
        self.roi_size, self.halo = roi_size, halo
        self.sw_batch_size, self.max_pass_voxels = int(sw_batch_size), int(max_pass_voxels)
        self._deconvolvers: dict[int, Deconvolver] = {}

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = id(network)
        if key not in self._deconvolvers:
            self._deconvolvers[key] = Deconvolver(
                network,
                roi_size=self.roi_size,
                halo=self.halo,
                sw_batch_size=self.sw_batch_size,
                max_pass_voxels=self.max_pass_voxels,
                optimize=False,
                device=None,
                allocator="system",
            )
        return self._deconvolvers[key](inputs)


# ----------------------------------------------------------------------------------------------------------
# loading a model
# ----------------------------------------------------------------------------------------------------------


def network_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A ``DeblurUNet`` whose sizes (channels, the six ``features``) are read from a state dict.

    Raises:
        KeyError: the state dict is not a ``DeblurUNet``'s.
    """
    from bundle.networks import DeblurUNet

    def out_ch(key: str) -> int:
        return int(state_dict[f"unet.{key}.conv.weight"].shape[0])

    first = state_dict["unet.conv_0.conv_0.conv.weight"]
    depth = 0
    while f"unet.down_{depth + 1}.convs.conv_0.conv.weight" in state_dict:
        depth += 1
    features = [out_ch("conv_0.conv_0")] + [out_ch(f"down_{i}.convs.conv_0") for i in range(1, depth + 1)]
    features.append(out_ch("upcat_1.convs.conv_0"))
    if "settings" in state_dict:
        settings = DeblurUNet.describe(state_dict["settings"])
    else:  # written before the settings were stored: BasicUNet's upsampling; the norm shows in the keys
        norm = "batch" if "unet.conv_0.conv_0.adn.N.running_mean" in state_dict else "instance"
        if "unet.conv_0.conv_0.adn.N.weight" not in state_dict:
            norm = "none"
        settings = {"depth": depth, "align_corners": True, "norm": norm}
    voxel = state_dict.get("voxel_size")
    return DeblurUNet(
        in_channels=int(first.shape[1]),
        out_channels=int(state_dict["unet.final_conv.weight"].shape[0]),
        features=features,
        voxel_size=None if voxel is None else [float(v) for v in voxel],
        **settings,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = "train a model first, or pass --ckpt_path"
        if not path.is_absolute():  # configs put it under bundle_root, "." by default: the current folder
            hint = (
                f"looked for {path.resolve()}; run from the bundle's folder or pass --bundle_root <bundle folder>, "
                "or pass --ckpt_path (or train a model first)"
            )
        raise FileNotFoundError(f"{path}: checkpoint not found ({hint})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # {"model": state_dict}, as MONAI's CheckpointSaver writes
    if isinstance(state, Mapping) and "g_deblur" in state and isinstance(state["g_deblur"], Mapping):
        state = state["g_deblur"]  # a training checkpoint (ResumableCheckpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    return dict(state)


def load_checkpoint(network: nn.Module, path: PathLike) -> nn.Module:
    """Load ``model.pt`` (a state dict, ``{"model": ...}`` or a training checkpoint) into ``network``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when it is unreadable or does not match the network (e.g. trained
            with other ``generator_features``: pass the same config overrides as for training).
    """
    path = Path(path)
    state = _read_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()
        raise ValueError(
            f"{path}: checkpoint does not match the network ({'; '.join(detail[:4])[:600]}). Use the configs "
            "the model was trained with (e.g. add configs/quick.json for a quick model)"
        ) from exc
    return network


def network_for_checkpoint(network: nn.Module, ckpt_path: PathLike | None) -> nn.Module:
    """The config's ``network`` with the checkpoint's weights, or one built from the checkpoint.

    The command line builds ``network_def`` from the configs, and a model trained with other sizes
    (e.g. ``configs/quick.json``) or settings would not fit it; the checkpoint holds them (its
    shapes, and the ``settings`` / ``voxel_size`` buffers), so a ``DeblurUNet`` that does not match
    is rebuilt from the checkpoint (logged), as the Python API does (:func:`load_network`). Other
    networks (e.g. Richardson–Lucy, ``ckpt_path`` None) are returned unchanged; a checkpoint that is
    missing or of another kind is left to :class:`CheckpointLoader`, which names the file.
    """
    from bundle.networks import DeblurUNet

    if ckpt_path is None or not isinstance(network, DeblurUNet) or not Path(ckpt_path).is_file():
        return network
    state = _read_state_dict(Path(ckpt_path))
    try:
        network.load_state_dict(state, strict=True)
        return network
    except RuntimeError:
        pass
    try:
        rebuilt = network_from_state_dict(state)
        rebuilt.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError):
        return network  # not a DeblurUNet's: CheckpointLoader reports the mismatch, naming the file
    device = next(network.parameters()).device
    logger.info(
        f"{ckpt_path}: network sizes and settings read from the checkpoint "
        f"({sum(p.numel() for p in rebuilt.parameters())} parameters, {DeblurUNet.describe(rebuilt.settings)}), "
        "not from the configs"
    )
    return rebuilt.to(device)


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose errors name the checkpoint file (and say what to do).

    Args: as ``monai.handlers.CheckpointLoader`` (``load_path``, ``load_dict``, ...). With a single
    network in ``load_dict`` the file may be a bare state dict, ``{"model": ...}`` or a training
    checkpoint; the loading is :func:`load_checkpoint`.
    """

    def __call__(self, engine: Any) -> None:
        if len(self.load_dict) == 1:
            load_checkpoint(next(iter(self.load_dict.values())), self.load_path)
            logger.info(f"restored {self.load_path}")
            return
        try:
            super().__call__(engine)
        except Exception as exc:
            raise ValueError(f"{self.load_path}: cannot load checkpoint ({exc})") from exc


def load_network(model: nn.Module | PathLike, device: torch.device | str | None = None) -> nn.Module:
    """The generator, in eval mode on ``device``, from a module, a checkpoint or a trained bundle.

    Args:
        model: an ``nn.Module``; a state-dict file (``model.pt``); a TorchScript file (``.ts``); or a
            folder: a bundle root (``models/model.pt``, network from its ``configs/common.json``
            ``network_def`` when that matches) or a checkpoint folder (``model.pt``). Without a
            matching config the ``DeblurUNet`` sizes are read from the state dict.
        device: target device; None keeps a module's device and puts files on the CPU.
    """
    if isinstance(model, nn.Module):
        net = model
    else:
        path = Path(model)
        if path.is_dir():
            bundle_root = path
            for candidate in (path / "models" / "model.pt", path / "model.pt", path / "models" / "model.ts"):
                if candidate.is_file():
                    path = candidate
                    break
            else:
                raise FileNotFoundError(f"{model}: no models/model.pt, model.pt or models/model.ts in this folder")
        else:
            bundle_root = None
        if path.suffix == ".ts":
            try:
                net = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise ValueError(f"{path}: cannot load TorchScript model ({exc})") from exc
        else:
            state = _read_state_dict(path)
            net = None
            config = None if bundle_root is None else bundle_root / "configs" / "common.json"
            if config is not None and config.is_file():
                from monai.bundle import ConfigParser

                parser = ConfigParser()
                parser.read_config(str(config))
                parser["bundle_root"] = str(bundle_root)
                candidate_net = parser.get_parsed_content("network_def", instantiate=True)
                if _matches(candidate_net, state):
                    net = candidate_net
            if net is None:
                try:
                    net = network_from_state_dict(state)
                except KeyError as exc:
                    raise ValueError(f"{path}: not a DeblurUNet checkpoint (missing {exc})") from exc
            load_checkpoint(net, path)
    if device is not None:
        net = net.to(device)
    return net.eval()


def _matches(net: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    own = net.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


# ----------------------------------------------------------------------------------------------------------
# MONAI transforms
# ----------------------------------------------------------------------------------------------------------


def _percentile_range(img: torch.Tensor, percentiles: Sequence[float]) -> tuple[float, float]:
    lower, upper = percentiles
    return float(percentile(img, lower)), float(percentile(img, upper))  # type: ignore[arg-type]


class NormalizePercentilesd(MapTransform):
    """Map the ``(lower, upper)`` percentiles of each volume to [0, 1] (clipped), recording the values.

    Numerically the same as the training normalisation (``bundle.data.normalize_transforms``, i.e.
    MONAI's ``ScaleIntensityRangePercentiles`` with ``relative=False``), and it stores the input's
    values at those percentiles in ``d[f"{key}_range"] = (v_lo, v_hi)`` so :class:`RestoreIntensityd`
    can map the output back.

    Args:
        keys: keys of ``(1, Z, Y, X)`` tensors.
        percentiles: ``(lower, upper)`` in [0, 100] (the blurred domain's, ``blurred_percentiles``).
        clip: clip to [0, 1].

    Raises:
        VolumeError: naming the file when both percentiles have the same value (a nearly empty
            volume: nothing to normalise by).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        percentiles: Sequence[float] = (0.1, 99.9),
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.percentiles = tuple(float(p) for p in percentiles)
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be (lower, upper) with 0 <= lower < upper <= 100, got {percentiles}")
        self.clip = clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            lo, hi = _percentile_range(img, self.percentiles)
            if not hi > lo:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", "<array>")
                raise VolumeError(
                    f"{name}: the {self.percentiles[0]} and {self.percentiles[1]} percentiles are both {lo:g} "
                    "(almost every voxel has the same value); nothing to deconvolve, or choose other percentiles"
                )
            d[key] = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=self.clip)(d[key])
            d[f"{key}_range"] = torch.tensor([lo, hi], dtype=torch.float64)
        return d


class RestoreIntensityd(MapTransform):
    """Undo :class:`NormalizePercentilesd` on the prediction: ``pred * (v_hi - v_lo) + v_lo``.

    The network's [0, 1] output is mapped to the input's percentile range ``[v_lo, v_hi]`` (the input
    values at the normalisation percentiles), so 0 is the input's background level and 1 the input's
    bright level. With ``output_range="normalized"`` the [0, 1] output is kept.

    Args:
        keys: prediction keys.
        range_key: key of ``(v_lo, v_hi)`` written by :class:`NormalizePercentilesd`.
        output_range: ``"input"`` or ``"normalized"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        range_key: str = "image_range",
        output_range: str = "input",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_range not in OUTPUT_RANGES:
            raise ValueError(f"output_range must be one of {OUTPUT_RANGES}, got {output_range!r}")
        self.range_key, self.output_range = range_key, output_range

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.output_range == "normalized":
            return d
        lo, hi = (float(v) for v in torch.as_tensor(d[self.range_key]).reshape(-1)[:2])
        for key in self.key_iterator(d):
            d[key] = d[key] * (hi - lo) + lo
        return d


def output_path(input_path: PathLike, output_dir: PathLike, suffix: str = "_deconv", output_ext: str | None = None) -> Path:
    """``output_dir/<input name without extension><suffix><ext>``; ext defaults to the input's
    (``.ome.tif`` becomes ``.tif``: the output is an ImageJ TIFF)."""
    name = Path(input_path).name
    ext = _extension(input_path)
    stem = name[: len(name) - len(ext)] if ext and name.lower().endswith(ext) else Path(name).stem
    ext = output_ext or (".tif" if ext in (".ome.tif", ".ome.tiff") else ext)
    return Path(output_dir) / f"{stem}{suffix}{ext}"


def check_output_dir(output_dir: PathLike, output_ext: str | None = None) -> Path:
    """Check, before any compute, that the outputs can be written to ``output_dir``; writes nothing.

    The folder (created later, with the first output) or its nearest existing parent must be a
    folder in which a file can be created (probed with a hidden temporary file, removed at once).

    Raises:
        ValueError: ``output_ext`` is not a format the bundle writes (the message lists them).
        VolumeError: naming the folder, when it or a parent is a file, or it is not writable.
    """
    if output_ext is not None:
        ext = str(output_ext).lower()
        if not ext.startswith(".") or ext not in SUPPORTED_EXTENSIONS:
            raise ValueError(f"output_ext {output_ext!r} is not a format the bundle writes; use one of {SUPPORTED_EXTENSIONS}")
    folder = Path(output_dir)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise VolumeError(f"{folder}: cannot write the outputs there ({existing} is a file); choose another output_dir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise VolumeError(f"{folder}: cannot write the outputs there ({exc.strerror or exc}); choose another output_dir") from exc
    return folder


class SaveVolumed(MapTransform):
    """Write each prediction next to nothing it came from: ``output_dir/<name><suffix><ext>``.

    Uses :func:`bundle.io.save_volume` (atomic; TIFF/NIfTI/ITK by extension), with the voxel size of
    the input and ``protect=[input]``, so an input is never overwritten.

    Args:
        keys: prediction keys, ``(1, Z, Y, X)`` or ``(Z, Y, X)``.
        output_dir: output folder (created when the first file is written).
        meta_key: key of the input MetaTensor whose meta gives the file name and voxel size.
        suffix: appended to the input's name.
        output_ext: e.g. ``".tif"``; None keeps the input's extension.
        dtype: written dtype (float32 keeps the restored intensities exactly).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: PathLike = "./eval",
        meta_key: str = "image",
        suffix: str = "_deconv",
        output_ext: str | None = None,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.meta_key, self.suffix = Path(output_dir), meta_key, suffix
        self.output_ext, self.dtype = output_ext, dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = d[self.meta_key].meta
        src = meta["filename_or_obj"]
        voxel = [float(v) for v in torch.as_tensor(meta["voxel_size"]).reshape(-1)]
        voxel_size = None if any(not np.isfinite(v) for v in voxel) else voxel
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key]).detach().cpu().float().numpy()
            path = output_path(src, self.output_dir, self.suffix, self.output_ext)
            save_volume(path, volume, voxel_size=voxel_size, dtype=self.dtype, protect=[src])
            d[f"{key}_path"] = str(path)
            logger.info(f"{src} -> {path}")
        return d


def inference_datalist(
    input: str | Sequence[str],
    output_dir: PathLike,
    channel: int | None = None,
    percentiles: Sequence[float] = (0.1, 99.9),
    suffix: str = "_deconv",
    output_ext: str | None = None,
    check: bool = True,
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for a file, folder or glob, checked before anything is written.

    With ``check`` every file is read once (:func:`bundle.io.load_volume`) and its normalisation
    percentiles are computed, so a bad file anywhere in the list stops the run before the first
    output is written. Output names are checked too: none may be an input or collide with another.

    Raises:
        FileNotFoundError: nothing matches ``input``.
        VolumeError: naming the first bad file.
    """
    files = list_volumes(input)
    check_output_dir(output_dir, output_ext)
    inputs = {Path(f).resolve() for f in files}
    seen: dict[Path, str] = {}
    for f in files:
        out = output_path(f, output_dir, suffix, output_ext).resolve()
        if out in inputs:
            raise VolumeError(f"{f}: its output {out} would overwrite an input; choose another output_dir or suffix")
        if out in seen:
            raise VolumeError(f"{f}: its output {out} collides with the output of {seen[out]}")
        seen[out] = f
        if check:
            volume, _ = load_volume(f, channel=channel, dtype=np.float32)
            NormalizePercentilesd("image", percentiles)({"image": MetaTensor(torch.from_numpy(volume), meta={"filename_or_obj": f})})
    return [{"image": f} for f in files]


# ----------------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------------


def deconvolve_normalized(
    volume: np.ndarray | torch.Tensor,
    deconvolver: Deconvolver,
    percentiles: Sequence[float] | None = (0.1, 99.9),
    output_range: str = "input",
) -> np.ndarray:
    """Normalise, deconvolve and restore one ``(Z, Y, X)`` volume with a ready :class:`Deconvolver`.

    The same transforms as ``configs/inference.json``: :class:`NormalizePercentilesd` (skipped if
    ``percentiles`` is None: the volume must already be in [0, 1]), ``deconvolver`` under
    ``torch.no_grad``, :class:`RestoreIntensityd`.

    Returns:
        float32 ``(Z, Y, X)``.
    """
    x = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
    d: dict[str, Any] = {"image": x.float()[None]}
    if percentiles is not None:
        d = NormalizePercentilesd("image", percentiles)(d)
    elif output_range == "input":
        output_range = "normalized"  # nothing to undo
    with torch.no_grad():
        d["pred"] = deconvolver(torch.as_tensor(d["image"])[None])[0]
    d = RestoreIntensityd("pred", "image_range", output_range)(d)
    return torch.as_tensor(d["pred"])[0].detach().cpu().float().numpy()


def _to_zyx(volume: np.ndarray, axes: str, channel: int | None) -> tuple[np.ndarray, str]:
    axes = axes.upper()
    if sorted(axes) not in (sorted("ZYX"), sorted("CZYX")) or len(axes) != volume.ndim:
        raise ValueError(
            f"axes must name each axis of the volume once with Z, Y, X (and C), got axes={axes!r} for "
            f"shape {volume.shape}"
        )
    if "C" in axes:
        c = axes.index("C")
        n = volume.shape[c]
        if channel is None and n > 1:
            raise VolumeError(f"<array>: has {n} channels (axes {axes}); choose one with channel=0..{n - 1}")
        channel = 0 if channel is None else channel
        if not 0 <= channel < n:
            raise VolumeError(f"<array>: channel={channel} requested but it has {n} channel(s)")
        volume = np.take(volume, channel, axis=c)
        axes = axes.replace("C", "")
    return np.transpose(volume, [axes.index(a) for a in "ZYX"]), axes


def deconvolve(
    volume: np.ndarray | torch.Tensor,
    model: nn.Module | PathLike,
    axes: str = "ZYX",
    roi_size: Sequence[int] | str | None = "auto",
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: torch.device | str | None = None,
    normalize: Sequence[float] | None = (0.1, 99.9),
    output_range: str = "input",
    progress: bool = True,
    channel: int | None = None,
    precision: str = "auto",
    max_pass_voxels: int = 1 << 22,
) -> np.ndarray:
    """Deconvolve a 3D stack with a trained generator (CSBDeep-style ``predict``).

    Args:
        volume: the stack; ``axes`` names its axes.
        model: trained bundle folder, checkpoint folder, ``model.pt``, ``model.ts`` or an ``nn.Module``
            (see :func:`load_network`).
        axes: axis order of ``volume``, a permutation of ``"ZYX"`` or ``"CZYX"`` (e.g. ``"YXZ"``,
            ``"XYZ"``, ``"ZCYX"``).
        roi_size: ``"auto"`` (default): per volume the window computing the fewest voxels within
            ``max_pass_voxels`` (:func:`plan_roi_size`, 16 voxels of overlap; faster, and scored higher
            than the paper's 64³ windows in ``docs/benchmark.md``); a window ``(Z, Y, X)``, multiples
            of 16 (``(64, 64, 64)``: the paper's); None: the bundle's ``patch_size`` for a bundle
            folder, else 64³.
        overlap: window overlap (0.25: the paper's 16 voxels at 64³), Gaussian blending.
        sw_batch_size: windows per forward pass (>= 2 on CPU, see :class:`Deconvolver`).
        device: device of the network and the windows; default CUDA if available. The whole volume
            and the stitched result stay on the CPU.
        normalize: ``(lower, upper)`` percentiles mapped to [0, 1] before the network (the training
            normalisation of the blurred domain, ``blurred_percentiles``); None if the volume is
            already in [0, 1].
        output_range: ``"input"``: the [0, 1] output mapped back to the input's values at those
            percentiles; ``"normalized"``: the network's [0, 1] output.
        progress: progress bar over the windows.
        channel: channel to deconvolve when ``axes`` has ``C`` with more than one channel.
        precision: ``"auto"`` (default: bfloat16 on CUDA and on CPUs with native bf16, else float32,
            :func:`resolve_precision`), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (CUDA).
        max_pass_voxels: voxels per forward pass at most with ``roi_size="auto"`` (bounds memory:
            4 Mi voxels = about 1.6 GiB in bfloat16, 3 GiB in float32 for the full-size generator).

    Returns:
        float32 array with the input's axes (a ``C`` axis keeps size 1).

    Example::

        >>> from bundle.inference import deconvolve
        >>> sharp = deconvolve(stack, model="path/to/bundle", axes="ZYX")
    """
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    zyx, spatial_axes = _to_zyx(arr, axes, channel)
    validate_volume(zyx, None)
    if device is None:
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    network = load_network(model, device)
    if roi_size is None:
        roi_size = _bundle_setting(model, "patch_size", (64, 64, 64))
    deconvolver = Deconvolver(
        network, roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
        sw_device=device, device="cpu", progress=progress, precision=precision, max_pass_voxels=max_pass_voxels,
    )
    out = deconvolve_normalized(zyx.astype(np.float32, copy=False), deconvolver, normalize, output_range)
    out = np.transpose(out, ["ZYX".index(a) for a in spatial_axes])
    if "C" in axes.upper():
        out = np.expand_dims(out, axes.upper().index("C"))
    return out


def _bundle_setting(model: Any, key: str, default: Any) -> Any:
    """A value of a bundle folder's ``configs/common.json`` (the default if there is none)."""
    if isinstance(model, (str, os.PathLike)) and (Path(model) / "configs" / "common.json").is_file():
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(Path(model) / "configs" / "common.json"))
        if key in parser.config:  # type: ignore[operator]
            return parser.get_parsed_content(key)
    return default
