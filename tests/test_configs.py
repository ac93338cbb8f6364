"""Bundle configs: every training variant parses as a MONAI train workflow with the conventional ids."""

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import ID_SEP_KEY

from bundle.physics.psf_estimation import SpectralPSFFit

from conftest import CHEAP_PSF_FIT_ARGS, ROOT, run_bundle

TRAIN_VARIANTS = [
    ["configs/common.json", "configs/train.json"],
    ["configs/common.json", "configs/train.json", "configs/train_nonblind.json"],
    ["configs/common.json", "configs/train.json", "configs/quick.json"],
    ["configs/common.json", "configs/train.json", "configs/train_nonblind.json", "configs/quick.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/quick.json"],
    # the trainer (with its handlers) is built below: paper_recipe's ema_momentum 1 failed there
    ["configs/common.json", "configs/train.json", "configs/paper_recipe.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/sharp_cycle.json"],
    ["configs/common.json", "configs/train.json", "configs/learned_psf.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/learned_psf.json", "configs/quick.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/discrepancy_cycle.json"],
    ["configs/common.json", "configs/train.json", "configs/train_nonblind.json", "configs/background_cycle.json"],
    ["configs/common.json", "configs/train.json", "configs/recorrupted_cycle.json"],
]


@pytest.mark.parametrize("files", TRAIN_VARIANTS, ids=lambda f: "+".join(p.split("/")[-1][:-5] for p in f))
def test_training_configs_have_the_model_zoo_properties(files, tiny_dataset):
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in files],
        meta_file=str(ROOT / "configs/metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(ROOT),
        dataset_dir=str(tiny_dataset),
        psf_kernel_size=[15, 15, 15],
    )
    wf.initialize()
    assert wf.check_properties() in (None, [])
    for key in ("bundle_root", "dataset_dir", "output_dir", "ckpt_dir", "device", "val_interval"):
        assert key in wf.parser, key
    for key in ("train#trainer", "train#handlers", "train#dataset", "validate#evaluator", "validate#handlers", "network_def"):
        assert wf.parser.get(key) is not None, key
    trainer = wf.parser.get_parsed_content("train#trainer")
    names = " ".join(files)
    assert trainer.blind == ("train_nonblind.json" not in names)
    assert trainer.sharp_cycle_trains_blur is True  # the paper's coupling, the default
    if "sharp_cycle.json" in names:  # the blind recipe measured best on domain B: sharp cycle only
        assert trainer.blurred_cycle_loss.weight == 0 and trainer.adversarial_weight == 0
    elif "recorrupted_cycle.json" in names:  # the blurred cycle against a recorrupted copy, squared error
        assert trainer.blurred_cycle_loss.weight == 5.0 and trainer.blurred_cycle_loss.power == 2
        assert trainer.blurred_recorruption.noise is trainer.blur_noise and trainer.blurred_recorruption.alpha == 0.5
    elif "learned_psf.json" in names:  # the PSF learned with G from its start (the blind default until session 32)
        assert trainer.blurred_cycle_loss.weight == 1.0 and trainer.adversarial_weight == 0.02 and trainer.blind
        assert wf.parser.get_parsed_content("psf_fit") is None and wf.parser["psf_learning_rate"] == 0.02
    elif "paper_recipe.json" not in names:  # per-mode defaults, each measured (docs/results.md)
        # both modes: adversarial 0.005, no blurred cycle (non-blind since session 27, blind since session 32);
        # a config that replaces the blurred cycle's loss turns it on
        assert trainer.adversarial_weight == 0.005
        cycle_config = any(c in names for c in ("background_cycle.json", "discrepancy_cycle.json"))
        assert trainer.blurred_cycle_loss.weight == (1.0 if cycle_config else 0.0)
        if trainer.blind:  # the PSF fitted to the unpaired spectra before the first iteration, then frozen
            assert isinstance(wf.parser.get_parsed_content("psf_fit"), SpectralPSFFit)
            assert wf.parser["psf_learning_rate"] == 0.0
        else:  # a fixed PSF: no fit, and no second cache of the training volumes for it
            assert wf.parser["psf_fit"] is None and wf.parser["psf_fit_dataset"] is None
    dataset = wf.parser.get_parsed_content("train#dataset")  # no Z flips of blurred crops (session 20, measured)
    if wf.parser["psf_fit_dataset"] is not None:  # the fit's larger crops come from the training cache
        fit_dataset = wf.parser.get_parsed_content("psf_fit_dataset")
        assert fit_dataset.sharp.volumes is dataset.sharp.volumes and fit_dataset.blurred.volumes is dataset.blurred.volumes
        assert fit_dataset.sharp.patch_size == tuple(wf.parser.get_parsed_content("psf_fit_patch_size"))

    def flip_axes(domain) -> list:
        return sorted(t.flipper.spatial_axis for t in domain.transform.transforms if type(t).__name__ == "RandFlipd")

    assert flip_axes(dataset.blurred) == [1, 2] and flip_axes(dataset.sharp) == [0, 1, 2]
    # foreground-weighted crops by default (session 42, measured); the paper's recipe crops uniformly
    weighted = "paper_recipe.json" not in names
    assert (dataset.sharp.weigh is not None) == weighted and (dataset.blurred.weigh is not None) == weighted
    if "discrepancy_cycle.json" in names:  # the noise-aware blurred cycle reads the calibrated noise
        assert type(trainer.blurred_cycle_loss).__name__ == "DiscrepancyCycleLoss"
        assert trainer.blurred_cycle_loss.noise is trainer.blur_noise
    if "background_cycle.json" in names:  # the blurred cycle blind to a smooth background
        loss = trainer.blurred_cycle_loss
        assert type(loss).__name__ == "HighPassCycleLoss" and loss.sigma == (4.0, 4.0, 4.0) and loss.weight == 1.0
    if "psf_vectorial.json" in names:  # the vectorial kernel module, chosen by _target_
        blur = wf.parser.get_parsed_content("blur")
        assert blur.parameterization == "vectorial" and type(blur.kernel_module).__name__ == "VectorialPSFKernel"
        assert {n for n, p in blur.kernel_module.named_parameters() if p.requires_grad} >= {"na_raw"}


