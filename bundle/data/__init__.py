"""Data for training and validation: file lists, transform chains, unpaired and paired datasets.

The sharp domain X and the blurred domain Y are two unrelated file lists; every unpaired training
item pairs a random crop of a random X volume with a random crop of a random Y volume, drawn
independently. Modules: :mod:`~bundle.data.lists` (volume lists, image/label pairs),
:mod:`~bundle.data.transforms` (normalisation, augmentation, training crops),
:mod:`~bundle.data.datasets` (unpaired datasets), :mod:`~bundle.data.paired` (paired datasets), :mod:`~bundle.data.intensity` (one
intensity scale per domain), :mod:`~bundle.data.camera` (a camera's hot pixels), :mod:`~bundle.data.record` (the
preprocessing a trained model's record names); everything public is importable from
``bundle.data``.
"""

from bundle.data.camera import (
    CorrectHotPixelsd,
    correct_hot_pixels,
    find_hot_pixels,
    hot_pixel_setting,
    warn_hot_pixels,
)
from bundle.data.datasets import (
    DomainCrops,
    UnpairedDataset,
    recropped_dataset,
    unpaired_dataset,
)
from bundle.data.intensity import domain_intensity_range
from bundle.data.lists import VOLUME_EXTENSIONS, list_volumes, paired_datalist, validation_datalist
from bundle.data.paired import paired_dataset, paired_train_transforms
from bundle.data.record import trained_hot_pixel_threshold
from bundle.data.transforms import (
    augment_transforms,
    check_intensity_range,
    normalize_transforms,
    paired_transforms,
    train_transforms,
)

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
    "warn_hot_pixels",
    "DomainCrops",
    "recropped_dataset",
    "paired_train_transforms",
    "paired_dataset",
    "validation_datalist",
    "domain_intensity_range",
    "check_intensity_range",
    "find_hot_pixels",
    "correct_hot_pixels",
    "trained_hot_pixel_threshold",
    "hot_pixel_setting",
    "CorrectHotPixelsd",
]
