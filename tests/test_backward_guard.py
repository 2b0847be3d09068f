"""A backward pass answers for the last forward pass or for none: after a forward whose input was
refused, or after an inference pass (``infer``, ``pooled``), it is an error, never the gradient of
an older pass. And the inference passes refuse what the forward pass refuses."""

import numpy
import pytest

from minirnng import backend
from minirnng.layers import (BatchNorm2d, Conv2d, ConvTranspose2d, FourWayGatedRNN, FourWaySpatialRNN,
                             GatedSpatialRNN, MaxPool2d, ReLU, Sigmoid, SpatialRNN, Tanh)
from minirnng.models import RNNG

PATHS = ["numpy", "cuda-emulator"]

# (name, layer, the input shape of a good pass, one the forward refuses)
LAYERS = [
    ("Conv2d", lambda: Conv2d(3, 4, 3, padding=1, rng=0, dtype=numpy.float64), (2, 3, 6, 6), (2, 5, 6, 6)),
    ("ConvTranspose2d", lambda: ConvTranspose2d(3, 4, 4, stride=2, padding=1, rng=0, dtype=numpy.float64),
     (2, 3, 6, 6), (2, 5, 6, 6)),
    ("MaxPool2d", lambda: MaxPool2d(2), (2, 3, 6, 6), (2, 3, 1, 1)),
    ("ReLU", ReLU, (2, 3, 6, 6), None),
    ("Sigmoid", Sigmoid, (2, 3, 6, 6), None),
    ("Tanh", Tanh, (2, 3, 6, 6), None),
    ("BatchNorm2d", lambda: BatchNorm2d(3, dtype=numpy.float64), (2, 3, 6, 6), (2, 5, 6, 6)),
    ("GatedSpatialRNN", lambda: GatedSpatialRNN(3, "top_to_bottom", dtype=numpy.float64), (2, 3, 6, 6), (2, 5, 6, 6)),
    ("FourWayGatedRNN", lambda: FourWayGatedRNN(3, dtype=numpy.float64), (2, 3, 6, 6), (2, 5, 6, 6)),
    ("SpatialRNN", lambda: SpatialRNN(3, "left_to_right", dtype=numpy.float64), (2, 3, 6, 6), (2, 5, 6, 6)),
    ("FourWaySpatialRNN", lambda: FourWaySpatialRNN(3, dtype=numpy.float64), (2, 3, 6, 6), (2, 5, 6, 6)),
]


def arguments(layer, shape, rng):
    x = rng.standard_normal(shape)
    gated = isinstance(layer, (GatedSpatialRNN, FourWayGatedRNN))
    return (x, numpy.full(shape, 0.5)) if gated else (x,)


REFUSING = [case for case in LAYERS if case[3] is not None]  # an activation takes any float array


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, build, good, refused", REFUSING, ids=[case[0] for case in REFUSING])
def test_a_refused_forward_leaves_no_cache_for_backward(name, build, good, refused, path, rng):
    with backend.use(path):
        layer = build()
        inputs = [backend.to_device(x) for x in arguments(layer, good, rng)]
        output = layer.forward(*inputs)
        with pytest.raises((ValueError, TypeError)):
            layer.forward(*[backend.to_device(x) for x in arguments(layer, refused, rng)])
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(backend.to_device(rng.standard_normal(output.shape)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, build, good, refused", [case for case in LAYERS
                                                        if case[0] in ("Conv2d", "MaxPool2d", "BatchNorm2d")],
                         ids=["Conv2d", "MaxPool2d", "BatchNorm2d"])
def test_an_inference_pass_leaves_no_cache_for_backward(name, build, good, refused, path, rng):
    with backend.use(path):
        layer = build()
        x = backend.to_device(rng.standard_normal(good))
        output = layer.forward(x)
        (layer.pooled if name == "MaxPool2d" else layer.infer)(x)
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(backend.to_device(rng.standard_normal(output.shape)))


