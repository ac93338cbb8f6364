"""Scores without a ground truth, for the user's own stacks: data consistency, cycle error, PSF stability, resolution."""

from __future__ import annotations

import logging
import math

import torch
from monai.metrics import CumulativeIterationMetric

logger = logging.getLogger(__name__)


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


class CycleErrorMetric(CumulativeIterationMetric):
    """No-reference, discriminator-free cycle error on the sharp side: ``x̂ → h x̂ → G(h x̂) ≈ x̂``.

    With ``x̂ = G(y)`` the output on a held-out blurred stack (no sharp volume needed), the relative
    L1 error ``mean|G(h(x̂)) − x̂| / mean|x̂|`` per volume: low when G inverts the learned blur on its
    own outputs, high when G and h disagree (e.g. G hallucinates structure that h then removes, or
    a collapsed G). It complements :class:`DataConsistencyMetric`, which checks the blurred side.
    Written here because MONAI's metrics compare with a reference.

    Args:
        network: the generator G (the validated one: the EMA weights).
        blur: the PSF layer h.
        inferer: how G is applied to a whole volume (the validation's ``TiledInferer``); ``None``:
            ``network(x)`` directly.
    """

    def __init__(self, network: torch.nn.Module, blur: torch.nn.Module | None, inferer=None) -> None:
        super().__init__()
        self.network, self.blur, self.inferer = network, blur, inferer

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):  # type: ignore[override]
        """``y_pred``: G's output ``(B, 1, D, H, W)``; ``y`` is ignored."""
        if self.blur is None:
            return torch.full((y_pred.shape[0], 1), float("nan"), dtype=torch.float64)
        device = next(self.network.parameters()).device
        with torch.no_grad():
            x = y_pred.to(device=device, dtype=torch.float32)
            reblurred = self.blur(x)
            again = self.inferer(reblurred, self.network) if self.inferer is not None else self.network(reblurred)
        num = (again.double() - x.double()).abs().flatten(1).mean(dim=1)
        return (num / x.double().abs().flatten(1).mean(dim=1).clamp(min=1e-12))[:, None].cpu()

    def aggregate(self) -> torch.Tensor:
        """Mean over the volumes seen."""
        return _mean_of_buffer(self)


class PSFStabilityMetric(CumulativeIterationMetric):
    """No-reference: correlation of the learned PSF with itself at the previous validation.

    Near 1 once the PSF has settled; lower while it still moves (NaN at the first validation,
    which has nothing to compare with). Logged beside the scores so that a model chosen while its
    PSF was still changing can be recognised. It ignores the images; one value per validation.

    Args:
        blur: the PSF layer (has ``kernel()``); a layer without one (the conventional cycleGAN's
            network) gives NaN.
    """

    def __init__(self, blur: torch.nn.Module | None) -> None:
        super().__init__()
        self.blur = blur
        self._previous: torch.Tensor | None = None

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):  # type: ignore[override]
        return torch.zeros((y_pred.shape[0], 1), dtype=torch.float64)

    def aggregate(self) -> torch.Tensor:
        """Correlation of the current kernel with the one at the previous call."""
        if self.blur is None or not hasattr(self.blur, "kernel"):
            return torch.tensor(float("nan"))
        with torch.no_grad():
            kernel = self.blur.kernel().detach().double().cpu().flatten()
        previous, self._previous = self._previous, kernel
        if previous is None or previous.shape != kernel.shape:
            return torch.tensor(float("nan"))
        return torch.corrcoef(torch.stack([previous, kernel]))[0, 1].float()


def _mean_of_buffer(metric: CumulativeIterationMetric) -> torch.Tensor:
    data = metric.get_buffer()
    if not isinstance(data, torch.Tensor):
        raise ValueError("the data to aggregate must be a PyTorch Tensor")
    return data.float().mean()


