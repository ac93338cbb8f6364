"""Opening a stack (array, Zarr, OME-Zarr, any file the bundle reads) and writing OME-Zarr with its voxel size."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - zarr is a dependency of out-of-core inference
        raise ImportError("out-of-core inference needs the 'zarr' package: pip install zarr") from exc
    return zarr


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------

def open_volume(source: Any) -> tuple[Any, tuple[float, float, float] | None]:
    """A ``(Z, Y, X)`` array-like (sliceable, ``.shape``) and its voxel size from a path or array.

    Args:
        source: an OME-Zarr 0.4 or 0.5 group (level ``multiscales[0].datasets[0]`` is used, its
            ``scale`` gives the voxel size), a Zarr array (v2 or v3; path or object), or a numpy array.
    """
    if isinstance(source, np.ndarray):
        return source, None
    zarr = _zarr()
    node = zarr.open(str(source), mode="r") if isinstance(source, (str, os.PathLike)) else source
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise ValueError(
                f"{source}: a Zarr group without OME 'multiscales' metadata; pass the array path"
            )
        level = multiscales[0]["datasets"][0]
        array = node[level["path"]]
        voxel = None
        for transform in level.get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                voxel = tuple(float(v) for v in transform["scale"][-3:])
        return array, voxel
    return node, None


#: OME-Zarr versions written: "0.5" (Zarr v3, metadata under "ome"; the default) and "0.4" (Zarr v2)
OME_ZARR_VERSIONS = ("0.5", "0.4")


def _ome_attrs(voxel_size: Sequence[float] | None, name: str, version: str = "0.5") -> dict[str, Any]:
    """The group attributes of a one-level OME-Zarr ``version`` image with axes z, y, x (µm)."""
    scale = [float(v) for v in (voxel_size or (1.0, 1.0, 1.0))]
    unit = {"unit": "micrometer"} if voxel_size is not None else {}
    multiscale = {
        "name": name,
        "axes": [{"name": a, "type": "space", **unit} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        "type": "sliding-window deconvolution",
    }
    if version == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


def _create_ome_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    chunks: Sequence[int],
    voxel_size: Sequence[float] | None,
    dtype: Any = np.float32,
    overwrite: bool = False,
    name: str = "",
    ome_version: str = "0.5",
) -> Any:
    zarr = _zarr()
    if ome_version not in OME_ZARR_VERSIONS:
        raise ValueError(f"ome_version must be one of {OME_ZARR_VERSIONS}, got {ome_version!r}")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    v2 = ome_version == "0.4"
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if v2 else 3)
    group.attrs.update(_ome_attrs(voxel_size, name or Path(path).stem, ome_version))
    encoding = {"name": "v2", "separator": "/"} if v2 else {"name": "default", "separator": "/"}
    return group.create_array(
        "0",
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=dtype,
        fill_value=0,
        chunk_key_encoding=encoding,
        dimension_names=None if v2 else ("z", "y", "x"),
    )


def write_ome_zarr(
    path: str | os.PathLike,
    volume: np.ndarray,
    voxel_size: Sequence[float] | None = None,
    chunks: Sequence[int] = (64, 256, 256),
    overwrite: bool = False,
    ome_version: str = "0.5",
) -> Any:
    """Write an in-memory ``(Z, Y, X)`` volume as a one-level OME-Zarr (for tests, demos, converting stacks).

    Args:
        ome_version: ``"0.5"`` (Zarr v3, the current NGFF; default) or ``"0.4"`` (Zarr v2, for older readers).

    Returns:
        the Zarr array ``path/0``.
    """
    chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, volume.shape))
    array = _create_ome_zarr(
        path, volume.shape, chunks, voxel_size, dtype=volume.dtype, overwrite=overwrite, ome_version=ome_version
    )
    array[...] = volume
    return array


# ----------------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------------
