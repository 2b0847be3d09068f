"""The spatial recurrent layers (paper eq. 1 and 3): finite differences, naive against fast, the
four-way merge and its ties, long scans, the stability rule, and bad input."""

import numpy
import pytest
from conftest import KINK_MARGIN, merge_margin, outputs_won

from minirnng.gradcheck import check_layer
from minirnng.layers import naive
from minirnng.layers.recurrent import (DIRECTIONS, FourWayGatedRNN, FourWaySpatialRNN, GatedSpatialRNN,
                                       SpatialRNN, clip_recurrent_singular_values, constrain_recurrent_weight,
                                       project_recurrent_weight)
from minirnng.propagation import demonstrate_propagation, edge_gates, propagate_labels, random_seeds, synthetic_image


def randomize(layer, rng, weight_scale=1.0, bias_scale=1.0):
    """Random parameters: each W non-symmetric and constrained (so a W / W.T slip would show), b random."""
    for name, value in layer.params.items():
        if name.endswith("W"):
            value[...] = constrain_recurrent_weight(rng.standard_normal(value.shape) * weight_scale)
        else:
            value[...] = rng.standard_normal(value.shape) * bias_scale
    return layer


def copy_parameters(source, target):
    for name, value in source.params.items():
        target.params[name][...] = value


def gates(rng, shape):
    """Gates in (0, 1), varying from pixel to pixel (so a g[i] / g[i+1] slip would show)."""
    return rng.uniform(0.05, 0.95, shape)


# -- finite differences ---------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3, 8])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gated_finite_differences(direction, channels, rng):
    layer = randomize(GatedSpatialRNN(channels, direction, dtype=numpy.float64), rng)
    shape = (2, channels, 3, 5)
    report = check_layer(layer, rng.standard_normal(shape), gates(rng, shape), rng=rng)
    assert {row.name for row in report.rows} == {"x", "g", "W", "b"}
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("channels", [1, 3])
def test_four_way_finite_differences(channels, rng):
    # Small biases and a map of a few scan lines each way, so that every direction wins some outputs.
    layer = randomize(FourWayGatedRNN(channels, dtype=numpy.float64), rng, bias_scale=0.1)
    shape = (2, channels, 5, 6)
    x, g = rng.standard_normal(shape), gates(rng, shape)
    assert min(outputs_won(layer, x, g)) > 0, outputs_won(layer, x, g)
    assert merge_margin(layer, x, g) > KINK_MARGIN
    report = check_layer(layer, x, g, rng=rng)
    expected = {"x", "g"} | {f"{direction}.{name}" for direction in DIRECTIONS for name in "Wb"}
    assert {row.name for row in report.rows} == expected
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("channels", [1, 3, 8])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_plain_finite_differences(direction, channels, activation, rng):
    layer = randomize(SpatialRNN(channels, direction, activation=activation, dtype=numpy.float64), rng)
    report = check_layer(layer, rng.standard_normal((2, channels, 4, 3)), rng=rng)
    assert {row.name for row in report.rows} == {"x", "W", "b"}
    assert report.max_error < 1e-7, str(report)


def test_four_way_plain_finite_differences(rng):
    layer = randomize(FourWaySpatialRNN(3, dtype=numpy.float64), rng, bias_scale=0.1)
    x = rng.standard_normal((2, 3, 4, 5))
    assert min(outputs_won(layer, x)) > 0, outputs_won(layer, x)
    assert merge_margin(layer, x) > KINK_MARGIN
    report = check_layer(layer, x, rng=rng)
    assert {row.name for row in report.rows} == {"x"} | {f"{d}.{name}" for d in DIRECTIONS for name in "Wb"}
    assert report.max_error < 1e-7, str(report)


def test_a_four_way_identity_scan_with_zero_weights_is_the_identity(rng):
    # h = x + W h_prev + b with W = 0 and b = 0 is x itself; a tanh in its place would bend it
    layer = FourWaySpatialRNN(2, activation="identity", dtype=numpy.float64)
    for value in layer.params.values():
        value[...] = 0
    x = 3 * rng.standard_normal((1, 2, 3, 4))
    numpy.testing.assert_array_equal(layer.forward(x), x)


# -- naive against fast ---------------------------------------------------------------------------
TOLERANCE = {numpy.float32: 1e-5, numpy.float64: 1e-12}


def assert_close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    numpy.testing.assert_allclose(got, want, atol=TOLERANCE[dtype] * max(numpy.abs(want).max(), 1), rtol=0)


