"""The test-set report as markdown (:class:`bundle.evaluate.DeconvolutionReport` writes it as ``report.md``)."""

from __future__ import annotations

from typing import Any

__all__ = ["SCORES", "report_markdown"]

#: the four scores of each volume: input and output, as is and after the least-squares affine fit
SCORES = ("input_raw", "input_fit", "output", "output_fit")


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one table row per volume, the mean, the PSF comparison, figures."""
    lines = [
        f"# Deconvolution report: {report['model']}",
        "",
        f"Checkpoint: `{report['checkpoint']}`. Sliding window {report['settings']['roi_size']}, "
        f"overlap {report['settings']['overlap']}, Gaussian blending.",
        "",
        f"**Normalisation.** {report['normalisation']}",
        "",
        "| volume | PSNR input | PSNR input (fit) | PSNR output | PSNR output (fit) | SSIM input | SSIM input (fit) | SSIM output | SSIM output (fit) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(entry: dict[str, Any]) -> str:
        return " | ".join([f"{entry['psnr'][s]:.2f}" for s in SCORES] + [f"{entry['ssim'][s]:.4f}" for s in SCORES])

    for row in report["volumes"]:
        lines.append(f"| {row['name']} | {cells(row)} |")
    lines.append(f"| **mean** | {cells(report['mean'])} |")
    lines.append("")
    dim = report["mean"]["dim_structure"]
    lines += [
        "**Faint structure** (after the affine fit; truth voxels at 5–30 % of its maximum): the output "
        f"brings back **{dim['output']['dim_recall']:.3f}** of them to at least half their value "
        f"(input {dim['input']['dim_recall']:.3f}), precision {dim['output']['dim_precision']:.3f} "
        f"(input {dim['input']['dim_precision']:.3f}) — `bundle.metrics.dim_structure`.",
        "",
    ]
    psf = report.get("psf")
    if psf:
        if psf.get("fixed"):
            lines += [
                "## PSF (fixed: non-blind mode)",
                "",
                f"The PSF was not learned: training used the fixed `{psf['learned']}`. Its normalised "
                f"cross-correlation with the true `{psf['true']}` is **{psf['correlation']:.4f}** "
                "(1.0000: the true PSF was used).",
            ]
        else:
            lines += [
                "## Learned PSF",
                "",
                f"Learned `{psf['learned']}` vs true `{psf['true']}`: normalised cross-correlation "
                f"**{psf['correlation']:.4f}**.",
            ]
        lines += ["", "| FWHM (µm) | z (axial) | y | x |", "|---|---|---|---|"]
        for which in ("learned", "true"):
            w = psf["fwhm_um"][which]
            label = "fixed" if which == "learned" and psf.get("fixed") else which
            lines.append(f"| {label} | {w['z']:.3f} | {w['y']:.3f} | {w['x']:.3f} |")
        lines.append("")
        if psf.get("figure"):
            lines += [f"![{'fixed' if psf.get('fixed') else 'learned'} vs true PSF]({psf['figure']})", ""]
    else:
        lines += ["No learned PSF compared (no `blur.tif` or no true PSF).", ""]
    figures = [r for r in report["volumes"] if r.get("figure")]
    if figures:
        lines += ["## Central slices (input / output / ground truth)", ""]
        lines += [f"![{r['name']}]({r['figure']})" for r in figures]
        lines.append("")
    lines.append(f"Run time: {report['time_s']:.1f} s.")
    return "\n".join(lines) + "\n"
