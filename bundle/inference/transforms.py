"""Inference transforms: the training normalisation and its inverse, output paths and the
atomic writer, and the datalist of the inference workflow."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile

from bundle.data import check_intensity_range, list_volumes
from bundle.io import (
    VolumeError,
    load_volume,
    save_volume,
)
from bundle.io.formats import WRITABLE_EXTENSIONS, file_extension
from bundle.networks.generator import trained_input_range

logger = logging.getLogger(__name__)


OUTPUT_RANGES = ("input", "normalized")


# ----------------------------------------------------------------------------------------------------------
# MONAI transforms
# ----------------------------------------------------------------------------------------------------------


def _percentile_range(img: torch.Tensor, percentiles: Sequence[float]) -> tuple[float, float]:
    lower, upper = percentiles
    return float(percentile(img, lower)), float(percentile(img, upper))  # type: ignore[arg-type]


def _check_fixed_range(img: torch.Tensor, lo: float, hi: float, percentiles: Sequence[float], name: str) -> None:
    """Warn when a stack's intensities do not fit the model's fixed range (another exposure, gain or bit
    depth than the training stacks): its upper percentile beyond twice the range, or below a fifth."""
    top = float(percentile(img, percentiles[1]))  # type: ignore[arg-type]
    if not 0.2 * (hi - lo) <= top - lo <= 2.0 * (hi - lo):
        logger.warning(
            f"{name}: its {percentiles[1]} percentile is {top:g}, the model was trained with intensities "
            f"{lo:g}..{hi:g} mapped to [0, 1] (one scale for all its training stacks): this stack was "
            "acquired differently (exposure, gain, bit depth?); the output may be saturated or too dim"
        )


class NormalizePercentilesd(MapTransform):
    """Map the ``(lower, upper)`` percentiles of each volume to [0, 1] (clipped), recording the values.

    Numerically the same as the training normalisation (``bundle.data.normalize_transforms``, i.e.
    MONAI's ``ScaleIntensityRangePercentiles`` with ``relative=False``), and it stores the input's
    values at those percentiles in ``d[f"{key}_range"] = (v_lo, v_hi)`` so :class:`RestoreIntensityd`
    can map the output back.

    Args:
        keys: keys of ``(1, Z, Y, X)`` tensors.
        percentiles: ``(lower, upper)`` in [0, 100] (the blurred domain's, ``blurred_percentiles``).
        clip: clip to [0, 1].
        intensity_range: ``(v_lo, v_hi)`` used for every volume instead of its percentiles (a model
            trained with one intensity scale per domain, ``blurred_intensity_range``), or the generator,
            whose ``trained_input_range`` is used (None there: each volume's percentiles).

    Raises:
        VolumeError: naming the file when both percentiles have the same value (a nearly empty
            volume: nothing to normalise by).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        percentiles: Sequence[float] = (0.1, 99.9),
        clip: bool = True,
        intensity_range: Sequence[float] | torch.nn.Module | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(intensity_range, torch.nn.Module):
            intensity_range = trained_input_range(intensity_range)
        self.intensity_range = None if intensity_range is None else check_intensity_range(intensity_range)
        self.percentiles = tuple(float(p) for p in percentiles)
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(
                f"percentiles must be (lower, upper) with 0 <= lower < upper <= 100, got {percentiles}"
            )
        self.clip = clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            name = getattr(d[key], "meta", {}).get("filename_or_obj", "<array>")
            lo, hi = self.intensity_range or _percentile_range(img, self.percentiles)
            if self.intensity_range is not None:
                _check_fixed_range(img, lo, hi, self.percentiles, name)
            if not hi > lo:
                raise VolumeError(
                    f"{name}: the {self.percentiles[0]} and {self.percentiles[1]} percentiles are both {lo:g} "
                    "(almost every voxel has the same value); nothing to deconvolve, or choose other percentiles"
                )
            d[key] = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=self.clip)(d[key])
            d[f"{key}_range"] = torch.tensor([lo, hi], dtype=torch.float64)
        return d


class RestoreIntensityd(MapTransform):
    """Undo :class:`NormalizePercentilesd` on the prediction: ``pred * (v_hi - v_lo) + v_lo``.

    The network's [0, 1] output is mapped to the input's percentile range ``[v_lo, v_hi]`` (the input
    values at the normalisation percentiles), so 0 is the input's background level and 1 the input's
    bright level. With ``output_range="normalized"`` the [0, 1] output is kept.

    Args:
        keys: prediction keys.
        range_key: key of ``(v_lo, v_hi)`` written by :class:`NormalizePercentilesd`.
        output_range: ``"input"`` or ``"normalized"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        range_key: str = "image_range",
        output_range: str = "input",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_range not in OUTPUT_RANGES:
            raise ValueError(f"output_range must be one of {OUTPUT_RANGES}, got {output_range!r}")
        self.range_key, self.output_range = range_key, output_range

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.output_range == "normalized":
            return d
        lo, hi = (float(v) for v in torch.as_tensor(d[self.range_key]).reshape(-1)[:2])
        for key in self.key_iterator(d):
            d[key] = d[key] * (hi - lo) + lo
        return d


def output_path(
    input_path: PathLike, output_dir: PathLike, suffix: str = "_deconv", output_ext: str | None = None
) -> Path:
    """``output_dir/<input name without extension><suffix><ext>``; ext defaults to the input's
    (``.ome.tif``, DeltaVision ``.dv`` and the vendor formats ``.czi``/``.nd2``/``.lif`` become ``.tif``:
    the output is an ImageJ TIFF)."""
    name = Path(input_path).name
    ext = file_extension(input_path)
    stem = name[: len(name) - len(ext)] if ext and name.lower().endswith(ext) else Path(name).stem
    ext = output_ext or (".tif" if ext not in WRITABLE_EXTENSIONS or ext in (".ome.tif", ".ome.tiff") else ext)
    return Path(output_dir) / f"{stem}{suffix}{ext}"


def check_output_dir(output_dir: PathLike, output_ext: str | None = None) -> Path:
    """Check, before any compute, that the outputs can be written to ``output_dir``; writes nothing.

    The folder (created later, with the first output) or its nearest existing parent must be a
    folder in which a file can be created (probed with a hidden temporary file, removed at once).

    Raises:
        ValueError: ``output_ext`` is not a format the bundle writes (the message lists them).
        VolumeError: naming the folder, when it or a parent is a file, or it is not writable.
    """
    if output_ext is not None:
        ext = str(output_ext).lower()
        if not ext.startswith(".") or ext not in WRITABLE_EXTENSIONS:
            raise ValueError(
                f"output_ext {output_ext!r} is not a format the bundle writes; use one of {WRITABLE_EXTENSIONS}"
            )
    folder = Path(output_dir)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise VolumeError(
            f"{folder}: cannot write the outputs there ({existing} is a file); choose another output_dir"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise VolumeError(
            f"{folder}: cannot write the outputs there ({exc.strerror or exc}); choose another output_dir"
        ) from exc
    return folder


class SaveVolumed(MapTransform):
    """Write each prediction next to nothing it came from: ``output_dir/<name><suffix><ext>``.

    Uses :func:`bundle.io.save_volume` (atomic; TIFF/NIfTI/ITK by extension), with the voxel size of
    the input and ``protect=[input]``, so an input is never overwritten.

    Args:
        keys: prediction keys, ``(1, Z, Y, X)`` or ``(Z, Y, X)``.
        output_dir: output folder (created when the first file is written).
        meta_key: key of the input MetaTensor whose meta gives the file name and voxel size.
        suffix: appended to the input's name.
        output_ext: e.g. ``".tif"``; None keeps the input's extension.
        dtype: written dtype (float32 keeps the restored intensities exactly).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: PathLike = "./eval",
        meta_key: str = "image",
        suffix: str = "_deconv",
        output_ext: str | None = None,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.meta_key, self.suffix = Path(output_dir), meta_key, suffix
        self.output_ext, self.dtype = output_ext, dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = d[self.meta_key].meta
        src = meta["filename_or_obj"]
        voxel = [float(v) for v in torch.as_tensor(meta["voxel_size"]).reshape(-1)]
        voxel_size = None if any(not np.isfinite(v) for v in voxel) else voxel
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key]).detach().cpu().float().numpy()
            path = output_path(src, self.output_dir, self.suffix, self.output_ext)
            save_volume(path, volume, voxel_size=voxel_size, dtype=self.dtype, protect=[src])
            d[f"{key}_path"] = str(path)
            logger.info(f"{src} -> {path}")
        return d


