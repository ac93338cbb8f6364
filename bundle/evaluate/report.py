"""The test-set report: deconvolve volumes with ground truth, score, write report.md/json and figures."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.data import correct_hot_pixels, paired_datalist
from bundle.evaluate.markdown import SCORES, report_markdown
from bundle.evaluate.psf import _psf_was_fixed, psf_report
from bundle.flags import as_flag
from bundle.handlers import save_orthoslices
from bundle.inference import (
    NormalizePercentilesd,
    RestoreIntensityd,
    TiledInferer,
    load_checkpoint,
    output_path,
)
from bundle.io import atomic_write_text, load_volume, save_volume
from bundle.metrics import affine_fit, dim_structure, psnr, ssim
from bundle.networks.generator import trained_input_range

__all__ = ["DeconvolutionReport", "NORMALISATION"]

logger = logging.getLogger(__name__)

NORMALISATION = (
    "Input: percentiles {blurred} of each blurred volume mapped to [0, 1] (clipped), the training "
    "normalisation of the blurred domain. Ground truth: percentiles {sharp} mapped to [0, 1] (clipped), "
    "the sharp domain's. Output: the network's [0, 1] output, unchanged. PSNR and SSIM (k1 = 0.01, "
    "k2 = 0.03, Gaussian window) in 3D with MAX = data range = max - min of the normalised ground truth. "
    "input_raw: the normalised input as is; input_fit / output_fit: after the least-squares affine fit "
    "a*v + b to the ground truth (the most favourable intensity scaling)."
)
FIXED_RANGE = " With one scale per domain, the fixed ranges below replace the percentiles: input {blurred}, ground truth {sharp}."


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (a volume without dim voxels has NaN shares); NaN if none."""
    finite = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _scores(volume: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float, float]:
    """``(psnr, ssim, psnr after affine fit, ssim after affine fit)`` of ``(1, 1, D, H, W)`` tensors."""
    fitted = affine_fit(volume, target).float()
    return psnr(volume, target), ssim(volume, target), psnr(fitted, target), ssim(fitted, target)


