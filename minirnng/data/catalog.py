"""Datasets by name, as the command line names them: ``synthetic``, ``lfw-pl``, ``helen``, ``celebamask``.

:func:`open_dataset` returns a dataset of the loaders' protocol for one split; :func:`load_split`
also brings it into memory at the model's input size (:func:`minirnng.data.pipeline.preload`).

CelebAMask-HQ has no official split; minirnng uses its first 28,000 images for training, the next
1,000 for validation and the last 1,000 for testing (indices in file order).
"""

import numpy

from .classes import HELEN_TO_LFW, class_list
from .datasets import LFWPL, CelebAMaskHQ, Dataset, Helen, MalformedDataError
from .pipeline import preload
from .synthetic import SyntheticFaces

DATASETS = ("synthetic", "lfw-pl", "helen", "celebamask")
SPLITS = ("train", "validation", "test")
#: default number of synthetic images per split, and the seed of each split (disjoint streams)
SYNTHETIC_SIZES = {"train": 2000, "validation": 300, "test": 300}
SYNTHETIC_SEEDS = {"train": 0, "validation": 1, "test": 2}
CELEBAMASK_SPLITS = {"train": (0, 28000), "validation": (28000, 29000), "test": (29000, 30000)}


class Subset(Dataset):
    """Samples ``start .. stop-1`` of another dataset."""

    def __init__(self, dataset, start, stop):
        if start >= len(dataset):
            # a partial download: the split would be empty and score NaN without a word
            raise MalformedDataError(f"{type(dataset).__name__} has {len(dataset)} images, so samples "
                                     f"{start} .. {stop - 1} of this split are not there")
        stop = min(stop, len(dataset))
        self.dataset, self.start = dataset, start
        self.classes = dataset.classes
        self._names = tuple(dataset.names[start:stop])

    def _load(self, index):
        return self.dataset[self.start + index]


class ThreeClasses(Dataset):
    """An 11-class (HELEN) dataset seen with LFW-PL's 3 classes: every facial part becomes skin."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.classes = class_list(3)
        self._names = dataset.names

    def _load(self, index):
        image, labels = self.dataset[index]
        return image, HELEN_TO_LFW[labels]


def open_dataset(name, split, root=None, n_classes=None, size=None, multi_face=False, seed=None):
    """The dataset ``name`` for ``split`` (train, validation, test).

    root : the dataset's folder (ignored for ``synthetic``).
    n_classes : 3 or 11; None takes the dataset's own (3 for LFW-PL, 11 otherwise). LFW-PL has
        only 3; the 11-class datasets are mapped to 3 on request.
    size : for ``synthetic``, the number of images (default ``SYNTHETIC_SIZES[split]``).
    multi_face : synthetic 512 x 512 images with several faces (the paper's Multi-Face setting).
    seed : for ``synthetic``, overrides the split's seed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n_classes not in (None, 3, 11):
        raise ValueError(f"n_classes must be 3 or 11, got {n_classes!r}")
    if name == "synthetic":
        count = SYNTHETIC_SIZES[split] if size is None else size  # SyntheticFaces checks it
        return SyntheticFaces(count, size=512 if multi_face else 128, n_classes=n_classes or 11,
                              multi_face=multi_face, seed=SYNTHETIC_SEEDS[split] if seed is None else seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --root, the folder that holds it (see docs/datasets.md)")
    if name == "lfw-pl":
        if n_classes == 11:
            raise ValueError("LFW-PL has only 3 classes (background, skin, hair); use --classes 3")
        return LFWPL(root, split)
    dataset = Helen(root, split) if name == "helen" else Subset(CelebAMaskHQ(root), *CELEBAMASK_SPLITS[split])
    return ThreeClasses(dataset) if n_classes == 3 else dataset


def load_split(name, split, root=None, n_classes=None, input_size=128, size=None, multi_face=False, seed=None):
    """:func:`open_dataset`, preloaded at ``input_size`` (resized, or letterboxed for multi-face)."""
    dataset = open_dataset(name, split, root, n_classes, size, multi_face, seed)
    if multi_face:
        return preload(dataset, size=input_size, fit="letterbox")
    return preload(dataset, size=(input_size, input_size))


def label_frequencies(dataset):
    """Fraction of pixels per class of a preloaded dataset, float64 (K,)."""
    counts = numpy.bincount(dataset.labels.ravel(), minlength=len(dataset.classes))
    return counts / counts.sum()
