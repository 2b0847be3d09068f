"""MaxPool2d, ReLU, Sigmoid, Tanh: finite differences on tie-free inputs, naive against fast, ties, bad input."""

import numpy
import pytest
from conftest import tie_free

from minirnng.gradcheck import check_layer
from minirnng.layers import MaxPool2d, ReLU, Sigmoid, Tanh, naive

POOL_CONFIGS = [(2, None, 8, 6), (2, 2, 7, 9), (3, 2, 9, 8), (3, 1, 5, 6), (2, 3, 8, 11)]


@pytest.mark.parametrize("kernel, stride, height, width", POOL_CONFIGS)
def test_maxpool_finite_differences(kernel, stride, height, width, rng):
    x = tie_free(rng, (2, 3, height, width))
    report = check_layer(MaxPool2d(kernel, stride), x, rng=rng)
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("kernel, stride, height, width", POOL_CONFIGS)
def test_maxpool_fast_matches_naive(kernel, stride, height, width, dtype, rng):
    # rounded values make ties common: both paths must send the gradient to the same (first) maximum
    x = numpy.round(rng.standard_normal((2, 3, height, 2 * width)) * 2).astype(dtype)[:, :, :, ::2]
    fast, slow = MaxPool2d(kernel, stride), naive.MaxPool2d(kernel, stride)
    numpy.testing.assert_array_equal(fast.forward(x), slow.forward(x))
    dy = rng.standard_normal(fast.output_shape_seen).astype(dtype)
    numpy.testing.assert_allclose(fast.backward(dy), slow.backward(dy), rtol=1e-6)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("kernel, stride, height, width", POOL_CONFIGS)
def test_maxpool_fast_matches_naive_on_a_batch_cut_into_uneven_chunks(kernel, stride, height, width, dtype,
                                                                       monkeypatch, rng):
    """The NumPy path sweeps chunks of the batch (:data:`minirnng.layers.base.CHUNK_BYTES`); a real
    batch has many, the tests' own fit in one. Here a batch of 5 is cut into 2, 2 and 1."""
    from minirnng.layers import base

    x = numpy.round(rng.standard_normal((5, 3, height, width)) * 2).astype(dtype)  # ties, as above
    monkeypatch.setattr(base, "CHUNK_BYTES", 2 * x[0].nbytes)
    assert [chunk.stop - chunk.start for chunk in base.batch_chunks(len(x), x[0].nbytes)] == [2, 2, 1]
    fast, slow = MaxPool2d(kernel, stride), naive.MaxPool2d(kernel, stride)
    numpy.testing.assert_array_equal(fast.forward(x), slow.forward(x))
    dy = rng.standard_normal(fast.output_shape_seen).astype(dtype)
    dx, want = fast.backward(dy), slow.backward(dy)  # overlapping windows add in another order: a tolerance
    tolerance = 1e-5 if dtype == numpy.float32 else 1e-12
    numpy.testing.assert_allclose(dx, want, atol=tolerance * numpy.abs(want).max(), rtol=0)
    assert all(numpy.abs(dx[image]).max() > 0 for image in range(len(x)))


def test_maxpool_ties_go_to_the_first_maximum():
    x = numpy.ones((1, 1, 2, 2))
    pool = MaxPool2d(2)
    pool.forward(x)
    numpy.testing.assert_array_equal(pool.backward(numpy.full((1, 1, 1, 1), 3.0))[0, 0], [[3, 0], [0, 0]])


@pytest.mark.parametrize("chunk_images", [None, 1])
def test_maxpool_sends_the_gradient_of_a_nan_window_to_its_first_nan_on_every_path(chunk_images, monkeypatch):
    # a diverging run: the NumPy path, the naive loops and the kernel (on the emulator) must agree
    from minirnng import backend
    from minirnng.layers import base

    x = numpy.arange(2 * 1 * 4 * 6, dtype=numpy.float32).reshape(2, 1, 4, 6)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = numpy.nan  # two NaN in the first window: offset 1 comes first
    x[1, 0, 3, 5] = numpy.nan  # one in the last window of the second image, at its last offset
    if chunk_images:
        monkeypatch.setattr(base, "CHUNK_BYTES", chunk_images * x[0].nbytes)
    dy = numpy.arange(1, 13, dtype=numpy.float32).reshape(2, 1, 2, 3)
    results = []
    for path in ("numpy", "naive", "cuda-emulator"):
        pool = naive.MaxPool2d(2) if path == "naive" else MaxPool2d(2)
        with backend.use("numpy" if path == "naive" else path):
            results.append((backend.to_numpy(pool.forward(x)), backend.to_numpy(pool.backward(dy))))
    for y, dx in results:
        numpy.testing.assert_array_equal(y, results[-1][0])
        numpy.testing.assert_array_equal(dx, results[-1][1])
    dx = results[0][1]
    assert dx[0, 0, 0, 1] == 1 and dx[0, 0, 1, 0] == 0 and dx[1, 0, 3, 5] == 12 and numpy.isnan(results[0][0]).sum() == 2


