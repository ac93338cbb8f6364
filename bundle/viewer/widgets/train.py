"""The *Train* dock widget: the bundle's training workflow on the user's folders, with progress and Cancel."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import (
    ComboBox,
    FileEdit,
    SpinBox,
)
from superqt.utils import ensure_main_thread

from bundle.viewer.widgets._base import _DECONVOLVE_WIDGETS, BUNDLE_ROOT, TrainingCancelled, _report, _Worker
from bundle.viewer.widgets.deconvolve import DeconvolveWidget


class TrainWidget(_Worker):
    """Train a model on folders of blurred and sharp stacks with the bundle's ``training`` workflow.

    The same configs as the command line (``configs/common.json``, ``train.json``, plus
    ``train_nonblind.json`` for non-blind and ``quick.json`` for the quick settings); the iteration
    count sets ``max_epochs`` (epochs of ``epoch_length`` iterations). Progress and validation
    scores are shown as they come; Cancel stops after the current iteration (checkpoints are kept:
    the command line's ``--resume true`` continues). When done, the model is handed to the viewer's
    Deconvolve widget (one is opened if none is).

    Args:
        napari_viewer: the viewer (napari passes it).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer, "Train", labels=True)
        self.blurred_dir = FileEdit(label="blurred stacks", mode="d")
        self.sharp_dir = FileEdit(label="sharp stacks", mode="d")
        self.mode = ComboBox(label="mode", choices=["blind", "non-blind"], value="blind")
        self.psf_file = FileEdit(label="PSF (non-blind)", mode="r", filter="*.tif *.tiff *.nii *.nii.gz")
        self.settings = ComboBox(label="settings", choices=["quick", "full"], value="quick")
        self.iterations = SpinBox(label="iterations", value=400, min=1, max=1_000_000, step=100)
        self.output_dir = FileEdit(label="output folder", mode="d")
        self.bundle_root = FileEdit(label="bundle folder", mode="d", value=BUNDLE_ROOT)
        #: extra config overrides (config id -> value), e.g. ``{"generator_features": [4, 8, 16, 4]}``
        self.overrides: dict[str, Any] = {}
        self.model_path: Path | None = None
        self.scores: list[dict[str, float]] = []
        self.extend([self.blurred_dir, self.sharp_dir, self.mode, self.psf_file, self.settings, self.iterations,
                     self.output_dir, self.bundle_root, self.run_button, self.cancel_button, self.progress, self.status])  # fmt: skip

    def workflow_arguments(self) -> tuple[list[str], dict[str, Any], int]:
        """``(config files, overrides, iterations)`` of the run the widget's settings describe."""
        root = Path(self.bundle_root.value)
        if not (root / "configs" / "train.json").is_file():
            raise ValueError(f"{root}: no configs/train.json; set 'bundle folder' to the bundle (the folder with configs/)")
        names = ["common.json", "train.json"]
        names += ["train_nonblind.json"] if self.mode.value == "non-blind" else []
        names += ["quick.json"] if self.settings.value == "quick" else []
        out = Path(self.output_dir.value)
        blurred, sharp = Path(self.blurred_dir.value), Path(self.sharp_dir.value)
        for what, folder in (("blurred stacks", blurred), ("sharp stacks", sharp), ("output folder", out)):
            if str(folder) in ("", ".") or not folder.is_dir():
                raise ValueError(f"{folder}: choose an existing folder for the {what}")
        iterations = int(self.iterations.value)
        epoch_length = min(25, iterations)
        overrides: dict[str, Any] = {
            "train#dataset#blurred_dir": str(blurred),
            "train#dataset#sharp_dir": str(sharp),
            "dataset_dir": str(out),  # no val/ there: the model of record is the last one
            "output_dir": str(out / "eval"),
            "ckpt_dir": str(out / "models"),
            "epoch_length": epoch_length,
            "max_epochs": math.ceil(iterations / epoch_length),
        }
        if self.mode.value == "non-blind":
            psf = Path(self.psf_file.value)
            if str(self.psf_file.value) in ("", ".") or not psf.is_file():
                raise ValueError(f"{psf}: non-blind training needs the PSF file")
            overrides["psf_file"] = str(psf)
        overrides.update(self.overrides)
        return [str(root / "configs" / n) for n in names], overrides, overrides["max_epochs"] * overrides["epoch_length"]

    def start(self) -> None:
        """Check the settings, then train in a worker thread."""
        try:
            files, overrides, total = self.workflow_arguments()
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        self.scores = []
        self.status.value = f"training {total} iterations..."
        self._launch(self._train, files, overrides, total, on_result=self._trained)

    def _train(self, files: list[str], overrides: dict[str, Any], total: int) -> Path:
        from ignite.engine import Events
        from monai.bundle import ConfigWorkflow

        workflow = ConfigWorkflow(
            config_file=files, workflow_type="train", run_id="training", logging_file=False,
            bundle_root=str(Path(files[0]).parents[1]), **overrides,
        )  # fmt: skip
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")

        def iteration(engine: Any) -> None:
            if self._cancel.is_set():
                engine.terminate()
            self._set_progress(engine.state.iteration, total, f"iteration {engine.state.iteration} / {total}")

        trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration)
        validator = workflow.parser.get_parsed_content("validate#evaluator") if "validate#evaluator" in workflow.parser else None
        if validator is not None:
            validator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: self._validated(dict(engine.state.metrics)))
        workflow.run()
        workflow.finalize()
        model = Path(overrides["ckpt_dir"]) / "model.pt"
        if self._cancel.is_set():
            raise TrainingCancelled(
                f"training cancelled at iteration {trainer.state.iteration}; checkpoints are in {overrides['ckpt_dir']}"
            )
        if not model.is_file():
            raise RuntimeError(f"training finished but wrote no {model}")
        return model

    @ensure_main_thread
    def _validated(self, metrics: dict[str, float]) -> None:
        self.scores.append(metrics)
        self.status.value = "validation: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))

    def _trained(self, model: Path) -> None:
        self.model_path = model
        self.status.value = f"done: {model}"
        targets = [w for w in list(_DECONVOLVE_WIDGETS) if w.viewer is self.viewer]
        if not targets:
            widget = DeconvolveWidget(self.viewer)
            self.viewer.window.add_dock_widget(widget, name="Deconvolve")
            targets = [widget]
        for widget in targets:
            widget.set_model(model)
