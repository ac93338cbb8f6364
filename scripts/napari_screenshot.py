"""Screenshot of the napari plugin: the Deconvolve widget docked, input and result side by side
(maximum-intensity projections along z).

Opens a viewer with the plugin's simulated sample, deconvolves it with the Deconvolve widget (the
same code a user clicks through) and saves the window. Needs a display: run it under Xvfb, e.g.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/napari_screenshot.py --model models/model.pt --out docs/napari.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt, .ts, bundle zip or models folder")
    parser.add_argument("--out", default="docs/napari.png", help="PNG to write")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the deconvolution")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from bundle.viewer.sample import simulated_stack
    from bundle.viewer.widgets import DeconvolveWidget

    viewer = napari.Viewer(title="CycleGAN deconvolution", show=True)
    viewer.window.resize(1500, 900)
    for data, meta, kind in simulated_stack():
        getattr(viewer, f"add_{kind}")(data, **meta)
    widget = DeconvolveWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Deconvolve", area="right")
    widget.set_model(args.model)
    widget.image.value = viewer.layers["simulated widefield"]
    widget.start()
    deadline = time.monotonic() + args.timeout
    while widget.worker is not None and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    if widget.result is None:
        raise SystemExit(f"no result: {widget.last_message}")
    for name in ("ground truth", "PSF (Born & Wolf)"):  # the grid shows the input and the result only
        viewer.layers.remove(name)
    viewer.dims.ndisplay = 3  # maximum-intensity projections along z: every filament of the stack
    viewer.camera.angles = (0.0, 0.0, 90.0)
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    grid.enabled = True
    grid.stride = -1  # input left, result right
    grid.shape = (1, 2)
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main()
