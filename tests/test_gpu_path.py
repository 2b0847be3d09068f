"""Every layer, loss and model on the kernel path, run on the CPU by the CUDA emulator, against the
NumPy path; and the errors the kernel path gives for bad input.

The emulator runs the layers' GPU code (``forward_gpu`` / ``backward_gpu``: the same launches,
grids and argument types as on a GPU) on NumPy arrays. Tolerance: 1e-6 (float32) and 1e-12
(float64) of the largest magnitude of the NumPy path's result, for every output, input gradient and
parameter gradient; whole models in float32 to 1e-5 (see gpu_path_cases.model_tolerance).
tests/test_cuda_gpu.py runs the same cases on a real GPU.
"""

import numpy
import pytest

import gpu_path_cases as cases
from cuda_cases import assert_close, normal
from minirnng import backend
from minirnng.cuda import emulator, launch
from minirnng.layers import Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sigmoid
from minirnng.layers.recurrent import FourWayGatedRNN, GatedSpatialRNN
from minirnng.losses import ColourAffinity, SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy
from minirnng.models import RNNG
from minirnng.models.baselines import CNNCRF, CNNS, CNNDeep, PlainRNN

# every output allocated here starts as NaN: an element that a kernel does not write shows (conftest)
pytestmark = pytest.mark.usefixtures("poisoned_allocations")
DEVICE = "cuda-emulator"
DTYPES = [pytest.param(numpy.float32, id="float32"), pytest.param(numpy.float64, id="float64")]
MODELS = [RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF]


# ---- layers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, build, inputs, prepare", cases.LAYER_CASES, ids=[c[0] for c in cases.LAYER_CASES])
def test_layer_on_the_emulator_matches_the_numpy_path(name, build, inputs, prepare, dtype):
    cases.compare_layer(DEVICE, build, inputs, prepare, dtype)


def test_conv_without_input_gradient_returns_none_on_the_kernel_path():
    layer = Conv2d(3, 4, 3, padding=1, rng=0)
    layer.needs_input_grad = False
    x = numpy.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(numpy.float32)
    with backend.use(DEVICE):
        y = layer.forward(x)
        assert layer.backward(numpy.ones_like(y)) is None
    assert layer.grads["weight"].any()


@pytest.mark.parametrize("make_layer, inputs", [
    (lambda: Conv2d(3, 4, 3, padding=1, rng=0), 1),
    (lambda: ConvTranspose2d(3, 2, 4, stride=2, padding=1, rng=0), 1),
    (lambda: FourWayGatedRNN(3), 2),
], ids=["Conv2d", "ConvTranspose2d", "FourWayGatedRNN"])
def test_parameter_gradients_accumulate_on_the_kernel_path(make_layer, inputs):
    """Two backward passes add up, as on the NumPy path (and the four-way layer's stacked
    gradients are the four directions' own)."""
    layer = make_layer()
    rng = numpy.random.default_rng(1)
    arrays = [normal(rng, (2, 3, 5, 4), numpy.float32) for _ in range(inputs)]
    with backend.use(DEVICE):
        y = layer.forward(*arrays)
        upstream = normal(rng, y.shape, numpy.float32)
        layer.backward(upstream)
        once = {name: grad.copy() for name, grad in layer.grads.items()}
        layer.backward(upstream)
    for name, grad in layer.grads.items():
        assert_close(grad, 2 * once[name])


def test_four_way_parameters_are_views_of_the_stacked_arrays():
    """An in-place update of one direction's W (optimizer, stability rule, checkpoint) reaches the
    (4, C, C) array that the single launch of the four scans reads."""
    layer = FourWayGatedRNN(3)
    layer.params["top_to_bottom.W"][...] = 0.25
    assert (layer.stacked_params["W"][2] == 0.25).all()
    assert layer.direction_layers["top_to_bottom"].params["W"].base is layer.stacked_params["W"]
    layer.stacked_grads["b"] += 1.0
    assert (layer.grads["bottom_to_top.b"] == 1.0).all()


