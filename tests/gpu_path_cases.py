"""What the tests of the layers' kernel path share: the cases, and a comparison of one layer, loss or
model run on the NumPy path and on the kernel path of a device ("cuda-emulator" or "cupy").

A case builds the same layer twice, once on the NumPy backend (the reference) and once under the
backend being tested, with the same parameters; runs forward and backward on both with the same
inputs and upstream gradient; and compares every result: the output, each input gradient and each
parameter gradient. It also checks that neither path wrote into its inputs or into grad_output.

Imported by test_gpu_path.py (emulator) and test_cuda_gpu.py (GPU); pytest puts tests/ on sys.path.
"""

import numpy
from scipy.special import expit

from cuda_cases import assert_close, normal
from minirnng import backend
from minirnng.layers import BatchNorm2d, Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sigmoid, Tanh
from minirnng.layers.recurrent import (DIRECTIONS, FourWayGatedRNN, FourWaySpatialRNN, GatedSpatialRNN,
                                       SpatialRNN, constrain_recurrent_weight)
from minirnng.losses import ColourAffinity, SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy


# ---- the cases -----------------------------------------------------------------------------------
# Each is (id, build(dtype) -> layer, inputs(rng, dtype) -> tuple of NumPy arrays, prepare(layer, rng)),
# where prepare sets parameters the layer's own initialisation would not give (None: keep them).

def randomize_recurrence(layer, rng):
    """Distinct random W (within the stability rule) and b for every direction; b small, so that no
    direction of a four-way merge outbids the others everywhere (see :func:`compare_layer`)."""
    for name, value in layer.params.items():
        random = rng.standard_normal(value.shape)
        value[...] = constrain_recurrent_weight(random) if name.endswith("W") else 0.1 * random


def zero_recurrence(layer, rng):
    """W = 0, b = 0: eq. 1 without activation is then h = x in every direction, so all four tie everywhere."""
    for value in layer.params.values():
        value[...] = 0


def gates(rng, shape, dtype, closed=0.0):
    """Gates in (0, 1) as a sigmoid gives them, with a fraction ``closed`` of them exactly 0 (there,
    h = x in every direction, so the four-way merge has ties to break)."""
    g = expit(2 * rng.standard_normal(shape))
    g[rng.random(shape) < closed] = 0.0
    return g.astype(dtype)


def with_gpu_algorithm(build, algorithm):
    """``build`` with the layer's kernel-path forward forced to ``algorithm`` ("direct" or "im2col")."""
    def built(dtype):
        layer = build(dtype)
        layer.gpu_algorithm = algorithm
        return layer
    return built


def _conv_cases():
    # (in, out, kernel, stride, padding, bias): odd kernels, strides above 1, padding wider than
    # the kernel's half, 1x1 (no im2col/col2im on the kernel path), and no bias. Each runs its
    # forward both ways on the kernel path: by the direct kernels and by im2col and a product.
    layers = []
    for cin, cout, k, s, p, bias in [(3, 5, 3, 1, 1, True), (3, 4, 5, 1, 2, True), (2, 3, 4, 2, 1, True),
                                     (3, 2, 3, 2, 0, False), (4, 3, 1, 1, 0, True), (3, 2, 1, 2, 0, True),
                                     (2, 3, 3, 3, 2, True)]:
        suffix = "" if bias else "-nobias"
        layers.append((f"Conv2d-{cin}to{cout}-k{k}s{s}p{p}{suffix}",
                       lambda dtype, a=(cin, cout, k, s, p, bias): Conv2d(a[0], a[1], a[2], stride=a[3], padding=a[4],
                                                                           bias=a[5], rng=0, dtype=dtype),
                       lambda rng, dtype, c=cin: (normal(rng, (2, c, 7, 5), dtype),)))
    for cin, cout, k, s, p, bias in [(4, 2, 4, 2, 1, True), (3, 5, 3, 1, 1, True), (2, 3, 1, 1, 0, True),
                                     (3, 2, 3, 2, 0, False), (2, 2, 1, 1, 0, False), (2, 3, 5, 3, 2, True)]:
        suffix = "" if bias else "-nobias"
        layers.append((f"ConvTranspose2d-{cin}to{cout}-k{k}s{s}p{p}{suffix}",
                       lambda dtype, a=(cin, cout, k, s, p, bias): ConvTranspose2d(a[0], a[1], a[2], stride=a[3],
                                                                                    padding=a[4], bias=a[5], rng=0,
                                                                                    dtype=dtype),
                       lambda rng, dtype, c=cin: (normal(rng, (2, c, 5, 3), dtype),)))
    for name, build, inputs in layers:
        for algorithm in ("direct", "im2col"):
            yield f"{name}-{algorithm}", with_gpu_algorithm(build, algorithm), inputs, None


