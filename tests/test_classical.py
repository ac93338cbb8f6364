import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from bundle.classical import RichardsonLucy, _SpectralBlur, best_iteration, psnr, richardson_lucy
from bundle.ops import fft_convolve

SHAPE = (32, 40, 40)


def _gaussian_psf(shape=(9, 7, 7), sigma=(2.0, 1.0, 1.0)) -> np.ndarray:
    """Anisotropic 3D Gaussian (elongated along z), centre at s // 2, sum 1."""
    grids = np.meshgrid(*[np.arange(s) - s // 2 for s in shape], indexing="ij")
    psf = np.exp(-sum(g**2 / (2 * s**2) for g, s in zip(grids, sigma, strict=True)))
    return psf / psf.sum()


def _lines(shape=SHAPE, n_lines=6, margin=6, seed=0) -> np.ndarray:
    """A few random bright straight filaments in a dark volume (they may leave it at the edges)."""
    rng = np.random.default_rng(seed)
    obj = np.zeros(shape)
    for _ in range(n_lines):
        start = rng.uniform(margin, np.array(shape) - margin)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for t in np.linspace(-max(shape) / 2, max(shape) / 2, 4 * max(shape)):
            q = np.round(start + t * direction).astype(int)
            if np.all(q >= 0) and np.all(q < shape):
                obj[tuple(q)] = 1.0
    return obj


def _points(shape=SHAPE, n=12, margin=8, seed=1) -> np.ndarray:
    """Bright points well inside the volume (their blur stays inside)."""
    rng = np.random.default_rng(seed)
    obj = np.zeros(shape)
    for _ in range(n):
        obj[tuple(rng.integers(margin, np.array(shape) - margin))] = rng.uniform(0.5, 1.0)
    return obj


@pytest.fixture(scope="module")
def phantom():
    """(object, psf, noise-free blurred, noisy blurred) — zero-padded blur, like the simulator."""
    obj = _lines()
    psf = _gaussian_psf()
    blurred = np.clip(fftconvolve(obj, psf, mode="same"), 0, None)
    rng = np.random.default_rng(2)
    noisy = rng.poisson(blurred * 30) / 30 + rng.normal(
        0, 0.02, blurred.shape
    )  # strong noise, peak ~8 photons
    return obj, psf, blurred, noisy


def _peak_psnr(u: np.ndarray, obj: np.ndarray) -> float:
    return psnr(u / u.max(), obj)


def _total_variation(u: np.ndarray) -> float:
    return float(sum(np.abs(np.diff(u, axis=a)).sum() for a in range(3)))


@pytest.mark.parametrize("kshape", [(5, 5, 5), (4, 6, 3)])
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect", "replicate", "circular"])
def test_spectral_blur_matches_fft_convolve_and_adjoint(kshape, pad_mode):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 10, 11, 9, dtype=torch.float64)
    r = torch.rand_like(x)
    h = torch.rand(*kshape, dtype=torch.float64)
    blur = _SpectralBlur(h, x.shape[-3:], pad_mode)
    torch.testing.assert_close(blur.forward(x), fft_convolve(x, h, pad_mode), rtol=0, atol=1e-12)
    if pad_mode in ("zeros", "circular"):  # exact adjoint: <A x, r> = <x, A^T r>, even for even kernels
        assert (blur.forward(x) * r).sum().item() == pytest.approx(
            (x * blur.adjoint(r)).sum().item(), rel=1e-12
        )
    if all(k % 2 for k in kshape):  # odd kernels: the adjoint is the convolution with the flipped PSF
        torch.testing.assert_close(
            blur.adjoint(r), fft_convolve(r, h.flip(0, 1, 2), pad_mode), rtol=0, atol=1e-12
        )


def test_psnr_rises_with_iterations_noise_free(phantom):
    obj, psf, blurred, _ = phantom
    curve = {}
    richardson_lucy(
        blurred,
        psf,
        num_iter=50,
        pad_mode="zeros",
        callback=lambda i, u: curve.__setitem__(i, u.numpy().copy()),
    )
    p5, p20, p50 = (_peak_psnr(curve[i], obj) for i in (5, 20, 50))
    p_in = _peak_psnr(blurred, obj)
    assert p_in < p5 < p20 < p50
    assert p50 > p_in + 5.0  # measured: input 22.9 dB, 50 iterations 29.4 dB


def test_flux_is_conserved_with_zero_padding(phantom):
    _, psf, blurred_lines, _ = phantom
    # object away from the edges: sum(u) = sum(y) (the blur of the points stays inside)
    y = fftconvolve(_points(), psf, mode="same")
    for n in (1, 10, 40):
        u = richardson_lucy(y, psf, num_iter=n, pad_mode="zeros")
        assert u.sum() == pytest.approx(y.sum(), rel=1e-2)
        assert u.min() >= 0
    # filaments crossing the edges: the re-blurred estimate keeps the data's flux exactly (up to eps)
    u = richardson_lucy(blurred_lines, psf, num_iter=20, pad_mode="zeros")
    assert fftconvolve(u, psf, mode="same").sum() == pytest.approx(blurred_lines.sum(), rel=1e-3)
    # without the boundary correction (scikit-image's update) sum(u) itself is conserved
    u = richardson_lucy(blurred_lines, psf, num_iter=20, pad_mode="zeros", boundary_correction=False)
    assert u.sum() == pytest.approx(blurred_lines.sum(), rel=1e-3)


def test_boundary_correction_helps_at_the_edges(phantom):
    obj, psf, blurred, _ = phantom
    with_corr = richardson_lucy(blurred, psf, num_iter=30, pad_mode="zeros")
    without = richardson_lucy(blurred, psf, num_iter=30, pad_mode="zeros", boundary_correction=False)
    assert _peak_psnr(with_corr, obj) > _peak_psnr(without, obj) + 1.0  # measured 28.8 vs 26.8 dB


@pytest.fixture(scope="module")
def skimage_reference(phantom):
    from skimage.restoration import richardson_lucy as skimage_rl

    _, psf, blurred, _ = phantom
    return skimage_rl(blurred, psf, num_iter=30, clip=False)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_matches_scikit_image(phantom, skimage_reference, dtype, tol):
    _, psf, blurred, _ = phantom
    ref = skimage_reference
    ours = richardson_lucy(
        blurred.astype(dtype),
        psf,
        num_iter=30,
        pad_mode="zeros",
        init=0.5,
        eps=1e-12,
        clip_negative=False,
        boundary_correction=False,
    )
    assert ours.dtype == dtype
    # measured: 2e-15 (float64), 5e-7 (float32)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < tol


def test_tv_regularisation_reduces_noise_amplification(phantom):
    _, psf, _, noisy = phantom
    plain = richardson_lucy(noisy, psf, num_iter=25, pad_mode="zeros")
    tv = richardson_lucy(noisy, psf, num_iter=25, pad_mode="zeros", tv_weight=0.02)
    assert not np.allclose(plain, tv, rtol=1e-3, atol=1e-4)
    assert _total_variation(tv) < 0.9 * _total_variation(plain)
    # high-frequency energy: what a 3x3x3 box filter removes
    box = np.ones((3, 3, 3)) / 27

    def hf(u):
        return float(((u - fftconvolve(u, box, mode="same")) ** 2).sum())

    assert hf(tv) < 0.7 * hf(plain)  # measured: TV 0.78x, high-frequency energy 0.45x


def test_stop_tol_stops_early_and_callback_counts(phantom):
    _, psf, blurred, _ = phantom
    seen: list[int] = []
    richardson_lucy(blurred, psf, num_iter=100, stop_tol=3e-2, callback=lambda i, u: seen.append(i))
    assert seen == list(range(1, len(seen) + 1)) and 1 < len(seen) < 100  # measured: 13
    seen.clear()
    richardson_lucy(blurred, psf, num_iter=7, callback=lambda i, u: seen.append(i))
    assert seen == list(range(1, 8))
    seen.clear()
    richardson_lucy(blurred, psf, num_iter=20, callback=lambda i, u: seen.append(i) or i == 3)  # True stops
    assert seen == [1, 2, 3]


def test_module_matches_function_and_loads_tiff(phantom, tmp_path):
    import tifffile

    _, psf, blurred, _ = phantom
    x = torch.as_tensor(blurred, dtype=torch.float32)[None, None].repeat(2, 1, 1, 1, 1)
    expected = richardson_lucy(x, 3.0 * psf, num_iter=8, pad_mode="reflect")  # PSF normalised inside
    net = RichardsonLucy(psf=psf, num_iter=8, pad_mode="reflect")
    assert net.state_dict() == {}  # nothing to checkpoint
    out = net(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(net(x), out)  # cached spectrum gives the same answer
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, (psf * 1000).astype(np.float32))
    from_file = RichardsonLucy(psf_file=str(path), num_iter=8, pad_mode="reflect")
    assert from_file.psf.sum().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(from_file(x), expected, rtol=1e-4, atol=1e-6)


def test_types_shapes_and_devices_round_trip(phantom):
    _, psf, blurred, _ = phantom
    out_np = richardson_lucy(blurred.astype(np.float32), psf, num_iter=3)
    assert isinstance(out_np, np.ndarray) and out_np.shape == SHAPE and out_np.dtype == np.float32
    assert richardson_lucy((blurred * 1000).astype(np.uint16), psf, num_iter=2).dtype == np.float32
    t = torch.as_tensor(blurred)
    out_t = richardson_lucy(t, torch.as_tensor(psf), num_iter=3, device="cpu")
    assert isinstance(out_t, torch.Tensor) and out_t.shape == SHAPE and out_t.dtype == torch.float64
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-4, atol=1e-6)
    out_5d = richardson_lucy(t[None, None].float(), psf, num_iter=3)
    assert out_5d.shape == (1, 1, *SHAPE)
    np.testing.assert_allclose(out_5d[0, 0].numpy(), out_np, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda(phantom):
    _, psf, blurred, _ = phantom
    x = torch.as_tensor(blurred, dtype=torch.float32)
    out = richardson_lucy(x.cuda(), psf, num_iter=5)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), richardson_lucy(x, psf, num_iter=5), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "volume_shape,psf_fn,kwargs,match",
    [
        ((40, 40), lambda p: p, {}, "volume must be"),
        ((2, 32, 40, 40), lambda p: p, {}, "volume must be"),
        (SHAPE, lambda p: p[0], {}, "psf must be 3D"),
        (SHAPE, lambda p: p - 0.01, {}, "negative"),
        (SHAPE, lambda p: np.where(p > p.max() / 2, np.nan, p), {}, "NaN"),
        (SHAPE, lambda p: np.zeros_like(p), {}, "sums to zero"),
        (SHAPE, lambda p: p, {"num_iter": 0}, "num_iter"),
        (SHAPE, lambda p: p, {"pad_mode": "mirror"}, "pad_mode"),
        (SHAPE, lambda p: p, {"tv_weight": 0.5}, "tv_weight"),
        (SHAPE, lambda p: p, {"init": "zeros"}, "init"),
        ((4, 40, 40), lambda p: p, {"pad_mode": "reflect"}, "larger than half the PSF"),
    ],
)
def test_bad_inputs_raise(volume_shape, psf_fn, kwargs, match):
    psf = _gaussian_psf()
    with pytest.raises(ValueError, match=match):
        richardson_lucy(np.ones(volume_shape), psf_fn(psf), **kwargs)