def test_a_four_way_layer_whose_stacks_were_unlinked_refuses_the_kernel_path():
    """A deep copy copies the views as separate arrays: the kernels would read stale weights."""
    import copy
    layer = copy.deepcopy(FourWayGatedRNN(2))
    x = numpy.zeros((1, 2, 3, 3), numpy.float32)
    with backend.use(DEVICE), pytest.raises(RuntimeError, match="no longer a view.*deep-copied.*load_params"):
        layer.forward(x, x)


# ---- losses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-pixels", "masked"])
@pytest.mark.parametrize("settings", cases.CROSS_ENTROPY_SETTINGS,
                         ids=["plain", "class-weights", "ignore-index", "weights-and-ignore"])
def test_softmax_cross_entropy_on_the_emulator_matches_the_numpy_path(settings, masked, dtype):
    rng = numpy.random.default_rng(2)
    arguments = cases.cross_entropy_arguments(rng, dtype, settings, masked)
    cases.compare_loss(DEVICE, lambda: SoftmaxCrossEntropy(**settings), arguments)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-pixels", "masked"])
def test_sigmoid_bce_on_the_emulator_matches_the_numpy_path(masked, dtype):
    rng = numpy.random.default_rng(3)
    cases.compare_loss(DEVICE, SigmoidBinaryCrossEntropy, cases.binary_arguments(rng, dtype, masked))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-pixels", "masked"])
@pytest.mark.parametrize("settings", [{}, {"ignore_index": 255, "smooth": 0.5}], ids=["plain", "ignore-index"])
def test_soft_dice_on_the_emulator_matches_the_numpy_path(settings, masked, dtype):
    rng = numpy.random.default_rng(5)
    arguments = cases.cross_entropy_arguments(rng, dtype, settings, masked)
    cases.compare_loss(DEVICE, lambda: SoftDice(**settings), arguments)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logit_scale", [2.0, 30.0], ids=["moderate", "confident"])
def test_colour_affinity_on_the_emulator_matches_the_numpy_path(logit_scale, dtype):
    rng = numpy.random.default_rng(6)
    logits = normal(rng, (2, 3, 7, 9), dtype, logit_scale)
    images = (rng.uniform(-0.5, 0.5, (2, 3, 7, 9)) * 0.3).astype(dtype)
    cases.compare_loss(DEVICE, lambda: ColourAffinity(s_xy=1.2, s_rgb=0.08), (logits, images))


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_agree_for_huge_logits_and_confident_pixels(dtype):
    """Logits of +-30 (float32 softmax and sigmoid round to exactly 1 there): both paths compute the
    target's gradient without cancellation, so they agree on the tiny gradients too."""
    rng = numpy.random.default_rng(4)
    arguments = cases.cross_entropy_arguments(rng, dtype, {}, masked=False, logit_scale=30.0)
    cases.compare_loss(DEVICE, SoftmaxCrossEntropy, arguments)
    cases.compare_loss(DEVICE, SoftDice, arguments)
    cases.compare_loss(DEVICE, SigmoidBinaryCrossEntropy, cases.binary_arguments(rng, dtype, False, logit_scale=30.0))


@pytest.mark.parametrize("logit", [12.0, 20.0])
def test_confident_softmax_keeps_its_gradient_in_float32(logit):
    """p_t - 1 in float32 is 1% off for logits (12, 0, 0) and 0 for (20, 0, 0); minus the sum of
    the other probabilities is right to float32's precision on both paths."""
    logits = numpy.array([logit, 0.0, 0.0], dtype=numpy.float32).reshape(1, 3, 1, 1)
    target = numpy.zeros((1, 1, 1), dtype=numpy.int64)
    expected = -2 * numpy.exp(-logit) / (1 + 2 * numpy.exp(-logit))
    for device in ("numpy", DEVICE):
        loss = SoftmaxCrossEntropy()
        with backend.use(device):
            loss.forward(logits, target)
            assert loss.backward()[0, 0, 0, 0] == pytest.approx(expected, rel=1e-6)


