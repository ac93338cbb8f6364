"""Reading and writing 3D microscopy stacks with their voxel size, atomically and with clear errors.

MONAI's default readers/writers are wrong for microscopy stacks: ``LoadImage`` reads ``.tif`` through
ITK with the axes reversed, and ``SaveImage`` writes ``.tif`` as a single 2D slice through PIL. This
module provides a tifffile-based :class:`TiffStackReader` / :class:`TiffStackWriter` pair and the plain
functions :func:`load_volume` / :func:`save_volume` used by the rest of the bundle.

Axis convention (everywhere in this bundle):
    Volumes are numpy arrays ``(Z, Y, X)``; voxel sizes are ``(z, y, x)`` in micrometres.
    Inside MONAI pipelines the array read by :class:`TiffStackReader` keeps this order, so the MONAI
    spatial dims are ``(D, H, W) = (Z, Y, X)``: ``LoadImaged`` + ``EnsureChannelFirstd`` gives
    ``(1, Z, Y, X)`` and the affine is ``diag(z, y, x, 1)`` (µm), mapping array indices ``(k, j, i)``
    to physical ``(z, y, x)``. This is *not* the medical RAS convention: do not mix these tensors with
    volumes read by MONAI's NIfTI/ITK readers (which give ``(X, Y, Z)``) in one pipeline.

Usage in a MONAI bundle config::

    "imports": ["$import bundle.io"],
    "preprocessing": {"_target_": "LoadImaged", "keys": "image", "reader": "TiffStackReader"},
    "saver": {"_target_": "SaveImaged", "keys": "pred", "output_ext": ".tif",
              "writer": "bundle.io.TiffStackWriter", "output_dtype": "$np.float32"}

``reader="bundle.io.TiffStackReader"`` (dotted path) also works without the import.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor, PathLike
from monai.data import ImageReader, ImageWriter, MetaTensor
from monai.data import image_writer as monai_image_writer
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform
from monai.utils import MetaKeys, convert_data_type, ensure_tuple

logger = logging.getLogger(__name__)

__all__ = [
    "VolumeError",
    "TiffStackReader",
    "LoadVolumed",
    "CheckVoxelSized",
    "TiffStackWriter",
    "load_volume",
    "save_volume",
    "validate_volume",
    "validate_psf",
    "register",
    "TIFF_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "ITK_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
]

TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr", ".vtk", ".mnc", ".gipl")
SUPPORTED_EXTENSIONS = TIFF_EXTENSIONS + NIFTI_EXTENSIONS + ITK_EXTENSIONS
# header + separate data file: written as a pair (bundle.io.atomic_write)
SIDECAR_EXTENSIONS = (".mhd", ".nhdr")

# dtypes kept as they are (ImageJ-compatible); every other dtype is converted to float32
KEPT_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

# length unit -> micrometres (ImageJ 'unit', OME 'PhysicalSize*Unit', TIFF ResolutionUnit)
_UNIT_TO_UM = {
    "um": 1.0,
    "µm": 1.0,  # micro sign U+00B5
    "μm": 1.0,  # greek mu U+03BC
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "pm": 1e-6,
}
# TIFF ResolutionUnit tag -> micrometres per unit (1 = NONE: unknown)
_RESUNIT_TO_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}


class VolumeError(ValueError):
    """A volume or PSF file that cannot be used; the message starts with the file path.

    Example: ``"data/x.tif: volume contains 12 NaN/Inf voxels"``.
    """


def _err(path: PathLike | None, problem: str) -> VolumeError:
    return VolumeError(f"{path if path is not None else '<array>'}: {problem}")


def _extension(path: PathLike) -> str:
    """The (possibly compound) lower-case extension of ``path``: ``.nii.gz``, ``.ome.tif``, ``.tif``."""
    name = Path(path).name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def _unit_to_um(unit: Any) -> float | None:
    """Micrometres per ``unit`` (a unit name such as 'micron', 'nm', '\\u00B5m'), None if unknown."""
    if unit is None:
        return None
    key = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    return _UNIT_TO_UM.get(key)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise _err(path, "file not found")
    if path.is_dir():
        raise _err(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise _err(path, "file is empty (0 bytes)")


def _unsupported_extension(path: PathLike) -> VolumeError:
    return _err(
        path,
        f"unsupported file extension '{_extension(path) or '(none)'}'; supported: {', '.join(SUPPORTED_EXTENSIONS)}",
    )


def _channel_hint(shape: Sequence[int], n_channels: int) -> str:
    return (
        f"has {n_channels} channels (shape {tuple(shape)}); choose one with the `channel` argument "
        f"(e.g. channel=0, in 0..{n_channels - 1})"
    )


# ----------------------------------------------------------------------------------------------------------
# TIFF
# ----------------------------------------------------------------------------------------------------------


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


def _affine(voxel_size: Sequence[float] | None, ndim: int) -> np.ndarray:
    """``(ndim+1, ndim+1)`` diagonal affine: array index -> µm along the same axes (identity if unknown)."""
    return np.diag([*(voxel_size if voxel_size is not None else [1.0] * ndim), 1.0]).astype(np.float64)


class _TiffStack:
    """A TIFF stack read by :class:`TiffStackReader`: array (axes a subset of 'CZYX') and metadata."""

    def __init__(self, path: str, array: np.ndarray, axes: str, voxel_size, original_dtype: str):
        self.path, self.array, self.axes = path, array, axes
        self.voxel_size, self.original_dtype = voxel_size, original_dtype


class TiffStackReader(ImageReader):
    """MONAI image reader for 3D TIFF stacks (ImageJ, OME-TIFF, plain multi-page) keeping ``(Z, Y, X)``.

    Axes are identified from tifffile's series axes (Z, Y, X, C, S, T); an unnamed page axis of a
    plain multi-page TIFF is taken as Z. The voxel size comes from OME ``PhysicalSize{X,Y,Z}`` (+ units)
    or ImageJ metadata (``spacing``, ``unit``) with the X/YResolution tags, converted to µm.
    uint8, uint16 and float32 data keep their dtype; other dtypes are converted to float32.

    ``get_data`` returns the array with the spatial axes in the order ``(Z, Y, X)`` (channel-first
    ``(C, Z, Y, X)`` with ``original_channel_dim=0`` for a multichannel file read with ``channel=None``),
    and a meta dict with ``spatial_shape``, ``original_channel_dim`` (``"no_channel"``), ``affine`` and
    ``original_affine`` = ``diag(z, y, x, 1)`` in µm (identity if unknown), ``voxel_size`` (the file's
    ``(z, y, x)`` µm as a float64 array, or ``"none"`` if it has no calibration; like
    ``original_affine`` it is not updated by spatial transforms: the current one is ``img.pixdim``), ``axes`` and
    ``original_dtype``. So ``LoadImaged(keys="img", reader=TiffStackReader())`` followed by
    ``EnsureChannelFirstd(keys="img")`` gives ``(1, Z, Y, X)``.

    Args:
        channel: channel index to keep from a multichannel file; None keeps all channels.

    Example::

        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
        from bundle.io import TiffStackReader
        load = Compose([LoadImaged(keys="img", reader=TiffStackReader()), EnsureChannelFirstd(keys="img")])
        load({"img": "stack.tif"})["img"].shape  # (1, Z, Y, X)
    """

    def __init__(self, channel: int | None = None):
        super().__init__()
        self.channel = channel

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every file is of a format :func:`load_volume` reads (TIFF, NIfTI, ITK's)."""
        return all(_extension(f) in SUPPORTED_EXTENSIONS for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> _TiffStack | list[_TiffStack]:
        """Read one file, or several files (stacked as channels by :meth:`get_data`).

        Every format is read as :func:`load_volume` reads it — NIfTI and ITK files too, so training,
        validation and inference all see ``(Z, Y, X)`` (MONAI's own NIfTI/ITK readers return
        ``(X, Y, Z)``) — and checked the same way (NaN/Inf, constant), errors naming the file.

        Raises:
            VolumeError: missing, empty, corrupt file, bad channel index, unsupported axes, bad values.
        """
        stacks = []
        for f in ensure_tuple(data):
            path = Path(f)
            if _extension(path) not in SUPPORTED_EXTENSIONS:
                raise _unsupported_extension(path)
            array, axes, voxel_size, original_dtype = _read_any(path, self.channel)
            if not axes.startswith("C"):
                validate_volume(array, path)
            stacks.append(_TiffStack(str(path), array, axes, voxel_size, original_dtype))
        return stacks if len(stacks) > 1 else stacks[0]

    def get_data(self, img: _TiffStack | Sequence[_TiffStack]) -> tuple[np.ndarray, dict]:
        """Array with spatial axes ``(Z, Y, X)`` and the MONAI meta dict (see the class docstring)."""
        arrays: list[np.ndarray] = []
        compatible_meta: dict = {}
        for stack in ensure_tuple(img):
            spatial = stack.axes.lstrip("C")
            header = {
                MetaKeys.SPATIAL_SHAPE: np.asarray(stack.array.shape[len(stack.axes) - len(spatial) :]),
                MetaKeys.ORIGINAL_CHANNEL_DIM: 0 if stack.axes.startswith("C") else "no_channel",
                MetaKeys.AFFINE: _affine(stack.voxel_size, len(spatial)),
                MetaKeys.ORIGINAL_AFFINE: _affine(stack.voxel_size, len(spatial)),
                "voxel_size": None if stack.voxel_size is None else np.asarray(stack.voxel_size, np.float64),
                "axes": spatial,
                "original_dtype": stack.original_dtype,
            }
            arrays.append(stack.array)
            _copy_compatible_dict(header, compatible_meta)
        return _stack_images(arrays, compatible_meta), compatible_meta


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


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then ``os.replace`` it onto ``path``.

    The temporary file keeps the target's extension (libraries choose the format from it) and is
    removed on any error, so either the complete new file or nothing is left. Every file the bundle
    writes goes through here. Temporary names start with a dot, and listings of input folders skip
    hidden files (:func:`bundle.data.list_volumes`), so what a killed run leaves is never read.

    Formats with a separate data file (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw``), whose header
    names the data file, are written under the final name into a hidden temporary folder; the data
    file is moved into place first and the header last, so the header never points to a temporary
    name and a complete header always has its data.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = _extension(path)
    tag = uuid.uuid4().hex[:12]
    if ext in SIDECAR_EXTENSIONS:
        folder = path.parent / f".{path.name}.{tag}.tmp"
        folder.mkdir()
        try:
            header = folder / path.name
            write(header)
            for produced in sorted(folder.iterdir()):
                if produced != header:
                    os.replace(produced, path.parent / produced.name)
            os.replace(header, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return path
    # a unique hidden name; created by the library itself so that it gets the usual permissions
    tmp = path.parent / f".{path.name}.{tag}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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


def register() -> None:
    """Register :class:`TiffStackWriter` for ``.tif``/``.tiff`` and :class:`TiffStackReader` by name.

    After this, ``SaveImage(d)(..., output_ext=".tif")`` writes 3D ImageJ stacks, and
    ``LoadImage(d)(reader="TiffStackReader")`` resolves the name. The reader is also added to MONAI's
    ``SUPPORTED_READERS``, so ``LoadImage`` without a reader reads ``.tif`` files as ``(Z, Y, X)``
    stacks instead of going through ITK. Called when ``bundle.io`` is imported; idempotent.
    """
    from monai.transforms.io.array import SUPPORTED_READERS

    if not monai_image_writer.SUPPORTED_WRITERS:
        monai_image_writer.init()  # otherwise MONAI would skip its own registrations (nii, png, ...)
    for ext in ("tif", "tiff"):
        existing = monai_image_writer.SUPPORTED_WRITERS.get(ext, ())
        if not existing or existing[0] is not TiffStackWriter:
            monai_image_writer.register_writer(ext, TiffStackWriter)
    SUPPORTED_READERS["tiffstackreader"] = TiffStackReader


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def validate_volume(volume: np.ndarray, path: PathLike | None, *, allow_constant: bool = False) -> None:
    """Check that ``volume`` is a usable ``(Z, Y, X)`` stack.

    Args:
        volume: array to check, expected shape ``(Z, Y, X)``.
        path: file the volume came from (or goes to), used at the start of error messages.
        allow_constant: accept a volume whose voxels are all equal.

    Raises:
        VolumeError: empty, 2D, 4D/multichannel, other non-3D shapes, NaN/Inf voxels, constant volume.
    """
    volume = np.asarray(volume)
    if volume.size == 0:
        raise _err(path, f"volume is empty (shape {volume.shape})")
    if volume.ndim == 2:
        raise _err(path, f"is 2D (shape {volume.shape}); a 3D stack (Z, Y, X) is needed")
    if volume.ndim == 4:
        raise _err(
            path,
            f"has 4 dimensions (shape {volume.shape}): a multichannel stack; choose one channel with the "
            "`channel` argument (e.g. channel=0) to get a 3D stack (Z, Y, X)",
        )
    if volume.ndim != 3:
        raise _err(
            path, f"has {volume.ndim} dimensions (shape {volume.shape}); a 3D stack (Z, Y, X) is needed"
        )
    if volume.dtype.kind in "fc":
        n_bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
        if n_bad:
            raise _err(path, f"volume contains {n_bad} NaN/Inf voxels")
    if not allow_constant:
        lo, hi = volume.min(), volume.max()
        if lo == hi:
            raise _err(path, f"volume is constant (every voxel = {lo}); nothing to process")


def validate_psf(
    psf: np.ndarray, path: PathLike | None, *, volume_shape: Sequence[int] | None = None
) -> None:
    """Check that ``psf`` is a usable ``(Z, Y, X)`` point spread function.

    Args:
        psf: array to check, expected shape ``(Z, Y, X)``, non-negative, not all zero.
        path: file the PSF came from, used at the start of error messages.
        volume_shape: ``(Z, Y, X)`` of the volume it will be applied to; the PSF must not be larger.

    Raises:
        VolumeError: not 3D, NaN/Inf, negative values (beyond rounding: < -1e-6 × max), all zero,
            larger than the volume along an axis.
    """
    psf = np.asarray(psf)
    if psf.ndim != 3 or psf.size == 0:
        raise _err(path, f"PSF must be a 3D stack (Z, Y, X), got shape {psf.shape}")
    n_bad = int(psf.size - np.count_nonzero(np.isfinite(psf)))
    if n_bad:
        raise _err(path, f"PSF contains {n_bad} NaN/Inf voxels")
    peak = float(np.abs(psf).max())
    if peak == 0:
        raise _err(path, "PSF is all zero")
    n_neg = int(np.count_nonzero(psf < -1e-6 * peak))
    if n_neg:
        raise _err(
            path,
            f"PSF has {n_neg} negative voxels (min {float(psf.min()):.3g}, max {peak:.3g}); "
            "subtract the background and clip at 0 (bundle.physics.measured.load_measured_psf does this)",
        )
    if volume_shape is not None:
        for name, n_psf, n_vol in zip("ZYX", psf.shape, tuple(volume_shape)[-3:], strict=False):
            if n_psf > n_vol:
                raise _err(
                    path,
                    f"PSF shape {psf.shape} is larger than the volume {tuple(volume_shape)} along {name}; "
                    "crop the PSF (e.g. load_measured_psf(shape=...)) or use a larger volume",
                )


# ----------------------------------------------------------------------------------------------------------
# Plain load/save
# ----------------------------------------------------------------------------------------------------------


def _read_nifti(path: Path) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        zooms = img.header.get_zooms()
        units = img.header.get_xyzt_units()[0]
    except Exception as exc:
        raise _err(path, f"cannot read NIfTI (nibabel: {type(exc).__name__}: {exc})") from exc
    factor = {"micron": 1.0, "mm": 1e3, "meter": 1e6}.get(units, 1.0)  # 'unknown' is taken as µm
    # NIfTI stores (i, j, k[, c]) = (X, Y, Z[, C]); transpose to (Z, Y, X) / (C, Z, Y, X)
    # zooms are float32 in the header: str() gives the shortest decimal (0.1, not 0.10000000149)
    voxel_size = (
        tuple(float(str(np.float32(z))) * factor for z in zooms[:3][::-1]) if data.ndim >= 3 else None
    )
    data = data.T
    axes = {2: "YX", 3: "ZYX", 4: "CZYX"}.get(data.ndim, "?" * data.ndim)
    return np.ascontiguousarray(data), axes, voxel_size, str(data.dtype)


def _read_itk(path: Path) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    import itk

    try:
        img = itk.imread(str(path))
        data = itk.array_from_image(img)  # scalar: (Z, Y, X); vector pixels: (Z, Y, X, C)
        spacing = tuple(float(s) for s in img.GetSpacing())[::-1]
        n_components = img.GetNumberOfComponentsPerPixel()
    except Exception as exc:
        raise _err(path, f"cannot read image (itk: {type(exc).__name__}: {exc})") from exc
    if n_components > 1:
        data = np.moveaxis(data, -1, 0)  # channel first
    n_spatial = data.ndim - int(n_components > 1)
    spatial = {2: "YX", 3: "ZYX"}.get(n_spatial, "?" * n_spatial)
    axes = ("C" if n_components > 1 else "") + spatial
    return np.ascontiguousarray(data), axes, spacing if n_spatial == 3 else None, str(data.dtype)


def _read_any(path: Path, channel: int | None) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    """``(data, axes, voxel_size, original_dtype)`` of any supported file, spatial axes ``(Z, Y, X)``."""
    _check_exists(path)
    if _extension(path) in TIFF_EXTENSIONS:
        return _read_tiff(path, channel)
    data, axes, voxel_size, original_dtype = (_read_nifti if _extension(path) in NIFTI_EXTENSIONS else _read_itk)(path)
    if axes.startswith("C") and channel is not None:
        if not 0 <= channel < data.shape[0]:
            raise _err(path, f"channel={channel} requested but the file has {data.shape[0]} channel(s)")
        data, axes = data[channel], axes[1:]
    elif channel not in (None, 0):
        raise _err(path, f"channel={channel} requested but the file has 1 channel")
    return data, axes, voxel_size, original_dtype


def load_volume(
    path: PathLike, *, channel: int | None = None, dtype: DtypeLike | None = np.float32
) -> tuple[np.ndarray, dict]:
    """Load a 3D stack as a ``(Z, Y, X)`` array with its voxel size, and validate it.

    TIFF (``.tif``, ``.tiff``, ``.ome.tif``) is read with tifffile (see :class:`TiffStackReader`),
    NIfTI (``.nii``, ``.nii.gz``) with nibabel (array transposed from NIfTI's (X, Y, Z) to (Z, Y, X),
    voxel size from the header zooms, in µm unless the header says mm/m), and other formats ITK reads
    (``.mha``, ``.mhd``, ``.nrrd``, ...) with itk (spacing reversed to (z, y, x)).

    Args:
        path: file to read.
        channel: channel to keep from a multichannel file (required for those).
        dtype: output dtype; None keeps the stored one (uint8/uint16/float32; others become float32).

    Returns:
        ``(volume, meta)``: volume ``(Z, Y, X)`` and ``{"voxel_size": (z, y, x) µm or None, "path": str,
        "original_dtype": str, "axes": "ZYX"}``.

    Raises:
        VolumeError: missing/empty/corrupt file, unknown extension, wrong dimensionality, multichannel
            without ``channel``, NaN/Inf, constant volume.
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in SUPPORTED_EXTENSIONS:
        if not path.exists():
            raise _err(path, "file not found")
        raise _unsupported_extension(path)
    data, axes, voxel_size, original_dtype = _read_any(path, channel)
    if axes.startswith("C"):
        if data.ndim - 1 < 3:  # choosing a channel would leave a 2D image: say that first
            raise _err(
                path,
                f"is a 2D image with {data.shape[0]} channels (shape {tuple(data.shape)}, e.g. RGB); "
                "a 3D stack (Z, Y, X) is needed",
            )
        raise _err(path, _channel_hint(data.shape, data.shape[0]))
    validate_volume(data, path)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    elif data.dtype not in KEPT_DTYPES:
        data = data.astype(np.float32)
    meta = {
        "voxel_size": None if voxel_size is None else tuple(float(v) for v in voxel_size),
        "path": str(path),
        "original_dtype": original_dtype,
        "axes": "ZYX",
    }
    return data, meta


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def save_volume(
    path: PathLike,
    volume: NdarrayOrTensor,
    *,
    voxel_size: Sequence[float] | None = None,
    dtype: DtypeLike | None = None,
    protect: Sequence[PathLike] = (),
) -> Path:
    """Write a ``(Z, Y, X)`` volume with its voxel size, atomically, never over an input.

    The format follows the extension: ``.tif``/``.tiff`` ImageJ TIFF (tifffile; ``spacing`` and
    resolution in µm), ``.nii``/``.nii.gz`` NIfTI (nibabel; array stored as (X, Y, Z), zooms in µm),
    other ITK extensions (``.mha``, ``.nrrd``, ...) with itk spacing. The file is written to a
    temporary file in the target folder and moved into place with ``os.replace``; on any error the
    temporary file is removed and no file is left. Parent folders are created.

    Args:
        path: output file.
        volume: ``(Z, Y, X)`` array or tensor (a leading channel of size 1 is squeezed).
        voxel_size: ``(z, y, x)`` in µm, or None (not written).
        dtype: uint8, uint16 or float32; None keeps the volume's if it is one of those, else float32.
            Floats written as integers are rounded and clipped to the dtype's range.
        protect: paths that must not be overwritten (the inputs).

    Returns:
        The written path.

    Raises:
        VolumeError: ``path`` is a protected input, unknown extension, volume not 3D or not finite.
    """
    path = Path(path)
    for p in ensure_tuple(protect):
        if _same_file(path, Path(p)):
            raise _err(path, "refusing to overwrite an input file; choose another output path")
    ext = _extension(path)
    if ext not in SUPPORTED_EXTENSIONS:
        raise _unsupported_extension(path)
    data = convert_data_type(volume, np.ndarray)[0]
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3 or data.size == 0:
        raise _err(path, f"can only write a 3D stack (Z, Y, X), got shape {data.shape}")
    if data.dtype.kind in "fc":
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise _err(path, f"refusing to write a volume with {n_bad} NaN/Inf voxels")
    if voxel_size is not None:
        voxel_size = tuple(float(v) for v in voxel_size)
        if len(voxel_size) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel_size):
            raise _err(path, f"voxel_size must be 3 positive numbers (z, y, x) in µm, got {voxel_size}")
    data = _cast(data, _output_dtype(data.dtype, dtype))

    if ext in TIFF_EXTENSIONS:

        def write(tmp: Path) -> None:
            _write_tiff(tmp, data, voxel_size)

    elif ext in NIFTI_EXTENSIONS:

        def write(tmp: Path) -> None:
            import nibabel as nib

            zooms = voxel_size[::-1] if voxel_size is not None else (1.0, 1.0, 1.0)
            img = nib.Nifti1Image(np.ascontiguousarray(data.T), np.diag([*zooms, 1.0]))
            img.header.set_zooms(zooms)
            img.header.set_xyzt_units(xyz="micron" if voxel_size is not None else "unknown")
            nib.save(img, str(tmp))

    else:

        def write(tmp: Path) -> None:
            import itk

            img = itk.image_from_array(np.ascontiguousarray(data))
            if voxel_size is not None:
                img.SetSpacing([float(v) for v in voxel_size[::-1]])
            itk.imwrite(img, str(tmp))

    return atomic_write(path, write)


register()


class LoadVolumed(MapTransform):
    """Load ``(Z, Y, X)`` stacks with :func:`bundle.io.load_volume` into ``(1, Z, Y, X)`` float32 MetaTensors.

    TIFF (ImageJ, OME), NIfTI and the formats ITK reads, with the voxel size (µm) in
    ``meta["voxel_size"]`` (NaN if unknown) and ``meta["filename_or_obj"]``; invalid files raise
    ``VolumeError`` naming the file (2D, multichannel without ``channel``, NaN/Inf, constant, ...).

    Args:
        keys: keys holding file paths.
        channel: channel to keep from multichannel files.
    """

    def __init__(self, keys: KeysCollection = "image", channel: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channel = channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume, meta = load_volume(d[key], channel=self.channel, dtype=np.float32)
            voxel = meta["voxel_size"]
            d[key] = MetaTensor(
                torch.from_numpy(volume)[None],
                affine=torch.diag(torch.tensor([*(voxel or (1.0, 1.0, 1.0)), 1.0], dtype=torch.float64)),
                meta={
                    "filename_or_obj": str(meta["path"]),
                    "voxel_size": torch.tensor(voxel if voxel else [float("nan")] * 3, dtype=torch.float64),
                    "original_dtype": meta["original_dtype"],
                },
            )
        return d


class CheckVoxelSized(MapTransform):
    """Warn when a stack's voxel size differs from the one the model was trained at (both values).

    A deconvolution network learns the PSF in voxels: a stack with another voxel size (e.g. a
    0.2 µm z-step for a model trained at 0.1 µm) gets a wrong deblurring, silently. The expected
    size is read when the transform runs, from ``reference.trained_voxel_size`` (a ``DeblurUNet``,
    whose checkpoint carries it) or from a ``(z, y, x)`` sequence; nothing is checked where either
    side is unknown.

    Args:
        keys: keys of MetaTensors with ``meta["voxel_size"]`` (from :class:`bundle.io.LoadVolumed`).
        reference: the network (anything with ``trained_voxel_size``), or the expected ``(z, y, x)``
            voxel size in µm, or None.
        what: how the expected value is named in the warning.
        rtol: relative tolerance per axis.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        reference: Any = None,
        what: str = "the model's training voxel size",
        rtol: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference = reference
        self.what = what
        self.rtol = float(rtol)

    def expected(self) -> tuple[float, ...] | None:
        ref = self.reference
        if ref is None:
            return None
        if hasattr(ref, "trained_voxel_size"):  # a DeblurUNet (or anything that knows it)
            return ref.trained_voxel_size
        if not isinstance(ref, (list, tuple, np.ndarray, torch.Tensor)):
            return None  # a network that does not know its voxel size (e.g. Richardson-Lucy)
        vs = tuple(float(v) for v in ref)
        return None if any(math.isnan(v) for v in vs) else vs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        expected = self.expected()
        if expected is None:
            return d
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {})
            found = meta.get("voxel_size")
            if found is None:
                continue
            found = tuple(float(v) for v in found)
            if any(math.isnan(v) for v in found):
                continue
            if not np.allclose(found, expected, rtol=self.rtol, atol=0):
                logger.warning(
                    f"{meta.get('filename_or_obj', '<array>')}: voxel size (z, y, x) = {_fmt(found)} µm differs from "
                    f"{self.what} {_fmt(expected)} µm; resample the stack to it (or train a model at this voxel "
                    "size): the deblurring is learned in voxels"
                )
        return d


def _fmt(vs: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in vs) + ")"
