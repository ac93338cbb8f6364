"""The occupancy statistic and the phantom density that matches a set of blurred stacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundle.physics.density import brightness_spread, match_brightness, match_density, occupancy
from bundle.physics.forward import add_noise, blur
from bundle.physics.phantom import make_phantom
from bundle.physics.psf import born_wolf_psf

SHAPE = (16, 64, 64)


def _stack(multiplier: float, seed: int, psf: np.ndarray) -> np.ndarray:
    n = max(1, round(6 * multiplier))
    noisy, _ = add_noise(blur(make_phantom("microtubules", shape=SHAPE, seed=seed, n_filaments=n), psf), 20.0, seed=seed)
    return 500.0 * noisy + 80.0  # camera units: occupancy must not care


def test_occupancy_is_scale_free_and_grows_with_structure():
    psf = born_wolf_psf((9, 15, 15), na=1.2)
    sparse, crowded = _stack(1, 0, psf), _stack(4, 0, psf)
    assert occupancy(sparse) == pytest.approx(occupancy((sparse - 80.0) / 500.0), abs=1e-9)
    assert occupancy(crowded) > 1.5 * occupancy(sparse)
    assert occupancy(np.ones(SHAPE)) == 0.0


# measured over three draws of stacks: 0.24-0.51 for 0.5 (3 filaments per stack: the stacks themselves
# vary that much), 2.5-3.1 for 3.0 (18 filaments)
@pytest.mark.parametrize("true_multiplier,factor", [(0.5, 2.5), (3.0, 1.3)])
def test_match_density_recovers_the_density_of_the_stacks(true_multiplier, factor):
    psf = born_wolf_psf((9, 15, 15), na=1.2)
    stacks = [_stack(true_multiplier, seed, psf) for seed in (1, 2, 3)]

    def render(m: float, i: int) -> np.ndarray:
        return make_phantom("microtubules", shape=SHAPE, seed=7 + i, n_filaments=max(1, round(6 * m)))

    result = match_density(stacks, psf, render)
    assert true_multiplier / factor < result["multiplier"] < true_multiplier * factor, result
    assert not result["clipped"] and len(result["table"]) == 7
    with pytest.raises(ValueError, match="at least one"):
        match_density([], psf, render)


def test_simulated_sharp_domain_matches_the_users_stacks(tmp_path):
    from bundle.io import load_volume, save_volume
    from bundle.physics.psf import vectorial_psf
    from bundle.sharp_domain import SimulatedSharpDomain

    optics = {"na": 1.2, "n_immersion": 1.33, "wavelength": 0.52}
    psf = vectorial_psf((9, 15, 15), voxel_size=(0.1, 0.1, 0.1), **optics)
    domain = SimulatedSharpDomain(str(tmp_path / "cache"), "microtubules", n_volumes=2, shape=SHAPE, seed=5,
                                  psf_shape=(9, 15, 15), **optics)
    default_n = domain.phantom_arguments()["n_filaments"]
    (tmp_path / "stacks").mkdir()
    for seed in (1, 2):  # stacks four times as crowded as the default
        crowded = make_phantom("microtubules", shape=SHAPE, seed=seed, n_filaments=4 * default_n)
        save_volume(tmp_path / "stacks" / f"s{seed}.tif", (300 * blur(crowded, psf) + 50).astype(np.float32))
    matched = SimulatedSharpDomain(str(tmp_path / "cache"), "microtubules", n_volumes=2, shape=SHAPE, seed=5,
                                   match_blurred=str(tmp_path / "stacks"), psf_shape=(9, 15, 15), **optics)
    paths = matched.files()
    record = json.loads((tmp_path / "cache" / "sharp_sim.json").read_text())
    assert 2.5 < record["density_match"]["multiplier"] < 6.4, record["density_match"]
    assert record["arguments"]["n_filaments"] > 2 * default_n
    low = record["density_match"]["brightness"]["low"]  # brightness matched too, and used
    assert 0 < low <= 1 and record["arguments"]["intensity_range"] == [low, 1.0]
    volume, _ = load_volume(paths[0])
    assert occupancy(blur(volume, psf)) > 2 * occupancy(blur(make_phantom("microtubules", shape=SHAPE, seed=5,
                                                                          n_filaments=default_n), psf))
    again = SimulatedSharpDomain(str(tmp_path / "cache"), "microtubules", n_volumes=2, shape=SHAPE, seed=5,
                                 match_blurred=str(tmp_path / "stacks"), psf_shape=(9, 15, 15), **optics)
    mtime = (tmp_path / "cache" / "sharp_sim_000.tif").stat().st_mtime_ns
    assert again.files() == paths and (tmp_path / "cache" / "sharp_sim_000.tif").stat().st_mtime_ns == mtime  # cached
    plain = SimulatedSharpDomain(str(tmp_path / "cache2"), "microtubules", n_volumes=1, shape=SHAPE, seed=5,
                                 match_blurred=str(tmp_path / "stacks"), match_brightness="false", psf_shape=(9, 15, 15),
                                 **optics)
    plain.files()
    assert "brightness" not in plain.density_match and "intensity_range" not in plain.phantom_arguments()
    with pytest.raises(ValueError, match="density"):
        SimulatedSharpDomain(str(tmp_path), density=0.0)


def _vesicles(low: float, seed: int, psf: np.ndarray) -> np.ndarray:
    sharp = make_phantom("vesicles", shape=SHAPE, seed=seed, intensity_range=(low, 1.0))
    noisy, _ = add_noise(blur(sharp, psf), 20.0, seed=seed)
    return 300.0 * noisy + 40.0


def test_brightness_spread_is_scale_free_and_falls_with_dim_structures():
    psf = born_wolf_psf((9, 15, 15), na=1.2)
    even = np.mean([brightness_spread(_vesicles(1.0, s, psf)) for s in (0, 1, 2)])
    dim = np.mean([brightness_spread(_vesicles(0.03, s, psf)) for s in (0, 1, 2)])
    assert dim < even - 0.08, (dim, even)
    stack = _vesicles(0.5, 0, psf)
    assert brightness_spread(stack) == pytest.approx(brightness_spread((stack - 40.0) / 300.0), abs=1e-9)
    assert brightness_spread(np.ones(SHAPE)) == 0.0
    with pytest.raises(ValueError, match="thresholds"):
        brightness_spread(stack, thresholds=(0.3, 0.1))


def test_match_brightness_tells_dim_rich_stacks_from_even_ones():
    psf = born_wolf_psf((9, 15, 15), na=1.2)

    def render(low: float, i: int) -> np.ndarray:
        return make_phantom("vesicles", shape=SHAPE, seed=11 + i, intensity_range=(low, 1.0))

    dim = match_brightness([_vesicles(0.03, s, psf) for s in (1, 2, 3)], psf, render)
    even = match_brightness([_vesicles(0.7, s, psf) for s in (1, 2, 3)], psf, render)
    # measured: 0.17 for stacks drawn with 0.03 (the dimmest structures hardly show once blurred and
    # noisy: a coarse match), 1.0 for 0.7 (the top of the range); the two are told apart clearly
    assert dim["low"] < 0.25 < 0.5 < even["low"], (dim, even)
    assert len(dim["table"]) == 6
    with pytest.raises(ValueError, match="at least one"):
        match_brightness([], psf, render)