def _pool_and_activation_cases():
    for k, s in [(2, None), (3, 2), (2, 1), (3, 3)]:
        # small integers: many ties inside the windows (the first maximum must win on both paths)
        yield (f"MaxPool2d-k{k}s{s}", lambda dtype, k=k, s=s: MaxPool2d(k, s),
               lambda rng, dtype: (rng.integers(-2, 3, (2, 3, 9, 7)).astype(dtype),), None)
    yield ("ReLU", lambda dtype: ReLU(),  # exact zeros: the kink, where both paths give slope 0
           lambda rng, dtype: (rng.integers(-2, 3, (2, 3, 5, 4)).astype(dtype) * normal(rng, (2, 3, 5, 4), dtype),),
           None)
    yield "Sigmoid", lambda dtype: Sigmoid(), lambda rng, dtype: (normal(rng, (3, 5, 7), dtype, scale=10.0),), None
    yield "Tanh", lambda dtype: Tanh(), lambda rng, dtype: (normal(rng, (2, 3, 5, 4), dtype, scale=3.0),), None


def _recurrent_cases():
    shape = (2, 3, 5, 7)
    for direction in DIRECTIONS:
        yield (f"GatedSpatialRNN-{direction}", lambda dtype, d=direction: GatedSpatialRNN(3, d, dtype=dtype),
               lambda rng, dtype: (normal(rng, shape, dtype), gates(rng, shape, dtype, closed=0.2)),
               randomize_recurrence)
        for activation in ("tanh", "identity"):
            yield (f"SpatialRNN-{activation}-{direction}",
                   lambda dtype, d=direction, a=activation: SpatialRNN(3, d, activation=a, dtype=dtype),
                   lambda rng, dtype: (normal(rng, shape, dtype),), randomize_recurrence)
    yield ("FourWayGatedRNN", lambda dtype: FourWayGatedRNN(3, dtype=dtype),
           lambda rng, dtype: (normal(rng, shape, dtype), gates(rng, shape, dtype)), randomize_recurrence)
    yield ("FourWayGatedRNN-ties", lambda dtype: FourWayGatedRNN(3, dtype=dtype),  # closed gates: h = x in all four
           lambda rng, dtype: (normal(rng, shape, dtype), gates(rng, shape, dtype, closed=0.5)), randomize_recurrence)
    yield ("FourWayGatedRNN-initial", lambda dtype: FourWayGatedRNN(3, dtype=dtype),  # W = I, b = 0: ties at corners
           lambda rng, dtype: (normal(rng, shape, dtype), gates(rng, shape, dtype)), None)
    for activation in ("tanh", "identity"):
        yield (f"FourWaySpatialRNN-{activation}", lambda dtype, a=activation: FourWaySpatialRNN(3, activation=a,
                                                                                               dtype=dtype),
               lambda rng, dtype: (normal(rng, shape, dtype),), randomize_recurrence)
    yield ("FourWaySpatialRNN-identity-ties", lambda dtype: FourWaySpatialRNN(3, activation="identity", dtype=dtype),
           lambda rng, dtype: (normal(rng, shape, dtype),), zero_recurrence)


def randomize_affine(layer, rng):
    """A batch normalisation's weight and bias away from 1 and 0 (both signs of weight)."""
    layer.params["weight"][...] = rng.choice([-1.0, 1.0], layer.channels) * rng.uniform(0.5, 1.5, layer.channels)
    layer.params["bias"][...] = rng.standard_normal(layer.channels)


def _normalization_cases():
    # channels with their own offset and scale, as a convolution's outputs have; 3 x 1001 pixels
    # per channel in the second: more than the 1024 chunks of a reduction thread
    for shape in [(2, 3, 5, 7), (3, 2, 13, 77)]:
        yield (f"BatchNorm2d-{'x'.join(map(str, shape))}", lambda dtype, c=shape[1]: BatchNorm2d(c, dtype=dtype),
               lambda rng, dtype, shape=shape: ((normal(rng, shape, dtype, scale=3.0)
                                                 + rng.uniform(-2, 2, (1, shape[1], 1, 1))).astype(dtype),),
               randomize_affine)


