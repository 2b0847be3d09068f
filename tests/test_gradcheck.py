"""The oracle itself: relative error, sparse mode, and that a wrong backward is caught."""

import numpy
import pytest
from conftest import outputs_won

from minirnng.gradcheck import GradcheckReport, check, check_layer, numerical_gradient, relative_error
from minirnng.layers import Conv2d, Tanh
from minirnng.layers.recurrent import DIRECTIONS, FourWaySpatialRNN, GatedSpatialRNN, constrain_recurrent_weight


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


def test_the_upstream_gradient_is_not_uniform(rng):
    # y = x reversed, with a backward that forgets to reverse dy: right for a constant upstream only
    report = check("reverse", lambda x: x[::-1].copy(), lambda dy: dy, {"x": rng.standard_normal(6)}, rng=rng)
    assert not report.passed(), str(report)


def test_a_factor_of_two_scores_a_third_and_a_sign_error_one(rng):
    """The scale of a wrong backward's relative error, as the module's docstring gives it."""
    x = rng.standard_normal((2, 3))
    for factor, error in ((2.0, 1 / 3), (-1.0, 1.0)):
        report = check("tanh", numpy.tanh, lambda dy: factor * dy * (1 - numpy.tanh(x) ** 2), {"x": x}, rng=rng)
        assert report.max_error == pytest.approx(error, rel=1e-6) and not report.passed()


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


# -- a check that compares nothing fails --------------------------------------------------------
class ForgotToReturn(Tanh):
    def backward(self, grad_output):
        super().backward(grad_output)  # the gradient is computed, and dropped


class OnlyDx(GatedSpatialRNN):
    def backward(self, grad_output):
        return super().backward(grad_output)[0]  # dg left out


class NoneForDg(GatedSpatialRNN):
    def backward(self, grad_output):
        return super().backward(grad_output)[0], None


class Transposed(Tanh):
    def backward(self, grad_output):
        return super().backward(grad_output).T


def test_a_backward_that_returns_no_gradient_is_refused(rng):
    with pytest.raises(ValueError, match="backward returned None; it must return the gradient of each input"):
        check_layer(ForgotToReturn(), rng.standard_normal((2, 3)))


@pytest.mark.parametrize("layer_class, message", [(OnlyDx, "backward returned 1 gradients for 2 inputs"),
                                                  (NoneForDg, "backward returned None for the gradient of g")])
def test_an_input_without_a_gradient_is_refused(layer_class, message, rng):
    layer = layer_class(2, "left_to_right", dtype=numpy.float64)
    x, g = rng.standard_normal((2, 2, 3, 4)), rng.uniform(0.05, 0.95, (2, 2, 3, 4))
    with pytest.raises(ValueError, match=message):
        check_layer(layer, x, g)


def test_a_gradient_of_the_wrong_shape_is_refused(rng):
    with pytest.raises(ValueError, match=r"the gradient of x has shape \(3, 2\), x has \(2, 3\)"):
        check_layer(Transposed(), rng.standard_normal((2, 3)))


def test_a_direction_that_wins_nothing_is_a_zero_row_and_fails(rng):
    """The four-way merge sends a direction's W and b no gradient where it wins no output: both
    sides are exactly 0 and the relative error 0, whatever its backward does. The row must fail."""
    layer = FourWaySpatialRNN(2, dtype=numpy.float64)
    for name, value in layer.params.items():
        value[...] = (constrain_recurrent_weight(rng.standard_normal(value.shape)) if name.endswith("W")
                      else 0.1 * rng.standard_normal(value.shape))
    layer.params["right_to_left.b"][...] = -10.0  # h = tanh(... - 10) ~ -1: never the maximum
    x = rng.standard_normal((2, 2, 3, 4))
    assert outputs_won(layer, x)[DIRECTIONS.index("right_to_left")] == 0
    report = check_layer(layer, x, rng=rng)
    zero = {row.name for row in report.rows if row.zero}
    assert zero == {"right_to_left.W", "right_to_left.b"}, str(report)
    assert all(row.error == 0.0 and row.verdict() == "ZERO" for row in report.rows if row.zero)
    assert all(row.passed() for row in report.rows if not row.zero), str(report)
    assert not report.passed() and report.max_error == float("inf")
    assert "ZERO" in str(report) and "compares nothing" in str(report)


def test_a_zero_gradient_passes_only_where_it_is_declared(rng):
    """``v`` does not enter the function, so its gradient is zero: a ZERO row unless declared; and a
    declared row whose gradient is not zero fails."""
    x, w, v = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(2)
    grads = {"w": numpy.zeros(3), "v": numpy.zeros(2)}

    def backward(dy):
        grads["w"][...] = dy * x
        return dy * w

    def run(**options):
        return check("x * w", lambda x: x * w, backward, {"x": x}, params={"w": w, "v": v}, grads=grads, rng=0,
                     **options)

    undeclared = run()
    assert [row.verdict() for row in undeclared.rows] == ["ok", "ok", "ZERO"] and not undeclared.passed()
    declared = run(expect_zero={"v"})
    assert [row.verdict() for row in declared.rows] == ["ok", "ok", "ok (zero expected)"], str(declared)
    assert declared.passed() and declared.max_error < 1e-9
    wrong = run(expect_zero={"v", "w"})  # w's gradient dy * x is not zero: of the size of x's, dy * w
    assert not wrong.passed() and wrong.rows[1].verdict() == "FAIL" and wrong.rows[1].error > 0.1
    with pytest.raises(ValueError, match=r"expect_zero names \['u'\]"):
        run(expect_zero={"u"})


def test_a_report_without_rows_fails():
    report = GradcheckReport("nothing compared")
    assert not report.passed() and report.max_error == float("inf")
    assert "no gradient was compared" in str(report)


def test_a_backward_that_changes_its_upstream_gradient_is_refused(rng):
    # masking dy in place and returning it: the finite differences, reading the same upstream,
    # would agree with it, so the check compares the upstream before and after instead
    from minirnng.layers import ReLU

    class ReLUInPlace(ReLU):
        def backward(self, grad_output):
            grad_output[~self.cache] = 0
            return grad_output

    with pytest.raises(ValueError, match="backward changed its upstream gradient in place"):
        check_layer(ReLUInPlace(), rng.standard_normal((3, 4)) + 0.1, rng=rng)
    assert check_layer(ReLU(), rng.standard_normal((3, 4)) + 0.1, rng=rng).passed()


def test_a_zero_dimensional_array_is_checked_as_an_array():
    from minirnng.layers import ReLU

    assert check_layer(Tanh(), numpy.array(0.3)).max_error < 1e-8
    chained = ReLU().forward(Tanh().forward(numpy.array(0.75, numpy.float32)))
    assert isinstance(chained, numpy.ndarray) and chained.shape == ()


def test_check_layer_leaves_a_batch_norm_as_it_found_it(rng):
    from minirnng.layers import BatchNorm2d

    layer = BatchNorm2d(3, dtype=numpy.float64)
    before = {name: value.copy() for name, value in layer.params.items()}
    x = rng.standard_normal((2, 3, 4, 4)) * 2 + 5
    assert check_layer(layer, x, rng=rng).passed()
    for name, value in before.items():  # the running statistics too, which about 200 forwards moved
        numpy.testing.assert_array_equal(layer.params[name], value, err_msg=name)
    # and its cache is that of the unperturbed input: backward gives what a fresh layer's does
    fresh = BatchNorm2d(3, dtype=numpy.float64)
    fresh.forward(x)
    dy = rng.standard_normal(x.shape)
    numpy.testing.assert_array_equal(layer.backward(dy), fresh.backward(dy))
