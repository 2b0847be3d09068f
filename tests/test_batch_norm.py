"""BatchNorm2d: finite differences, the naive twin, the running statistics, folding into a
convolution, and RNN-G trained with it and saved without it."""

import numpy
import pytest

from minirnng import backend
from minirnng.gradcheck import check_layer, check_model
from minirnng.layers import BatchNorm2d, Conv2d, ConvTranspose2d, naive
from minirnng.layers.normalization import fold_into_convolution
from minirnng.models import ARCHITECTURES, RNNG, load_model
from minirnng.parallel import DataParallel
from minirnng.train import TrainConfig, Trainer, build_optimizer


def normalization(channels, rng, dtype=numpy.float64, cls=BatchNorm2d, **options):
    """A BatchNorm2d with weight and bias away from 1 and 0 (weights of both signs)."""
    layer = cls(channels, dtype=dtype, **options)
    layer.params["weight"][...] = rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 1.5, channels)
    layer.params["bias"][...] = rng.standard_normal(channels)
    return layer


def channels_apart(rng, shape, dtype=numpy.float64):
    """Inputs whose channels have their own offset and spread, as a convolution's outputs do."""
    offsets = rng.uniform(-3, 3, (1, shape[1], 1, 1))
    spreads = rng.uniform(0.5, 3, (1, shape[1], 1, 1))
    return (offsets + spreads * rng.standard_normal(shape)).astype(dtype)


def test_gradients_match_finite_differences(rng):
    layer = normalization(3, rng)
    report = check_layer(layer, channels_apart(rng, (2, 3, 5, 4)), rng=rng)
    print(report)
    assert report.passed(1e-7), report
    assert {row.name for row in report.rows} == {"x", "weight", "bias"}  # the statistics have no gradient


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_the_fast_path_matches_the_naive_twin(dtype, rng):
    fast = normalization(4, rng, dtype)
    slow = normalization(4, rng, dtype, cls=naive.BatchNorm2d)
    for name, value in fast.params.items():
        slow.params[name][...] = value
    x = channels_apart(rng, (3, 4, 5, 6), dtype)
    upstream = rng.standard_normal(x.shape).astype(dtype)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == numpy.float64 else {"rtol": 1e-5, "atol": 1e-5}
    numpy.testing.assert_allclose(fast.forward(x), slow.forward(x), **tolerance)
    numpy.testing.assert_allclose(fast.backward(upstream), slow.backward(upstream), **tolerance)
    for name in fast.params:
        numpy.testing.assert_allclose(fast.params[name], slow.params[name], err_msg=name, **tolerance)
    for name in fast.grads:
        numpy.testing.assert_allclose(fast.grads[name], slow.grads[name], err_msg=name, **tolerance)


def test_forward_normalises_each_channel_and_keeps_its_input(rng):
    layer = BatchNorm2d(3, dtype=numpy.float64)  # weight 1, bias 0: y is xhat
    x = channels_apart(rng, (4, 3, 6, 5))
    kept = x.copy()
    y = layer.forward(x)
    numpy.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    numpy.testing.assert_allclose(y.var(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)) / (x.var(axis=(0, 2, 3)) + 1e-5))
    numpy.testing.assert_array_equal(x, kept)
    upstream = rng.standard_normal(y.shape)
    kept_upstream = upstream.copy()
    layer.backward(upstream)
    numpy.testing.assert_array_equal(upstream, kept_upstream)


def test_running_statistics_follow_the_batches_and_inference_uses_them(rng):
    layer = normalization(3, rng, momentum=0.25)
    x = channels_apart(rng, (4, 3, 6, 5))
    layer.forward(x)
    mean, variance = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    numpy.testing.assert_allclose(layer.params["running_mean"], 0.25 * mean)
    numpy.testing.assert_allclose(layer.params["running_var"], 0.75 + 0.25 * variance)
    for _ in range(200):  # the same batch again and again: the running statistics converge to its own
        layer.forward(x)
    numpy.testing.assert_allclose(layer.infer(x), layer.forward(x), rtol=1e-9, atol=1e-9)

    running = {name: layer.params[name].copy() for name in ("running_mean", "running_var")}
    layer.params["running_mean"][...] = [1.0, -2.0, 0.5]
    layer.params["running_var"][...] = [4.0, 0.25, 1.0]
    expected = ((x - layer.params["running_mean"].reshape(1, -1, 1, 1))
                / numpy.sqrt(layer.params["running_var"].reshape(1, -1, 1, 1) + 1e-5)
                * layer.params["weight"].reshape(1, -1, 1, 1) + layer.params["bias"].reshape(1, -1, 1, 1))
    numpy.testing.assert_allclose(layer.infer(x), expected, rtol=1e-12)
    layer.tracks_statistics = False
    before = {name: layer.params[name].copy() for name in running}
    layer.forward(channels_apart(rng, x.shape))
    for name, value in before.items():
        numpy.testing.assert_array_equal(layer.params[name], value, err_msg=f"{name} moved while not tracking")


