"""Unpaired datasets of the cycleGAN: two independent domains, each cropped from its cached, normalised volumes."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import torch
from monai.data import CacheDataset
from monai.transforms import Compose

from bundle.data.camera import hot_pixel_setting, warn_hot_pixels
from bundle.data.lists import list_volumes
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

    With ``sharp_unpaired`` and ``blurred_unpaired``, each item also holds
    ``{"sharp_unpaired": x', "blurred_unpaired": y'}``, crops drawn independently of ``x`` and ``y``
    (e.g. uniformly, where ``x`` and ``y`` are foreground-weighted): the trainer gives them to the
    unpaired terms (blurred cycle, adversarial terms, discriminators) and ``x`` to the sharp cycle.

    Args:
        sharp: dataset of the sharp domain X, items ``{"image": (1, D, H, W)}``.
        blurred: dataset of the blurred domain Y, items ``{"image": (1, D, H, W)}``.
        length: items per epoch (iterations per epoch × batch size).
        sharp_unpaired: optional second crop dataset of X for the unpaired terms (with ``blurred_unpaired``).
        blurred_unpaired: optional second crop dataset of Y for the unpaired terms (with ``sharp_unpaired``).
    """

    def __init__(
        self,
        sharp: torch.utils.data.Dataset,
        blurred: torch.utils.data.Dataset,
        length: int = 100,
        sharp_unpaired: torch.utils.data.Dataset | None = None,
        blurred_unpaired: torch.utils.data.Dataset | None = None,
    ) -> None:
        if len(sharp) == 0 or len(blurred) == 0:  # type: ignore[arg-type]
            raise ValueError("both the sharp and the blurred domain need at least one volume")
        if (sharp_unpaired is None) != (blurred_unpaired is None):
            raise ValueError("give both sharp_unpaired and blurred_unpaired, or neither")
        self.sharp, self.blurred, self.length = sharp, blurred, int(length)
        self.sharp_unpaired, self.blurred_unpaired = sharp_unpaired, blurred_unpaired

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _draw(domain: torch.utils.data.Dataset) -> torch.Tensor:
        return _first(domain[int(torch.randint(len(domain), ()))])["image"]  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(torch.randint(len(self.sharp), ()))  # type: ignore[arg-type]
        j = int(torch.randint(len(self.blurred), ()))  # type: ignore[arg-type]
        item = {"sharp": _first(self.sharp[i])["image"], "blurred": _first(self.blurred[j])["image"]}
        if self.sharp_unpaired is not None and self.blurred_unpaired is not None:
            item["sharp_unpaired"] = self._draw(self.sharp_unpaired)
            item["blurred_unpaired"] = self._draw(self.blurred_unpaired)
        return item


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

    def with_background_share(self, background_share: float | None) -> DomainCrops:
        """The same cached volumes, crop size and augmentation, crop centres drawn with another
        ``background_share`` (its own crop-centre maps; ``None`` or 1: uniform)."""
        return DomainCrops(self.volumes, self.patch_size, **{**self.options, "background_share": background_share})


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
    unpaired_background_share: float | str | None = "same",
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
        unpaired_background_share: ``"same"`` (default): every term of the trainer sees the same crops.
            A number (1 or ``None``: uniform): the items also hold a second crop of each domain, drawn
            with this background share from the same cached volumes, for the unpaired terms and the
            discriminators (:class:`UnpairedDataset`); the sharp cycle keeps ``background_share``.
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

    same = isinstance(unpaired_background_share, str) and unpaired_background_share.strip().lower() == "same"
    try:  # checked before any volume is read
        share = None if same else crop_share(unpaired_background_share)
    except ValueError:
        raise ValueError(
            f"unpaired_background_share must be 'same' or a number in [0, 1] (1: uniform crops), got {unpaired_background_share!r}"
        ) from None
    blurred_files = list_volumes(blurred_dir)
    blurred_hot_pixel_threshold = hot_pixel_setting(blurred_hot_pixel_threshold)
    blurred = domain(
        blurred_files, blurred_percentiles, blurred_range, flip_axes=blurred_flip_axes,
        hot_pixel_threshold=blurred_hot_pixel_threshold,
    )
    if blurred_hot_pixel_threshold is None:
        warn_hot_pixels((f, blurred.volumes[i]["image"]) for i, f in enumerate(blurred_files))
    sharp = domain(list_volumes(sharp_dir), sharp_percentiles, sharp_range, sharp_margin)
    if same:
        return UnpairedDataset(sharp, blurred, length=length)
    return UnpairedDataset(
        sharp, blurred, length, sharp.with_background_share(share), blurred.with_background_share(share)
    )
