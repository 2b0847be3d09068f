"""The kernels on a real GPU through CuPy: the same launch code as the emulator tests
(tests/cuda_cases.py), compared with the emulator and with the NumPy references, plus finite
differences in float64 on the GPU. Then every layer, loss and model on the GPU against the NumPy
path (the cases of tests/test_gpu_path.py, from tests/gpu_path_cases.py), finite differences of
each kind of layer, the four losses and RNN-G in float64 on the GPU, and the errors for arrays on the
wrong device. Every test is marked ``gpu`` and skipped, with the reason, where CuPy is missing or
sees no GPU; CuPy itself is imported only inside the tests.
"""

import uuid

import numpy
import pytest

import cuda_cases as cases
import gpu_path_cases as path_cases
from cuda_cases import assert_close, loss_inputs, normal, scan_inputs
from minirnng import backend
from minirnng.cuda import DIRECTIONS, KernelCompileError, get_kernel, sources
from minirnng.layers import Conv2d, ReLU
from minirnng.layers.recurrent import STABILITY_RULES
from minirnng.losses import ColourAffinity, SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy
from minirnng.models import RNNG
from minirnng.models.baselines import CNNCRF, CNNS, CNNDeep, PlainRNN
from minirnng.models.stage2 import EyeBrowNet, MouthNet, NoseNet

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cupy_status()[0], reason=f"no usable GPU: {backend.cupy_status()[1]}")]

DTYPES = [pytest.param(numpy.float32, id="float32"), pytest.param(numpy.float64, id="float64")]


def _to_numpy(result):
    if isinstance(result, dict):
        return {key: _to_numpy(value) for key, value in result.items()}
    if isinstance(result, tuple):
        return tuple(_to_numpy(value) for value in result)
    return backend.to_numpy(result)


def on_gpu(function, *args, **kwargs):
    """``function`` run on CuPy copies of the NumPy arrays among its arguments; results as NumPy."""
    import cupy

    def move(value):
        return cupy.asarray(value) if isinstance(value, numpy.ndarray) else value
    with backend.use("cupy"):
        result = function(*map(move, args), **{key: move(value) for key, value in kwargs.items()})
        return _to_numpy(result)


def on_emulator(function, *args, **kwargs):
    with backend.use("cuda-emulator"):
        return _to_numpy(function(*args, **kwargs))


def assert_same(gpu, emulated):
    """GPU and emulator agree: floats within the tolerance, integers (argmax, winners) exactly."""
    if isinstance(gpu, dict):
        for key in gpu:
            assert_same(gpu[key], emulated[key])
    elif isinstance(gpu, tuple):
        for a, b in zip(gpu, emulated):
            assert_same(a, b)
    elif gpu.dtype.kind in "iu":
        numpy.testing.assert_array_equal(gpu, emulated)
    else:
        assert_close(gpu, emulated)


