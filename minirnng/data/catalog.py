"""Datasets by name, as the command line names them: ``synthetic``, ``lfw-pl``, ``helen``, ``celebamask``.

:func:`open_dataset` returns a dataset of the loaders' protocol for one split; :func:`load_split`
also brings it into memory at the model's input size (:func:`minirnng.data.pipeline.preload`).

CelebAMask-HQ has no official split; minirnng uses images 0-27999 for training, 28000-28999 for
validation and 29000-29999 for testing (by the images' numbers, so that an image missing from a
copy shortens its own split and moves no other image into another).
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
    """The samples ``indices`` (in that order) of another dataset."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, tuple(int(k) for k in indices)
        self.classes = dataset.classes
        self._names = tuple(dataset.names[k] for k in self.indices)

    def _load(self, index):
        return self.dataset[self.indices[index]]


def celebamask_split(dataset, split):
    """The images of ``split`` of a :class:`CelebAMaskHQ`: those whose numbers lie in
    ``CELEBAMASK_SPLITS[split]``; none is an error (a copy without them would score NaN)."""
    start, stop = CELEBAMASK_SPLITS[split]
    indices = [k for k, number in enumerate(dataset.numbers) if start <= number < stop]
    if not indices:
        raise MalformedDataError(f"{type(dataset).__name__} has {len(dataset)} images, none of them numbered "
                                 f"{start} .. {stop - 1}, the {split} split's")
    return Subset(dataset, indices)


def first_samples(dataset, size, split):
    """The first ``size`` samples of ``dataset`` (all of them for None); more than it has is an error."""
    if size is None:
        return dataset
    if isinstance(size, bool) or not isinstance(size, (int, numpy.integer)) or size < 1:
        raise ValueError(f"the {split} split's size must be a whole number of images, at least 1 (or None "
                         f"for all of them), got {size!r}")
    if size > len(dataset):
        raise ValueError(f"the {split} split has {len(dataset)} images; a size of {size} asks for more")
    return Subset(dataset, range(size))


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
    size : the number of images: for ``synthetic`` how many are made (default
        ``SYNTHETIC_SIZES[split]``), for the others the first ``size`` of the split (default all).
    multi_face : synthetic 512 x 512 images with several faces (the paper's Multi-Face setting).
    seed : for ``synthetic``, the seed of these images in place of the split's own
        (``SYNTHETIC_SEEDS``). The images are a function of the seed alone, not of the split: give
        each split its own seed, or training and validation hold the same images.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n_classes not in (None, 3, 11):
        raise ValueError(f"n_classes must be 3 or 11, got {n_classes!r}")
    if name == "synthetic":
        if root is not None:  # most likely a forgotten --data: training on faces drawn in code instead
            raise ValueError(f"a root folder ({root}) was given for the synthetic faces, which are drawn in "
                             "code and read no folder; name the dataset that is there with --data (lfw-pl, "
                             "helen, celebamask)")
        count = SYNTHETIC_SIZES[split] if size is None else size  # SyntheticFaces checks it
        return SyntheticFaces(count, size=512 if multi_face else 128, n_classes=n_classes or 11,
                              multi_face=multi_face, seed=SYNTHETIC_SEEDS[split] if seed is None else seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --root, the folder that holds it (see docs/datasets.md)")
    if name == "lfw-pl":
        if n_classes == 11:
            raise ValueError("LFW-PL has only 3 classes (background, skin, hair); use --classes 3")
        return first_samples(LFWPL(root, split), size, split)
    dataset = Helen(root, split) if name == "helen" else celebamask_split(CelebAMaskHQ(root), split)
    dataset = first_samples(dataset, size, split)
    return ThreeClasses(dataset) if n_classes == 3 else dataset


def load_split(name, split, root=None, n_classes=None, input_size=128, size=None, multi_face=False, seed=None):
    """:func:`open_dataset`, preloaded at ``input_size`` (resized, or letterboxed for multi-face):
    one number, the height and the width, or a square pair (the networks here take square inputs)."""
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2 and input_size[0] == input_size[1]:
        input_size = input_size[0]
    if isinstance(input_size, (bool, numpy.bool_)) or not isinstance(input_size, (int, numpy.integer)):
        raise TypeError(f"load_split: input_size must be one integer (or a square pair), the height and the width, "
                        f"got {input_size!r}")
    dataset = open_dataset(name, split, root, n_classes, size, multi_face, seed)
    if multi_face:
        return preload(dataset, size=input_size, fit="letterbox")
    return preload(dataset, size=(input_size, input_size))


def label_frequencies(dataset):
    """Fraction of pixels per class of a preloaded dataset, float64 (K,)."""
    counts = numpy.bincount(dataset.labels.ravel(), minlength=len(dataset.classes))
    return counts / counts.sum()
