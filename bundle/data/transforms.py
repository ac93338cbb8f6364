"""Transform chains: load + percentile normalisation, augmentation, training crops (foreground-weighted)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropd,
    RandWeightedCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)

from bundle.data.camera import CorrectHotPixelsd
from bundle.io import CheckVoxelSized, LoadVolumed
from bundle.sampling import CROP_WEIGHT_KEY, ForegroundWeightd, crop_share


def normalize_transforms(
    keys: Sequence[str] = ("image",),
    percentiles: Sequence[float] = (0.0, 99.9),
    clip: bool = True,
    voxel_size: Sequence[float] | None = None,
    intensity_range: Sequence[float] | None = None,
    hot_pixel_threshold: float | None = None,
) -> list:
    """Load, add a channel, and map the given percentiles to [0, 1]: ``(1, Z, Y, X)`` float32.

    Args:
        keys: dictionary keys holding file paths.
        percentiles: ``(lower, upper)`` percentiles of each volume mapped to 0 and 1.
        clip: clip to [0, 1] after scaling.
        voxel_size: the ``(z, y, x)`` µm the training is configured for (``--voxel_size``): a file whose
            metadata says otherwise is logged with both values (:class:`bundle.io.CheckVoxelSized`).
        intensity_range: ``(v_lo, v_hi)`` intensities mapped to 0 and 1 in *every* volume (one scale for
            the whole domain, e.g. from :func:`bundle.data.domain_intensity_range`); replaces the
            per-volume ``percentiles`` when given.
        hot_pixel_threshold: replace a camera's hot pixels before the normalisation
            (:class:`bundle.data.CorrectHotPixelsd` with this threshold); ``None``: read as stored.
    """
    if intensity_range is None:
        lower, upper = percentiles
        scale = ScaleIntensityRangePercentilesd(
            keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=clip, relative=False
        )
    else:
        v_lo, v_hi = check_intensity_range(intensity_range)
        scale = ScaleIntensityRanged(keys=keys, a_min=v_lo, a_max=v_hi, b_min=0.0, b_max=1.0, clip=clip)
    return [
        LoadVolumed(keys=keys),  # the loader of inference: (Z, Y, X) for every format, errors name the file
        CorrectHotPixelsd(keys=keys, threshold=hot_pixel_threshold),  # passes unchanged when None
        CheckVoxelSized(keys=keys, reference=voxel_size, what="the configured voxel_size"),
        scale,
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]


def check_intensity_range(intensity_range: Sequence[float]) -> tuple[float, float]:
    """``(v_lo, v_hi)`` as floats; a clear error unless ``v_lo < v_hi``."""
    values = tuple(float(v) for v in intensity_range)
    if len(values) != 2 or not values[0] < values[1]:
        raise ValueError(f"an intensity range must be (v_lo, v_hi) with v_lo < v_hi, got {list(intensity_range)}")
    return values  # type: ignore[return-value]


def paired_transforms(
    image_percentiles: Sequence[float] = (0.1, 99.9),
    label_percentiles: Sequence[float] = (0.0, 99.99),
    clip: bool = True,
    with_label: bool = True,
    image_range: Sequence[float] | None = None,
    label_range: Sequence[float] | None = None,
    image_hot_pixel_threshold: float | None = None,
) -> Compose:
    """Validation/test pipeline: blurred ``"image"`` normalised like the blurred domain, ``"label"``
    (ground truth) like the sharp domain; both ``(1, Z, Y, X)`` float32 in [0, 1].
    ``with_label=False``: items have no ground truth (no-reference validation on held-out stacks).
    ``image_range``/``label_range``: one intensity range per domain instead of per-volume percentiles
    (see :func:`normalize_transforms`). ``image_hot_pixel_threshold``: hot pixels of the blurred image
    replaced first (:class:`bundle.data.CorrectHotPixelsd`); ``None``: read as stored.
    """
    label = normalize_transforms(("label",), label_percentiles, clip, intensity_range=label_range) if with_label else []
    image = normalize_transforms(
        ("image",), image_percentiles, clip, intensity_range=image_range, hot_pixel_threshold=image_hot_pixel_threshold
    )
    return Compose(image + label)


def augment_transforms(
    keys: Sequence[str],
    patch_size: Sequence[int],
    rotate_axes: Sequence[int] = (1, 2),
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    background_share: float | None = None,
    flip_axes: Sequence[int] = (0, 1, 2),
    weight_key: str | None = None,
) -> list:
    """The paper's augmentation, applied identically to ``keys``: pad to ``patch_size`` if smaller,
    random crop, random 90° rotations in ``rotate_axes``, random flips along each of ``flip_axes``.

    ``background_share`` None or 1: uniform crops (the paper). A number in [0, 1): crop centres drawn in
    proportion to the first key's smoothed intensity, that share of them uniformly
    (:class:`~bundle.sampling.ForegroundWeightd` + MONAI's ``RandWeightedCropd``; the pipeline then
    returns a list of one item). ``weight_key``: the items already hold that map under this key
    (computed once per volume, :class:`~bundle.data.DomainCrops`), padded here with the image;
    ``None``: it is computed for every item."""
    pad = [SpatialPadd(keys=keys, spatial_size=patch_size)]
    background_share = crop_share(background_share)
    if background_share is None:
        crop = [RandSpatialCropd(keys=keys, roi_size=patch_size, random_size=False)]
    elif weight_key is not None:
        pad = [SpatialPadd(keys=[*keys, weight_key], spatial_size=patch_size)]
        crop = [RandWeightedCropd(keys=keys, w_key=weight_key, spatial_size=patch_size, num_samples=1)]
    else:
        crop = [
            ForegroundWeightd(keys=keys[0], weight_key=CROP_WEIGHT_KEY, background_share=background_share),
            RandWeightedCropd(keys=keys, w_key=CROP_WEIGHT_KEY, spatial_size=patch_size, num_samples=1),
        ]
    return [
        *pad,
        *crop,
        RandRotate90d(keys=keys, prob=rotate_prob, max_k=3, spatial_axes=tuple(rotate_axes)),
        *(RandFlipd(keys=keys, prob=flip_prob, spatial_axis=int(axis)) for axis in flip_axes),
    ]


def train_transforms(
    patch_size: Sequence[int] = (64, 64, 64),
    percentiles: Sequence[float] = (0.0, 99.9),
    clip: bool = True,
    rotate_axes: Sequence[int] = (1, 2),
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    background_share: float | None = None,
    voxel_size: Sequence[float] | None = None,
    intensity_range: Sequence[float] | None = None,
    flip_axes: Sequence[int] = (0, 1, 2),
) -> Compose:
    """Training pipeline for one domain (key ``"image"``): normalise, random crop, 90° rotations, flips.

    Args:
        patch_size: crop size ``(D, H, W)``; volumes smaller than it are zero-padded first.
        percentiles: intensity normalisation, see :func:`normalize_transforms`.
        clip: clip intensities to [0, 1].
        rotate_axes: spatial axes of the 90° rotations; in-plane ``(1, 2)`` (Y, X) by default
            because microscope voxels are anisotropic. Rotations need a square crop in that plane.
        flip_prob: probability of a flip along each axis.
        rotate_prob: probability of a random 90° rotation.
        background_share: None or 1 for uniform crops, else foreground-weighted crops with this share of
            uniform ones (see :func:`augment_transforms`).
        voxel_size: configured voxel size, checked against each file's (:func:`normalize_transforms`).
        intensity_range: one ``(v_lo, v_hi)`` for every volume instead of per-volume ``percentiles``.
        flip_axes: spatial axes of the random flips. A flip along Z is no symmetry of a blurred stack
            whose PSF is axially asymmetric (spherical aberration, e.g. from a refractive-index
            mismatch): leave 0 out for such a domain.
    """
    keys = ("image",)
    return Compose(
        normalize_transforms(keys, percentiles, clip, voxel_size, intensity_range)
        + augment_transforms(keys, patch_size, rotate_axes, flip_prob, rotate_prob, background_share, flip_axes)
    )