LAYER_CASES = [*_conv_cases(), *_pool_and_activation_cases(), *_recurrent_cases(), *_normalization_cases()]


# ---- running a layer on two paths ------------------------------------------------------------------

def build_on(device, build, dtype, reference=None):
    """``build(dtype)`` on ``device``'s backend, with the parameters of ``reference`` if given."""
    with backend.use(device):
        layer = build(dtype)
        if reference is not None:
            for name, value in reference.params.items():
                layer.params[name][...] = backend.to_device(value)
    return layer


def run_layer(layer, inputs, upstream):
    """Forward and backward of ``layer`` on the given arrays; every result as a NumPy array, by name."""
    output = layer.forward(*inputs)
    input_grads = layer.backward(upstream)
    if not isinstance(input_grads, tuple):
        input_grads = (input_grads,)
    names = getattr(layer, "input_names", None) or [f"input{k}" for k in range(len(inputs))]
    results = {"output": output}
    results.update({f"d{name}": grad for name, grad in zip(names, input_grads)})
    results.update({f"grad {name}": grad for name, grad in layer.grads.items()})
    return {name: backend.to_numpy(value).copy() for name, value in results.items()}


def compare_layer(device, build, make_inputs, prepare, dtype, seed=0):
    """The layer on the NumPy path and on ``device``'s kernel path: every result within
    :func:`cuda_cases.assert_close`'s tolerance, and no input or upstream gradient written to."""
    rng = numpy.random.default_rng(seed)
    reference = build_on("numpy", build, dtype)
    if prepare is not None:
        prepare(reference, rng)
    inputs = make_inputs(rng, dtype)
    if hasattr(reference, "direction_layers") and prepare is not zero_recurrence:
        # a direction that wins no output has zero W and b gradients on both paths: compared, they
        # would agree whatever its backward did (zero_recurrence ties all four everywhere on purpose)
        from conftest import outputs_won
        with backend.use("numpy"):
            won = outputs_won(reference, *inputs)
        assert min(won) > 0, f"a direction wins no output of the max merge: {won}"
    with backend.use("numpy"):
        upstream = rng.standard_normal(reference.forward(*inputs).shape).astype(dtype)
        expected = run_layer(reference, inputs, upstream)
    layer = build_on(device, build, dtype, reference)
    with backend.use(device):
        device_inputs = [backend.to_device(x.copy()) for x in inputs]
        device_upstream = backend.to_device(upstream.copy())
        actual = run_layer(layer, device_inputs, device_upstream)
        for before, after in zip(inputs, device_inputs):
            numpy.testing.assert_array_equal(backend.to_numpy(after), before, err_msg="the layer wrote into its input")
        numpy.testing.assert_array_equal(backend.to_numpy(device_upstream), upstream,
                                         err_msg="the layer wrote into grad_output")
    compare_results(expected, actual, device)


def compare_results(expected, actual, device, check=assert_close):
    assert expected.keys() == actual.keys(), (sorted(expected), sorted(actual))
    for name in expected:
        try:
            check(actual[name], expected[name])
        except AssertionError as error:
            raise AssertionError(f"{name} differs between the NumPy path and {device}:\n{error}") from None


# ---- losses -----------------------------------------------------------------------------------------

CROSS_ENTROPY_SETTINGS = [dict(), dict(class_weights=[0.5, 2.0, 1.0, 3.0]), dict(ignore_index=255),
                          dict(class_weights=[1.0, 0.0, 2.0, 1.0], ignore_index=-1)]


def cross_entropy_arguments(rng, dtype, settings, masked, logit_scale=3.0):
    """logits (2, 4, 5, 3), integer targets (a fifth of them the ignore index, if any), a mask or None."""
    logits = normal(rng, (2, 4, 5, 3), dtype, scale=logit_scale)
    target = rng.integers(0, 4, (2, 5, 3))
    if "ignore_index" in settings:
        target[rng.random(target.shape) < 0.2] = settings["ignore_index"]
    mask = rng.random(target.shape) < 0.6 if masked else None
    return logits, target, mask


def binary_arguments(rng, dtype, masked, logit_scale=5.0):
    """logits and 0/1 targets (2, 1, 5, 3) and a mask of that shape or None."""
    logits = normal(rng, (2, 1, 5, 3), dtype, scale=logit_scale)
    target = (rng.random(logits.shape) < 0.5).astype(dtype)
    mask = rng.random(logits.shape) < 0.6 if masked else None
    return logits, target, mask


