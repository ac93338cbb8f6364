"""The CSBDeep-style Python API: :func:`deconvolve` and :func:`deconvolve_normalized`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import PathLike
from torch import nn

from bundle.classical.refine import PSFRefinement, tuned_refinement
from bundle.inference.checkpoints import load_network, model_file_in
from bundle.inference.deconvolver import Deconvolver
from bundle.inference.flips import DEFAULT_FLIPS
from bundle.inference.transforms import NormalizePercentilesd, RestoreIntensityd
from bundle.io import VolumeError, validate_volume

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------------


def deconvolve_normalized(
    volume: np.ndarray | torch.Tensor,
    deconvolver: Deconvolver,
    percentiles: Sequence[float] | None = (0.1, 99.9),
    output_range: str = "input",
    refinement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Normalise, deconvolve and restore one ``(Z, Y, X)`` volume with a ready :class:`Deconvolver`.

    The same transforms as ``configs/inference.json``: :class:`NormalizePercentilesd` (skipped if
    ``percentiles`` is None: the volume must already be in [0, 1]; a generator trained with one
    intensity range for its domain uses that range instead of the percentiles), ``deconvolver`` under
    ``torch.no_grad``, ``refinement(inputs, outputs)`` on the whole volume if given (e.g.
    :class:`~bundle.classical.PSFRefinement`, :func:`model_refinement`), :class:`RestoreIntensityd`.

    Returns:
        float32 ``(Z, Y, X)``.
    """
    x = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
    d: dict[str, Any] = {"image": x.float()[None]}
    if percentiles is not None:
        d = NormalizePercentilesd("image", percentiles, intensity_range=deconvolver.network)(d)
    elif output_range == "input":
        output_range = "normalized"  # nothing to undo
    with torch.no_grad():
        image = torch.as_tensor(d["image"])[None]
        pred = deconvolver(image)
        d["pred"] = (pred if refinement is None else refinement(image, pred))[0]
    d = RestoreIntensityd("pred", "image_range", output_range)(d)
    return torch.as_tensor(d["pred"])[0].detach().cpu().float().numpy()


def _to_zyx(volume: np.ndarray, axes: str, channel: int | None) -> tuple[np.ndarray, str]:
    axes = axes.upper()
    if sorted(axes) not in (sorted("ZYX"), sorted("CZYX")) or len(axes) != volume.ndim:
        raise ValueError(
            f"axes must name each axis of the volume once with Z, Y, X (and C), got axes={axes!r} for "
            f"shape {volume.shape}"
        )
    if "C" in axes:
        c = axes.index("C")
        n = volume.shape[c]
        if channel is None and n > 1:
            raise VolumeError(f"<array>: has {n} channels (axes {axes}); choose one with channel=0..{n - 1}")
        channel = 0 if channel is None else channel
        if not 0 <= channel < n:
            raise VolumeError(f"<array>: channel={channel} requested but it has {n} channel(s)")
        volume = np.take(volume, channel, axis=c)
        axes = axes.replace("C", "")
    return np.transpose(volume, [axes.index(a) for a in "ZYX"]), axes