class DeconvolutionReport:
    """Deconvolve volumes that have a ground truth and write ``report.md``, ``report.json`` and figures.

    For every ``image_dir/<name>`` with ``label_dir/<name>``: deconvolve with ``inferer`` (same
    normalisation and sliding window as inference), score input and output against the ground truth
    (see the module docstring for the normalisation), save the deconvolved volume
    (``predictions/<name>_deconv.tif``, input intensity range, voxel size kept) and a figure of the
    XY, XZ, YZ central slices of input / output / ground truth (``figures/<name>.png``). With a
    learned PSF (``blur.tif``) and the true one, also their correlation, FWHMs and a figure
    (``figures/psf.png``). Every pair is read and checked before anything is written.

    Args:
        network: the generator, ``(B, 1, D, H, W) -> (B, 1, D, H, W)`` in [0, 1] (loaded from ``ckpt_path``).
        inferer: the :class:`bundle.inference.TiledInferer` (``configs/inference.json``'s ``inferer``);
            None: a default one (planned windows, float32).
        image_dir: blurred volumes (folder, glob or file).
        label_dir: ground-truth folder, files named like the blurred ones.
        output_dir: report folder.
        ckpt_path: generator weights; None if the network is already loaded.
        blurred_percentiles: normalisation of the input (training's ``blurred_percentiles``).
        sharp_percentiles: normalisation of the ground truth (training's ``sharp_percentiles``).
        blurred_range: one intensity range for every input instead of its percentiles (training's
            ``blurred_intensity_range``); None: the network's ``input_range`` buffer (stored in its
            checkpoint), else each input's percentiles.
        sharp_range: the same for the ground truth (``sharp_intensity_range``).
        hot_pixel_threshold: replace the hot pixels of each blurred stack before anything reads it
            (:func:`bundle.data.correct_hot_pixels`; ``hot_pixel_threshold``); the input's score is then
            that of the corrected stack. None: the stacks as stored.
        learned_psf: ``blur.tif`` (or a PSF layer); skipped if None or a missing file.
        true_psf: the true PSF file; skipped if None or missing.
        save_predictions: write the deconvolved volumes.
        figures: write the PNG figures.
        model_name: shown in the report's title.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: TiledInferer | None,
        image_dir: str,
        label_dir: str,
        output_dir: str,
        ckpt_path: str | None = None,
        blurred_percentiles: Sequence[float] = (0.1, 99.9),
        sharp_percentiles: Sequence[float] = (0.0, 99.99),
        learned_psf: str | torch.nn.Module | None = None,
        true_psf: str | None = None,
        save_predictions: bool = True,
        figures: bool = True,
        model_name: str = "cycleGAN with a blur kernel",
        blurred_range: Sequence[float] | None = None,
        sharp_range: Sequence[float] | None = None,
        hot_pixel_threshold: float | None = None,
    ) -> None:
        self.network, self.inferer = network, TiledInferer() if inferer is None else inferer
        self.image_dir, self.label_dir = image_dir, label_dir
        self.output_dir = Path(output_dir)
        self.ckpt_path = ckpt_path
        self.blurred_percentiles = tuple(float(p) for p in blurred_percentiles)
        self.sharp_percentiles = tuple(float(p) for p in sharp_percentiles)
        self.learned_psf, self.true_psf = learned_psf, true_psf
        self.save_predictions = as_flag(save_predictions, "save_predictions")
        self.figures = as_flag(figures, "figures")
        self.model_name = model_name
        self.blurred_range, self.sharp_range = blurred_range, sharp_range
        self.hot_pixel_threshold = hot_pixel_threshold

    def _load_pairs(self, input_range: Sequence[float] | None) -> list[dict[str, Any]]:
        """Read and normalise every pair (errors name the file) before anything is written."""
        pairs = []
        for item in paired_datalist(self.image_dir, self.label_dir):
            image, meta = load_volume(item["image"], dtype=np.float32)
            label, _ = load_volume(item["label"], dtype=np.float32)
            if image.shape != label.shape:
                raise ValueError(f"{item['label']}: shape {label.shape} differs from {item['image']} {image.shape}")
            image = correct_hot_pixels(image, self.hot_pixel_threshold)[0]  # the model's input and the input's score alike
            d = NormalizePercentilesd("image", self.blurred_percentiles, intensity_range=input_range)(
                {"image": torch.from_numpy(image)[None]}
            )
            gt = NormalizePercentilesd("label", self.sharp_percentiles, intensity_range=self.sharp_range)(
                {"label": torch.from_numpy(label)[None]}
            )["label"]
            pairs.append({
                **item,
                "image_norm": torch.as_tensor(d["image"]),
                "image_range": d["image_range"],
                "label_norm": torch.as_tensor(gt),
                "voxel_size": meta["voxel_size"],
            })
        return pairs

    def run(self) -> dict[str, Any]:
        """Deconvolve, score and write the report; returns the JSON content."""
        start = time.perf_counter()
        if self.ckpt_path is not None:
            load_checkpoint(self.network, self.ckpt_path)
            self.inferer.reset()  # an optimised deconvolver is built from the weights it sees first
        self.network.eval()
        deconvolver = self.inferer.deconvolver_for(self.network)
        input_range = self.blurred_range if self.blurred_range is not None else trained_input_range(self.network)
        input_range = None if input_range is None else [float(v) for v in input_range]
        pairs = self._load_pairs(input_range)
        psf = None
        learned = self.learned_psf
        if isinstance(learned, (str, os.PathLike)) and not Path(learned).is_file():
            logger.info(f"{learned}: no learned PSF, skipping the PSF comparison")
            learned = None
        if learned is not None and self.true_psf is not None and Path(self.true_psf).is_file():
            psf = psf_report(learned, self.true_psf)
        rows = []
        for pair in pairs:
            name = Path(pair["image"]).name
            with torch.no_grad():
                # (1, 1, D, H, W) in [0, 1]: the windows, then the inferer's refinement if it has one
                pred = self.inferer(pair["image_norm"][None], self.network)
            x, y = pair["image_norm"][None].float(), pair["label_norm"][None].float()
            in_psnr, in_ssim, in_fit_psnr, in_fit_ssim = _scores(x, y)
            out_psnr, out_ssim, out_fit_psnr, out_fit_ssim = _scores(pred.float(), y)
            row: dict[str, Any] = {
                "name": name,
                "input": str(pair["image"]),
                "ground_truth": str(pair["label"]),
                "shape": list(pred.shape[2:]),
                "voxel_size_um": pair["voxel_size"],
                "psnr": dict(zip(SCORES, (in_psnr, in_fit_psnr, out_psnr, out_fit_psnr))),
                "ssim": dict(zip(SCORES, (in_ssim, in_fit_ssim, out_ssim, out_fit_ssim))),
                # faint structure (after the affine fit): share of dim truth voxels brought back, and precision
                "dim_structure": {
                    "input": dim_structure(x, y),
                    "output": dim_structure(pred.float().cpu(), y),
                },
            }
            if self.save_predictions:
                restored = RestoreIntensityd("pred", "image_range")({"pred": pred[0], "image_range": pair["image_range"]})
                path = output_path(pair["image"], self.output_dir / "predictions")
                save_volume(path, restored["pred"][0].cpu().numpy(), voxel_size=pair["voxel_size"],
                            dtype=np.float32, protect=[pair["image"], pair["label"]])
                row["prediction"] = str(path)
            if self.figures:
                fig = self.output_dir / "figures" / f"{Path(output_path(name, '.', '')).stem}.png"
                save_orthoslices(
                    [x[0, 0].numpy(), pred[0, 0].cpu().numpy(), y[0, 0].numpy()],
                    fig,
                    voxel_size=pair["voxel_size"] or (1.0, 1.0, 1.0),
                    title=["input", "output", "ground truth"],
                )
                row["figure"] = str(fig.relative_to(self.output_dir))
            rows.append(row)
            logger.info(f"{name}: PSNR input {in_psnr:.2f} (fit {in_fit_psnr:.2f}) -> output {out_psnr:.2f} dB")
        report: dict[str, Any] = {
            "model": self.model_name,
            "checkpoint": None if self.ckpt_path is None else str(self.ckpt_path),
            "normalisation": NORMALISATION.format(blurred=list(self.blurred_percentiles), sharp=list(self.sharp_percentiles))
            + ("" if input_range is None and self.sharp_range is None else FIXED_RANGE.format(blurred=input_range, sharp=self.sharp_range)),
            "settings": {
                "roi_size": deconvolver.roi_size if deconvolver.auto else list(deconvolver.roi_size),
                "last_roi_size": None if deconvolver.last_roi_size is None else list(deconvolver.last_roi_size),
                "precision": getattr(deconvolver.predictor, "precision", "float32"),
                "overlap": deconvolver.inferer.overlap,
                "sw_batch_size": deconvolver.inferer.sw_batch_size,
                "blurred_percentiles": list(self.blurred_percentiles),
                "sharp_percentiles": list(self.sharp_percentiles),
                "blurred_intensity_range": input_range,
                "sharp_intensity_range": None if self.sharp_range is None else list(self.sharp_range),
                "refine_iterations": getattr(getattr(self.inferer, "refinement", None), "num_iter", 0),
                "refine_tv_weight": getattr(getattr(self.inferer, "refinement", None), "tv_weight", 0.0),
                "refine_blend": getattr(getattr(self.inferer, "refinement", None), "blend", 1.0),
            },
            "volumes": rows,
            "mean": {
                **{metric: {s: float(np.mean([r[metric][s] for r in rows])) for s in SCORES} for metric in ("psnr", "ssim")},
                "dim_structure": {
                    side: {k: _nanmean([r["dim_structure"][side][k] for r in rows]) for k in ("dim_recall", "dim_precision")}
                    for side in ("input", "output")
                },
            },
            "psf": None,
        }
        if psf is not None:
            numbers, h_learned, h_true, voxel = psf
            fixed = _psf_was_fixed(learned)
            report["psf"] = {"learned": str(learned) if not isinstance(learned, torch.nn.Module) else "PSF layer",
                             "true": str(self.true_psf), "fixed": fixed, **numbers}
            if self.figures:
                save_orthoslices([h_learned, h_true], self.output_dir / "figures" / "psf.png", voxel_size=voxel,
                                 title=["fixed PSF (non-blind)" if fixed else "learned PSF", "true PSF"])
                report["psf"]["figure"] = "figures/psf.png"
        report["time_s"] = time.perf_counter() - start
        atomic_write_text(self.output_dir / "report.json", json.dumps(report, indent=2))
        atomic_write_text(self.output_dir / "report.md", self.markdown(report))
        logger.info(f"report written to {self.output_dir / 'report.md'}")
        return report

    markdown = staticmethod(report_markdown)
