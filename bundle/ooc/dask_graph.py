"""Out-of-core inference as a dask graph: the same blocks as :func:`~bundle.ooc.deconvolve_zarr`, on any
dask scheduler (threads, a ``dask.distributed`` ``LocalCluster``, any cluster a user has).

``dask.array.map_overlap`` hands each chunk to a task with ``halo`` voxels of its neighbours (the
network's ``tiling_halo``); the task mirrors the context missing at the stack's faces, deconvolves with
the shared :func:`~bundle.ooc.deconvolve.block_output` and returns the chunk's core; ``dask.array.store``
writes every chunk of the OME-Zarr output in parallel (one task per output chunk: no two write the same
chunk). Each worker loads the model once (cached per process). Written here because no library runs a
PyTorch model over a dask array with a model-defined halo (dask-image's filters are fixed kernels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from bundle.ooc.deconvolve import block_output
from bundle.ooc.grid import OUTPUT_RANGES, normalization_range
from bundle.ooc.hot_pixels import hot_pixel_corrected
from bundle.ooc.zarr_io import _create_ome_zarr, open_volume

__all__ = ["deconvolve_dask"]

logger = logging.getLogger(__name__)

_DECONVOLVERS: dict[tuple, Any] = {}  # per worker process: (model, settings) -> Deconvolver


def _deconvolver(model: Any, precision: str, sw_batch_size: int, max_pass_voxels: int) -> Any:
    """The worker's :class:`~bundle.inference.Deconvolver` for ``model`` (loaded on first use)."""
    key = (str(model) if isinstance(model, (str, os.PathLike)) else id(model), precision, sw_batch_size, max_pass_voxels)
    if key not in _DECONVOLVERS:
        from bundle.inference import Deconvolver, load_network

        network = load_network(model, "cpu")
        _DECONVOLVERS[key] = Deconvolver(
            network, roi_size="auto", halo=int(network.tiling_halo), sw_batch_size=sw_batch_size,
            precision=precision, max_pass_voxels=max_pass_voxels, device="cpu", allocator="system",
        )  # fmt: skip
    return _DECONVOLVERS[key]


def _chunk_task(
    block: np.ndarray,
    *,
    block_info: dict | None = None,
    model: Any,
    halo: int,
    intensity_range: tuple[float, float],
    normalize: bool,
    output_range: str,
    precision: str,
    sw_batch_size: int,
    max_pass_voxels: int,
) -> np.ndarray:
    """One chunk: ``block`` is the chunk with ``halo`` voxels of context wherever it has neighbours."""
    from monai.transforms import ScaleIntensityRange

    info = block_info[0]
    location, grid = info["chunk-location"], info["num-chunks"]
    missing = [(halo if i == 0 else 0, halo if i == n - 1 else 0) for i, n in zip(location, grid)]
    lo, hi = intensity_range
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True) if normalize else None
    deconv = _deconvolver(model, precision, sw_batch_size, max_pass_voxels)
    return block_output(block, missing, deconv, halo, scale, intensity_range, output_range)


