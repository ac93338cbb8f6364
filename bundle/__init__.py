"""MONAI bundle: unsupervised 3D deconvolution microscopy with a cycleGAN and a learnable blur kernel.

Implements Lim, Park, Lee, Chang, Sim, Ye, "CycleGAN with a Blur Kernel for Deconvolution Microscopy:
Optimal Transport Geometry", IEEE TCI 2020. Configs refer to components as ``bundle.<module>.<name>``
after ``"$import bundle"``, so the submodules are imported here.
"""

from bundle import (  # noqa: F401
    data,
    distributed,
    engine,
    errors,
    evaluate,
    flags,
    handlers,
    image_pool,
    inference,
    io,
    losses,
    metrics,
    networks,
    ooc,
    ops,
    physics,
    sampling,
    simulate,
    stability,
)
from bundle.physics import forward, phantom, psf  # noqa: F401

__version__ = "0.1.0"

errors.install_excepthook()  # a failed command-line run ends with the real message (bundle.errors)
