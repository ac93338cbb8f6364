"""Shared fixtures: a tiny simulated dataset, made once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# keep the 2-core CI machine responsive and results repeatable
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small simulated dataset (Born & Wolf PSF, 20 dB) under a session temp folder."""
    from bundle.simulate import SimulateDataset

    root = tmp_path_factory.mktemp("sim") / "data"
    SimulateDataset(
        str(root),
        shape=(32, 64, 64),
        eval_shape=(32, 64, 64),
        n_train=2,
        n_val=1,
        n_test=1,
        psf_shape=(15, 15, 15),
        seed=3,
        progress=False,
    ).run()
    return root