def kernel_cases(rng, dtype):
    """(name, function, args, kwargs) covering every kernel, with odd sizes, ties and NaNs."""
    x = normal(rng, (2, 3, 7, 6), dtype)
    ties = rng.integers(0, 4, (2, 3, 9, 8)).astype(dtype)
    directions = list(DIRECTIONS)
    scan_x, g, weight, bias = scan_inputs(rng, (2, 3, 5, 7), directions, dtype)
    h = on_emulator(cases.scan, "gated", scan_x, g, weight, bias, directions)
    tanh_h = on_emulator(cases.scan, "tanh", scan_x, g, weight, bias, directions)
    merge = rng.integers(0, 3, (4, 2, 3, 5, 7)).astype(dtype)
    logits, targets, loss_kwargs = loss_inputs(rng, {"mask": True, "class_weights": True, "ignore_index": 255}, dtype,
                                               logit_scale=30.0)
    edge_logits = normal(rng, (2, 1, 5, 7), dtype, scale=30.0)
    edge_targets = (rng.random(edge_logits.shape) < 0.5).astype(dtype)
    edge_mask = (rng.random((2, 5, 7)) < 0.6).astype(numpy.uint8)
    _, argmax = on_emulator(cases.maxpool, ties, 3, 2)
    totals = on_emulator(cases.softmax_cross_entropy, logits, targets, **loss_kwargs)
    edge_totals = on_emulator(cases.sigmoid_bce, edge_logits, edge_targets, edge_mask)
    dice_kwargs = {key: loss_kwargs[key] for key in ("mask", "ignore_index")}
    dice_totals = on_emulator(cases.soft_dice, logits, targets, **dice_kwargs)
    yield "im2col", cases.im2col, (x, 3, 2, 1), {}
    yield "col2im", cases.col2im, (normal(rng, (2, 3 * 16, 4 * 3), dtype), (2, 3, 7, 6), 4, 2, 1), {}
    yield "col2im_bias", cases.col2im, (normal(rng, (2, 3 * 16, 4 * 3), dtype), (2, 3, 7, 6), 4, 2, 1,
                                        normal(rng, (3,), dtype)), {}
    yield "conv2d_direct", cases.conv_direct, (x, normal(rng, (4, 3, 3, 3), dtype), normal(rng, (4,), dtype), 2, 1), {}
    yield ("conv2d_direct_relu", cases.conv_direct, (x, normal(rng, (4, 3, 3, 3), dtype), normal(rng, (4,), dtype), 1, 1),
           {"relu": True})
    yield "conv_transpose2d_direct", cases.conv_direct, (x, normal(rng, (3, 4, 4, 4), dtype), None, 2, 1, True), {}
    yield "bias_add", cases.bias_add, (normal(rng, (3, 5, 11), dtype), normal(rng, (5,), dtype)), {}
    yield "channel_sum", cases.channel_sum, (normal(rng, (3, 5, 1001), dtype),), {}
    yield "sum_first_axis", cases.sum_first_axis, (normal(rng, (4, 2, 3, 5), dtype),), {}
    yield "maxpool", cases.maxpool, (ties, 3, 2), {}
    yield "maxpool_backward", cases.maxpool_backward, (normal(rng, argmax.shape, dtype), argmax, ties.shape, 3, 2), {}
    for name in ("relu", "sigmoid", "tanh"):
        yield name, cases.activation, (name, normal(rng, (3, 4, 5, 7), dtype, scale=5.0)), {}
        y = on_emulator(cases.activation, name, x)
        yield f"{name}_backward", cases.activation_backward, (name, normal(rng, x.shape, dtype), y), {}
    yield "gated_scan", cases.scan, ("gated", scan_x, g, weight, bias, directions), {}
    yield "gated_scan_backward", cases.scan_backward, ("gated", normal(rng, h.shape, dtype), g, h, weight, bias,
                                                      directions), {}
    yield "tanh_scan", cases.scan, ("tanh", scan_x, g, weight, bias, directions), {}
    yield "tanh_scan_backward", cases.scan_backward, ("tanh", normal(rng, h.shape, dtype), g, tanh_h, weight, bias,
                                                     directions), {}
    wide = scan_inputs(rng, (1, 17, 4, 3), directions, dtype)  # C > 16: the forward without registers
    yield "gated_scan_17_channels", cases.scan, ("gated", *wide, directions), {}
    yield "max_merge", cases.max_merge, (merge,), {}
    yield "max_merge_backward", cases.max_merge_backward, (normal(rng, merge.shape[1:], dtype),
                                                           merge.argmax(axis=0).astype(numpy.int8), 4), {}
    yield "softmax_cross_entropy", cases.softmax_cross_entropy, (logits, targets), loss_kwargs
    yield ("softmax_cross_entropy_backward", cases.softmax_cross_entropy_backward,
           (logits, targets, totals, 0.7), loss_kwargs)
    yield "sigmoid_bce", cases.sigmoid_bce, (edge_logits, edge_targets, edge_mask), {}
    yield "sigmoid_bce_backward", cases.sigmoid_bce_backward, (edge_logits, edge_targets, edge_totals, 0.7,
                                                               edge_mask), {}
    yield "soft_dice", cases.soft_dice, (logits, targets), dice_kwargs
    norm_x = (normal(rng, (3, 2, 13, 77), dtype, scale=3.0) + 1).astype(dtype)
    norm_weight, norm_bias = normal(rng, (2,), dtype), normal(rng, (2,), dtype)
    running = (normal(rng, (2,), dtype), rng.uniform(0.5, 2, 2).astype(dtype))
    normalized = on_emulator(cases.batch_norm, norm_x, norm_weight, norm_bias, *running)
    yield "batch_norm", cases.batch_norm, (norm_x, norm_weight, norm_bias, *running), {}
    yield "batch_norm_inference", cases.batch_norm_normalize, (norm_x, *running, norm_weight, norm_bias), {}
    yield "batch_norm_backward", cases.batch_norm_backward, (normal(rng, norm_x.shape, dtype), normalized["xhat"],
                                                             normalized["variance"], norm_weight), {}
    yield "soft_dice_backward", cases.soft_dice_backward, (logits, targets, dice_totals, 0.5, 0.7), dice_kwargs
    colours = normal(rng, (2, 3, 7, 6), dtype)
    yield "colour_affinity", cases.colour_affinity, (x, colours, 0.8, 0.3, 0.5), {}
    yield "colour_affinity_backward", cases.colour_affinity_backward, (x, colours, 0.8, 0.3, 0.5, 0.7), {}


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_on_the_gpu_matches_the_emulator(dtype):
    for name, function, args, kwargs in kernel_cases(numpy.random.default_rng(20), dtype):
        try:
            assert_same(on_gpu(function, *args, **kwargs), on_emulator(function, *args, **kwargs))
        except AssertionError as error:
            raise AssertionError(f"{name}: the GPU and the emulator differ\n{error}") from None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gated", "tanh"])
