"""Unpaired data for cycleGAN training: two independent domains, random crops, rotations and flips.

The sharp domain X and the blurred domain Y are two unrelated file lists; every training item pairs a
random crop of a random X volume with a random crop of a random Y volume, drawn independently.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence

import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropd,
    RandWeightedCropd,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)

from bundle.io import CheckVoxelSized, LoadVolumed
from bundle.sampling import ForegroundWeightd

logger = logging.getLogger(__name__)

__all__ = [
    "VOLUME_EXTENSIONS",
    "list_volumes",
    "paired_datalist",
    "normalize_transforms",
    "paired_transforms",
    "augment_transforms",
    "train_transforms",
    "UnpairedDataset",
    "unpaired_dataset",
    "paired_train_transforms",
    "paired_dataset",
    "validation_datalist",
]

VOLUME_EXTENSIONS = (".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".dv", ".czi", ".nd2", ".lif")


def list_volumes(source: str | Sequence[str]) -> list[str]:
    """Sorted volume files from a folder, a glob pattern, a single file, or a list of those.

    Hidden files (names starting with a dot: the bundle's temporary files, e.g. left by a killed
    run) are skipped in folders, as glob patterns skip them.

    Raises:
        FileNotFoundError: naming ``source`` when nothing matches.
    """
    if not isinstance(source, str):
        return [f for s in source for f in list_volumes(s)]
    if os.path.isdir(source):
        files = [
            os.path.join(source, f)
            for f in os.listdir(source)
            if f.lower().endswith(VOLUME_EXTENSIONS) and not f.startswith(".")  # hidden: temporary files
        ]
    elif any(c in source for c in "*?["):
        files = [f for f in glob.glob(source) if f.lower().endswith(VOLUME_EXTENSIONS)]
    elif os.path.isfile(source):
        files = [source]
    else:
        raise FileNotFoundError(f"{source}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"{source}: no volume files ({', '.join(VOLUME_EXTENSIONS)}) found")
    return sorted(files)


def paired_datalist(image_dir: str | Sequence[str], label_dir: str | None = None) -> list[dict[str, str]]:
    """``[{"image": blurred, "label": ground_truth}, ...]`` matched by file name (label optional).

    Raises:
        FileNotFoundError: when a ground-truth file for an image is missing.
    """
    images = list_volumes(image_dir)
    if label_dir is None:
        return [{"image": f} for f in images]
    items = []
    for f in images:
        label = os.path.join(label_dir, os.path.basename(f))
        if not os.path.isfile(label):
            raise FileNotFoundError(f"{label}: ground truth for {f} is missing")
        items.append({"image": f, "label": label})
    return items


def validation_datalist(
    image_dir: str | Sequence[str], label_dir: str | None = None, required: bool = False
) -> list[dict[str, str]]:
    """Validation items like :func:`paired_datalist`, optional: ``[]`` when ``image_dir`` does not exist.

    Training without validation data is allowed (own stacks, no held-out set): the evaluator then
    skips its runs and :class:`bundle.handlers.ModelWithoutValidation` writes the last model and says
    so. A folder that exists but is empty, or whose ground truth is incomplete, is still an error.

    Args:
        image_dir: blurred validation stacks (folder, glob, file or list).
        label_dir: their ground truth, matched by name (None: no labels, for no-reference metrics).
        required: raise instead of returning ``[]`` when ``image_dir`` is missing.
    """
    if isinstance(image_dir, str) and not required and not os.path.exists(image_dir) and not any(c in image_dir for c in "*?["):
        logger.warning(f"{image_dir}: no validation folder; training runs without validation")
        return []
    return paired_datalist(image_dir, label_dir)


def normalize_transforms(
    keys: Sequence[str] = ("image",),
    percentiles: Sequence[float] = (0.0, 99.9),
    clip: bool = True,
    voxel_size: Sequence[float] | None = None,
) -> list:
    """Load, add a channel, and map the given percentiles to [0, 1]: ``(1, Z, Y, X)`` float32.

    Args:
        keys: dictionary keys holding file paths.
        percentiles: ``(lower, upper)`` percentiles mapped to 0 and 1.
        clip: clip to [0, 1] after scaling.
        voxel_size: the ``(z, y, x)`` µm the training is configured for (``--voxel_size``): a file whose
            metadata says otherwise is logged with both values (:class:`bundle.io.CheckVoxelSized`).
    """
    lower, upper = percentiles
    return [
        LoadVolumed(keys=keys),  # the loader of inference: (Z, Y, X) for every format, errors name the file
        CheckVoxelSized(keys=keys, reference=voxel_size, what="the configured voxel_size"),
        ScaleIntensityRangePercentilesd(
            keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=clip, relative=False
        ),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]


def paired_transforms(
    image_percentiles: Sequence[float] = (0.1, 99.9),
    label_percentiles: Sequence[float] = (0.0, 99.99),
    clip: bool = True,
    with_label: bool = True,
) -> Compose:
    """Validation/test pipeline: blurred ``"image"`` normalised like the blurred domain, ``"label"``
    (ground truth) like the sharp domain; both ``(1, Z, Y, X)`` float32 in [0, 1].
    ``with_label=False``: items have no ground truth (no-reference validation on held-out stacks).
    """
    label = normalize_transforms(("label",), label_percentiles, clip) if with_label else []
    return Compose(normalize_transforms(("image",), image_percentiles, clip) + label)


def augment_transforms(
    keys: Sequence[str],
    patch_size: Sequence[int],
    rotate_axes: Sequence[int] = (1, 2),
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    background_share: float | None = None,
) -> list:
    """The paper's augmentation, applied identically to ``keys``: pad to ``patch_size`` if smaller,
    random crop, random 90° rotations in ``rotate_axes``, random flips along each axis.

    ``background_share`` None: uniform crops (the paper). A number in [0, 1]: crop centres drawn in
    proportion to the first key's smoothed intensity, that share of them uniformly
    (:class:`~bundle.sampling.ForegroundWeightd` + MONAI's ``RandWeightedCropd``; the pipeline then
    returns a list of one item)."""
    if background_share is None:
        crop = [RandSpatialCropd(keys=keys, roi_size=patch_size, random_size=False)]
    else:
        crop = [
            ForegroundWeightd(keys=keys[0], weight_key="crop_weight", background_share=background_share),
            RandWeightedCropd(keys=keys, w_key="crop_weight", spatial_size=patch_size, num_samples=1),
        ]
    return [
        SpatialPadd(keys=keys, spatial_size=patch_size),
        *crop,
        RandRotate90d(keys=keys, prob=rotate_prob, max_k=3, spatial_axes=tuple(rotate_axes)),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
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
        background_share: None for uniform crops, else foreground-weighted crops with this share of
            uniform ones (see :func:`augment_transforms`).
        voxel_size: configured voxel size, checked against each file's (:func:`normalize_transforms`).
    """
    keys = ("image",)
    return Compose(
        normalize_transforms(keys, percentiles, clip, voxel_size)
        + augment_transforms(keys, patch_size, rotate_axes, flip_prob, rotate_prob, background_share)
    )