@pytest.mark.parametrize("path", PATHS)
def test_inference_passes_refuse_inputs_too_small_as_the_forward_does(path):
    with backend.use(path):
        tiny = backend.to_device(numpy.zeros((2, 3, 1, 1)))
        with pytest.raises(ValueError, match=r"MaxPool2d.*smaller than the 2x2 window"):
            MaxPool2d(2).pooled(tiny)
        with pytest.raises(ValueError, match=r"Conv2d.*too small for a 3x3 kernel"):
            Conv2d(3, 4, 3, rng=0, dtype=numpy.float64).infer(tiny)


def test_a_grad_output_of_another_dtype_is_named_with_its_remedy(rng):
    relu = ReLU()
    output = relu.forward(rng.standard_normal((2, 3)))
    with pytest.raises(TypeError, match=r"ReLU: grad_output has dtype float32, but the forward pass's output was "
                                        r"float64; cast grad_output to float64"):
        relu.backward(numpy.ones_like(output, dtype=numpy.float32))


def test_a_models_gradients_are_a_dict_of_float_arrays(rng):
    model = RNNG(rng=0, dtype=numpy.float64)
    outputs = model.forward(rng.standard_normal((1, 3, 8, 8)))
    shape = outputs["logits"].shape
    for grads, message in (([numpy.zeros(shape)], "a dict from output name to array, got list"),
                           ({"logits": numpy.zeros(shape).tolist()}, "gradient of 'logits' must be an array, got list"),
                           ({"logits": numpy.zeros(shape, int)}, "must be float32 or float64, got int64"),
                           ({"logits": numpy.zeros(shape, complex)}, "must be float32 or float64, got complex128"),
                           ({"logits": numpy.zeros(shape, numpy.float16)}, "must be float32 or float64, got float16")):
        with pytest.raises(TypeError, match=message):
            model.backward(grads)


def test_settings_that_would_be_coerced_silently_are_refused():
    from minirnng.gradcheck import check
    from minirnng.losses import SoftDice, SoftmaxCrossEntropy
    from minirnng.models import DenseCRF

    with pytest.raises(TypeError, match="bias must be True or False, got 'no'"):
        Conv2d(3, 4, 3, bias="no")
    with pytest.raises(ValueError, match="eps must be positive and finite, got inf"):
        BatchNorm2d(3, eps=float("inf"))
    for loss in (SoftmaxCrossEntropy, SoftDice):
        with pytest.raises(TypeError, match="ignore_index must be None or an integer label, got 1.5"):
            loss(ignore_index=1.5)
    with pytest.raises(ValueError, match="gate_bias must be a finite number, got nan"):
        RNNG(gate_bias=float("nan"))
    with pytest.raises(TypeError, match="RNNG: gate_bias must be a number, got 'x'"):
        RNNG(gate_bias="x")
    for build, owner in ((lambda rng: RNNG(rng=rng), "RNNG"), (lambda rng: Conv2d(3, 4, 3, rng=rng), "Conv2d")):
        for rng in ("a", 1.5, -1):
            with pytest.raises((TypeError, ValueError), match=f"{owner}: rng must be None, a non-negative integer seed"):
                build(rng)
    from minirnng.layers.recurrent import (clip_recurrent_singular_values, constrain_recurrent_weight,
                                           project_recurrent_weight)
    for rule in (constrain_recurrent_weight, project_recurrent_weight, clip_recurrent_singular_values):
        with pytest.raises(ValueError, match=rf"{rule.__name__}: W must be a \(C, C\) matrix, got shape \(3,\)"):
            rule(numpy.ones(3))
    with pytest.raises(ValueError, match="max_entries must be None .* got True"):
        check("x", lambda x: x, lambda dy: dy, {"x": numpy.ones(3)}, max_entries=True)
    crf = DenseCRF()
    with pytest.raises(ValueError, match="the batch is empty"):
        crf.refine(numpy.zeros((0, 3, 4, 4)), numpy.zeros((0, 3, 4, 4)))
    with pytest.raises(TypeError, match="images must be float32 or float64, got uint8"):
        crf.refine(numpy.zeros((1, 3, 4, 4)), numpy.zeros((1, 3, 4, 4), numpy.uint8))
    with pytest.raises(ValueError, match=r"logits of shape \(1, 0, 4, 4\) have no class"):
        crf.refine(numpy.zeros((1, 0, 4, 4)), numpy.zeros((1, 3, 4, 4)))