def deconvolve_dask(
    source: Any,
    destination: str | os.PathLike,
    model: nn.Module | str | os.PathLike,
    chunks: Sequence[int] = (64, 256, 256),
    normalize: Sequence[float] | None = (0.1, 99.9),
    intensity_range: Sequence[float] | None = None,
    output_range: str = "input",
    voxel_size: Sequence[float] | None = None,
    precision: str = "auto",
    sw_batch_size: int = 4,
    max_pass_voxels: int = 1 << 22,
    overwrite: bool = False,
    ome_version: str = "0.5",
    scheduler: Any = None,
    hot_pixel_threshold: float | str | None = "auto",
) -> Any:
    """Deconvolve a ``(Z, Y, X)`` stack as a dask graph and write it as OME-Zarr, chunk by chunk.

    The result equals in-memory :func:`bundle.inference.deconvolve` with its default settings but one
    view (``flips=1``; out of core there is no view averaging and no refinement) (a window-free network: its output at a voxel depends on the input within ``tiling_halo``), whatever
    the chunks and the number of workers. Per-task memory is one chunk with its halo and the
    network's activations for it: independent of the stack's size.

    Args:
        source: OME-Zarr group or Zarr array (path or object), a numpy array, or a ``dask.array``.
        destination: output folder, an OME-Zarr (``ome_version``) with a float32 array ``"0"`` chunked
            like the computation.
        model: a file or folder path (each worker loads it once: the way to go on a cluster) or an
            ``nn.Module`` (pickled into the graph: fine on threads and small clusters).
        chunks: chunk ``(z, y, x)`` of the computation and of the output (each at least the halo).
        normalize: percentiles mapped to [0, 1] (estimated on the whole stack, as in memory); None if
            already in [0, 1].
        intensity_range: ``(v_lo, v_hi)`` instead of estimating them.
        output_range: ``"input"`` (the input's range at those percentiles) or ``"normalized"``.
        voxel_size: ``(z, y, x)`` µm written to the output (default: the source's).
        precision, sw_batch_size, max_pass_voxels: as :class:`~bundle.inference.Deconvolver`.
        overwrite: replace an existing ``destination``.
        ome_version: ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
        scheduler: a ``dask.distributed.Client`` or any ``scheduler=`` value of ``dask.compute``
            (default: the current one, e.g. a ``Client`` made before the call, else threads).
        hot_pixel_threshold: as :func:`~bundle.ooc.deconvolve_zarr` (the mask is found before the graph
            is built; each chunk's read is corrected).

    Returns:
        the output Zarr array (``destination/0``).
    """
    import dask.array as da

    from bundle.inference import load_network

    if output_range not in OUTPUT_RANGES:
        raise ValueError(f"output_range must be one of {OUTPUT_RANGES}, got {output_range!r}")
    volume, source_voxel = (source, None) if isinstance(source, da.Array) else open_volume(source)
    volume = hot_pixel_corrected(volume, model, hot_pixel_threshold)
    array = volume if isinstance(volume, da.Array) else da.from_array(volume, chunks=tuple(int(c) for c in chunks))
    if array.ndim != 3:
        raise ValueError(f"need a (Z, Y, X) volume, got shape {array.shape}")
    array = array.rechunk(tuple(min(int(c), int(s)) for c, s in zip(chunks, array.shape)))
    halo = int(getattr(load_network(model, "cpu"), "tiling_halo", 0))
    if halo <= 0:
        raise ValueError(
            "the dask path needs a window-free generator (tiling_halo > 0: batch or no norm, align_corners=False); "
            "use bundle.ooc.deconvolve_zarr for this one"
        )
    smallest = min(min(c) for c in array.chunks)
    if smallest < halo:
        raise ValueError(f"chunks of {smallest} voxels are thinner than the halo ({halo}); use larger chunks")
    lo, hi, output_range = normalization_range(array, normalize, intensity_range, output_range)
    result = da.map_overlap(
        _chunk_task, array, depth=halo, boundary="none", trim=False, chunks=array.chunks, dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32), model=model, halo=halo, intensity_range=(lo, hi),
        normalize=normalize is not None or intensity_range is not None, output_range=output_range,
        precision=precision, sw_batch_size=int(sw_batch_size), max_pass_voxels=int(max_pass_voxels),
    )  # fmt: skip
    out = _create_ome_zarr(
        destination, array.shape, [c[0] for c in array.chunks], voxel_size or source_voxel, overwrite=overwrite,
        name=Path(destination).stem, ome_version=ome_version,
    )  # fmt: skip
    out.attrs.update({"complete": False, "intensity_range": [lo, hi], "halo": halo, "engine": "dask"})
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    da.store(result, out, lock=False, compute=True, **kwargs)
    out.attrs["complete"] = True
    logger.info(f"deconvolved {array.shape} in {array.npartitions} dask chunks (halo {halo}) -> {destination}")
    return out