def _first(item: dict | list) -> dict:
    """The item of a pipeline that returns one dict, or a list of one (weighted crops)."""
    return item[0] if isinstance(item, list) else item


class UnpairedDataset(torch.utils.data.Dataset):
    """Items ``{"sharp": x, "blurred": y}`` drawn independently from two domains.

    Written here because MONAI's ``ZipDataset`` pairs items index by index, which would make the two
    domains co-occur in a fixed pattern; the paper's training is unpaired. Each item draws a random
    volume from each domain with the global torch RNG (seeded by ``monai.utils.set_determinism``
    and re-seeded per DataLoader worker), and the domain datasets apply their own random crops.

    Args:
        sharp: dataset of the sharp domain X, items ``{"image": (1, D, H, W)}``.
        blurred: dataset of the blurred domain Y, items ``{"image": (1, D, H, W)}``.
        length: items per epoch (iterations per epoch × batch size).
    """

    def __init__(self, sharp: torch.utils.data.Dataset, blurred: torch.utils.data.Dataset, length: int = 100) -> None:
        if len(sharp) == 0 or len(blurred) == 0:  # type: ignore[arg-type]
            raise ValueError("both the sharp and the blurred domain need at least one volume")
        self.sharp, self.blurred, self.length = sharp, blurred, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(torch.randint(len(self.sharp), ()))  # type: ignore[arg-type]
        j = int(torch.randint(len(self.blurred), ()))  # type: ignore[arg-type]
        return {"sharp": _first(self.sharp[i])["image"], "blurred": _first(self.blurred[j])["image"]}


