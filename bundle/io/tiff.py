"""TIFF stacks with tifffile: reading (ImageJ/OME voxel size, axes) and writing, and MONAI reader/writer classes."""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from monai.config import DtypeLike, NdarrayOrTensor, PathLike
from monai.data import ImageWriter
from monai.data.utils import affine_to_spacing
from monai.utils import convert_data_type

from bundle.io.atomic import atomic_write
from bundle.io.formats import (
    _RESUNIT_TO_UM,
    KEPT_DTYPES,
    VolumeError,
    _check_exists,
    _err,
    _unit_to_um,
)

logger = logging.getLogger(__name__)


def _tiff_voxel_size(tif: tifffile.TiffFile, spatial_axes: str) -> tuple[float, ...] | None:
    """Voxel size in µm for ``spatial_axes`` (e.g. 'ZYX') from OME or ImageJ/TIFF tags; None if unknown."""
    sizes: dict[str, float | None] = {"Z": None, "Y": None, "X": None}
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ElementTree.fromstring(tif.ome_metadata)
        except ElementTree.ParseError:
            root = None
        pixels = None if root is None else next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
        if pixels is not None:
            for ax in "ZYX":
                value = pixels.get(f"PhysicalSize{ax}")
                factor = _unit_to_um(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
                if value is not None and factor is not None:
                    sizes[ax] = float(value) * factor
    if any(sizes[a] is None for a in spatial_axes):
        page = tif.pages.first
        ij = tif.imagej_metadata or {}
        factor = _unit_to_um(ij.get("unit")) if ij else None
        resunit_tag = page.tags.get("ResolutionUnit")
        resunit = int(resunit_tag.value) if resunit_tag is not None else 1
        if factor is None and resunit in _RESUNIT_TO_UM:
            factor = _RESUNIT_TO_UM[resunit]
        if factor is not None:
            for ax, tag_name in (("X", "XResolution"), ("Y", "YResolution")):
                tag = page.tags.get(tag_name)
                if sizes[ax] is None and tag is not None:
                    num, den = tag.value
                    if num > 0 and den > 0:
                        sizes[ax] = den / num * factor  # resolution is pixels per unit
            if sizes["Z"] is None and ij.get("spacing") is not None:
                sizes["Z"] = float(ij["spacing"]) * factor
    if any(sizes[a] is None or not np.isfinite(sizes[a]) or sizes[a] <= 0 for a in spatial_axes):
        return None
    return tuple(float(sizes[a]) for a in spatial_axes)  # type: ignore[arg-type]


@contextlib.contextmanager
def _tifffile_problems() -> Iterator[list[str]]:
    """Collect the corruption warnings tifffile logs (it falls back to partial reads instead of raising)."""
    problems: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if any(word in message.lower() for word in ("corrupt", "invalid", "truncat", "failed")):
                problems.append(message)

    handler = _Collect(level=logging.WARNING)
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(handler)
    try:
        yield problems
    finally:
        tiff_logger.removeHandler(handler)


def _read_tiff(path: Path, channel: int | None) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    """Read the first series of a TIFF with its axes normalised to a subset of 'CZYX' in that order.

    Returns:
        ``(array, axes, voxel_size, original_dtype)`` where ``axes`` is e.g. ``"ZYX"``, ``"CZYX"``,
        ``"YX"``; ``voxel_size`` covers the spatial axes (µm) or is None.
    """
    _check_exists(path)
    try:
        with _tifffile_problems() as problems, tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
            file_size = path.stat().st_size
            for page in series.pages:  # tifffile may read a truncated file without raising
                if page is not None and any(
                    o + n > file_size for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)
                ):
                    problems.append("image data extends beyond the end of the file")
                    break
            if problems:
                raise tifffile.TiffFileError("; ".join(problems))
            keyframe = series.keyframe
            # interleaved RGB (YXS) is colour; tifffile.imwrite writes a plain (3 or 4, Y, X) array as
            # planar RGB (SYX): that S is taken as a stack axis
            rgb = keyframe.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            rgb = rgb and keyframe.planarconfig == tifffile.PLANARCONFIG.CONTIG
            # tifffile axes: Z, Y, X, C (channel), S (sample: a channel for RGB), T (time); anything else
            # (Q, I, S of a gray stack, ...) is an unnamed stack axis, taken as Z if it is the only one
            kinds = []
            for ax in axes:
                if ax in "ZYXCT":
                    kinds.append(ax)
                elif ax == "S" and rgb:
                    kinds.append("C")
                else:
                    kinds.append("?")
            keep = [i for i, (k, n) in enumerate(zip(kinds, data.shape, strict=True)) if k in "YX" or n > 1]
            data = data.reshape([data.shape[i] for i in keep]) if len(keep) < data.ndim else data
            kinds = [kinds[i] for i in keep]
            if "Z" not in kinds and kinds.count("?") == 1:
                kinds[kinds.index("?")] = "Z"
            ij = tif.imagej_metadata or {}
            if "Z" not in kinds and "C" in kinds and ij and ij.get("mode", "grayscale") == "grayscale":
                # tifffile.imwrite(..., imagej=True) labels a plain 3D array's first axis as channels;
                # ImageJ itself saves real multichannel images as 'composite' or 'color'
                kinds[kinds.index("C")] = "Z"
            spatial = "".join(k for k in "ZYX" if k in kinds)
            voxel_size = _tiff_voxel_size(tif, spatial)
    except VolumeError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ... on bad files
        raise _err(path, f"cannot read TIFF (tifffile: {type(exc).__name__}: {exc})") from exc
    if "T" in kinds:
        raise _err(
            path,
            f"is a time series (axes {axes}, shape {series.shape}); save one time point as a (Z, Y, X) stack",
        )
    if "?" in kinds or len(set(kinds)) != len(kinds):
        raise _err(path, f"unsupported TIFF axes '{axes}' (shape {series.shape}); expected Z, Y, X and C")
    data = np.transpose(data, [kinds.index(k) for k in "CZYX" if k in kinds])
    out_axes = "".join(k for k in "CZYX" if k in kinds)
    if channel is not None:
        n_channels = data.shape[0] if out_axes.startswith("C") else 1
        if not 0 <= channel < n_channels:
            raise _err(path, f"channel={channel} requested but the file has {n_channels} channel(s)")
        if out_axes.startswith("C"):
            data, out_axes = data[channel], out_axes[1:]
    original_dtype = str(data.dtype)
    if data.dtype not in KEPT_DTYPES:
        data = data.astype(np.float32)
    return np.ascontiguousarray(data), out_axes, voxel_size, original_dtype


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
