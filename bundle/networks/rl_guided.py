"""A generator that sees a few Richardson–Lucy iterations of its input beside the input itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bundle.classical.richardson_lucy import _as_psf_tensor, richardson_lucy
from bundle.networks.generator import DeblurUNet

__all__ = ["NOT_EXPORTABLE", "RLGuidedUNet"]

# why the exports (TorchScript, model zoo, bioimage.io) refuse a guided model; callers prefix the file
NOT_EXPORTABLE = (
    "an RL-guided generator (configs/rl_guided.json) runs Richardson–Lucy inside the network, which TorchScript "
    "cannot compile and plain-U-Net consumers cannot run; train without configs/rl_guided.json to export a model"
)


class RLGuidedUNet(DeblurUNet):
    """``DeblurUNet`` whose second input channel is Richardson–Lucy deconvolution of its input.

    ``G(y) = UNet([y, RL_k(y; h)])``: the U-Net starts from what the known PSF already tells (RL with
    ``rl_iterations`` iterations, no autograd) and learns to correct it — the noise RL amplifies, the
    structure it cannot restore — instead of learning the inverse of a wide, aberrated PSF from
    scratch. Opt-in (``configs/rl_guided.json``, non-blind mode): at 400 iterations on the vesicle
    domain it lifts the non-blind test PSNR from 28.76 ± 0.20 to 29.42 ± 1.29 dB (three seeds), but
    each training iteration costs 2.5x on the CPU and the plain U-Net trained for the same time is
    far ahead (``docs/results.md``, session 13). Written here because no library has a physics-guided
    3D generator of this kind; RL itself is the bundle's :func:`~bundle.classical.richardson_lucy`.

    The PSF travels in the state dict (buffer ``guide_psf``, with ``guide_iterations``), so
    ``model.pt`` alone rebuilds the network (:func:`bundle.inference.network_from_state_dict`).
    RL runs on whatever the network is given: a training crop, or an inference window with its
    halo (mirror-padded at the volume's faces, reflect-padded by half the PSF inside RL). Unlike the
    plain U-Net its output therefore depends on the window plan (measured: 37.9 dB between two plans
    of a trained model): RL's reach is not bounded by the :attr:`receptive_radius` (that of the
    U-Net, used for the inference halo). TorchScript cannot compile it (the exports refuse it).

    Args:
        psf: the PSF ``(Z, Y, X)`` (array or tensor; normalised to sum 1), e.g. the non-blind blur
            path's kernel (``"$@blur_path.kernel().detach().cpu()"``, as ``configs/rl_guided.json``).
            Exactly one of ``psf`` and ``psf_file`` is given.
        psf_file: a TIFF stack holding the PSF, at the data's voxel size.
        rl_iterations: RL iterations computed for the guide channel (>= 1); each costs two FFT
            convolutions of the input's size plus the PSF.
        kwargs: the :class:`DeblurUNet` arguments (``in_channels`` is 2 here and not an argument).

    Shapes: input ``(B, 1, D, H, W)`` (sides divisible by ``2**depth``), output ``(B, 1, D, H, W)``.
    """

    __jit_unused_properties__ = DeblurUNet.__jit_unused_properties__

    def __init__(
        self,
        psf: np.ndarray | torch.Tensor | None = None,
        psf_file: str | None = None,
        rl_iterations: int = 40,
        **kwargs: Any,
    ) -> None:
        if (psf is None) == (psf_file is None):
            raise ValueError("RLGuidedUNet: give exactly one of psf and psf_file")
        if int(rl_iterations) < 1:
            raise ValueError(f"RLGuidedUNet: rl_iterations must be >= 1, got {rl_iterations}")
        if kwargs.pop("in_channels", 2) != 2:
            raise ValueError("RLGuidedUNet takes a one-channel input (its U-Net sees it and its RL channel)")
        super().__init__(in_channels=2, **kwargs)
        if psf_file is not None:
            import tifffile

            try:
                psf = np.squeeze(tifffile.imread(psf_file))
            except (OSError, ValueError) as e:
                raise ValueError(f"{psf_file}: cannot read the PSF for the RL-guided generator ({e})") from e
        self.register_buffer("guide_psf", _as_psf_tensor(psf, torch.device("cpu"), torch.float32))  # sum 1
        self.register_buffer("guide_iterations", torch.tensor(int(rl_iterations)))

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The RL channel: ``(B, 1, D, H, W)`` -> ``(B, 1, D, H, W)`` float32, without autograd."""
        with torch.no_grad():
            psf = self.guide_psf.to(device=x.device, dtype=torch.float32)
            return richardson_lucy(x.detach().float(), psf, num_iter=int(self.guide_iterations), pad_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, 1, D, H, W)``. Returns: ``(B, 1, D, H, W)`` in (0, 1) with the sigmoid."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"RLGuidedUNet expects a (B, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
        return super().forward(torch.cat([x, self.guide(x).to(x.dtype)], 1))