def unpaired_dataset(
    sharp_dir: str | Sequence[str],
    blurred_dir: str | Sequence[str],
    length: int = 100,
    patch_size: Sequence[int] = (64, 64, 64),
    sharp_percentiles: Sequence[float] = (0.0, 99.99),
    blurred_percentiles: Sequence[float] = (0.1, 99.9),
    rotate_axes: Sequence[int] = (1, 2),
    cache_rate: float = 1.0,
    num_workers: int = 0,
    background_share: float | None = None,
    voxel_size: Sequence[float] | None = None,
) -> UnpairedDataset:
    """Build the unpaired training dataset from two folders (or globs, or file lists).

    Loading and normalisation are cached (``CacheDataset``); crops, rotations and flips are redrawn
    for every item.

    Args:
        sharp_dir: the sharp domain X (e.g. deconvolved or simulated ground-truth stacks).
        blurred_dir: the blurred domain Y (raw widefield stacks), unrelated to X.
        length: items per epoch.
        patch_size: random crop size ``(D, H, W)``.
        sharp_percentiles: normalisation of X, percentiles mapped to [0, 1].
        blurred_percentiles: normalisation of Y, percentiles mapped to [0, 1].
        rotate_axes: spatial axes of the random 90° rotations.
        cache_rate: fraction of volumes cached in memory after normalisation.
        num_workers: threads used to fill the cache.
        background_share: crops of both domains are centred in proportion to their (smoothed)
            intensity except this share, drawn uniformly; ``None``: uniform crops (the paper).
        voxel_size: the configured ``(z, y, x)`` µm; files whose metadata differ are logged (both values).
    """

    def domain(files: list[str], percentiles: Sequence[float]) -> Dataset:
        transform = train_transforms(
            patch_size, percentiles, True, rotate_axes, background_share=background_share, voxel_size=voxel_size
        )
        return CacheDataset(
            [{"image": f} for f in files], transform, cache_rate=cache_rate, num_workers=num_workers, progress=False
        )

    return UnpairedDataset(
        domain(list_volumes(sharp_dir), sharp_percentiles),
        domain(list_volumes(blurred_dir), blurred_percentiles),
        length=length,
    )


def paired_train_transforms(
    patch_size: Sequence[int] = (64, 64, 64),
    image_percentiles: Sequence[float] = (0.1, 99.9),
    label_percentiles: Sequence[float] = (0.0, 99.99),
    clip: bool = True,
    rotate_axes: Sequence[int] = (1, 2),
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
) -> Compose:
    """Training pipeline of the supervised baselines: the same random crop, rotation and flips for
    the blurred ``"image"`` and its ground truth ``"label"``.

    Each key is normalised like its domain (``image`` like the blurred domain, ``label`` like the
    sharp domain, as in :func:`paired_transforms`); MONAI's dictionary transforms draw one set of
    random parameters per call and apply it to every key, so the pair stays aligned.

    Args:
        patch_size: crop size ``(D, H, W)``; smaller volumes are zero-padded first.
        image_percentiles: normalisation of the blurred image, percentiles mapped to [0, 1].
        label_percentiles: normalisation of the ground truth, percentiles mapped to [0, 1].
        clip: clip intensities to [0, 1].
        rotate_axes: spatial axes of the random 90° rotations (in-plane ``(1, 2)`` by default).
        flip_prob: probability of a flip along each axis.
        rotate_prob: probability of a random 90° rotation.

    Example::

        >>> t = paired_train_transforms((32, 32, 32))
        >>> item = t({"image": "train/blurred/blurred_000.tif", "label": "train/blurred_ground_truth/blurred_000.tif"})
        >>> item["image"].shape, item["label"].shape  # (1, 32, 32, 32) each
    """
    keys = ("image", "label")
    return Compose(
        normalize_transforms(("image",), image_percentiles, clip)
        + normalize_transforms(("label",), label_percentiles, clip)
        + augment_transforms(keys, patch_size, rotate_axes, flip_prob, rotate_prob)
    )


def paired_dataset(
    image_dir: str,
    label_dir: str,
    patch_size: Sequence[int] = (64, 64, 64),
    image_percentiles: Sequence[float] = (0.1, 99.9),
    label_percentiles: Sequence[float] = (0.0, 99.99),
    rotate_axes: Sequence[int] = (1, 2),
    cache_rate: float = 1.0,
    num_workers: int = 0,
) -> CacheDataset:
    """Paired training dataset ``{"image": blurred crop, "label": ground-truth crop}`` for the
    supervised baselines (files matched by name, see :func:`paired_datalist`).

    Loading and normalisation are cached; crops, rotations and flips are redrawn for every item.
    The dataset has one item per volume: draw ``epoch_length * batch_size`` items per epoch with a
    ``RandomSampler(replacement=True, num_samples=...)`` in the DataLoader.

    Args:
        image_dir: blurred volumes (e.g. ``train/blurred``).
        label_dir: their ground truth, same file names (e.g. ``train/blurred_ground_truth``).
        patch_size: random crop size ``(D, H, W)``.
        image_percentiles: normalisation of the blurred volumes.
        label_percentiles: normalisation of the ground truth.
        rotate_axes: spatial axes of the random 90° rotations.
        cache_rate: fraction of volumes cached after normalisation.
        num_workers: threads used to fill the cache.
    """
    transform = paired_train_transforms(patch_size, image_percentiles, label_percentiles, True, rotate_axes)
    return CacheDataset(
        paired_datalist(image_dir, label_dir), transform, cache_rate=cache_rate, num_workers=num_workers, progress=False
    )
