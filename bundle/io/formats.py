"""File formats, units and the error type: which extensions the bundle reads, voxel-size units, :class:`VolumeError`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike

logger = logging.getLogger(__name__)


TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr", ".vtk", ".mnc", ".gipl")
DV_EXTENSIONS = (".dv",)  # DeltaVision (widefield deconvolution systems), read with the optional `mrc` package
#: microscope vendors' formats, read with bioio and its reader plugin (optional extra ``vendor``)
VENDOR_EXTENSIONS = {".czi": "bioio-czi", ".nd2": "bioio-nd2", ".lif": "bioio-lif"}
SUPPORTED_EXTENSIONS = TIFF_EXTENSIONS + NIFTI_EXTENSIONS + ITK_EXTENSIONS + DV_EXTENSIONS + tuple(VENDOR_EXTENSIONS)
#: formats the bundle writes (DeltaVision and vendor formats are read only: their outputs are TIFF)
WRITABLE_EXTENSIONS = TIFF_EXTENSIONS + NIFTI_EXTENSIONS + ITK_EXTENSIONS
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


def file_extension(path: PathLike) -> str:
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
        f"unsupported file extension '{file_extension(path) or '(none)'}'; supported: {', '.join(SUPPORTED_EXTENSIONS)}",
    )


def _channel_hint(shape: Sequence[int], n_channels: int) -> str:
    return (
        f"has {n_channels} channels (shape {tuple(shape)}); choose one with the `channel` argument "
        f"(e.g. channel=0, in 0..{n_channels - 1})"
    )


# ----------------------------------------------------------------------------------------------------------
# TIFF
# ----------------------------------------------------------------------------------------------------------
