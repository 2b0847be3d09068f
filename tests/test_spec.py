"""The stage-1 models against the architecture spec (rnng-architecture.md, "RNN-G: the exact network
minirnng implements"): their outputs, parameter names, shapes and counts.

The outputs are compared, in float64, with an independent reference written from the spec alone
(tests/spec_reference.py: plain loops and einsum, no minirnng code). The gradient tests of
tests/test_models.py only check that ``backward`` agrees with ``forward``; these tests check that
``forward`` is the spec's network: which layer reads which tensor (the coarse head X, the edge head
G), every ReLU, the gated scan of eq. 3 in each direction and the max merge, eq. 1 for PlainRNN.
"""

import math

import numpy
import pytest

from minirnng.models import CNNCRF, CNNS, RNNG, CNNDeep, PlainRNN
from spec_reference import DIRECTIONS, reference_forward

#: the model classes, by the name ``spec_reference.reference_forward`` knows their network by
#: (CNNCRF's network is CNN-S's: the CRF only runs in ``predict``, spec "Baselines")
NETWORK = {RNNG: "rnng", CNNS: "cnn-s", CNNDeep: "cnn-deep", PlainRNN: "rnn", CNNCRF: "cnn-s"}

# -- the parameter table (spec, "Conventions" for the layouts and "Stage 1" for the layers) ----------
#: conv1 .. deconv6, shared by every stage-1 model. Conv2d weights are (out, in, k, k),
#: ConvTranspose2d weights (in, out, k, k).
TRUNK_SHAPES = {
    "conv1.weight": (16, 3, 5, 5), "conv1.bias": (16,),         # Conv2d 3->16, 5x5
    "conv3.weight": (32, 16, 3, 3), "conv3.bias": (32,),        # Conv2d 16->32, 3x3
    "conv5.weight": (32, 32, 3, 3), "conv5.bias": (32,),        # Conv2d 32->32, 3x3
    "deconv6.weight": (32, 16, 4, 4), "deconv6.bias": (16,),    # ConvTranspose2d 32->16, 4x4
}
#: FourWayGatedRNN(8) (RNNG), or the four SpatialRNN of PlainRNN: W (C, C) and b (C,) per direction
RECURRENT_SHAPES = {f"rnn.{direction}.{name}": shape
                    for direction in DIRECTIONS for name, shape in (("W", (8, 8)), ("b", (8,)))}
#: CNNDeep's two Conv2d 8->32->8, 3x3 (the spec gives the shapes; the names are minirnng's)
DEEP_SHAPES = {
    "deep1.weight": (32, 8, 3, 3), "deep1.bias": (32,),
    "deep2.weight": (8, 32, 3, 3), "deep2.bias": (8,),
}


def head_shapes(k):
    """conv8 (Conv2d 8->K, 1x1), deconv9 (ConvTranspose2d K->K, 4x4), coarse (Conv2d 8->K, 1x1) and
    edge (Conv2d 8->1, 1x1), for K classes (spec, "Stage 1")."""
    return {
        "conv8.weight": (k, 8, 1, 1), "conv8.bias": (k,),
        "deconv9.weight": (k, k, 4, 4), "deconv9.bias": (k,),
        "coarse.weight": (k, 8, 1, 1), "coarse.bias": (k,),
        "edge.weight": (1, 8, 1, 1), "edge.bias": (1,),
    }


def spec_parameter_shapes(model_class, k):
    """Parameter name -> shape of the spec's ``model_class`` network with ``k`` classes."""
    shapes = dict(TRUNK_SHAPES)
    if model_class in (RNNG, PlainRNN):
        shapes.update(RECURRENT_SHAPES)
    if model_class is CNNDeep:
        shapes.update(DEEP_SHAPES)
    shapes.update(head_shapes(k))
    return shapes


# -- a model whose every parameter matters -----------------------------------------------------------
def spec_model(model_class, k, seed):
    """A float64 model with random non-zero biases (the initial ones are zero, which lets some wrong
    wirings give nearly the same numbers) and a distinct random recurrent W and b per direction (the
    initial W are all the identity, which makes the four directions tie). Each W has largest
    absolute row sum 0.9, within the spec's stability bound (spec, "Training loss", Stability)."""
    model = model_class(n_classes=k, rng=seed, dtype=numpy.float64)
    rng = numpy.random.default_rng(seed)
    for name, value in model.params().items():
        if name.endswith(".bias") or name.endswith(".b"):
            value[...] = rng.normal(0.0, 0.3, value.shape)
        elif name.endswith(".W"):
            W = rng.standard_normal(value.shape)
            value[...] = 0.9 * W / numpy.abs(W).sum(axis=1).max()
    return model


def assert_close(actual, expected, what, rtol=1e-12):
    """Same shape, and every entry within ``rtol`` times the largest magnitude of ``expected``."""
    actual = numpy.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, the spec's {expected.shape}"
    error = float(numpy.abs(actual - expected).max())
    scale = float(numpy.abs(expected).max())
    assert error <= rtol * scale, f"{what}: differs from the spec's reference by {error:.3g} (scale {scale:.3g})"


# -- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 11])
@pytest.mark.parametrize("model_class", [RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF])
def test_forward_is_the_spec_network(model_class, k):
    model = spec_model(model_class, k, seed=k)
    images = numpy.random.default_rng(100 + k).uniform(-1.0, 1.0, (2, 3, 32, 24))
    expected, notes = reference_forward(NETWORK[model_class], model.params(), images)

    # The comparison can only see a ReLU that clips something, and a direction that wins somewhere.
    for name, fraction in notes.items():
        if name.endswith("zeroes"):
            assert 0.05 < fraction < 0.95, f"{name}: {fraction:.2f} of its inputs negative"
    assert all(count > 0 for count in notes.get("wins", [1])), f"elements won per direction: {notes['wins']}"

    outputs = model.forward(images)
    assert set(outputs) == {"logits", "coarse", "edge"}
    for name in ("logits", "coarse", "edge"):
        assert outputs[name].dtype == numpy.float64
        assert_close(outputs[name], expected[name], f"{model_class.__name__} (K={k}) {name}")
    assert_close(model.infer(images), expected["logits"], f"{model_class.__name__} (K={k}) infer")


@pytest.mark.parametrize("k", [3, 11])
@pytest.mark.parametrize("model_class", [RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF])
def test_parameter_names_and_shapes_are_the_spec_table(model_class, k):
    model = model_class(n_classes=k, rng=0)
    shapes = {name: tuple(value.shape) for name, value in model.params().items()}
    assert shapes == spec_parameter_shapes(model_class, k)
    assert {name: tuple(value.shape) for name, value in model.grads().items()} == shapes
    assert model.parameter_count() == sum(math.prod(shape) for shape in shapes.values())


def test_parameter_counts():
    """RNN-G has 23,810 parameters and CNN-Deep 28,170 for 3 classes (docs/architecture.md); the
    11-class counts follow from the spec's table."""
    assert RNNG(n_classes=3, rng=0).parameter_count() == 23_810
    assert CNNDeep(n_classes=3, rng=0).parameter_count() == 28_170
    for model_class in (RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF):
        expected = sum(math.prod(shape) for shape in spec_parameter_shapes(model_class, 11).values())
        assert model_class(n_classes=11, rng=0).parameter_count() == expected, model_class.__name__
    # by hand, for RNN-G: the 3-class count with conv8, deconv9 and coarse grown from 3 to 11 classes
    assert RNNG(n_classes=11, rng=0).parameter_count() == 23_810 + 2 * (9 * 8) + (11 * 11 - 3 * 3) * 16 + 8