def test_scans_on_the_gpu_match_the_step_by_step_reference(kind, dtype):
    rng = numpy.random.default_rng(21)
    directions = list(DIRECTIONS)
    x, g, weight, bias = scan_inputs(rng, (3, 4, 6, 9), directions, dtype)
    h = on_gpu(cases.scan, kind, x, g, weight, bias, directions)
    dh = normal(rng, h.shape, dtype)
    gradients = on_gpu(cases.scan_backward, kind, dh, g, h, weight, bias, directions)
    cases.check_scan_against_reference(kind, x, g, weight, bias, directions, h, dh, gradients)


@pytest.mark.parametrize("kind", ["gated", "tanh"])
def test_scan_gradients_on_the_gpu_match_finite_differences(kind):
    cases.check_scan_gradients_by_finite_differences(kind, run=on_gpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_on_the_gpu_match_the_reference(dtype):
    rng = numpy.random.default_rng(23)
    logits, targets, kwargs = loss_inputs(rng, {"mask": True, "class_weights": True, "ignore_index": 255}, dtype)
    totals = on_gpu(cases.softmax_cross_entropy, logits, targets, **kwargs)
    loss_sum, weight_sum, dlogits = cases.reference_softmax_cross_entropy(logits, targets, scale=0.7, **kwargs)
    assert_close(totals, [loss_sum, weight_sum])
    assert_close(on_gpu(cases.softmax_cross_entropy_backward, logits, targets, totals, 0.7, **kwargs), dlogits)

    edge = normal(rng, (2, 1, 5, 7), dtype, scale=30.0)
    edge_targets = (rng.random(edge.shape) < 0.5).astype(dtype)
    mask = (rng.random((2, 5, 7)) < 0.6).astype(numpy.uint8)
    totals = on_gpu(cases.sigmoid_bce, edge, edge_targets, mask)
    loss_sum, weight_sum, dlogits = cases.reference_sigmoid_bce(edge, edge_targets, mask, scale=0.7)
    assert_close(totals, [loss_sum, weight_sum])
    assert_close(on_gpu(cases.sigmoid_bce_backward, edge, edge_targets, totals, 0.7, mask), dlogits)

    dice_kwargs = {key: kwargs[key] for key in ("mask", "ignore_index")}
    totals = on_gpu(cases.soft_dice, logits, targets, **dice_kwargs)
    want_totals, _, dlogits = cases.reference_soft_dice(logits, targets, 0.5, scale=0.7, **dice_kwargs)
    assert_close(totals, want_totals)
    assert_close(on_gpu(cases.soft_dice_backward, logits, targets, totals, 0.5, 0.7, **dice_kwargs), dlogits)


def test_numpy_arrays_are_refused_on_the_cupy_backend():
    x = numpy.zeros(4, numpy.float32)
    kernel = get_kernel("activation", "relu_forward", numpy.float32)
    with backend.use("cupy"), pytest.raises(ValueError, match="NumPy arrays.*backend is cupy.*to_device"):
        kernel((1,), (256,), (x, x.copy(), numpy.int32(4)))


def test_arrays_on_two_devices_are_refused():
    import cupy
    kernel = get_kernel("activation", "relu_forward", numpy.float32)
    with backend.use("cupy"), pytest.raises(ValueError, match="two devices, x on the GPU.*y on the host"):
        kernel((1,), (256,), (cupy.zeros(4, cupy.float32), numpy.zeros(4, numpy.float32), numpy.int32(4)))


def test_a_gpu_compile_error_names_the_kernel_and_shows_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "KERNEL_DIRECTORY", tmp_path)
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.cu").write_text(
        'extern "C" __global__ void broken(scalar_t* y, int n) { y[0] = undefined_name; }\n')
    import cupy
    kernel = get_kernel(name, "broken", numpy.float32)
    with backend.use("cupy"), pytest.raises(KernelCompileError, match="kernel broken(.|\n)*undefined_name"):
        kernel((1,), (1,), (cupy.zeros(1, cupy.float32), numpy.int32(1)))


