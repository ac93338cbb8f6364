"""A user's own blurred stacks, with nothing else: checked, split into training and held-out stacks.

The own-data workflow (``configs/own_data.json``) starts from a folder of raw widefield stacks and
the objective's data sheet. :class:`OwnStacks` reads every stack once, settles the voxel size (the
files' metadata wins over the configured one, with a warning), runs the checks a user needs before
trusting a result (:func:`check_stacks`), and splits the stacks into a training part and a held-out
part that validation scores without ground truth. A single stack is split into two sub-volumes along
its longer lateral axis. Everything it decides is written to ``<work_dir>/own_data.json``.

Written here because no library splits microscopy stacks for unpaired training or checks optics
keys against the data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bundle.io import atomic_write_text, load_volume, save_volume

__all__ = ["OwnStacks", "HeldOutReport", "check_stacks", "nyquist_voxel_size", "spot_fwhm"]

logger = logging.getLogger(__name__)


def nyquist_voxel_size(na: float, n_immersion: float, wavelength: float) -> tuple[float, float]:
    """Largest ``(z, xy)`` voxel sizes (µm) that sample a widefield PSF at Nyquist.

    Lateral: ``λ / (4 NA)`` (the OTF's support is ``2 NA / λ``); axial: ``λ / (2 n (1 − cos α))`` with
    ``sin α = NA / n`` (the axial extent of the widefield OTF).
    """
    if not 0 < na < n_immersion:
        raise ValueError(f"need 0 < na < n_immersion, got na={na}, n_immersion={n_immersion}")
    alpha = math.asin(na / n_immersion)
    return wavelength / (2 * n_immersion * (1 - math.cos(alpha))), wavelength / (4 * na)


def _half_max_width(profile: np.ndarray, centre: int, base: float) -> float | None:
    """Full width at half maximum (samples) of a 1D peak at ``centre`` above the background ``base``."""
    half = base + 0.5 * (float(profile[centre]) - base)
    edges = []
    for step in (-1, 1):
        i = centre
        while 0 <= i + step < profile.size and profile[i + step] > half:
            i += step
        if not 0 <= i + step < profile.size:
            return None  # never falls to half within the window (e.g. along a filament)
        a, b = float(profile[i]), float(profile[i + step])
        edges.append(i + step * (a - half) / max(a - b, 1e-12))
    return abs(edges[1] - edges[0])


def spot_fwhm(volume: np.ndarray, n_spots: int = 20, radius: int = 8, exclude: int = 6) -> np.ndarray:
    """Narrowest lateral FWHM (pixels) of the brightest local maxima of a ``(Z, Y, X)`` stack.

    Each maximum (over a ``3 x (2·exclude+1)²`` neighbourhood, so maxima are at least ``exclude``
    pixels apart) is measured in its own plane: the half-maximum width of the intensity profile
    through it along 0°, 45°, 90° and 135° (``radius`` pixels each side; one background for the four,
    their lowest value), and the *narrowest* of the four is kept. Filaments are so measured across
    (along them the profile does not fall to half and is skipped), and neither a spot nor a filament
    can be narrower than the PSF.

    Returns:
        FWHMs of up to ``n_spots`` maxima, brightest first (empty when none is found).
    """
    v = np.asarray(volume, dtype=np.float32)
    peaks = (v == ndimage.maximum_filter(v, size=(3, 2 * exclude + 1, 2 * exclude + 1))) & (v > np.percentile(v, 99))
    zz, yy, xx = np.nonzero(peaks)
    order = np.argsort(v[zz, yy, xx])[::-1]
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    directions = [(1.0, 0.0), (0.0, 1.0), (math.sqrt(0.5), math.sqrt(0.5)), (math.sqrt(0.5), -math.sqrt(0.5))]
    out: list[float] = []
    for i in order:
        z, y, x = int(zz[i]), int(yy[i]), int(xx[i])
        profiles = []
        for dy, dx in directions:
            coords = np.stack([y + t * dy, x + t * dx])
            if coords.min() < 0 or coords[0].max() > v.shape[1] - 1 or coords[1].max() > v.shape[2] - 1:
                break  # too close to the border
            profiles.append(ndimage.map_coordinates(v[z], coords, order=1))
        else:
            base = float(min(p.min() for p in profiles))
            widths = [w for p in profiles if (w := _half_max_width(p, radius, base)) is not None]
            if widths:
                out.append(min(widths))
        if len(out) >= n_spots:
            break
    return np.asarray(out, dtype=np.float64)


def check_stacks(
    shapes: Sequence[Sequence[int]],
    voxel_size: Sequence[float],
    patch_size: Sequence[int],
    na: float,
    n_immersion: float,
    wavelength: float,
    volumes: Sequence[np.ndarray] = (),
    min_patches: int = 8,
    sharp_spot_ratio: float = 0.7,
    sampling_tolerance: float = 1.25,
) -> list[str]:
    """What a user should know before trusting a result on these stacks; one sentence per problem.

    Checks: stacks smaller than the crop (they are padded), too few voxels for ``min_patches``
    crops, a z step or pixel size coarser than Nyquist for the optics, and — on ``volumes`` — spots
    sharper than the optics allow: the sharpest bright spots of the stacks (10th percentile of
    :func:`spot_fwhm`) against the same measure of the theoretical vectorial PSF at the configured
    voxel size; a ratio below ``sharp_spot_ratio`` means the voxel size, NA or wavelength is wrong
    (nothing in a widefield image is sharper than its PSF). Wider spots are not flagged: extended
    structures are wider than the PSF.

    Args:
        shapes: ``(Z, Y, X)`` of each training stack.
        voxel_size: ``(z, y, x)`` µm.
        patch_size: training crop ``(D, H, W)``.
        na, n_immersion, wavelength: the optics keys (µm).
        volumes: the stacks themselves, for the spot check (skipped when empty).
        min_patches: fewest crops' worth of voxels before "too few" is said.
        sharp_spot_ratio: spot-width ratio below which the optics keys are doubted.
        sampling_tolerance: a voxel up to this factor above Nyquist passes (widefield stacks are
            often taken slightly under Nyquist, e.g. 100 nm pixels at NA 1.4: 1.08x).

    Returns:
        Warnings (empty: nothing found).
    """
    warnings: list[str] = []
    for i, shape in enumerate(shapes):
        small = [f"{'ZYX'[a]} {s} < {p}" for a, (s, p) in enumerate(zip(shape, patch_size, strict=True)) if s < p]
        if small:
            warnings.append(
                f"stack {i} {tuple(shape)} is smaller than the training crop {tuple(patch_size)} ({', '.join(small)}): "
                "its crops are zero-padded; use a smaller --patch_size"
            )
    total = sum(int(np.prod(s)) for s in shapes)
    if total < min_patches * int(np.prod(patch_size)):
        warnings.append(
            f"only {total} training voxels, fewer than {min_patches} crops of {tuple(patch_size)}: the networks will "
            "overfit; add stacks or use a smaller --patch_size"
        )
    dz_max, dxy_max = nyquist_voxel_size(na, n_immersion, wavelength)
    if voxel_size[0] > dz_max * sampling_tolerance:
        warnings.append(
            f"z step {voxel_size[0]:.3g} um under-samples the PSF {voxel_size[0] / dz_max:.1f}x (Nyquist for NA {na}, n {n_immersion}, wavelength "
            f"{wavelength} um: {dz_max:.3g} um): the axial blur is aliased and cannot be learned exactly"
        )
    if max(voxel_size[1:]) > dxy_max * sampling_tolerance:
        warnings.append(
            f"pixel size {max(voxel_size[1:]):.3g} um under-samples the PSF laterally {max(voxel_size[1:]) / dxy_max:.1f}x (Nyquist {dxy_max:.3g} um): "
            "lateral detail beyond the pixel grid cannot be restored"
        )
    if len(volumes):
        from bundle.physics.psf import vectorial_psf

        psf = vectorial_psf((15, 41, 41), na=na, n_immersion=n_immersion, wavelength=wavelength, voxel_size=voxel_size)
        # the window scales with the expected width (a fixed one truncates wide PSFs)
        theory = float(spot_fwhm(psf, n_spots=1, radius=15)[0])
        radius = max(8, math.ceil(1.5 * theory))
        measured = np.concatenate([spot_fwhm(v, radius=radius, exclude=radius) for v in volumes])
        if measured.size >= 3 and (sharpest := float(np.percentile(measured, 10))) < sharp_spot_ratio * theory:
            warnings.append(
                f"the sharpest structures in the stacks are {sharpest:.2f} px wide (FWHM), narrower than the PSF of the "
                f"optics keys allows ({theory:.2f} px at NA {na}, wavelength {wavelength} um, voxel "
                f"{tuple(voxel_size)} um): check --voxel_size, --na and --wavelength"
            )
    return warnings


class OwnStacks:
    """The user's blurred stacks: voxel size settled, checked, split into training and held-out stacks.

    Nothing is done until the first call of a method (configs build the component, then ask it);
    then every stack is read once. With two or more stacks, the last ``held_out`` share in sorted name
    order (at least one, and at least one left for training) are held out and used as they are. A
    single stack is split along its longer lateral axis into a training part and a held-out part,
    written as TIFF (with the voxel size) under ``<work_dir>/split/``; the input is never touched.
    The decisions and the checks' warnings are written to ``<work_dir>/own_data.json`` and logged.

    Args:
        blurred_dir: folder, glob, file or list of the blurred stacks.
        work_dir: where the split and the record go (e.g. ``<output_dir>/own_data``).
        voxel_size: configured ``(z, y, x)`` µm, used when the files carry none; when they do and it
            differs by more than 1 %, the files win and a warning says so.
        held_out: share of the stacks (or of a single stack's lateral extent) held out, in ``(0, 0.5]``.
        patch_size: training crop ``(D, H, W)``, for the size checks.
        na, n_immersion, wavelength: the optics keys (µm), for the sampling and spot checks.
        spot_check: compare the stacks' sharpest spots with the optics keys (:func:`check_stacks`).
    """

    def __init__(
        self,
        blurred_dir: str | os.PathLike | Sequence[str],
        work_dir: str | os.PathLike,
        voxel_size: Sequence[float] | None = None,
        held_out: float = 0.2,
        patch_size: Sequence[int] = (64, 64, 64),
        na: float = 1.4,
        n_immersion: float = 1.515,
        wavelength: float = 0.52,
        spot_check: bool = True,
    ) -> None:
        if blurred_dir is None:
            raise ValueError("no blurred stacks: pass --blurred_dir (a folder, glob or file of your widefield stacks)")
        if not 0 < float(held_out) <= 0.5:
            raise ValueError(f"held_out must be in (0, 0.5], got {held_out}")
        self.blurred_dir = [str(d) for d in blurred_dir] if isinstance(blurred_dir, (list, tuple)) else str(blurred_dir)
        self.work_dir = Path(work_dir)
        self.configured_voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.held_out = float(held_out)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.optics = {"na": float(na), "n_immersion": float(n_immersion), "wavelength": float(wavelength)}
        self.spot_check = bool(spot_check)
        self._record: dict[str, Any] | None = None

    # the answers, computed on first use
    def train_files(self) -> list[str]:
        """Paths of the training stacks."""
        return list(self.prepare()["train"])

    def held_out_files(self) -> list[str]:
        """Paths of the held-out stacks (validation without ground truth, the report's figures)."""
        return list(self.prepare()["held_out"])

    def voxel_size(self) -> list[float]:
        """The voxel size ``(z, y, x)`` µm the run uses (the files' when they carry one)."""
        return list(self.prepare()["voxel_size"])

    def warnings(self) -> list[str]:
        """The checks' warnings."""
        return list(self.prepare()["warnings"])

    def prepare(self) -> dict[str, Any]:
        """Read, check and split the stacks (once); return the record written to ``own_data.json``."""
        if self._record is not None:
            return self._record
        from bundle.data import list_volumes

        files = list_volumes(self.blurred_dir)
        volumes, sizes = [], []
        for f in files:
            volume, meta = load_volume(f)
            volumes.append(volume)
            sizes.append(meta["voxel_size"])
        voxel_size, warnings = self._settle_voxel_size(files, sizes)
        if len(files) == 1:
            train, held = self._split_one(files[0], volumes[0], voxel_size)
            train_volumes = [load_volume(train[0])[0]]
        else:
            n_held = min(len(files) - 1, max(1, round(self.held_out * len(files))))
            train, held = files[: len(files) - n_held], files[len(files) - n_held :]
            train_volumes = volumes[: len(train)]
        warnings += check_stacks(
            [v.shape for v in train_volumes], voxel_size, self.patch_size, **self.optics,
            volumes=train_volumes if self.spot_check else (),
        )  # fmt: skip
        for w in warnings:
            logger.warning(w)
        self._record = {
            "blurred": files,
            "train": [str(f) for f in train],
            "held_out": [str(f) for f in held],
            "voxel_size": list(voxel_size),
            "optics": self.optics,
            "warnings": warnings,
        }
        atomic_write_text(self.work_dir / "own_data.json", json.dumps(self._record, indent=2))
        logger.info(f"own data: {len(train)} training stack(s), {len(held)} held out; voxel size {voxel_size} um")
        return self._record

    def _settle_voxel_size(
        self, files: Sequence[str], sizes: Sequence[tuple[float, ...] | None]
    ) -> tuple[tuple[float, float, float], list[str]]:
        known = {f: s for f, s in zip(files, sizes, strict=True) if s is not None}
        distinct = {tuple(round(v, 6) for v in s) for s in known.values()}
        if len(distinct) > 1:
            listing = "; ".join(f"{Path(f).name}: {s}" for f, s in known.items())
            raise ValueError(f"the stacks have different voxel sizes ({listing}): resample them to one, or train on each group")
        warnings = []
        if known:
            from_files = tuple(float(v) for v in next(iter(known.values())))
            missing = [Path(f).name for f in files if f not in known]
            if missing:
                warnings.append(f"no voxel size in {', '.join(missing)}: assumed {from_files} um like the other stacks")
            configured = self.configured_voxel_size
            if configured is not None and any(abs(a - b) > 0.01 * b for a, b in zip(configured, from_files, strict=True)):
                warnings.append(
                    f"--voxel_size {configured} disagrees with the files' metadata {from_files} um: the metadata is used"
                )
            return from_files, warnings  # type: ignore[return-value]
        if self.configured_voxel_size is None:
            raise ValueError(f"{files[0]}: the stacks carry no voxel size; pass --voxel_size \"[z, y, x]\" in um")
        warnings.append(
            f"the stacks carry no voxel size: using --voxel_size {self.configured_voxel_size} um; the PSF depends on it, check it"
        )
        return self.configured_voxel_size, warnings  # type: ignore[return-value]

    def _split_one(self, path: str, volume: np.ndarray, voxel_size: Sequence[float]) -> tuple[list[str], list[str]]:
        axis = 1 if volume.shape[1] >= volume.shape[2] else 2
        n = volume.shape[axis]
        cut = n - max(1, round(self.held_out * n))
        stem = Path(path).name.split(".")[0]
        parts = {}
        for name, sl in (("train", slice(0, cut)), ("held_out", slice(cut, n))):
            index = [slice(None)] * 3
            index[axis] = sl
            parts[name] = save_volume(
                self.work_dir / "split" / name / f"{stem}.tif", volume[tuple(index)], voxel_size=voxel_size, protect=[path]
            )
        logger.info(f"{path}: one stack, split along {'ZYX'[axis]} at {cut} of {n} into training and held-out parts")
        return [str(parts["train"])], [str(parts["held_out"])]


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
    files. The report also lists the model's record (``model.json``), the learned PSF, the noise
    calibration and the checks' warnings. Written atomically; inputs are never overwritten.

    Args:
        stacks: the run's :class:`OwnStacks`.
        ckpt_dir: folder holding the model of record (``model.pt``; ``blur.tif`` when blind).
        output_dir: the run's output folder (``report.md``, ``held_out/``).
        percentiles: input normalisation, as in validation and inference.
    """

    def __init__(
        self, stacks: OwnStacks, ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike, percentiles: Sequence[float] = (0.1, 99.9)
    ) -> None:
        self.stacks = stacks
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = Path(output_dir)
        self.percentiles = tuple(float(p) for p in percentiles)

    def run(self) -> Path:
        """Write the outputs, figures and ``report.md``; return the report's path."""
        from tqdm.auto import tqdm

        from bundle.handlers import save_orthoslices
        from bundle.inference import deconvolve, load_network

        model_path = self.ckpt_dir / "model.pt"
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no model to report on (did training write one?)")
        network = load_network(model_path)
        record = self.stacks.prepare()
        voxel = tuple(record["voxel_size"])
        rows = []
        # a single stack was split: its held-out strip may be mostly background, so the whole stack is shown too
        sources = [(f, "") for f in record["held_out"]]
        if len(record["blurred"]) == 1 and record["held_out"] != record["blurred"]:
            sources.append((record["blurred"][0], "_whole"))
        for f, tag in tqdm(sources, desc="held-out stacks", unit="stack"):
            volume, _ = load_volume(f)
            output = deconvolve(volume, network, normalize=self.percentiles, progress=False)
            stem = Path(f).name.split(".")[0] + tag
            out_path = save_volume(self.output_dir / "held_out" / f"{stem}_deconv.tif", output, voxel_size=voxel, protect=[f])
            shown = [_display(v, self.percentiles) for v in (volume, output)]
            png = save_orthoslices(shown, self.output_dir / "held_out" / f"{stem}.png", voxel_size=voxel, title=["input", "output"])
            contrast = float(np.std(output) / max(np.std(volume), 1e-12))
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
        for name, path in (("Learned PSF", self.ckpt_dir / "blur.tif"), ("Noise calibration", self.output_dir / "calibration.json")):
            if path.is_file():
                lines += ["", f"{name}: `{path}`"]
        lines += ["", "## Checks", ""] + ([f"- {w}" for w in record["warnings"]] or ["- nothing found"])
        report = atomic_write_text(self.output_dir / "report.md", "\n".join(lines) + "\n")
        logger.info(f"report: {report}")
        return report
