"""What keeps a long cycleGAN training from falling apart: a learning-rate schedule and a collapse guard.

Measured on simulated data (DESIGN.md, issue "make the method win"): runs of 400-600 iterations at a
constant learning rate ended all-dark or washed-out while their validation had been good earlier. The
CycleGAN reference implementation decays the learning rate linearly to zero over the second half of
training (:func:`constant_then_linear_decay`); :class:`CollapseGuard` watches every validation and, when
the output scores below the input itself, restores the last good state and lowers the learning rate,
instead of training a dead model on.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bundle.io import atomic_write_text

__all__ = ["constant_then_linear_decay", "LinearDecay", "CollapseGuard", "WeightAverage"]

logger = logging.getLogger(__name__)


class WeightAverage(EMAHandler):
    """ignite's :class:`~ignite.handlers.EMAHandler` that also accepts ``momentum=1``: no averaging.

    ``ema = (1 - momentum) * ema + momentum * weights`` after every iteration; ignite refuses
    ``momentum >= 1``, but the paper's recipe (``configs/paper_recipe.json``) validates and saves the raw
    weights, i.e. ``momentum=1``: the "average" is then a copy of the current weights, kept by the same
    code path (same checkpoint keys, same validation network) as the averaged default.

    Args:
        model: the network whose weights are averaged (``g_deblur``).
        momentum: weight of the current weights in ``(0, 1]``.
    """

    def __init__(self, model: torch.nn.Module, momentum: float = 0.0002) -> None:
        momentum = float(momentum)
        if not 0 < momentum <= 1:
            raise ValueError(f"ema_momentum must be in (0, 1] (1: no averaging), got {momentum}")
        super().__init__(model, momentum=min(momentum, 0.5))
        self.momentum = momentum


class LinearDecay:
    """Factor ``1`` for ``epoch < start``, then linearly down to ``end_factor`` at ``total``."""

    def __init__(self, total: int, start: int, end_factor: float = 0.0) -> None:
        self.total, self.start, self.end_factor = int(total), int(start), float(end_factor)

    def __call__(self, epoch: int) -> float:
        if epoch < self.start or self.total <= self.start:
            return 1.0
        frac = min(1.0, (epoch - self.start) / (self.total - self.start))
        return 1.0 - (1.0 - self.end_factor) * frac


class _Schedule(LambdaLR):
    """``LambdaLR`` whose checkpoint keeps the position and base rates but not the schedule's shape.

    So a run resumed with a larger ``max_epochs`` (extending a finished training) follows the new
    schedule from where it stopped instead of the old one, which had already decayed to zero.
    """

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lambdas = self.lr_lambdas
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(lambdas)})
        self.lr_lambdas = lambdas


def constant_then_linear_decay(
    optimizer: Optimizer, max_epochs: int, decay_start: float = 0.5, end_factor: float = 0.0
) -> LambdaLR:
    """The CycleGAN schedule: constant learning rate, then a linear decay over the last part of training.

    Step it once per epoch (MONAI's ``LrScheduleHandler(epoch_level=True)``).

    Args:
        optimizer: the optimizer (every param group follows the same factor).
        max_epochs: length of the training in epochs.
        decay_start: fraction of ``max_epochs`` after which the decay begins (0.5 = the reference's
            ``n_epochs = n_epochs_decay``); 1 keeps the rate constant.
        end_factor: factor reached at ``max_epochs``.
    """
    if not 0.0 <= decay_start <= 1.0:
        raise ValueError(f"decay_start must be in [0, 1], got {decay_start}")
    return _Schedule(optimizer, LinearDecay(max_epochs, round(decay_start * max_epochs), end_factor))


class CollapseGuard:
    """After each validation: keep the last good training state; on collapse, restore it and slow down.

    A validation is *good* when ``metric_name`` (the output's score) is at least ``baseline_name`` (the
    same score of the input itself) minus ``margin``; after a good one, a validation below that is a
    *collapse*: the network now makes the stacks worse than doing nothing, as an all-dark or washed-out
    output does (before the first good validation a low score is just an early model). At a good one the
    state dicts of
    ``objects`` (networks, optimizers, schedulers, the EMA copy) are kept in memory (on the CPU). On a
    collapse the kept state is loaded back, every learning rate (and a scheduler's base rate) is
    multiplied by ``lr_factor``, and the event is logged and appended to ``log_path``. Attach it to the
    validator (``validate#handlers``), after the metrics.

    Args:
        objects: ``{name: object with state_dict/load_state_dict}``; ``None`` values are skipped.
        optimizers: optimizers whose learning rates are lowered on a restore.
        schedulers: LR schedulers of those optimizers (their ``base_lrs`` are lowered too).
        metric_name: the output's validation score.
        baseline_name: the input's validation score.
        margin: dB (or metric units) below the baseline that count as a collapse.
        lr_factor: learning-rate factor applied on each restore.
        log_path: JSON list of restores (e.g. ``<output_dir>/collapse_guard.json``); None: log only.
    """

    def __init__(
        self,
        objects: Mapping[str, Any],
        optimizers: Sequence[Optimizer] = (),
        schedulers: Sequence[Any] = (),
        metric_name: str = "val_psnr",
        baseline_name: str = "val_input_psnr",
        margin: float = 0.0,
        lr_factor: float = 0.5,
        log_path: str | None = None,
    ) -> None:
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self.optimizers = [o for o in optimizers if o is not None]
        self.schedulers = [s for s in schedulers if s is not None]
        self.metric_name, self.baseline_name = metric_name, baseline_name
        self.margin, self.lr_factor = float(margin), float(lr_factor)
        self.log_path = None if log_path is None else Path(log_path)
        self.good: dict[str, Any] | None = None
        self.good_epoch: int | None = None
        self.restores: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        """The last good state, its epoch and the restores so far (checkpointed: a resumed run
        restores what the uninterrupted one would)."""
        return {"good": self.good, "good_epoch": self.good_epoch, "restores": list(self.restores)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.good, self.good_epoch = state["good"], state["good_epoch"]
        self.restores = list(state["restores"])

    def _snapshot(self) -> dict[str, Any]:
        def to_cpu(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.detach().to("cpu", copy=True)
            if isinstance(value, dict):
                return {k: to_cpu(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(to_cpu(v) for v in value)
            return copy.deepcopy(value)

        return {name: to_cpu(obj.state_dict()) for name, obj in self.objects.items()}

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        if self.metric_name not in metrics or self.baseline_name not in metrics:
            raise KeyError(f"CollapseGuard needs {self.metric_name!r} and {self.baseline_name!r} in {sorted(metrics)}")
        score, baseline = float(metrics[self.metric_name]), float(metrics[self.baseline_name])
        epoch = engine.state.epoch  # a validator run by ValidationHandler carries the trainer's epoch
        if score >= baseline - self.margin:
            self.good, self.good_epoch = self._snapshot(), epoch
            return
        if self.good is None:
            logger.info(f"epoch {epoch}: {self.metric_name} {score:.3f} not yet above the input's {baseline:.3f}")
            return
        event: dict[str, Any] = {"epoch": epoch, self.metric_name: score, self.baseline_name: baseline}
        for name, obj in self.objects.items():
            obj.load_state_dict(self.good[name])
        event["restored_epoch"] = self.good_epoch
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] *= self.lr_factor
                if "initial_lr" in group:
                    group["initial_lr"] *= self.lr_factor
        for sched in self.schedulers:
            sched.base_lrs = [lr * self.lr_factor for lr in sched.base_lrs]
        event["learning_rates"] = [g["lr"] for opt in self.optimizers for g in opt.param_groups]
        self.restores.append(event)
        logger.warning(
            f"collapse at epoch {epoch}: {self.metric_name} {score:.3f} < input {baseline:.3f}; restored the "
            f"state of epoch {self.good_epoch}, learning rates x{self.lr_factor}"
        )
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.log_path, json.dumps(self.restores, indent=2))