@pytest.mark.parametrize(
    "files,overrides,message",
    [
        (["configs/train.json"], {"mode": "nonblind"}, "add configs/train_nonblind.json"),
        (["configs/train.json", "configs/train_nonblind.json"], {"mode": "blind"}, "without configs/train_nonblind.json"),
        (["configs/train.json"], {"mode": "conventional"}, "add configs/train_conventional.json"),
        (["configs/train.json"], {"mode": "supervised"}, "add configs/train_supervised.json"),
        (["configs/train.json"], {"mode": "nonblnd"}, "is not one of"),
        # blind with a free-form kernel: not fitted to the spectra, and the default learning rate 0 would freeze it
        (["configs/train.json", "configs/psf_constrained.json"], {}, "add configs/learned_psf.json after train.json"),
        (["configs/train.json", "configs/psf_free.json"], {}, "FreeKernel has no physical parameters"),
        (["configs/train.json"], {"psf_fit": None}, "psf_fit is null and psf_learning_rate is 0"),
    ],
)
def test_a_declared_mode_that_the_configs_do_not_build_is_refused(files, overrides, message, tiny_dataset):
    """``--mode nonblind`` on the blind list trained blind without a word; now it stops before training."""
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in ["configs/common.json", *files]], logging_file=False, workflow_type="train",
        bundle_root=str(ROOT), dataset_dir=str(tiny_dataset), psf_kernel_size=[15, 15, 15], **overrides,
    )  # fmt: skip
    with pytest.raises(Exception) as info:
        wf.initialize()
    chain, exc = [], info.value
    while exc is not None:  # MONAI wraps it in "Failed to evaluate ConfigExpression" (the CLI prints the cause last)
        chain.append(str(exc))
        exc = exc.__cause__
    assert any(message in m for m in chain), chain


@pytest.mark.parametrize("extra", [[], ["configs/train_nonblind.json"], ["configs/train_conventional.json"],
                                   ["configs/train_supervised.json"], ["configs/train_supervised.json", "configs/train_supervised_gan.json"],
                                   ["configs/learned_psf.json", "configs/psf_constrained.json"], ["configs/learned_psf.json", "configs/psf_free.json"]])  # fmt: skip
