"""CapturedPredict: a model's predict recorded into a CUDA graph and replayed (GPU tests, skipped
without one), and its refusal, with the reason, where there is no GPU to record on."""

import numpy
import pytest

from minirnng import backend
from minirnng.cuda.graph import CapturedPredict
from minirnng.models import RNNG
from minirnng.models.baselines import CNNS

GPU_USABLE, GPU_REASON = backend.cupy_status()
requires_gpu = pytest.mark.skipif(not GPU_USABLE, reason=f"no usable GPU: {GPU_REASON}")


@pytest.mark.skipif(GPU_USABLE, reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_refusal_names_the_reason():
    with pytest.raises(backend.BackendError, match="needs a GPU, but"):
        CapturedPredict(RNNG(3, rng=0), (1, 3, 16, 16))


def gpu_model(model_class, seed):
    """``model_class`` on the GPU with the weights of the same model built on the host."""
    with backend.use("numpy"):
        host = model_class(3, rng=seed)
        host.randomize_recurrence(seed)
    with backend.use("cupy"):
        model = model_class(3, rng=seed)
        model.load_params(host.params())
    return model


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("model_class, shape", [(RNNG, (1, 3, 128, 128)), (RNNG, (2, 3, 64, 48)),
                                                (CNNS, (1, 3, 32, 32))], ids=["rnng-1", "rnng-2", "cnns-1"])
def test_replays_give_the_labels_of_eager_predict(model_class, shape):
    import cupy
    model = gpu_model(model_class, seed=1)
    rng = numpy.random.default_rng(2)
    with backend.use("cupy"):
        captured = CapturedPredict(model, shape)
        results = []
        for _ in range(3):  # new images each time: the recorded input buffer is refilled
            images = cupy.asarray(rng.uniform(-0.5, 0.5, shape).astype(numpy.float32))
            labels = captured(images)
            numpy.testing.assert_array_equal(cupy.asnumpy(labels), cupy.asnumpy(model.predict(images)))
            results.append((labels, cupy.asnumpy(labels)))
        for labels, copy in results:  # each call returned its own array, untouched by later replays
            numpy.testing.assert_array_equal(cupy.asnumpy(labels), copy)
    for layer in model.layers.values():  # the recording's "direct" setting was undone
        assert getattr(layer, "gpu_algorithm", "auto") == "auto"


@pytest.mark.gpu
@requires_gpu
def test_a_replay_reads_parameters_updated_in_place():
    import cupy
    model = gpu_model(RNNG, seed=3)
    images = cupy.asarray(numpy.random.default_rng(4).uniform(-0.5, 0.5, (1, 3, 32, 32)).astype(numpy.float32))
    with backend.use("cupy"):
        captured = CapturedPredict(model, images.shape)
        before = cupy.asnumpy(captured(images))
        rare = int(numpy.bincount(before.ravel(), minlength=3).argmin())  # a class not everywhere yet
        bias = numpy.zeros(3, numpy.float32)
        bias[rare] = 100.0
        model.layers["deconv9"].params["bias"][...] = cupy.asarray(bias)
        after = cupy.asnumpy(captured(images))
    assert (before != rare).any() and (after == rare).all()


@pytest.mark.gpu
@requires_gpu
def test_bad_inputs_are_refused_with_the_recorded_shape():
    import cupy
    model = gpu_model(RNNG, seed=5)
    with backend.use("cupy"):
        captured = CapturedPredict(model, (1, 3, 32, 32))
        with pytest.raises(TypeError, match="must be a CuPy array"):
            captured(numpy.zeros((1, 3, 32, 32), numpy.float32))
        with pytest.raises(ValueError, match=r"recorded for images \(1, 3, 32, 32\) float32, got \(2, 3, 32, 32\)"):
            captured(cupy.zeros((2, 3, 32, 32), cupy.float32))
        with pytest.raises(ValueError, match="shape must be"):
            CapturedPredict(model, (3, 32, 32))
    with backend.use("numpy"):
        host_model = RNNG(3, rng=0)
    with pytest.raises(ValueError, match="not on the GPU"):
        CapturedPredict(host_model, (1, 3, 32, 32))
