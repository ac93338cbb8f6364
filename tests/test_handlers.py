"""Handlers: checkpoints load no code, a fresh run starts a fresh record, history follows resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from bundle.handlers import (
    BestModelSaver,
    ModelWithoutValidation,
    ResumableCheckpoint,
    ValidationHistory,
    load_training_checkpoint,
)


class _WritesMarker:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A ``.pt`` shaped like a training checkpoint whose pickle runs code when fully unpickled."""
    torch.save({"trainer": {"epoch": 1, "iteration": 1}, "g_deblur": _WritesMarker(marker)}, path)
    return path


def test_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "checkpoint_7.pt", marker)
    with pytest.raises(RuntimeError, match=r"checkpoint_7\.pt: refused to resume.*names the global 'exec'"):
        load_training_checkpoint(path)
    assert not marker.exists()
    # positive control: the same file does run code when fully unpickled (the test's premise holds)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_load_training_checkpoint_names_bad_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"empty\.pt: cannot read"):
        load_training_checkpoint(tmp_path / "empty.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(RuntimeError, match=r"list\.pt: not a training checkpoint"):
        load_training_checkpoint(tmp_path / "list.pt")


def _engine_with_checkpoints(save_dir: Path, **kwargs) -> tuple[Engine, torch.nn.Module]:
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(str(save_dir), {"net": net}, **kwargs).attach(engine)
    return engine, net


def test_resumable_checkpoint_round_trip_and_refusal(tmp_path):
    engine, net = _engine_with_checkpoints(tmp_path)
    engine.run([0] * 3, max_epochs=2)
    assert (tmp_path / "checkpoint_6.pt").is_file()
    state = load_training_checkpoint(tmp_path / "checkpoint_6.pt")  # written by the bundle: loads
    assert state["trainer"]["iteration"] == 6
    torch.testing.assert_close(state["net"]["weight"], net.weight.detach())

    # a fresh run into the same folder refuses instead of mixing runs ...
    with pytest.raises(FileExistsError, match=r"earlier training run \(newest: checkpoint_6\.pt\).*--resume true"):
        _engine_with_checkpoints(tmp_path)
    # ... resumes with resume=True ...
    resumed, _ = _engine_with_checkpoints(tmp_path, resume=True)
    resumed.run([0] * 3, max_epochs=3)
    assert resumed.state.iteration == 9
    # ... and starts over with overwrite=True (the earlier checkpoints are gone)
    _engine_with_checkpoints(tmp_path, overwrite=True)
    assert not list(tmp_path.glob("checkpoint_*.pt"))


def _validate(handler, epoch: int, score: float) -> None:
    """Call a validation handler as ``ValidationHandler`` would after the trainer's ``epoch``."""
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    engine.state.metrics = {"val_psnr": score}
    engine.state.key_metric_name = "val_psnr"
    handler(engine)


def test_fresh_run_never_keeps_an_earlier_model_silently(tmp_path):
    first = BestModelSaver(str(tmp_path), torch.nn.Linear(2, 1))
    first.attach(Engine(lambda e, b: None))
    _validate(first, 1, 25.78)
    old = torch.load(tmp_path / "model.pt", weights_only=True)

    with pytest.raises(FileExistsError, match=r"model\.(pt|json): a model of an earlier training run"):
        BestModelSaver(str(tmp_path), torch.nn.Linear(2, 1)).attach(Engine(lambda e, b: None))

    # --overwrite: a worse first score than the earlier run's is still written
    net = torch.nn.Linear(2, 1)
    fresh = BestModelSaver(str(tmp_path), net, overwrite=True)
    fresh.attach(Engine(lambda e, b: None))
    _validate(fresh, 1, 21.48)
    assert json.loads((tmp_path / "model.json").read_text())["score"] == pytest.approx(21.48)
    new = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(new["weight"], net.weight.detach())
    assert not torch.equal(new["weight"], old["weight"])

    # resuming keeps the record: a worse score does not replace the model
    resumed = BestModelSaver(str(tmp_path), torch.nn.Linear(2, 1), resume=True)
    resumed.attach(Engine(lambda e, b: None))
    _validate(resumed, 2, 20.0)
    assert json.loads((tmp_path / "model.json").read_text())["score"] == pytest.approx(21.48)


@pytest.mark.parametrize("score, below", [(24.47, True), (24.54, True), (24.76, False)])
def test_a_model_no_better_than_its_input_ends_with_a_warning(tmp_path, caplog, score, below):
    saver = BestModelSaver(str(tmp_path), torch.nn.Linear(2, 1))
    validator = Engine(lambda e, b: None)
    validator.data_loader = [0]  # validation data present
    validator.state.epoch = 36
    validator.state.metrics = {"val_psnr": score, "val_input_psnr": 24.54, "val_ssim": 0.8}
    validator.state.key_metric_name = "val_psnr"
    saver(validator)
    with caplog.at_level("WARNING", logger="bundle.handlers.selection"):
        ModelWithoutValidation(saver, validator).completed(Engine(lambda e, b: None))
    record = json.loads((tmp_path / "model.json").read_text())
    assert record.get("below_input", False) is below and record["score"] == pytest.approx(score)
    assert ("no better on validation than the unprocessed input (24.5400)" in caplog.text) is below
    assert (tmp_path / "model.pt").is_file()


def test_validation_history_fresh_and_resumed(tmp_path):
    path = tmp_path / "validation.json"
    path.write_text(json.dumps([{"epoch": 2, "val_psnr": 30.0}, {"epoch": 4, "val_psnr": 31.0}]))
    fresh = ValidationHistory(str(path), epoch_length=10)
    _validate(fresh, 2, 20.0)
    _validate(fresh, 4, 21.0)
    assert [(e["iteration"], e["val_psnr"]) for e in json.loads(path.read_text())] == [(20, 20.0), (40, 21.0)]

    # resumed after a kill at epoch 5 (its validation at epoch 4 is re-run): no duplicate entry
    path.write_text(json.dumps([{"epoch": 2, "val_psnr": 20.0}, {"epoch": 4, "val_psnr": 21.0}]))
    resumed = ValidationHistory(str(path), epoch_length=10, resume=True)
    _validate(resumed, 4, 22.0)
    _validate(resumed, 6, 23.0)
    assert [(e["epoch"], e["val_psnr"]) for e in json.loads(path.read_text())] == [(2, 20.0), (4, 22.0), (6, 23.0)]


def test_every_n_iterations_logs_a_line_every_n():
    from bundle.handlers import every_n_iterations

    assert [i for i in range(1, 121) if every_n_iterations(50)(None, i)] == [1, 51, 101]
    assert not any(every_n_iterations(0)(None, i) for i in range(1, 10))


def test_checkpoint_is_saved_after_the_epochs_validation_and_pools_are_saved(tmp_path):
    """Handlers attached after the checkpoint (the validation) run before the save at the epoch's end,
    so a run killed during a validation redoes it; pools created after attach are saved too."""
    from ignite.engine import Engine, Events

    from bundle.handlers import ResumableCheckpoint
    from bundle.image_pool import ImagePool

    engine = Engine(lambda e, b: None)
    net = torch.nn.Linear(2, 2)
    ResumableCheckpoint(str(tmp_path), {"net": net}).attach(engine)
    engine.sharp_pool = ImagePool(pool_size=2, seed=0)  # as CycleGANTrainer: pools after the handlers
    seen: list[bool] = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append((tmp_path / "checkpoint_2.pt").exists()))
    engine.run([0, 1], max_epochs=1)
    assert seen == [False] and (tmp_path / "checkpoint_2.pt").is_file()
    assert "sharp_pool" in torch.load(tmp_path / "checkpoint_2.pt", weights_only=True)


