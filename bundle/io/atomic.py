"""Atomic writes: a complete new file or nothing, never over an input."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from monai.config import PathLike

from bundle.io.formats import SIDECAR_EXTENSIONS, file_extension

logger = logging.getLogger(__name__)


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
    ext = file_extension(path)
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False
