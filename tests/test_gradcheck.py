"""The oracle itself: relative error, sparse mode, and that a wrong backward is caught."""

import numpy
import pytest

from minirnng.gradcheck import check, check_layer, numerical_gradient, relative_error
from minirnng.layers import Conv2d, Tanh


def test_relative_error_definition():
    assert relative_error(numpy.array([1.0, 2.0]), numpy.array([1.0, 2.0])) == 0.0
    assert relative_error(numpy.array([1.0, -1.0]), numpy.array([1.0, 1.0])) == pytest.approx(2 / 2)
    assert relative_error(numpy.zeros(3), numpy.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(numpy.zeros(2), numpy.zeros(3))


def test_centred_differences_are_second_order():
    x = numpy.array([0.3, -1.2, 2.0])
    estimate = numerical_gradient(lambda: float(numpy.sum(numpy.sin(x))), x, numpy.arange(3), eps=1e-4)
    numpy.testing.assert_allclose(estimate, numpy.cos([0.3, -1.2, 2.0]), rtol=1e-8)
    numpy.testing.assert_array_equal(x, [0.3, -1.2, 2.0])  # restored


def test_a_wrong_backward_is_caught(rng):
    x = rng.standard_normal((2, 3))
    good = check("tanh", numpy.tanh, lambda dy: dy * (1 - numpy.tanh(x) ** 2), {"x": x}, rng=rng)
    bad = check("tanh, forgot the square", numpy.tanh, lambda dy: dy * (1 - numpy.tanh(x)), {"x": x}, rng=rng)
    assert good.max_error < 1e-9 and good.passed()
    assert bad.max_error > 1e-2 and not bad.passed()
    assert "FAIL" in str(bad)


def test_sparse_mode_checks_only_some_entries(rng):
    layer = Conv2d(2, 3, 3, padding=1, rng=0, dtype=numpy.float64)
    report = check_layer(layer, rng.standard_normal((2, 2, 6, 6)), max_entries=10, rng=rng)
    rows = {row.name: row for row in report.rows}
    assert rows["x"].checked == 10 and rows["x"].total == 144
    assert rows["bias"].checked == 3  # smaller than max_entries: all of it
    assert report.max_error < 1e-7


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        check_layer(Tanh(), numpy.zeros(3, dtype=numpy.float32))


def test_a_nan_gradient_fails_wherever_its_row_is(rng):
    """``max`` skips a NaN that is not first: the report must fail on it all the same."""
    x = rng.standard_normal((2, 3))
    w = rng.standard_normal(3)
    grads = {"w": numpy.zeros(3)}

    def backward(dy):
        grads["w"][...] = numpy.nan  # a broken parameter gradient, after a correct input gradient
        return dy * w

    report = check("x * w", lambda x: x * w, backward, {"x": x}, params={"w": w}, grads=grads, rng=rng)
    assert [row.name for row in report.rows] == ["x", "w"] and report.rows[0].error < 1e-9
    assert report.max_error == float("inf") and not report.passed() and "FAIL" in str(report)


def test_bad_steps_and_sample_sizes_are_named(rng):
    x = rng.standard_normal(3)
    for options, message in (({"eps": 0}, "eps must be a positive step"),
                             ({"max_entries": 0}, "max_entries must be None")):
        with pytest.raises(ValueError, match=message):
            check_layer(Tanh(), x, **options)