def test_random_states_round_trip_including_transform_generators():
    import random

    from monai.transforms import Compose, RandFlipd, RandSpatialCropd

    from bundle.handlers import RandomStates, transform_random_states

    class Holder:
        pass

    Holder.__module__ = "bundle.test"
    holder = Holder()
    holder.transform = Compose([RandSpatialCropd("x", (2, 2, 2), random_size=False), RandFlipd("x", prob=0.5)])
    states = RandomStates(holder)
    assert len(transform_random_states(holder)) >= 3  # the Compose's and each transform's own generator
    saved = torch.load(_roundtrip(states.state_dict()), weights_only=True)
    draws = [random.random(), np.random.rand(), torch.rand(1).item()] + [r.rand() for r in transform_random_states(holder)]
    states.load_state_dict(saved)
    again = [random.random(), np.random.rand(), torch.rand(1).item()] + [r.rand() for r in transform_random_states(holder)]
    assert draws == again


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    """A library call must not switch the process's backend (a napari/Qt session would lose its own)."""
    code = (
        "import matplotlib, numpy as np\n"
        "from bundle.handlers import save_orthoslices\n"
        f"save_orthoslices(np.random.rand(8, 16, 16), r'{tmp_path / 'f.png'}', voxel_size=(0.2, 0.1, 0.1))\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MPLBACKEND": "svg"}, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "svg"
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_learned_psf_goes_where_the_config_key_says_and_evaluate_reads_it(tmp_path):
    from monai.bundle import ConfigParser

    from bundle.networks import PSFLayer
    from bundle.networks.kernels import FixedKernel

    blur = PSFLayer(FixedKernel(shape=(5, 5, 5)))
    saver = BestModelSaver(
        str(tmp_path / "models"), torch.nn.Linear(2, 1), companions={"blur": blur}, exports={"blur": str(tmp_path / "psf" / "h.tif")}
    )
    saver.attach(Engine(lambda e, b: None))
    _validate(saver, 1, 25.0)
    assert (tmp_path / "psf" / "h.tif").is_file() and (tmp_path / "psf" / "h.json").is_file()
    assert (tmp_path / "models" / "blur.pt").is_file() and not (tmp_path / "models" / "blur.tif").exists()
    # one key: training's saver and evaluation's report both take `learned_psf`
    parser = ConfigParser()
    parser.read_config(["configs/common.json", "configs/train.json", "configs/inference.json", "configs/evaluate.json"])
    parser["learned_psf"] = str(tmp_path / "elsewhere.tif")
    saver_config = next(h for h in parser["validate"]["handlers"] if h.get("_target_", "").endswith("BestModelSaver"))
    assert saver_config["exports"] == {"blur": "@learned_psf"} and parser["report"]["learned_psf"] == "@learned_psf"
    assert parser.get_parsed_content("learned_psf") == str(tmp_path / "elsewhere.tif")
