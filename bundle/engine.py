"""The cycleGAN trainer: one Ignite/MONAI ``Trainer`` whose ``_iteration`` is the paper's Algorithm.

Paper symbols → code names (Lim et al., IEEE TCI 2020, Sec. II):
    x (sharp, domain X)   → ``batch["sharp"]``        y (blurred, domain Y) → ``batch["blurred"]``
    G (deblurring U-Net)  → ``g_deblur``              h (PSF layer, blur)   → ``blur``
    φ (discriminator on X)→ ``d_sharp``               ψ (discriminator on Y)→ ``d_blurred`` (blind only)
    γ (cycle weight)      → ``cycle_loss.weight``

Blind mode: ``blur`` is learnable and ``d_blurred`` is given. Non-blind mode: ``blur`` is fixed to a
known PSF (its gain/offset may still learn) and ``d_blurred`` is ``None``. The conventional cycleGAN
baseline uses the same trainer with a second deep U-Net as ``blur``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import AdversarialTrainer, Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils import AdversarialKeys, StrEnum
from monai.utils.enums import CommonKeys
from torch.optim.optimizer import Optimizer

from bundle.image_pool import ImagePool
from bundle.losses import CycleLoss, LSGANLoss

__all__ = [
    "CycleGANKeys",
    "CycleGANTrainer",
    "SupervisedGANTrainer",
    "prepare_unpaired_batch",
    "generator_param_groups",
    "discriminator_parameters",
    "check_mode",
]

#: the training modes a config can declare with its ``mode`` key
MODES = ("blind", "nonblind", "conventional", "supervised", "supervised_gan")


def check_mode(mode: str, blur: torch.nn.Module | None) -> None:
    """Check that the config's declared ``mode`` matches the blur path it builds; raise if not.

    The configs set ``mode`` (``train.json``: blind; ``train_nonblind.json``: nonblind; …) but what is
    trained is decided by the config files layered, so ``--mode nonblind`` on the blind list would
    otherwise train blind without a word. Runs first in the ``training`` / ``initialize`` lists.

    Args:
        mode: one of :data:`MODES`.
        blur: the built blur path (``@blur_path``): a PSF layer, the conventional cycleGAN's second
            generator, or ``None`` (supervised).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    fix = {
        "blind": "use configs/train.json without configs/train_nonblind.json",
        "nonblind": "add configs/train_nonblind.json to --config_file (it fixes the PSF to --psf_file)",
        "conventional": "add configs/train_conventional.json to --config_file",
        "supervised": "add configs/train_supervised.json to --config_file",
        "supervised_gan": "add configs/train_supervised.json and configs/train_supervised_gan.json to --config_file",
    }[mode]
    if mode in ("supervised", "supervised_gan"):
        found = "no blur path" if blur is None else f"a blur path ({type(blur).__name__})"
        ok = blur is None
    elif blur is None:
        found, ok = "no blur path", False
    elif not hasattr(blur, "kernel_parameters"):
        found, ok = f"a network blur path ({type(blur).__name__})", mode == "conventional"
    else:
        learned = any(p.requires_grad for p in blur.kernel_parameters())
        found = "a PSF layer that learns its PSF" if learned else "a PSF layer with a fixed PSF"
        ok = (mode == "blind") == learned and mode in ("blind", "nonblind")
    if not ok:
        raise ValueError(f"mode {mode!r} does not match the configs, which build {found}: {fix}")


class CycleGANKeys(StrEnum):
    """Keys of a training batch and of ``engine.state.output``."""

    SHARP = "sharp"
    BLURRED = "blurred"
    PRED = "pred"  # G(y), the deblurred training crop
    LOSS = "loss"
    G_LOSS = "g_loss"
    D_LOSS = "d_loss"
    CYCLE_SHARP = "cycle_sharp"  # ‖x − G(h*x)‖₁ · γ
    CYCLE_BLURRED = "cycle_blurred"  # ‖y − h*G(y)‖₁ · γ
    ADV_SHARP = "adv_sharp"  # generator's LS-GAN term against φ
    ADV_BLURRED = "adv_blurred"  # generator's LS-GAN term against ψ (blind only)
    D_SHARP = "d_sharp"  # φ's loss
    D_BLURRED = "d_blurred"  # ψ's loss (blind only)


