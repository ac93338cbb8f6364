"""MONAI dictionary transforms built on :func:`load_volume`: the one loader of training, validation and inference."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from bundle.io.volumes import load_volume

logger = logging.getLogger(__name__)


class LoadVolumed(MapTransform):
    """Load ``(Z, Y, X)`` stacks with :func:`bundle.io.load_volume` into ``(1, Z, Y, X)`` float32 MetaTensors.

    TIFF (ImageJ, OME), NIfTI and the formats ITK reads, with the voxel size (µm) in
    ``meta["voxel_size"]`` (NaN if unknown) and ``meta["filename_or_obj"]``; invalid files raise
    ``VolumeError`` naming the file (2D, multichannel without ``channel``, NaN/Inf, constant, ...).

    Args:
        keys: keys holding file paths.
        channel: channel to keep from multichannel files.
    """

    def __init__(self, keys: KeysCollection = "image", channel: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channel = channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume, meta = load_volume(d[key], channel=self.channel, dtype=np.float32)
            voxel = meta["voxel_size"]
            d[key] = MetaTensor(
                torch.from_numpy(volume)[None],
                affine=torch.diag(torch.tensor([*(voxel or (1.0, 1.0, 1.0)), 1.0], dtype=torch.float64)),
                meta={
                    "filename_or_obj": str(meta["path"]),
                    "voxel_size": torch.tensor(voxel if voxel else [float("nan")] * 3, dtype=torch.float64),
                    "original_dtype": meta["original_dtype"],
                },
            )
        return d


class CheckVoxelSized(MapTransform):
    """Warn when a stack's voxel size differs from the one the model was trained at (both values).

    A deconvolution network learns the PSF in voxels: a stack with another voxel size (e.g. a
    0.2 µm z-step for a model trained at 0.1 µm) gets a wrong deblurring, silently. The expected
    size is read when the transform runs, from ``reference.trained_voxel_size`` (a ``DeblurUNet``,
    whose checkpoint carries it) or from a ``(z, y, x)`` sequence; nothing is checked where either
    side is unknown.

    Args:
        keys: keys of MetaTensors with ``meta["voxel_size"]`` (from :class:`bundle.io.LoadVolumed`).
        reference: the network (anything with ``trained_voxel_size``), or the expected ``(z, y, x)``
            voxel size in µm, or None.
        what: how the expected value is named in the warning.
        rtol: relative tolerance per axis.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        reference: Any = None,
        what: str = "the model's training voxel size",
        rtol: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference = reference
        self.what = what
        self.rtol = float(rtol)

    def expected(self) -> tuple[float, ...] | None:
        ref = self.reference
        if ref is None:
            return None
        if hasattr(ref, "trained_voxel_size"):  # a DeblurUNet (or anything that knows it)
            return ref.trained_voxel_size
        if not isinstance(ref, (list, tuple, np.ndarray, torch.Tensor)):
            return None  # a network that does not know its voxel size (e.g. Richardson-Lucy)
        vs = tuple(float(v) for v in ref)
        return None if any(math.isnan(v) for v in vs) else vs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        expected = self.expected()
        if expected is None:
            return d
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {})
            found = meta.get("voxel_size")
            if found is None:
                continue
            found = tuple(float(v) for v in found)
            if any(math.isnan(v) for v in found):
                continue
            if not np.allclose(found, expected, rtol=self.rtol, atol=0):
                logger.warning(
                    f"{meta.get('filename_or_obj', '<array>')}: voxel size (z, y, x) = {_fmt(found)} µm differs from "
                    f"{self.what} {_fmt(expected)} µm; resample the stack to it (or train a model at this voxel "
                    "size): the deblurring is learned in voxels"
                )
        return d


def _fmt(vs: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in vs) + ")"
