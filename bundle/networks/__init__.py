"""Networks of the cycleGAN with a blur kernel: G (``DeblurUNet``, ``RLGuidedUNet``), h (``PSFLayer`` with a kernel from
:mod:`bundle.networks.kernels`), φ/ψ (discriminators)."""

from bundle.networks.discriminator import MultiScalePatchDiscriminator
from bundle.networks.generator import DeblurUNet
from bundle.networks.kernels import (
    BornWolfKernel,
    ConstrainedKernel,
    FixedKernel,
    FreeKernel,
    VectorialPSFKernel,
)
from bundle.networks.noise import PoissonGaussianNoise, Recorruption
from bundle.networks.psf_layer import PSFLayer
from bundle.networks.rl_guided import RLGuidedUNet

__all__ = [
    "BornWolfKernel",
    "ConstrainedKernel",
    "DeblurUNet",
    "FixedKernel",
    "FreeKernel",
    "MultiScalePatchDiscriminator",
    "PoissonGaussianNoise",
    "Recorruption",
    "PSFLayer",
    "RLGuidedUNet",
    "VectorialPSFKernel",
]
