"""The inference pipeline as a MONAI ``Inferer``: ``inferer(inputs, network)`` as model-zoo bundles call it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from torch import nn

from bundle.flags import as_flag
from bundle.inference.deconvolver import Deconvolver
from bundle.inference.flips import check_flips


class TiledInferer(Inferer):
    """MONAI ``Inferer`` running a network over a whole volume the way :class:`Deconvolver` does.

    The ``inferer`` of ``configs/inference.json`` (``SupervisedEvaluator(network=@network,
    inferer=@inferer)``, the model zoo's and MONAI Label's wiring) and of validation: both see the
    same windows, halo and padding, so a window-free generator is scored on exactly what users get.
    The :class:`Deconvolver` it runs is built once per network, on the first call, and kept.

    With ``optimize=False`` (validation's setting) the network runs as given, so every call reflects
    its current weights. With ``optimize=True`` (inference) the first call rewrites the network for
    speed (:class:`InferenceNetwork`) from the weights it has *then*: load the checkpoint first (the
    evaluator's ``CheckpointLoader`` runs at ``STARTED``, before any call), or call :meth:`reset`.

    Args:
        window_inferer: a ``SlidingWindowInferer`` whose settings (overlap, blending, batch, devices,
            progress bar) the windows use (``common.json``'s ``window_inferer``); None: the
            :class:`Deconvolver` defaults.
        roi_size: window ``(D, H, W)``, ``"auto"`` (planned per volume within ``max_pass_voxels``) or
            None (the ``window_inferer``'s window).
        halo: as :class:`Deconvolver` (``"auto"``: the network's ``tiling_halo``).
        sw_batch_size: windows per forward pass (used without a ``window_inferer``).
        max_pass_voxels: as :class:`Deconvolver`.
        precision: as :class:`Deconvolver` (only with ``optimize``).
        optimize: rewrite the network for inference (see above).
        allocator: CPU ``malloc`` policy during a call, as :class:`Deconvolver`.
        device: device of the stitched output (None: the input's).
        refinement: applied to each stitched output with its input, e.g.
            :class:`~bundle.classical.PSFRefinement` (Richardson–Lucy started from G's output on the
            whole volume; config keys ``refine_iterations``, ``refine_psf``); None: off.
        flips: XY views averaged (:func:`~bundle.inference.flips.flip_average`; config key
            ``inference_flips``): 1 (validation's setting), 2, 4 or 8 (inference's default).

    Example::

        >>> inferer = TiledInferer(roi_size=(32, 32, 32))
        >>> with torch.no_grad():
        ...     y = inferer(torch.rand(1, 1, 20, 70, 45), g_deblur)  # same shape, in [0, 1]
    """

    def __init__(
        self,
        window_inferer: SlidingWindowInferer | None = None,
        roi_size: Sequence[int] | str | None = "auto",
        halo: int | str = "auto",
        sw_batch_size: int = 2,
        max_pass_voxels: int = 1 << 22,
        precision: str = "float32",
        optimize: bool = False,
        allocator: str = "system",
        device: torch.device | str | None = None,
        refinement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        flips: int = 1,
    ) -> None:
        super().__init__()
        self.refinement, self.flips = refinement, check_flips(flips)
        self.window_inferer, self.roi_size, self.halo = window_inferer, roi_size, halo
        self.sw_batch_size, self.max_pass_voxels = int(sw_batch_size), int(max_pass_voxels)
        self.precision, self.optimize = precision, as_flag(optimize, "optimize")
        self.allocator, self.device = allocator, device
        self._deconvolvers: dict[int, Deconvolver] = {}

    def deconvolver_for(self, network: nn.Module) -> Deconvolver:
        """The :class:`Deconvolver` of ``network`` (built on the first request, then kept)."""
        key = id(network)
        if key not in self._deconvolvers:
            self._deconvolvers[key] = Deconvolver(
                network,
                inferer=self.window_inferer,
                roi_size=self.roi_size,
                halo=self.halo,
                sw_batch_size=self.sw_batch_size,
                max_pass_voxels=self.max_pass_voxels,
                precision=self.precision if self.optimize else "float32",
                optimize=self.optimize,
                device=self.device,
                allocator=self.allocator,
                flips=self.flips,
            )
        return self._deconvolvers[key]

    def reset(self) -> None:
        """Forget the built deconvolvers (after loading new weights into an optimised network)."""
        self._deconvolvers.clear()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``(B, 1, D, H, W)`` in [0, 1] -> the network's output of the same shape (then refined)."""
        outputs = self.deconvolver_for(network)(inputs)
        return outputs if self.refinement is None else self.refinement(inputs, outputs)
