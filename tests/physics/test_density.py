"""The occupancy statistic and the phantom density that matches a set of blurred stacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundle.physics.density import match_density, occupancy
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
    volume, _ = load_volume(paths[0])
    assert occupancy(blur(volume, psf)) > 2 * occupancy(blur(make_phantom("microtubules", shape=SHAPE, seed=5,
                                                                          n_filaments=default_n), psf))
    again = SimulatedSharpDomain(str(tmp_path / "cache"), "microtubules", n_volumes=2, shape=SHAPE, seed=5,
                                 match_blurred=str(tmp_path / "stacks"), psf_shape=(9, 15, 15), **optics)
    mtime = (tmp_path / "cache" / "sharp_sim_000.tif").stat().st_mtime_ns
    assert again.files() == paths and (tmp_path / "cache" / "sharp_sim_000.tif").stat().st_mtime_ns == mtime  # cached
    with pytest.raises(ValueError, match="density"):
        SimulatedSharpDomain(str(tmp_path), density=0.0)
