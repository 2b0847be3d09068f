"""Shared fixtures, the skipping rule for GPU tests, and the test session's default backend."""

import contextlib
import os

import numpy
import pytest

# Every test names the backend it tests (GPU tests say ``backend.use("cupy")``); everything else
# runs on NumPy, so the suite means the same on a machine with a GPU, where the default backend
# would otherwise be CuPy, as in CI. This overrides a MINIRNNG_BACKEND set by hand too. The default
# is read once, at its first use, and pytest_configure makes that first use now: a test that sets
# the variable to see what a child process would start with must not change the default of the
# tests after it.
os.environ["MINIRNNG_BACKEND"] = "numpy"


def pytest_configure(config):
    from minirnng import backend
    backend.default_backend()


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


#: The smallest distance to a kink (a ReLU at 0, a tie in a max) that a finite-difference check
#: allows: a hundred times its step of 1e-6, so that no step crosses one.
KINK_MARGIN = 1e-4


def merge_margin(layer, *inputs):
    """The smallest gap, over a four-way layer's outputs, between the direction that wins the max
    merge and the runner-up. A finite-difference step that crosses a gap flips the winner, and the
    difference quotient then measures the merge's kink, not the backward; ``layer`` and ``inputs``
    on the NumPy path."""
    from minirnng.layers.recurrent import DIRECTIONS

    scans = numpy.sort(numpy.stack([layer.direction_layers[direction].forward(*inputs)
                                    for direction in DIRECTIONS]), axis=0)
    return float((scans[-1] - scans[-2]).min())


@contextlib.contextmanager
def kink_margins():
    """Record, while models run forward on the NumPy path, how close they come to a kink: the
    smallest ``|x|`` a ReLU sees, the smallest gap between the largest and the second-largest value
    of a max-pooling window, and :func:`merge_margin` of the four-way layers. Yields a dict
    ``{"relu": ..., "pool": ..., "merge": ...}`` (inf for a kind the model does not have), filled
    as the forward passes run."""
    from minirnng.layers.activations import ReLU
    from minirnng.layers.pool import MaxPool2d
    from minirnng.layers.recurrent import FourWayMaxMerge

    margins = {"relu": numpy.inf, "pool": numpy.inf, "merge": numpy.inf}
    originals = ReLU.forward_cpu, MaxPool2d.forward_cpu, FourWayMaxMerge.forward_cpu

    def note(kind, value):
        margins[kind] = min(margins[kind], float(value))

    def relu(self, x):
        note("relu", numpy.abs(x).min())
        return originals[0](self, x)

    def pool(self, x):
        _, _, out_height, out_width = self.output_shape(x.shape)
        windows = numpy.sort(numpy.stack([x[:, :, rows, cols]
                                          for _, rows, cols in self.window_offsets(out_height, out_width)]), axis=0)
        note("pool", (windows[-1] - windows[-2]).min())
        return originals[1](self, x)

    def merge(self, *inputs):
        note("merge", merge_margin(self, *inputs))
        return originals[2](self, *inputs)

    ReLU.forward_cpu, MaxPool2d.forward_cpu, FourWayMaxMerge.forward_cpu = relu, pool, merge
    try:
        yield margins
    finally:
        ReLU.forward_cpu, MaxPool2d.forward_cpu, FourWayMaxMerge.forward_cpu = originals


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """``numpy.empty`` and ``numpy.empty_like`` filled with NaN (floating point), the largest value
    (integers) or True, for the kernel-path tests on the emulator, whose ``xp`` is NumPy: an element
    that a kernel, or the NumPy path, forgets to write then shows, instead of whatever the memory
    held (often zeros, which can look right)."""
    empty, empty_like = numpy.empty, numpy.empty_like

    def poisoned(array):
        if array.dtype.kind in "fc":
            array.fill(numpy.nan)
        elif array.dtype.kind in "iu":
            array.fill(numpy.iinfo(array.dtype).max)
        elif array.dtype.kind == "b":
            array.fill(True)
        return array

    monkeypatch.setattr(numpy, "empty", lambda *args, **kwargs: poisoned(empty(*args, **kwargs)))
    monkeypatch.setattr(numpy, "empty_like", lambda *args, **kwargs: poisoned(empty_like(*args, **kwargs)))