def test_bad_module_arguments_raise():
    with pytest.raises(ValueError, match="exactly one"):
        RichardsonLucy()
    with pytest.raises(ValueError, match="exactly one"):
        RichardsonLucy(psf_file="x.tif", psf=_gaussian_psf())
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        RichardsonLucy(psf=_gaussian_psf())(torch.ones(32, 40, 40))


def test_best_iteration_peaks_before_max_iter_with_noise(phantom):
    obj, psf, _, noisy = phantom
    best, curve = best_iteration(noisy, obj, psf, max_iter=60, pad_mode="zeros")
    assert len(curve) == 60 and best == int(np.argmax(curve)) + 1
    assert 1 < best < 50  # RL amplifies noise beyond some point (measured: best 24, 24.6 dB)
    assert curve[-1] < curve[best - 1] - 0.05
    p_in = psnr((noisy - noisy.min()) / (noisy.max() - noisy.min()), obj)  # same min-max normalisation
    assert curve[best - 1] > p_in + 5.0  # measured: input 12.9 dB


def test_psnr_matches_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    target = rng.uniform(0, 2, (8, 9, 10))
    pred = target + rng.normal(0, 0.1, target.shape)
    assert psnr(pred, target) == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=np.ptp(target))
    )
    assert psnr(torch.as_tensor(pred), torch.as_tensor(target), data_range=1.0) == pytest.approx(
        10 * math.log10(1.0 / np.mean((pred - target) ** 2))
    )


