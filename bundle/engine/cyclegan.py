"""The cycleGAN trainer: one Ignite/MONAI ``Trainer`` whose ``_iteration`` is the paper's Algorithm."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from torch.optim.optimizer import Optimizer

from bundle.engine.steps import (
    CycleGANKeys,
    _backward_step,
    _release_grads,
    _set_requires_grad,
    _step,
    centre_crop,
    prepare_unpaired_batch,
    unpaired_crops,
)
from bundle.flags import as_flag
from bundle.image_pool import ImagePool
from bundle.losses import CycleLoss, LSGANLoss

logger = logging.getLogger(__name__)


class CycleGANTrainer(Trainer):
    """Unpaired cycleGAN training with a deblurring generator and a blur generator (Lim et al. 2020).

    Each iteration: (1) generator step with the discriminators frozen — cycle losses
    ``γ‖x − G(h*x)‖₁ + γ‖y − h*G(y)‖₁`` plus the adversarial terms of G (against ``d_sharp``) and of h
    (against ``d_blurred``, blind only); (2) discriminator step on real vs. generated volumes drawn
    through the image history pools. Everything else (validation, checkpoints, logging) is Ignite
    handlers. Checkpoint the trainer, networks, optimizers and pools (their ``state_dict``) to resume.

    Args:
        device: device of the networks and batches.
        max_epochs: number of epochs.
        train_data_loader: yields ``{"sharp": (B, 1, D, H, W), "blurred": (B, 1, D, H, W)}``.
        g_deblur: G, blurred → sharp, ``(B, 1, D, H, W) → (B, 1, D, H, W)``.
        blur: h, sharp → blurred (the PSF layer, or a second U-Net for the conventional cycleGAN).
        d_sharp: φ, returns a list of patch logits (one per scale).
        g_optimizer: optimizer over the parameters of ``g_deblur`` and ``blur`` (param groups may
            give the PSF its own learning rate).
        d_optimizer: optimizer over the discriminators' parameters.
        d_blurred: ψ for blind mode; ``None`` for non-blind mode.
        blur_noise: optional module adding noise to ``h*x`` before G and ψ see it (training only).
        adversarial_loss: ``LSGANLoss`` (default) or ``WGANGPLoss``-like object with
            ``generator_loss(preds)``, ``discriminator_loss(real_preds, fake_preds)`` and optionally
            ``gradient_penalty(discriminator, real, fake)``.
        cycle_loss: weighted L1, default ``CycleLoss(weight=10.0)`` (γ = 10, both directions).
        blurred_cycle_loss: a separate loss (weight) for the y-cycle ``‖y − h*G(y)‖``; default
            ``cycle_loss``. Weight 0 with ``adversarial_weight`` 0 leaves the sharp cycle alone: G
            trained on synthetic pairs ``(h*x + noise, x)``, the baseline that tells what the unpaired
            terms add.
        adversarial_weight: weight of the generators' adversarial terms.
        blur_adversarial_weight: weight of h's adversarial term (against ``d_blurred``) alone; None:
            ``adversarial_weight``. That term moves only h (``x`` is real), and it is h's only signal
            that ``h*x`` must look like the real blurred stacks: the sharp cycle alone rewards a
            narrower PSF (less blur to undo), so a small weight lets a learned NA drift upwards.
        blurred_recorruption: optional module returning ``(input, target)`` copies of ``y`` with
            independent noise (``bundle.networks.Recorruption``): the y-cycle becomes
            ``‖target − h*G(input)‖`` (use a squared error), G's adversarial term sees ``G(input)``.
        sharp_cycle_trains_blur: True (the paper): the sharp cycle ``‖x − G(h*x)‖`` moves h as well
            as G. False: G sees ``h*x`` detached, so the sharp cycle trains G alone and h learns only
            from the blurred cycle and its adversarial term, the terms that compare it with real
            stacks (the sharp cycle's pull towards a narrower PSF removed).
        sharp_pool: history pool of generated sharp volumes G(y) shown to φ; default 50 volumes.
        blurred_pool: history pool of generated blurred volumes h*x shown to ψ; default 50 volumes.
        feature_matching: optional ``FeatureMatchingLoss`` (its weight inside) added to G's loss: the
            mean features of ``d_sharp`` (which must have a ``features`` method, as
            ``MultiScalePatchDiscriminator``) on ``G(y)`` matched to those on the real ``x`` of the same
            iteration. ``None`` (default) or weight 0: not computed.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, decollate,
        to_kwargs, amp_kwargs: as in ``monai.engines.SupervisedTrainer``. As there, the output
        holds the batch (``sharp``, ``blurred``, ``pred`` = G(y)) and every loss term, and with
        ``decollate=True`` becomes a list of per-sample dicts, so ``from_engine(["loss"], first=True)``
        (MONAI's tracking settings) reads the loss.
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        g_deblur: torch.nn.Module,
        blur: torch.nn.Module,
        d_sharp: torch.nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        d_blurred: torch.nn.Module | None = None,
        blur_noise: torch.nn.Module | None = None,
        adversarial_loss: Any | None = None,
        cycle_loss: torch.nn.Module | None = None,
        adversarial_weight: float = 1.0,
        blurred_cycle_loss: torch.nn.Module | None = None,
        blur_adversarial_weight: float | None = None,
        sharp_cycle_trains_blur: bool = True,
        blurred_recorruption: torch.nn.Module | None = None,
        sharp_pool: ImagePool | None = None,
        blurred_pool: ImagePool | None = None,
        feature_matching: torch.nn.Module | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_unpaired_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=as_flag(amp, "amp"),
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.g_deblur = g_deblur
        self.blur = blur
        self.d_sharp = d_sharp
        self.d_blurred = d_blurred
        self.blur_noise = None if blur_noise is None else blur_noise.to(device)
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.adversarial_loss = LSGANLoss() if adversarial_loss is None else adversarial_loss
        self.cycle_loss = CycleLoss(weight=10.0) if cycle_loss is None else cycle_loss
        self.blurred_cycle_loss = self.cycle_loss if blurred_cycle_loss is None else blurred_cycle_loss
        self.adversarial_weight = float(adversarial_weight)
        self.blur_adversarial_weight = (
            self.adversarial_weight if blur_adversarial_weight is None else float(blur_adversarial_weight)
        )
        self.sharp_cycle_trains_blur = as_flag(sharp_cycle_trains_blur, "sharp_cycle_trains_blur")
        self.blurred_recorruption = blurred_recorruption
        self.sharp_pool = ImagePool(pool_size=50) if sharp_pool is None else sharp_pool
        self.blurred_pool = ImagePool(pool_size=50) if blurred_pool is None else blurred_pool
        self.optim_set_to_none = optim_set_to_none
        self.feature_matching = None if getattr(feature_matching, "weight", 1.0) == 0 else feature_matching
        if self.feature_matching is not None and not hasattr(getattr(d_sharp, "module", d_sharp), "features"):
            raise TypeError(f"feature_matching needs a d_sharp with a features() method, got {type(d_sharp).__name__}")

    @property
    def blind(self) -> bool:
        """True when a blurred-domain discriminator is trained (the PSF is learned)."""
        return self.d_blurred is not None

    def _autocast(self):
        return torch.autocast(device_type=torch.device(self.state.device).type, enabled=self.amp, **self.amp_kwargs)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _discriminator_loss(self, net: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """φ or ψ: real volumes vs. (pooled, detached) generated ones; the same function for both."""
        with self._autocast():
            loss = self.adversarial_loss.discriminator_loss(net(real), net(fake))
        if hasattr(self.adversarial_loss, "gradient_penalty"):
            loss = loss + self.adversarial_loss.gradient_penalty(net, real, fake)
        return loss

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        x, y = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        xu, y = unpaired_crops(batchdata, x, y, engine.non_blocking)  # the unpaired terms' crops (x, y by default)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)  # keep MONAI's event order for handlers
        g_terms, x, hx, gy = self._generator_step(engine, x, y, xu)  # (1) G and h, discriminators frozen
        d_terms = self._discriminator_step(x, y, hx, gy)  # (2) φ (and ψ) on history-pooled fakes
        if self.scaler is not None:
            self.scaler.update()
        k = CycleGANKeys
        out = {k.SHARP: x, k.BLURRED: y, k.PRED: gy.detach(), k.LOSS: (g_terms[k.G_LOSS] + d_terms[k.D_LOSS]).detach()}
        out.update(g_terms)
        out.update(d_terms)
        if not self.blind:
            out.pop(k.ADV_BLURRED)
            out.pop(k.D_BLURRED)
        engine.state.output = out
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollation and postprocessing hook here
        return engine.state.output

    def _generator_step(
        self, engine: Trainer, x: torch.Tensor, y: torch.Tensor, xu: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step of G and h with the discriminators frozen.

        The loss is a sum of a term of the x-cycle and a term of the y-cycle, which share no
        activations: each is backpropagated as soon as it is computed (gradients accumulate), so only
        one cycle's graph is alive at a time (the same gradient as one backward of the sum, with about
        half the activation memory).

        A sharp crop larger than the blurred one (the dataset's ``sharp_margin``) is blurred whole, then
        ``x`` and ``h*x`` are cut to the blurred crop's centre: there ``h*x`` holds the light of structure
        outside the crop, as a real stack does, not the dark border of a convolution of the crop alone.

        ``xu``: other crops of X for the unpaired terms (``batch["sharp_unpaired"]``; ``y`` is then the
        batch's ``blurred_unpaired``): h's adversarial term and the discriminators see ``h*xu`` and
        ``xu``, the sharp cycle ``x``. ``None`` or ``x``: one set of crops for every term.

        Returns:
            the detached loss terms (``CycleGANKeys``), the sharp crops the unpaired terms saw (cut to
            the blurred crop's size), their ``h*x`` (with blur-path noise) and ``G(y)``.
        """
        separate = xu is not None and xu is not x
        _set_requires_grad((self.d_sharp, self.d_blurred), False)
        self.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self._autocast():
            hx = self.blur(x)  # h*x: sharp → blurred
            x, hx = (centre_crop(v, y.shape[2:]) for v in (x, hx))  # no-op unless x has a margin
            if self.blur_noise is not None:
                hx = self.blur_noise(hx)
            x_cycle = self.g_deblur(hx if self.sharp_cycle_trains_blur else hx.detach())  # G(h*x) ≈ x
            cycle_sharp = self.cycle_loss(x_cycle.float(), x)
            if separate:  # other crops for the unpaired terms: their own h*x
                x, hx = (centre_crop(v, y.shape[2:]) for v in (xu, self.blur(xu)))
                hx = hx if self.blur_noise is None else self.blur_noise(hx)
            adv_blurred = self.adversarial_loss.generator_loss(self.d_blurred(hx)) if self.blind else None
            loss_x = cycle_sharp if adv_blurred is None else cycle_sharp + self.blur_adversarial_weight * adv_blurred
        self._backward(loss_x)
        del x_cycle
        off = getattr(self.blurred_cycle_loss, "weight", 1.0) == 0  # non-blind default: h*G(y) not needed
        y_in, y_target = (y, y) if off or self.blurred_recorruption is None else self.blurred_recorruption(y)
        with self._autocast():
            gy = self.g_deblur(y_in)  # G(y): blurred → sharp
            cycle_blurred = gy.new_zeros((), dtype=torch.float32) if off else self.blurred_cycle_loss(self.blur(gy).float(), y_target)
            if self.feature_matching is None:
                adv_sharp = self.adversarial_loss.generator_loss(self.d_sharp(gy))
                fm = gy.new_zeros((), dtype=torch.float32)
            else:  # one pass of φ gives the logits and the features (φ frozen here: a DDP wrapper is bypassed)
                d_sharp = getattr(self.d_sharp, "module", self.d_sharp)
                fake_features = d_sharp.features(gy)
                adv_sharp = self.adversarial_loss.generator_loss([f[-1] for f in fake_features])
                with torch.no_grad():
                    real_features = d_sharp.features(x)
                fm = self.feature_matching(real_features, fake_features)
            loss_y = cycle_blurred + self.adversarial_weight * adv_sharp + fm
        if adv_blurred is None:
            adv_blurred = torch.zeros_like(adv_sharp)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self._backward(loss_y)
        _step(self.g_optimizer, self.scaler)
        _release_grads(self.g_optimizer, self.optim_set_to_none)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        k = CycleGANKeys
        terms = {
            k.G_LOSS: loss_x.detach() + loss_y.detach(),
            k.CYCLE_SHARP: cycle_sharp.detach(),
            k.CYCLE_BLURRED: cycle_blurred.detach(),
            k.ADV_SHARP: adv_sharp.detach(),
            k.ADV_BLURRED: adv_blurred.detach(),
            k.FEATURE_MATCHING: fm.detach(),
        }
        return terms, x, hx, gy

    def _discriminator_step(
        self, x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One optimizer step of φ (real ``x`` vs pooled ``G(y)``) and, blind, ψ (real ``y`` vs pooled ``h*x``)."""
        _set_requires_grad((self.d_sharp, self.d_blurred), True)
        self.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        d_sharp_loss = self._discriminator_loss(self.d_sharp, x, self.sharp_pool.query(gy.detach()))
        if self.blind:
            d_blurred_loss = self._discriminator_loss(self.d_blurred, y, self.blurred_pool.query(hx.detach()))
        else:
            d_blurred_loss = torch.zeros_like(d_sharp_loss)
        d_loss = d_sharp_loss + d_blurred_loss
        _backward_step(d_loss, self.d_optimizer, self.scaler)
        _release_grads(self.d_optimizer, self.optim_set_to_none)
        k = CycleGANKeys
        return {k.D_LOSS: d_loss.detach(), k.D_SHARP: d_sharp_loss.detach(), k.D_BLURRED: d_blurred_loss.detach()}