def test_inference_on_inputs_far_from_zero_keeps_float32_precision(rng):
    # activations near 10^4 with a spread of 1: scale * x + shift would lose three digits to the
    # cancellation of two numbers near 10^4; centring first, as the training pass does, keeps them
    layer = normalization(3, rng, dtype=numpy.float32)
    x = (1e4 + rng.standard_normal((2, 3, 5, 4))).astype(numpy.float32)
    layer.params["running_mean"][...] = x.mean(axis=(0, 2, 3))
    layer.params["running_var"][...] = x.var(axis=(0, 2, 3))
    p = {name: value.astype(numpy.float64).reshape(1, -1, 1, 1) for name, value in layer.params.items()}
    exact = (x - p["running_mean"]) / numpy.sqrt(p["running_var"] + 1e-5) * p["weight"] + p["bias"]
    numpy.testing.assert_allclose(layer.infer(x), exact, rtol=0, atol=2e-6)


def test_bad_input_and_settings_are_clear_errors(rng):
    layer = BatchNorm2d(3)
    with pytest.raises(ValueError, match="3 channels on axis 1"):
        layer.forward(numpy.zeros((2, 4, 5, 5), numpy.float32))
    with pytest.raises(ValueError, match="4 dimensions"):
        layer.forward(numpy.zeros((2, 3, 5), numpy.float32))
    with pytest.raises(TypeError, match="float64, but the layer works in float32"):
        layer.forward(numpy.zeros((2, 3, 5, 5)))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(numpy.zeros((2, 3, 5, 5), numpy.float32))
    with pytest.raises(ValueError, match="eps must be positive"):
        BatchNorm2d(3, eps=0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        BatchNorm2d(3, momentum=1.5)
    with pytest.raises(TypeError, match="BatchNorm2d: momentum must be a number, got 'x'"):
        BatchNorm2d(3, momentum="x")
    with pytest.raises(TypeError, match="BatchNorm2d: eps must be a number, got None"):
        BatchNorm2d(3, eps=None)
    with pytest.raises(ValueError, match="channels"):
        BatchNorm2d(0)
    with pytest.raises(TypeError, match="batch_norm must be True or False"):
        RNNG(3, batch_norm="yes")


def test_one_value_per_channel_is_refused_in_training_and_normalised_in_inference(rng):
    # its own mean: the output would be the bias whatever the input, and every gradient before it 0
    layer = BatchNorm2d(2, dtype=numpy.float64)
    x = rng.standard_normal((1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"BatchNorm2d: .*more than one value per channel.*\(1, 2, 1, 1\)"):
        layer.forward(x)
    assert layer.infer(x).shape == x.shape
    layer.forward(rng.standard_normal((2, 2, 1, 1)))  # two images of one pixel: two values a channel
    model = RNNG(3, rng=0, batch_norm=True)  # at 4 x 4, bn5 sees one pixel of each image
    with pytest.raises(ValueError, match="more than one value per channel"):
        model.forward(rng.uniform(-0.5, 0.5, (1, 3, 4, 4)).astype(numpy.float32))


def test_checking_a_model_leaves_its_running_statistics_as_they_were(rng):
    model = RNNG(3, rng=0, dtype=numpy.float64, batch_norm=True)
    kept = {name: value.copy() for name, value in model.params().items()}
    check_model(model, rng.uniform(-0.5, 0.5, (2, 3, 8, 8)), rng=rng, max_entries=2)
    for name, value in model.params().items():
        numpy.testing.assert_array_equal(value, kept[name], err_msg=name)


@pytest.mark.parametrize("transposed", [False, True], ids=["Conv2d", "ConvTranspose2d"])
def test_folding_into_the_convolution_gives_the_same_inference(transposed, rng):
    conv = (ConvTranspose2d(3, 4, 4, stride=2, padding=1, rng=0, dtype=numpy.float64) if transposed
            else Conv2d(3, 4, 3, padding=1, rng=0, dtype=numpy.float64))
    conv.params["bias"][...] = rng.standard_normal(4)
    norm = normalization(4, rng)
    norm.params["running_mean"][...] = rng.standard_normal(4)
    norm.params["running_var"][...] = rng.uniform(0.2, 3, 4)
    x = rng.standard_normal((2, 3, 6, 5))
    expected = norm.infer(conv.forward(x))
    weight, bias = fold_into_convolution(conv.params["weight"], conv.params["bias"], norm, transposed=transposed)
    conv.params["weight"][...], conv.params["bias"][...] = weight, bias
    numpy.testing.assert_allclose(conv.forward(x), expected, rtol=1e-12, atol=1e-12)
    # a convolution without a bias folds as one with a zero bias; another channel count is named
    _, no_bias = fold_into_convolution(weight, None, norm, transposed=transposed)
    numpy.testing.assert_array_equal(no_bias, fold_into_convolution(weight, numpy.zeros(4), norm, transposed)[1])
    with pytest.raises(ValueError, match="has 5 output channels .* the BatchNorm2d normalises 4"):
        fold_into_convolution(numpy.zeros((3, 5, 4, 4) if transposed else (5, 3, 3, 3)), numpy.zeros(5), norm,
                              transposed=transposed)


# -- RNN-G with batch normalisation -------------------------------------------------------------------

def assert_same_logits(actual, expected):
    """Folding reassociates float64 sums, so the logits agree to rounding relative to their scale:
    with trained-looking statistics some logits are in the hundreds and others near zero, and how
    much of the large ones' rounding reaches a small one depends on the BLAS kernels of the CPU."""
    numpy.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * numpy.abs(expected).max())


def trained_looking(model, rng):
    """Give the normalisations of ``model`` weights, biases and running statistics of a trained network."""
    for name in type(model).NORMALIZED.values():
        layer = model.layers[name]
        layer.params["weight"][...] = rng.uniform(0.5, 1.5, layer.channels)
        layer.params["bias"][...] = 0.1 * rng.standard_normal(layer.channels)
        layer.params["running_mean"][...] = 0.1 * rng.standard_normal(layer.channels)
        layer.params["running_var"][...] = rng.uniform(0.01, 0.1, layer.channels)
    return model


def test_rnng_with_batch_norm_passes_finite_differences(rng):
    model = trained_looking(RNNG(3, rng=0, dtype=numpy.float64, batch_norm=True), rng)
    model.randomize_recurrence(1)
    assert model.trunk == ("conv1", "bn1", "pool2", "relu1", "conv3", "bn3", "pool4", "relu3", "conv5", "bn5",
                           "relu5", "deconv6")
    # A convolution's bias before a normalisation moves a whole channel, which the normalisation
    # subtracts again: its gradient is zero, and a finite difference of it is rounding noise.
    # Declared, its row measures both against the largest gradient of the other rows.
    redundant = {f"{conv}.bias" for conv in RNNG.NORMALIZED}
    report = check_model(model, rng.uniform(-0.5, 0.5, (2, 3, 16, 16)), rng=rng, expect_zero=redundant)
    print(report)
    assert {row.name for row in report.rows if row.expected_zero} == redundant
    assert report.passed(1e-6), str(report)
    for name in redundant:
        assert numpy.abs(model.grads()[name]).max() < 1e-12 * numpy.abs(model.grads()["conv1.weight"]).max()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_folded_model_is_the_plain_network_with_the_same_inference(architecture, rng):
    model = trained_looking(ARCHITECTURES[architecture](3, rng=0, dtype=numpy.float64, batch_norm=True), rng)
    model.classes = ["background", "skin", "hair"]
    plain = model.folded()
    assert type(plain) is type(model) and not plain.batch_norm and "batch_norm" not in plain.config()
    assert set(plain.params()) == {name for name in model.params() if not name.startswith("bn")}
    assert plain.classes == model.classes
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 16))
    assert_same_logits(plain.infer(images), model.infer(images))
    numpy.testing.assert_array_equal(plain.predict(images), model.predict(images))
    with backend.use("cuda-emulator"):
        assert_same_logits(model.infer(images), plain.infer(images))


