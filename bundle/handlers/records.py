"""What a run leaves to look at: PSF snapshots, orthogonal-slice figures, the validation history."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from bundle.flags import as_flag
from bundle.handlers.checkpoints import _atomic_json
from bundle.io import atomic_write

logger = logging.getLogger(__name__)


class PSFSnapshot:
    """After each validation, export the current PSF (TIFF + JSON) and a PNG of its central slices.

    Args:
        blur: the PSF layer (has ``kernel()`` and ``export()``).
        output_dir: folder; files ``psf_latest.tif``, ``psf_latest.json``, ``psf_latest.png``.
        voxel_size: ``(z, y, x)`` µm for the PNG's aspect ratio (default: the layer's).
    """

    def __init__(self, blur: torch.nn.Module, output_dir: str, voxel_size: Sequence[float] | None = None) -> None:
        self.blur = blur
        self.output_dir = Path(output_dir)
        self.voxel_size = voxel_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not hasattr(self.blur, "kernel"):
            return  # the conventional cycleGAN's blur generator is a network, not a PSF
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.blur.export(str(self.output_dir / "psf_latest.tif"), str(self.output_dir / "psf_latest.json"))
        with torch.no_grad():
            kernel = self.blur.kernel().detach().float().cpu().numpy()
        voxel = self.voxel_size or getattr(self.blur, "voxel_size", (1.0, 1.0, 1.0))
        save_orthoslices(kernel, self.output_dir / "psf_latest.png", voxel_size=voxel, title="learned PSF")


def save_orthoslices(
    volume,
    path: str | os.PathLike,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | Sequence[str] = "",
) -> Path:
    """PNG of the XY, XZ and YZ central slices of ``(Z, Y, X)`` volumes, written atomically.

    Args:
        volume: one ``(Z, Y, X)`` array, or a sequence of them (one row each, e.g. input / output /
            ground truth, the paper's figure style); slices through each volume's centre.
        path: output PNG (900 pixels wide, 320 high per row).
        voxel_size: ``(z, y, x)`` for the aspect ratio.
        title: one title, or one per volume.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no process-wide backend switch

    path = Path(path)
    volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    titles = [title] * len(volumes) if isinstance(title, str) else list(title)
    vz, vy, vx = voxel_size
    fig = Figure(figsize=(9, 3.2 * len(volumes)))
    axes = fig.subplots(len(volumes), 3, squeeze=False)
    for row, vol, name in zip(axes, volumes, titles):
        z, y, x = (s // 2 for s in vol.shape)
        views = [
            (vol[z], vy / vx, "XY"),
            (vol[:, y, :], vz / vx, "XZ"),
            (vol[:, :, x], vz / vy, "YZ"),
        ]
        for ax, (img, aspect, view) in zip(row, views):
            ax.imshow(img, cmap="magma", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name} {view}".strip())
            ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    return path


class ValidationHistory:
    """Append every validation's metrics (with the trainer's epoch) to a JSON list, atomically.

    Args:
        path: output JSON file, e.g. ``<output_dir>/validation.json``.
        blur: optional PSF layer whose ``physical_parameters()`` are recorded too.
        epoch_length: iterations per trainer epoch, to record the iteration as well.
        resume: this run continues an earlier one: keep the earlier entries up to the epoch validated
            now (a validation cut off by a kill is replaced by its re-run). A fresh run starts a fresh
            file at its first validation.
    """

    def __init__(
        self, path: str, blur: torch.nn.Module | None = None, epoch_length: int | None = None, resume: bool = False
    ) -> None:
        self.path = Path(path)
        self.blur = blur
        self.epoch_length = epoch_length
        self._keep_earlier = as_flag(resume, "resume")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # a validator run by ValidationHandler carries the trainer's epoch
        history = json.loads(self.path.read_text()) if self._keep_earlier and self.path.is_file() else []
        history = [e for e in history if e.get("epoch", 0) < epoch]
        self._keep_earlier = True  # from now on this run's own entries
        entry: dict[str, Any] = {
            "epoch": epoch,
            "iteration": epoch * self.epoch_length if self.epoch_length else None,
        }
        entry.update({k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, torch.Tensor))})
        if self.blur is not None and hasattr(self.blur, "physical_parameters"):
            entry["psf"] = self.blur.physical_parameters()
        history.append(entry)
        _atomic_json(history, self.path)