def deconvolve(
    volume: np.ndarray | torch.Tensor,
    model: nn.Module | PathLike,
    axes: str = "ZYX",
    roi_size: Sequence[int] | str | None = "auto",
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: torch.device | str | None = None,
    normalize: Sequence[float] | None = (0.1, 99.9),
    output_range: str = "input",
    progress: bool = True,
    channel: int | None = None,
    precision: str = "auto",
    max_pass_voxels: int = 1 << 22,
    allocator: str = "system",
    callback: Callable[[int, int], None] | None = None,
    refine_iterations: int | str = "auto",
    refine_tv_weight: float | str = "auto",
    refine_psf: np.ndarray | PathLike | None = None,
    flips: int = DEFAULT_FLIPS,
    refine_blend: float | str = "auto",
    hot_pixel_threshold: float | str | None = "auto",
) -> np.ndarray:
    """Deconvolve a 3D stack with a trained generator (CSBDeep-style ``predict``).

    Args:
        volume: the stack; ``axes`` names its axes.
        model: trained bundle folder, checkpoint folder, ``model.pt``, ``model.ts`` or an ``nn.Module``
            (see :func:`load_network`).
        axes: axis order of ``volume``, a permutation of ``"ZYX"`` or ``"CZYX"`` (e.g. ``"YXZ"``,
            ``"XYZ"``, ``"ZCYX"``).
        roi_size: ``"auto"`` (default): per volume the window computing the fewest voxels within
            ``max_pass_voxels`` (:func:`plan_roi_size`, 16 voxels of overlap; faster, and scored higher
            than the paper's 64³ windows in ``docs/benchmark.md``); a window ``(Z, Y, X)``, multiples
            of 16 (``(64, 64, 64)``: the paper's); None: the bundle's ``patch_size`` for a bundle
            folder, else 64³.
        overlap: window overlap (0.25: the paper's 16 voxels at 64³), Gaussian blending.
        sw_batch_size: windows per forward pass (>= 2 on CPU, see :class:`Deconvolver`).
        device: device of the network and the windows; default CUDA if available. The whole volume
            and the stitched result stay on the CPU.
        normalize: ``(lower, upper)`` percentiles mapped to [0, 1] before the network (the training
            normalisation of the blurred domain, ``blurred_percentiles``); None if the volume is
            already in [0, 1].
        output_range: ``"input"``: the [0, 1] output mapped back to the input's values at those
            percentiles; ``"normalized"``: the network's [0, 1] output.
        progress: progress bar over the windows.
        channel: channel to deconvolve when ``axes`` has ``C`` with more than one channel.
        precision: ``"auto"`` (default: bfloat16 on CUDA and on CPUs with native bf16, else float32,
            :func:`resolve_precision`), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (CUDA).
        max_pass_voxels: voxels per forward pass at most with ``roi_size="auto"`` (bounds memory:
            4 Mi voxels = about 1.6 GiB in bfloat16, 3 GiB in float32 for the full-size generator).
        allocator: CPU ``malloc`` policy during the call (see :class:`Deconvolver`): ``"system"``
            (default, no process-wide change) or the faster ``"reuse"`` (opt-in).
        callback: ``callback(done, total)`` after each forward pass (windows done, windows in all);
            an exception it raises (e.g. :class:`~bundle.inference.DeconvolutionCancelled`) stops the
            call (see :class:`Deconvolver`).
        refine_iterations: Richardson–Lucy iterations started from G's output on the whole volume
            (:func:`model_refinement`): ``"auto"`` (default) the count tuned for a model folder by
            ``scripts/tune_refinement.py`` (its ``refinement.json``; none: G alone, as for a module or
            a zip), as ``run inference`` does; 0: off; a number: that many.
        refine_tv_weight: RL's total-variation weight: ``"auto"`` the tuned one (0 if none), or a number.
        refine_psf: the refinement's PSF (array or file); default the model folder's ``blur.tif``.
        refine_blend: weight of the refined estimate against G's output: ``"auto"`` the tuned one (1
            if none: the refined estimate alone), or a number in (0, 1].
        flips: G's output averaged over this many mirrored/transposed XY views (1, 2, 4 or 8; see
            :func:`~bundle.inference.flips.flip_average`): 8 (default, as ``run inference``) costs 8×
            the network time; 4 (mirrors only) for a PSF not symmetric under quarter turns
            (astigmatism), 1 for one without mirror symmetry either (coma).
        hot_pixel_threshold: replace the camera's hot pixels first (:func:`bundle.data.correct_hot_pixels`):
            ``"auto"`` (default) as the model's training did (:func:`bundle.data.trained_hot_pixel_threshold`;
            a module: none), as ``run inference`` does; a number: that threshold; None: no correction.

    Returns:
        float32 array with the input's axes (a ``C`` axis keeps size 1).

    Example::

        >>> from bundle.inference import deconvolve
        >>> sharp = deconvolve(stack, model="path/to/bundle", axes="ZYX")
    """
    _to_zyx(_as_array(volume), axes, channel)  # a bad volume or axes fail before the model is loaded
    refinement = model_refinement(model, refine_iterations, refine_psf, refine_tv_weight, refine_blend)
    if hot_pixel_threshold == "auto":
        from bundle.data.record import trained_hot_pixel_threshold

        hot_pixel_threshold = trained_hot_pixel_threshold(None if isinstance(model, nn.Module) else model)
    deconvolver = load_deconvolver(
        model, device, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, progress=progress,
        precision=precision, max_pass_voxels=max_pass_voxels, allocator=allocator, callback=callback, flips=flips,
    )  # fmt: skip
    return predict(deconvolver, volume, axes, normalize, output_range, channel, refinement, hot_pixel_threshold)


def checkpoint_folder(model: nn.Module | PathLike) -> Path | None:
    """The folder holding the model file of ``model`` as :func:`load_network` finds it (where training
    writes ``blur.tif`` and ``scripts/tune_refinement.py`` writes ``refinement.json``); None for a
    module or a bundle zip."""
    if isinstance(model, nn.Module) or Path(model).suffix.lower() == ".zip":
        return None
    path = Path(model)
    if not path.is_dir():
        return path.parent
    found = model_file_in(path)
    return path if found is None else found.parent