def test_folded_handles_a_normalised_transposed_convolution(rng):
    # deconv6 stores its weight (in, out, k, k): folding must scale axis 1, not axis 0
    class RNNGWithBN6(RNNG):
        NORMALIZED = {**RNNG.NORMALIZED, "deconv6": "bn6"}

    model = trained_looking(RNNGWithBN6(3, rng=0, dtype=numpy.float64, batch_norm=True), rng)
    assert "bn6" in model.trunk
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 16))
    assert_same_logits(model.folded().infer(images), model.infer(images))


def test_a_checkpoint_keeps_the_normalisation_and_its_statistics(tmp_path, rng):
    model = trained_looking(RNNG(3, rng=0, batch_norm=True), rng)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "bn.npz")
    loaded = load_model(tmp_path / "bn.npz")
    assert loaded.batch_norm and loaded.trunk == model.trunk
    for name, value in model.params().items():
        numpy.testing.assert_array_equal(loaded.params()[name], value, err_msg=name)
    images = rng.uniform(-0.5, 0.5, (1, 3, 16, 16)).astype(numpy.float32)
    numpy.testing.assert_array_equal(loaded.infer(images), model.infer(images))


def test_the_optimizer_trains_weight_and_bias_but_not_the_statistics():
    model = RNNG(3, rng=0, batch_norm=True)
    optimizer = build_optimizer(TrainConfig(batch_norm=True, weight_decay=1e-4), model)
    assert set(optimizer.params) == set(model.grads())
    assert {"bn1.weight", "bn1.bias"} <= set(optimizer.params)
    assert not any(name.endswith(("running_mean", "running_var")) for name in optimizer.params)


