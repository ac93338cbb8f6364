"""After training: the model of record on the held-out stacks, with figures and a report."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bundle.inference.flips import DEFAULT_FLIPS, check_flips
from bundle.io import atomic_write_text, load_volume, save_volume
from bundle.own_data.stacks import OwnStacks

logger = logging.getLogger(__name__)

FLAT_CONTRAST = 0.01
"""An output whose std is below this share of its input's is flagged as flat in the report."""


def _display(volume: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """``volume`` mapped to [0, 1] between its own percentiles (each row of a figure its own contrast)."""
    lo, hi = np.percentile(volume, percentiles)
    return np.clip((volume - lo) / max(float(hi - lo), 1e-12), 0, 1)


class HeldOutReport:
    """After training: the model of record on every held-out stack, with figures and a report.

    For each held-out stack (and, when one stack was split, the whole stack too: its held-out strip
    may hold little of the sample): the deconvolved stack (``<output_dir>/held_out/<name>_deconv.tif``, the
    input's voxel size and intensity range), a PNG of its XY/XZ/YZ central slices above the input's
    (``<name>.png``), and one row of ``<output_dir>/report.md``: shape, voxel size, the output's
    contrast relative to the input's (a collapsed, near-constant output has almost none) and the
    files. An output with less than ``FLAT_CONTRAST`` of its input's contrast is named in the report's
    checks (and logged): the model has not learned to deconvolve these stacks (e.g. a run of a few
    iterations, whose weight-averaged model is still near its initialisation). The report also lists
    the model's record (``model.json``), the learned PSF, the noise calibration and the checks'
    warnings. Written atomically; inputs are never overwritten.

    Args:
        stacks: the run's :class:`OwnStacks`.
        ckpt_dir: folder holding the model of record (``model.pt``; ``blur.tif`` when blind).
        output_dir: the run's output folder (``report.md``, ``held_out/``).
        percentiles: input normalisation, as in validation and inference (a model trained with one
            intensity range for its domain uses that range instead).
        learned_psf: the PSF training wrote (the config's ``learned_psf``; default ``ckpt_dir/blur.tif``).
        flips: XY views G's output is averaged over, as in inference (1, 2, 4 or 8; default 8, the
            config's ``held_out_flips``): 1 makes the report's deconvolution about 8 times faster.
    """

    def __init__(
        self,
        stacks: OwnStacks,
        ckpt_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        percentiles: Sequence[float] = (0.1, 99.9),
        learned_psf: str | os.PathLike | None = None,
        flips: int = DEFAULT_FLIPS,
    ) -> None:
        self.stacks = stacks
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = Path(output_dir)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.learned_psf = self.ckpt_dir / "blur.tif" if learned_psf is None else Path(learned_psf)
        self.flips = check_flips(flips, "held_out_flips")

    def run(self) -> Path:
        """Write the outputs, figures and ``report.md``; return the report's path."""
        from tqdm.auto import tqdm

        from bundle.data import trained_hot_pixel_threshold
        from bundle.handlers import save_orthoslices
        from bundle.inference import deconvolve, load_network

        model_path = self.ckpt_dir / "model.pt"
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no model to report on (did training write one?)")
        network = load_network(model_path)
        hot_pixel_threshold = trained_hot_pixel_threshold(self.ckpt_dir)
        record = self.stacks.prepare()
        voxel = tuple(record["voxel_size"])
        rows = []
        flat = []
        # a single stack was split: its held-out strip may be mostly background, so the whole stack is shown too
        sources = [(f, "") for f in record["held_out"]]
        if len(record["blurred"]) == 1 and record["held_out"] != record["blurred"]:
            sources.append((record["blurred"][0], "_whole"))
        for f, tag in tqdm(sources, desc="held-out stacks", unit="stack"):
            volume, _ = load_volume(f)
            output = deconvolve(volume, network, normalize=self.percentiles, progress=False, flips=self.flips,
                                hot_pixel_threshold=hot_pixel_threshold)  # as the training read its stacks
            stem = Path(f).name.split(".")[0] + tag
            out_path = save_volume(self.output_dir / "held_out" / f"{stem}_deconv.tif", output, voxel_size=voxel, protect=[f])
            shown = [_display(v, self.percentiles) for v in (volume, output)]
            png = save_orthoslices(shown, self.output_dir / "held_out" / f"{stem}.png", voxel_size=voxel, title=["input", "output"])
            contrast = float(np.std(output) / max(np.std(volume), 1e-12))
            if contrast < FLAT_CONTRAST:
                flat.append(
                    f"{Path(f).name}: the output is nearly flat (output / input contrast {contrast:.4f} < {FLAT_CONTRAST}): "
                    "the model of record has not learned to deconvolve this stack; train longer (`--max_epochs`) "
                    "and check the validation history"
                )
                logger.warning(flat[-1])
            name = Path(f).name + (" (whole stack; the model trained on the rest of it)" if tag else "")
            rows.append((name, volume.shape, contrast, out_path, png))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lines = ["# Own-data run", "", f"Voxel size (z, y, x): {voxel} um. Optics: {record['optics']}.", ""]
        lines += ["## Held-out stacks", "", "| stack | shape (Z, Y, X) | output / input contrast (std) | output | figure |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {tuple(s)} | {c:.2f} | {o.name} | {p.name} |" for n, s, c, o, p in rows]
        model_json = self.ckpt_dir / "model.json"
        lines += ["", "## Model of record", "", f"`{model_path}`"]
        if model_json.is_file():
            lines += ["", "```json", model_json.read_text().strip(), "```"]
        for name, path in (("Learned PSF", self.learned_psf), ("Noise calibration", self.output_dir / "calibration.json")):
            if path.is_file():
                lines += ["", f"{name}: `{path}`"]
        lines += ["", "## Checks", ""] + ([f"- {w}" for w in [*flat, *record["warnings"]]] or ["- nothing found"])
        report = atomic_write_text(self.output_dir / "report.md", "\n".join(lines) + "\n")
        logger.info(f"report: {report}")
        return report
