"""File lists: the volumes of a folder, glob or list, and image/label pairs by name."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)


VOLUME_EXTENSIONS = (".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".dv", ".czi", ".nd2", ".lif")


def list_volumes(source: str | Sequence[str]) -> list[str]:
    """Sorted volume files from a folder, a glob pattern, a single file, or a list of those.

    Hidden files (names starting with a dot: the bundle's temporary files, e.g. left by a killed
    run) are skipped in folders, as glob patterns skip them.

    Raises:
        FileNotFoundError: naming ``source`` when nothing matches.
    """
    if not isinstance(source, str):
        return [f for s in source for f in list_volumes(s)]
    if os.path.isdir(source):
        files = [
            os.path.join(source, f)
            for f in os.listdir(source)
            if f.lower().endswith(VOLUME_EXTENSIONS) and not f.startswith(".")  # hidden: temporary files
        ]
    elif any(c in source for c in "*?["):
        files = [f for f in glob.glob(source) if f.lower().endswith(VOLUME_EXTENSIONS)]
    elif os.path.isfile(source):
        files = [source]
    else:
        raise FileNotFoundError(f"{source}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"{source}: no volume files ({', '.join(VOLUME_EXTENSIONS)}) found")
    return sorted(files)


def paired_datalist(image_dir: str | Sequence[str], label_dir: str | None = None) -> list[dict[str, str]]:
    """``[{"image": blurred, "label": ground_truth}, ...]`` matched by file name (label optional).

    Raises:
        FileNotFoundError: when a ground-truth file for an image is missing.
    """
    images = list_volumes(image_dir)
    if label_dir is None:
        return [{"image": f} for f in images]
    items = []
    for f in images:
        label = os.path.join(label_dir, os.path.basename(f))
        if not os.path.isfile(label):
            raise FileNotFoundError(f"{label}: ground truth for {f} is missing")
        items.append({"image": f, "label": label})
    return items


def validation_datalist(
    image_dir: str | Sequence[str], label_dir: str | None = None, required: bool = False
) -> list[dict[str, str]]:
    """Validation items like :func:`paired_datalist`, optional: ``[]`` when ``image_dir`` does not exist.

    Training without validation data is allowed (own stacks, no held-out set): the evaluator then
    skips its runs and :class:`bundle.handlers.ModelWithoutValidation` writes the last model and says
    so. A folder that exists but is empty, or whose ground truth is incomplete, is still an error.

    Args:
        image_dir: blurred validation stacks (folder, glob, file or list).
        label_dir: their ground truth, matched by name (None: no labels, for no-reference metrics).
        required: raise instead of returning ``[]`` when ``image_dir`` is missing.
    """
    if isinstance(image_dir, str) and not required and not os.path.exists(image_dir) and not any(c in image_dir for c in "*?["):
        logger.warning(f"{image_dir}: no validation folder; training runs without validation")
        return []
    return paired_datalist(image_dir, label_dir)