# ---- the layers, losses and models on the GPU ------------------------------------------------------------

MODELS = [RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, build, inputs, prepare", path_cases.LAYER_CASES,
                         ids=[c[0] for c in path_cases.LAYER_CASES])
def test_layer_on_the_gpu_matches_the_numpy_path(name, build, inputs, prepare, dtype):
    path_cases.compare_layer("cupy", build, inputs, prepare, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-pixels", "masked"])
def test_losses_on_the_gpu_match_the_numpy_path(masked, dtype):
    rng = numpy.random.default_rng(24)
    for settings in path_cases.CROSS_ENTROPY_SETTINGS:
        arguments = path_cases.cross_entropy_arguments(rng, dtype, settings, masked)
        path_cases.compare_loss("cupy", lambda: SoftmaxCrossEntropy(**settings), arguments)
    path_cases.compare_loss("cupy", SigmoidBinaryCrossEntropy, path_cases.binary_arguments(rng, dtype, masked))
    huge = path_cases.cross_entropy_arguments(rng, dtype, {}, masked, logit_scale=30.0)
    path_cases.compare_loss("cupy", SoftmaxCrossEntropy, huge)
    path_cases.compare_loss("cupy", SoftDice, huge)
    path_cases.compare_loss("cupy", lambda: SoftDice(smooth=0.5, ignore_index=255),
                            path_cases.cross_entropy_arguments(rng, dtype, {"ignore_index": 255}, masked))
    images = (rng.uniform(-0.5, 0.5, (2, 3, 5, 3)) * 0.3).astype(dtype)  # the colours of huge's logits
    path_cases.compare_loss("cupy", ColourAffinity, (huge[0], images))


@pytest.mark.parametrize("name, build, inputs, prepare", path_cases.GRADIENT_CASES,
                         ids=[c[0] for c in path_cases.GRADIENT_CASES])
def test_layer_gradients_on_the_gpu_match_finite_differences(name, build, inputs, prepare):
    report = path_cases.check_gradients("cupy", build, inputs, prepare, max_entries=24)
    assert report.max_error < 1e-7, str(report)


def test_loss_and_rnng_gradients_on_the_gpu_match_finite_differences():
    for report in path_cases.check_loss_gradients("cupy", max_entries=24):
        assert report.max_error < 1e-7, str(report)
    report = path_cases.check_model_gradients("cupy", RNNG, max_entries=4)
    assert report.max_error < 1e-6, str(report)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_class", MODELS, ids=[m.__name__ for m in MODELS])
def test_model_on_the_gpu_matches_the_numpy_path(model_class, dtype):
    path_cases.compare_model("cupy", model_class, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_on_the_gpu_matches_the_numpy_path(dtype):
    path_cases.compare_training_step("cupy", RNNG, dtype)


def test_rnng_at_128x128_on_the_gpu_matches_the_numpy_path():
    """The benchmark's size, float32, against the NumPy path: outputs and labels."""
    import cupy
    rng = numpy.random.default_rng(25)
    reference = path_cases.build_model_on("numpy", RNNG, numpy.float32, seed=3)
    reference.randomize_recurrence(3)
    model = path_cases.build_model_on("cupy", RNNG, numpy.float32, reference, seed=3)
    images = rng.uniform(-0.5, 0.5, (2, 3, 128, 128)).astype(numpy.float32)
    with backend.use("numpy"):
        expected = reference.forward(images)
    with backend.use("cupy"):
        outputs = model.forward(cupy.asarray(images))
        labels = model.predict(cupy.asarray(images))
    assert isinstance(labels, cupy.ndarray) and labels.shape == (2, 128, 128)
    for name, value in expected.items():
        path_cases.model_tolerance(numpy.float32)(backend.to_numpy(outputs[name]), value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", sorted(STABILITY_RULES))
def test_every_stability_rule_on_the_gpu_matches_the_host(rule, dtype):
    """The rules run array code, not kernels (so the emulator cannot tell them apart): a real GPU can.
    Tolerance ten times assert_close's: cuSOLVER's SVD and LAPACK's round differently."""
    W = numpy.random.default_rng(0).standard_normal((8, 8)).astype(dtype)  # every row sum and norm over 1
    expected = STABILITY_RULES[rule](W.copy())
    gpu = on_gpu(lambda matrix: STABILITY_RULES[rule](matrix), W.copy())
    assert gpu.dtype == dtype
    tolerance = 1e-5 if dtype == numpy.float32 else 1e-11
    numpy.testing.assert_allclose(gpu, expected, rtol=tolerance, atol=tolerance * numpy.abs(expected).max())


def test_layers_and_losses_refuse_arrays_on_the_wrong_device():
    import cupy
    with backend.use("cupy"):
        layer = Conv2d(3, 2, 3, rng=0)
        with pytest.raises(ValueError, match="wrong device.*GPU \\(CuPy\\).*to_device"):
            layer.forward(numpy.zeros((1, 3, 5, 5), numpy.float32))
        y = layer.forward(cupy.zeros((1, 3, 5, 5), cupy.float32))
        with pytest.raises(ValueError, match="grad_output is on the wrong device"):
            layer.backward(numpy.ones(y.shape, numpy.float32))
        relu = ReLU()
        relu.forward(cupy.zeros(3, cupy.float32))
        with pytest.raises(ValueError, match="forward pass ran on the kernel.*NumPy path"):
            relu.backward(numpy.ones(3, numpy.float32))
        with pytest.raises(ValueError, match="target is on the wrong device"):
            SoftmaxCrossEntropy().forward(cupy.zeros((1, 3, 2, 2), cupy.float32), numpy.zeros((1, 2, 2), numpy.int64))


@pytest.mark.parametrize("model_class", MODELS + [EyeBrowNet, NoseNet, MouthNet],
                         ids=[m.__name__ for m in MODELS + [EyeBrowNet, NoseNet, MouthNet]])
def test_a_model_built_on_the_gpu_has_the_weights_built_on_the_host(model_class):
    """Initialisation draws on the host and copies to the device: same seed, same weights anywhere
    (and no host array is assigned into a CuPy array, which CuPy refuses)."""
    def build():
        if model_class in (EyeBrowNet, NoseNet, MouthNet):
            return model_class(rng=4)
        model = model_class(n_classes=3, rng=4)
        model.randomize_recurrence(5)  # a no-op for models without recurrence
        return model
    with backend.use("numpy"):
        expected = build().params()
    with backend.use("cupy"):
        built = build().params()
    assert set(built) == set(expected)
    for name, value in built.items():
        numpy.testing.assert_array_equal(backend.to_numpy(value), expected[name], err_msg=name)


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
def test_rnng_infer_on_the_gpu_gives_the_logits_of_forward(algorithm):
    """predict's path (ReLUs fused into the direct kernels, no coarse and edge heads) against forward's."""
    import cupy
    model = path_cases.build_model_on("cupy", RNNG, numpy.float32, seed=3)
    for layer in model.layers.values():
        if hasattr(layer, "gpu_algorithm"):
            layer.gpu_algorithm = algorithm
    images = cupy.asarray(numpy.random.default_rng(26).uniform(-0.5, 0.5, (2, 3, 128, 128)).astype(numpy.float32))
    with backend.use("cupy"):
        logits = model.forward(images)["logits"]
        inferred = model.infer(images)
    assert isinstance(inferred, cupy.ndarray)
    cupy.testing.assert_array_equal(inferred, logits)


def test_mirrored_logits_on_the_gpu_match_the_host():
    """Test-time mirroring with the HELEN classes, whose permutation indexes a CuPy array."""
    import cupy
    from minirnng.data.classes import HELEN_CLASSES
    from minirnng.mirroring import mirrored_logits
    with backend.use("numpy"):
        reference = RNNG(n_classes=len(HELEN_CLASSES), rng=4, dtype=numpy.float64)
        reference.randomize_recurrence(5)
    with backend.use("cupy"):
        model = RNNG(n_classes=len(HELEN_CLASSES), rng=4, dtype=numpy.float64)
        model.load_params({name: value for name, value in reference.params().items()})
    reference.classes = model.classes = list(HELEN_CLASSES)
    images = numpy.random.default_rng(27).standard_normal((2, 3, 16, 12))
    with backend.use("numpy"):
        expected = mirrored_logits(reference, images)
    with backend.use("cupy"):
        scores = mirrored_logits(model, cupy.asarray(images))
    assert isinstance(scores, cupy.ndarray)
    numpy.testing.assert_allclose(backend.to_numpy(scores), expected, rtol=1e-9, atol=1e-9)


def test_the_shipped_parser_on_the_gpu_agrees_with_the_host():
    from minirnng.data.synthetic import SyntheticFaces
    from minirnng.parser import FaceParser
    image, _ = SyntheticFaces(1, size=128, seed=2)[0]
    with backend.use("numpy"):
        expected = FaceParser.pretrained().parse(image)
    with backend.use("cupy"):
        labels = FaceParser.pretrained().parse(image)
    assert isinstance(labels, numpy.ndarray) and labels.shape == expected.shape
    assert (labels != expected).mean() < 1e-3  # float32 sums in another order may flip a near-tie
