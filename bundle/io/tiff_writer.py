"""Writing TIFF stacks with tifffile: ImageJ TIFFs with voxel size, atomically, and MONAI's writer class.

Written here because MONAI's ``SaveImage`` writes ``.tif`` through PIL as one 2D slice (no stacks, no
voxel size); tifffile does the writing, this module the axes, dtype and metadata conventions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from monai.config import DtypeLike, NdarrayOrTensor, PathLike
from monai.data import ImageWriter
from monai.data.utils import affine_to_spacing
from monai.utils import convert_data_type

from bundle.io.atomic import atomic_write
from bundle.io.formats import KEPT_DTYPES

__all__ = ["TiffStackWriter"]


def _write_tiff(
    path: PathLike, data: np.ndarray, voxel_size: Sequence[float] | None, channel_axis: bool = False
) -> None:
    """Write ``(Z, Y, X)``/``(Y, X)`` (or with a leading channel axis) as an ImageJ TIFF with voxel size."""
    spatial = "ZYX"[3 - (data.ndim - int(channel_axis)) :]
    axes = spatial
    if channel_axis:
        axes = "ZCYX" if len(spatial) == 3 else "CYX"
        if len(spatial) == 3:
            data = np.moveaxis(data, 0, 1)  # (C, Z, Y, X) -> ImageJ's (Z, C, Y, X)
    metadata: dict[str, Any] = {"axes": axes}
    if channel_axis:
        metadata["mode"] = "composite"  # read back as channels, not as a Z stack
    kwargs: dict[str, Any] = {}
    if voxel_size is not None:
        vs = [float(v) for v in voxel_size][-len(spatial) :]
        kwargs["resolution"] = (1.0 / vs[-1], 1.0 / vs[-2])
        metadata["unit"] = "um"
        if len(spatial) == 3:
            metadata["spacing"] = vs[0]
    tifffile.imwrite(path, np.ascontiguousarray(data), imagej=True, metadata=metadata, **kwargs)


def _output_dtype(data_dtype: np.dtype, dtype: DtypeLike | None) -> np.dtype:
    """The written dtype: ``dtype`` if given, else the data's if uint8/uint16/float32, else float32."""
    if dtype is None:
        return data_dtype if data_dtype in KEPT_DTYPES else np.dtype(np.float32)
    out = np.dtype(dtype)
    if out not in KEPT_DTYPES:
        raise ValueError(f"output dtype must be one of uint8, uint16, float32, got {out}")
    return out


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to ``dtype``; to an integer dtype floats are rounded and clipped to its range (no rescaling)."""
    if data.dtype == dtype:
        return data
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(data, info.min, info.max).astype(dtype)
    return data.astype(dtype)


class TiffStackWriter(ImageWriter):
    """MONAI image writer saving ``(Z, Y, X)`` stacks as ImageJ TIFFs with voxel size, atomically.

    The input is channel-first ``(C, Z, Y, X)`` (``channel_dim=0``, C = 1 is squeezed; C > 1 is written
    as an ImageJ hyperstack ``ZCYX``) or ``(Z, Y, X)`` (``channel_dim=None``), with the MONAI spatial
    dims in the order ``(Z, Y, X)`` as produced by :class:`TiffStackReader`. The voxel size is taken
    from the meta dict's ``affine`` (the current grid; ``original_affine`` if ``resample=True``) and
    written as ImageJ ``spacing`` + X/YResolution with unit µm. Registered for ``.tif``/``.tiff`` by
    :func:`register`, so ``SaveImaged(..., output_ext=".tif")`` uses it once ``bundle.io`` is imported.

    Args:
        output_dtype: uint8, uint16 or float32; None keeps the data's dtype if it is one of them
            (else float32). Floats written to integer dtypes are rounded and clipped (after ``scale``).
        scale: if given, multiply the data by ``scale`` before casting (MONAI's ``SaveImage`` option,
            e.g. 255 for [0, 1] data written as uint8).

    Example::

        from monai.transforms import SaveImaged
        import bundle.io  # registers the writer for .tif
        SaveImaged(keys="pred", output_dir="out", output_ext=".tif", output_dtype=np.float32)
    """

    def __init__(self, output_dtype: DtypeLike | None = np.float32, scale: float | None = None, **kwargs):
        super().__init__(
            output_dtype=output_dtype, scale=scale, voxel_size=None, channel_axis=False, **kwargs
        )

    def set_data_array(
        self,
        data_array: NdarrayOrTensor,
        channel_dim: int | None = 0,
        squeeze_end_dims: bool = True,
        **kwargs,
    ):
        """Store the data as ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` for C > 1).

        Args:
            data_array: ``(C, Z, Y, X)`` with the channel at ``channel_dim``, or ``(Z, Y, X)``.
            channel_dim: channel axis, None if there is none.
            squeeze_end_dims: kept for MONAI compatibility; a single channel is always squeezed.
        """
        data = convert_data_type(data_array, np.ndarray)[0]
        if channel_dim is not None:
            data = np.moveaxis(data, channel_dim, 0)
            if data.shape[0] == 1:
                data = data[0]
            else:
                self.channel_axis = True
        spatial_ndim = data.ndim - int(self.channel_axis)
        if spatial_ndim not in (2, 3):
            raise ValueError(f"TiffStackWriter needs 2 or 3 spatial dims (Z, Y, X), got shape {data.shape}")
        self.data_obj = data

    def set_metadata(self, meta_dict: Mapping | None = None, resample: bool = False, **options):
        """Take the voxel size from the meta dict (resampling to ``original_affine`` if ``resample``).

        Args:
            meta_dict: MONAI meta dict; keys used: ``affine``, ``original_affine``, ``spatial_shape``,
                ``voxel_size``.
            resample: resample the data from ``affine`` to ``original_affine`` and ``spatial_shape``.
            options: ``mode``, ``padding_mode``, ``align_corners``, ``dtype`` for the resampling.
        """
        original_affine, affine, spatial_shape = self.get_meta_info(meta_dict)
        data = self.data_obj
        spatial_ndim = data.ndim - int(self.channel_axis)
        if resample and affine is not None and original_affine is not None:
            from monai.transforms import SpatialResample

            resampler = SpatialResample(
                mode=options.pop("mode", "bilinear"),
                padding_mode=options.pop("padding_mode", "border"),
                align_corners=options.pop("align_corners", False),
                dtype=options.pop("dtype", np.float64),
            )
            from monai.data import MetaTensor

            channel_first = MetaTensor(data if self.channel_axis else data[None], affine=affine)
            out = resampler(channel_first, dst_affine=original_affine, spatial_size=spatial_shape)
            out = convert_data_type(out, np.ndarray)[0]
            self.data_obj = out if self.channel_axis else out[0]
            affine = original_affine
        if affine is not None:
            spacing = convert_data_type(affine_to_spacing(affine, r=spatial_ndim), np.ndarray)[0]
            # a file read without calibration has voxel_size None/"none" and an identity affine
            uncalibrated = meta_dict is not None and "voxel_size" in meta_dict
            uncalibrated = uncalibrated and isinstance(meta_dict["voxel_size"], str | None)
            if not (uncalibrated and np.allclose(spacing, 1.0)):
                self.voxel_size = tuple(float(s) for s in spacing)
        elif meta_dict is not None and meta_dict.get("voxel_size") is not None:
            vs = convert_data_type(meta_dict["voxel_size"], np.ndarray)[0]
            if vs.dtype.kind == "f":
                self.voxel_size = tuple(float(v) for v in np.ravel(vs)[-spatial_ndim:])

    def write(self, filename: PathLike, verbose: bool = False, **kwargs):
        """Write the ImageJ TIFF atomically (temporary file in the same folder, then ``os.replace``)."""
        super().write(filename, verbose=verbose)
        data = self.data_obj
        if self.scale is not None:
            data = data.astype(np.float64) * self.scale
        data = _cast(data, _output_dtype(data.dtype, self.output_dtype))
        atomic_write(Path(filename), lambda tmp: _write_tiff(tmp, data, self.voxel_size, self.channel_axis))
