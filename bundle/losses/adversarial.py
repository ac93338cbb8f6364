"""Adversarial losses: LS-GAN (the paper's), WGAN-GP, and unpaired feature matching.

Discriminator outputs are lists of per-scale patch logits ``(B, 1, d, h, w)`` as returned by
:class:`bundle.networks.MultiScalePatchDiscriminator` (a single tensor is accepted as a one-scale
list); no activation is applied to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = ["LSGANLoss", "WGANGPLoss", "FeatureMatchingLoss", "adversarial_loss"]

Preds = Sequence[torch.Tensor] | torch.Tensor


def _as_list(preds: Preds) -> list[torch.Tensor]:
    return [preds] if isinstance(preds, torch.Tensor) else list(preds)


class LSGANLoss:
    """Least-squares GAN loss (Mao et al. 2017) averaged over discriminator scales; the paper's default.

    Eq. (22) of Lim et al. shows that the WGAN loss with a quadratic penalty on the potential's
    magnitude (η = ½) is the LS-GAN loss. Wraps ``monai.losses.PatchAdversarialLoss(criterion=
    "least_squares", no_activation_leastsq=True, reduction="mean")``: the mean squared error to the
    label per scale, then the mean over scales. Labels are 1 (real) and ``fake_label`` (0 by
    default, as in CycleGAN and MONAI; eq. (22) as written uses −1, an affine re-labelling of the
    same objective).

    - generator: ``mean_s mean (D_s(G(y)) − 1)²``
    - discriminator: ``½ [mean_s mean (D_s(x) − 1)² + mean_s mean (D_s(G(y)) − fake_label)²]``;
      the ½ is the usual pix2pix/CycleGAN convention that slows D relative to G.

    Args:
        fake_label: target of fake samples for the discriminator (0.0, or −1.0 for eq. 22 literally).

    Example::

        >>> adv = LSGANLoss()
        >>> loss_g = adv.generator_loss(d_sharp(fake_sharp))
        >>> loss_d = adv.discriminator_loss(d_sharp(real_sharp), d_sharp(fake_sharp.detach()))
    """

    def __init__(self, fake_label: float = 0.0) -> None:
        self.loss = PatchAdversarialLoss(
            criterion="least_squares", no_activation_leastsq=True, reduction="mean"
        )
        self.loss.fake_label = float(fake_label)

    def generator_loss(self, fake_preds: Preds) -> torch.Tensor:
        """Args: fake_preds: per-scale logits of D on generated samples. Returns: scalar."""
        return self.loss(_as_list(fake_preds), target_is_real=True, for_discriminator=False)

    def discriminator_loss(self, real_preds: Preds, fake_preds: Preds) -> torch.Tensor:
        """Args: real_preds / fake_preds: per-scale logits of D on real / generated samples. Returns: scalar."""
        real = self.loss(_as_list(real_preds), target_is_real=True, for_discriminator=True)
        fake = self.loss(_as_list(fake_preds), target_is_real=False, for_discriminator=True)
        return 0.5 * (real + fake)


class WGANGPLoss:
    """Wasserstein GAN loss with gradient penalty (Gulrajani et al. 2017); eq. (19) of Lim et al.

    - generator: ``−mean_s mean D_s(G(y))``
    - critic: ``mean_s [mean D_s(G(y)) − mean D_s(x)]`` (minimised), plus :meth:`gradient_penalty`
      ``η · Σ_s mean_b (‖∇_x̃ D_s(x̃)‖₂ − 1)²`` at ``x̃ = αx + (1−α)G(y)``, ``α ~ U[0, 1]`` per sample.

    Example::

        >>> adv = WGANGPLoss()
        >>> loss_d = adv.discriminator_loss(d(real), d(fake)) + adv.gradient_penalty(d, real, fake)
    """

    def generator_loss(self, fake_preds: Preds) -> torch.Tensor:
        """Args: fake_preds: per-scale critic outputs on generated samples. Returns: scalar."""
        return -torch.stack([p.mean() for p in _as_list(fake_preds)]).mean()

    def discriminator_loss(self, real_preds: Preds, fake_preds: Preds) -> torch.Tensor:
        """Args: real_preds / fake_preds: per-scale critic outputs. Returns: scalar (without penalty)."""
        real = torch.stack([p.mean() for p in _as_list(real_preds)]).mean()
        fake = torch.stack([p.mean() for p in _as_list(fake_preds)]).mean()
        return fake - real

    @staticmethod
    def gradient_penalty(
        discriminator: Callable[[torch.Tensor], Preds],
        real: torch.Tensor,
        fake: torch.Tensor,
        weight: float = 10.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Gradient penalty of eq. (19), summed over the discriminator's scales.

        Args:
            discriminator: callable mapping ``(B, C, D, H, W)`` to a tensor or a list of per-scale outputs.
            real: ``(B, C, D, H, W)`` real samples x.
            fake: ``(B, C, D, H, W)`` generated samples G(y) (detached inside).
            weight: η, the penalty weight (10 in Gulrajani et al.).
            generator: optional ``torch.Generator`` for α.

        Returns:
            scalar tensor, differentiable w.r.t. the discriminator's parameters.
        """
        real = real.detach()
        alpha = torch.rand(
            real.shape[0], *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype, generator=generator
        )
        x_tilde = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
        penalty = real.new_zeros(())
        for out in _as_list(discriminator(x_tilde)):
            (grad,) = torch.autograd.grad(out.sum(), x_tilde, create_graph=True)
            norm = grad.flatten(1).norm(2, dim=1)
            penalty = penalty + ((norm - 1) ** 2).mean()
        return weight * penalty


