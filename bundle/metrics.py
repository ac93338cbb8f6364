"""Image-quality metrics for deconvolution: PSNR/SSIM in 3D, and the input scored at its best scaling.

PSNR and SSIM themselves come from MONAI (``PSNRMetric``, ``SSIMMetric``); this module adds what MONAI
does not have: the least-squares affine fit that scores a blurred input at its most favourable
intensity scaling, so that a method cannot beat the input by a mere rescaling.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric, PSNRMetric, SSIMMetric

__all__ = [
    "NoReferenceScore",
    "affine_fit",
    "psnr",
    "ssim",
    "dim_structure",
    "AffineFitPSNRMetric",
    "AffineFitSSIMMetric",
    "DataConsistencyMetric",
]


def affine_fit(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ``a * prediction + b`` with ``(a, b)`` the least-squares fit to ``target``, per sample.

    Args:
        prediction: ``(B, C, D, H, W)`` (or any ``(B, ...)``) tensor.
        target: tensor of the same shape.

    Returns:
        Tensor of ``prediction``'s shape, float32 or float64.
    """
    p = prediction.reshape(prediction.shape[0], -1).double()
    t = target.reshape(target.shape[0], -1).double()
    pc = p - p.mean(dim=1, keepdim=True)
    tc = t - t.mean(dim=1, keepdim=True)
    var = (pc * pc).mean(dim=1, keepdim=True)
    a = torch.where(var > 0, (pc * tc).mean(dim=1, keepdim=True) / var.clamp_min(1e-30), torch.zeros_like(var))
    b = t.mean(dim=1, keepdim=True) - a * p.mean(dim=1, keepdim=True)
    return (a * p + b).reshape(prediction.shape).to(prediction.dtype if prediction.is_floating_point() else torch.float32)


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> float:
    """PSNR in dB with ``MAX`` = the dynamic range of the ground truth (the paper's definition).

    Args:
        prediction: ``(D, H, W)`` or ``(B, C, D, H, W)`` tensor.
        target: ground truth, same shape.
        data_range: ``MAX``; default ``target.max() - target.min()``.
    """
    pred, tgt = _batched(prediction), _batched(target)
    rng = float(tgt.max() - tgt.min()) if data_range is None else float(data_range)
    return float(PSNRMetric(max_val=rng)(pred.float(), tgt.float()).mean())


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> float:
    """3D SSIM (k1 = 0.01, k2 = 0.03, Gaussian window) via MONAI's ``SSIMMetric``; shapes as :func:`psnr`."""
    pred, tgt = _batched(prediction), _batched(target)
    rng = float(tgt.max() - tgt.min()) if data_range is None else float(data_range)
    win = max(3, min(7, *[s if s % 2 else s - 1 for s in tgt.shape[2:]]))
    metric = SSIMMetric(spatial_dims=3, data_range=rng, win_size=win, k1=0.01, k2=0.03)
    return float(metric(pred.float(), tgt.float()).mean())


def dim_structure(
    prediction: torch.Tensor,
    target: torch.Tensor,
    low: float = 0.05,
    high: float = 0.3,
    keep: float = 0.5,
    fit: bool = True,
) -> dict[str, float]:
    """How much faint structure an output keeps: recall of dim truth voxels, and its precision.

    A PSNR can rise while dim filaments vanish (they hold little energy), so this scores them alone.
    With ``m`` the truth's maximum (after ``prediction`` is mapped onto ``target`` by
    :func:`affine_fit` when ``fit``, as PSNR is):

    - *dim truth voxels*: ``low·m <= target <= high·m``;
    - ``recall``: the share of them that the output brings back to at least ``keep`` × their value;
    - ``precision``: of the output voxels in the same dim band, the share where the truth is not
      background (``target >= low·m``); output dim where the truth is empty counts against it.

    Args:
        prediction: ``(D, H, W)`` or ``(B, C, D, H, W)``.
        target: ground truth, same shape.
        low, high: the dim band as fractions of the truth's maximum (default 5-30 %).
        keep: fraction of the true value a dim voxel must reach to count as recovered.
        fit: map ``prediction`` onto ``target`` by the least-squares affine fit first.

    Returns:
        ``{"dim_recall", "dim_precision", "dim_voxels"}`` (NaN where a share has no voxel).
    """
    pred, tgt = _batched(prediction).double(), _batched(target).double()
    if fit:
        pred = affine_fit(pred, tgt)
    m = float(tgt.max())
    dim = (tgt >= low * m) & (tgt <= high * m)
    n_dim = int(dim.sum())
    recall = float((pred[dim] >= keep * tgt[dim]).double().mean()) if n_dim else float("nan")
    out_dim = (pred >= low * m) & (pred <= high * m)
    n_out = int(out_dim.sum())
    precision = float((tgt[out_dim] >= low * m).double().mean()) if n_out else float("nan")
    return {"dim_recall": recall, "dim_precision": precision, "dim_voxels": n_dim}


