"""Baselines as configs of the bundle: each trains and validates through ``monai.bundle run training``.

Supervised U-Net (MSE), supervised U-Net (MSE + LS-GAN), conventional cycleGAN (a second U-Net as the
blur generator) and Richardson–Lucy as the ``network`` of the inference pipeline. Every run is a few
iterations on the session's tiny dataset; each subprocess uses one thread (on a shared 2-core machine
two oversubscribed threads made one iteration ~10x slower).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_cli import run_module

from bundle.data import paired_dataset, paired_train_transforms
from bundle.engine import SupervisedGANTrainer
from bundle.io import load_volume
from bundle.losses import LSGANLoss
from bundle.networks import DeblurUNet, MultiScalePatchDiscriminator

from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
BASE = ["configs/common.json", "configs/train.json"]
METHODS = {
    "supervised": ["configs/train_supervised.json"],
    "supervised_gan": ["configs/train_supervised.json", "configs/train_supervised_gan.json"],
    "conventional": ["configs/train_conventional.json"],
}
TINY = ["--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1", "--num_workers", "0"]


def _config_list(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _run(run_id: str, files: list[str], *overrides: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = run_module("monai.bundle", ["run", run_id, "--config_file", _config_list(files), *overrides], cwd=ROOT, env=env,
                     timeout=timeout)  # fmt: skip
    cmd = res.args
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_baseline_trains_and_validates(method, tiny_dataset, tmp_path):
    files = BASE + METHODS[method] + ["configs/quick.json"]
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    _run("training", files, "--dataset_dir", str(tiny_dataset), "--ckpt_dir", str(ckpt), "--output_dir", str(out), *TINY)
    assert (ckpt / "model.pt").is_file()
    record = json.loads((ckpt / "model.json").read_text())
    assert record["metric"] == "val_psnr" and np.isfinite(record["score"])
    assert {"val_ssim", "val_input_psnr"} <= set(record["metrics"])
    history = json.loads((out / "validation.json").read_text())
    assert len(history) == 1
    # the saved generator is the inference network: same DeblurUNet as common.json's network_def
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    DeblurUNet(features=(16, 32, 64, 16), depth=2, norm="batch", align_corners=False).load_state_dict(state)
    assert (ckpt / "checkpoints").is_dir()
    if method == "conventional":  # the blur generator is a network: saved beside G, no PSF export
        assert (ckpt / "blur.pt").is_file() and not (ckpt / "blur.tif").exists()


@pytest.mark.slow
def test_richardson_lucy_inference_config(tiny_dataset, tmp_path):
    files = ["configs/common.json", "configs/inference.json", "configs/inference_rl.json"]
    _run(
        "inference", files, "--dataset_dir", str(tiny_dataset), "--output_dir", str(tmp_path),
        "--rl_num_iter", "3", "--output_range", "normalized", "--progress", "false",
    )
    (out,) = sorted(tmp_path.glob("*.tif"))
    volume, _ = load_volume(out)
    blurred, _ = load_volume(tiny_dataset / "test/blurred/test_000.tif")
    assert volume.shape == blurred.shape and np.isfinite(volume).all() and volume.min() >= 0
    assert volume.std() > 0


def test_paired_train_transforms_keep_the_pair_aligned(tiny_dataset):
    f = str(tiny_dataset / "val/ground_truth/val_000.tif")
    t = paired_train_transforms((16, 32, 32), image_percentiles=(0.0, 99.99), label_percentiles=(0.0, 99.99))
    for seed in range(4):
        t.set_random_state(seed)
        item = t({"image": f, "label": f})
        assert item["image"].shape == (1, 16, 32, 32)
        assert torch.equal(torch.as_tensor(item["image"]), torch.as_tensor(item["label"]))


def test_paired_dataset_reads_train_ground_truth(tiny_dataset):
    ds = paired_dataset(
        str(tiny_dataset / "train/blurred"), str(tiny_dataset / "train/blurred_ground_truth"), patch_size=(16, 32, 32)
    )
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == item["label"].shape == (1, 16, 32, 32)


def test_supervised_gan_trainer_shows_ground_truth_as_real():
    """One iteration in-process: G and D both move, the output is decollated with the loss terms."""
    torch.manual_seed(0)
    g = DeblurUNet(features=(4, 4, 8, 8, 16, 4))
    d = MultiScalePatchDiscriminator(channels=4, num_layers_d=2, num_scales=1)
    adv = LSGANLoss()
    seen: list[torch.Tensor] = []
    d.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    batch = {"image": torch.rand(2, 1, 32, 32, 32), "label": torch.zeros(2, 1, 32, 32, 32)}
    g0, d0 = [p.clone() for p in g.parameters()], [p.clone() for p in d.parameters()]
    trainer = SupervisedGANTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], g_network=g,
        g_optimizer=torch.optim.Adam(g.parameters(), 1e-3), g_loss_function=adv.generator_loss,
        recon_loss_function=torch.nn.MSELoss(), d_network=d, d_optimizer=torch.optim.Adam(d.parameters(), 1e-3),
        d_loss_function=adv.discriminator_loss, adversarial_weight=0.01,
    )
    trainer.run()
    out = trainer.state.output
    assert isinstance(out, list) and len(out) == 2 and float(out[0]["loss"]) > 0
    assert {"reconstruction_loss", "generator_loss", "discriminator_loss"} <= set(out[0])
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    # D sees G(y) (generator step), then the ground truth as real and G(y) as fake; never the input
    assert len(seen) == 3 and torch.equal(seen[1], batch["label"])
    assert not any(torch.equal(s, batch["image"]) for s in seen)


def test_supervised_gan_trainer_resumes_into_the_same_networks(tmp_path):
    """After a resume the trainer still trains the networks the evaluator and BestModelSaver hold."""
    from bundle.handlers import ResumableCheckpoint

    def build(max_epochs):
        torch.manual_seed(0)
        g = DeblurUNet(features=(4, 4, 8, 8, 16, 4))
        d = MultiScalePatchDiscriminator(channels=4, num_layers_d=2, num_scales=1)
        g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
        adv = LSGANLoss()
        batch = {"image": torch.rand(2, 1, 32, 32, 32), "label": torch.rand(2, 1, 32, 32, 32)}
        ckpt = ResumableCheckpoint(
            str(tmp_path), {"network": g, "optimizer": g_opt, "discriminator": d, "d_optimizer": d_opt}, resume=True
        )
        trainer = SupervisedGANTrainer(
            device="cpu", max_epochs=max_epochs, train_data_loader=[batch], g_network=g, g_optimizer=g_opt,
            g_loss_function=adv.generator_loss, recon_loss_function=torch.nn.MSELoss(), d_network=d,
            d_optimizer=d_opt, d_loss_function=adv.discriminator_loss, train_handlers=[ckpt],
        )
        return trainer, g

    first, g1 = build(1)
    first.run()
    trained = {k: v.clone() for k, v in g1.state_dict().items()}
    second, g2 = build(2)
    second.run()  # resumes at epoch 1, runs epoch 2
    assert second.state.epoch == 2 and second.state.g_network is g2
    assert any(not torch.equal(trained[k], v) for k, v in g2.state_dict().items() if k != "voxel_size")  # g2 itself trained on (NaN != NaN)


@pytest.mark.slow
def test_richardson_lucy_evaluate_config(tiny_dataset, tmp_path):
    """RL plugs into evaluate.json like a trained generator (no checkpoint, no learned PSF)."""
    files = ["configs/common.json", "configs/inference.json", "configs/inference_rl.json", "configs/evaluate.json"]
    _run("evaluate", files, "--dataset_dir", str(tiny_dataset), "--output_dir", str(tmp_path), "--rl_num_iter", "10")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpoint"] is None and report["psf"] is None
    assert np.isfinite(report["mean"]["psnr"]["output_fit"]) and np.isfinite(report["mean"]["ssim"]["output_fit"])
