"""The cycleGAN trainer: one Ignite/MONAI ``Trainer`` whose ``_iteration`` is the paper's Algorithm.

Paper symbols → code names (Lim et al., IEEE TCI 2020, Sec. II):
    x (sharp, domain X)   → ``batch["sharp"]``        y (blurred, domain Y) → ``batch["blurred"]``
    G (deblurring U-Net)  → ``g_deblur``              h (PSF layer, blur)   → ``blur``
    φ (discriminator on X)→ ``d_sharp``               ψ (discriminator on Y)→ ``d_blurred`` (blind only)
    γ (cycle weight)      → ``cycle_loss.weight``

Blind mode: ``blur`` is learnable and ``d_blurred`` is given. Non-blind mode: ``blur`` is fixed to a
known PSF (its gain/offset may still learn) and ``d_blurred`` is ``None``. The conventional cycleGAN
baseline uses the same trainer with a second deep U-Net as ``blur``.

Modules: :mod:`~bundle.engine.modes` (the declared training mode, checked against the configs),
:mod:`~bundle.engine.steps` (batch preparation and the optimiser-step helpers that keep memory low),
:mod:`~bundle.engine.cyclegan` (:class:`CycleGANTrainer`), :mod:`~bundle.engine.params` (its parameter groups) and
:mod:`~bundle.engine.supervised_gan` (the supervised LS-GAN baseline). Everything public is importable
from ``bundle.engine``.
"""

from bundle.engine.cyclegan import CycleGANTrainer
from bundle.engine.modes import MODES, check_mode
from bundle.engine.params import discriminator_parameters, generator_param_groups
from bundle.engine.steps import CycleGANKeys, prepare_unpaired_batch
from bundle.engine.supervised_gan import SupervisedGANTrainer

__all__ = [
    "MODES",
    "CycleGANKeys",
    "CycleGANTrainer",
    "SupervisedGANTrainer",
    "prepare_unpaired_batch",
    "generator_param_groups",
    "discriminator_parameters",
    "check_mode",
]