def compare_loss(device, make_loss, arguments, scale=0.7):
    """A loss's value and gradient on the NumPy path and on ``device``'s kernel path."""
    logits = arguments[0]
    reference = make_loss()
    with backend.use("numpy"):
        expected_value = reference.forward(*arguments)
        expected_grad = reference.backward(scale)
    loss = make_loss()
    with backend.use(device):
        moved = [None if a is None else backend.to_device(a.copy()) for a in arguments]
        value = loss.forward(*moved)
        grad = loss.backward(scale)
        numpy.testing.assert_array_equal(backend.to_numpy(moved[0]), logits, err_msg="the loss wrote into the logits")
    assert isinstance(value, float)
    tolerance = 1e-6 if logits.dtype == numpy.float32 else 1e-12
    assert abs(value - expected_value) <= tolerance * max(abs(expected_value), 1e-30), (value, expected_value)
    assert backend.to_numpy(grad).dtype == logits.dtype
    assert_close(grad, expected_grad)


# ---- models -----------------------------------------------------------------------------------------

def model_tolerance(dtype):
    """How close a whole model's results on two paths must be.

    float64: 1e-12 of each array's largest magnitude, as for a layer. float32: 1e-5. Through a
    dozen layers the two paths round differently (the kernels sum the bias gradients in double, the
    NumPy path in float32; the scans add ``x + g * (W h + b)`` in another order), and in a bias
    gradient, a sum of terms of both signs, those differences are measured against a result much
    smaller than its terms: over eight seeds they reach 1.2e-6 of the largest magnitude there.
    """
    rtol = 1e-5 if numpy.dtype(dtype) == numpy.float32 else 1e-12

    def check(actual, expected):
        expected = numpy.asarray(expected, dtype=numpy.float64)
        scale = float(numpy.abs(expected).max(initial=0.0))
        numpy.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))
    return check


def build_model_on(device, model_class, dtype, reference=None, seed=0):
    with backend.use(device):
        model = model_class(n_classes=3, rng=seed, dtype=dtype)
        if reference is not None:
            model.load_params({name: backend.to_numpy(value) for name, value in reference.params().items()})
    return model


def run_model(model, images, upstream):
    """Forward and backward of a whole model; outputs, image gradient and parameter gradients as NumPy arrays."""
    outputs = model.forward(images)
    model.zero_grad()
    dimages = model.backward(upstream)
    results = {name: value for name, value in outputs.items()}
    results["dimages"] = dimages
    results.update({f"grad {name}": value for name, value in model.grads().items()})
    return {name: backend.to_numpy(value).copy() for name, value in results.items()}


def compare_model(device, model_class, dtype, shape=(2, 3, 16, 12), seed=0):
    """A whole model, forward and backward, on the NumPy path and on ``device``'s kernel path."""
    rng = numpy.random.default_rng(seed)
    reference = build_model_on("numpy", model_class, dtype, seed=seed)
    reference.randomize_recurrence(seed)  # distinct directions (a no-op for models without recurrence)
    images = rng.uniform(-0.5, 0.5, shape).astype(dtype)
    with backend.use("numpy"):
        upstream = {name: rng.standard_normal(value.shape).astype(dtype)
                    for name, value in reference.forward(images).items()}
        expected = run_model(reference, images, upstream)
        expected_labels = reference.predict(images)
    model = build_model_on(device, model_class, dtype, reference, seed=seed)
    with backend.use(device):
        actual = run_model(model, backend.to_device(images),
                           {name: backend.to_device(value) for name, value in upstream.items()})
        labels = backend.to_numpy(model.predict(backend.to_device(images)))
    compare_results(expected, actual, device, check=model_tolerance(dtype))
    if numpy.dtype(dtype) == numpy.float64:  # float32 logits may round a near-tie the other way
        numpy.testing.assert_array_equal(labels, expected_labels)


def labels_with_boundaries(rng, shape):
    """Integer labels (N, H, W) in 3 classes: a disc of class 2 around a disc of class 1 per image."""
    n, height, width = shape
    rows, cols = numpy.mgrid[0:height, 0:width]
    labels = numpy.zeros(shape, dtype=numpy.int64)
    for image in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * (height, width)
        labels[image][(rows - cy) ** 2 + (cols - cx) ** 2 < (0.35 * height) ** 2] = 2
        labels[image][(rows - cy) ** 2 + (cols - cx) ** 2 < (0.2 * height) ** 2] = 1
    return labels