def prepare_unpaired_batch(
    batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``batch["sharp"]`` and ``batch["blurred"]`` (each ``(B, 1, D, H, W)``) to ``device`` as plain tensors."""
    out = []
    for key in (CycleGANKeys.SHARP, CycleGANKeys.BLURRED):
        if key not in batchdata:
            raise KeyError(f"training batch has no {key!r} entry (keys: {sorted(batchdata)})")
        t = batchdata[key]
        t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
        out.append(t.to(device=device, non_blocking=non_blocking, **kwargs).float())
    return out[0], out[1]


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
        sharp_pool: history pool of generated sharp volumes G(y) shown to φ; default 50 volumes.
        blurred_pool: history pool of generated blurred volumes h*x shown to ψ; default 50 volumes.
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
        sharp_pool: ImagePool | None = None,
        blurred_pool: ImagePool | None = None,
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
            amp=amp,
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
        self.sharp_pool = ImagePool(pool_size=50) if sharp_pool is None else sharp_pool
        self.blurred_pool = ImagePool(pool_size=50) if blurred_pool is None else blurred_pool
        self.optim_set_to_none = optim_set_to_none

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
        k = CycleGANKeys
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)  # keep MONAI's event order for handlers

        # (1) generators G and h, with the discriminators frozen. The loss is a sum of a term of the
        # x-cycle and a term of the y-cycle, which share no activations: each is backpropagated as
        # soon as it is computed (gradients accumulate), so only one cycle's graph is alive at a time
        # (the same gradient as one backward of the sum, with about half the activation memory).
        _set_requires_grad((self.d_sharp, self.d_blurred), False)
        self.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self._autocast():
            hx = self.blur(x)  # h*x: sharp → blurred
            if self.blur_noise is not None:
                hx = self.blur_noise(hx)
            x_cycle = self.g_deblur(hx)  # G(h*x) ≈ x
            cycle_sharp = self.cycle_loss(x_cycle.float(), x)
            adv_blurred = self.adversarial_loss.generator_loss(self.d_blurred(hx)) if self.blind else None
            loss_x = cycle_sharp if adv_blurred is None else cycle_sharp + self.blur_adversarial_weight * adv_blurred
        self._backward(loss_x)
        del x_cycle
        with self._autocast():
            gy = self.g_deblur(y)  # G(y): blurred → sharp
            y_cycle = self.blur(gy)  # h*G(y) ≈ y
            cycle_blurred = self.blurred_cycle_loss(y_cycle.float(), y)
            adv_sharp = self.adversarial_loss.generator_loss(self.d_sharp(gy))
            loss_y = cycle_blurred + self.adversarial_weight * adv_sharp
        if adv_blurred is None:
            adv_blurred = torch.zeros_like(adv_sharp)
        g_loss = loss_x.detach() + loss_y.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self._backward(loss_y)
        _step(self.g_optimizer, self.scaler)
        _release_grads(self.g_optimizer, self.optim_set_to_none)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        # (2) discriminators φ (and ψ), on history-pooled generated volumes
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
        if self.scaler is not None:
            self.scaler.update()

        out = {
            k.SHARP: x,
            k.BLURRED: y,
            k.PRED: gy.detach(),
            k.LOSS: (g_loss + d_loss).detach(),
            k.G_LOSS: g_loss.detach(),
            k.D_LOSS: d_loss.detach(),
            k.CYCLE_SHARP: cycle_sharp.detach(),
            k.CYCLE_BLURRED: cycle_blurred.detach(),
            k.ADV_SHARP: adv_sharp.detach(),
            k.D_SHARP: d_sharp_loss.detach(),
        }
        if self.blind:
            out[k.ADV_BLURRED] = adv_blurred.detach()
            out[k.D_BLURRED] = d_blurred_loss.detach()
        engine.state.output = out
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollation and postprocessing hook here
        return engine.state.output


def generator_param_groups(
    g_deblur: torch.nn.Module,
    blur: torch.nn.Module,
    lr: float = 1e-4,
    psf_lr: float | None = None,
    scale_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of G and h: the PSF parameters get their own learning rate.

    A parametric PSF has a handful of physical parameters (NA, ...) that move far per unit gradient
    compared with network weights; the trials used 2e-2 for them against 1e-3 for the networks.

    Args:
        g_deblur: G.
        blur: h — a ``PSFLayer`` (with ``kernel_parameters()``/``scale_parameters()``) or any module
            (the conventional cycleGAN's second U-Net), which then shares ``lr``.
        lr: learning rate of G (and of a network ``blur``).
        psf_lr: learning rate of the PSF kernel parameters (default ``lr``).
        scale_lr: learning rate of the blur path's gain and offset (default ``lr``).
    """
    groups: list[dict[str, Any]] = [{"params": [p for p in g_deblur.parameters() if p.requires_grad], "lr": lr}]
    if hasattr(blur, "kernel_parameters") and hasattr(blur, "scale_parameters"):
        kernel = [p for p in blur.kernel_parameters() if p.requires_grad]
        scale = [p for p in blur.scale_parameters() if p.requires_grad]
        groups.append({"params": kernel, "lr": lr if psf_lr is None else psf_lr})
        groups.append({"params": scale, "lr": lr if scale_lr is None else scale_lr})
    else:
        groups.append({"params": [p for p in blur.parameters() if p.requires_grad], "lr": lr})
    return [g for g in groups if g["params"]]


def discriminator_parameters(*discriminators: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """Parameters of the given discriminators, skipping ``None`` (non-blind mode has no ``d_blurred``)."""
    return [p for d in discriminators if d is not None for p in d.parameters()]


class SupervisedGANTrainer(AdversarialTrainer):
    """Supervised baseline with an adversarial term: G(y) ≈ x by a reconstruction loss plus LS-GAN.

    The paper's "supervised learning with GAN loss" (Lim et al. 2020, Table I): a U-Net G trained on
    paired crops with a reconstruction loss (MSE) and a discriminator D (one multi-scale PatchGAN)
    that tells ground-truth sharp crops x from G(y). MONAI's ``AdversarialTrainer`` has this shape
    (one G, one D, ``recon_loss_function`` + ``g_loss_function``) but shows D the *input* as the real
    sample (it is written for autoencoders, where input = target); here the real sample is the
    ground truth ``label``. ``_iteration`` is replaced, the constructor adds ``adversarial_weight``,
    and the trainer's ``state_dict`` leaves the networks and optimizers to their own checkpoint
    entries (see :meth:`_complete_state_dict_user_keys`); events and ``state.g_network`` etc. are
    ``AdversarialTrainer``'s, and the output decollates like ``SupervisedTrainer``'s.

    Per iteration: G step with D frozen, ``loss_G = recon(G(y), x) + w · g_loss(D(G(y)))``; then D
    step, ``loss_D = d_loss(D(x), D(G(y).detach()))``.

    Args:
        adversarial_weight: w, weight of G's adversarial term against the reconstruction loss (the
            paper does not give it; pix2pix weighs L1 100:1 against its GAN term).
        args, kwargs: as ``monai.engines.AdversarialTrainer`` (``g_network``, ``g_optimizer``,
            ``g_loss_function``, ``recon_loss_function``, ``d_network``, ``d_optimizer``,
            ``d_loss_function``, ...); see ``configs/train_supervised_gan.json``.

    Batches are ``{"image": y, "label": x}`` each ``(B, 1, D, H, W)`` (``default_prepare_batch``). The output holds ``image``, ``label``, ``pred``
    = G(y), ``loss`` (G + D), and the three loss terms under MONAI's ``AdversarialKeys``; with
    ``decollate=True`` it becomes a list of per-sample dicts like ``SupervisedTrainer``'s.
    """

    def __init__(self, *args: Any, adversarial_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adversarial_weight = float(adversarial_weight)

    def _complete_state_dict_user_keys(self) -> None:
        """Keep the networks and optimizers out of the trainer's ``state_dict``.

        ``AdversarialTrainer`` adds them, and ignite's ``Engine.load_state_dict`` then *replaces*
        ``state.g_network`` (and the rest) by the unpickled copies from the checkpoint: after a resume
        the trainer would train a copy while the evaluator and ``BestModelSaver`` hold the original.
        Checkpoint them as separate entries instead (``ResumableCheckpoint``'s ``save_dict``), which
        load in place.
        """

    def _iteration(self, engine: AdversarialTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        g_net, d_net = engine.state.g_network, engine.state.d_network
        device_type = torch.device(engine.state.device).type

        # (1) generator step, D frozen
        g_net.train()
        _set_requires_grad((d_net,), False)
        engine.state.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=device_type, enabled=bool(engine.amp), **engine.amp_kwargs):
            fakes = engine.g_inferer(inputs, g_net, *args, **kwargs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            recon = engine.state.recon_loss_function(fakes.float(), targets).mean()
            g_adv = engine.state.g_loss_function(engine.d_inferer(fakes.float(), d_net, *args, **kwargs)).mean()
            g_loss = recon + self.adversarial_weight * g_adv
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        _backward_step(g_loss, engine.state.g_optimizer, engine.state.g_scaler, update=True)
        _release_grads(engine.state.g_optimizer, engine.optim_set_to_none)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        # (2) discriminator step: ground truth x is real, G(y) fake
        _set_requires_grad((d_net,), True)
        d_net.train()
        engine.state.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=device_type, enabled=bool(engine.amp), **engine.amp_kwargs):
            real_logits = engine.d_inferer(targets.contiguous(), d_net, *args, **kwargs)
            fake_logits = engine.d_inferer(fakes.detach().float().contiguous(), d_net, *args, **kwargs)
            d_loss = engine.state.d_loss_function(real_logits, fake_logits).mean()
        _backward_step(d_loss, engine.state.d_optimizer, engine.state.d_scaler, update=True)
        _release_grads(engine.state.d_optimizer, engine.optim_set_to_none)

        engine.state.output = {
            CommonKeys.IMAGE: inputs,
            CommonKeys.LABEL: targets,
            CommonKeys.PRED: fakes.detach(),
            CommonKeys.LOSS: (g_loss + d_loss).detach(),
            AdversarialKeys.RECONSTRUCTION_LOSS: recon.detach(),
            AdversarialKeys.GENERATOR_LOSS: g_adv.detach(),
            AdversarialKeys.DISCRIMINATOR_LOSS: d_loss.detach(),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollation and postprocessing hook here
        return engine.state.output
