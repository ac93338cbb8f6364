"""The :class:`Deconvolver`: one in-memory ``(B, 1, D, H, W)`` block in [0, 1] -> sharp block in [0, 1], any size."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from bundle.allocator import check_malloc_policy, malloc_policy
from bundle.flags import as_flag
from bundle.inference.flips import check_flips, flip_average
from bundle.inference.precision import InferenceNetwork
from bundle.inference.windows import (
    _core_weight_map,
    _inferer_like,
    _overlap_fraction,
    _pad_for_tiles,
    _pad_to,
    _Reporting,
    plan_roi_size,
    window_count,
)

logger = logging.getLogger(__name__)


class Deconvolver(nn.Module):
    """Apply the deblurring generator G to a volume of any size: pad, sliding window, crop.

    ``DeblurUNet`` needs sides divisible by 16; MONAI's ``SlidingWindowInferer`` feeds it windows of
    ``roi_size`` but its mirror pad fails on a volume under half a window, so short axes are padded
    here first (mirror, or edge replication for tiny volumes), the windows run, and the result is
    cropped back. The stitched output lives on the inferer's ``device`` (the CPU in
    ``configs/inference.json``), so volumes larger than GPU memory work.

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
            generator, half in bfloat16). Mid-sized windows are also the fastest (cache effects;
            ``docs/benchmark.md`` has the measured rates).
        auto_overlap: overlap of planned windows in voxels (``overlap`` applies to fixed windows).
        auto_min_size: smallest side of a planned window (axes shorter than that are spanned whole).
        allocator: CPU ``malloc`` policy during a call (:mod:`bundle.allocator`). ``"system"`` (the
            default) leaves glibc alone: a library call changes no process-wide setting unless asked.
            ``"reuse"`` keeps freed activations for the next window instead of re-faulting fresh pages
            (glibc; faster CPU inference, ``docs/benchmark.md``; the heap is trimmed after the call; the
            command line's ``configs/inference.json`` opts in), ``"release"`` unmaps them at once
            (lowest peak RSS).
        halo: voxels of context discarded at each face of every window (0: MONAI's blending of
            overlapping windows, the paper's setting). With a halo the volume is mirror-padded by it,
            windows step by ``roi − 2·halo`` on a grid aligned with the network's poolings, and only
            each window's core is kept: for a network whose output at a voxel depends on the input
            within ``halo`` voxels (:attr:`DeblurUNet.tiling_halo`: batch or no norm,
            ``align_corners=False``), the result does not depend on the window plan. ``"auto"``: the
            network's ``tiling_halo`` (0 for networks without one, e.g. instance norm).
        callback: called as ``callback(done, total)`` after each forward pass with the windows done so
            far and the call's window count (progress bars of front ends such as the napari plugin).
            An exception it raises stops the call there (a Cancel button raises
            :class:`DeconvolutionCancelled`) and propagates with nothing returned.
        flips: XY views averaged (:func:`~bundle.inference.flips.flip_average`; 1, 2, 4 or 8): 8 is
            the best estimate at 8× the time; 4 (mirrors only) if the PSF is not symmetric under
            quarter turns (astigmatism), 1 if it is not mirror-symmetric either (coma).

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
        allocator: str = "system",
        halo: int | str = "auto",
        callback: Callable[[int, int], None] | None = None,
        flips: int = 1,
    ) -> None:
        super().__init__()
        self.flips = check_flips(flips)
        if inferer is not None:  # every window's inferer derives from this one; '--progress false' is a string
            inferer.progress = as_flag(inferer.progress, "progress")
        self.callback = callback
        self.allocator = check_malloc_policy(allocator, "allocator")
        divisor = int(getattr(network, "divisor", 16)) if divisor is None else int(divisor)
        if halo == "auto":
            halo = int(getattr(network, "tiling_halo", 0))
        if isinstance(halo, str) or int(halo) < 0 or int(halo) % max(1, int(divisor) // 2):
            raise ValueError(
                f"halo must be 'auto' or a multiple of {max(1, int(divisor) // 2)} voxels >= 0, got {halo!r}"
            )
        self.halo = int(halo)
        if roi_size is None and inferer is None and int(halo) != 0:
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
                progress=as_flag(progress, "progress"),
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

    @classmethod
    def from_bundle(
        cls, model: nn.Module | str, device: torch.device | str | None = None, roi_size: Sequence[int] | str | None = "auto",
        **settings: Any,
    ) -> Deconvolver:
        """Load a trained model once (bundle folder, checkpoint folder, ``model.pt``/``model.ts`` or a
        module) for many :meth:`predict` calls; ``settings`` as :func:`bundle.inference.api.load_deconvolver`.

        Example::

            >>> deconv = Deconvolver.from_bundle("path/to/bundle")
            >>> sharp = [deconv.predict(stack, axes="ZYX") for stack in stacks]
        """
        from bundle.inference.api import load_deconvolver  # api builds on this module

        return load_deconvolver(model, device, roi_size, **settings)

    def predict(
        self, volume: np.ndarray | torch.Tensor, axes: str = "ZYX", normalize: Sequence[float] | None = (0.1, 99.9),
        output_range: str = "input", channel: int | None = None, refinement: Any = None,
    ) -> np.ndarray:
        """A stack of any size and axis order, normalised, deconvolved and restored like
        :func:`bundle.inference.deconvolve` (same arguments; ``refinement`` e.g.
        :func:`bundle.inference.model_refinement`'s), without reloading the model."""
        from bundle.inference.api import predict

        return predict(self, volume, axes, normalize, output_range, channel, refinement)

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
            roi = plan_roi_size(
                padded,
                self.max_pass_voxels,
                2 * h,
                self.divisor,
                max(self.auto_min_size, 2 * h + self.divisor),
            )
        else:
            roi = self.roi_size  # type: ignore[assignment]
        key = ("halo", *roi)
        if key not in self._inferers:
            base = self.inferer
            batch = (
                max(1, min(int(base.sw_batch_size), self.max_pass_voxels // int(np.prod(roi))))
                if self.auto
                else int(base.sw_batch_size)
            )
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
        x, predictor = torch.as_tensor(x), self.predictor
        if self.callback is not None:
            roi, inferer = self.inferer_for(x.shape[2:])
            shape = x[:1, :1].to("meta")  # the padded shape, without padding a copy of the data
            padded = (_pad_for_tiles(shape, roi, self.halo) if self.halo else _pad_to(shape, roi))[0]
            total = self.flips * x.shape[0] * window_count(padded.shape[2:], roi, inferer.overlap)
            predictor = _Reporting(self.predictor, self.callback, total)
        with malloc_policy(self.allocator), torch.inference_mode(not torch.is_grad_enabled()):
            return flip_average(lambda view: self._tiled(view, predictor), x, self.flips)

    def _tiled(self, x: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One view through the planned windows: pad, slide, crop back."""
        roi, inferer = self.inferer_for(x.shape[2:])
        self.last_roi_size = roi
        padded, crop = _pad_for_tiles(x, roi, self.halo) if self.halo else _pad_to(x, roi)
        return inferer(padded, predictor)[(slice(None), slice(None), *crop)]
