"""Every kernel, run on the CPU by the CUDA emulator, against a plain NumPy reference.

The launch code is the GPU path's (tests/cuda_cases.py): same grids, blocks and argument types.
Tolerance: 1e-6 (float32) and 1e-12 (float64) of the reference's largest magnitude; integer
outputs (argmax, winners) exactly. The backward passes of the scans and the losses are also
checked against finite differences in float64, so they do not rest on a hand-derived reference.
"""

import shutil
import uuid

import numpy
import pytest

import cuda_cases as cases
from cuda_cases import assert_close, directional_derivative, loss_inputs, normal, scan_inputs
from minirnng import backend
from minirnng.cuda import DIRECTIONS, emulator, get_kernel, sources

# every output allocated here starts as NaN: an element that a kernel does not write shows (conftest)
pytestmark = pytest.mark.usefixtures("poisoned_allocations")
SHIPPED_KERNELS = sources.KERNEL_DIRECTORY
DTYPES = [pytest.param(numpy.float32, id="float32"), pytest.param(numpy.float64, id="float64")]


@pytest.fixture(autouse=True, params=emulator.ORDERS)
def on_the_emulator(request):
    # every kernel in both thread orders: a result that depended on the order would be a race on a GPU
    with backend.use("cuda-emulator"), emulator.thread_order(request.param):
        yield


# ---- im2col / col2im / bias / reductions --------------------------------------------------------

