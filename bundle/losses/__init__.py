"""Losses of the cycleGAN with a blur kernel: LS-GAN, WGAN-GP, feature matching and the L1 cycle-consistency loss.

Lim et al., "CycleGAN with a Blur Kernel for Deconvolution Microscopy: Optimal Transport
Geometry", IEEE TCI 2020, Sec. II. ``bundle.losses.adversarial`` holds the discriminator-side losses,
``bundle.losses.cycle`` the cycle-consistency ones; both are re-exported here (the configs' paths).
"""

from bundle.losses.adversarial import FeatureMatchingLoss, LSGANLoss, WGANGPLoss, adversarial_loss
from bundle.losses.cycle import CycleLoss, DiscrepancyCycleLoss, HighPassCycleLoss

__all__ = [
    "LSGANLoss",
    "WGANGPLoss",
    "FeatureMatchingLoss",
    "CycleLoss",
    "DiscrepancyCycleLoss",
    "HighPassCycleLoss",
    "adversarial_loss",
]
