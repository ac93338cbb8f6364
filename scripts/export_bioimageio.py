"""Package a trained generator for the BioImage Model Zoo (bioimage.io model spec 0.5).

The package (a zip) runs without this code in any bioimage.io consumer (deepImageJ in Fiji,
ilastik, the napari bioimage.io plugin, ``bioimageio.core``):

- ``bioimageio.yaml``: name, description, authors, citation, licence, tags, cover; one input
  ``raw`` and one output ``deconvolved`` with axes batch, channel, z, y, x; input sides
  ``min + n·step`` (``step`` = the U-Net's divisor ``2**depth``), the output's ``halo`` = the
  generator's receptive radius (what a tiling consumer must discard at window edges);
- preprocessing = the training normalisation of the blurred domain: ``scale_range`` between the
  ``blurred_percentiles`` (0.1, 99.9 by default) of each stack, then ``clip`` to [0, 1]; no
  postprocessing: the output is the network's [0, 1] estimate of the sharp volume;
- weights: TorchScript (``torch.jit.script`` of the generator) and ``pytorch_state_dict`` with the
  architecture ``bundle/networks/generator.py:DeblurUNet`` (needs ``monai``) and its arguments;
- ``test_input.npy`` (a stack from the bundle's simulator at the model's voxel size, or a crop of
  ``--test_input``) and ``test_output.npy`` computed by the exported TorchScript itself;
- ``README.md`` with a *Validation* section (the scores of ``--report``, an evaluate
  ``report.json``, beside Richardson-Lucy's when given ``--rl_report``), a cover image, and the
  learned PSF (``blur.tif``/``blur.json`` beside the checkpoint) as attachments.

The package is written to a temporary file and renamed into place; with ``--check`` (default)
it is first validated by ``bioimageio.core.test_model``.

Usage::

    python scripts/export_bioimageio.py --model models --output dist/cyclegan_deconv.bioimageio.zip \\
        --report eval/test/report.json

Needs the ``bioimageio`` extra (``pip install -e ".[bioimageio]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAPER_DOI = "10.1109/TCI.2020.3006735"
EPS = 1e-6  # bioimage.io scale_range's default eps


def scale_range_clip(volume: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """The package's preprocessing in numpy: ``(x − p_lo) / (p_hi − p_lo + eps)`` per stack, clipped
    to [0, 1] (bioimage.io ``scale_range`` + ``clip``; the bundle's training normalisation).

    Args:
        volume: ``(..., Z, Y, X)`` stack.
        percentiles: ``(lower, upper)`` in [0, 100].

    Returns:
        float32 array of the same shape.
    """
    lo, hi = np.percentile(volume, percentiles)
    return np.clip((volume.astype(np.float64) - lo) / (hi - lo + EPS), 0.0, 1.0).astype(np.float32)


def _generator(model: Any) -> torch.nn.Module:
    """The plain ``DeblurUNet`` in float32 eval mode (not the inference rewrite)."""
    from bundle.inference import load_network
    from bundle.networks import DeblurUNet, RLGuidedUNet
    from bundle.networks.rl_guided import NOT_EXPORTABLE

    net = load_network(model, "cpu")
    if not isinstance(net, DeblurUNet):
        raise ValueError(f"{model}: expected a DeblurUNet generator, got {type(net).__name__}")
    if isinstance(net, RLGuidedUNet):
        raise ValueError(f"{model}: {NOT_EXPORTABLE}")
    return net.float().eval()


def _constructor_args(net: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments that rebuild ``net`` (read from its weights, as inference does), checked by
    loading the weights into the rebuilt network."""
    from bundle.inference.checkpoints import generator_arguments

    args = generator_arguments(net.state_dict())
    type(net)(**args).load_state_dict(net.state_dict())  # raises if they do not describe the weights
    if args.get("voxel_size") is not None:  # float32 in the weights: 0.1 reads 0.10000000149
        args["voxel_size"] = [round(float(v), 6) for v in args["voxel_size"]]
    return args


def _test_input(net: torch.nn.Module, test_input: str | None, size: Sequence[int], seed: int) -> np.ndarray:
    """``(Z, Y, X)`` float32 test stack of a valid size: a crop of ``test_input``, or a blurred, noisy
    phantom from the bundle's simulator at the model's voxel size."""
    if test_input is not None:
        from bundle.io import load_volume

        volume, _ = load_volume(test_input, dtype=np.float32)
        if any(v < s for v, s in zip(volume.shape, size, strict=True)):
            raise ValueError(f"{test_input}: stack {volume.shape} is smaller than the test size {tuple(size)}")
        starts = [(v - s) // 2 for v, s in zip(volume.shape, size, strict=True)]
        return np.ascontiguousarray(volume[tuple(slice(a, a + s) for a, s in zip(starts, size, strict=True))])
    from bundle.physics.forward import add_noise, blur
    from bundle.physics.phantom import microtubule_phantom
    from bundle.physics.psf import born_wolf_psf

    vs = net.trained_voxel_size or (0.1, 0.1, 0.1)
    rng = np.random.default_rng(seed)
    sharp = microtubule_phantom(tuple(size), seed=rng)
    noisy, _ = add_noise(blur(sharp, born_wolf_psf((31, 31, 31), voxel_size=vs)), 20.0, seed=rng)
    return (1000.0 * noisy + 100.0).astype(np.float32)  # camera-like units: the preprocessing rescales


def _cover(path: Path, raw: np.ndarray, out: np.ndarray) -> None:
    """A 2:1 PNG: XY slice through the middle of the input and of the output."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    z = raw.shape[0] // 2
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    for ax, img, title in zip(axes, (scale_range_clip(raw[z], (0.1, 99.9)), out[z]), ("widefield input", "deconvolved")):
        ax.imshow(img, cmap="magma", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _validation_section(report: dict | None, rl_report: dict | None) -> str:
    if report is None:
        return (
            "No evaluation was packaged with this model. Score it on held-out pairs with the bundle's\n"
            "`evaluate` workflow (`python -m monai.bundle run evaluate ...`) before trusting it.\n"
        )
    rows = ["| method | PSNR after affine fit (dB) | SSIM | dim-structure recall / precision |", "|---|---|---|---|"]

    def row(name: str, mean: dict, key: str) -> str:
        dim = mean.get("dim_structure", {}).get(key, {})
        recall, precision = dim.get("dim_recall"), dim.get("dim_precision")
        dims = f"{recall:.3f} / {precision:.3f}" if recall is not None else "–"
        return f"| {name} | {mean['psnr'][key + '_fit']:.2f} | {mean['ssim'][key + '_fit']:.3f} | {dims} |"

    mean = report.get("mean") or report["test_mean"]
    rows.append(row("input (widefield)", mean, "input"))
    rows.append(row("this model", mean, "output"))
    if rl_report is not None:
        rows.append(row("Richardson–Lucy", rl_report.get("mean") or rl_report["test_mean"], "output"))
    n = len(report.get("volumes", report.get("per_volume", []))) or "the"
    return (
        f"Scores on {n} held-out test volumes with ground truth, measured by the bundle's `evaluate`\n"
        "workflow (PSNR/SSIM after a least-squares affine fit of each output to its truth; dim-structure\n"
        "recall = share of dim true voxels brought back to >= 50 % of their value):\n\n" + "\n".join(rows) + "\n"
    )


def _readme(
    name: str, args: dict, percentiles: Sequence[float], halo: int, divisor: int, validation: str, hot: float | None = None
) -> str:
    vs = args.get("voxel_size")
    hot_note = "" if hot is None else (
        f"\n- The camera's hot pixels (bright in every plane) were replaced in the training stacks (the bundle's\n"
        f"  `hot_pixel_threshold` {hot:g}); bioimage.io's preprocessing has no such step: replace them first with\n"
        "  the bundle's `scripts/correct_hot_pixels.py`, or the model sharpens each into a streak along Z."
    )
    return f"""# {name}

A 3D U-Net that deconvolves widefield fluorescence stacks, trained without paired data by a cycleGAN
whose second generator is a linear PSF layer (Lim et al., "CycleGAN with a Blur Kernel for
Deconvolution Microscopy: Optimal Transport Geometry", IEEE TCI 2020, doi:{PAPER_DOI}).

## Input and output
- Input `raw`: one single-channel stack, axes (batch, channel, z, y, x), float32, in the intensities
  of the microscope. Voxel size the model was trained at (z, y, x): {vs} µm; resample other stacks first.
- Preprocessing: the {percentiles[0]} and {percentiles[1]} percentiles of each stack mapped to 0 and 1
  (`scale_range`), clipped to [0, 1].{hot_note}
- Output `deconvolved`: the estimate of the sharp volume in [0, 1] (multiply by the input's
  percentile range to get back to its units).
- Spatial sides: multiples of {divisor}; tile large stacks with a halo of {halo} voxels per side.

## Validation
{validation}
## Limitations
Trained on the data it was exported from: other optics, voxel sizes or structures need their own
training. A learned deconvolution can invent or drop structure: compare with the input and with a
classical deconvolution (Richardson–Lucy) before drawing conclusions.

## Reproduce
Exported by `scripts/export_bioimageio.py` of the MONAI bundle "CycleGAN with a blur kernel for 3D
deconvolution microscopy" (network arguments: {json.dumps({k: v for k, v in args.items() if k != "voxel_size"})}).
"""


def _exact_size(size: int, scale: float, step: int) -> int:
    """The first size >= ``size`` (in ``step`` s) that survives ``size · scale / scale`` in floating point:
    bioimage.io checks an output axis of the input's size through the axes' scales (96 · 0.1 / 0.1 is
    96.00000000000001 and fails; 64 passes)."""
    while size * scale / scale != size:
        size += step
    return size


def build_description(
    net: torch.nn.Module,
    workdir: Path,
    percentiles: Sequence[float],
    test_input: str | None,
    report: dict | None,
    rl_report: dict | None,
    psf_files: Sequence[Path],
    name: str,
    authors: Sequence[str],
    seed: int = 0,
    hot_pixel_threshold: float | None = None,
) -> Any:
    """Write the package's files into ``workdir`` and return the bioimage.io ``ModelDescr``
    (``hot_pixel_threshold``: the training's, named in the README)."""
    from bioimageio.spec.model import v0_5 as spec

    divisor = int(net.divisor)
    step = max(1, divisor // 2)  # the receptive radius rounded as the bundle's own tiling does
    halo = int(-(-net.receptive_radius // step) * step)
    min_side = divisor * max(1, -(-(2 * halo + divisor) // divisor))  # a window larger than both halos
    # test stack: every side min_side + 16 or more, so that a core away from the borders (where the
    # bundle's tiled inference and a consumer's single pass treat the edges differently) is left
    lateral = max(96, min_side + 16)
    vs = [float(v) for v in (_constructor_args(net).get("voxel_size") or (1.0, 1.0, 1.0))]
    test_size = tuple(_exact_size(n, v, divisor) for n, v in zip((min_side + 16, lateral, lateral), vs, strict=True))
    raw = _test_input(net, test_input, test_size, seed)
    args = _constructor_args(net)
    # the bundle mirror-pads a stack by the network's tiling halo before its windows: the package's
    # model does the same in its one pass, so both give the same numbers
    pad = int(net.tiling_halo)
    args["pad"] = pad
    from bundle.networks.generator import MirrorPaddedDeblurUNet

    padded = MirrorPaddedDeblurUNet(**args).eval()
    padded.load_state_dict(net.state_dict())
    net = padded
    scripted = torch.jit.script(net)
    scripted.save(str(workdir / "weights.torchscript.pt"))
    with torch.no_grad():
        out = scripted(torch.from_numpy(scale_range_clip(raw, percentiles))[None, None]).numpy()
    np.save(workdir / "test_input.npy", raw[None, None])
    np.save(workdir / "test_output.npy", out.astype(np.float32))
    torch.save(net.state_dict(), workdir / "weights.pt")
    _cover(workdir / "cover.png", raw, out[0, 0])
    (workdir / "README.md").write_text(
        _readme(name, args, percentiles, halo, divisor, _validation_section(report, rl_report), hot_pixel_threshold)
    )

    def space_in(axis: str) -> Any:
        return spec.SpaceInputAxis(id=spec.AxisId(axis), size=spec.ParameterizedSize(min=min_side, step=divisor),
                                   unit="micrometer", scale=float(args["voxel_size"]["zyx".index(axis)])
                                   if args.get("voxel_size") else 1.0)

    def space_out(axis: str) -> Any:
        return spec.SpaceOutputAxisWithHalo(
            id=spec.AxisId(axis), size=spec.SizeReference(tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId(axis)),
            halo=halo, unit="micrometer",
            scale=float(args["voxel_size"]["zyx".index(axis)]) if args.get("voxel_size") else 1.0,
        )

    lo, hi = (float(p) for p in percentiles)
    inputs = spec.InputTensorDescr(
        id=spec.TensorId("raw"),
        description="widefield stack in the microscope's intensities",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("fluorescence")]),
              space_in("z"), space_in("y"), space_in("x")],
        test_tensor=spec.FileDescr(source=workdir / "test_input.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
                axes=[spec.AxisId("z"), spec.AxisId("y"), spec.AxisId("x")],
                min_percentile=lo, max_percentile=hi, eps=EPS)),
            spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)),
        ],
    )
    outputs = spec.OutputTensorDescr(
        id=spec.TensorId("deconvolved"),
        description="estimate of the sharp volume, in [0, 1]",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("fluorescence")]),
              space_out("z"), space_out("y"), space_out("x")],
        test_tensor=spec.FileDescr(source=workdir / "test_output.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    torch_version = spec.Version(torch.__version__.split("+")[0])
    import monai

    (workdir / "environment.yaml").write_text(
        "name: cyclegan-deconvolution\nchannels: [conda-forge]\ndependencies:\n  - python>=3.11\n"
        f"  - pytorch=={torch_version}\n  - pip\n  - pip:\n      - monai=={monai.__version__.split('+')[0]}\n"
    )
    weights = spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=workdir / "weights.pt",
            architecture=spec.ArchitectureFromFileDescr(
                source=ROOT / "bundle" / "networks" / "generator.py", callable=spec.Identifier("MirrorPaddedDeblurUNet"),
                kwargs=args,
            ),
            pytorch_version=torch_version,
            dependencies=spec.FileDescr(source=workdir / "environment.yaml"),
        ),
        torchscript=spec.TorchscriptWeightsDescr(
            source=workdir / "weights.torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict",
        ),
    )
    return spec.ModelDescr(
        name=name,
        description="Unsupervised 3D deconvolution of widefield fluorescence stacks: a U-Net trained by a "
        "cycleGAN with a learnable linear PSF layer (Lim et al., IEEE TCI 2020).",
        authors=[spec.Author(name=a) for a in authors],
        cite=[spec.CiteEntry(text="Lim S. et al. CycleGAN with a Blur Kernel for Deconvolution Microscopy: "
                             "Optimal Transport Geometry. IEEE TCI 6, 2020", doi=spec.Doi(PAPER_DOI))],
        license=spec.LicenseId("Apache-2.0"),
        tags=["deconvolution", "3d", "fluorescence-light-microscopy", "widefield", "cyclegan", "pytorch", "monai"],
        documentation=spec.FileDescr(source=workdir / "README.md"),
        covers=[spec.FileDescr(source=workdir / "cover.png")],
        attachments=[spec.FileDescr(source=p) for p in psf_files],
        inputs=[inputs],
        outputs=[outputs],
        weights=weights,
    )