def test_rl_workflow_keeps_a_bright_bead_intensity_relation(tmp_path, monkeypatch):
    """configs/inference_rl.json: no clipping at the 99.9th percentile (a lone bright bead lost 42 % of its peak).

    RL conserves flux: the bead's background-subtracted sum in the output equals the input's, and the
    deconvolved peak is higher than the blurred one (both in input units).
    """
    from monai.bundle import ConfigWorkflow

    from bundle.io import load_volume, save_volume
    from bundle.physics.psf import gaussian_psf

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    psf = gaussian_psf((9, 9, 9), fwhm=(0.4, 0.2, 0.2), voxel_size=(0.1, 0.1, 0.1))
    save_volume(tmp_path / "psf.tif", psf, voxel_size=(0.1, 0.1, 0.1))
    volume = np.full((24, 48, 48), 100.0, dtype=np.float32)
    volume[12, 24, 24] += 15000.0 * 30  # one bead: ~0.03 % of the voxels are bright, above the 99.9th percentile
    from bundle.physics.forward import blur

    volume = 100.0 + np.asarray(blur(volume - 100.0, psf, pad_mode="zeros"), dtype=np.float32)
    save_volume(tmp_path / "in" / "bead.tif", volume, voxel_size=(0.1, 0.1, 0.1))
    wf = ConfigWorkflow(
        config_file=["configs/common.json", "configs/inference.json", "configs/inference_rl.json"],
        workflow_type="infer", input=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
        psf_file=str(tmp_path / "psf.tif"), rl_num_iter=20, progress=False, logging_file=False,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    (out,) = sorted((tmp_path / "out").glob("*.tif"))
    result, _ = load_volume(out)
    background = float(np.median(volume))
    flux_in = float((volume - background).sum())
    flux_out = float((result - np.median(result)).sum())
    assert flux_out == pytest.approx(flux_in, rel=0.05)
    assert result.max() > volume.max()