def inference_datalist(
    input: str | Sequence[str],
    output_dir: PathLike,
    channel: int | None = None,
    percentiles: Sequence[float] = (0.1, 99.9),
    suffix: str = "_deconv",
    output_ext: str | None = None,
    check: bool = True,
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for a file, folder or glob, checked before anything is written.

    With ``check`` every file is read once (:func:`bundle.io.load_volume`) and its normalisation
    percentiles are computed, so a bad file anywhere in the list stops the run before the first
    output is written. Output names are checked too: none may be an input or collide with another.

    Raises:
        FileNotFoundError: nothing matches ``input``.
        VolumeError: naming the first bad file.
    """
    files = list_volumes(input)
    check_output_dir(output_dir, output_ext)
    inputs = {Path(f).resolve() for f in files}
    seen: dict[Path, str] = {}
    for f in files:
        out = output_path(f, output_dir, suffix, output_ext).resolve()
        if out in inputs:
            raise VolumeError(
                f"{f}: its output {out} would overwrite an input; choose another output_dir or suffix"
            )
        if out in seen:
            raise VolumeError(f"{f}: its output {out} collides with the output of {seen[out]}")
        seen[out] = f
        if check:
            volume, _ = load_volume(f, channel=channel, dtype=np.float32)
            NormalizePercentilesd("image", percentiles)(
                {"image": MetaTensor(torch.from_numpy(volume), meta={"filename_or_obj": f})}
            )
    return [{"image": f} for f in files]
