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
* **Same hot-pixel correction.** When the model was trained with ``hot_pixel_threshold`` (or one is
  given), the camera's hot pixels are found once over full-depth tiles with the whole stack's noise
  (:func:`find_hot_pixels_tiled`: the in-memory mask) and replaced in every read
  (:class:`HotPixelCorrectedVolume`), before the percentiles as in memory.

Memory: one group's input box, its windows and their predictions, and one output block; none of it
depends on the stack size (``docs/benchmark.md`` measures the peak RSS for a stack and one 4×
larger). Dask is not needed; the Zarr arrays are read and written region by region.

Output layout (OME-NGFF 0.4, Zarr v2 format, readable by napari/Fiji): a group with
``multiscales`` metadata (axes z, y, x in micrometres, one level ``"0"`` with the voxel size as
its scale) and the float32 array ``"0"``, chunked like ``chunks``.

Modules: :mod:`~bundle.ooc.zarr_io` (opening stacks, writing OME-Zarr), :mod:`~bundle.ooc.grid`
(the window grid, blocks and percentiles of the whole volume), :mod:`~bundle.ooc.hot_pixels` (the
camera's hot pixels, out of core) and :mod:`~bundle.ooc.deconvolve` (:func:`deconvolve_zarr`).
Everything public is importable from ``bundle.ooc``.
"""

from bundle.ooc.dask_graph import deconvolve_dask
from bundle.ooc.deconvolve import deconvolve_zarr
from bundle.ooc.grid import estimate_percentiles, window_grid
from bundle.ooc.hot_pixels import HotPixelCorrectedVolume, find_hot_pixels_tiled
from bundle.ooc.zarr_io import open_volume, write_ome_zarr

__all__ = [
    "HotPixelCorrectedVolume",
    "find_hot_pixels_tiled",
    "deconvolve_dask",
    "deconvolve_zarr",
    "estimate_percentiles",
    "open_volume",
    "window_grid",
    "write_ome_zarr",
]
