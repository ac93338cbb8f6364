"""What a trained model's record says about reading its stacks: the preprocessing the training used,
read back wherever the model runs (written by :class:`bundle.handlers.BestModelSaver` into ``model.json``)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from bundle.data.camera import hot_pixel_setting

__all__ = ["trained_hot_pixel_threshold"]


def trained_hot_pixel_threshold(model: str | Path | None) -> float | None:
    """The ``hot_pixel_threshold`` a model was trained with, so that inference reads its stacks as the
    training did.

    Training records it in the model's ``model.json`` (``"preprocessing"``, written by
    :class:`bundle.handlers.BestModelSaver`). It is the default of ``configs/inference.json``'s key
    (``run inference``, ``run evaluate``), of :func:`bundle.inference.deconvolve`, of the viewer, of the
    out-of-core paths and of ``scripts/tune_refinement.py``; a value given there overrides it.

    Args:
        model: where the model is: its folder (``ckpt_dir``), a bundle folder (``models/model.json``),
            a model file (the record beside it) or a bundle zip of ``scripts/export_bundle.py`` (its
            ``<name>/models/model.json``); None (a module) gives None.

    Returns:
        the threshold, or None: no correction (no record, or a record written before the setting was
        recorded: pass the threshold such a model was trained with).

    Raises:
        ValueError: a record that cannot be read, or a threshold that is not a number > 0.
    """
    if model is None:
        return None
    place = Path(model)
    try:
        if place.is_file() and place.suffix.lower() == ".zip":
            with zipfile.ZipFile(place) as zf:
                records = [n for n in zf.namelist() if n.endswith("models/model.json") and n.count("/") <= 2]
                where, text = (f"{place}:{records[0]}", zf.read(records[0]).decode()) if records else (str(place), None)
        else:
            folder = place.parent if place.is_file() else place
            found = [f for f in (folder / "model.json", folder / "models" / "model.json") if f.is_file()]
            where, text = (str(found[0]), found[0].read_text()) if found else (str(folder), None)
        if text is None:
            return None
        value = (json.loads(text).get("preprocessing") or {}).get("hot_pixel_threshold")
    except (ValueError, AttributeError, zipfile.BadZipFile) as err:
        raise ValueError(f"{place}: not a readable model record (a JSON object): {err}") from err
    try:
        return hot_pixel_setting(value)
    except ValueError as err:
        raise ValueError(f"{where}: preprocessing.{err}") from err
