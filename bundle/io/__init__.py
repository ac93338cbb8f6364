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

from bundle.io.atomic import atomic_write, atomic_write_text
from bundle.io.formats import (
    ITK_EXTENSIONS,
    KEPT_DTYPES,
    NIFTI_EXTENSIONS,
    SIDECAR_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    TIFF_EXTENSIONS,
    WRITABLE_EXTENSIONS,
    VolumeError,
)
from bundle.io.monai_io import TiffStackReader, register
from bundle.io.tiff_writer import TiffStackWriter
from bundle.io.transforms import CheckVoxelSized, LoadVolumed
from bundle.io.validate import validate_psf, validate_volume
from bundle.io.volumes import load_volume, save_volume

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
    "atomic_write",
    "atomic_write_text",
    "TIFF_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "ITK_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "WRITABLE_EXTENSIONS",
    "SIDECAR_EXTENSIONS",
    "KEPT_DTYPES",
]

register()  # MONAI's writer table: ".tif" written by TiffStackWriter (as before the split)
