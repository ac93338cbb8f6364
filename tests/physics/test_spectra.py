from __future__ import annotations

import pytest
import torch

from bundle.ops import fft_convolve
from bundle.physics.spectra import BlurredSpectrum, CylindricalBins, welch_power_spectrum


def _blurred(volumes: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return fft_convolve(volumes[:, None].float(), kernel.float(), pad_mode="zeros")[:, 0].double()


@pytest.mark.parametrize("shape", [(2, 8, 10, 12), (2, 7, 9, 11), (1, 5, 6, 1), (1, 4, 4, 2)])
def test_welch_spectrum_is_the_full_periodogram(shape):
    """The half spectrum mirrored (real input) equals ``|fftn|²`` of the windowed crops, odd and even sizes."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(*shape, generator=g, dtype=torch.float64)
    window = torch.ones(shape[1:], dtype=torch.float64)
    for axis, n in enumerate(shape[1:]):
        w = torch.hann_window(n, periodic=False, dtype=torch.float64) if n > 2 else torch.ones(n, dtype=torch.float64)
        window = window * w.reshape([n if a == axis else 1 for a in range(3)])
    v = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * window
    expected = (torch.fft.fftn(v, dim=(1, 2, 3)).abs() ** 2).mean(dim=0)
    torch.testing.assert_close(welch_power_spectrum(x), expected, rtol=1e-10, atol=1e-12)


def test_blurred_spectrum_pads_to_fast_fft_sizes():
    """The circular size is padded to a 5-smooth size (39 -> 40, 71 -> 72 for the fit's crops and a 15³ kernel)."""
    spectrum = BlurredSpectrum(torch.rand(2, 32, 64, 64, dtype=torch.float64), (32, 64, 64), (15, 15, 15))
    assert spectrum.fft_shape == [40, 72, 72]


def test_blurred_spectrum_is_the_welch_spectrum_of_the_blurred_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 24, 24, generator=g, dtype=torch.float64)
    k = torch.rand(7, 9, 5, generator=g, dtype=torch.float64)
    expected = welch_power_spectrum(_blurred(x, k))
    torch.testing.assert_close(BlurredSpectrum(x, (20, 24, 24), (7, 9, 5))(k), expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_blurred_spectrum_blurs_the_margin_into_the_kept_centre():
    """Sharp crops larger than the blurred ones: the centre holds the blur of what lies around it."""
    g = torch.Generator().manual_seed(1)
    big = torch.rand(3, 30, 40, 36, generator=g, dtype=torch.float64)
    k = torch.rand(7, 9, 5, generator=g, dtype=torch.float64)
    expected = welch_power_spectrum(_blurred(big, k)[:, 5:25, 8:32, 6:30])
    spectrum = BlurredSpectrum(big, (20, 24, 24), (7, 9, 5))
    torch.testing.assert_close(spectrum(k), expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
    k.requires_grad_(True)
    spectrum(k).sum().backward()
    assert k.grad is not None and bool(torch.isfinite(k.grad).all()) and float(k.grad.abs().sum()) > 0


def test_blurred_spectrum_differs_from_the_product_for_a_sharp_transfer():
    """|H|² times the windowed sharp spectrum is not the windowed blurred spectrum: the reason it exists."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 16, 16, 16, generator=g, dtype=torch.float64)
    k = torch.zeros(5, 5, 5, dtype=torch.float64)
    k[2, 2, 2], k[1, 2, 2], k[3, 2, 2] = 0.5, 0.25, 0.25  # a cosine axial transfer with a zero at Nyquist
    windowed = BlurredSpectrum(x, (16, 16, 16), (5, 5, 5))(k)
    h2 = torch.fft.fftn(k, s=(16, 16, 16)).abs() ** 2
    product = h2 * welch_power_spectrum(x)
    assert float(product[8].sum()) < 1e-12 * float(product.sum())  # the product has nothing at the zero
    assert float(windowed[8].sum()) > 1e-5 * float(windowed.sum())  # the window smears power into it (measured 1e-4)


def test_blurred_spectrum_rejects_small_sharp_crops():
    with pytest.raises(ValueError, match="smaller than the blurred crops"):
        BlurredSpectrum(torch.rand(2, 8, 8, 8), (10, 8, 8), (3, 3, 3))


def test_cylindrical_bins_average_per_bin():
    bins = CylindricalBins((4, 8, 8))
    assert float(bins.counts.sum()) == 4 * 8 * 8
    ones = bins(torch.ones(4, 8, 8, dtype=torch.float64))
    assert bool(torch.all(ones[bins.counts > 0] == 1.0))
    kz = torch.fft.fftfreq(4).abs()[:, None, None].expand(4, 8, 8) * 4
    per_bin = bins(kz.double())
    assert float(per_bin[0]) == 0.0 and float(per_bin.max()) == 2.0  # |k_z| index 0..2
