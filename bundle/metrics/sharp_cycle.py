"""A no-reference model-selection score from the sharp domain: how well G undoes the blur path.

Data consistency (:class:`~bundle.metrics.DataConsistencyMetric`) checks the blurred side, where
everything G adds in the PSF's null space is invisible; this score checks the sharp side. For a few
fixed volumes ``x`` of the run's own sharp domain (a folder of sharp volumes, the Richardson–Lucy
outputs of the ``classical`` source or the ``simulated`` source's structures: whatever the run trains
on), the blur path renders a synthetic stack ``y = n(h(x))`` and the score is the PSNR of ``G(y)``
against ``x`` after the least-squares affine fit: the sharp cycle's objective, measured on whole
volumes with the validated generator. It needs no ground truth of the user's stacks. How well it
picks checkpoints, against the ground truth and against taking the last: ``docs/results.md``.

Written here because MONAI's metrics compare a prediction with a reference that the evaluator
passes; this one makes its own pairs from the blur path at each validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric

from bundle.metrics.reference import affine_fit, psnr

__all__ = ["SharpCycleScore"]


class SharpCycleScore(CumulativeIterationMetric):
    """PSNR (after the affine fit) of ``G(n(h(x)))`` against ``x`` for fixed sharp volumes ``x``.

    The noise is drawn from ``seed`` at every validation, so checkpoints are compared on the same
    synthetic stacks; training's random state is left untouched. The score is computed once per
    validation, on the first batch after :meth:`reset` (the evaluator's images are ignored; later
    batches add nothing). With ``baseline=True`` it scores the synthetic stack itself against ``x``
    (what the input would score): the baseline a collapse guard compares the output with.

    Args:
        network: the generator G ``(B, 1, D, H, W) -> (B, 1, D, H, W)`` (the validated one: the EMA weights).
        blur: the blur path's PSF layer h (with its gain and offset); ``None`` (supervised training has
            no blur path): the score is NaN.
        noise: the blur path's :class:`~bundle.networks.PoissonGaussianNoise`; ``None``: noise-free ``h(x)``.
        volumes: the sharp volumes ``(1, Z, Y, X)`` in [0, 1], normalised as in training: a sequence
            of tensors, or of dicts holding them under ``key`` (e.g. a MONAI ``Dataset`` built with
            :func:`bundle.data.normalize_transforms`). Read once, at the first validation.
        key: the dict key of the volumes.
        max_volumes: use the first ``max_volumes`` volumes (each costs one pass of G per validation).
        roi_size: the centre ``(Z, Y, X)`` of each volume that is scored (smaller volumes are scored
            whole); without an ``inferer`` each side is also cut down to a multiple of the network's
            ``divisor`` so that ``network(y)`` can run on it in one pass. ``None``: whole volumes.
        inferer: how G is applied (e.g. a ``TiledInferer``: slower, any size); ``None``: ``network(y)``.
        seed: seed of the noise draw.
        baseline: score the synthetic stack ``n(h(x))`` instead of ``G`` of it.

    Example::

        >>> score = SharpCycleScore(network=g, blur=h, noise=n, volumes=[x0, x1])
        >>> score(torch.zeros(1, 1, 8, 8, 8)); score.aggregate()  # mean PSNR over x0, x1 (dB)
    """

    def __init__(
        self,
        network: torch.nn.Module,
        blur: torch.nn.Module | None,
        volumes: Sequence[torch.Tensor] | Sequence[Mapping[str, Any]],
        noise: torch.nn.Module | None = None,
        key: str = "image",
        max_volumes: int = 4,
        roi_size: Sequence[int] | None = (32, 128, 128),
        inferer: Callable | None = None,
        seed: int = 0,
        baseline: bool = False,
    ) -> None:
        super().__init__()
        if int(max_volumes) < 1:
            raise ValueError(f"max_volumes must be >= 1, got {max_volumes}")
        self.network, self.blur, self.noise, self.inferer = network, blur, noise, inferer
        self.volumes, self.key, self.max_volumes = volumes, key, int(max_volumes)
        self.roi_size = None if roi_size is None else tuple(int(r) for r in roi_size)
        self.seed, self.baseline = int(seed), bool(baseline)
        self._sharp: list[torch.Tensor] | None = None
        self._scored = False

    def reset(self) -> None:
        super().reset()
        self._scored = False

    def _load(self) -> list[torch.Tensor]:
        if self._sharp is None:
            sharp = []
            for i in range(min(self.max_volumes, len(self.volumes))):
                item = self.volumes[i]
                volume = torch.as_tensor(item[self.key] if isinstance(item, Mapping) else item, dtype=torch.float32)
                if volume.ndim != 4 or volume.shape[0] != 1:
                    raise ValueError(f"sharp volume {i}: expected (1, Z, Y, X), got shape {tuple(volume.shape)}")
                sharp.append(self._centre(volume, i))
            if not sharp:
                raise ValueError("SharpCycleScore needs at least one sharp volume; got none")
            self._sharp = sharp
        return self._sharp

    def _centre(self, volume: torch.Tensor, index: int) -> torch.Tensor:
        """The centre ``roi_size`` of a ``(1, Z, Y, X)`` volume, sides multiples of the network's divisor."""
        step = 1 if self.inferer is not None else int(getattr(self.network, "divisor", 1))
        shape = volume.shape[1:]
        size = [min(r, s) if self.roi_size is not None else s for r, s in zip(self.roi_size or shape, shape)]
        size = [(n // step) * step for n in size]
        if min(size) < 1:
            raise ValueError(
                f"sharp volume {index}: shape {tuple(shape)} has a side below the network's divisor {step}; "
                "give SharpCycleScore an inferer or larger volumes"
            )
        start = [(s - n) // 2 for s, n in zip(shape, size)]
        return volume[:, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]

    def _scores(self) -> torch.Tensor:
        """``(N, 1)`` PSNR of each synthetic pair, in dB."""
        device = next(self.network.parameters()).device
        noise_was_training = self.noise.training if self.noise is not None else False
        fork = [device] if device.type == "cuda" else []
        scores = []
        with torch.no_grad(), torch.random.fork_rng(devices=fork):
            torch.manual_seed(self.seed)
            if self.noise is not None:
                self.noise.train(True)  # the noise model adds noise in training mode only
            try:
                for x in self._load():
                    x = x[None].to(device)
                    y = self.blur(x)
                    y = self.noise(y) if self.noise is not None else y
                    if self.baseline:
                        out = y
                    else:
                        out = self.inferer(y, self.network) if self.inferer is not None else self.network(y)
                    scores.append(psnr(affine_fit(out.double(), x.double()).float(), x))
            finally:
                if self.noise is not None:
                    self.noise.train(noise_was_training)
        return torch.tensor(scores, dtype=torch.float64)[:, None]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):  # type: ignore[override]
        """Scores of the synthetic pairs on the first call after :meth:`reset`; NaN rows after it."""
        if self.blur is None or self._scored:
            return torch.full((y_pred.shape[0], 1), float("nan"), dtype=torch.float64)
        self._scored = True
        return self._scores()

    def aggregate(self) -> torch.Tensor:
        """Mean PSNR over the synthetic pairs (NaN without a blur path)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        return data.float().nanmean()
