"""Multi-process DDP training (configs/multi_gpu_train.json) with torchrun on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from bundle.distributed import ddp, rank_handlers, state_hash, unwrap
from bundle.handlers import BlurCalibration, ResumableCheckpoint
from bundle.networks import PSFLayer

from conftest import CHEAP_PSF_FIT, SUBPROCESS_TIMEOUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/common.json", "configs/train.json", "configs/quick.json", "configs/multi_gpu_train.json"]


def test_single_process_helpers_are_no_ops():
    layer = PSFLayer.build(kernel_size=(5, 5, 5), parameterization="fixed")
    assert ddp(layer) is layer and ddp(None) is None and unwrap(layer) is layer
    a, b = PSFLayer.build(kernel_size=(5, 5, 5)), PSFLayer.build(kernel_size=(5, 5, 5))
    assert state_hash(a) == state_hash(b)
    with torch.no_grad():
        b.gain.add_(1e-3)
    assert state_hash(a) != state_hash(b)


def test_rank_handlers_keep_files_and_logs_on_rank_zero(tmp_path):
    ckpt = ResumableCheckpoint(str(tmp_path), {})
    calib = BlurCalibration(blur=PSFLayer.build(kernel_size=(5, 5, 5)), dataset=[])
    other = object()  # e.g. StatsHandler
    assert rank_handlers([ckpt, calib, other], rank=0) == [ckpt, calib, other]
    on_one = rank_handlers([ckpt, calib, other], rank=1)
    assert [type(h).__name__ for h in on_one] == ["ResumeOnly", "BlurCalibration"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_torchrun_two_processes(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    override = tmp_path / "test_override.json"
    override.write_text(
        json.dumps(
            {
                "ckpt_dir": f"$'{out}/models_rank' + str(dist.get_rank())",
                "output_dir": f"$'{out}/eval_rank' + str(dist.get_rank())",
                "psf_kernel_size": [15, 15, 15],
                **CHEAP_PSF_FIT,
                "epoch_length": 1,
                "max_epochs": 2,
                "val_interval": 2,
                "training": [
                    "$@train#trainer.run()",
                    f"$bundle.distributed.write_state_hash('{out}/hash_' + str(dist.get_rank()) + '.txt', "
                    "@g_deblur, @blur_path, @d_sharp, @d_blurred)",
                ],
            }
        )
    )
    config = "[" + ",".join(f"'{c}'" for c in [*CONFIGS, str(override)]) + "]"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        config,
        "--dataset_dir",
        str(tiny_dataset),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    if res.returncode != 0:
        pytest.fail(f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    hashes = [(out / f"hash_{r}.txt").read_text().strip() for r in (0, 1)]  # both ranks ran to the end
    assert hashes[0] == hashes[1], "weights differ between ranks after training"
    assert sorted(p.name for p in (out / "models_rank0" / "checkpoints").glob("checkpoint_*.pt")) == [
        "checkpoint_1.pt",
        "checkpoint_2.pt",
    ]
    assert not (out / "models_rank1").exists(), "rank 1 wrote checkpoints or models"
    assert (out / "eval_rank0" / "validation.json").is_file()  # validation ran on rank 0
    assert not (out / "eval_rank1").exists()
