"""On/off keys: the spellings a user types on the command line mean what they say."""

import pytest
from monai.bundle import ConfigWorkflow

from bundle.flags import as_flag

from conftest import ROOT


@pytest.mark.parametrize("value", [True, 1, "true", "True", "YES", "on", "1", " true "])
def test_true_spellings(value):
    assert as_flag(value, "x") is True


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "no", "OFF", "0", "null", ""])
def test_false_spellings(value):
    assert as_flag(value, "x") is False


@pytest.mark.parametrize("value", ["flase", 2, 0.5, [], "maybe"])
def test_anything_else_is_refused_with_the_key(value):
    with pytest.raises(ValueError, match="estimate_blur_noise must be true or false"):
        as_flag(value, "estimate_blur_noise")


def test_command_line_false_switches_training_keys_off(tiny_dataset):
    """``--estimate_blur_noise false --resume false`` reach the components as the *strings* 'false'
    (the command line parses only Python literals): they must switch estimation and resuming off."""
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in ("configs/common.json", "configs/train.json")],
        meta_file=str(ROOT / "configs/metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(ROOT),
        dataset_dir=str(tiny_dataset),
        psf_kernel_size=[15, 15, 15],
        estimate_blur_noise="false",
        resume="false",
        overwrite="false",
    )
    wf.initialize()
    handlers = wf.parser.get_parsed_content("train#handlers")
    calibration = [h for h in handlers if type(h).__name__ == "BlurCalibration"]
    assert calibration and calibration[0].estimate_noise is False
    assert wf.parser.get_parsed_content("resuming") is False
    checkpointers = [h for h in handlers if hasattr(h, "resume") and hasattr(h, "overwrite")]
    assert checkpointers and all(h.resume is False and h.overwrite is False for h in checkpointers)


def test_command_line_false_switches_the_window_progress_bar_off():
    """``--progress false`` on inference reaches the sliding-window inferer as the string 'false'."""
    from monai.inferers import SlidingWindowInferer
    from torch import nn

    from bundle.inference import Deconvolver

    deconvolver = Deconvolver(nn.Identity(), inferer=SlidingWindowInferer(roi_size=(32, 32, 32), progress="false"), roi_size=(32, 32, 32))
    assert all(inf.progress is False for inf in [deconvolver.inferer, deconvolver.inferer_for((32, 32, 32))[1]])
