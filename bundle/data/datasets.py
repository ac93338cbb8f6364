"""Datasets: unpaired (two independent domains) for the cycleGAN, paired for the supervised baselines."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import torch
from monai.data import CacheDataset
from monai.transforms import Compose

from bundle.data.camera import hot_pixel_setting, warn_hot_pixels
from bundle.data.lists import list_volumes, paired_datalist
from bundle.data.transforms import augment_transforms, normalize_transforms
from bundle.sampling import CROP_WEIGHT_KEY, ForegroundWeightd, crop_share


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


class DomainCrops(torch.utils.data.Dataset):
    """Random crops of one domain's cached, normalised volumes: items ``{"image": (1, *patch_size)}``.

    Written here because MONAI's ``CacheDataset`` caches the deterministic prefix of one pipeline:
    the PSF fit's larger crops of the same volumes would load and normalise every volume a second
    time. This dataset keeps the cache apart from the crops, and :meth:`with_patch_size` hands it to
    another crop size. Each item crops a copy of the cached volume (as ``CacheDataset`` does). A
    volume's crop-centre map (``background_share``; a smoothing of the whole volume) is computed on its
    first draw and kept (one more float32 copy of the volume), shared with :meth:`with_patch_size`.

    Args:
        volumes: the normalised volumes, items ``{"image": (1, D, H, W)}`` (a ``CacheDataset``).
        patch_size: crop size ``(D, H, W)``, margins included.
        rotate_axes: spatial axes of the random 90° rotations.
        background_share: ``None`` or 1 for uniform crops, else foreground-weighted (:func:`augment_transforms`).
        flip_axes: spatial axes of the random flips.
    """

    def __init__(
        self,
        volumes: torch.utils.data.Dataset,
        patch_size: Sequence[int],
        rotate_axes: Sequence[int] = (1, 2),
        background_share: float | None = None,
        flip_axes: Sequence[int] = (0, 1, 2),
    ) -> None:
        self.volumes = volumes
        self.patch_size = tuple(int(p) for p in patch_size)
        background_share = crop_share(background_share)
        self.options = {"rotate_axes": tuple(rotate_axes), "background_share": background_share, "flip_axes": tuple(flip_axes)}
        weighted = background_share is not None
        self.weigh = ForegroundWeightd("image", CROP_WEIGHT_KEY, background_share) if weighted else None  # type: ignore[arg-type]
        self.weights: dict[int, torch.Tensor] = {}
        self.transform = Compose(
            augment_transforms(("image",), self.patch_size, **self.options, weight_key=CROP_WEIGHT_KEY if weighted else None)
        )

    def __len__(self) -> int:
        return len(self.volumes)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict | list:
        item = deepcopy(self.volumes[index])
        if self.weigh is not None:
            if index not in self.weights:
                self.weights[index] = self.weigh(item)[CROP_WEIGHT_KEY]
            item[CROP_WEIGHT_KEY] = self.weights[index]
        return self.transform(item)

    def with_patch_size(self, patch_size: Sequence[int]) -> DomainCrops:
        """The same cached volumes, crop-centre maps and augmentation, crops of ``patch_size``."""
        crops = DomainCrops(self.volumes, patch_size, **self.options)
        crops.weights = self.weights
        return crops


def recropped_dataset(dataset: UnpairedDataset, length: int, patch_size: Sequence[int]) -> UnpairedDataset:
    """``dataset``'s cached volumes with other crops: ``length`` items of ``patch_size`` in both domains.

    The blind PSF fit (``psf_fit_dataset`` in ``configs/train.json``) takes its larger crops from the
    training dataset this way instead of loading the volumes again. The sharp domain's margin
    (``sharp_margin``) is not added: the fit blurs its crops with their own padding.

    Args:
        dataset: built by :func:`unpaired_dataset`.
        length: items per pass.
        patch_size: crop size ``(D, H, W)`` of both domains.
    """
    domains = (dataset.sharp, dataset.blurred)
    if not all(isinstance(d, DomainCrops) for d in domains):
        raise TypeError(
            "recropped_dataset needs a dataset built by bundle.data.unpaired_dataset (its domains crop cached "
            f"volumes); got domains {type(dataset.sharp).__name__} and {type(dataset.blurred).__name__}"
        )
    return UnpairedDataset(
        dataset.sharp.with_patch_size(patch_size), dataset.blurred.with_patch_size(patch_size), length=length  # type: ignore[union-attr]
    )


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
    sharp_range: Sequence[float] | None = None,
    blurred_range: Sequence[float] | None = None,
    sharp_margin: Sequence[int] | None = None,
    blurred_flip_axes: Sequence[int] = (1, 2),
    blurred_hot_pixel_threshold: float | None = None,
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
            intensity except this share, drawn uniformly; ``None`` or 1: uniform crops (the paper).
        voxel_size: the configured ``(z, y, x)`` µm; files whose metadata differ are logged (both values).
        sharp_range: one intensity range ``(v_lo, v_hi)`` mapped to [0, 1] in every X volume instead of
            each volume's ``sharp_percentiles`` (:func:`~bundle.data.domain_intensity_range`).
        blurred_range: the same for Y.
        sharp_margin: voxels added on each side of the X crops, per axis ``(z, y, x)``: the trainer blurs
            the larger crop and keeps its centre (``patch_size``), so that ``h*x`` there holds the blur
            of structure outside the patch, as a real stack does. ``None``: X crops of ``patch_size``.
        blurred_flip_axes: spatial axes along which Y crops are randomly flipped (X crops: all three).
            A Z-flipped Y crop is the sample blurred by the Z-flipped PSF: no image of the blur path
            when the PSF is axially asymmetric (spherical aberration), so ``(1, 2)`` by default;
            ``(0, 1, 2)`` flips Y along Z too (the paper's augmentation).
        blurred_hot_pixel_threshold: replace a camera's hot pixels in Y before the normalisation
            (:class:`~bundle.data.CorrectHotPixelsd`, in noise standard deviations; 4 finds them all in
            the project's simulations and nothing in clean stacks). ``None``: Y is read as stored, and
            a warning names the stacks that hold hot pixels.
    """

    def domain(
        files: list[str],
        percentiles: Sequence[float],
        intensity_range: Sequence[float] | None,
        margin: Sequence[int] | None = None,
        flip_axes: Sequence[int] = (0, 1, 2),
        hot_pixel_threshold: float | None = None,
    ) -> DomainCrops:
        size = [int(p) + 2 * int(m) for p, m in zip(patch_size, margin or [0] * len(patch_size), strict=True)]
        normalize = Compose(
            normalize_transforms(("image",), percentiles, True, voxel_size, intensity_range, hot_pixel_threshold)
        )
        volumes = CacheDataset(
            [{"image": f} for f in files], normalize, cache_rate=cache_rate, num_workers=num_workers, progress=False
        )
        return DomainCrops(volumes, size, rotate_axes, background_share=background_share, flip_axes=flip_axes)

    blurred_files = list_volumes(blurred_dir)
    blurred_hot_pixel_threshold = hot_pixel_setting(blurred_hot_pixel_threshold)
    blurred = domain(
        blurred_files, blurred_percentiles, blurred_range, flip_axes=blurred_flip_axes,
        hot_pixel_threshold=blurred_hot_pixel_threshold,
    )
    if blurred_hot_pixel_threshold is None:
        warn_hot_pixels((f, blurred.volumes[i]["image"]) for i, f in enumerate(blurred_files))
    return UnpairedDataset(
        domain(list_volumes(sharp_dir), sharp_percentiles, sharp_range, sharp_margin), blurred, length=length
    )


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
