"""The user's blurred stacks: voxel size settled, checked, split into training and held-out stacks."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.flags import as_flag
from bundle.io import atomic_write_text, load_volume, save_volume
from bundle.own_data.checks import check_stacks

logger = logging.getLogger(__name__)


class OwnStacks:
    """The user's blurred stacks: voxel size settled, checked, split into training and held-out stacks.

    Nothing is done until the first call of a method (configs build the component, then ask it);
    then every stack is read once. With two or more stacks, the last ``held_out`` share in sorted name
    order (at least one, and at least one left for training) are held out and used as they are. A
    single stack is split along its longer lateral axis into a training part and a held-out part,
    written as TIFF (with the voxel size) under ``<work_dir>/split/``; the input is never touched.
    The decisions and the checks' warnings are written to ``<work_dir>/own_data.json`` and logged.

    Args:
        blurred_dir: folder, glob, file or list of the blurred stacks.
        work_dir: where the split and the record go (e.g. ``<output_dir>/own_data``).
        voxel_size: configured ``(z, y, x)`` µm, used when the files carry none; when they do and it
            differs by more than 1 %, the files win and a warning says so.
        held_out: share of the stacks (or of a single stack's lateral extent) held out, in ``(0, 0.5]``.
        patch_size: training crop ``(D, H, W)``, for the size checks.
        na, n_immersion, wavelength: the optics keys (µm), for the sampling and spot checks.
        spot_check: compare the stacks' sharpest spots with the optics keys (:func:`check_stacks`).
    """

    def __init__(
        self,
        blurred_dir: str | os.PathLike | Sequence[str],
        work_dir: str | os.PathLike,
        voxel_size: Sequence[float] | None = None,
        held_out: float = 0.2,
        patch_size: Sequence[int] = (64, 64, 64),
        na: float = 1.4,
        n_immersion: float = 1.515,
        wavelength: float = 0.52,
        spot_check: bool = True,
    ) -> None:
        if blurred_dir is None:
            raise ValueError("no blurred stacks: pass --blurred_dir (a folder, glob or file of your widefield stacks)")
        if not 0 < float(held_out) <= 0.5:
            raise ValueError(f"held_out must be in (0, 0.5], got {held_out}")
        self.blurred_dir = [str(d) for d in blurred_dir] if isinstance(blurred_dir, (list, tuple)) else str(blurred_dir)
        self.work_dir = Path(work_dir)
        self.configured_voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.held_out = float(held_out)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.optics = {"na": float(na), "n_immersion": float(n_immersion), "wavelength": float(wavelength)}
        self.spot_check = as_flag(spot_check, "spot_check")
        self._record: dict[str, Any] | None = None

    # the answers, computed on first use
    def train_files(self) -> list[str]:
        """Paths of the training stacks."""
        return list(self.prepare()["train"])

    def held_out_files(self) -> list[str]:
        """Paths of the held-out stacks (validation without ground truth, the report's figures)."""
        return list(self.prepare()["held_out"])

    def voxel_size(self) -> list[float]:
        """The voxel size ``(z, y, x)`` µm the run uses (the files' when they carry one)."""
        return list(self.prepare()["voxel_size"])

    def warnings(self) -> list[str]:
        """The checks' warnings."""
        return list(self.prepare()["warnings"])

    def prepare(self) -> dict[str, Any]:
        """Read, check and split the stacks (once); return the record written to ``own_data.json``."""
        if self._record is not None:
            return self._record
        from bundle.data import list_volumes

        files = list_volumes(self.blurred_dir)
        volumes, sizes = [], []
        for f in files:
            volume, meta = load_volume(f)
            volumes.append(volume)
            sizes.append(meta["voxel_size"])
        voxel_size, warnings = self._settle_voxel_size(files, sizes)
        if len(files) == 1:
            train, held = self._split_one(files[0], volumes[0], voxel_size)
            train_volumes = [load_volume(train[0])[0]]
        else:
            n_held = min(len(files) - 1, max(1, round(self.held_out * len(files))))
            train, held = files[: len(files) - n_held], files[len(files) - n_held :]
            train_volumes = volumes[: len(train)]
        warnings += check_stacks(
            [v.shape for v in train_volumes], voxel_size, self.patch_size, **self.optics,
            volumes=train_volumes if self.spot_check else (),
        )  # fmt: skip
        for w in warnings:
            logger.warning(w)
        self._record = {
            "blurred": files,
            "train": [str(f) for f in train],
            "held_out": [str(f) for f in held],
            "voxel_size": list(voxel_size),
            "optics": self.optics,
            "warnings": warnings,
        }
        atomic_write_text(self.work_dir / "own_data.json", json.dumps(self._record, indent=2))
        logger.info(f"own data: {len(train)} training stack(s), {len(held)} held out; voxel size {voxel_size} um")
        return self._record

    def _settle_voxel_size(
        self, files: Sequence[str], sizes: Sequence[tuple[float, ...] | None]
    ) -> tuple[tuple[float, float, float], list[str]]:
        known = {f: s for f, s in zip(files, sizes, strict=True) if s is not None}
        distinct = {tuple(round(v, 6) for v in s) for s in known.values()}
        if len(distinct) > 1:
            listing = "; ".join(f"{Path(f).name}: {s}" for f, s in known.items())
            raise ValueError(f"the stacks have different voxel sizes ({listing}): resample them to one, or train on each group")
        warnings = []
        if known:
            from_files = tuple(float(v) for v in next(iter(known.values())))
            missing = [Path(f).name for f in files if f not in known]
            if missing:
                warnings.append(f"no voxel size in {', '.join(missing)}: assumed {from_files} um like the other stacks")
            configured = self.configured_voxel_size
            if configured is not None and any(abs(a - b) > 0.01 * b for a, b in zip(configured, from_files, strict=True)):
                warnings.append(
                    f"--voxel_size {configured} disagrees with the files' metadata {from_files} um: the metadata is used"
                )
            return from_files, warnings  # type: ignore[return-value]
        if self.configured_voxel_size is None:
            raise ValueError(f"{files[0]}: the stacks carry no voxel size; pass --voxel_size \"[z, y, x]\" in um")
        warnings.append(
            f"the stacks carry no voxel size: using --voxel_size {self.configured_voxel_size} um; the PSF depends on it, check it"
        )
        return self.configured_voxel_size, warnings  # type: ignore[return-value]

    def _split_one(self, path: str, volume: np.ndarray, voxel_size: Sequence[float]) -> tuple[list[str], list[str]]:
        axis = 1 if volume.shape[1] >= volume.shape[2] else 2
        n = volume.shape[axis]
        cut = n - max(1, round(self.held_out * n))
        stem = Path(path).name.split(".")[0]
        parts = {}
        for name, sl in (("train", slice(0, cut)), ("held_out", slice(cut, n))):
            index = [slice(None)] * 3
            index[axis] = sl
            parts[name] = save_volume(
                self.work_dir / "split" / name / f"{stem}.tif", volume[tuple(index)], voxel_size=voxel_size, protect=[path]
            )
        logger.info(f"{path}: one stack, split along {'ZYX'[axis]} at {cut} of {n} into training and held-out parts")
        return [str(parts["train"])], [str(parts["held_out"])]