def _batched(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x[None, None] if x.ndim == 3 else x


class AffineFitPSNRMetric(PSNRMetric):
    """MONAI ``PSNRMetric`` of ``y_pred`` after its least-squares affine fit to ``y``.

    Scores a blurred input at its most favourable intensity scaling; use it as the baseline a
    deconvolution has to beat. Args as ``monai.metrics.PSNRMetric``.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return super()._compute_tensor(affine_fit(y_pred, y), y)


class AffineFitSSIMMetric(SSIMMetric):
    """MONAI ``SSIMMetric`` of ``y_pred`` after its least-squares affine fit to ``y``; args as ``SSIMMetric``."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return super()._compute_tensor(affine_fit(y_pred, y), y)


class DataConsistencyMetric(CumulativeIterationMetric):
    """No-reference score: the output re-blurred, against the input, in units of the noise variance.

    ``mean((y − h(G(y)))²) / mean(var(h(G(y))))`` per volume, with ``h`` the blur path (PSF layer,
    with its gain and offset) and ``var`` the blur path's Poisson–Gaussian noise model
    (``inv_photons · max(h(G(y)) − black_level, 0) + sigma²``). About 1 when G's output explains
    the blurred input to its noise level; above 1 when it lost structure (or the PSF is wrong); below
    1 when it fits the noise. Needs no ground truth, so it can be logged on held-out blurred stacks
    (the own-data workflow); it ignores the label. Written here because MONAI's metrics all compare
    with a reference.

    Args:
        blur: the PSF layer ``h`` (``(B, 1, D, H, W) → (B, 1, D, H, W)``); ``None`` (supervised
            training has no blur path): the score is NaN.
        noise: the blur path's :class:`~bundle.networks.PoissonGaussianNoise` (``None``: variance 1,
            i.e. the plain mean squared misfit).
    """

    def __init__(self, blur: torch.nn.Module | None, noise: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.blur = blur
        self.noise = noise

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        """``y_pred``: G's output ``(B, 1, D, H, W)``; ``y``: the blurred input it was computed from."""
        if self.blur is None:
            return torch.full((y.shape[0], 1), float("nan"), dtype=torch.float64)
        device = next(self.blur.parameters(), torch.empty(0)).device
        with torch.no_grad():
            reblurred = self.blur(y_pred.to(device=device, dtype=torch.float32)).to(y.device, torch.float64)
        misfit = ((y.double() - reblurred) ** 2).flatten(1).mean(dim=1)
        if self.noise is None:
            return misfit[:, None]
        inv_photons, sigma, black = (float(getattr(self.noise, n)) for n in ("inv_photons", "sigma", "black"))
        variance = (inv_photons * (reblurred - black).clamp(min=0) + sigma**2).flatten(1).mean(dim=1)
        return (misfit / variance.clamp(min=1e-12))[:, None]

    def aggregate(self) -> torch.Tensor:
        """Mean over the volumes seen."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        return data.float().mean()


class NoReferenceScore(DataConsistencyMetric):
    """No-reference model-selection score: ``−|ln c|`` with ``c`` the :class:`DataConsistencyMetric`.

    ``c ≈ 1`` when the re-blurred output explains the blurred input to its noise level; ``c > 1``
    when structure is lost (a washed-out or dark output) or the PSF is wrong; ``c < 1`` when the
    output fits the noise. The score is highest (0) at ``c = 1`` and falls symmetrically in
    ``ln c`` on both sides, so the best checkpoint is the one whose output is most consistent with
    the data, neither under- nor over-fitted. Averaged per volume. Given the input itself as the
    prediction (``from_engine(['image', 'image'])``) it is the input's baseline, which the collapse
    guard compares the output with when there is no ground truth.

    Args:
        blur: the PSF layer (see :class:`DataConsistencyMetric`).
        noise: the blur path's noise model.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        c = super()._compute_tensor(y_pred, y)
        return -torch.log(c.clamp(min=1e-12)).abs()
