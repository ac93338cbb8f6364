"""Out-of-core deconvolution block by block, the same windows and result as in memory."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.transforms import ScaleIntensityRange
from torch import nn

from bundle.allocator import malloc_policy
from bundle.ooc.grid import (
    OUTPUT_RANGES,
    _blocks,
    _groups,
    _overlap,
    _padding,
    _shift,
    normalization_range,
    window_grid,
)
from bundle.ooc.hot_pixels import hot_pixel_corrected
from bundle.ooc.zarr_io import _create_ome_zarr, open_volume

logger = logging.getLogger(__name__)


@torch.no_grad()
def block_output(
    context: np.ndarray,
    missing: Sequence[tuple[int, int]],
    deconv: nn.Module,
    halo: int,
    scale: Any,
    intensity_range: tuple[float, float],
    output_range: str,
) -> np.ndarray:
    """One block of a window-free network's output from the block read with its context.

    Args:
        context: the block with up to ``halo`` voxels of context on each side, raw intensities.
        missing: per axis, ``(before, after)`` context voxels absent because the block meets the
            stack's faces there: mirrored, as in-memory inference mirrors the stack (replicated when
            the block is too thin to mirror).
        deconv: a :class:`~bundle.inference.Deconvolver` with this ``halo``.
        scale: the normalisation to [0, 1] (``None``: already normalised).
        intensity_range: ``(v_lo, v_hi)`` the normalisation maps to [0, 1].
        output_range: ``"input"`` maps the output back to ``[v_lo, v_hi]``; ``"normalized"`` keeps [0, 1].

    Returns:
        float32 block: ``context`` less ``halo`` on every side (with the missing context restored).
    """
    x = torch.from_numpy(np.ascontiguousarray(context, dtype=np.float32))
    x = torch.as_tensor(scale(x) if scale is not None else x)[None, None]
    flat = [v for before, after in reversed(list(missing)) for v in (before, after)]
    if any(flat):
        mirror = all(p < s for p, s in zip(flat, [s for s in reversed(x.shape[2:]) for _ in range(2)]))
        x = F.pad(x, flat, mode="reflect" if mirror else "replicate")
    with torch.inference_mode():
        y = deconv(x)[0, 0]
    result = y[tuple(slice(halo, n - halo) for n in y.shape)]
    if output_range == "input":
        lo, hi = intensity_range
        result = result * (hi - lo) + lo
    return result.numpy()


@torch.no_grad()
def _deconvolve_blocks(
    volume: Any,
    shape: tuple[int, ...],
    network: nn.Module,
    halo: int,
    scale: Any,
    intensity_range: tuple[float, float],
    output_range: str,
    block_size: Sequence[int],
    chunks: Sequence[int] | None,
    voxel_size: Sequence[float] | None,
    destination: str | os.PathLike,
    overwrite: bool,
    progress: bool,
    precision: str,
    channels_last: bool,
    sw_batch_size: int,
    ome_version: str = "0.5",
) -> Any:
    """:func:`deconvolve_zarr` for a window-free network: each block with ``halo`` voxels of context."""
    from bundle.inference import Deconvolver

    lo, hi = intensity_range
    block = tuple(min(max(int(b), 1), s) for b, s in zip(block_size, shape))
    out_chunks = tuple(min(int(c), s) for c, s in zip(chunks or block, shape))
    out = _create_ome_zarr(
        destination, shape, out_chunks, voxel_size, overwrite=overwrite, name=Path(destination).stem, ome_version=ome_version
    )
    out.attrs.update({"complete": False, "intensity_range": [lo, hi], "halo": halo})
    deconv = Deconvolver(
        network, roi_size="auto", halo=halo, sw_batch_size=sw_batch_size, precision=precision,
        channels_last=channels_last, device="cpu", allocator="system",
    )
    blocks = list(_blocks(shape, block))
    iterator: Any = blocks
    if progress:
        from tqdm import tqdm

        iterator = tqdm(blocks, desc="blocks")
    for dst in iterator:
        ctx = tuple(slice(max(0, d.start - halo), min(n, d.stop + halo)) for d, n in zip(dst, shape))
        missing = [(halo - (d.start - c.start), halo - (c.stop - d.stop)) for d, c in zip(dst, ctx)]
        out[dst] = block_output(volume[ctx], missing, deconv, halo, scale, (lo, hi), output_range)
    out.attrs["complete"] = True
    logger.info(f"deconvolved {shape} in {len(blocks)} blocks with a halo of {halo} voxels -> {destination}")
    return out


def deconvolve_zarr(
    source: Any,
    destination: str | os.PathLike,
    model: nn.Module | str | os.PathLike,
    roi_size: Sequence[int] = (64, 64, 64),
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    normalize: Sequence[float] | None = (0.1, 99.9),
    intensity_range: Sequence[float] | None = None,
    output_range: str = "input",
    block_size: Sequence[int] = (128, 256, 256),
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    max_percentile_samples: int = 1 << 21,
    overwrite: bool = False,
    progress: bool = False,
    precision: str = "auto",
    channels_last: bool = True,
    bounded_memory: bool = True,
    halo: int | str = "auto",
    ome_version: str = "0.5",
    hot_pixel_threshold: float | str | None = "auto",
) -> Any:
    """Deconvolve a ``(Z, Y, X)`` stack larger than memory, block by block, into an OME-Zarr.

    A window-free network (``halo`` > 0, by default the network's ``tiling_halo``: the bundle's
    default generator) needs no shared window grid: each ``block_size`` block is read with ``halo``
    voxels of context (mirrored at the stack's faces, as in memory) and deconvolved on its own by
    :class:`bundle.inference.Deconvolver`; the result equals in-memory ``deconvolve`` with its default
    settings but one view (``flips=1``: no view averaging, no refinement out of core; tested), and ``roi_size``, ``overlap``, ``mode`` and ``sigma_scale`` are not used. A
    network without a halo (instance norm) uses MONAI's window grid and blending described above.

    Args:
        source: OME-Zarr group or Zarr array (path or object), or a numpy array (see :func:`open_volume`).
        destination: output folder (an OME-Zarr group, float32 array ``"0"``; ``ome_version``).
        model: the generator (an ``nn.Module``, checkpoint or bundle folder: ``bundle.inference.load_network``).
        roi_size: window ``(d, h, w)``, multiples of 16 (the network's divisor).
        overlap: window overlap fraction (0.25 = the paper's 16 voxels at 64³).
        sw_batch_size: windows per forward pass (>= 2 on CPU: conv3d's slow path is batch 1).
        mode: blending, ``"gaussian"`` or ``"constant"`` (MONAI's ``compute_importance_map``).
        sigma_scale: Gaussian sigma as a fraction of the window (MONAI's default 0.125).
        normalize: ``(lower, upper)`` percentiles mapped to [0, 1] (clipped), the training
            normalisation of the blurred domain; None if the data are already in [0, 1].
        intensity_range: the input values ``(v_lo, v_hi)`` to map to [0, 1] instead of estimating
            them from ``normalize`` percentiles (e.g. known from a smaller stack of the same session).
        output_range: ``"input"`` maps the [0, 1] output back to ``[v_lo, v_hi]``; ``"normalized"``
            keeps it.
        block_size: windows are processed in groups by the ``block_size`` cell holding their first
            voxel; memory grows with it (about ``block + roi`` voxels per axis, a few float32 copies).
        chunks: output chunks (default ``min(block_size, shape)``); writes are aligned to blocks.
        voxel_size: ``(z, y, x)`` µm written into the OME metadata (default: the source's).
        device: device of the network; default CUDA if available.
        max_percentile_samples: voxels read at most to estimate the percentiles.
        overwrite: replace an existing ``destination``.
        progress: tqdm bar over the groups.
        precision, channels_last: how the network runs (:class:`bundle.inference.InferenceNetwork`).
        halo: ``"auto"`` (the network's ``tiling_halo``), 0 (MONAI's blended window grid) or voxels.
        bounded_memory: run under the ``"release"`` malloc policy (:func:`bundle.allocator.malloc_policy`:
            freed buffers are unmapped at once), so that the peak memory does not grow with the number
            of blocks (glibc; about 7 % slower on the CPU). False: glibc's default behaviour.
        ome_version: OME-Zarr version of the output: ``"0.5"`` (Zarr v3; default) or ``"0.4"`` (Zarr v2).
        hot_pixel_threshold: the camera's hot pixels replaced as the stack is read
            (:mod:`bundle.ooc.hot_pixels`, the in-memory result): ``"auto"`` as the model's training, a number, or None.

    Returns:
        the output Zarr array (``destination/0``), float32, the source's shape.
    """
    from bundle.inference import InferenceNetwork, load_network

    with malloc_policy("release" if bounded_memory else "system"):
        if output_range not in OUTPUT_RANGES:
            raise ValueError(f"output_range must be one of {OUTPUT_RANGES}, got {output_range!r}")
        volume, source_voxel = open_volume(source)
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) != 3:
            raise ValueError(
                f"{source if isinstance(source, (str, os.PathLike)) else 'source'}: need a (Z, Y, X) volume, got shape {shape}"
            )
        roi = tuple(int(r) for r in roi_size)
        if device is None:
            device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        network = load_network(model, device)
        volume = hot_pixel_corrected(volume, model, hot_pixel_threshold)
        net_device = next(network.parameters()).device
        halo = int(getattr(network, "tiling_halo", 0)) if halo == "auto" else int(halo)
        predictor = None if halo else InferenceNetwork(network, precision, channels_last)

        # normalisation (whole-volume statistics, as in memory)
        lo, hi, output_range = normalization_range(
            volume, normalize, intensity_range, output_range, max_samples=max_percentile_samples
        )
        scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)

        if halo:
            return _deconvolve_blocks(
                volume, shape, network, halo, scale if (normalize is not None or intensity_range is not None) else None,
                (lo, hi), output_range, block_size, chunks, voxel_size or source_voxel, destination, overwrite,
                progress, precision, channels_last, sw_batch_size, ome_version,
            )

        # geometry: padded image, MONAI's window grid, blocks spanning padded axes whole
        pads, pad_mode = _padding(shape, roi)
        before = [p // 2 for p in pads]
        padded = tuple(s + p for s, p in zip(shape, pads))
        block = tuple(padded[i] if pads[i] else max(int(block_size[i]), 1) for i in range(3))
        windows = window_grid(padded, roi, overlap)
        weight = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device=net_device, dtype=torch.float32)
        weight = weight.reshape(1, 1, *roi)
        weight_cpu = weight.cpu()[0, 0]
        starts = [sorted({w[i].start for w in windows}) for i in range(3)]  # the grid is a product

        out_chunks = tuple(min(int(c), s) for c, s in zip(chunks or block, shape))
        out = _create_ome_zarr(destination, shape, out_chunks, voxel_size or source_voxel, overwrite=overwrite,
                               name=Path(destination).stem, ome_version=ome_version)  # fmt: skip
        out.attrs.update({"complete": False, "intensity_range": [lo, hi], "roi_size": list(roi), "overlap": overlap})

        groups = list(_groups(windows, block))
        iterator: Any = groups
        if progress:
            from tqdm import tqdm

            iterator = tqdm(groups, desc="blocks")
        # pass 1: each group of windows adds prediction * weight into the output (read-modify-write)
        for group in iterator:
            box = tuple(slice(min(w[i].start for w in group), max(w[i].stop for w in group)) for i in range(3))
            origin = [s.start for s in box]
            # the box in source coordinates (padded axes are read whole, then padded like in memory)
            src_box = tuple(slice(0, shape[i]) if pads[i] else box[i] for i in range(3))
            x = torch.from_numpy(np.ascontiguousarray(volume[src_box], dtype=np.float32))
            x = scale(x) if (normalize is not None or intensity_range is not None) else x
            x = torch.as_tensor(x)[None, None]
            if any(pads):
                flat = [v for p, b in zip(reversed(pads), reversed(before)) for v in (b, p - b)]
                x = F.pad(x, flat, mode=pad_mode)
            acc = torch.zeros([s.stop - s.start for s in box], dtype=torch.float32)
            for i in range(0, len(group), sw_batch_size):
                batch = group[i : i + sw_batch_size]
                win = torch.cat([x[(slice(None), slice(None), *_shift(w, origin))] for w in batch]).to(net_device)
                with torch.inference_mode():
                    pred = (predictor(win) * weight).cpu()
                for p, w in zip(pred, batch):
                    acc[_shift(w, origin)] += p[0]
            # crop the padding away and add into the output
            real = tuple(slice(max(s.start, b), min(s.stop, b + n)) for s, b, n in zip(box, before, shape))
            if any(r.start >= r.stop for r in real):
                continue
            dst = tuple(slice(r.start - b, r.stop - b) for r, b in zip(real, before))
            out[dst] = np.asarray(out[dst]) + acc[_shift(real, origin)].numpy()

        # pass 2: divide by the summed weights of the windows overlapping each block, restore intensities
        for dst in _blocks(shape, out_chunks if all(c > 0 for c in out_chunks) else shape):
            region = tuple(slice(d.start + b, d.stop + b) for d, b in zip(dst, before))  # padded coords
            count = torch.zeros([r.stop - r.start for r in region], dtype=torch.float32)
            origin = [r.start for r in region]
            near = [
                [a for a in axis if a < r.stop and a + n > r.start] for axis, r, n in zip(starts, region, roi)
            ]
            for corner in itertools.product(*near):  # the windows overlapping this block, in MONAI's order
                w = tuple(slice(a, a + n) for a, n in zip(corner, roi))
                o = _overlap(w, region)
                count[_shift(o, origin)] += weight_cpu[_shift(o, corner)]
            result = torch.from_numpy(np.asarray(out[dst], dtype=np.float32)) / count
            if output_range == "input":
                result = result * (hi - lo) + lo
            out[dst] = result.numpy()
        out.attrs["complete"] = True
        logger.info(f"deconvolved {shape} in {len(groups)} groups of windows -> {destination}")
        return out
