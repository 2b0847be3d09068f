"""Subnormal weights are set to zero where parameters are loaded (minirnng.subnormals); the
optimizer's own flushing is tested with the optimizers (test_train.py)."""

import hashlib

import numpy
import pytest

from minirnng import backend
from minirnng.models import RNNG, load_arrays, load_model
from minirnng.subnormals import count_subnormals, flush_subnormals

TINY32 = numpy.finfo(numpy.float32).tiny


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_flush_subnormals_zeroes_only_subnormal_entries(dtype):
    tiny = numpy.finfo(dtype).tiny
    a = numpy.array([tiny / 4, -tiny / 1e3, tiny, -tiny, 0.0, -2.0, 3e-30], dtype)
    assert count_subnormals(a) == 2
    flush_subnormals(a)
    numpy.testing.assert_array_equal(a, numpy.array([0, 0, tiny, -tiny, 0, -2, 3e-30], dtype))
    assert count_subnormals(a) == 0
    # each becomes a zero of its own sign, and -0.0 stays -0.0: only the subnormals' bits change
    signed = numpy.array([-0.0, -tiny / 4, tiny / 4, 0.0, numpy.nan, -numpy.inf], dtype)
    flush_subnormals(signed)
    numpy.testing.assert_array_equal(numpy.signbit(signed), [True, True, False, False, False, True])
    assert numpy.isnan(signed[4]) and signed[5] == -numpy.inf  # left as they are


def with_subnormal_weights(model):
    """A model whose conv5 and deconv6 hold a few subnormal weights, as a dead channel's decayed
    weights do after a long run with weight decay (the positions, for the checks)."""
    conv5, deconv6 = model.params()["conv5.weight"], model.params()["deconv6.weight"]
    conv5[3, :, 1, 1] = TINY32 / 16
    deconv6[7, 2, :2, :2] = -TINY32 / 1e4
    return {"conv5.weight": (3, slice(None), 1, 1), "deconv6.weight": (7, 2, slice(0, 2), slice(0, 2))}


def test_loading_a_checkpoint_flushes_its_subnormal_weights_and_leaves_the_file_alone(tmp_path):
    model = RNNG(3, rng=0)
    model.classes = ["background", "skin", "hair"]
    where = with_subnormal_weights(model)
    assert count_subnormals(model.params()["conv5.weight"]) == 32
    path = tmp_path / "old.npz"
    model.save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    loaded = load_model(path)
    for name, value in model.params().items():
        got = loaded.params()[name]
        assert count_subnormals(got) == 0, name
        expected = value.copy()
        if name in where:
            expected[where[name]] = 0
        numpy.testing.assert_array_equal(got, expected, err_msg=name)
    # the file keeps every value it was given: only the model in memory changed
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert count_subnormals(load_arrays(path)["conv5.weight"]) == 32
    images = numpy.random.default_rng(1).uniform(-0.5, 0.5, (2, 3, 32, 32)).astype(numpy.float32)
    numpy.testing.assert_array_equal(loaded.predict(images), model.predict(images))


def test_a_float32_subnormal_loaded_into_float64_is_normal_and_kept(tmp_path):
    model = RNNG(3, rng=0)
    with_subnormal_weights(model)
    model.save(tmp_path / "old.npz")
    loaded = load_model(tmp_path / "old.npz", dtype=numpy.float64)
    numpy.testing.assert_array_equal(loaded.params()["conv5.weight"], model.params()["conv5.weight"])


@pytest.mark.gpu
def test_flush_subnormals_on_the_gpu():
    cupy = pytest.importorskip("cupy")
    with backend.use("cupy"):
        a = cupy.asarray(numpy.array([TINY32 / 4, TINY32, -1.5, -TINY32 / 8], numpy.float32))
        assert count_subnormals(a) == 2
        flush_subnormals(a)
        numpy.testing.assert_array_equal(cupy.asnumpy(a), numpy.array([0, TINY32, -1.5, 0], numpy.float32))
