"""Multi-GPU / multi-node training with PyTorch DDP, used by ``configs/multi_gpu_train.json``.

The cycleGAN trainer is left as it is (it only overrides ``_iteration``): the config hands it
DDP-wrapped networks (:func:`ddp`), while handlers, optimizers and checkpoints keep the plain modules,
so ``blur.kernel()``, ``blur.calibrate()``, ``kernel_parameters()`` and state-dict keys are those
of single-process training (checkpoints load either way). What each rank does:

* every rank draws its own random crops (``set_determinism(seed + rank)``; the
  ``DistributedSampler`` splits the epoch's items between ranks), and gradients are averaged by DDP;
* :class:`BroadcastModules` copies rank 0's parameters and buffers to every rank when training
  starts — after the blur path's data calibration and after resuming — so all ranks start equal;
* :func:`rank_handlers` keeps logging and checkpoint saving on rank 0; the other ranks keep only
  the handlers that change the model (calibration, loading a checkpoint to resume) and validation,
  whose MONAI metrics gather across ranks; the validator's own handlers (best model, PSF snapshot,
  history) run on rank 0 only (``validate#evaluator#val_handlers`` in the config).

Launch (``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)::

    torchrun --nproc_per_node=2 -m monai.bundle run training \\
        --config_file "['configs/common.json','configs/train.json','configs/multi_gpu_train.json']"

Limitation: the WGAN-GP gradient penalty differentiates through the discriminator twice, which DDP
does not support; use the default LS-GAN loss for multi-process training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "BroadcastModules",
    "DistributedModule",
    "ResumeOnly",
    "ddp",
    "get_rank",
    "get_world_size",
    "rank_handlers",
    "state_hash",
    "unwrap",
    "write_state_hash",
]

logger = logging.getLogger(__name__)

#: handlers every rank keeps: calibration changes the model; validation's MONAI metrics gather their
#: buffers across ranks (a collective), so every rank validates (the whole validation set: the
#: gathered mean equals the single-process one) while only rank 0 has validation handlers
EVERY_RANK = ("BlurCalibration", "ValidationHandler", "MallocPolicy", "LrScheduleHandler", "AttachHandler")


def get_rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DistributedModule(DistributedDataParallel):
    """``DistributedDataParallel`` that steps aside while its module is frozen or grad is off.

    The cycleGAN's generator step runs the discriminators with their parameters frozen
    (``requires_grad=False``) and then only the discriminator step back-propagates into them. A plain
    DDP forward would prepare a gradient reduction that never happens in that step (and fail on the
    next forward); here such forwards call the module directly, and DDP synchronises only the
    forwards whose backward produces gradients. Attribute access (``kernel()``, ``calibrate()``, ...)
    is forwarded to the wrapped module.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.module.parameters()):
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def ddp(
    module: nn.Module | None,
    device: torch.device | str | None = None,
    broadcast_buffers: bool = True,
    find_unused_parameters: bool = False,
) -> nn.Module | None:
    """Wrap ``module`` for data-parallel training when a process group is running.

    Returns ``module`` itself when there is no process group, a single process, no trainable
    parameter (a fixed PSF without learned gain/offset), or ``module`` is None (non-blind mode's
    ``d_blurred``).

    Args:
        module: the network, already on ``device``.
        device: its device; CUDA devices become DDP's ``device_ids``.
        broadcast_buffers: re-broadcast buffers from rank 0 at every forward: a generator with batch
            norm keeps rank 0's running statistics on every rank (each rank's batches differ).
        find_unused_parameters: as DDP's.
    """
    if module is None or get_world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    device = torch.device(device) if device is not None else next(module.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedModule(
        module,
        device_ids=device_ids,
        broadcast_buffers=broadcast_buffers,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The plain module inside a DDP (or ``DataParallel``) wrapper; anything else unchanged."""
    while isinstance(module, (DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


class BroadcastModules:
    """On ``Events.STARTED``, copy rank 0's parameters and buffers to every rank; after every
    iteration, its buffers again (batch norm's running statistics follow each rank's own batches).

    Attach it after the handlers that change the model at start (``BlurCalibration`` computes gain
    and offset from each rank's own random samples; resuming loads a checkpoint): DDP synchronises
    parameters only when it wraps a module, before those handlers run.

    Args:
        modules: the networks (plain or DDP-wrapped; ``None`` entries are skipped).
        src: the rank whose values are kept.
    """

    def __init__(self, modules: Sequence[nn.Module | None], src: int = 0) -> None:
        self.modules = [unwrap(m) for m in modules if m is not None]
        self.src = src

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.broadcast_buffers)

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        if get_world_size() == 1:
            return
        for module in self.modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=self.src)

    @torch.no_grad()
    def broadcast_buffers(self, engine: Engine | None = None) -> None:
        """Rank 0's buffers to every rank (a few kB: running statistics, the noise level, the PSF cache)."""
        if get_world_size() == 1:
            return
        for module in self.modules:
            for tensor in module.buffers():
                dist.broadcast(tensor.data, src=self.src)


class ResumeOnly:
    """The loading half of a ``bundle.handlers.ResumableCheckpoint``, for ranks that must not save.

    Every rank loads the checkpoint when resuming (the optimizers' moments must match across ranks,
    or identical averaged gradients would give different updates); only rank 0 writes checkpoints.

    Args:
        checkpoint: the configured ``ResumableCheckpoint``.
    """

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint

    def attach(self, engine: Engine) -> None:
        ckpt = self.checkpoint
        if not ckpt.resume:
            return
        ckpt.save_dict["trainer"] = engine
        for name in ckpt.engine_objects:
            if getattr(engine, name, None) is not None:
                ckpt.save_dict[name] = getattr(engine, name)
        engine.add_event_handler(Events.STARTED, ckpt.load)


def rank_handlers(
    handlers: Sequence[Any],
    sync_modules: Sequence[nn.Module | None] = (),
    every_rank: Sequence[str] = EVERY_RANK,
    rank: int | None = None,
) -> list[Any]:
    """The training handlers of this rank: all on rank 0; on the others only ``every_rank`` ones.

    On ranks > 0, a ``ResumableCheckpoint`` becomes :class:`ResumeOnly` (load, never save), and
    logging (``StatsHandler``, progress bar) and any other handler not in ``every_rank`` is dropped. Every
    rank gets a :class:`BroadcastModules` over ``sync_modules`` at the end of the list.

    Args:
        handlers: the single-process list (``train#handlers``).
        sync_modules: networks to make equal across ranks at start (``g_deblur``, ``blur``, ...).
        every_rank: class names of handlers kept on every rank.
        rank: this process's rank (default: from the process group).
    """
    from bundle.handlers import ResumableCheckpoint

    if get_world_size() > 1:
        # ignite sets up its own view of the process group lazily, with a collective (new_group),
        # the first time a handler asks for the rank (ignite's Checkpoint, on rank 0 only): every
        # rank must take part, so do it here, on all ranks, before any handler is attached
        import ignite.distributed as idist

        idist.sync()
    rank = get_rank() if rank is None else rank
    if rank == 0:
        kept = list(handlers)
    else:
        kept = []
        for h in handlers:
            if isinstance(h, ResumableCheckpoint):
                kept.append(ResumeOnly(h))
            elif type(h).__name__ in every_rank:
                kept.append(h)
    if sync_modules:
        kept.append(BroadcastModules(sync_modules))
    return kept


def state_hash(*modules: nn.Module | None) -> str:
    """SHA-256 of the modules' state dicts (keys and values, in order): equal iff the weights are equal."""
    digest = hashlib.sha256()
    for module in modules:
        module = unwrap(module)
        if module is None:
            continue
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_state_hash(path: str, *modules: nn.Module | None) -> str:
    """Write :func:`state_hash` of ``modules`` to ``path`` (e.g. one file per rank, to compare)."""
    h = state_hash(*modules)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(h + "\n")
    return h