def test_confident_sigmoid_keeps_its_gradient_in_float32():
    """sigmoid(20) - 1 is 0 in float32; written as -e/(1+e), e = exp(-20), it is right on both paths."""
    logits = numpy.full((1, 1, 1, 1), 20.0, dtype=numpy.float32)
    for device in ("numpy", DEVICE):
        loss = SigmoidBinaryCrossEntropy()
        with backend.use(device):
            loss.forward(logits, numpy.ones_like(logits))
            assert loss.backward()[0, 0, 0, 0] == pytest.approx(-1 / (1 + numpy.exp(20.0)), rel=1e-6)


def test_losses_with_no_pixel_used_are_zero_on_the_kernel_path():
    logits = numpy.ones((1, 3, 2, 2), numpy.float32)
    with backend.use(DEVICE):
        loss = SoftmaxCrossEntropy()
        assert loss.forward(logits, numpy.zeros((1, 2, 2), int), mask=numpy.zeros((1, 2, 2), bool)) == 0.0
        assert not loss.backward().any()
        bce = SigmoidBinaryCrossEntropy()
        assert bce.forward(logits[:, :1], numpy.ones((1, 1, 2, 2), numpy.float32),
                           mask=numpy.zeros((1, 1, 2, 2), bool)) == 0.0
        assert not bce.backward().any()
        dice = SoftDice()
        assert dice.forward(logits, numpy.zeros((1, 2, 2), int), mask=numpy.zeros((1, 2, 2), bool)) == 0.0
        assert not dice.backward().any()