def model_refinement(
    model: nn.Module | PathLike,
    refine_iterations: int | str = "auto",
    refine_psf: np.ndarray | PathLike | None = None,
    refine_tv_weight: float | str = "auto",
    refine_blend: float | str = "auto",
) -> PSFRefinement | None:
    """The refinement ``run inference`` applies to ``model`` (:class:`~bundle.classical.PSFRefinement`), or None.

    Args:
        model: as :func:`deconvolve`.
        refine_iterations: ``"auto"``: the count in the model folder's ``refinement.json``
            (:func:`~bundle.classical.tuned_refinement`; 0 without one); an int >= 0: that count.
        refine_psf: PSF array or file; default the model folder's ``blur.tif``.
        refine_tv_weight: ``"auto"``: the TV weight in ``refinement.json`` (0 without one); a number.
        refine_blend: ``"auto"``: the blend in ``refinement.json`` (1 without one); a number in (0, 1].

    Raises:
        ValueError: a negative or unknown count, or a count > 0 with no PSF to refine with.
    """
    folder = checkpoint_folder(model)
    if refine_iterations == "auto":
        iterations = 0 if folder is None else tuned_refinement(folder)
    elif isinstance(refine_iterations, (int, np.integer)) and not isinstance(refine_iterations, bool):
        iterations = int(refine_iterations)
    else:
        raise ValueError(f"refine_iterations must be 'auto' or an int >= 0, got {refine_iterations!r}")
    if iterations == 0:
        return None
    psf = refine_psf
    if psf is None:
        if folder is None or not (folder / "blur.tif").is_file():
            raise ValueError(
                f"{model}: refine_iterations={iterations} needs a PSF: pass refine_psf (no blur.tif next to the model)"
            )
        psf = folder / "blur.tif"
    def setting(value: float | str, key: str, default: float) -> float:
        if value != "auto":
            return float(value)
        return default if folder is None else float(tuned_refinement(folder, key))

    tv_weight, blend = setting(refine_tv_weight, "tv_weight", 0.0), setting(refine_blend, "blend", 1.0)
    return PSFRefinement(psf, num_iter=iterations, tv_weight=tv_weight, blend=blend)


def _as_array(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    return volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)


def load_deconvolver(
    model: nn.Module | PathLike,
    device: torch.device | str | None = None,
    roi_size: Sequence[int] | str | None = "auto",
    **settings: Any,
) -> Deconvolver:
    """A :class:`Deconvolver` with ``model`` loaded once (:meth:`Deconvolver.from_bundle`).

    Args:
        model: as :func:`deconvolve`.
        device: as :func:`deconvolve` (default CUDA if available).
        roi_size: as :func:`deconvolve` (None: the bundle's ``patch_size``).
        settings: :class:`Deconvolver` arguments (``overlap``, ``sw_batch_size``, ``progress``,
            ``precision`` — default ``"auto"`` here —, ``max_pass_voxels``, ``allocator``, ``callback``,
            ``flips`` — default 8 here, as ``run inference``).
    """
    if device is None:
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    network = load_network(model, device)
    if roi_size is None:
        roi_size = _bundle_setting(model, "patch_size", (64, 64, 64))
    settings = {"sw_batch_size": 4, "progress": True, "precision": "auto", "flips": DEFAULT_FLIPS, **settings}
    return Deconvolver(network, roi_size=roi_size, mode="gaussian", sw_device=device, device="cpu", **settings)


def predict(
    deconvolver: Deconvolver,
    volume: np.ndarray | torch.Tensor,
    axes: str = "ZYX",
    normalize: Sequence[float] | None = (0.1, 99.9),
    output_range: str = "input",
    channel: int | None = None,
    refinement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    hot_pixel_threshold: float | None = None,
) -> np.ndarray:
    """One stack through a ready :class:`Deconvolver` (:meth:`Deconvolver.predict`); arguments and
    result as :func:`deconvolve` (``refinement`` as :func:`deconvolve_normalized`)."""
    zyx, spatial_axes = _to_zyx(_as_array(volume), axes, channel)
    validate_volume(zyx, None)
    from bundle.data.camera import correct_hot_pixels

    zyx = correct_hot_pixels(zyx, hot_pixel_threshold)[0]
    out = deconvolve_normalized(zyx.astype(np.float32, copy=False), deconvolver, normalize, output_range, refinement)
    out = np.transpose(out, ["ZYX".index(a) for a in spatial_axes])
    if "C" in axes.upper():
        out = np.expand_dims(out, axes.upper().index("C"))
    return out


def _bundle_setting(model: Any, key: str, default: Any) -> Any:
    """A value of a bundle folder's ``configs/common.json`` (the default if there is none)."""
    if isinstance(model, (str, os.PathLike)) and (Path(model) / "configs" / "common.json").is_file():
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(Path(model) / "configs" / "common.json"))
        if key in parser.config:  # type: ignore[operator]
            return parser.get_parsed_content(key)
    return default