def decorrelation_resolution(image: torch.Tensor, n_radii: int = 50, n_filters: int = 10) -> float:
    """Resolution (pixels) of a 2D image by decorrelation analysis (Descloux, Grußmayer & Radenovic, 2019).

    The image's spectrum ``F`` is correlated with its phase-only version ``F/|F|`` inside growing
    radii ``r`` (normalised, 1 = Nyquist): ``d(r) = Re Σ_{k<r} F·conj(F_n) / (‖F‖ ‖F_n,k<r‖)``. Noise
    has a flat spectrum, so ``d`` peaks at the radius where signal gives way to noise. The analysis is
    repeated on Gaussian high-pass filtered images (``n_filters`` widths, from the image size down to
    0.15 pixel), and the highest peak radius ``k_c`` among peaks above 0.05 gives the resolution
    ``2 / k_c`` pixels. Simplified from the paper's procedure (no refinement of the radius grid, a
    cosine edge apodisation); written here because no Python library in the project's dependencies
    implements it. No reference needed: it measures how fine the detail above the noise is.

    Args:
        image: ``(H, W)``.
        n_radii: radii sampled in ``(0, 1]``.
        n_filters: high-pass filters.

    Returns:
        The resolution in pixels (``inf`` when no peak is found: no detail above the noise).
    """
    img = image.double()
    h, w = img.shape
    win = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64) ** 0.25,
                      torch.hann_window(w, periodic=False, dtype=torch.float64) ** 0.25)  # fmt: skip
    img = (img - img.mean()) * win
    spectrum = torch.fft.fftshift(torch.fft.fft2(img))
    ky = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None]
    kx = torch.linspace(-1, 1, w, dtype=torch.float64)[None, :]
    radius = torch.sqrt(ky**2 + kx**2)
    radii = torch.linspace(0, 1, n_radii + 1, dtype=torch.float64)[1:]
    # ring index of each frequency (beyond Nyquist: dropped); sums inside radius r are cumulative ring sums
    ring = torch.ceil(radius * n_radii).long().clamp(min=1) - 1
    inside = ring < n_radii
    ring = ring[inside]

    def cumulative(values: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(torch.bincount(ring, weights=values[inside], minlength=n_radii), dim=0)

    def peak(f: torch.Tensor) -> tuple[float, float]:
        fn = f / f.abs().clamp(min=1e-30)
        num = cumulative((f * fn.conj()).real)
        d = num / (torch.linalg.vector_norm(f) * torch.sqrt(cumulative(fn.abs() ** 2)).clamp(min=1e-30))
        d = torch.nan_to_num(d)
        # the highest local maximum below the Nyquist edge
        interior = [i for i in range(1, len(d) - 1) if d[i] >= d[i - 1] and d[i] >= d[i + 1]]
        if not interior:
            return 0.0, 0.0
        i = max(interior, key=lambda j: float(d[j]))
        return float(radii[i]), float(d[i])

    best_r, amplitude = peak(spectrum)
    best = best_r if amplitude > 0.05 else 0.0
    k = radius / 2  # cycles per pixel
    for sigma in torch.logspace(math.log10(max(h, w) / 4), math.log10(0.15), n_filters, dtype=torch.float64):
        r, a = peak(spectrum * (1 - torch.exp(-2 * math.pi**2 * float(sigma) ** 2 * k**2)))
        if a > 0.05:
            best = max(best, r)
    return 2.0 / best if best > 0 else float("inf")


class DecorrelationResolutionMetric(CumulativeIterationMetric):
    """No-reference lateral resolution of the output (µm), by :func:`decorrelation_resolution`.

    Measured on the ``planes`` most contrasted XY planes of each output volume and averaged (the
    median over planes, then the mean over volumes). Lower is finer; a model that only sharpens
    noise does not lower it, since noise decorrelates. Logged at each validation; it is not part of
    the model choice.

    Args:
        voxel_size: ``(z, y, x)`` µm; the lateral pixel size converts pixels to µm (``None``: pixels).
        planes: XY planes measured per volume.
    """

    def __init__(self, voxel_size=None, planes: int = 3) -> None:
        super().__init__()
        self.pixel = float(min(voxel_size[1:])) if voxel_size is not None else 1.0
        self.planes = int(planes)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):  # type: ignore[override]
        out = []
        for vol in y_pred.detach().float().cpu()[:, 0]:
            order = vol.flatten(1).std(dim=1).argsort(descending=True)[: self.planes]
            values = torch.tensor([decorrelation_resolution(vol[i]) for i in order.tolist()])
            out.append(float(values.median()) * self.pixel)
        return torch.tensor(out, dtype=torch.float64)[:, None]

    def aggregate(self) -> torch.Tensor:
        """Mean over the volumes seen."""
        return _mean_of_buffer(self)