WINDOWS = [(1, 1, 0), (3, 1, 1), (5, 1, 2), (4, 2, 1), (3, 2, 0), (2, 2, 0), (3, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, s, p", WINDOWS)
def test_im2col_and_col2im_match_slicing(k, s, p, dtype):
    rng = numpy.random.default_rng(0)
    x = normal(rng, (2, 3, 7, 6), dtype)
    assert_close(cases.im2col(x, k, s, p), cases.reference_im2col(x, k, s, p))
    cols = normal(rng, cases.reference_im2col(x, k, s, p).shape, dtype)
    assert_close(cases.col2im(cols, x.shape, k, s, p), cases.reference_col2im(cols, x.shape, k, s, p))


@pytest.mark.parametrize("k, s, p", WINDOWS)
def test_col2im_is_the_adjoint_of_im2col(k, s, p):
    """<im2col(x), c> = <x, col2im(c)>: what makes col2im the input gradient of a convolution."""
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6))
    cols = rng.standard_normal(cases.im2col(x, k, s, p).shape)
    left = numpy.vdot(cases.im2col(x, k, s, p), cols)
    right = numpy.vdot(x, cases.col2im(cols, x.shape, k, s, p))
    assert abs(left - right) <= 1e-12 * abs(left)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose_output_grid(dtype):
    """ConvTranspose2d 4x4, stride 2, pad 1 doubles the size: col2im onto (H-1)*2 - 2 + 4 = 2H."""
    rng = numpy.random.default_rng(2)
    H, W = 5, 3
    cols = normal(rng, (2, 4 * 16, H * W), dtype)
    image_shape = (2, 4, 2 * H, 2 * W)
    assert cases.output_size(2 * H, 4, 2, 1) == H
    assert_close(cases.col2im(cols, image_shape, 4, 2, 1), cases.reference_col2im(cols, image_shape, 4, 2, 1))
    bias = normal(rng, (4,), dtype)  # ConvTranspose2d's bias, fused into the fold
    assert_close(cases.col2im(cols, image_shape, 4, 2, 1, bias),
                 cases.reference_col2im(cols, image_shape, 4, 2, 1) + bias.astype(numpy.float64)[:, None, None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("k, s, p", WINDOWS)
def test_direct_convolutions_match_the_im2col_references(k, s, p, transposed, dtype):
    """conv_direct.cu, with and without a bias, against ``w2 @ im2col(x)`` and ``col2im(w2.T @ x)``,
    and with the fused ReLU against the maximum of that and 0."""
    rng = numpy.random.default_rng(4)
    x = normal(rng, (2, 3, 7, 6), dtype)
    weight = normal(rng, (3, 4, k, k) if transposed else (4, 3, k, k), dtype)
    for bias in (None, normal(rng, (4,), dtype)):
        expected = cases.reference_conv_direct(x, weight, bias, s, p, transposed)
        assert_close(cases.conv_direct(x, weight, bias, s, p, transposed), expected)
        assert_close(cases.conv_direct(x, weight, bias, s, p, transposed, relu=True), numpy.maximum(expected, 0))
        assert (expected < 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_add(dtype):
    rng = numpy.random.default_rng(3)
    y, b = normal(rng, (3, 5, 11), dtype), normal(rng, (5,), dtype)
    assert_close(cases.bias_add(y, b), y.astype(numpy.float64) + b.astype(numpy.float64)[:, None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 7, None, 5000], ids=["1", "7", "default", "more-than-elements"])
def test_channel_sum_is_the_bias_gradient(chunks, dtype):
    rng = numpy.random.default_rng(4)
    dy = normal(rng, (3, 5, 11), dtype)
    assert_close(cases.channel_sum(dy, chunks), dy.astype(numpy.float64).sum(axis=(0, 2)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_first_axis(dtype):
    rng = numpy.random.default_rng(5)
    x = normal(rng, (4, 2, 3, 5), dtype)
    assert_close(cases.sum_first_axis(x), x.astype(numpy.float64).sum(axis=0))


# ---- max pooling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, s", [(2, 2), (3, 2), (3, 1), (2, 3), (3, 3)])
def test_maxpool_with_ties(k, s, dtype):
    """Values from {0, 1, 2, 3} tie in most windows: the first maximum must win, forward and backward."""
    rng = numpy.random.default_rng(6)
    x = rng.integers(0, 4, (2, 3, 9, 8)).astype(dtype)
    y, argmax = cases.maxpool(x, k, s)
    expected_y, expected_argmax = cases.reference_maxpool(x, k, s)
    assert_close(y, expected_y)
    numpy.testing.assert_array_equal(argmax, expected_argmax)
    dy = normal(rng, y.shape, dtype)
    assert_close(cases.maxpool_backward(dy, argmax, x.shape, k, s),
                 cases.reference_maxpool_backward(dy, expected_argmax, x.shape, k, s))


def test_maxpool_propagates_nan():
    x = numpy.arange(2 * 1 * 4 * 4, dtype=numpy.float32).reshape(2, 1, 4, 4)
    x[0, 0, 1, 0] = numpy.nan
    x[0, 0, 1, 1] = numpy.nan
    y, argmax = cases.maxpool(x, 2, 2)
    expected_y, expected_argmax = cases.reference_maxpool(x, 2, 2)
    assert numpy.isnan(y[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 2  # the first NaN in the window
    numpy.testing.assert_array_equal(argmax, expected_argmax)
    assert_close(y, expected_y)


# ---- activations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_activation_forward_and_backward(name, dtype):
    rng = numpy.random.default_rng(7)
    x = normal(rng, (3, 4, 5, 7), dtype, scale=3.0)
    x.flat[:6] = [0.0, -0.0, 60.0, -60.0, 200.0, -200.0]  # the kink, and beyond exp's range in float32
    y = cases.activation(name, x)
    assert_close(y, cases.reference_activation(name, x))
    dy = normal(rng, x.shape, dtype)
    assert_close(cases.activation_backward(name, dy, y), cases.reference_activation_backward(name, dy, y))


def test_relu_passes_nan_and_its_backward_accepts_the_input():
    x = numpy.array([numpy.nan, -1.0, 2.0, 0.0], dtype=numpy.float32)
    y = cases.activation("relu", x)
    assert numpy.isnan(y[0]) and list(y[1:]) == [0.0, 2.0, 0.0]
    dy = numpy.ones(3, numpy.float32)
    numpy.testing.assert_array_equal(cases.activation_backward("relu", dy, x[1:].copy()), [0.0, 1.0, 0.0])


# ---- batch normalisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("track", [True, False], ids=["tracking", "not-tracking"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 2, 13, 77)], ids=["small", "more-pixels-than-chunks"])
def test_batch_norm_kernels_match_the_formulas(shape, track, dtype):
    rng = numpy.random.default_rng(8)
    x = (normal(rng, shape, dtype, scale=3.0) + rng.uniform(-2, 2, (1, shape[1], 1, 1))).astype(dtype)
    weight, bias = normal(rng, (shape[1],), dtype), normal(rng, (shape[1],), dtype)
    running_mean, running_var = normal(rng, (shape[1],), dtype), rng.uniform(0.5, 2, shape[1]).astype(dtype)
    results = cases.batch_norm(x, weight, bias, running_mean, running_var, momentum=0.2, track=track)
    expected = cases.reference_batch_norm(x, weight, bias, running_mean, running_var, momentum=0.2, track=track)
    for name, value in expected.items():
        assert_close(results[name], value)
    # inference: the running statistics in place of the batch's
    per_channel = [value.astype(numpy.float64).reshape(1, -1, 1, 1) for value in (running_mean, running_var, weight, bias)]
    inferred = per_channel[2] * (x - per_channel[0]) / numpy.sqrt(per_channel[1] + 1e-5) + per_channel[3]
    assert_close(cases.batch_norm_normalize(x, running_mean, running_var, weight, bias)["y"], inferred)
    dy = normal(rng, shape, dtype)
    gradients = cases.batch_norm_backward(dy, results["xhat"], results["variance"], weight)
    for name, value in cases.reference_batch_norm_backward(dy, results["xhat"], results["variance"], weight).items():
        assert_close(gradients[name], value)


# ---- recurrent scans ------------------------------------------------------------------------------------

SCAN_DIRECTIONS = [pytest.param([d], id=d) for d in DIRECTIONS] + [pytest.param(list(DIRECTIONS), id="all-four")]
# Channel counts on both sides of the gated forward kernel's REGISTER_CHANNELS (16): C = 17 takes the
# path that reads h_{t-1} back from memory.
SCAN_SHAPES = [(2, 3, 5, 7), (1, 1, 1, 4), (3, 2, 6, 1), (1, 16, 3, 4), (2, 17, 4, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=["x".join(map(str, shape)) for shape in SCAN_SHAPES])
@pytest.mark.parametrize("directions", SCAN_DIRECTIONS)
@pytest.mark.parametrize("kind", ["gated", "tanh"])
def test_scan_forward_and_backward_match_the_step_by_step_reference(kind, directions, shape, dtype):
    rng = numpy.random.default_rng(8)
    x, g, weight, bias = scan_inputs(rng, shape, directions, dtype)
    h = cases.scan(kind, x, g, weight, bias, directions)
    dh = normal(rng, h.shape, dtype)
    gradients = cases.scan_backward(kind, dh, g, h, weight, bias, directions)
    cases.check_scan_against_reference(kind, x, g, weight, bias, directions, h, dh, gradients)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_scan_without_gates_is_the_identity_plain_scan(dtype):
    """g = None means g = 1: h_t = x_t + W h_{t-1} + b, SpatialRNN(activation="identity")."""
    rng = numpy.random.default_rng(17)
    directions = list(DIRECTIONS)
    x, _, weight, bias = scan_inputs(rng, (2, 3, 5, 7), directions, dtype)
    h = cases.scan("gated", x, None, weight, bias, directions)
    dh = normal(rng, h.shape, dtype)
    gradients = cases.scan_backward("gated", dh, None, h, weight, bias, directions)
    assert "dg" not in gradients
    cases.check_scan_against_reference("gated", x, None, weight, bias, directions, h, dh, gradients)


@pytest.mark.parametrize("kind", ["gated", "tanh"])
def test_scan_backward_matches_finite_differences(kind):
    cases.check_scan_gradients_by_finite_differences(kind, run=lambda function, *args: function(*args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_merge_with_ties_goes_to_the_first_direction(dtype):
    rng = numpy.random.default_rng(10)
    h = rng.integers(0, 3, (4, 2, 3, 5, 7)).astype(dtype)  # most pixels tie between directions
    h[2, 0, 0, 0, 0] = numpy.nan
    out, winner = cases.max_merge(h)
    expected_winner = h.argmax(axis=0)  # first maximum, first NaN: the kernel's rule
    numpy.testing.assert_array_equal(winner, expected_winner)
    assert_close(out, numpy.take_along_axis(h, expected_winner[None], axis=0)[0])
    dout = normal(rng, out.shape, dtype)
    dh = cases.max_merge_backward(dout, winner, 4)
    expected = numpy.where(numpy.arange(4).reshape(4, 1, 1, 1, 1) == expected_winner[None], dout[None], 0)
    assert_close(dh, expected)


# ---- losses ---------------------------------------------------------------------------------------------

LOSS_OPTIONS = {
    "plain": {},
    "mask": {"mask": True},
    "class-weights": {"class_weights": True},
    "ignore-255": {"ignore_index": 255},
    "everything": {"mask": True, "class_weights": True, "ignore_index": 255},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", LOSS_OPTIONS.values(), ids=LOSS_OPTIONS.keys())
@pytest.mark.parametrize("logit_scale", [3.0, 60.0], ids=["moderate", "large-logits"])
def test_softmax_cross_entropy(options, logit_scale, dtype):
    rng = numpy.random.default_rng(11)
    logits, targets, kwargs = loss_inputs(rng, options, dtype, logit_scale=logit_scale)
    totals = cases.softmax_cross_entropy(logits, targets, **kwargs)
    loss_sum, weight_sum, dlogits = cases.reference_softmax_cross_entropy(logits, targets, scale=0.7, **kwargs)
    assert_close(totals, [loss_sum, weight_sum])
    assert_close(cases.softmax_cross_entropy_backward(logits, targets, totals, 0.7, **kwargs), dlogits)


def test_softmax_cross_entropy_accepts_a_bool_mask():
    rng = numpy.random.default_rng(12)
    logits, targets, kwargs = loss_inputs(rng, {"mask": True}, numpy.float64)
    as_bool = cases.softmax_cross_entropy(logits, targets, mask=kwargs["mask"].astype(bool))
    numpy.testing.assert_array_equal(as_bool, cases.softmax_cross_entropy(logits, targets, **kwargs))


def assert_gradient_matches(loss_of_logits, logits, dlogits, rng):
    """A loss kernel's dlogits against the centred difference of the loss along a random direction (float64)."""
    direction = rng.standard_normal(logits.shape)
    numeric = directional_derivative(loss_of_logits, logits, direction)
    assert abs(numpy.vdot(dlogits, direction) - numeric) <= 1e-7 * abs(numeric)


def test_softmax_cross_entropy_gradient_matches_finite_differences():
    rng = numpy.random.default_rng(13)
    logits, targets, kwargs = loss_inputs(rng, LOSS_OPTIONS["everything"], numpy.float64)

    def mean_loss(z):
        totals = cases.softmax_cross_entropy(z, targets, **kwargs)
        return totals[0] / totals[1]

    totals = cases.softmax_cross_entropy(logits, targets, **kwargs)
    dlogits = cases.softmax_cross_entropy_backward(logits, targets, totals, 1.0, **kwargs)
    assert_gradient_matches(mean_loss, logits, dlogits, rng)


def test_softmax_cross_entropy_edge_cases():
    rng = numpy.random.default_rng(14)
    logits, targets, _ = loss_inputs(rng, {}, numpy.float32)
    # Nothing counts: both totals are 0 and the gradient is exactly 0 (no 0/0).
    ignored = numpy.full_like(targets, -100)
    totals = cases.softmax_cross_entropy(logits, ignored)
    numpy.testing.assert_array_equal(totals, [0, 0])
    assert not cases.softmax_cross_entropy_backward(logits, ignored, totals, 1.0).any()
    # A label that is not a class (and not ignored) shows as NaN instead of reading out of bounds.
    wrong = targets.copy()
    wrong[0, 0, 0] = 5
    assert numpy.isnan(cases.softmax_cross_entropy(logits, wrong)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-pixels", "mask"])
def test_sigmoid_bce(masked, dtype):
    rng = numpy.random.default_rng(15)
    logits = normal(rng, (2, 1, 5, 7), dtype, scale=3.0)
    logits.flat[:4] = [100.0, -100.0, 1000.0, -1000.0]  # far beyond exp's range in float32
    targets = (rng.random(logits.shape) < 0.5).astype(dtype)
    targets.flat[:4] = [0.0, 1.0, 1.0, 0.0]
    mask = (rng.random((2, 5, 7)) < 0.6).astype(numpy.uint8) if masked else None
    if masked:
        mask.flat[:4] = 1
    totals = cases.sigmoid_bce(logits, targets, mask)
    loss_sum, weight_sum, dlogits = cases.reference_sigmoid_bce(logits, targets, mask, scale=0.7)
    assert numpy.isfinite(totals).all()
    assert_close(totals, [loss_sum, weight_sum])
    assert_close(cases.sigmoid_bce_backward(logits, targets, totals, 0.7, mask), dlogits)


def test_sigmoid_bce_gradient_matches_finite_differences():
    rng = numpy.random.default_rng(16)
    logits = rng.standard_normal((2, 1, 4, 5)) * 3
    targets = (rng.random(logits.shape) < 0.5).astype(numpy.float64)
    mask = (rng.random((2, 4, 5)) < 0.6).astype(numpy.uint8)

    def mean_loss(z):
        totals = cases.sigmoid_bce(z, targets, mask)
        return totals[0] / totals[1]

    totals = cases.sigmoid_bce(logits, targets, mask)
    dlogits = cases.sigmoid_bce_backward(logits, targets, totals, 1.0, mask)
    assert_gradient_matches(mean_loss, logits, dlogits, rng)


DICE_OPTIONS = {name: LOSS_OPTIONS[name] for name in ("plain", "mask", "ignore-255")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", DICE_OPTIONS.values(), ids=DICE_OPTIONS.keys())
@pytest.mark.parametrize("logit_scale", [3.0, 60.0], ids=["moderate", "large-logits"])
def test_soft_dice(options, logit_scale, dtype):
    rng = numpy.random.default_rng(17)
    logits, targets, kwargs = loss_inputs(rng, options, dtype, logit_scale=logit_scale)
    totals = cases.soft_dice(logits, targets, **kwargs)
    want_totals, _, dlogits = cases.reference_soft_dice(logits, targets, 0.5, scale=0.7, **kwargs)
    assert_close(totals, want_totals)
    assert_close(cases.soft_dice_backward(logits, targets, totals, 0.5, 0.7, **kwargs), dlogits)


def test_soft_dice_gradient_matches_finite_differences():
    rng = numpy.random.default_rng(18)
    logits, targets, kwargs = loss_inputs(rng, {"mask": True, "ignore_index": 255}, numpy.float64)
    smooth = 1.0

    def loss(z):
        totals = cases.soft_dice(z, targets, **kwargs)
        K = z.shape[1]
        return 1 - ((2 * totals[:K] + smooth) / (totals[K:] + smooth)).mean()

    totals = cases.soft_dice(logits, targets, **kwargs)
    dlogits = cases.soft_dice_backward(logits, targets, totals, smooth, 1.0, **kwargs)
    assert_gradient_matches(loss, logits, dlogits, rng)


def test_soft_dice_edge_cases():
    rng = numpy.random.default_rng(19)
    logits, targets, _ = loss_inputs(rng, {}, numpy.float32)
    # Nothing counts: every total is 0 and the gradient is exactly 0.
    ignored = numpy.full_like(targets, -100)
    totals = cases.soft_dice(logits, ignored)
    numpy.testing.assert_array_equal(totals, numpy.zeros(2 * logits.shape[1]))
    assert not cases.soft_dice_backward(logits, ignored, totals, 1.0, 1.0).any()
    # A label that is not a class (and not ignored) shows as NaN instead of reading out of bounds.
    wrong = targets.copy()
    wrong[0, 0, 0] = 5
    assert numpy.isnan(cases.soft_dice(logits, wrong)).all()
    assert numpy.isnan(cases.soft_dice_backward(logits, wrong, totals, 1.0, 1.0)[0, :, 0, 0]).all()


AFFINITY_SCALARS = (0.8, 0.3, 0.5)  # straight and diagonal weights, 1 / (2 s_rgb^2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_colour_affinity(dtype):
    rng = numpy.random.default_rng(21)
    logits = normal(rng, (2, 3, 5, 7), dtype, scale=3.0)
    images = normal(rng, (2, 3, 5, 7), dtype)
    images[0, :, 1:3, 2:5] = 0.25  # a patch of one colour: pairs of weight s_d exactly
    total, dlogits = cases.reference_colour_affinity(logits, images, *AFFINITY_SCALARS, scale=0.7)
    assert_close(cases.colour_affinity(logits, images, *AFFINITY_SCALARS), numpy.array([total]))
    assert_close(cases.colour_affinity_backward(logits, images, *AFFINITY_SCALARS, 0.7), dlogits)


def test_colour_affinity_gradient_matches_finite_differences():
    rng = numpy.random.default_rng(22)
    logits = normal(rng, (1, 4, 4, 6), numpy.float64, scale=2.0)
    images = normal(rng, (1, 3, 4, 6), numpy.float64)

    def loss(z):
        return float(cases.colour_affinity(z, images, *AFFINITY_SCALARS)[0])

    dlogits = cases.colour_affinity_backward(logits, images, *AFFINITY_SCALARS, 1.0)
    assert_gradient_matches(loss, logits, dlogits, rng)


# ---- the launcher's argument checks ---------------------------------------------------------------------

def relu_args(n=10, dtype=numpy.float32):
    return numpy.zeros(n, dtype), numpy.zeros(n, dtype), numpy.int32(n)


def launch_relu(args):
    get_kernel("activation", "relu_forward", numpy.float32)((1,), (256,), args)


def test_launch_rejects_a_non_contiguous_array():
    x, y, n = relu_args(20)
    with pytest.raises(ValueError, match="'x'.*not C-contiguous.*ascontiguousarray"):
        launch_relu((x[::2], y[:10], numpy.int32(10)))
    square = numpy.zeros((4, 4), numpy.float32)
    with pytest.raises(ValueError, match="not C-contiguous"):
        launch_relu((square.T, numpy.zeros((4, 4), numpy.float32), numpy.int32(16)))


@pytest.mark.parametrize("scalar", [10, 10.0, numpy.int64(10), numpy.uint32(10)],
                         ids=["int", "float", "int64", "uint32"])
def test_launch_rejects_a_scalar_of_the_wrong_type(scalar):
    x, y, _ = relu_args()
    with pytest.raises(TypeError, match=r"'n' \(int n\) must be numpy.int32"):
        launch_relu((x, y, scalar))


def test_launch_rejects_a_float_scalar_of_the_other_precision():
    logits = numpy.zeros((1, 1, 2, 2), numpy.float32)
    kernel = get_kernel("sigmoid_bce", "sigmoid_bce_backward", numpy.float32)
    args = (logits, logits, None, numpy.ones(2, numpy.float32), numpy.float64(1.0), numpy.empty_like(logits),
            numpy.int32(4))
    with pytest.raises(TypeError, match=r"'scale' \(scalar_t scale\) must be numpy.float32, got numpy.float64"):
        kernel((1,), (256,), args)


def test_launch_rejects_the_wrong_dtype():
    x, y, n = relu_args(dtype=numpy.float64)
    with pytest.raises(TypeError, match="'x'.*must have dtype float32, got float64"):
        launch_relu((x, y, n))
    logits = numpy.zeros((1, 2, 2, 2), numpy.float32)
    targets = numpy.zeros((1, 2, 2), numpy.int32)  # the kernel reads int64 labels
    kernel = get_kernel("softmax_cross_entropy", "softmax_cross_entropy_forward", numpy.float32)
    with pytest.raises(TypeError, match="'targets'.*must have dtype int64, got int32"):
        kernel((1,), (256,), (logits, targets, None, None, numpy.empty((2, 4), numpy.float32),
                              numpy.int32(1), numpy.int32(2), numpy.int32(4), numpy.int32(-100)))


def test_launch_rejects_none_where_the_kernel_does_not_handle_it():
    _, y, n = relu_args()
    with pytest.raises(TypeError, match="'x'.*None.*nullptr"):
        launch_relu((None, y, n))
    # batch_norm_forward tests xhat against nullptr; the backward kernels of the same source read it always
    forward, backward = (get_kernel("batch_norm", name, numpy.float32) for name in ("batch_norm_forward",
                                                                                     "batch_norm_backward"))
    assert [p.nullable for p in forward.parameters if p.name == "xhat"] == [True]
    channels, pixels = 2, 4
    dy = numpy.ones((1, channels, pixels), numpy.float32)
    per_channel = numpy.ones(channels, numpy.float32)
    with pytest.raises(TypeError, match="'xhat'.*None.*nullptr"):
        backward((1,), (256,), (dy, None, numpy.zeros(2 * channels, numpy.float32), per_channel, per_channel,
                                numpy.empty_like(dy), numpy.int32(channels), numpy.int32(pixels), numpy.int32(pixels),
                                numpy.int32(dy.size), numpy.float32(1e-5)))


def test_launch_rejects_a_wrong_argument_count_and_bad_geometry():
    x, y, n = relu_args()
    with pytest.raises(TypeError, match=r"takes 3 arguments \(const scalar_t\* x, scalar_t\* y, int n\), got 2"):
        launch_relu((x, y))
    kernel = get_kernel("activation", "relu_forward", numpy.float32)
    with pytest.raises(ValueError, match="more than 1024 threads"):
        kernel((1,), (64, 32), (x, y, n))
    with pytest.raises(ValueError, match="out of range"):
        kernel((0,), (256,), (x, y, n))


def test_launch_rejects_a_read_only_output():
    x, y, n = relu_args()
    y.flags.writeable = False
    with pytest.raises(ValueError, match="'y'.*read-only"):
        launch_relu((x, y, n))
    x.flags.writeable = False  # a read-only *input* is fine
    launch_relu((x, numpy.zeros(10, numpy.float32), n))


def test_get_kernel_rejects_unknown_names_and_dtypes():
    with pytest.raises(ValueError, match="no kernel 'relu'.*relu_forward"):
        get_kernel("activation", "relu", numpy.float32)
    with pytest.raises(ValueError, match="no kernel source 'convolution'.*im2col"):
        get_kernel("convolution", "im2col", numpy.float32)
    with pytest.raises(TypeError, match="unsupported dtype float16"):
        get_kernel("activation", "relu_forward", numpy.float16)


def test_an_nvrtc_error_names_the_kernel_and_shows_the_log(monkeypatch):
    """The GPU branch without a GPU: CuPy's compile error is replaced by one naming the kernel."""
    compiler = pytest.importorskip("cupy.cuda.compiler")
    from minirnng.cuda import KernelCompileError, launch

    def failing_compile(*args):
        raise compiler.CompileException("error: identifier \"undefined_name\" is undefined", "", "k", ())
    monkeypatch.setattr(launch, "_gpu_function", failing_compile)
    monkeypatch.setattr(launch.Kernel, "_check_arguments", lambda self, args: True)  # as if on the GPU
    with pytest.raises(KernelCompileError, match=r"kernel relu_forward in .*activation.cu does not compile "
                                                 r"for float32(.|\n)*undefined_name"):
        launch_relu(relu_args())


# ---- the emulator itself ---------------------------------------------------------------------------------

@pytest.fixture
def scratch_kernels(tmp_path, monkeypatch):
    """A kernel directory and an emulator cache of this test's own; returns a function that writes a
    source (under a fresh name, since sources are cached by name) and returns that name."""
    monkeypatch.setattr(sources, "KERNEL_DIRECTORY", tmp_path)
    monkeypatch.setenv("MINIRNNG_CACHE_DIR", str(tmp_path / "cache"))

    def write(text):
        name = f"scratch_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.cu").write_text(text)
        return name
    return write


def test_printf_in_a_kernel_prints_in_thread_order(scratch_kernels, capfd):
    name = scratch_kernels(r'''
extern "C" __global__ void hello(const int* __restrict__ values, int* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    printf("block %d thread %d value %d\n", (int)blockIdx.x, (int)threadIdx.x, values[i]);
    out[i] = 2 * values[i];
}
''')
    values = numpy.arange(5, dtype=numpy.int32)
    in_order = [f"block {i // 2} thread {i % 2} value {i}" for i in range(5)]
    for order, expected in (("forward", in_order), ("reverse", in_order[::-1])):
        out = numpy.zeros(5, numpy.int32)
        with emulator.thread_order(order):
            get_kernel(name, "hello", numpy.float32)((3,), (2,), (values, out, numpy.int32(5)))
        assert capfd.readouterr().out.splitlines() == expected, order
        numpy.testing.assert_array_equal(out, 2 * values)
    with pytest.raises(ValueError, match="one of forward, reverse, got 'sideways'"):
        with emulator.thread_order("sideways"):
            pass


def test_a_compile_error_shows_the_compiler_log(scratch_kernels):
    name = scratch_kernels('extern "C" __global__ void broken(scalar_t* y, int n) { y[0] = undefined_name; }\n')
    with pytest.raises(emulator.EmulatorError, match=rf"could not compile {name}.cu(.|\n)*undefined_name"):
        get_kernel(name, "broken", numpy.float32)((1,), (1,), (numpy.zeros(1, numpy.float32), numpy.int32(1)))


def test_shared_memory_is_a_clear_compile_error(scratch_kernels):
    name = scratch_kernels('extern "C" __global__ void tiled(scalar_t* y, int n) {\n'
                           '    __shared__ scalar_t tile[32];\n    tile[0] = 0; y[0] = tile[0];\n}\n')
    with pytest.raises(emulator.EmulatorError, match="no __shared__ memory"):
        get_kernel(name, "tiled", numpy.float64)((1,), (1,), (numpy.zeros(1), numpy.int32(1)))


def test_a_missing_compiler_names_the_fix(scratch_kernels, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    name = scratch_kernels('extern "C" __global__ void noop(scalar_t* y, int n) { }\n')
    with pytest.raises(emulator.EmulatorError, match="needs a C\\+\\+ compiler.*apt-get install g\\+\\+"):
        get_kernel(name, "noop", numpy.float32)((1,), (1,), (numpy.zeros(1, numpy.float32), numpy.int32(1)))


def test_the_compiled_library_is_cached_on_disk(scratch_kernels, monkeypatch):
    name = scratch_kernels('extern "C" __global__ void noop(scalar_t* y, int n) { }\n')
    first = emulator._library_path(name, numpy.dtype(numpy.float32))
    assert first.exists() and first.parent == emulator.cache_directory()

    def no_compiling(*args, **kwargs):
        raise AssertionError("the compiler ran again although the cache has the library")
    monkeypatch.setattr(emulator.subprocess, "run", no_compiling)
    assert emulator._library_path(name, numpy.dtype(numpy.float32)) == first


def test_an_edited_kernel_runs_in_the_same_process_after_reload_kernels(scratch_kernels, tmp_path):
    from minirnng.cuda import reload_kernels

    body = 'extern "C" __global__ void fill(int* __restrict__ out, int n) {{\n' \
           '    const int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) out[i] = {};\n}}\n'
    name = scratch_kernels(body.format(1))
    out = numpy.zeros(3, numpy.int32)
    get_kernel(name, "fill", numpy.float32)((1,), (4,), (out, numpy.int32(3)))
    (tmp_path / f"{name}.cu").write_text(body.format(42))  # edited while the process runs
    get_kernel(name, "fill", numpy.float32)((1,), (4,), (out, numpy.int32(3)))
    assert out.tolist() == [1, 1, 1]  # read once per process ...
    reload_kernels()
    get_kernel(name, "fill", numpy.float32)((1,), (4,), (out, numpy.int32(3)))
    assert out.tolist() == [42, 42, 42]  # ... until asked to read it again


def test_element_counts_beyond_int32_are_a_clear_error():
    from minirnng.cuda.launch import MAX_ELEMENTS, element_count

    assert element_count(MAX_ELEMENTS) == MAX_ELEMENTS
    with pytest.raises(ValueError, match="2147483648 elements is too large for the kernels, which index with int32"):
        element_count(MAX_ELEMENTS + 1)


def test_strided_taps_lists_exactly_the_taps_that_reach_a_position(scratch_kernels, tmp_path):
    """strided_taps.cuh (col2im's and the transposed convolution's walk), pasted into a source by
    ``#include``, against every tap tried one by one, for all small windows, strides and paddings."""
    shutil.copy(SHIPPED_KERNELS / "strided_taps.cuh", tmp_path)
    name = scratch_kernels('#include "strided_taps.cuh"\n' + r'''
extern "C" __global__ void taps_of(const int* __restrict__ cases, int* __restrict__ out, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const StridedTaps taps = strided_taps(cases[4 * t], cases[4 * t + 1], cases[4 * t + 2], cases[4 * t + 3]);
    out[3 * t] = taps.first_tap;
    out[3 * t + 1] = taps.first_window;
    out[3 * t + 2] = taps.count;
}
''')
    cases_, expected = [], []
    for k in range(1, 7):
        for s in range(1, 4):
            for p in range(0, k):
                for windows in range(1, 6):
                    for y in range(0, (windows - 1) * s + k - 2 * p + 1):
                        reaching = [(i, (y + p - i) // s) for i in range(k)
                                    if (y + p - i) % s == 0 and 0 <= (y + p - i) // s < windows]
                        cases_.append((y + p, k, s, windows))
                        expected.append(reaching)
    cases_ = numpy.array(cases_, dtype=numpy.int32)
    out = numpy.zeros((len(cases_), 3), numpy.int32)
    get_kernel(name, "taps_of", numpy.float32)(((len(cases_) + 127) // 128,), (128,),
                                               (cases_, out, numpy.int32(len(cases_))))
    for (first_tap, first_window, count), reaching, case in zip(out, expected, cases_):
        s = case[2]
        walked = [(first_tap + a * s, first_window - a) for a in range(count)]
        assert walked == reaching, f"yp, k, s, windows = {tuple(case)}"


def test_a_missing_header_is_a_clear_error(scratch_kernels):
    name = scratch_kernels('#include "no_such_header.cuh"\nextern "C" __global__ void noop(scalar_t* y, int n) { }\n')
    with pytest.raises(ValueError, match="includes 'no_such_header.cuh', which is not in"):
        sources.read_source(name)


def test_an_emulator_error_is_a_backend_error_the_command_line_prints_in_one_line():
    from minirnng.backend import BackendError
    from minirnng.cuda.emulator import EmulatorError

    assert issubclass(EmulatorError, BackendError)


def test_the_thread_order_comes_from_the_environment_and_a_wrong_one_is_named(monkeypatch):
    monkeypatch.setattr(emulator, "_order", None)
    monkeypatch.setenv("MINIRNNG_EMULATOR_ORDER", "reverse")
    assert emulator.current_thread_order() == "reverse"
    monkeypatch.setattr(emulator, "_order", None)
    monkeypatch.setenv("MINIRNNG_EMULATOR_ORDER", "sideways")
    with pytest.raises(emulator.EmulatorError, match="MINIRNNG_EMULATOR_ORDER must be one of forward, reverse"):
        emulator.current_thread_order()


def test_an_element_a_kernel_leaves_unwritten_shows_as_nan(scratch_kernels):
    # what the poisoned allocations of these tests are for: a bounds check one element too strict
    name = scratch_kernels('extern "C" __global__ void short_by_one(const scalar_t* x, scalar_t* y, int n) {\n'
                           '    const int i = blockIdx.x * blockDim.x + threadIdx.x;\n'
                           '    if (i >= n - 1) return;\n    y[i] = x[i];\n}\n')
    x = numpy.arange(5, dtype=numpy.float32)
    y = numpy.empty_like(x)
    get_kernel(name, "short_by_one", numpy.float32)((1,), (8,), (x, y, numpy.int32(5)))
    numpy.testing.assert_array_equal(y, [0, 1, 2, 3, numpy.nan])
    assert (numpy.empty(3, numpy.int8) == 127).all() and numpy.empty(2, bool).all()


def test_a_kernel_kept_across_reload_kernels_checks_against_the_new_signature(scratch_kernels, tmp_path):
    from minirnng.cuda import reload_kernels

    body = 'extern "C" __global__ void fill({} out, int n) {{\n' \
           '    const int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) out[i] = 42;\n}}\n'
    name = scratch_kernels(body.format("int*"))
    kept = get_kernel(name, "fill", numpy.float32)  # as notebook 08 keeps it while its source is edited
    (tmp_path / f"{name}.cu").write_text(body.format("long long*"))
    reload_kernels()
    room = numpy.zeros(8, numpy.int32)
    with pytest.raises(TypeError, match="'out' .* must have dtype int64, got int32"):
        kept((1,), (4,), (room[:4], numpy.int32(4)))  # the new kernel would write 8 int32s' worth
    assert (room == 0).all()


def test_signatures_are_read_as_written(scratch_kernels):
    from minirnng.cuda import sources

    name = scratch_kernels(r'''
__device__ float scaled(const float* shift, int i) { return shift == nullptr ? 0.0f : shift[i]; }
__device__ float plain(const float* bias, int i) { return bias[i]; }
extern "C" __global__ void uses(const float* bias, const float* shift, scalar_t* const out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    printf("} // a brace and a comment in a string\n");
    out[i] = plain(bias, i) + scaled(shift, i);
}
extern "C" __global__ void nothing(void) {}
''')
    kernel = sources.kernels(name)["uses"]
    by_name = {p.name: p for p in kernel.parameters}
    # shift is tested in the helper it is passed to (whose parameter has another name); bias is not,
    # though a helper's parameter of that name is; a const pointer to data the kernel writes is not const data
    assert by_name["shift"].nullable and not by_name["bias"].nullable
    assert not by_name["out"].const and by_name["bias"].const
    assert sources.kernels(name)["nothing"].parameters == ()
    read_only = numpy.zeros(4, numpy.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="'out' .* is written by the kernel but the array is read-only"):
        get_kernel(name, "uses", numpy.float32)((1,), (4,), (numpy.ones(4, numpy.float32), None, read_only,
                                                           numpy.int32(4)))
    for declaration, message in (("const float** rows", "pointer to pointers"),):
        bad = scratch_kernels(f'extern "C" __global__ void k({declaration}, int n) {{}}\n')
        with pytest.raises(ValueError, match=message):
            sources.kernels(bad)
    prototype = scratch_kernels('extern "C" __global__ void k(int n);\nextern "C" __global__ void k(int n) {}\n')
    assert list(sources.kernels(prototype)) == ["k"]  # a declaration before the definition is no second kernel
    hidden = scratch_kernels('extern "C" { __global__ void k(int n) {} }\n')
    with pytest.raises(ValueError, match="declares 1 __global__ kernel.*of which 0"):
        sources.kernels(hidden)
    # what the preprocessor drops is not read: an old version of a kernel turned off with #if 0
    # (nested conditionals, #elif and #else included); a condition it cannot decide is read as taken
    switched = scratch_kernels(
        '#if 0\nextern "C" __global__ void k(float* old, int n) {}\n#if 1\n#endif\n'
        '#elif 1\nextern "C" __global__ void k(double* out, int n) {}\n'
        '#else\nextern "C" __global__ void k(int* other, int n) {}\n#endif\n'
        '#if (1)\n#else\nextern "C" __global__ void gone(int n) {}\n#endif\n'
        '#ifdef __CUDACC__\nextern "C" __global__ void kept(int n) {}\n#endif\n')
    found = sources.kernels(switched)
    assert sorted(found) == ["k", "kept"] and [p.name for p in found["k"].parameters] == ["out", "n"]


def test_launch_arguments_that_would_fault_or_mislead_are_named():
    raw = numpy.zeros(4 * 5 + 1, numpy.uint8)
    misaligned = raw[1:].view(numpy.float32)
    kernel = get_kernel("activation", "relu_forward", numpy.float32)
    with pytest.raises(ValueError, match="'x' .* is not aligned to its element size"):
        kernel((1,), (32,), (misaligned, numpy.zeros(5, numpy.float32), numpy.int32(5)))
    with pytest.raises(TypeError, match="other byte order"):
        kernel((1,), (32,), (numpy.zeros(5, ">f4"), numpy.zeros(5, numpy.float32), numpy.int32(5)))
    with pytest.raises(TypeError, match="grid must be a tuple of 1 to 3 ints, got 2.0"):
        kernel(2.0, (32,), (numpy.zeros(5, numpy.float32), numpy.zeros(5, numpy.float32), numpy.int32(5)))
    with pytest.raises(TypeError, match="give the dtype .* not an array"):
        get_kernel("activation", "relu_forward", numpy.zeros(3, numpy.float32))
    from minirnng.cuda import scan_geometry
    for bad in (-2, 2.5, True):
        with pytest.raises(ValueError, match="scan_geometry: height must be a whole number of pixels"):
            scan_geometry("left_to_right", bad, 3)
