"""Shared fixtures, the skipping rule for GPU tests, and the test session's default backend."""

import os

import numpy
import pytest

# Every test names the backend it tests (GPU tests say ``backend.use("cupy")``); everything else
# runs on NumPy, so the suite means the same on a machine with a GPU, where the default backend
# would otherwise be CuPy, as in CI. This overrides a MINIRNNG_BACKEND set by hand too. Set before
# minirnng is imported: the default is read once.
os.environ["MINIRNNG_BACKEND"] = "numpy"


def gpu_usable():
    from minirnng import backend
    return backend.cupy_status()[0]


def pytest_collection_modifyitems(config, items):
    if gpu_usable():
        return
    skip = pytest.mark.skip(reason="no usable CUDA GPU (cupy.is_available() is False or CuPy/NVRTC missing)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_data():
    """A training and a validation set of synthetic faces at 32 x 32 (12 and 6 images), for runs
    that take a second."""
    from minirnng.data.catalog import load_split
    train = load_split("synthetic", "train", n_classes=3, input_size=32, size=12)
    validation = load_split("synthetic", "validation", n_classes=3, input_size=32, size=6)
    return train, validation


@pytest.fixture
def rng():
    return numpy.random.default_rng(12345)


def tie_free(rng, shape, spacing=1e-2, avoid_zero=False):
    """Random values all at least ``spacing`` apart (and away from 0), so that max and ReLU have no
    tie or kink within a finite-difference step: a shuffled ladder, centred on zero."""
    count = int(numpy.prod(shape))
    ladder = (numpy.arange(count) - count / 2 + 0.5) * spacing
    values = rng.permutation(ladder).reshape(shape)
    if avoid_zero:
        values = values + numpy.sign(values) * 0.05
    return values


def outputs_won(layer, *inputs):
    """How many outputs of a four-way layer's max merge each direction wins, in DIRECTIONS order. A
    direction that wins none gets zero gradients, and a comparison of its W and b gradients (with
    finite differences, or between a fast path and its reference) compares zero with zero: it
    would pass whatever the backward does. ``layer`` and ``inputs`` on the NumPy path."""
    from minirnng.layers.recurrent import DIRECTIONS

    scans = numpy.stack([layer.direction_layers[direction].forward(*inputs) for direction in DIRECTIONS])
    return [int(count) for count in numpy.bincount(scans.argmax(axis=0).ravel(), minlength=len(DIRECTIONS))]
