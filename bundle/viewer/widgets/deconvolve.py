"""The *Deconvolve* dock widget: a trained model on an image layer, with progress and Cancel."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    FileEdit,
    SpinBox,
)

from bundle.data import trained_hot_pixel_threshold
from bundle.inference import (
    PRECISIONS,
    DeconvolutionCancelled,
    deconvolve,
    model_refinement,
)
from bundle.inference.flips import DEFAULT_FLIPS, FLIP_CHOICES
from bundle.io import validate_volume
from bundle.viewer.widgets._base import _DECONVOLVE_WIDGETS, _report, _Worker


class DeconvolveWidget(_Worker):
    """Deconvolve an image layer with a trained model; the result is added as a new layer.

    Settings and defaults are the command line's (``configs/inference.json``): windows planned per
    stack (``roi_size="auto"``) within ``voxels per pass``, precision ``auto`` (bfloat16 where the
    hardware has it, else float32), percentiles 0.1/99.9, output in the input's intensity range. The
    result keeps the input layer's scale and translation (a 4D layer: the chosen channel along its
    first axis). ``refinement`` "tuned" (default) refines G's output with Richardson–Lucy as ``run
    inference`` does when the model folder holds a ``refinement.json`` (``scripts/tune_refinement.py``;
    the status line says how many iterations ran); "off": G alone. ``views`` is how many mirrored or
    transposed XY views G's output is averaged over (``inference_flips``; 8 by default, 1 is 8× faster).
    The Python API's memory policy is used (``allocator="system"``: a GUI process keeps glibc's settings).

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
        self.refinement = ComboBox(label="refinement", choices=["tuned", "off"], value="tuned",
                                   tooltip="tuned: Richardson-Lucy from G's output, as many iterations as the model folder's "
                                           "refinement.json says (none there: G alone); off: G alone")  # fmt: skip
        self.views = ComboBox(label="views", choices=list(FLIP_CHOICES[::-1]), value=DEFAULT_FLIPS,
                              tooltip="XY views (mirrors, transposes) G's output is averaged over: 8 best, 1 fastest")  # fmt: skip
        self.extend([self.model, self.image, self.channel, self.precision, self.device, self.max_pass_voxels,
                     self.refinement, self.views, self.run_button, self.cancel_button, self.progress, self.status])  # fmt: skip
        self.result: napari.layers.Image | None = None
        self.refined = ""  # what the last run added after G ("": nothing)
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
            iterations = "auto" if self.refinement.value == "tuned" else 0
            refine = model_refinement(model, iterations)  # a bad refinement.json is named here
            hot = trained_hot_pixel_threshold(model)  # as the training read its stacks; a bad model.json is named here
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        device = None if self.device.value == "auto" else self.device.value
        settings = {"precision": self.precision.value, "device": device, "max_pass_voxels": int(self.max_pass_voxels.value),
                    "refine_iterations": iterations, "flips": int(self.views.value)}  # fmt: skip
        self.refined = "" if refine is None else f", refined by {refine.num_iter} Richardson-Lucy iterations"
        if refine is not None and refine.blend < 1:
            self.refined += f" (blend {refine.blend:g} with G's output)"
        if hot is not None:
            self.refined += f", the camera's hot pixels replaced first (threshold {hot:g}, as the model was trained)"
        self.status.value = f"deconvolving {layer.name} {volume.shape}{self.refined}..."
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
        self.status.value = f"done: {self.result.name}{self.refined}"


