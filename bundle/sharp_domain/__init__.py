"""Where the sharp domain comes from when the user has no sharp volumes: their own stacks, deconvolved, or the simulator.

The paper trained on real data against sharp volumes made by a commercial deconvolution package
from the same kind of stacks. :class:`ClassicalSharpDomain` does that with the bundle's
Richardson–Lucy (:func:`bundle.classical.richardson_lucy`) and a theoretical PSF from the optics keys
(or a measured PSF file), and stops each stack's iterations by Morozov's discrepancy principle: at
the first iteration whose data misfit ``mean((y − h * x_k)²)`` falls to the noise variance that
:func:`bundle.physics.noise_estimation.estimate_poisson_gaussian` measures on that stack (further
iterations would fit the noise), or, when the PSF model cannot bring the misfit that low (a wrong
NA, aberrations, a background the model lacks), at the first iteration where the misfit stalls
(relative decrease below ``stall_tol``). No ground truth is needed. Results are cached next to a record of
how they were made, and reused while the source file and the settings are unchanged.

:class:`SimulatedSharpDomain` instead renders the bundle's phantoms (filaments or vesicles and
puncta) at the user's voxel size, with their physical sizes kept.

In a config (``configs/sharp_from_rl.json``)::

    "sharp_domain": {"_target_": "bundle.sharp_domain.ClassicalSharpDomain", "blurred_dir": ..., ...},
    "train#dataset#sharp_dir": "$@sharp_domain.files()"
"""

from bundle.sharp_domain.classical import ClassicalSharpDomain
from bundle.sharp_domain.simulated import SimulatedSharpDomain

__all__ = ["ClassicalSharpDomain", "SimulatedSharpDomain"]
