"""MONAI integration: the ``ImageReader`` for the bundle's stacks (every format through
:func:`load_volume`'s readers, (Z, Y, X)) and the registration of the reader and writer with MONAI."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.data import image_writer as monai_image_writer
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, ensure_tuple

from bundle.io.formats import SUPPORTED_EXTENSIONS, _unsupported_extension, file_extension
from bundle.io.tiff_writer import TiffStackWriter
from bundle.io.validate import validate_volume
from bundle.io.volumes import _read_any

logger = logging.getLogger(__name__)


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
        return all(file_extension(f) in SUPPORTED_EXTENSIONS for f in ensure_tuple(filename))

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
            if file_extension(path) not in SUPPORTED_EXTENSIONS:
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
