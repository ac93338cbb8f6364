"""Networks of the cycleGAN with a blur kernel: G (``DeblurUNet``), h (``PSFLayer``), φ/ψ (discriminators)."""

from bundle.networks.discriminator import MultiScalePatchDiscriminator
from bundle.networks.generator import DeblurUNet
from bundle.networks.noise import PoissonGaussianNoise
from bundle.networks.psf_layer import PSFLayer

__all__ = ["DeblurUNet", "MultiScalePatchDiscriminator", "PoissonGaussianNoise", "PSFLayer"]