# ---- models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_class", MODELS, ids=[m.__name__ for m in MODELS])
def test_model_on_the_emulator_matches_the_numpy_path(model_class, dtype):
    cases.compare_model(DEVICE, model_class, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_on_the_emulator_matches_the_numpy_path(dtype):
    """Objective (boundary target and sampling, class weights), backward, Adam, the stability rule."""
    cases.compare_training_step(DEVICE, RNNG, dtype)


@pytest.mark.parametrize("model_class", [RNNG, CNNS, CNNDeep, PlainRNN], ids=lambda m: m.__name__)
def test_infer_on_the_emulator_gives_the_logits_of_forward(model_class):
    model = model_class(n_classes=3, rng=0)
    model.randomize_recurrence(1)
    images = numpy.random.default_rng(2).standard_normal((2, 3, 16, 12)).astype(numpy.float32)
    with backend.use(DEVICE):
        logits = model.forward(images)["logits"]
        numpy.testing.assert_array_equal(model.infer(images), logits)
        numpy.testing.assert_array_equal(model.predict(images), logits.argmax(axis=1))


@pytest.mark.parametrize("algorithm", ["im2col", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_infer_with_a_fused_relu_on_the_emulator(algorithm, dtype):
    rng = numpy.random.default_rng(4)
    conv = Conv2d(3, 5, 3, padding=1, rng=1, dtype=dtype)
    conv.gpu_algorithm = algorithm
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    with backend.use(DEVICE):
        y = conv.forward(x)
        numpy.testing.assert_array_equal(conv.infer(x), y)
        relu = conv.infer(x, relu=True)
    numpy.testing.assert_array_equal(relu, numpy.maximum(y, 0))
    assert (y < 0).any() and (relu == 0).any()


def test_stage2_infer_on_the_emulator_gives_the_logits_of_forward():
    from minirnng.models.stage2 import EyeBrowNet

    network = EyeBrowNet(rng=3)
    crops = numpy.random.default_rng(5).standard_normal((2, 3) + network.input_size).astype(numpy.float32)
    with backend.use(DEVICE):
        numpy.testing.assert_array_equal(network.infer(crops), network.forward(crops)["logits"])


def count_launches(monkeypatch):
    """Record the name of every kernel launched from now on."""
    launched = []
    original = launch.Kernel.__call__

    def counting(self, grid, block, args):
        launched.append(self.name)
        return original(self, grid, block, args)
    monkeypatch.setattr(launch.Kernel, "__call__", counting)
    return launched


@pytest.mark.parametrize("algorithm", ["im2col", "direct"])
def test_kernel_launches_of_an_rnng_forward_and_backward(monkeypatch, algorithm):
    """The launch counts docs/kernels.md quotes (our kernels only; cuBLAS products and CuPy's own
    copies and additions come on top): they decide the latency at batch 1, where every launch
    costs more than the work it does.

    Forward through im2col, 19: conv1, conv3, conv5 im2col + bias_add (6), three ReLUs, two
    poolings, deconv6 and deconv9 col2im with their bias (2), the gate's sigmoid, the four scans and
    the merge (2), and bias_add alone for the three 1x1 convolutions (3). Forward by the direct
    kernels (small batches), 16: one launch for each of the 8 convolutions and no cuBLAS product.
    Backward without the image gradient, 32 either way: channel_sum (2 launches) for each of the 8
    biases and for the recurrent db (18), im2col for the two transposed convolutions (2), col2im for
    conv3 and conv5 (2), the merge, the scans and two sums over the directions (4), three ReLUs, the
    sigmoid and two poolings (6); after a direct forward, conv1, conv3 and conv5 unfold their input
    again (3 more im2col, 35). ``infer`` (and so ``predict``) skips the coarse and edge heads, and with the direct kernels
    fuses the three ReLUs into the convolutions: 17 and 11.
    """
    model = RNNG(n_classes=3, rng=0)
    for layer in model.layers.values():
        if hasattr(layer, "gpu_algorithm"):
            layer.gpu_algorithm = algorithm
    images = numpy.zeros((1, 3, 16, 16), numpy.float32)
    with backend.use(DEVICE):
        launched = count_launches(monkeypatch)
        outputs = model.forward(images)
        forward = list(launched)
        launched.clear()
        model.backward({name: numpy.ones_like(value) for name, value in outputs.items()}, input_gradient=False)
        backward = list(launched)
        launched.clear()
        model.infer(images)
        inference = list(launched)
    # inference skips the coarse and edge heads (the last two launches), and the direct kernels
    # apply the three ReLUs as they write
    fused = [name for name in forward[:-2] if algorithm == "im2col" or name != "relu_forward"]
    assert sorted(inference) == sorted(fused), (inference, forward)
    assert len(inference) == (17 if algorithm == "im2col" else 11)
    if algorithm == "im2col":
        assert len(forward) == 19, forward
        assert forward.count("im2col") == 3 and "channel_sum_partial" not in forward
        assert len(backward) == 32, backward
    else:
        assert len(forward) == 16, forward
        assert forward.count("conv2d_direct") == 6 and forward.count("conv_transpose2d_direct") == 2
        assert len(backward) == 35, backward


def test_multiply_adds_count_the_taps_that_meet_an_input():
    """The work the direct-or-im2col rule weighs (the figures of docs/benchmarks.md)."""
    assert Conv2d(3, 16, 5, padding=2).multiply_adds((1, 16, 128, 128)) == 128 * 128 * 16 * 3 * 25
    # a 4x4 transposed convolution of stride 2: each output value meets 2 x 2 taps per channel
    assert ConvTranspose2d(32, 16, 4, stride=2, padding=1).multiply_adds((1, 16, 64, 64)) == 64 * 64 * 16 * 32 * 4


def test_a_small_batch_takes_the_direct_kernels_and_a_large_one_im2col(monkeypatch):
    from minirnng.layers import conv
    layer = Conv2d(3, 4, 3, padding=1, rng=0)
    small = numpy.zeros((1, 3, 8, 8), numpy.float32)
    with backend.use(DEVICE):
        launched = count_launches(monkeypatch)
        monkeypatch.setattr(conv, "DIRECT_MAX_MULTIPLY_ADDS", 2 * 64 * 4 * 27)
        layer.forward(small)  # 64 pixels x 4 channels x 27 multiply-adds
        assert launched == ["conv2d_direct"]
        launched.clear()
        layer.forward(numpy.zeros((3, 3, 8, 8), numpy.float32))  # three images: above the bound
        assert launched == ["im2col", "bias_add"]
        layer.gpu_algorithm = "fastest"
        with pytest.raises(ValueError, match="gpu_algorithm must be one of auto, direct, im2col"):
            layer.forward(small)


# ---- finite differences on the kernel path --------------------------------------------------------------

@pytest.mark.parametrize("name, build, inputs, prepare", cases.GRADIENT_CASES, ids=[c[0] for c in cases.GRADIENT_CASES])
def test_layer_gradients_on_the_emulator_match_finite_differences(name, build, inputs, prepare):
    report = cases.check_gradients(DEVICE, build, inputs, prepare)
    assert report.max_error < 1e-7, str(report)


def test_loss_and_model_gradients_on_the_emulator_match_finite_differences():
    for report in cases.check_loss_gradients(DEVICE):
        assert report.max_error < 1e-7, str(report)
    report = cases.check_model_gradients(DEVICE, RNNG)
    assert report.max_error < 1e-6, str(report)


# ---- bad input ------------------------------------------------------------------------------------------

class FakeCupyArray(numpy.ndarray):
    """A NumPy array that minirnng's device checks take for a CuPy array (its class says it is from
    the cupy package): the wrong-device errors, tested without a GPU."""


FakeCupyArray.__module__ = "cupy"


def on_the_gpu(array):
    return numpy.asarray(array).view(FakeCupyArray)


def test_an_input_on_the_wrong_device_is_refused_with_the_fix():
    layer = Conv2d(3, 4, 3, rng=0)
    with backend.use(DEVICE), pytest.raises(ValueError, match="wrong device.*host \\(NumPy\\).*to_device"):
        layer.forward(on_the_gpu(numpy.zeros((1, 3, 5, 5), numpy.float32)))
    rnn = GatedSpatialRNN(2, "left_to_right")
    x = numpy.zeros((1, 2, 3, 3), numpy.float32)
    with backend.use(DEVICE), pytest.raises(ValueError, match="g is on the wrong device"):
        rnn.forward(x, on_the_gpu(x))


def test_a_loss_target_on_the_wrong_device_is_refused_with_the_fix():
    logits = numpy.zeros((1, 3, 2, 2), numpy.float32)
    with backend.use(DEVICE), pytest.raises(ValueError, match="target is on the wrong device.*to_device"):
        SoftmaxCrossEntropy().forward(logits, on_the_gpu(numpy.zeros((1, 2, 2), numpy.int64)))
    with backend.use(DEVICE), pytest.raises(ValueError, match="mask is on the wrong device"):
        SigmoidBinaryCrossEntropy().forward(logits[:, :1], numpy.ones((1, 1, 2, 2), numpy.float32),
                                            on_the_gpu(numpy.ones((1, 1, 2, 2), bool)))


def test_a_backward_on_another_path_than_its_forward_is_refused():
    """The paths keep different caches (ReLU: a mask or the output): mixing them must not pass silently."""
    layer = ReLU()
    x = numpy.array([-1.0, 2.0], numpy.float32)
    with backend.use(DEVICE):
        layer.forward(x)
    with backend.use("numpy"), pytest.raises(ValueError, match="forward pass ran on the kernel.*same backend"):
        layer.backward(numpy.ones(2, numpy.float32))


@pytest.mark.parametrize("make_layer, shape", [
    (lambda: Conv2d(3, 4, 3, stride=2, padding=1, rng=0), (2, 3, 7, 6)),
    (lambda: ConvTranspose2d(3, 2, 4, stride=2, padding=1, rng=0), (2, 3, 5, 4)),
    (lambda: MaxPool2d(2), (2, 3, 7, 6)),
    (lambda: Sigmoid(), (2, 3, 7, 6)),
], ids=["Conv2d", "ConvTranspose2d", "MaxPool2d", "Sigmoid"])
def test_non_contiguous_inputs_and_gradients_are_made_contiguous(make_layer, shape):
    """Transposed and strided views give what their contiguous copies give (the kernels index raw
    buffers; the layer copies such arrays before a launch rather than misread them)."""
    rng = numpy.random.default_rng(5)
    x = normal(rng, shape[:2] + shape[2:][::-1], numpy.float32).swapaxes(2, 3)  # a transposed view
    assert not x.flags.c_contiguous
    layer = make_layer()
    with backend.use(DEVICE):
        y = layer.forward(x)
        upstream = normal(rng, (y.shape[0], y.shape[1], y.shape[2], 2 * y.shape[3]), numpy.float32)[..., ::2]
        dx = layer.backward(upstream)
        y_copy = layer.forward(numpy.ascontiguousarray(x))
        dx_copy = layer.backward(numpy.ascontiguousarray(upstream))
    numpy.testing.assert_array_equal(y, y_copy)
    numpy.testing.assert_array_equal(dx, dx_copy)


def test_non_contiguous_loss_arguments_are_made_contiguous():
    rng = numpy.random.default_rng(6)
    logits = normal(rng, (2, 3, 6, 5), numpy.float32).swapaxes(2, 3)
    target = rng.integers(0, 3, (2, 6, 5)).swapaxes(1, 2)
    mask = (rng.random((2, 6, 5)) < 0.7).swapaxes(1, 2)
    with backend.use(DEVICE):
        loss = SoftmaxCrossEntropy()
        value, grad = loss.forward(logits, target, mask), loss.backward()
        same = loss.forward(*(numpy.ascontiguousarray(a) for a in (logits, target, mask)))
        assert value == same
        numpy.testing.assert_array_equal(grad, loss.backward())


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.int32], ids=["float16", "int32"])
def test_unsupported_dtypes_are_refused_with_the_fix(dtype):
    x = numpy.zeros((1, 3, 4, 4), dtype)
    with backend.use(DEVICE):
        with pytest.raises(TypeError, match=f"has dtype {numpy.dtype(dtype).name}.*cast the input"):
            Conv2d(3, 2, 3, rng=0).forward(x)
        with pytest.raises(TypeError, match=f"unsupported dtype {numpy.dtype(dtype).name}.*float32 or float64"):
            ReLU().forward(x)
        with pytest.raises(TypeError, match="unsupported dtype"):
            SoftmaxCrossEntropy().forward(x, numpy.zeros((1, 4, 4), numpy.int64))


def test_a_pooling_window_too_large_for_the_kernel_is_refused():
    x = numpy.zeros((1, 1, 12, 12), numpy.float32)
    with backend.use("numpy"):
        MaxPool2d(12).forward(x)  # the NumPy path has no such limit
    with backend.use(DEVICE), pytest.raises(ValueError, match="int8.*at most 127.*12x12 has 144.*NumPy backend"):
        MaxPool2d(12).forward(x)


@pytest.fixture
def no_compiled_kernels(tmp_path, monkeypatch):
    """An empty emulator cache and no loaded library: the next launch must compile."""
    monkeypatch.setenv("MINIRNNG_CACHE_DIR", str(tmp_path))
    emulator._library.cache_clear()
    emulator.get_function.cache_clear()
    yield
    emulator._library.cache_clear()
    emulator.get_function.cache_clear()


def test_a_missing_compiler_is_a_clear_error_at_the_first_layer(no_compiled_kernels, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    with backend.use(DEVICE), pytest.raises(emulator.EmulatorError,
                                            match="needs a C\\+\\+ compiler.*apt-get install g\\+\\+.*"
                                                  "MINIRNNG_BACKEND=numpy"):
        ReLU().forward(numpy.zeros(3, numpy.float32))
