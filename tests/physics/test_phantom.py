"""Checks of the synthetic microtubule phantom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bundle.physics.phantom import microtubule_phantom


@pytest.mark.parametrize("shape", [(32, 64, 64), (16, 48, 80), (40, 24, 32), (1, 32, 32)])
def test_shape_dtype_range(shape):
    vol = microtubule_phantom(shape, seed=0)
    assert vol.shape == shape
    assert vol.dtype == np.float32
    assert vol.min() >= 0.0 and vol.max() <= 1.0
    assert vol.max() > 0.3  # something was drawn


def test_seed_determinism_and_variety():
    a = microtubule_phantom((24, 48, 48), seed=3)
    b = microtubule_phantom((24, 48, 48), seed=3)
    c = microtubule_phantom((24, 48, 48), seed=4)
    d = microtubule_phantom((24, 48, 48), seed=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert np.abs(a - c).mean() > 0.01


def test_sparse_like_microtubules():
    """Measured at 64 x 128 x 128, seed 0: 2.7 % of voxels > 0.25, 10 % > 0.01; median 0."""
    vol = microtubule_phantom((64, 128, 128), seed=0)
    assert 0.005 < (vol > 0.25).mean() < 0.06
    assert (vol > 0.01).mean() < 0.2
    assert np.median(vol) < 1e-3


def test_filaments_are_connected_curves():
    """A handful of big connected components, no dust: the curves are continuous."""
    n = 6
    vol = microtubule_phantom((32, 96, 96), n_filaments=n, seed=1)
    labels, count = ndimage.label(vol > 0.2)
    sizes = np.bincount(labels.ravel())[1:]
    assert 1 <= count <= 2 * n
    assert np.sort(sizes)[::-1][:n].sum() > 0.95 * sizes.sum()
    # each component is elongated: longest bounding-box side much longer than the tube width
    extents = [max(s.stop - s.start for s in sl) for sl in ndimage.find_objects(labels)]
    assert np.median(extents) > 20


def test_single_filament_intensity_and_width():
    """One filament: centre-line intensity within the requested range, cross-section ~ radius."""
    vol = microtubule_phantom((48, 64, 64), n_filaments=1, intensity_range=(0.6, 0.6), radius=1.5, seed=2)
    assert vol.max() == pytest.approx(0.6, rel=0.12)
    # about 2 * sqrt(2 ln 2) * 1.5 ~ 3.5 voxel FWHM across => ~pi (1.75)^2 ~ 10 voxels per unit length
    above = (vol > 0.3).sum()
    labels, count = ndimage.label(vol > 0.3)
    assert count == 1 and above > 100


def test_lateral_bias_flattens_filaments():
    """Filaments stay in fewer z slices with a strong lateral bias than isotropic ones."""

    def z_spread(bias):
        spreads = []
        for seed in range(4):
            vol = microtubule_phantom((64, 64, 64), n_filaments=1, lateral_bias=bias, seed=seed)
            spreads.append(int(np.any(vol > 0.2, axis=(1, 2)).sum()))
        return np.mean(spreads)

    assert z_spread(0.95) < 0.6 * z_spread(0.0)


def test_default_density_scales_with_volume():
    small = microtubule_phantom((32, 64, 64), seed=0)
    large = microtubule_phantom((32, 128, 128), seed=0)
    assert (large > 0.25).mean() == pytest.approx((small > 0.25).mean(), rel=0.6)


def test_zero_filaments_is_empty():
    assert not microtubule_phantom((8, 16, 16), n_filaments=0).any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shape=(0, 16, 16)), "shape"),
        (dict(shape=(16, 16)), "shape"),
        (dict(radius=0.0), "radius"),
        (dict(persistence_length=-1.0), "persistence_length"),
        (dict(intensity_range=(0.0, 1.0)), "intensity_range"),
        (dict(intensity_range=(0.8, 0.5)), "intensity_range"),
        (dict(lateral_bias=1.0), "lateral_bias"),
        (dict(n_filaments=-2), "n_filaments"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    kwargs.setdefault("shape", (8, 16, 16))
    with pytest.raises(ValueError, match=match):
        microtubule_phantom(**kwargs)


def test_vesicles_are_shells_and_spots_with_dim_ones():
    from bundle.physics.phantom import vesicle_phantom

    vol = vesicle_phantom((32, 96, 96), seed=0)
    assert vol.shape == (32, 96, 96) and vol.dtype == np.float32
    assert vol.min() >= 0 and vol.max() <= 1
    np.testing.assert_array_equal(vol, vesicle_phantom((32, 96, 96), seed=0))
    assert 0.002 < (vol > 0.25).mean() < 0.06
    # a lone shell is hollow: bright wall at the radius, dark centre
    shell = vesicle_phantom((32, 64, 64), n_vesicles=1, n_puncta=0, radius_range=(8, 8), intensity_range=(1, 1), seed=3)
    centre = np.array(ndimage.center_of_mass(shell))
    c = tuple(int(round(v)) for v in centre)
    assert shell[c] < 0.05 * shell.max()
    # log-uniform intensities: many structures are dim (peak below 30 % of the brightest possible)
    spots = vesicle_phantom((32, 96, 96), n_vesicles=0, n_puncta=60, seed=4)
    labels, count = ndimage.label(spots > 0.02)
    peaks = ndimage.maximum(spots, labels, range(1, count + 1))
    assert count > 30 and np.mean(np.asarray(peaks) < 0.3) > 0.3


def test_make_phantom_names_the_families():
    from bundle.physics.phantom import make_phantom

    assert make_phantom("vesicles", shape=(8, 16, 16), seed=0).shape == (8, 16, 16)
    with pytest.raises(ValueError, match="microtubules"):
        make_phantom("beads", shape=(8, 16, 16))
