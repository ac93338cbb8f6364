"""Shared fixtures: a tiny simulated dataset, made once per test session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from bundle_cli import run_module

# keep the 2-core CI machine responsive and results repeatable. Under pytest-xdist (the README runs
# ``-n 2``) each worker, and every subprocess it starts (bundle commands inherit the environment),
# computes on one thread, so two workers keep two cores busy without oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Fixtures that train through the command line (minutes), shared by several tests: every test that asks
# for one runs on the same xdist worker (``--dist loadgroup``), so each is made once, not once per worker.
# (The simulated datasets take seconds: each worker makes its own.)
SHARED_TRAINED_FIXTURES = ("quick_model", "tiny_run")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = [f for f in SHARED_TRAINED_FIXTURES if f in getattr(item, "fixturenames", ())]
        if used:
            item.add_marker(pytest.mark.xdist_group(used[0]))


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


ROOT = Path(__file__).resolve().parents[1]
QUICK_NONBLIND = "['configs/common.json','configs/train.json','configs/train_nonblind.json','configs/quick.json']"
# A wall-clock limit only catches a hung subprocess: it must be far above any test's idle time (the longest
# subprocesses take 2-3 minutes on one thread of a busy CI worker) so a busy machine never fails a test.
SUBPROCESS_TIMEOUT = 3600
# the blind default fits the PSF to the spectra before training: on fewer crops in the tiny trainings not about it
CHEAP_PSF_FIT = {"psf_fit#n_samples": 16, "psf_fit#steps": 60}
CHEAP_PSF_FIT_ARGS = tuple(a for key, value in CHEAP_PSF_FIT.items() for a in (f"--{key}", str(value)))
# x 25 iterations; tests/test_training.py needs a validation gain of +1 dB: measured +1.35 dB at 50 iterations
# and +6.25 at 100 (default sharp margin, 2026-12-02)
QUICK_EPOCHS = 4


def run_bundle(
    run_id: str, config_file: str, *overrides: str, timeout: float = SUBPROCESS_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id>`` from the repository root; fail with its log tail.

    The command runs in a new process forked from one that has imported MONAI already (``bundle_cli``):
    the same command, minus the 8-10 s of start-up each new interpreter spends importing MONAI.
    """
    res = run_module("monai.bundle", ["run", run_id, "--config_file", config_file, *overrides], cwd=ROOT, timeout=timeout)
    cmd = res.args
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


@pytest.fixture(scope="session")
def quick_dataset(tmp_path_factory):
    """The README demo's simulated dataset (configs/simulate.json defaults: 4+4 train, 2 val, 1 test)."""
    root = tmp_path_factory.mktemp("quick") / "data"
    run_bundle("simulate", "configs/simulate.json", "--dataset_dir", str(root))
    return root


@pytest.fixture(scope="session")
def quick_model(quick_dataset, tmp_path_factory):
    """The quick non-blind model, trained once per test session through the bundle's command line.

    Returns a dict with ``dataset_dir``, ``ckpt_dir`` (``model.pt``, ``blur.pt``, checkpoints) and
    ``output_dir`` (``validation.json``, PSF snapshots).
    """
    out = tmp_path_factory.mktemp("quick_model")
    paths = {"dataset_dir": quick_dataset, "ckpt_dir": out / "models", "output_dir": out / "eval"}
    run_bundle(
        "training", QUICK_NONBLIND,
        "--dataset_dir", str(paths["dataset_dir"]),
        "--ckpt_dir", str(paths["ckpt_dir"]),
        "--output_dir", str(paths["output_dir"]),
        "--max_epochs", str(QUICK_EPOCHS),
        "--val_interval", "2",
    )
    return paths