@pytest.mark.parametrize("path", ["numpy", "cuda-emulator"])
@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 1)], ids=["windows apart", "windows overlapping"])
def test_a_non_finite_upstream_gradient_reaches_only_the_inputs_that_won(kernel, stride, path, rng):
    # a diverging run: inf * 0 must not turn the inputs that lost their window into NaN
    from minirnng import backend

    x = tie_free(rng, (2, 2, 6, 7))
    fast, slow = MaxPool2d(kernel, stride), naive.MaxPool2d(kernel, stride)
    with backend.use(path):
        fast.forward(x)
    slow.forward(x)
    dy = rng.standard_normal(slow.output_shape_seen)
    dy[0, 0, 0, 0], dy[0, 1, 1, 2], dy[1, 0, 2, 1] = numpy.inf, -numpy.inf, numpy.nan
    with backend.use(path):
        routed = backend.to_numpy(fast.backward(dy))
    expected = slow.backward(dy)
    numpy.testing.assert_allclose(routed, expected, rtol=1e-12)  # NaN where NaN; overlapping sums round
    assert 1 <= numpy.count_nonzero(~numpy.isfinite(expected)) <= 3  # only the three windows' winners


def test_relu_passes_a_non_finite_upstream_gradient_only_where_its_input_was_positive():
    x = numpy.array([[-1.0, 2.0, -3.0, 4.0]])
    dy = numpy.array([[numpy.inf, 1.0, numpy.nan, -numpy.inf]])
    fast, slow = ReLU(), naive.ReLU()
    fast.forward(x)
    slow.forward(x)
    numpy.testing.assert_array_equal(fast.backward(dy), [[0.0, 1.0, 0.0, -numpy.inf]])
    numpy.testing.assert_array_equal(fast.backward(dy), slow.backward(dy))


@pytest.mark.parametrize("make_layer", [lambda: MaxPool2d(2), ReLU, Sigmoid, Tanh], ids=["pool", "relu", "sigmoid", "tanh"])
def test_backward_leaves_the_upstream_gradient_as_it_was(make_layer, rng):
    layer = make_layer()
    y = layer.forward(tie_free(rng, (2, 3, 4, 6)))
    dy = rng.standard_normal(y.shape)
    kept = dy.copy()
    layer.backward(dy)
    numpy.testing.assert_array_equal(dy, kept)


def test_maxpool_shape_and_errors():
    pool = MaxPool2d()
    assert pool.forward(numpy.zeros((2, 3, 7, 9), dtype=numpy.float32)).shape == (2, 3, 3, 4)
    with pytest.raises(ValueError, match=r"MaxPool2d.*1x4.*smaller than the 2x2 window"):
        pool.forward(numpy.zeros((1, 1, 1, 4), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"MaxPool2d.*4 dimensions"):
        pool.forward(numpy.zeros((4, 4), dtype=numpy.float32))
    with pytest.raises(TypeError, match=r"MaxPool2d.*uint8"):
        pool.forward(numpy.zeros((1, 1, 4, 4), dtype=numpy.uint8))


@pytest.mark.parametrize("layer_class", [ReLU, Sigmoid, Tanh])
def test_activation_finite_differences(layer_class, rng):
    x = tie_free(rng, (2, 3, 5, 4), spacing=0.05, avoid_zero=True)
    report = check_layer(layer_class(), x, rng=rng)
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("name", ["ReLU", "Sigmoid", "Tanh"])
def test_activation_fast_matches_naive(name, dtype, rng):
    x = (rng.standard_normal((2, 3, 4, 10)) * 4).astype(dtype)[..., ::2]
    x[0, 0, 0, 0] = 0.0  # the kink: both give slope 0
    fast, slow = getattr(__import__("minirnng.layers", fromlist=[name]), name)(), getattr(naive, name)()
    y = fast.forward(x)
    assert y.dtype == dtype
    numpy.testing.assert_allclose(y, slow.forward(x), rtol=1e-6 if dtype == numpy.float32 else 1e-14, atol=1e-30)
    dy = rng.standard_normal(y.shape).astype(dtype)
    numpy.testing.assert_allclose(fast.backward(dy), slow.backward(dy), rtol=1e-5 if dtype == numpy.float32 else 1e-13)


def test_sigmoid_is_stable_for_large_inputs():
    y = Sigmoid().forward(numpy.array([-1e4, -50.0, 0.0, 50.0, 1e4]))
    assert numpy.all(numpy.isfinite(y))
    numpy.testing.assert_allclose(y, [0.0, 1.9287498479639178e-22, 0.5, 1.0, 1.0], rtol=1e-12)


@pytest.mark.parametrize("layer_class", [ReLU, Sigmoid, Tanh])
def test_activations_take_a_0d_array(layer_class):
    layer = layer_class()
    x = numpy.array(0.75, numpy.float32)
    y = layer.forward(x)
    expected = {ReLU: 0.75, Sigmoid: 1 / (1 + numpy.exp(-0.75)), Tanh: numpy.tanh(0.75)}[layer_class]
    assert numpy.shape(y) == () and float(y) == pytest.approx(expected, rel=1e-6)
    assert numpy.shape(layer.backward(numpy.array(2.0, numpy.float32))) == ()


def test_activation_errors():
    relu = ReLU()
    with pytest.raises(TypeError, match=r"ReLU.*int64"):
        relu.forward(numpy.arange(4))
    relu.forward(numpy.zeros(4))
    with pytest.raises(ValueError, match=r"ReLU.*grad_output.*\(4,\).*\(5,\)"):
        relu.backward(numpy.zeros(5))
    with pytest.raises(TypeError, match=r"ReLU.*grad_output.*float32"):
        relu.backward(numpy.zeros(4, dtype=numpy.float32))


def test_relu_routes_a_non_finite_upstream_gradient_of_a_0d_array():
    relu = ReLU()
    relu.forward(numpy.array(-1.0))
    assert relu.backward(numpy.array(numpy.inf)) == 0
