"""The supervised LS-GAN baseline's trainer (the paper's supervised comparison)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.engines import AdversarialTrainer
from monai.engines.utils import IterationEvents
from monai.utils import AdversarialKeys
from monai.utils.enums import CommonKeys

from bundle.engine.steps import _backward_step, _release_grads, _set_requires_grad

logger = logging.getLogger(__name__)


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
