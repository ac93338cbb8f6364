"""Reading TIFF stacks with tifffile: axes, ImageJ/OME voxel size, channels (writing: :mod:`bundle.io.tiff_writer`)."""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

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
