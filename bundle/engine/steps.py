"""Batch keys and preparation, and the optimiser-step helpers of the trainers (AMP scaling, freed gradients, frozen nets)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.utils import StrEnum
from torch.optim.optimizer import Optimizer

logger = logging.getLogger(__name__)


class CycleGANKeys(StrEnum):
    """Keys of a training batch and of ``engine.state.output``."""

    SHARP = "sharp"
    BLURRED = "blurred"
    SHARP_UNPAIRED = "sharp_unpaired"  # optional crops of X for the unpaired terms (other crop centres)
    BLURRED_UNPAIRED = "blurred_unpaired"  # optional crops of Y for the unpaired terms
    PRED = "pred"  # G(y), the deblurred training crop
    LOSS = "loss"
    G_LOSS = "g_loss"
    D_LOSS = "d_loss"
    CYCLE_SHARP = "cycle_sharp"  # ‖x − G(h*x)‖₁ · γ
    CYCLE_BLURRED = "cycle_blurred"  # ‖y − h*G(y)‖₁ · γ
    ADV_SHARP = "adv_sharp"  # generator's LS-GAN term against φ
    ADV_BLURRED = "adv_blurred"  # generator's LS-GAN term against ψ (blind only)
    FEATURE_MATCHING = "feature_matching"  # G's feature-matching term against φ (0 when off)
    D_SHARP = "d_sharp"  # φ's loss
    D_BLURRED = "d_blurred"  # ψ's loss (blind only)


def _as_float(t: Any, device: str | torch.device | None, non_blocking: bool, **kwargs: Any) -> torch.Tensor:
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return t.to(device=device, non_blocking=non_blocking, **kwargs).float()


def prepare_unpaired_batch(
    batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``batch["sharp"]`` and ``batch["blurred"]`` (each ``(B, 1, D, H, W)``) to ``device`` as plain tensors."""
    out = []
    for key in (CycleGANKeys.SHARP, CycleGANKeys.BLURRED):
        if key not in batchdata:
            raise KeyError(f"training batch has no {key!r} entry (keys: {sorted(batchdata)})")
        out.append(_as_float(batchdata[key], device, non_blocking, **kwargs))
    return out[0], out[1]


def unpaired_crops(
    batchdata: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of the unpaired terms: ``batch["sharp_unpaired"]`` and ``batch["blurred_unpaired"]`` on
    ``x``'s device when the batch holds them (``unpaired_dataset(unpaired_background_share=...)``), else
    ``x`` and ``y`` themselves."""
    keys = (CycleGANKeys.SHARP_UNPAIRED, CycleGANKeys.BLURRED_UNPAIRED)
    if not all(k in batchdata for k in keys):
        return x, y
    return tuple(_as_float(batchdata[k], x.device, non_blocking, **kwargs) for k in keys)  # type: ignore[return-value]


def _step(optimizer: Optimizer, scaler: Any | None, update: bool = False) -> None:
    """``optimizer.step()``, through the AMP ``scaler`` when there is one (``update``: then update it)."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    if update:
        scaler.update()


def _backward_step(loss: torch.Tensor, optimizer: Optimizer, scaler: Any | None, update: bool = False) -> None:
    """``loss.backward(); optimizer.step()``, through the AMP ``scaler`` when there is one."""
    (loss if scaler is None else scaler.scale(loss)).backward()
    _step(optimizer, scaler, update)


def _release_grads(optimizer: Optimizer, set_to_none: bool) -> None:
    """Free ``optimizer``'s gradients right after its step (when ``set_to_none``).

    ``zero_grad`` at the start of a step alone would keep them allocated through the *other*
    optimizer's step: the discriminators' gradients (2 × 6.2 M parameters at full size, 47 MiB) would
    sit in memory during the generator step, where the iteration's memory peaks.
    """
    if set_to_none:
        optimizer.zero_grad(set_to_none=True)


def _set_requires_grad(nets: Iterable[torch.nn.Module | None], flag: bool) -> None:
    for net in nets:
        if net is not None:
            for p in net.parameters():
                p.requires_grad_(flag)


def centre_crop(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size`` of a ``(B, C, *spatial)`` tensor (each spatial side >= ``size``).

    Written here because MONAI's ``CenterSpatialCrop`` takes one channel-first item, not a batch, and
    this runs on the batched tensors inside the iteration (a view, no copy).
    """
    starts = [(n - s) // 2 for n, s in zip(volume.shape[2:], size, strict=True)]
    if min(starts) < 0:
        raise ValueError(f"a sharp crop {tuple(volume.shape[2:])} is smaller than the blurred crop {tuple(size)}")
    return volume[(..., *(slice(a, a + s) for a, s in zip(starts, size, strict=True)))]