def compare_naive_and_fast(fast, slow, inputs, upstream, dtype):
    copy_parameters(fast, slow)
    assert_close(fast.forward(*inputs), slow.forward(*inputs), dtype)
    upstream_before = upstream.copy()
    fast_grads, slow_grads = fast.backward(upstream), slow.backward(upstream)
    numpy.testing.assert_array_equal(upstream, upstream_before)  # backward never modifies its input gradient
    if not isinstance(fast_grads, tuple):
        fast_grads, slow_grads = (fast_grads,), (slow_grads,)
    for got, want in zip(fast_grads, slow_grads):
        assert_close(got, want, dtype)
    for name in fast.grads:
        assert_close(fast.grads[name], slow.grads[name], dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gated_fast_matches_naive(direction, dtype, rng):
    shape = (2, 3, 4, 5)
    # a non-contiguous x: every other column of a wider array
    x = rng.standard_normal(shape[:3] + (2 * shape[3],)).astype(dtype)[..., ::2]
    g = gates(rng, shape).astype(dtype)
    fast = randomize(GatedSpatialRNN(3, direction, dtype=dtype), rng)
    slow = naive.GatedSpatialRNN(3, direction, dtype=dtype)
    compare_naive_and_fast(fast, slow, (x, g), rng.standard_normal(shape).astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_four_way_fast_matches_naive(dtype, rng):
    shape = (2, 3, 5, 4)
    x, g = rng.standard_normal(shape).astype(dtype), gates(rng, shape).astype(dtype)
    fast = randomize(FourWayGatedRNN(3, dtype=dtype), rng, bias_scale=0.1)
    assert min(outputs_won(fast, x, g)) > 0, outputs_won(fast, x, g)  # else a direction's dW, db are 0 in both
    compare_naive_and_fast(fast, naive.FourWayGatedRNN(3, dtype=dtype), (x, g),
                           rng.standard_normal(shape).astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_four_way_plain_fast_matches_naive(dtype, rng):
    shape = (2, 3, 4, 5)
    fast = randomize(FourWaySpatialRNN(3, dtype=dtype), rng, bias_scale=0.1)
    x = rng.standard_normal(shape).astype(dtype)
    assert min(outputs_won(fast, x)) > 0, outputs_won(fast, x)  # else a direction's dW, db are 0 in both
    compare_naive_and_fast(fast, naive.FourWaySpatialRNN(3, dtype=dtype), (x,),
                           rng.standard_normal(shape).astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_plain_fast_matches_naive(direction, activation, dtype, rng):
    shape = (2, 3, 4, 5)
    fast = randomize(SpatialRNN(3, direction, activation=activation, dtype=dtype), rng)
    slow = naive.SpatialRNN(3, direction, activation=activation, dtype=dtype)
    compare_naive_and_fast(fast, slow, (rng.standard_normal(shape).astype(dtype),),
                           rng.standard_normal(shape).astype(dtype), dtype)


# -- the four-way merge --------------------------------------------------------------------------
def test_four_way_parameters_are_the_live_arrays_of_its_directions():
    layer = FourWayGatedRNN(2)
    assert list(layer.direction_layers) == list(DIRECTIONS)
    for direction, child in layer.direction_layers.items():
        assert layer.params[f"{direction}.W"] is child.params["W"]
        assert layer.params[f"{direction}.b"] is child.params["b"]
        assert layer.grads[f"{direction}.W"] is child.grads["W"]
        assert layer.grads[f"{direction}.b"] is child.grads["b"]
    assert list(layer.params) == [f"{direction}.{name}" for direction in DIRECTIONS for name in "Wb"]


def test_four_way_is_the_maximum_of_its_directions(rng):
    layer = randomize(FourWayGatedRNN(3, dtype=numpy.float64), rng)
    x, g = rng.standard_normal((2, 3, 4, 6)), gates(rng, (2, 3, 4, 6))
    singles = []
    for direction, child in layer.direction_layers.items():
        single = GatedSpatialRNN(3, direction, dtype=numpy.float64)
        copy_parameters(child, single)
        singles.append(single.forward(x, g))
    numpy.testing.assert_array_equal(layer.forward(x, g), numpy.max(singles, axis=0))


def test_four_way_exact_ties_go_to_the_first_direction(rng):
    # One pixel per image: every direction computes h = x + g * b. With equal biases all four tie
    # exactly, and everything must go to left_to_right.
    layer = FourWayGatedRNN(2, dtype=numpy.float64)
    for direction in DIRECTIONS:
        layer.params[f"{direction}.b"][...] = [0.5, -1.0]
    x, g = rng.standard_normal((3, 2, 1, 1)), gates(rng, (3, 2, 1, 1))
    dh = rng.standard_normal(x.shape)
    layer.forward(x, g)
    dx, dg = layer.backward(dh)
    numpy.testing.assert_array_equal(dx, dh)
    numpy.testing.assert_allclose(dg, dh * numpy.array([0.5, -1.0]).reshape(1, 2, 1, 1))
    numpy.testing.assert_allclose(layer.grads["left_to_right.b"], (g * dh).sum(axis=(0, 2, 3)))
    for direction in DIRECTIONS[1:]:
        assert not layer.grads[f"{direction}.b"].any()


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_four_way_ties_match_the_naive_rule(dtype, rng):
    # W = I, b = 0, gates in {0, 1} and integer x: the outputs are sums of integers, exact in both
    # dtypes, so most pixels tie between two or more directions.
    shape = (2, 2, 4, 5)
    x = rng.integers(-2, 3, shape).astype(dtype)
    g = rng.integers(0, 2, shape).astype(dtype)
    dh = rng.standard_normal(shape).astype(dtype)
    fast, slow = FourWayGatedRNN(2, dtype=dtype), naive.FourWayGatedRNN(2, dtype=dtype)
    outputs = numpy.stack([child.forward(x, g) for child in fast.direction_layers.values()])
    tied = (outputs == outputs.max(axis=0)).sum(axis=0) > 1
    assert tied.mean() > 0.3  # the test really exercises ties
    compare_naive_and_fast(fast, slow, (x, g), dh, dtype)


# -- long scans and the stability rule -----------------------------------------------------------
@pytest.mark.parametrize("direction", ["left_to_right", "bottom_to_top"])
def test_long_scans_stay_finite(direction, rng):
    shape = (1, 8, 512, 3) if direction == "bottom_to_top" else (1, 8, 3, 512)
    layer = randomize(GatedSpatialRNN(8, direction), rng, weight_scale=3.0)
    assert numpy.abs(layer.params["W"]).sum(axis=1).max() <= 1 + 1e-6
    x = rng.standard_normal(shape).astype(numpy.float32)
    g = rng.uniform(0.9, 0.999, shape).astype(numpy.float32)  # gates nearly open: the hardest case
    h = layer.forward(x, g)
    dx, dg = layer.backward(rng.standard_normal(shape).astype(numpy.float32))
    for array in (h, dx, dg, layer.grads["W"], layer.grads["b"]):
        assert numpy.isfinite(array).all()
    # with |g| < 0.999 and row sums <= 1, |h| <= (max|x| + max|b|) / (1 - 0.999)
    assert numpy.abs(h).max() <= (numpy.abs(x).max() + numpy.abs(layer.params["b"]).max()) / 1e-3


def test_without_the_constraint_a_long_scan_explodes(rng):
    layer = GatedSpatialRNN(2, "left_to_right")
    layer.params["W"][...] = 1.5 * numpy.eye(2)  # row sums 1.5: breaks the rule
    shape = (1, 2, 1, 512)
    with numpy.errstate(over="ignore", invalid="ignore"):
        h = layer.forward(numpy.ones(shape, numpy.float32), numpy.full(shape, 0.9, numpy.float32))
    assert not numpy.isfinite(h).all()  # 1.35 ** 512 overflows float32


def test_constrain_recurrent_weight():
    W = numpy.array([[0.5, -1.5], [0.25, 0.25]])
    same = constrain_recurrent_weight(W)
    assert same is W  # in place
    numpy.testing.assert_allclose(W, [[0.25, -0.75], [0.125, 0.125]])  # divided by the largest row sum, 2
    inside = numpy.array([[0.5, -0.5], [0.1, 0.2]])
    before = inside.copy()
    constrain_recurrent_weight(inside)
    numpy.testing.assert_array_equal(inside, before)  # already within the rule: untouched


def test_project_recurrent_weight_is_the_nearest_matrix_within_the_bound(rng):
    W = numpy.array([[1.0, 0.02, -0.03], [0.5, -0.6, 0.1], [0.1, 0.1, 0.1]])
    same = project_recurrent_weight(W)
    assert same is W  # in place
    # every entry of a row over the bound loses the same amount (here the excess over 1, shared by three)
    numpy.testing.assert_allclose(W[0], [1 - 0.05 / 3, 0.02 - 0.05 / 3, -(0.03 - 0.05 / 3)], atol=1e-15)
    numpy.testing.assert_allclose(W[1], [0.5 - 0.2 / 3, -0.6 + 0.2 / 3, 0.1 - 0.2 / 3], atol=1e-15)
    numpy.testing.assert_array_equal(W[2], [0.1, 0.1, 0.1])  # within the bound: untouched
    # against a brute-force search for the nearest point of the L1 ball, for random rows
    for dtype in (numpy.float32, numpy.float64):
        for _ in range(20):
            row = rng.standard_normal(6) * rng.uniform(0.2, 2)
            projected = project_recurrent_weight(row[None].astype(dtype).copy())[0]
            assert projected.dtype == dtype and numpy.abs(projected).sum() <= 1 + 1e-6
            if numpy.abs(row).sum() <= 1:
                continue
            thresholds = numpy.linspace(0, numpy.abs(row).max(), 200001)
            sums = numpy.maximum(numpy.abs(row)[None] - thresholds[:, None], 0).sum(axis=1)
            theta = thresholds[numpy.argmin(numpy.abs(sums - 1))]
            nearest = numpy.sign(row) * numpy.maximum(numpy.abs(row) - theta, 0)
            numpy.testing.assert_allclose(projected, nearest, atol=2e-5)
            # and no other point of the ball is nearer: a few random ones
            others = rng.standard_normal((200, 6))
            others /= numpy.maximum(numpy.abs(others).sum(axis=1, keepdims=True), 1)
            assert (numpy.linalg.norm(others - row, axis=1) >= numpy.linalg.norm(projected - row) - 1e-6).all()


def test_clip_recurrent_singular_values_is_the_nearest_matrix_within_the_spectral_bound(rng):
    rotation = numpy.array([[1.0, -1.0], [1.0, 1.0]]) / numpy.sqrt(2)  # spectral norm 1, row sums sqrt(2)
    before = rotation.copy()
    assert clip_recurrent_singular_values(rotation) is rotation
    numpy.testing.assert_array_equal(rotation, before)  # within the bound: untouched
    copies = numpy.zeros((3, 3))
    copies[:, 0] = 1  # every channel copies the first: row sums 1, spectral norm sqrt(3)
    expected = copies / numpy.sqrt(3)  # rank one: its only singular value, sqrt(3), becomes 1
    clip_recurrent_singular_values(copies)
    numpy.testing.assert_allclose(copies, expected, atol=1e-15)
    with pytest.raises(ValueError, match="clip_recurrent_singular_values: W has NaN or infinite entries"):
        clip_recurrent_singular_values(numpy.array([[numpy.nan, 0.0], [0.0, 1.0]]))
    for dtype in (numpy.float32, numpy.float64):
        for _ in range(20):
            W = (rng.standard_normal((6, 6)) * rng.uniform(0.1, 1)).astype(dtype)
            clipped = clip_recurrent_singular_values(W.copy())
            assert clipped.dtype == dtype
            assert numpy.linalg.norm(clipped.astype(numpy.float64), 2) <= 1 + 1e-5
            if numpy.linalg.norm(W.astype(numpy.float64), 2) <= 1:
                numpy.testing.assert_array_equal(clipped, W)
                continue
            # no other matrix within the bound is nearer: random ones, and points between W and the clip
            others = rng.standard_normal((200, 6, 6))
            others /= numpy.maximum(numpy.linalg.norm(others, 2, axis=(1, 2)), 1)[:, None, None]
            distance = numpy.linalg.norm(clipped - W)
            assert (numpy.linalg.norm(others - W, axis=(1, 2)) >= distance - 1e-5).all()
            for step in (0.01, 0.1):
                nearer = clipped + step * (W - clipped)
                assert numpy.linalg.norm(nearer.astype(numpy.float64), 2) > 1 - 1e-6


def test_the_stability_rule_is_chosen_by_name():
    from minirnng.models import RNNG
    model = RNNG(3, rng=0, dtype=numpy.float64)
    model.randomize_recurrence(1)
    for name in model.recurrent_weight_names():
        model.params()[name][...] *= 3  # every row sum far over 1
    rescaled, projected = RNNG(3, rng=0, dtype=numpy.float64), RNNG(3, rng=0, dtype=numpy.float64)
    for copy, rule in ((rescaled, "rescale"), (projected, "project")):
        copy.load_params(model.params())
        copy.constrain(rule)
    for name in model.recurrent_weight_names():
        expected = constrain_recurrent_weight(model.params()[name].copy())
        numpy.testing.assert_array_equal(rescaled.params()[name], expected)
        over = numpy.abs(model.params()[name]).sum(axis=1) > 1
        assert over.any()
        numpy.testing.assert_allclose(numpy.abs(projected.params()[name][over]).sum(axis=1), 1, rtol=1e-12)
        numpy.testing.assert_array_equal(projected.params()[name][~over], model.params()[name][~over])
    spectral = RNNG(3, rng=0, dtype=numpy.float64)
    spectral.load_params(model.params())
    spectral.constrain("spectral")
    for name in model.recurrent_weight_names():
        numpy.testing.assert_allclose(numpy.linalg.norm(spectral.params()[name], 2), 1, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown stability rule 'clip'; expected one of rescale, project, spectral"):
        model.constrain("clip")


def test_initialisation_is_the_identity_and_propagates():
    layer = GatedSpatialRNN(3, "left_to_right")
    numpy.testing.assert_array_equal(layer.params["W"], numpy.eye(3))
    assert not layer.params["b"].any() and layer.params["W"].dtype == numpy.float32
    # a score at the first column is carried along the row while the gate is open, and stops where it shuts
    x = numpy.zeros((1, 3, 1, 6), numpy.float32)
    x[0, 1, 0, 0] = 1
    g = numpy.ones_like(x)
    g[..., 4] = 0
    numpy.testing.assert_array_equal(layer.forward(x, g)[0, 1, 0], [1, 1, 1, 1, 0, 0])


def test_gradients_accumulate_until_zero_grad(rng):
    layer = randomize(GatedSpatialRNN(2, "top_to_bottom", dtype=numpy.float64), rng)
    x, g, dh = rng.standard_normal((1, 2, 3, 3)), gates(rng, (1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3))
    layer.forward(x, g)
    layer.backward(dh)
    once = layer.grads["W"].copy()
    layer.backward(dh)
    numpy.testing.assert_allclose(layer.grads["W"], 2 * once)
    layer.zero_grad()
    assert not layer.grads["W"].any()


# -- bad input -----------------------------------------------------------------------------------
def zeros(*shape, dtype=numpy.float32):
    return numpy.zeros(shape, dtype)


BAD_CALLS = [
    (lambda: GatedSpatialRNN(3, "left_to_right").forward(zeros(2, 3, 4, 5), None),
     TypeError, r"GatedSpatialRNN.forward: the gate g is missing \(None\)"),
    (lambda: FourWayGatedRNN(3).forward(zeros(2, 3, 4, 5), None),
     TypeError, r"FourWayGatedRNN.forward: the gate g is missing \(None\)"),
    (lambda: GatedSpatialRNN(3, "left_to_right").forward(zeros(2, 3, 4, 5), zeros(2, 3, 4, 6)),
     ValueError, r"GatedSpatialRNN: g must have the shape of x \(2, 3, 4, 5\), got \(2, 3, 4, 6\)"),
    (lambda: GatedSpatialRNN(3, "left_to_right").forward(zeros(2, 4, 4, 5), zeros(2, 4, 4, 5)),
     ValueError, r"GatedSpatialRNN: x must have 3 channels on axis 1, got shape \(2, 4, 4, 5\)"),
    (lambda: GatedSpatialRNN(3, "left_to_right").forward(zeros(3, 4, 5), zeros(3, 4, 5)),
     ValueError, r"GatedSpatialRNN: x must have 4 dimensions, got shape \(3, 4, 5\)"),
    (lambda: GatedSpatialRNN(3, "left_to_right").forward(zeros(1, 3, 2, 2), zeros(1, 3, 2, 2, dtype=numpy.float64)),
     TypeError, r"GatedSpatialRNN: g has dtype float64, but the layer works in float32"),
    (lambda: GatedSpatialRNN(3, "diagonal"),
     ValueError, r"GatedSpatialRNN: unknown direction 'diagonal'; expected one of left_to_right"),
    (lambda: FourWayGatedRNN(2).forward(zeros(1, 2, 3, 3), zeros(1, 3, 3, 3)),
     ValueError, r"FourWayGatedRNN: g must have 2 channels on axis 1"),
    (lambda: FourWayGatedRNN(0),
     ValueError, r"FourWayGatedRNN: channels must be >= 1, got 0"),
    (lambda: SpatialRNN(3, "left_to_right", activation="relu"),
     ValueError, r"SpatialRNN: unknown activation 'relu'; expected one of tanh, identity"),
    (lambda: SpatialRNN(3, "top_to_bottom").forward(zeros(1, 3, 2, 2, dtype=numpy.int64)),
     TypeError, r"SpatialRNN: x has dtype int64"),
    (lambda: GatedSpatialRNN(3, "left_to_right", rng="a"),
     TypeError, r"GatedSpatialRNN: rng must be None, a non-negative integer seed or a numpy Generator"),
    (lambda: SpatialRNN(3, "left_to_right", rng=-1),
     ValueError, r"SpatialRNN: rng must be None, a non-negative integer seed or a numpy Generator"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_upstream_gradients_raise_clear_errors():
    layer = FourWayGatedRNN(2)
    with pytest.raises(RuntimeError, match="FourWayGatedRNN.backward called before forward"):
        layer.backward(numpy.zeros((1, 2, 3, 3), numpy.float32))
    layer.forward(numpy.zeros((1, 2, 3, 3), numpy.float32), numpy.zeros((1, 2, 3, 3), numpy.float32))
    with pytest.raises(ValueError, match=r"FourWayGatedRNN: grad_output must have the output's shape \(1, 2, 3, 3\)"):
        layer.backward(zeros(1, 2, 3, 4))


# -- the propagation demonstration ---------------------------------------------------------------
def test_propagation_fills_regions_and_stops_at_edges(tmp_path):
    image, regions = synthetic_image()
    gate = edge_gates(image)
    assert numpy.median(gate[regions == 0]) > 0.9 and gate.min() < 1e-6  # open inside, shut on edges
    seeds = random_seeds(regions)
    labels, scores = propagate_labels(seeds, gate)
    assert scores.shape == (4,) + regions.shape
    labelled = labels >= 0
    assert labelled.mean() > 0.85  # the seeds fill their regions (edge pixels may stay unlabelled)
    assert (labels[labelled] == regions[labelled]).all()  # and never cross an edge
    # without the gate the labels leak across the edges
    leaky, _ = propagate_labels(seeds, numpy.full_like(gate, 0.99))
    assert (leaky != regions).mean() > 0.3
    figure = demonstrate_propagation(path=tmp_path / "propagation.png")
    assert len(figure.axes) >= 5 and (tmp_path / "propagation.png").stat().st_size > 0


def test_propagation_takes_rgba_images_and_names_mismatched_shapes():
    image, regions = synthetic_image()                                  # grey, float (H, W)
    rgba = numpy.stack([image, image, image, numpy.ones_like(image)], axis=2)   # plt.imread gives a PNG so
    numpy.testing.assert_allclose(edge_gates(rgba), edge_gates(image), atol=1e-12)
    with pytest.raises(ValueError, match=r"expected an \(H, W\), \(H, W, 3\) or \(H, W, 4\) image, got shape"):
        edge_gates(numpy.moveaxis(rgba[:, :, :3], 2, 0))
    seeds = random_seeds(regions)
    with pytest.raises(ValueError, match=r"the gate map has shape \(\d+, \d+\), the seed map \(\d+, \d+\)"):
        propagate_labels(seeds, edge_gates(image)[:, 1:])
    with pytest.raises(ValueError, match="seeds must be an integer"):
        propagate_labels(seeds.astype(float), edge_gates(image))
    gate = edge_gates(image)
    for bad_gate in (numpy.where(seeds >= 0, numpy.nan, gate), gate + 1.5, gate.astype(complex)):
        with pytest.raises(ValueError, match=r"the gate must be real numbers in \[0, 1\]"):
            propagate_labels(seeds, bad_gate)
    with pytest.raises(ValueError, match="seeds are labels 0 .. K-1, or -1 for no seed; got -5"):
        propagate_labels(numpy.where(seeds >= 0, seeds, -5), gate)
    with pytest.raises(ValueError, match=r"the seed map is empty \(shape \(0, 0\)\)"):
        propagate_labels(numpy.zeros((0, 0), int), numpy.zeros((0, 0)))
    with pytest.raises(ValueError, match="edge_gates: the image must be at least 2 x 2 pixels"):
        edge_gates(numpy.zeros((1, 5)))


def test_edge_gates_read_a_16_bit_picture_as_its_8_bit_twin_and_refuse_a_signed_one():
    image, _ = synthetic_image()
    eight = numpy.rint(image * 255).astype(numpy.uint8)
    sixteen = eight.astype(numpy.uint16) * 257  # 255 -> 65535: the same grey levels
    numpy.testing.assert_allclose(edge_gates(sixteen), edge_gates(eight), rtol=1e-12)
    with pytest.raises(ValueError, match="expected a uint8, uint16, float or bool image, got int32"):
        edge_gates(eight.astype(numpy.int32))
    # a float picture in 0 .. 255 made every step an edge: gates near 0 and nothing propagated
    with pytest.raises(ValueError, match=r"a float image must hold values in \[0, 1\], got 28 .. 224"):
        edge_gates(eight.astype(numpy.float64))
    seeds = numpy.full(image.shape, -1)
    seeds[3, 4] = 10 ** 9  # one score map per label up to it: terabytes
    with pytest.raises(ValueError, match="the largest seed label is 1000000000, more than the map has pixels"):
        propagate_labels(seeds, edge_gates(image))


def test_demonstrate_propagation_takes_seeds_as_a_list_and_names_too_many_labels():
    image, regions = synthetic_image()
    seeds = random_seeds(regions)
    figure = demonstrate_propagation(image, seeds.tolist(), regions)
    assert len(figure.axes) >= 5
    many = seeds.copy()
    many[many >= 0] = 8
    with pytest.raises(ValueError, match="draws at most 8 labels .* the seeds go up to 8"):
        demonstrate_propagation(image, many)


def test_a_nan_goes_to_the_first_direction_whose_output_is_nan_on_both_paths(rng):
    # a diverged pass: the NumPy merge and the kernel must send the gradient to the same directions
    from minirnng import backend

    x = rng.uniform(0.5, 1.5, (2, 2, 3, 4))
    x[0, 0, 0, 2] = x[1, 1, 2, 0] = numpy.nan
    g = rng.uniform(0.2, 0.8, x.shape)
    dh = rng.standard_normal(x.shape)
    results = []
    for path in ("numpy", "cuda-emulator"):
        layer = FourWayGatedRNN(2, dtype=numpy.float64)
        with backend.use(path):
            h = backend.to_numpy(layer.forward(x, g))
            results.append((h, *(backend.to_numpy(d) for d in layer.backward(dh))))
    for numpy_result, kernel_result in zip(*results):
        numpy.testing.assert_allclose(numpy_result, kernel_result, rtol=1e-12, equal_nan=True)
    assert numpy.isnan(results[0][0]).any()  # the case is one: some outputs are NaN


def test_the_naive_merge_gives_a_nan_to_the_first_direction_whose_output_is_nan(rng):
    # the oracle follows the same rule as the fast merge, whichever direction's output is NaN first
    x = rng.uniform(0.5, 1.5, (1, 1, 3, 4))
    x[0, 0, 1, 3] = numpy.nan  # reached first by the right-to-left scan (direction 1), not direction 0
    fast = FourWaySpatialRNN(1, activation="identity", dtype=numpy.float64)
    slow = naive.FourWaySpatialRNN(1, activation="identity", dtype=numpy.float64)
    h = fast.forward(x)
    numpy.testing.assert_array_equal(slow.forward(x), h)
    assert numpy.isnan(h).sum() > 1


def test_an_infinite_upstream_gradient_reaches_only_the_directions_that_won(rng):
    # routing by a 0/1 mask would give inf * 0 = NaN to the directions that lost the pixel
    # (one channel: with more, the scans' own products would meet inf * 0 in W's zeros on both paths)
    x = rng.uniform(-1, 1, (2, 1, 3, 4))
    dh = rng.standard_normal(x.shape)
    dh[0, 0, 0, 0], dh[1, 0, 2, 3] = numpy.inf, -numpy.inf
    fast = FourWaySpatialRNN(1, activation="identity", dtype=numpy.float64)
    slow = naive.FourWaySpatialRNN(1, activation="identity", dtype=numpy.float64)
    fast.forward(x)
    slow.forward(x)
    routed, expected = fast.backward(dh), slow.backward(dh)
    assert not numpy.isnan(expected).any()
    numpy.testing.assert_allclose(routed, expected, rtol=1e-12)
