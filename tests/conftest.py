"""Shared fixtures and the skipping rule for GPU tests."""

import numpy
import pytest


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