def training_step(model, images, labels, seed):
    """One step of stage-1 training: forward, the three-term objective (with class weights), backward,
    Adam, the stability rule. Returns the loss terms and the updated parameters (NumPy)."""
    from minirnng.objective import StageOneObjective
    from minirnng.optim import Adam

    objective = StageOneObjective(class_weights=[0.5, 1.0, 2.0])
    optimizer = Adam(model.params(), model.grads(), lr=1e-2)
    model.zero_grad()
    outputs = model.forward(images)
    total, parts, grads = objective(outputs, labels, numpy.random.default_rng(seed))
    model.backward(grads, input_gradient=False)
    optimizer.step()
    model.constrain()
    return parts, {name: backend.to_numpy(value).copy() for name, value in model.params().items()}


def compare_training_step(device, model_class, dtype, shape=(2, 3, 16, 12), seed=0):
    """A training step on both paths: the same loss terms and the same parameters afterwards."""
    rng = numpy.random.default_rng(seed)
    reference = build_model_on("numpy", model_class, dtype, seed=seed)
    reference.randomize_recurrence(seed)
    model = build_model_on(device, model_class, dtype, reference, seed=seed)
    images = rng.uniform(-0.5, 0.5, shape).astype(dtype)
    labels = labels_with_boundaries(rng, (shape[0],) + shape[2:])
    with backend.use("numpy"):
        expected_parts, expected_params = training_step(reference, images, labels, seed)
    with backend.use(device):
        parts, params = training_step(model, backend.to_device(images), backend.to_device(labels), seed)
    tolerance = 1e-5 if numpy.dtype(dtype) == numpy.float32 else 1e-12
    for name, value in expected_parts.items():
        assert abs(parts[name] - value) <= tolerance * abs(value), (name, parts[name], value)
    compare_results(expected_params, params, device, check=model_tolerance(dtype))


# ---- finite differences -----------------------------------------------------------------------------

def _tie_free(rng, shape, avoid_zero=False):
    from conftest import tie_free  # values at least 1e-2 apart: no tie or kink within a step
    return tie_free(rng, shape, avoid_zero=avoid_zero)


#: (id, build(dtype), inputs(rng) -> float64 NumPy arrays, prepare): one case per kind of layer, small.
GRADIENT_CASES = [
    ("Conv2d", lambda dtype: Conv2d(2, 3, 3, stride=2, padding=1, rng=0, dtype=dtype),
     lambda rng: (rng.standard_normal((2, 2, 5, 4)),), None),
    ("Conv2d-im2col", with_gpu_algorithm(lambda dtype: Conv2d(2, 3, 3, stride=2, padding=1, rng=0, dtype=dtype),
                                         "im2col"), lambda rng: (rng.standard_normal((2, 2, 5, 4)),), None),
    ("Conv2d-1x1", lambda dtype: Conv2d(3, 2, 1, rng=0, dtype=dtype), lambda rng: (rng.standard_normal((2, 3, 3, 4)),),
     None),
    ("ConvTranspose2d", lambda dtype: ConvTranspose2d(2, 3, 4, stride=2, padding=1, rng=0, dtype=dtype),
     lambda rng: (rng.standard_normal((2, 2, 3, 3)),), None),
    ("ConvTranspose2d-im2col", with_gpu_algorithm(lambda dtype: ConvTranspose2d(2, 3, 4, stride=2, padding=1, rng=0,
                                                                                dtype=dtype), "im2col"),
     lambda rng: (rng.standard_normal((2, 2, 3, 3)),), None),
    ("MaxPool2d", lambda dtype: MaxPool2d(2), lambda rng: (_tie_free(rng, (2, 2, 4, 6)),), None),
    ("ReLU", lambda dtype: ReLU(), lambda rng: (_tie_free(rng, (2, 3, 4), avoid_zero=True),), None),
    ("Sigmoid", lambda dtype: Sigmoid(), lambda rng: (3 * rng.standard_normal((2, 3, 4)),), None),
    ("Tanh", lambda dtype: Tanh(), lambda rng: (rng.standard_normal((2, 3, 4)),), None),
    ("GatedSpatialRNN", lambda dtype: GatedSpatialRNN(2, "bottom_to_top", dtype=dtype),
     lambda rng: (rng.standard_normal((2, 2, 4, 3)), expit(rng.standard_normal((2, 2, 4, 3)))), randomize_recurrence),
    ("SpatialRNN", lambda dtype: SpatialRNN(2, "right_to_left", dtype=dtype),
     lambda rng: (rng.standard_normal((2, 2, 3, 4)),), randomize_recurrence),
    ("FourWayGatedRNN", lambda dtype: FourWayGatedRNN(2, dtype=dtype),
     lambda rng: (rng.standard_normal((2, 2, 3, 4)), expit(rng.standard_normal((2, 2, 3, 4)))), randomize_recurrence),
    ("FourWaySpatialRNN", lambda dtype: FourWaySpatialRNN(2, dtype=dtype),
     lambda rng: (rng.standard_normal((2, 2, 3, 4)),), randomize_recurrence),
    ("BatchNorm2d", lambda dtype: BatchNorm2d(3, dtype=dtype),
     lambda rng: (2 * rng.standard_normal((2, 3, 4, 3)) + 1,), randomize_affine),
]


