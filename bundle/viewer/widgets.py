"""napari dock widgets: *Deconvolve*, *PSF* and *Train*, on the bundle's Python API and workflows.

Each long computation runs in a napari thread worker (the viewer stays responsive), reports progress
to a progress bar through a callback, and stops at the next step when Cancel is pressed. Errors
become napari notifications with the same text as the command line's (the same functions raise
them). Written with magicgui containers (napari's own widget toolkit); the computations are the
bundle's: :func:`bundle.inference.deconvolve`, :mod:`bundle.physics` PSFs, the ``training`` workflow
of ``configs/train.json``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import weakref
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from superqt.utils import ensure_main_thread

from bundle.inference import PRECISIONS, DeconvolutionCancelled, deconvolve
from bundle.io import load_volume, save_volume, validate_volume

__all__ = ["DeconvolveWidget", "PSFWidget", "TrainWidget", "TrainingCancelled", "BUNDLE_ROOT"]

logger = logging.getLogger(__name__)

#: the folder holding ``configs/`` (the checkout or unpacked bundle this package runs from)
BUNDLE_ROOT = Path(__file__).resolve().parents[2]

_DECONVOLVE_WIDGETS: weakref.WeakSet = weakref.WeakSet()  # where a trained model is handed over


class TrainingCancelled(RuntimeError):
    """Raised in the Train widget's worker when Cancel stopped the run."""


def _report(message: str, error: bool = True) -> str:
    (show_error if error else show_info)(message)
    return message