def test_worker_threads_normalise_their_own_shard_and_only_the_model_tracks(rng):
    model = RNNG(3, rng=0, dtype=numpy.float64, batch_norm=True)
    alone = RNNG(3, rng=0, dtype=numpy.float64, batch_norm=True)
    network = DataParallel(model, 2)
    assert not any(network.replicas[1].layers[name].tracks_statistics for name in RNNG.NORMALIZED.values())
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    logits = network.forward(images)["logits"]
    # each shard is its own batch for the normalisation ("ghost batches" of N / workers images)
    expected = numpy.concatenate([alone.forward(images[:2])["logits"], alone.replica().forward(images[2:])["logits"]])
    numpy.testing.assert_allclose(logits, expected, rtol=1e-12, atol=1e-13)
    for name in ("bn1.running_mean", "bn3.running_var", "bn5.running_mean"):
        numpy.testing.assert_array_equal(model.params()[name], alone.params()[name], err_msg=name)
    numpy.testing.assert_allclose(network.infer(images), alone.infer(images), rtol=1e-12, atol=1e-13)


def test_worker_processes_give_the_threads_bits_and_leave_the_statistics_to_the_model(rng):
    from minirnng.processes import ProcessParallel
    model = RNNG(3, rng=0, dtype=numpy.float64, batch_norm=True)
    reference = RNNG(3, rng=0, dtype=numpy.float64, batch_norm=True)
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    with ProcessParallel(model, 2) as processes:
        for _ in range(2):  # the second pass sends the statistics the first one moved
            outputs, expected = processes.forward(images), DataParallel(reference, 2).forward(images)
            for name in expected:
                numpy.testing.assert_array_equal(outputs[name], expected[name], err_msg=name)
        numpy.testing.assert_array_equal(processes.infer(images), reference.infer(images))
    for name, value in reference.params().items():
        numpy.testing.assert_array_equal(model.params()[name], value, err_msg=name)


