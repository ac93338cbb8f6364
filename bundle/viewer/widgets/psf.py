"""The *PSF* dock widget: the model's learned PSF, or a theoretical one from the optics, with FWHMs."""

from __future__ import annotations

import json
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
    PushButton,
    SpinBox,
)

from bundle.io import load_volume, save_volume
from bundle.viewer.widgets._base import _report


def _fwhm_um(psf: np.ndarray, voxel_size: tuple[float, ...]) -> dict[str, float]:
    from bundle.physics.psf import fwhm

    return {axis: fwhm(psf, axis=i, voxel_size=voxel_size[i]) for i, axis in enumerate("zyx")}


class PSFWidget(Container):
    """Show a model's PSF (learned or fixed) with its parameters and FWHMs, and make a theoretical one.

    *Model PSF*: the ``blur.tif`` / ``blur.json`` that training writes beside ``model.pt`` (models
    folder), added as a layer with its voxel size, with XY/XZ/YZ sections through its peak and the
    parameters (NA, ...) and FWHMs below. *Theoretical PSF*: ``psfmodels``' vectorial PSF or the
    bundle's differentiable vectorial model (both with the sample's refractive index and the depth
    below the coverslip when given: the aberration of an index mismatch), or Born & Wolf, from the
    optics; saved as a TIFF with its voxel size for non-blind training (``--psf_file``).

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
        self.depth = FloatSpinBox(label="depth below coverslip (µm)", value=0.0, min=0.0, max=500.0, step=0.5)
        self.wavelength = FloatSpinBox(label="emission λ (µm)", value=0.52, min=0.2, max=1.2, step=0.01)
        self.voxel_z = FloatSpinBox(label="voxel z (µm)", value=0.1, min=0.005, max=10.0, step=0.01)
        self.voxel_xy = FloatSpinBox(label="voxel y, x (µm)", value=0.1, min=0.005, max=10.0, step=0.005)
        self.size = SpinBox(label="size (voxels)", value=31, min=5, max=255, step=2)
        make = PushButton(text="Make theoretical PSF")
        self.save_path = FileEdit(label="save as", mode="w", filter="*.tif")
        save = PushButton(text="Save PSF")
        self.info = Label(value="")
        self.extend([self.models_folder, show, self.kind, self.na, self.n_immersion, self.n_sample, self.depth, self.wavelength,
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
        n_sample, depth = float(self.n_sample.value) or None, float(self.depth.value)
        try:
            if depth and n_sample is None and self.kind.value != self.MODELS[2]:
                raise ValueError("a depth below the coverslip needs the sample index (the mismatch makes the aberration)")
            if self.kind.value == self.MODELS[0]:
                psf = vectorial_psf(shape, voxel_size=voxel_size, n_sample=n_sample, depth=depth, **optics)
            elif self.kind.value == self.MODELS[1]:
                psf = vectorial_pupil_psf(shape, voxel_size=voxel_size, n_sample=n_sample, depth=depth, **optics)
            else:
                psf = born_wolf_psf(shape, voxel_size=voxel_size, **optics)
        except ValueError as exc:
            self.last_message = _report(str(exc))
            return
        text = f"{self.kind.value}: NA {optics['na']}, n {optics['n_immersion']}, λ {optics['wavelength']} µm"
        text += f", sample n {n_sample}, {depth} µm deep" if n_sample and self.kind.value != self.MODELS[2] else ""
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