class _Worker(Container):
    """A container with a progress bar, Run/Cancel buttons and one napari thread worker at a time.

    Subclasses define ``start()`` (what the Run button does: check the inputs, then ``_launch``)."""

    def __init__(self, viewer: napari.Viewer, run_text: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.viewer = viewer
        self.worker: Any = None
        self.last_message: str | None = None
        self._cancel = threading.Event()
        self.run_button = PushButton(text=run_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)

    def cancel(self) -> None:
        """Stop the running computation at its next step (safe from any thread)."""
        self._cancel.set()
        self._set_status("cancelling...")

    @ensure_main_thread
    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _launch(self, function: Any, *args: Any, on_result: Any) -> None:
        self._cancel.clear()
        self.progress.value = 0
        self.run_button.enabled, self.cancel_button.enabled = False, True
        worker = create_worker(function, *args, _start_thread=False, _ignore_errors=True)  # errors: self._failed
        worker.returned.connect(on_result)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()

    @ensure_main_thread
    def _set_progress(self, done: int, total: int, text: str = "") -> None:
        self.progress.max = max(1, int(total))
        self.progress.value = min(int(done), self.progress.max)
        if text:
            self.status.value = text

    def _failed(self, exc: BaseException) -> None:
        cancelled = isinstance(exc, (DeconvolutionCancelled, TrainingCancelled))
        self.last_message = _report(str(exc), error=not cancelled)
        self.status.value = str(exc)

    def _finished(self) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self.worker = None


class DeconvolveWidget(_Worker):
    """Deconvolve an image layer with a trained model; the result is added as a new layer.

    Settings and defaults are the command line's (``configs/inference.json``): windows planned per
    stack (``roi_size="auto"``) within ``voxels per pass``, precision ``auto`` (bfloat16 where the
    hardware has it, else float32), percentiles 0.1/99.9, output in the input's intensity range. The
    result keeps the input layer's scale and translation (a 4D layer: the chosen channel along its
    first axis). The Python API's memory policy is used (``allocator="system"``: a GUI process keeps
    glibc's settings).

    Args:
        napari_viewer: the viewer (napari passes it).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer, "Deconvolve", labels=True)
        self._viewer_ref = weakref.ref(napari_viewer)
        self.model = FileEdit(label="model", mode="r", filter="*.pt *.ts *.zip",
                              tooltip="model.pt, a TorchScript .ts, an exported bundle zip, or a bundle/models folder (type it)")  # fmt: skip
        self.image = ComboBox(label="image", choices=self._image_layers, nullable=True)
        self.channel = SpinBox(label="channel (4D)", value=0, min=0, max=255)
        self.precision = ComboBox(label="precision", choices=list(PRECISIONS), value="auto")
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self.max_pass_voxels = SpinBox(label="voxels per pass", value=1 << 22, min=1 << 15, max=1 << 30, step=1 << 20)
        self.extend([self.model, self.image, self.channel, self.precision, self.device, self.max_pass_voxels,
                     self.run_button, self.cancel_button, self.progress, self.status])  # fmt: skip
        self.result: napari.layers.Image | None = None
        napari_viewer.layers.events.inserted.connect(self.reset_choices)
        napari_viewer.layers.events.removed.connect(self.reset_choices)
        self.reset_choices()
        _DECONVOLVE_WIDGETS.add(self)

    def _image_layers(self, _widget: Any = None) -> list[tuple[str, napari.layers.Image]]:
        viewer = self._viewer_ref()
        return [] if viewer is None else [(layer.name, layer) for layer in viewer.layers if isinstance(layer, napari.layers.Image)]

    def set_model(self, path: str | Path) -> None:
        """Use this model (e.g. the one the Train widget just wrote)."""
        self.model.value = Path(path)

    def volume_of(self, layer: napari.layers.Image) -> np.ndarray:
        """The layer's ``(Z, Y, X)`` data (a 4D layer: ``channel`` along its first axis), checked as
        the command line checks a file (:func:`bundle.io.validate_volume`)."""
        data = np.asarray(layer.data)
        where = f"layer '{layer.name}'"
        if data.ndim == 4:
            if not 0 <= self.channel.value < data.shape[0]:
                raise ValueError(f"{where}: channel={self.channel.value} requested but it has {data.shape[0]} along its first axis")
            data = data[self.channel.value]
        validate_volume(data, where)
        return data

    def start(self) -> None:
        """Check the inputs, then deconvolve in a worker thread."""
        layer = self.image.value
        try:
            if layer is None:
                raise ValueError("choose an image layer to deconvolve")
            volume = self.volume_of(layer)
            model = Path(self.model.value)
            if str(self.model.value) in ("", ".") or not model.exists():
                raise ValueError(f"{model}: model not found; choose a model.pt, .ts, bundle zip or models folder")
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        device = None if self.device.value == "auto" else self.device.value
        settings = {"precision": self.precision.value, "device": device, "max_pass_voxels": int(self.max_pass_voxels.value)}
        self.status.value = f"deconvolving {layer.name} {volume.shape}..."
        self._launch(self._compute, volume, str(model), settings, on_result=lambda out: self._add_result(layer, out))

    def _compute(self, volume: np.ndarray, model: str, settings: dict[str, Any]) -> np.ndarray:
        def callback(done: int, total: int) -> None:
            if self._cancel.is_set():
                raise DeconvolutionCancelled(f"deconvolution cancelled after {done} of {total} windows")
            self._set_progress(done, total, f"{done} / {total} windows")

        return deconvolve(volume, model, axes="ZYX", progress=False, callback=callback, **settings)

    def _add_result(self, layer: napari.layers.Image, out: np.ndarray) -> None:
        lo, hi = (float(v) for v in np.percentile(out, (0.1, 99.99)))
        self.result = self.viewer.add_image(
            out,
            name=f"{layer.name} deconvolved",
            scale=tuple(layer.scale[-3:]),
            translate=tuple(layer.translate[-3:]),
            contrast_limits=(lo, hi) if hi > lo else None,
            metadata={"source_layer": layer.name, "model": str(self.model.value)},
        )
        self.status.value = f"done: {self.result.name}"


def _fwhm_um(psf: np.ndarray, voxel_size: tuple[float, ...]) -> dict[str, float]:
    from bundle.physics.psf import fwhm

    return {axis: fwhm(psf, axis=i, voxel_size=voxel_size[i]) for i, axis in enumerate("zyx")}


class PSFWidget(Container):
    """Show a model's PSF (learned or fixed) with its parameters and FWHMs, and make a theoretical one.

    *Model PSF*: the ``blur.tif`` / ``blur.json`` that training writes beside ``model.pt`` (models
    folder), added as a layer with its voxel size, with XY/XZ/YZ sections through its peak and the
    parameters (NA, ...) and FWHMs below. *Theoretical PSF*: ``psfmodels``' vectorial PSF (with the
    sample's refractive index when given), the bundle's differentiable vectorial model, or Born &
    Wolf, from the optics; saved as a TIFF with its voxel size for non-blind training (``--psf_file``).

    Args:
        napari_viewer: the viewer (napari passes it).
    """

    MODELS = ("vectorial (psfmodels)", "vectorial pupil", "Born & Wolf")

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.last_message: str | None = None
        self.models_folder = FileEdit(label="models folder", mode="d", tooltip="the folder with model.pt and blur.tif")
        show = PushButton(text="Show the model's PSF")
        self.kind = ComboBox(label="PSF model", choices=list(self.MODELS), value=self.MODELS[0])
        self.na = FloatSpinBox(label="NA", value=1.4, min=0.1, max=1.7, step=0.05)
        self.n_immersion = FloatSpinBox(label="immersion index", value=1.515, min=1.0, max=1.8, step=0.005)
        self.n_sample = FloatSpinBox(label="sample index (0: = immersion)", value=0.0, min=0.0, max=1.8, step=0.01)
        self.wavelength = FloatSpinBox(label="emission λ (µm)", value=0.52, min=0.2, max=1.2, step=0.01)
        self.voxel_z = FloatSpinBox(label="voxel z (µm)", value=0.1, min=0.005, max=10.0, step=0.01)
        self.voxel_xy = FloatSpinBox(label="voxel y, x (µm)", value=0.1, min=0.005, max=10.0, step=0.005)
        self.size = SpinBox(label="size (voxels)", value=31, min=5, max=255, step=2)
        make = PushButton(text="Make theoretical PSF")
        self.save_path = FileEdit(label="save as", mode="w", filter="*.tif")
        save = PushButton(text="Save PSF")
        self.info = Label(value="")
        self.extend([self.models_folder, show, self.kind, self.na, self.n_immersion, self.n_sample, self.wavelength,
                     self.voxel_z, self.voxel_xy, self.size, make, self.save_path, save, self.info])  # fmt: skip
        show.changed.connect(self.show_model_psf)
        make.changed.connect(self.make_psf)
        save.changed.connect(self.save_psf)
        self.psf: np.ndarray | None = None
        self.voxel_size: tuple[float, ...] | None = None
        self._canvas = self._figure_canvas()

    def _figure_canvas(self) -> Any:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        canvas = FigureCanvasQTAgg(Figure(figsize=(4.5, 1.8), tight_layout=True))
        self.native.layout().addWidget(canvas)
        return canvas

    def _show(self, psf: np.ndarray, voxel_size: tuple[float, ...], name: str, text: str) -> None:
        self.psf, self.voxel_size = psf, voxel_size
        self.viewer.add_image(psf, name=name, scale=voxel_size, colormap="inferno")
        z, y, x = np.unravel_index(int(np.argmax(psf)), psf.shape)
        sections = (("XY", psf[z], (voxel_size[2], voxel_size[1])), ("XZ", psf[:, y, :], (voxel_size[2], voxel_size[0])),
                    ("YZ", psf[:, :, x], (voxel_size[1], voxel_size[0])))  # fmt: skip
        figure = self._canvas.figure
        figure.clear()
        for i, (title, section, (sx, sy)) in enumerate(sections):
            ax = figure.add_subplot(1, 3, i + 1)
            ax.imshow(section, cmap="inferno", aspect=sy / sx, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        self._canvas.draw_idle()
        widths = _fwhm_um(psf, voxel_size)
        self.info.value = text + "\nFWHM (µm): " + ", ".join(f"{a} {w:.3f}" for a, w in widths.items())

    def show_model_psf(self) -> None:
        """Add the models folder's ``blur.tif`` as a layer and show its sections and parameters."""
        folder = Path(self.models_folder.value)
        path = folder / "blur.tif"
        try:
            if not path.is_file():
                raise ValueError(f"{folder}: no blur.tif (the PSF that training writes beside model.pt)")
            psf, meta = load_volume(path)
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        record = json.loads((folder / "blur.json").read_text()) if (folder / "blur.json").is_file() else {}
        fixed = record.get("parameterization") == "fixed"
        params = {k: v for k, v in record.get("physical_parameters", {}).items() if k not in ("gain", "offset")}
        text = ("fixed PSF (non-blind)" if fixed else "learned PSF") + (
            ": " + ", ".join(f"{k} {v:.4g}" for k, v in params.items()) if params else ""
        )
        voxel_size = tuple(meta.get("voxel_size") or record.get("voxel_size") or (1.0, 1.0, 1.0))
        self._show(psf, voxel_size, "PSF (model)", text)

    def make_psf(self) -> None:
        """Compute the theoretical PSF of the optics and add it as a layer."""
        from bundle.physics.psf import born_wolf_psf, vectorial_psf
        from bundle.physics.pupil import vectorial_pupil_psf

        shape = (int(self.size.value),) * 3
        voxel_size = (float(self.voxel_z.value), float(self.voxel_xy.value), float(self.voxel_xy.value))
        optics = {"na": float(self.na.value), "n_immersion": float(self.n_immersion.value), "wavelength": float(self.wavelength.value)}
        n_sample = float(self.n_sample.value) or None
        try:
            if self.kind.value == self.MODELS[0]:
                psf = vectorial_psf(shape, voxel_size=voxel_size, n_sample=n_sample, **optics)
            elif self.kind.value == self.MODELS[1]:
                psf = vectorial_pupil_psf(shape, voxel_size=voxel_size, **optics)
            else:
                psf = born_wolf_psf(shape, voxel_size=voxel_size, **optics)
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        text = f"{self.kind.value}: NA {optics['na']}, n {optics['n_immersion']}, λ {optics['wavelength']} µm"
        self._show(np.asarray(psf, dtype=np.float32), voxel_size, f"PSF ({self.kind.value})", text)

    def save_psf(self) -> None:
        """Write the shown PSF as a TIFF with its voxel size (atomic; for ``--psf_file``)."""
        path = Path(self.save_path.value)
        if self.psf is None or str(self.save_path.value) in ("", "."):
            self.last_message = _report("make or show a PSF and choose a file to save it to")
            return
        try:
            save_volume(path, self.psf, voxel_size=self.voxel_size)
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        self.last_message = _report(f"PSF saved to {path}", error=False)


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