class FeatureMatchingLoss(nn.Module):
    """Unpaired feature matching (Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016).

    G matches the discriminator's mean features on generated crops to those on real crops, instead
    of (or besides) making each generated patch score as real:
    ``mean_s mean_l mean_c |E_{b,v} f_{s,l,c}(x) − E_{b,v} f_{s,l,c}(G(y))|`` over scales ``s``, the
    PatchGAN's layers ``l`` before the logits, channels ``c``, with the expectation over the batch
    and the voxels ``v``; the real features are detached. A patch-wise adversarial loss rewards G for
    leaving out what it cannot yet render convincingly (faint structure may go for a clean
    background); matching the features' means over many patches penalises that, because fewer faint
    objects change the statistics. Written here: MONAI's and pix2pixHD's feature-matching losses
    compare *paired* feature maps position by position, which needs a ground truth this unpaired
    method does not have.

    Args:
        weight: factor of the loss.

    Example::

        >>> fm = FeatureMatchingLoss(weight=0.01)
        >>> loss = fm(d_sharp.features(real_sharp), d_sharp.features(fake_sharp))
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(
        self, real: Sequence[Sequence[torch.Tensor]], fake: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Args:
            real: per scale, the layer outputs ``(B, C_l, ...)`` on real crops (logits last, unused).
            fake: the same on generated crops; shapes may differ from ``real`` in batch and size.

        Returns: the weighted scalar loss (float32).
        """
        if len(real) != len(fake) or not real:
            raise ValueError(f"expected the same number of scales (≥ 1), got {len(real)} and {len(fake)}")
        per_scale = []
        for r_layers, f_layers in zip(real, fake, strict=True):
            pairs = list(zip(r_layers, f_layers, strict=True))
            layers = pairs[:-1] or pairs  # the logits are left out unless they are all there is
            terms = []
            for r, f in layers:
                dims = [0] + list(range(2, r.ndim))
                terms.append((r.detach().float().mean(dim=dims) - f.float().mean(dim=dims)).abs().mean())
            per_scale.append(torch.stack(terms).mean())
        return self.weight * torch.stack(per_scale).mean()


def adversarial_loss(kind: str = "lsgan") -> LSGANLoss | WGANGPLoss:
    """Build the adversarial loss by name: ``"lsgan"`` (the paper's default) or ``"wgan-gp"``."""
    key = kind.lower().replace("_", "-")
    if key in ("lsgan", "ls-gan", "least-squares"):
        return LSGANLoss()
    if key in ("wgan-gp", "wgangp", "wgan"):
        return WGANGPLoss()
    raise ValueError(f"unknown adversarial loss {kind!r}; expected 'lsgan' or 'wgan-gp'")