def test_every_shipped_mode_passes_its_own_check(extra, tiny_dataset):
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in ["configs/common.json", "configs/train.json", *extra]], logging_file=False,
        workflow_type="train", bundle_root=str(ROOT), dataset_dir=str(tiny_dataset), psf_kernel_size=[15, 15, 15],
    )  # fmt: skip
    wf.initialize()  # runs bundle.engine.check_mode first
    if "configs/train_supervised.json" in extra:  # the pairs are not flipped along Z (paired_flip_axes, session 21)
        dataset = wf.parser.get_parsed_content("train#dataset")
        assert sorted(t.flipper.spatial_axis for t in dataset.transform.transforms if type(t).__name__ == "RandFlipd") == [1, 2]


def test_paths_default_to_bundle_root():
    common = json.loads((ROOT / "configs/common.json").read_text())
    for key in ("dataset_dir", "output_dir", "ckpt_dir"):
        assert common[key].startswith("$@bundle_root"), key


def test_mlflow_tracking_works_offline(tiny_dataset, tmp_path):
    run_bundle(
        "training", "['configs/common.json','configs/train.json','configs/train_nonblind.json','configs/quick.json']",
        "--dataset_dir", str(tiny_dataset), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
        "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1", "--psf_kernel_size", "[15,15,15]",
        "--tracking", "mlflow",
    )
    db = tmp_path / "eval/mlruns.db"
    assert db.is_file()
    with sqlite3.connect(db) as con:
        keys = {row[0] for row in con.execute("select distinct key from metrics")}
    assert "train_loss" in keys and "val_psnr" in keys


@pytest.mark.parametrize("patch,expected", [([64, 64, 64], 32), ([32, 32, 32], 32), ([16, 64, 64], 16)])
def test_discriminator_accepts_the_training_crop(patch, expected):
    """A 17-plane stack needs 16-deep crops: the discriminator was built for 32 and refused them."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/common.json"), str(ROOT / "configs/train.json"), str(ROOT / "configs/quick.json")])
    parser["patch_size"] = patch
    d = parser.get_parsed_content("discriminator_def")()
    assert d.min_input_size == expected
    out = d(torch.rand(1, 1, *patch))
    assert all(torch.isfinite(o).all() for o in (out if isinstance(out, (list, tuple)) else [out]))


def test_discriminator_gamma_and_noise_reach_both_discriminators():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/common.json"), str(ROOT / "configs/train.json"), str(ROOT / "configs/quick.json")])
    assert parser.get_parsed_content("discriminator_def")().input_gamma == 1.0  # default: the plain intensities
    assert parser.get_parsed_content("discriminator_def")().input_noise == 0.0  # default: no instance noise
    parser["discriminator_gamma"] = 2.0
    parser["discriminator_noise"] = 0.02
    parser.parse()
    assert parser.get_parsed_content("d_sharp").input_gamma == 2.0
    assert parser.get_parsed_content("d_blurred").input_gamma == 2.0
    assert parser.get_parsed_content("d_sharp").input_noise == 0.02
    assert parser.get_parsed_content("d_blurred").input_noise == 0.02


def test_blur_noise_scale_reaches_the_blur_paths_noise():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/common.json"), str(ROOT / "configs/train.json"), str(ROOT / "configs/quick.json")])
    assert parser.get_parsed_content("blur_noise").scale == 1.0  # default: the estimated level itself
    parser["blur_noise_scale"] = 0.7
    parser.parse()
    assert parser.get_parsed_content("blur_noise").scale == 0.7


def test_blur_offset_shift_reaches_the_calibration():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/common.json"), str(ROOT / "configs/train.json"), str(ROOT / "configs/quick.json")])
    calibration = next(h for h in parser["train#handlers"] if h.get("_target_") == "bundle.handlers.BlurCalibration")
    assert (parser["blur_offset_shift"], calibration["offset_shift"]) == (0.0, "@blur_offset_shift")  # default: no shift


WORKFLOW_LISTS = {"imports", "initialize", "run", "finalize", "training", "inference", "evaluate", "simulate"}


def test_every_config_key_is_used():
    """No dead keys: each top-level key of each config is referenced (``@key``/``%key``) by some config,
    or is a workflow's run list; a key that nothing reads would be a setting that silently does nothing."""
    import re

    configs = {p: json.loads(p.read_text()) for p in sorted((ROOT / "configs").glob("*.json")) if p.name != "metadata.json"}
    text = "\n".join(p.read_text() for p in configs)
    dead = [
        f"{p.name}: {key}"
        for p, config in configs.items()
        for key in config
        if "#" not in key and key not in WORKFLOW_LISTS and not re.search(rf"[@%]{re.escape(key)}(?![A-Za-z0-9_])", text)
    ]
    assert not dead, dead