def check_gradients(device, build, make_inputs, prepare, max_entries=None, seed=0):
    """:func:`minirnng.gradcheck.check_layer` in float64 on ``device``'s kernel path; returns the report."""
    from minirnng.gradcheck import check_layer

    rng = numpy.random.default_rng(seed)
    reference = build_on("numpy", build, numpy.float64)
    if prepare is not None:
        prepare(reference, rng)
    layer = build_on(device, build, numpy.float64, reference)
    inputs = make_inputs(rng)
    if hasattr(reference, "direction_layers"):
        from conftest import KINK_MARGIN, merge_margin
        with backend.use("numpy"):
            margin = merge_margin(reference, *inputs)
        assert margin > KINK_MARGIN, f"a step of the finite differences could change a winner of the merge: {margin}"
    with backend.use(device):
        return check_layer(layer, *(backend.to_device(x) for x in inputs), rng=rng, max_entries=max_entries)


def check_loss_gradients(device, seed=0, max_entries=None):
    """Finite differences of the four losses on ``device`` (the cross-entropy with a mask, class
    weights and an ignore index, the binary one with a mask, soft Dice with a mask and an ignore
    index, the colour affinity); the reports."""
    from minirnng.gradcheck import check, check_loss

    rng = numpy.random.default_rng(seed)
    settings = dict(class_weights=[0.5, 2.0, 1.0, 3.0], ignore_index=255)
    logits, target, mask = cross_entropy_arguments(rng, numpy.float64, settings, masked=True)
    edge, edge_target, edge_mask = binary_arguments(rng, numpy.float64, masked=True, logit_scale=3.0)
    colours = 0.05 * rng.standard_normal((logits.shape[0], 3) + logits.shape[2:])  # within s_rgb of each other
    with backend.use(device):
        move = backend.to_device
        affinity = ColourAffinity()
        return [check_loss(SoftmaxCrossEntropy(**settings), move(logits), move(target), move(mask), rng=rng,
                           max_entries=max_entries),
                check_loss(SigmoidBinaryCrossEntropy(), move(edge), move(edge_target), move(edge_mask), rng=rng,
                           max_entries=max_entries),
                check_loss(SoftDice(ignore_index=255), move(logits), move(target), move(mask), rng=rng,
                           max_entries=max_entries),
                check("ColourAffinity", lambda z: affinity.forward(z, move(colours)), affinity.backward,
                      {"logits": move(logits)}, rng=rng, max_entries=max_entries)]


def check_model_gradients(device, model_class, seed=1, max_entries=6):
    """:func:`minirnng.gradcheck.check_model` (sparse) of a float64 model on ``device``; the report."""
    from minirnng.gradcheck import check_model

    rng = numpy.random.default_rng(seed)
    reference = build_model_on("numpy", model_class, numpy.float64, seed=seed)
    reference.randomize_recurrence(rng)
    model = build_model_on(device, model_class, numpy.float64, reference, seed=seed)
    images = rng.standard_normal((2, 3, 12, 8))
    from conftest import KINK_MARGIN, kink_margins
    with backend.use("numpy"), kink_margins() as margins:
        reference.forward(images)
    assert min(margins.values()) > KINK_MARGIN, margins  # the same values as on the device, to rounding
    with backend.use(device):
        return check_model(model, backend.to_device(images), rng=rng, max_entries=max_entries)
