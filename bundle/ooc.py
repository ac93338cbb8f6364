"""Out-of-core deconvolution: chunked (OME-)Zarr in, chunked OME-Zarr out, memory independent of the stack size.

:func:`deconvolve_zarr` gives the same result as the in-memory :func:`bundle.inference.deconvolve`
(MONAI ``SlidingWindowInferer``, Gaussian blending) on the same volume — equal within float32
rounding (the test checks 1e-5) — while holding only one block of windows in memory at a time.

How the result stays identical to in-memory inference (the boundary treatment):

* **Same windows.** The window grid is computed once for the whole (virtually padded) volume with
  MONAI's own rule (``dense_patch_slices`` with the scan interval ``int(roi * (1 - overlap))``, the
  last window flush with the end), exactly as ``sliding_window_inference`` does. Every window sees
  the same voxels, so InstanceNorm sees the same statistics; blocks never create windows of their
  own.
* **Halo = whole windows.** Windows are grouped by the block (``block_size``) that holds their
  first voxel; a group reads the bounding box of its windows (the block plus ``roi - step`` voxels of
  halo on the far side), so every window is computed exactly once, with its full context.
* **Stitching by accumulation.** Each group adds ``prediction · w`` (``w`` the Gaussian importance
  map) into the output array (read-modify-write of the touched region; groups run one after
  another), and a second pass divides every output block by the sum of the weights of the windows
  that overlap it — the same quotient MONAI forms in memory, only summed in another order.
* **Same normalisation.** Percentiles are those of the whole volume (:func:`estimate_percentiles`:
  exact for stacks up to ``max_percentile_samples`` voxels, a regular subsample beyond), mapped to
  [0, 1] with clipping, and undone at the end, as in ``configs/inference.json``.
* **Same padding.** An axis shorter than the window is mirror-padded (edge-replicated for tiny
  axes) to the window size as :class:`bundle.inference.Deconvolver` does; blocks always span such an
  axis completely, so the padding is identical.

Memory: one group's input box, its windows and their predictions, and one output block; none of it
depends on the stack size (``docs/benchmark.md`` measures the peak RSS for a stack and one 4×
larger). Dask is not needed; the Zarr arrays are read and written region by region.

Output layout (OME-NGFF 0.4, Zarr v2 format, readable by napari/Fiji): a group with
``multiscales`` metadata (axes z, y, x in micrometres, one level ``"0"`` with the voxel size as
its scale) and the float32 array ``"0"``, chunked like ``chunks``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.transforms import ScaleIntensityRange
from torch import nn

from bundle.allocator import malloc_policy

__all__ = [
    "deconvolve_zarr",
    "estimate_percentiles",
    "open_volume",
    "window_grid",
    "write_ome_zarr",
]

logger = logging.getLogger(__name__)

OUTPUT_RANGES = ("input", "normalized")


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - zarr is a dependency of out-of-core inference
        raise ImportError("out-of-core inference needs the 'zarr' package: pip install zarr") from exc
    return zarr


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------


def window_grid(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]
) -> list[tuple[slice, ...]]:
    """The sliding windows of MONAI's ``sliding_window_inference`` on an image of ``image_size`` (in order).

    Args:
        image_size: ``(D, H, W)``, each at least ``roi_size`` (pad first).
        roi_size: window size ``(d, h, w)``.
        overlap: overlap fraction in [0, 1), one or one per axis.
    """
    if any(i < r for i, r in zip(image_size, roi_size)):
        raise ValueError(f"image_size {tuple(image_size)} must be >= roi_size {tuple(roi_size)} (pad first)")
    overlaps = [float(o) for o in np.broadcast_to(np.asarray(overlap, dtype=float), (len(roi_size),))]
    scan = []  # monai.inferers.utils._get_scan_interval
    for i, r, o in zip(image_size, roi_size, overlaps):
        scan.append(int(r) if r == i else max(int(r * (1 - o)), 1))
    return list(dense_patch_slices(tuple(image_size), tuple(roi_size), tuple(scan)))


def _padding(shape: Sequence[int], roi_size: Sequence[int]) -> tuple[list[int], str]:
    """Per-axis total padding to reach the window, and the mode, as ``bundle.inference.windows._pad_to``."""
    pads = [max(int(r) - int(s), 0) for s, r in zip(shape, roi_size)]
    reflect_ok = all(p - p // 2 < s for p, s in zip(pads, shape))
    return pads, "reflect" if reflect_ok else "replicate"


# ----------------------------------------------------------------------------------------------------------
# Zarr I/O
# ----------------------------------------------------------------------------------------------------------


def open_volume(source: Any) -> tuple[Any, tuple[float, float, float] | None]:
    """A ``(Z, Y, X)`` array-like (sliceable, ``.shape``) and its voxel size from a path or array.

    Args:
        source: an OME-Zarr group (level ``multiscales[0].datasets[0]`` is used, its ``scale`` gives
            the voxel size), a Zarr array (path or object), or a numpy array.
    """
    if isinstance(source, np.ndarray):
        return source, None
    zarr = _zarr()
    node = zarr.open(str(source), mode="r") if isinstance(source, (str, os.PathLike)) else source
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise ValueError(
                f"{source}: a Zarr group without OME 'multiscales' metadata; pass the array path"
            )
        level = multiscales[0]["datasets"][0]
        array = node[level["path"]]
        voxel = None
        for transform in level.get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                voxel = tuple(float(v) for v in transform["scale"][-3:])
        return array, voxel
    return node, None


def _ome_attrs(voxel_size: Sequence[float] | None, name: str) -> dict[str, Any]:
    scale = [float(v) for v in (voxel_size or (1.0, 1.0, 1.0))]
    unit = {"unit": "micrometer"} if voxel_size is not None else {}
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": [{"name": a, "type": "space", **unit} for a in "zyx"],
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
                "type": "sliding-window deconvolution",
            }
        ]
    }


def _create_ome_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    chunks: Sequence[int],
    voxel_size: Sequence[float] | None,
    dtype: Any = np.float32,
    overwrite: bool = False,
    name: str = "",
) -> Any:
    zarr = _zarr()
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs.update(_ome_attrs(voxel_size, name or Path(path).stem))
    return group.create_array(
        "0",
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=dtype,
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )


def write_ome_zarr(
    path: str | os.PathLike,
    volume: np.ndarray,
    voxel_size: Sequence[float] | None = None,
    chunks: Sequence[int] = (64, 256, 256),
    overwrite: bool = False,
) -> Any:
    """Write an in-memory ``(Z, Y, X)`` volume as a one-level OME-Zarr (for tests, demos, converting stacks).

    Returns:
        the Zarr array ``path/0``.
    """
    chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, volume.shape))
    array = _create_ome_zarr(path, volume.shape, chunks, voxel_size, dtype=volume.dtype, overwrite=overwrite)
    array[...] = volume
    return array


# ----------------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------------


def estimate_percentiles(
    volume: Any, percentiles: Sequence[float], max_samples: int = 1 << 21, slab: int = 16
) -> tuple[float, float]:
    """Values of a volume at two percentiles, read slab by slab.

    Exact (the same numbers as ``bundle.inference.NormalizePercentilesd``) when the volume has at most
    ``max_samples`` voxels; otherwise computed on a regular subsample (every ``s``-th voxel along
    each axis, ``s`` chosen so that at most ``max_samples`` voxels are read into memory).
    """
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    shape = tuple(int(s) for s in volume.shape)
    n = math.prod(shape)
    stride = 1 if n <= max_samples else math.ceil((n / max_samples) ** (1.0 / 3.0))
    parts = []
    step = max(slab, 1) * stride
    for z0 in range(0, shape[0], step):
        block = np.asarray(
            volume[z0 : min(z0 + step, shape[0]) : stride, ::stride, ::stride], dtype=np.float32
        )
        parts.append(block)
    sample = torch.from_numpy(np.concatenate(parts, axis=0))
    lo, hi = (float(percentile(sample, p)) for p in percentiles)  # type: ignore[arg-type]
    return lo, hi


# ----------------------------------------------------------------------------------------------------------
# the out-of-core loop
# ----------------------------------------------------------------------------------------------------------


def _groups(windows: list[tuple[slice, ...]], block_size: Sequence[int]) -> Iterator[list[tuple[slice, ...]]]:
    """Windows grouped by the block holding their first voxel, in raster order of the blocks."""
    groups: dict[tuple[int, ...], list[tuple[slice, ...]]] = {}
    for w in windows:
        groups.setdefault(tuple(s.start // b for s, b in zip(w, block_size)), []).append(w)
    for key in sorted(groups):
        yield groups[key]


def _blocks(shape: Sequence[int], block_size: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    for z in range(0, shape[0], block_size[0]):
        for y in range(0, shape[1], block_size[1]):
            for x in range(0, shape[2], block_size[2]):
                yield tuple(slice(o, min(o + b, s)) for o, b, s in zip((z, y, x), block_size, shape))


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = tuple(slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(a, b))
    return out if all(s.start < s.stop for s in out) else None


def _shift(region: tuple[slice, ...], origin: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s.start - o, s.stop - o) for s, o in zip(region, origin))


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
) -> Any:
    """:func:`deconvolve_zarr` for a window-free network: each block with ``halo`` voxels of context."""
    from bundle.inference import Deconvolver

    lo, hi = intensity_range
    block = tuple(min(max(int(b), 1), s) for b, s in zip(block_size, shape))
    out_chunks = tuple(min(int(c), s) for c, s in zip(chunks or block, shape))
    out = _create_ome_zarr(destination, shape, out_chunks, voxel_size, overwrite=overwrite, name=Path(destination).stem)
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
        x = torch.from_numpy(np.ascontiguousarray(volume[ctx], dtype=np.float32))
        x = torch.as_tensor(scale(x) if scale is not None else x)[None, None]
        # where the context meets the stack's faces, mirror it as in-memory inference mirrors the stack
        missing = [(halo - (d.start - c.start), halo - (c.stop - d.stop)) for d, c in zip(dst, ctx)]
        flat = [v for before, after in reversed(missing) for v in (before, after)]
        if any(flat):
            mirror = all(p < s for p, s in zip(flat, [s for s in reversed(x.shape[2:]) for _ in range(2)]))
            x = F.pad(x, flat, mode="reflect" if mirror else "replicate")
        with torch.inference_mode():
            y = deconv(x)[0, 0]
        core = tuple(slice(halo, halo + (d.stop - d.start)) for d in dst)
        result = y[core]
        if output_range == "input":
            result = result * (hi - lo) + lo
        out[dst] = result.numpy()
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
) -> Any:
    """Deconvolve a ``(Z, Y, X)`` stack larger than memory, block by block, into an OME-Zarr.

    A window-free network (``halo`` > 0, by default the network's ``tiling_halo``: the bundle's
    default generator) needs no shared window grid: each ``block_size`` block is read with ``halo``
    voxels of context (mirrored at the stack's faces, as in memory) and deconvolved on its own by
    :class:`bundle.inference.Deconvolver`; the result equals in-memory ``deconvolve`` with its default
    settings (tested), and ``roi_size``, ``overlap``, ``mode`` and ``sigma_scale`` are not used. A
    network without a halo (instance norm) uses MONAI's window grid and blending described above.

    Args:
        source: OME-Zarr group or Zarr array (path or object), or a numpy array (see :func:`open_volume`).
        destination: output folder (an OME-Zarr group, float32 array ``"0"``).
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
        net_device = next(network.parameters()).device
        halo = int(getattr(network, "tiling_halo", 0)) if halo == "auto" else int(halo)
        predictor = None if halo else InferenceNetwork(network, precision, channels_last)

        # normalisation (whole-volume statistics, as in memory)
        if intensity_range is not None:
            lo, hi = (float(v) for v in intensity_range)
        elif normalize is not None:
            lo, hi = estimate_percentiles(volume, normalize, max_samples=max_percentile_samples)
        else:
            lo, hi = 0.0, 1.0
        if normalize is None and intensity_range is None and output_range == "input":
            output_range = "normalized"
        if not hi > lo:
            raise ValueError(f"intensity range ({lo:g}, {hi:g}) is empty: the volume is (nearly) constant")
        scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)

        if halo:
            return _deconvolve_blocks(
                volume, shape, network, halo, scale if (normalize is not None or intensity_range is not None) else None,
                (lo, hi), output_range, block_size, chunks, voxel_size or source_voxel, destination, overwrite,
                progress, precision, channels_last, sw_batch_size,
            )

        # geometry: padded image, MONAI's window grid, blocks spanning padded axes whole
        pads, pad_mode = _padding(shape, roi)
        before = [p // 2 for p in pads]
        padded = tuple(s + p for s, p in zip(shape, pads))
        block = tuple(padded[i] if pads[i] else max(int(block_size[i]), 1) for i in range(3))
        windows = window_grid(padded, roi, overlap)
        weight = compute_importance_map(
            roi, mode=mode, sigma_scale=sigma_scale, device=net_device, dtype=torch.float32
        )
        weight = weight.reshape(1, 1, *roi)
        weight_cpu = weight.cpu()[0, 0]
        starts = [sorted({w[i].start for w in windows}) for i in range(3)]  # the grid is a product

        out_chunks = tuple(min(int(c), s) for c, s in zip(chunks or block, shape))
        out = _create_ome_zarr(
            destination,
            shape,
            out_chunks,
            voxel_size or source_voxel,
            overwrite=overwrite,
            name=Path(destination).stem,
        )
        out.attrs.update(
            {"complete": False, "intensity_range": [lo, hi], "roi_size": list(roi), "overlap": overlap}
        )

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