@pytest.mark.parametrize(
    "files,run_id",
    [
        (["common.json", "train.json", "quick.json"], "training"),
        (["common.json", "train.json", "psf_vectorial.json", "quick.json", "own_data.json"], "training"),
        (["common.json", "train.json", "multi_gpu_train.json"], "training"),
        (["common.json", "inference.json"], "inference"),
    ],
)
def test_setup_runs_once_per_command(files, run_id):
    """``python -m monai.bundle run <run_id>`` evaluates the ``initialize`` list, then ``<run_id>``'s:
    seeding, the mode check and cuDNN settings belong to the first only (seeding twice, with components
    built in between, would make a run's random stream depend on which entry point started it)."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    executed = list(parser.get("initialize", [])) + list(parser[run_id])
    setup = [e for e in executed if "set_determinism" in e or "check_mode" in e or "cudnn_benchmark" in e]
    assert len(setup) == len(set(setup)), setup
    assert sum("set_determinism" in e for e in executed) == 1, executed
    assert not any(e in parser.get("initialize", []) for e in parser[run_id]), parser[run_id]


# keys of common.json that a blind training does not read: inference's (sliding window), the optics keys
# of other configurations (na: own data / simulation; n_sample: the vectorial kernel; psf_file: non-blind),
# and bundle_root (read by the default paths, which this test overrides)
NOT_READ_BY_BLIND_TRAINING = {"window_inferer", "sliding_window_batch_size", "na", "n_sample", "psf_file", "bundle_root"}


@pytest.mark.slow
def test_every_key_is_read_during_a_real_training_run(tiny_dataset, tmp_path):
    """The static dead-key test above, checked on what a real run resolves: every top-level key of
    common.json (but the documented inference-only and other-configuration keys), train.json and
    quick.json is read by one blind training iteration (a container counts when its items are)."""
    files = [str(ROOT / "configs" / f) for f in ("common.json", "train.json", "quick.json")]
    workflow = ConfigWorkflow(
        config_file=files, workflow_type="train", run_id="training", logging_file=False, bundle_root=str(ROOT),
        dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"),
        max_epochs=1, epoch_length=1, val_interval=1, patch_size=[32, 32, 32], generator_features=[4, 8, 16, 4],
        discriminator_channels=4, discriminator_layers=2, discriminator_scales=1, psf_kernel_size=[15, 15, 15],
        num_workers=0,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    resolved = set(workflow.parser.ref_resolver.resolved_content)
    unread = {}
    for path in files:
        keys = [k for k in json.loads(Path(path).read_text()) if "#" not in k and k not in WORKFLOW_LISTS]
        unread[Path(path).name] = [
            k for k in keys if k not in resolved and not any(r.startswith((f"{k}#", f"{k}{ID_SEP_KEY}")) for r in resolved)
        ]
    assert set(unread["common.json"]) == NOT_READ_BY_BLIND_TRAINING, unread
    assert unread["train.json"] == [] and unread["quick.json"] == [], unread


def test_mlflow_tracking_settings_log_what_a_reader_needs(tiny_dataset, tmp_path):
    """``--tracking configs/tracking/mlflow.json``: loss terms and learning rates per iteration, PSF
    parameters and FWHMs per epoch, run parameters and tags, and the PSF figure and model as artifacts;
    read back from the sqlite store and the artifact folder."""
    run_bundle(
        "training", "['configs/common.json','configs/train.json','configs/quick.json']",
        "--dataset_dir", str(tiny_dataset), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
        "--max_epochs", "2", "--epoch_length", "2", "--val_interval", "1", "--psf_kernel_size", "[15,15,15]",
        "--patch_size", "[32,32,32]", "--tracking", str(ROOT / "configs/tracking/mlflow.json"),
        *CHEAP_PSF_FIT_ARGS,
    )
    with sqlite3.connect(tmp_path / "eval/mlruns.db") as con:
        metrics = {row[0] for row in con.execute("select distinct key from metrics")}
        steps = {row[0] for row in con.execute("select step from metrics where key = 'cycle_sharp'")}
        params = dict(con.execute("select key, value from params").fetchall())
        tags = dict(con.execute("select key, value from tags").fetchall())
        [location] = [row[0] for row in con.execute("select artifact_location from experiments where name = 'cyclegan_deconvolution'")]
    for key in ("train_loss", "cycle_sharp", "cycle_blurred", "adv_sharp", "adv_blurred", "d_sharp", "d_blurred",
                "lr_g_group_0", "lr_d_group_0", "psf_na", "psf_gain", "psf_fwhm_z_um", "val_psnr"):
        assert key in metrics, (key, sorted(metrics))
    assert steps == {1, 2, 3, 4}  # every iteration
    assert params["mode"] == "blind" and params["psf_kernel"] == "bundle.networks.kernels.BornWolfKernel" and "learning_rate" in params
    assert tags["mode"] == "blind" and tags["seed"] == params["seed"]
    artifacts = {p.name for p in Path(location.replace("file://", "")).rglob("*") if p.is_file()}
    assert {"psf.png", "psf.pt", "model.pt", "blur.tif"} <= artifacts, artifacts
    assert str(tmp_path) in location  # artifacts under the run's output folder, not the working directory


@pytest.mark.parametrize(
    "extra,blurred,sharp",
    [
        (["configs/domain_scale.json"], "train/blurred", "train/sharp"),
        (["configs/train_supervised.json", "configs/domain_scale_supervised.json"], "train/blurred", "train/blurred_ground_truth"),
    ],
    ids=["cyclegan", "supervised"],
)
def test_domain_scale_reads_the_training_folders_and_reaches_data_and_network(extra, blurred, sharp, tiny_dataset):
    """configs/domain_scale.json (domain_scale_supervised.json for the paired baselines): one range per
    domain, pooled over the training folders; the datasets, the validation pipeline and the generator's
    buffer all get it."""
    import torch

    from bundle.data import domain_intensity_range

    parser = ConfigParser()
    parser.read_config(["configs/common.json", "configs/train.json", *extra])
    parser["dataset_dir"] = str(tiny_dataset)
    expected_blurred = domain_intensity_range(str(tiny_dataset / blurred), parser["blurred_percentiles"])
    expected_sharp = domain_intensity_range(str(tiny_dataset / sharp), parser["sharp_percentiles"])
    assert parser.get_parsed_content("blurred_intensity_range") == pytest.approx(expected_blurred)
    assert parser.get_parsed_content("sharp_intensity_range") == pytest.approx(expected_sharp)
    net = parser.get_parsed_content("network_def")
    assert net.trained_input_range == pytest.approx(tuple(expected_blurred))
    dataset = parser.get_parsed_content("validate#dataset")
    item = dataset[0]
    raw = torch.as_tensor(__import__("tifffile").imread(dataset.data[0]["image"]))
    lo, hi = expected_blurred
    torch.testing.assert_close(item["image"][0].float(), ((raw.float() - lo) / (hi - lo)).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_rl_guided_config_builds_the_guided_generator_with_the_blur_paths_psf(tiny_dataset):
    """``configs/rl_guided.json`` after ``train_nonblind.json``: G is an ``RLGuidedUNet`` whose guide PSF is
    the non-blind blur path's kernel (the one the cycle blurs with), with the configured RL iterations."""
    from bundle.networks import RLGuidedUNet

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("common.json", "train.json", "train_nonblind.json", "rl_guided.json", "quick.json")])
    parser.update({"dataset_dir": str(tiny_dataset), "psf_kernel_size": [15, 15, 15], "generator_rl_iterations": 12, "device": "$torch.device('cpu')"})
    g = parser.get_parsed_content("g_deblur")
    kernel = parser.get_parsed_content("blur_path").kernel().detach()
    assert isinstance(g, RLGuidedUNet) and int(g.guide_iterations) == 12
    torch.testing.assert_close(g.guide_psf, kernel / kernel.sum())
