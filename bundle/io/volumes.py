"""One loader and one writer for every format: :func:`load_volume` (Z, Y, X) and :func:`save_volume`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import DtypeLike, NdarrayOrTensor, PathLike
from monai.utils import convert_data_type, ensure_tuple

from bundle.io.atomic import _same_file, atomic_write
from bundle.io.formats import (
    DV_EXTENSIONS,
    KEPT_DTYPES,
    NIFTI_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    TIFF_EXTENSIONS,
    VENDOR_EXTENSIONS,
    VolumeError,
    _channel_hint,
    _check_exists,
    _err,
    _unsupported_extension,
    file_extension,
)
from bundle.io.tiff import _read_tiff
from bundle.io.tiff_writer import _cast, _output_dtype, _write_tiff
from bundle.io.validate import validate_volume

logger = logging.getLogger(__name__)


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


def _read_dv(path: Path) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    """DeltaVision ``.dv`` (the format of GE/Applied Precision DeltaVision widefield systems) via ``mrc``.

    Axes ``(C, Z, Y, X)`` (or ``(Z, Y, X)`` for one channel), voxel size from the header (µm). A time
    series is refused (choose a time point first). ``mrc`` is optional: a clear error names it.
    """
    try:
        import mrc
    except ImportError as exc:
        raise _err(path, "reading DeltaVision (.dv) files needs the 'mrc' package: pip install mrc") from exc
    try:
        with mrc.DVFile(str(path)) as dv:
            axes, sizes = str(dv.axes), dict(dv.sizes)
            data = np.asarray(dv.asarray()).reshape([sizes[a] for a in axes])
            voxel = dv.voxel_size
            original_dtype = str(data.dtype)
    except Exception as exc:
        raise _err(path, f"cannot read DeltaVision (mrc: {type(exc).__name__}: {exc})") from exc
    if sizes.get("T", 1) > 1:
        raise _err(path, f"is a time series ({sizes['T']} time points); save one time point as a 3D stack first")
    for drop in ("T", "C"):
        if drop in axes and sizes[drop] == 1:
            data = data.squeeze(axes.index(drop))
            axes = axes.replace(drop, "")
    voxel_size = (float(voxel.z), float(voxel.y), float(voxel.x)) if voxel is not None else None
    if voxel_size is not None and not all(v > 0 for v in voxel_size):
        voxel_size = None
    return np.ascontiguousarray(data), axes, voxel_size, original_dtype


def _read_vendor(path: Path) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    """Zeiss ``.czi``, Nikon ``.nd2``, Leica ``.lif`` through ``bioio`` and the format's reader plugin.

    Axes ``(C, Z, Y, X)`` (``(Z, Y, X)`` for one channel) of the first scene, voxel size from
    ``physical_pixel_sizes`` (µm). A time series is refused; a file with several scenes is read at
    its first (logged). A missing ``bioio`` or plugin gives an error naming what to install.
    """
    plugin = VENDOR_EXTENSIONS[file_extension(path)]
    try:
        from bioio import BioImage
    except ImportError as exc:
        raise _err(path, f"reading {file_extension(path)} files needs bioio and {plugin}: pip install bioio {plugin} "
                         '(or the extra: pip install -e ".[vendor]")') from exc  # fmt: skip
    try:
        image = BioImage(path)
    except Exception as exc:
        if "plugin" in str(exc).lower() or "unsupported" in type(exc).__name__.lower():
            raise _err(path, f"no bioio reader for {file_extension(path)}: pip install {plugin}") from exc
        raise _err(path, f"cannot read ({type(exc).__name__}: {exc})") from exc
    try:
        if len(image.scenes) > 1:
            logger.info(f"{path}: {len(image.scenes)} scenes; reading the first, {image.scenes[0]!r}")
        dims = image.dims
        if dims.T > 1:
            raise _err(path, f"is a time series ({dims.T} time points); save one time point as a 3D stack first")
        data = np.asarray(image.get_image_data("CZYX", T=0))
        sizes = image.physical_pixel_sizes
    except VolumeError:
        raise
    except Exception as exc:
        raise _err(path, f"cannot read ({type(exc).__name__}: {exc})") from exc
    original_dtype = str(data.dtype)
    axes = "CZYX"
    if data.shape[0] == 1:
        data, axes = data[0], "ZYX"
    voxel = (sizes.Z, sizes.Y, sizes.X)
    voxel_size = tuple(float(v) for v in voxel) if all(v is not None and v > 0 for v in voxel) else None
    return np.ascontiguousarray(data), axes, voxel_size, original_dtype


def _read_any(path: Path, channel: int | None) -> tuple[np.ndarray, str, tuple[float, ...] | None, str]:
    """``(data, axes, voxel_size, original_dtype)`` of any supported file, spatial axes ``(Z, Y, X)``."""
    _check_exists(path)
    if file_extension(path) in TIFF_EXTENSIONS:
        return _read_tiff(path, channel)
    ext = file_extension(path)
    if ext in NIFTI_EXTENSIONS:
        reader = _read_nifti
    elif ext in DV_EXTENSIONS:
        reader = _read_dv
    elif ext in VENDOR_EXTENSIONS:
        reader = _read_vendor
    else:
        reader = _read_itk
    data, axes, voxel_size, original_dtype = reader(path)
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
    ext = file_extension(path)
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
    ext = file_extension(path)
    if ext in DV_EXTENSIONS:
        raise _err(path, "DeltaVision (.dv) is read, not written: save as .tif, .nii.gz or an ITK format")
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
