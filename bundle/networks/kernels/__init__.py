"""PSF kernels for :class:`bundle.networks.PSFLayer`, one class per parameterisation.

Each is an ``nn.Module`` whose ``forward()`` returns the ``(Z, Y, X)`` kernel and which carries
``shape`` and ``voxel_size``; the layer applies it with a gain and an offset. A config chooses one by
its ``_target_`` (``blur#kernel``), e.g. ``configs/psf_vectorial.json`` or ``configs/train_nonblind.json``:

- :class:`BornWolfKernel`: the scalar paraxial PSF of the paper (eq. 23) with a learned NA (default
  of blind training);
- :class:`VectorialPSFKernel`: the vectorial high-NA model with learned NA and spherical aberration,
  optionally refined by a residual kernel;
- :class:`FixedKernel`: a given PSF, not trained (non-blind);
- :class:`FreeKernel`: raw learnable weights (the paper's blur generator);
- :class:`ConstrainedKernel`: learnable, non-negative and unit-sum by a softmax.

Optional methods the rest of the bundle uses when present: ``mirror_z_()``, ``set_na_(na)``,
``physical_parameters()``, and the attribute ``n_immersion``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from bundle.networks.kernels.born_wolf import BORN_WOLF_LEARNABLE, BornWolfKernel
from bundle.networks.kernels.stored import ConstrainedKernel, FixedKernel, FreeKernel, initial_psf
from bundle.networks.kernels.vectorial import VECTORIAL_LEARNABLE, VectorialPSFKernel

__all__ = [
    "BornWolfKernel",
    "ConstrainedKernel",
    "FixedKernel",
    "FreeKernel",
    "VectorialPSFKernel",
    "BORN_WOLF_LEARNABLE",
    "VECTORIAL_LEARNABLE",
    "KERNELS",
    "initial_psf",
    "make_kernel",
]

KERNELS: dict[str, type[nn.Module]] = {
    "parametric": BornWolfKernel,
    "vectorial": VectorialPSFKernel,
    "fixed": FixedKernel,
    "free": FreeKernel,
    "constrained": ConstrainedKernel,
}


def make_kernel(
    parameterization: str,
    shape: Sequence[int] = (31, 31, 31),
    init: str = "gaussian",
    **kwargs: Any,
) -> nn.Module:
    """Build a kernel by name: a shorthand for Python users (configs name the class by ``_target_``).

    Args:
        parameterization: a key of :data:`KERNELS`: ``"parametric"`` (Born & Wolf), ``"vectorial"``,
            ``"fixed"``, ``"free"`` or ``"constrained"``.
        shape: kernel size ``(Z, Y, X)``.
        init: starting kernel of the stored kernels (fixed/free/constrained): ``"gaussian"`` (of
            ``init_fwhm``), ``"born_wolf"`` or ``"vectorial"`` (at ``na``, ``n_immersion``,
            ``wavelength``) or ``"file"`` (``psf_file``). Not used by the optical kernels.
        kwargs: the class's own arguments (``na``, ``voxel_size``, ``learn``, ...); for the stored
            kernels also ``na``, ``n_immersion``, ``wavelength`` (for ``init``) and ``psf_file``.

    Example::

        >>> make_kernel("constrained", (9, 9, 9), init="born_wolf", na=1.2)
        ConstrainedKernel(shape=(9, 9, 9), voxel_size=(0.1, 0.1, 0.1), source='array')
    """
    if parameterization not in KERNELS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {tuple(KERNELS)}")
    cls = KERNELS[parameterization]
    if cls in (BornWolfKernel, VectorialPSFKernel):
        stray = sorted(k for k in ("init_fwhm", "psf_file") if k in kwargs) + (["init"] if init != "gaussian" else [])
        if stray:
            raise ValueError(f"{stray} set the start of a stored kernel; the {parameterization!r} kernel renders its own")
        return cls(shape=shape, **kwargs)
    optics = {k: kwargs.pop(k) for k in ("na", "n_immersion", "wavelength") if k in kwargs}
    psf_file = kwargs.pop("psf_file", None)
    voxel_size = kwargs.get("voxel_size", (0.1, 0.1, 0.1))
    if init == "gaussian":
        psf = None
    elif init == "file":
        if not psf_file:
            raise ValueError("init='file' needs psf_file (a PSF stack, e.g. a TIFF)")
        psf = psf_file
    elif init in ("born_wolf", "vectorial"):
        from bundle.physics import psf as psf_models

        na, n_immersion = optics.get("na", 1.4), optics.get("n_immersion", 1.5)
        if not 0.0 < na < n_immersion:
            raise ValueError(f"na must satisfy 0 < na < n_immersion ({n_immersion}), got na={na}")
        model = psf_models.born_wolf_psf if init == "born_wolf" else psf_models.vectorial_psf
        psf = model(shape, na=na, n_immersion=n_immersion, wavelength=optics.get("wavelength", 0.5), voxel_size=voxel_size)
    else:
        raise ValueError(f"unknown init {init!r}; choose one of ('gaussian', 'born_wolf', 'vectorial', 'file')")
    return cls(psf=psf, shape=shape, **kwargs)