def test_training_with_batch_norm_saves_the_plain_network_as_best_and_resumes(tiny_data, tmp_path):
    config = TrainConfig(epochs=2, batch_size=4, lr=5e-3, batch_norm=True, seed=3)
    history = Trainer(config, *tiny_data, tmp_path / "whole", progress=False, log=lambda line: None,
                      workers=2, parallel="threads").run()
    best = load_model(tmp_path / "whole" / "best.npz")
    assert not best.batch_norm and not any(name.startswith("bn") for name in best.params())
    last = load_model(tmp_path / "whole" / "last.npz")
    assert last.batch_norm
    validation = tiny_data[1]
    from minirnng.train import evaluate
    best_epoch = max(history, key=lambda row: row["val_accuracy"])
    assert evaluate(best, validation)["accuracy"] == pytest.approx(best_epoch["val_accuracy"], abs=1e-12)

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt  # killed right after the epoch's checkpoint was written

    with pytest.raises(Interrupt):
        Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=stop_after_first_epoch,
                workers=2, parallel="threads").run()
    resumed = Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=lambda line: None,
                      workers=2, parallel="threads").run(resume=True)
    assert [row["train_loss"] for row in resumed] == [row["train_loss"] for row in history]
    for name, value in last.params().items():  # the running statistics too
        numpy.testing.assert_array_equal(load_model(tmp_path / "resumed" / "last.npz").params()[name], value,
                                         err_msg=name)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("device", ["cuda-emulator", pytest.param("cupy", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_rnng_with_batch_norm_on_the_kernel_path_matches_the_numpy_path(device, dtype, rng):
    reference = trained_looking(RNNG(3, rng=0, dtype=dtype, batch_norm=True), rng)
    reference.randomize_recurrence(2)
    with backend.use(device):
        model = RNNG(3, rng=0, dtype=dtype, batch_norm=True)
        model.load_params({name: backend.to_numpy(value) for name, value in reference.params().items()})
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 12)).astype(dtype)
    with backend.use("numpy"):
        expected_outputs = reference.forward(images)
        upstream = {name: rng.standard_normal(value.shape).astype(dtype) for name, value in expected_outputs.items()}
        reference.zero_grad()
        dimages = reference.backward(upstream)
        expected_inferred = reference.infer(images)
    with backend.use(device):
        outputs = model.forward(backend.to_device(images))
        model.zero_grad()
        device_dimages = model.backward({name: backend.to_device(value) for name, value in upstream.items()})
        inferred = backend.to_numpy(model.infer(backend.to_device(images)))
        folded = backend.to_numpy(model.folded().infer(backend.to_device(images)))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == numpy.float32 else {"rtol": 1e-10, "atol": 1e-10}

    def scaled(actual, expected, name):
        scale = max(float(numpy.abs(expected).max()), 1e-30)
        numpy.testing.assert_allclose(backend.to_numpy(actual) / scale, expected / scale, err_msg=name, **tolerance)
    for name, value in expected_outputs.items():
        scaled(outputs[name], value, name)
    scaled(device_dimages, dimages, "dimages")
    redundant = {f"{conv}.bias" for conv in RNNG.NORMALIZED}  # zero gradients: rounding noise on both paths
    for name, grad in reference.grads().items():
        if name not in redundant:
            scaled(model.grads()[name], grad, f"grad {name}")
    for name, value in reference.params().items():  # the running statistics moved by the one forward
        scaled(model.params()[name], value, name)
    scaled(inferred, expected_inferred, "infer")
    scaled(folded, expected_inferred, "folded infer")


def test_starting_from_a_checkpoint_of_the_other_kind_is_a_clear_error(tiny_data, tmp_path):
    RNNG(3, rng=0).save(tmp_path / "plain.npz")
    config = TrainConfig(epochs=1, batch_size=4, batch_norm=True, init=str(tmp_path / "plain.npz"))
    with pytest.raises(ValueError, match="without batch normalisation and this run trains one with"):
        Trainer(config, *tiny_data, tmp_path / "run", progress=False, log=lambda line: None).run()


def test_the_statistics_of_a_large_float32_image_stay_within_a_few_roundings(rng):
    """Blocks of each row summed in float32, the blocks in float64: at 512 x 512, where a dot
    product along a whole row drifted by 3e-6, the variance is within 1e-7 of a float64 one; also
    for channels-last input (a strided view)."""
    from minirnng.layers.normalization import channel_totals

    x = (5 + rng.standard_normal((2, 3, 512, 512))).astype(numpy.float32)
    for images in (x, numpy.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        rows = images.reshape(2, 3, -1)
        exact = images.astype(numpy.float64)
        numpy.testing.assert_allclose(channel_totals(rows), exact.sum(axis=(0, 2, 3)), rtol=1e-7)
        numpy.testing.assert_allclose(channel_totals(rows, rows), (exact ** 2).sum(axis=(0, 2, 3)), rtol=1e-7)
    norm = BatchNorm2d(3, momentum=1.0)
    norm.forward(x)
    numpy.testing.assert_allclose(norm.params["running_var"], x.astype(numpy.float64).var(axis=(0, 2, 3)), rtol=1e-6)
