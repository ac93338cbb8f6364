"""napari reader: every stack the bundle reads, as an image layer scaled by its voxel size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bundle.io import load_volume
from bundle.io.formats import SUPPORTED_EXTENSIONS, file_extension

__all__ = ["napari_get_reader", "read_stacks"]

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: :func:`read_stacks` for files the bundle reads, else None (another reader)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(Path(p).is_dir() or file_extension(p) not in SUPPORTED_EXTENSIONS for p in paths):
        return None
    return read_stacks


def read_stacks(path: str | list[str]) -> list[LayerData]:
    """Read stacks with :func:`bundle.io.load_volume` (the loader of every workflow).

    Each becomes an image layer ``(Z, Y, X)`` with ``scale`` = the file's voxel size in µm (1 per
    axis when the file has none, said in the layer's metadata) and the file in its metadata. A file
    the bundle cannot read raises :class:`~bundle.io.VolumeError` naming the file and the problem;
    napari shows it.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        volume, meta = load_volume(p)
        voxel_size = meta.get("voxel_size")
        name = Path(p).name
        ext = file_extension(p)
        layers.append(
            (
                volume,
                {
                    "name": name[: -len(ext)] if ext and name.lower().endswith(ext) else name,
                    "scale": tuple(float(v) for v in voxel_size) if voxel_size else (1.0, 1.0, 1.0),
                    "metadata": {"path": str(p), "voxel_size_um": None if voxel_size is None else list(voxel_size)},
                },
                "image",
            )
        )
    return layers