def export_bioimageio(
    model: Any,
    output: str | os.PathLike,
    percentiles: Sequence[float] = (0.1, 99.9),
    test_input: str | None = None,
    report: str | os.PathLike | None = None,
    rl_report: str | os.PathLike | None = None,
    name: str = "CycleGAN blur-kernel 3D deconvolution",
    authors: Sequence[str] = ("cyclegan-blur-kernel-deconv contributors",),
    check: bool = True,
    seed: int = 0,
) -> Path:
    """Write the bioimage.io package of ``model`` to ``output`` (a ``.zip``) and return its path.

    Args:
        model: a checkpoint folder, ``model.pt``, bundle folder or zip, or a ``DeblurUNet``.
        output: the package zip; written to a temporary file, validated, then renamed into place.
        percentiles: the training's ``blurred_percentiles``.
        test_input: a blurred stack to crop the test input from (default: a simulated one).
        report: an evaluate ``report.json`` of this model, for the README's Validation section.
        rl_report: the same for Richardson–Lucy on the same test set.
        name: the model's name.
        authors: author names.
        check: run ``bioimageio.core.test_model`` on the package before renaming it into place.
        seed: seed of the simulated test input.

    Raises:
        RuntimeError: when ``check`` fails (nothing is written at ``output``).
    """
    from bioimageio.spec import save_bioimageio_package

    output = Path(output)
    net = _generator(model)
    psf_files = []
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model) if Path(model).is_dir() else Path(model).parent
        for sub in (folder, folder / "models"):
            psf_files += [sub / f for f in ("blur.tif", "blur.json") if (sub / f).is_file()]
    reports = [json.loads(Path(r).read_text()) if r else None for r in (report, rl_report)]
    hot = None
    if isinstance(model, (str, os.PathLike)):
        from bundle.data import trained_hot_pixel_threshold

        hot = trained_hot_pixel_threshold(model)  # the README says how the training read its stacks
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bioimageio_") as tmp:
        descr = build_description(net, Path(tmp), percentiles, test_input, reports[0], reports[1], psf_files[:2],
                                  name, authors, seed, hot_pixel_threshold=hot)
        partial = output.with_name(f".{output.name}.partial")
        save_bioimageio_package(descr, output_path=partial)
        if check:
            from bioimageio.core import test_model

            summary = test_model(partial)
            if summary.status != "passed":
                partial.unlink(missing_ok=True)
                failed = [d for d in summary.details if d.status != "passed"]
                raise RuntimeError(
                    f"{output}: the package failed bioimageio.core's test: "
                    + "; ".join(f"{d.name}: {[e.msg for e in d.errors]}" for d in failed)
                )
        os.replace(partial, output)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, model.pt, bundle folder or bundle zip")
    parser.add_argument("--output", required=True, help="package zip to write")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.1, 99.9),
                        help="blurred_percentiles of the training (default 0.1 99.9)")
    parser.add_argument("--test_input", default=None, help="blurred stack to crop the test input from")
    parser.add_argument("--report", default=None, help="evaluate report.json of this model (README Validation)")
    parser.add_argument("--rl_report", default=None, help="report.json of Richardson-Lucy on the same test set")
    parser.add_argument("--name", default="CycleGAN blur-kernel 3D deconvolution")
    parser.add_argument("--author", action="append", default=None, help="author name (repeat for several)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip bioimageio.core's test")
    args = parser.parse_args(argv)
    path = export_bioimageio(
        args.model, args.output, args.percentiles, args.test_input, args.report, args.rl_report, args.name,
        args.author or ("cyclegan-blur-kernel-deconv contributors",), args.check,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
