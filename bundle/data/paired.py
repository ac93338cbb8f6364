"""Paired datasets of the supervised baselines: a blurred crop and its ground truth, cropped and augmented alike."""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import CacheDataset
from monai.transforms import Compose

from bundle.data.lists import paired_datalist
from bundle.data.transforms import augment_transforms, normalize_transforms

__all__ = ["paired_dataset", "paired_train_transforms"]


def paired_train_transforms(
    patch_size: Sequence[int] = (64, 64, 64),
    image_percentiles: Sequence[float] = (0.1, 99.9),
    label_percentiles: Sequence[float] = (0.0, 99.99),
    clip: bool = True,
    rotate_axes: Sequence[int] = (1, 2),
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    image_range: Sequence[float] | None = None,
    label_range: Sequence[float] | None = None,
    flip_axes: Sequence[int] = (1, 2),
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
        image_range: one intensity range for every blurred image instead of its percentiles.
        label_range: the same for the ground truth.
        flip_axes: spatial axes of the random flips, applied to both keys; Y and X by default. A pair
            flipped along Z is the flipped sample blurred by the Z-flipped PSF, no image of an
            aberrated (Z-asymmetric) PSF; ``(0, 1, 2)`` is the paper's augmentation (measured:
            ``docs/results.md``, session 21).

    Example::

        >>> t = paired_train_transforms((32, 32, 32))
        >>> item = t({"image": "train/blurred/blurred_000.tif", "label": "train/blurred_ground_truth/blurred_000.tif"})
        >>> item["image"].shape, item["label"].shape  # (1, 32, 32, 32) each
    """
    keys = ("image", "label")
    return Compose(
        normalize_transforms(("image",), image_percentiles, clip, intensity_range=image_range)
        + normalize_transforms(("label",), label_percentiles, clip, intensity_range=label_range)
        + augment_transforms(keys, patch_size, rotate_axes, flip_prob, rotate_prob, flip_axes=flip_axes)
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
    image_range: Sequence[float] | None = None,
    label_range: Sequence[float] | None = None,
    flip_axes: Sequence[int] = (1, 2),
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
        image_range: one intensity range for every blurred volume instead of its percentiles.
        label_range: the same for the ground truth.
        flip_axes: spatial axes of the random flips of each pair (see :func:`paired_train_transforms`).
    """
    transform = paired_train_transforms(
        patch_size, image_percentiles, label_percentiles, True, rotate_axes,
        image_range=image_range, label_range=label_range, flip_axes=flip_axes,
    )
    return CacheDataset(
        paired_datalist(image_dir, label_dir), transform, cache_rate=cache_rate, num_workers=num_workers, progress=False
    )
