"""Every command and override the README and the user guide show builds its workflow and runs.

The commands are parsed from the documents themselves, so a renamed config key, a removed config file
or an override that no longer applies fails here rather than for a user. Each workflow is built
(``initialize()``, ``check_properties()``) and run for one tiny iteration or volume: paths point to a
tiny simulated dataset and a small model, and sizes are shrunk (the shown overrides stay as written).
"""

from __future__ import annotations

import ast
import json
import re
import shlex

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle.networks import DeblurUNet

from conftest import CHEAP_PSF_FIT, ROOT

DOCS = ("README.md", "docs/user_guide.md")
# command-line arguments of `monai.bundle run` that are not config ids
CLI_ARGS = {"config_file", "meta_file", "logging_file", "bundle_root", "tracking"}


def _commands() -> list[tuple[str, str, list[str], dict[str, str]]]:
    """``(document, run_id, config files, {override: value})`` of every ``monai.bundle run`` command."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text().replace("\\\n", " ")
        for match in re.finditer(r"python -m monai\.bundle run [^\n`|]*", text):
            words = shlex.split(match.group(0))[4:]
            run_id, args = words[0], words[1:]
            overrides = {}
            for key, value in zip(args[::2], args[1::2], strict=False):
                overrides[key.lstrip("-")] = value
            value = overrides.pop("config_file")
            files = ast.literal_eval(value) if value.startswith("[") else [value]
            found.append((doc, run_id, list(files), overrides))
    return found


COMMANDS = _commands()


def _ids(files: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in files])
    return parser


def _has(parser: ConfigParser, key: str) -> bool:
    """``key`` (``a#b#c``) is an id of the parsed configs, or a new key under an existing one."""
    for candidate in (key, key.rsplit("#", 1)[0]):
        try:
            parser[candidate]
            return True
        except (KeyError, ValueError, IndexError, TypeError):
            continue
    return False


def test_the_documents_show_commands_for_every_workflow():
    run_ids = {run_id for _, run_id, _, _ in COMMANDS}
    assert {"simulate", "training", "inference", "evaluate"} <= run_ids, run_ids
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("doc,run_id,files,overrides", COMMANDS, ids=lambda v: v if isinstance(v, str) else None)
def test_every_shown_override_is_a_config_id(doc, run_id, files, overrides):
    parser = _ids(files)
    assert run_id in parser, f"{doc}: {run_id} is not a workflow of {files}"
    for key in overrides:
        if key in CLI_ARGS:
            continue
        assert _has(parser, key), f"{doc}: --{key} is not a config id of {files}"


GROUPS = [
    ["configs/common.json", "configs/train.json", "configs/train_nonblind.json", "configs/rl_guided.json", "configs/quick.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/paper_recipe.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/learned_psf.json"],
    ["configs/common.json", "configs/train.json", "configs/train_supervised.json", "configs/train_supervised_gan.json"],
    ["configs/common.json", "configs/train.json", "configs/train_conventional.json", "configs/multi_gpu_train.json"],
    ["configs/common.json", "configs/inference.json", "configs/inference_rl.json", "configs/evaluate.json"],
    ["configs/simulate.json", "configs/simulate_vesicles.json"],
    ["configs/common.json", "configs/train.json", "configs/psf_vectorial.json", "configs/own_data.json", "configs/val_simulated.json"],
]


def test_every_backticked_override_in_the_guide_is_a_config_id():
    """Overrides shown alone (``--inference_roi_size "[64,64,64]"``) name ids of the configs."""
    parsers = [_ids(group) for group in GROUPS]
    script_args = {"resume", "overwrite", "scale", "methods", "jobs", "threads", "max-epochs", "seed", "seeds", "quick", "out",
                   "domain"}
    for doc in DOCS:
        for key in re.findall(r"`--([a-z_#0-9]+)[ =`]", (ROOT / doc).read_text()):
            if key in CLI_ARGS or key in script_args:
                continue
            assert any(_has(p, key) for p in parsers), f"{doc}: `--{key}` is not a config id"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    net = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False, voxel_size=(0.1, 0.1, 0.1))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("docs_model")
    torch.save(net.eval().state_dict(), folder / "model.pt")
    return folder


TINY_TRAINING = {
    "max_epochs": 1, "epoch_length": 1, "val_interval": 1, "batch_size": 1, "patch_size": [32, 32, 32],
    "generator_features": [4, 8, 16, 4], "discriminator_channels": 4, "discriminator_layers": 2,
    "discriminator_scales": 1, "psf_kernel_size": [15, 15, 15], "num_workers": 0,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("doc,run_id,files,overrides", COMMANDS, ids=lambda v: v if isinstance(v, str) else None)
def test_every_shown_command_builds_and_runs(doc, run_id, files, overrides, tiny_dataset, small_model, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    values = {k: v for k, v in overrides.items() if k not in CLI_ARGS}
    for key, value in list(values.items()):
        try:
            values[key] = json.loads(value)
        except ValueError:
            try:  # a Python literal, as the command line (fire) reads it: "['depth']"
                values[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # a string
    # paths of the example onto tiny data; sizes shrunk
    for key in ("input", "ground_truth_dir", "dataset_dir", "train#dataset#sharp_dir", "train#dataset#blurred_dir"):
        values.pop(key, None)
    values.update(dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"))
    if run_id == "simulate":
        values.update(dataset_dir=str(tmp_path / "sim"), shape=[16, 32, 32], eval_shape=[16, 32, 32], n_train=1,
                      n_val=1, n_test=1, psf_shape=[7, 7, 7])  # fmt: skip
    elif run_id == "training":
        values.update(TINY_TRAINING)
        if _ids(files)["psf_fit"] is not None and "psf_fit" not in values:  # the blind default's fit, on fewer crops
            values.update(CHEAP_PSF_FIT)
        if "train#dataset#sharp_dir" in overrides:  # the user guide's own-data example
            values["train#dataset#sharp_dir"] = str(tiny_dataset / "train/sharp")
            values["train#dataset#blurred_dir"] = str(tiny_dataset / "train/blurred")
            values["voxel_size"] = [0.1, 0.1, 0.1]
        if "blurred_dir" in overrides:  # "I only have my stacks": the tiny blurred stacks alone
            values["blurred_dir"] = str(tiny_dataset / "train/blurred")
    else:  # inference, evaluate: the small model, RL with few iterations
        values.update(ckpt_dir=str(small_model), progress=False)
        if "rl_num_iter" in values:
            values.update(rl_num_iter=2, psf_file=str(tiny_dataset / "psf.tif"))
    workflow_type = {"training": "train", "inference": "infer", "evaluate": "infer", "simulate": "infer"}[run_id]
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in files], workflow_type=workflow_type, logging_file=False,
        bundle_root=str(ROOT), run_id=run_id, **values,
    )  # fmt: skip
    wf.initialize()
    if run_id in ("training", "inference"):
        assert wf.check_properties() in (None, []), f"{doc}: {run_id} misses model-zoo properties"
    wf.run()
    out = tmp_path / ("sim" if run_id == "simulate" else "out")
    assert out.is_dir() and any(out.rglob("*")), f"{doc}: {run_id} wrote nothing"
    if run_id == "training" and wf.parser["mode"] == "blind" and wf.parser["psf_fit"] is not None:
        # the blind default: the PSF was fitted before training, and recorded
        record = json.loads((out / "calibration.json").read_text())
        assert record["psf_fit"]["loss_after"] <= record["psf_fit"]["loss_before"], record["psf_fit"]
