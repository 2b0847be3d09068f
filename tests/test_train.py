"""Training: optimizers, schedules, the objective, and runs that resume exactly where they stopped."""

import csv
import dataclasses
import json
import os

import numpy
import pytest

from minirnng.data.classes import HELEN_CLASSES, mirror_permutation
from minirnng.losses import ColourAffinity, SoftDice
from minirnng.models import RNNG
from minirnng.objective import StageOneObjective, class_balance_weights
from minirnng.optim import SGD, Adam, AdamW, learning_rate
from minirnng.train import AUGMENTATIONS, TrainConfig, Trainer, evaluate, progress_bar


def quadratic(rng):
    params = {"layer.weight": rng.standard_normal(5), "layer.bias": rng.standard_normal(5)}
    grads = {name: numpy.zeros_like(value) for name, value in params.items()}
    return params, grads


def test_sgd_with_momentum_matches_the_formula(rng):
    params, grads = quadratic(rng)
    start = {k: v.copy() for k, v in params.items()}
    optimizer = SGD(params, grads, lr=0.1, momentum=0.9, weight_decay=0.01)
    velocity = {k: numpy.zeros(5) for k in params}
    expected = {k: v.copy() for k, v in start.items()}
    for _ in range(3):
        for name in params:
            grads[name][...] = 2 * params[name]  # gradient of |p|^2
        optimizer.step()
        for name in expected:
            g = 2 * expected[name] + (0.01 * expected[name] if name.endswith("weight") else 0)
            velocity[name] = 0.9 * velocity[name] + g
            expected[name] = expected[name] - 0.1 * velocity[name]
    for name in params:
        numpy.testing.assert_allclose(params[name], expected[name], rtol=1e-12)


def adam_formula(p, g, moments, t, lr):
    """One Adam step written out (default betas and eps): the new p and the new (m, v)."""
    m, v = moments
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return p - lr * (m / (1 - 0.9 ** t)) / (numpy.sqrt(v / (1 - 0.999 ** t)) + 1e-8), (m, v)


def test_adam_matches_the_formula_and_its_state_round_trips(rng):
    params, grads = quadratic(rng)
    optimizer = Adam(params, grads, lr=0.01)
    p = params["layer.weight"].copy()
    moments = (numpy.zeros(5), numpy.zeros(5))
    for t in range(1, 4):
        for name in params:
            grads[name][...] = 2 * params[name]
        optimizer.step()
        p, moments = adam_formula(p, 2 * p, moments, t, lr=0.01)
    numpy.testing.assert_allclose(params["layer.weight"], p, rtol=1e-10)
    copy_params = {k: v.copy() for k, v in params.items()}
    twin = Adam(copy_params, {k: numpy.zeros_like(v) for k, v in params.items()}, lr=0.01)
    twin.load_state_arrays(optimizer.state_arrays())
    assert twin.steps == 3
    numpy.testing.assert_array_equal(twin.state["m/layer.weight"], optimizer.state["m/layer.weight"])
    with pytest.raises(ValueError, match="does not fit"):
        twin.load_state_arrays({"steps": numpy.array(1), "m/other.weight": numpy.zeros(5)})
    # a state that lacks a buffer, or holds NaN, would go on quietly unlike the run that wrote it
    state = optimizer.state_arrays()
    without_v = {key: value for key, value in state.items() if not key.startswith("v/")}
    with pytest.raises(ValueError, match=r"after 3 steps lacks 2 of its buffers \(v/layer.weight, v/layer.bias\)"):
        twin.load_state_arrays(without_v)
    with pytest.raises(ValueError, match="'m/layer.weight' holds NaN"):
        twin.load_state_arrays({**state, "m/layer.weight": numpy.full(5, numpy.nan)})
    assert twin.steps == 3  # a refused state changes nothing
    twin.load_state_arrays({"steps": numpy.array(0)})  # before the first step there is nothing to keep
    plain = SGD(copy_params, {k: numpy.zeros_like(v) for k, v in params.items()}, lr=0.01, momentum=0)
    plain.load_state_arrays({"steps": numpy.array(5)})  # plain SGD keeps no buffer


@pytest.mark.parametrize("optimizer_class", [SGD, Adam, AdamW])
def test_every_optimizer_step_leaves_no_subnormal_weight(optimizer_class):
    tiny = numpy.finfo(numpy.float32).tiny
    params = {"w.weight": numpy.array([tiny / 2, -tiny / 8, 0.25], numpy.float32)}
    grads = {"w.weight": numpy.zeros(3, numpy.float32)}
    optimizer_class(params, grads, lr=0.1).step()
    numpy.testing.assert_array_equal(params["w.weight"], numpy.array([0, 0, 0.25], numpy.float32))


@pytest.mark.parametrize("optimizer_class", [SGD, AdamW])
def test_a_step_flushes_weights_that_decay_into_the_subnormal_range(optimizer_class):
    # a dead channel's weight: no gradient, only the decay, which takes it just under float32's
    # smallest normal number; a weight still in the normal range, however small, is kept as it is
    tiny = numpy.finfo(numpy.float32).tiny
    params = {"w.weight": numpy.array([1.001 * tiny, -1.001 * tiny, 1e-30, 0.5], numpy.float32)}
    grads = {"w.weight": numpy.zeros(4, numpy.float32)}
    optimizer_class(params, grads, lr=0.1, weight_decay=0.1).step()
    w = params["w.weight"]
    assert w[0] == 0 and w[1] == 0
    assert 0 < w[2] < 1e-30 and 0.49 < w[3] < 0.5


def test_adamw_decays_the_weights_directly_and_adam_through_the_gradient(rng):
    # AdamW: the weight shrinks by lr * wd, then Adam's step on the plain gradient; the bias is
    # not decayed, so it moves exactly as with Adam and no decay. Adam with wd: Adam on grad + wd p.
    params, grads = quadratic(rng)
    start = {k: v.copy() for k, v in params.items()}
    lr, wd = 0.01, 0.5
    optimizer = AdamW(params, grads, lr=lr, weight_decay=wd)
    coupled_params = {k: v.copy() for k, v in start.items()}
    coupled = Adam(coupled_params, {k: numpy.zeros(5) for k in start}, lr=lr, weight_decay=wd)
    no_decay_params = {k: v.copy() for k, v in start.items()}
    no_decay = Adam(no_decay_params, {k: numpy.zeros(5) for k in start}, lr=lr)
    expected = {k: v.copy() for k, v in start.items()}
    coupled_expected = {k: v.copy() for k, v in start.items()}
    moments = {k: (numpy.zeros(5), numpy.zeros(5)) for k in start}
    coupled_moments = {k: (numpy.zeros(5), numpy.zeros(5)) for k in start}
    for t in range(1, 4):
        for opt in (optimizer, coupled, no_decay):
            for name in opt.params:
                opt.grads[name][...] = 2 * opt.params[name] + 1.0
            opt.step()
        for name in start:
            g = 2 * expected[name] + 1.0
            decayed = expected[name] * (1 - lr * wd) if name.endswith("weight") else expected[name]
            expected[name], moments[name] = adam_formula(decayed, g, moments[name], t, lr)
            g = 2 * coupled_expected[name] + 1.0 + (wd * coupled_expected[name] if name.endswith("weight") else 0)
            coupled_expected[name], coupled_moments[name] = adam_formula(coupled_expected[name], g,
                                                                         coupled_moments[name], t, lr)
    for name in start:
        numpy.testing.assert_allclose(params[name], expected[name], rtol=1e-12)
        numpy.testing.assert_allclose(coupled_params[name], coupled_expected[name], rtol=1e-12)
    numpy.testing.assert_array_equal(params["layer.bias"], no_decay_params["layer.bias"])
    assert not numpy.allclose(params["layer.weight"], coupled_params["layer.weight"], rtol=1e-6)
    assert not numpy.allclose(params["layer.weight"], no_decay_params["layer.weight"], rtol=1e-6)


@pytest.mark.parametrize("optimizer_class", [SGD, Adam, AdamW])
def test_lr_scales_multiply_the_learning_rate_of_named_parameters(optimizer_class, rng):
    # a parameter scaled by s moves as it would with the learning rate s * lr, the others as before
    params, grads = quadratic(rng)
    scaled_params = {k: v.copy() for k, v in params.items()}
    scaled_grads = {k: numpy.zeros_like(v) for k, v in params.items()}
    plain = optimizer_class(params, grads, lr=0.01)
    scaled = optimizer_class(scaled_params, scaled_grads, lr=0.01, lr_scales={"layer.weight": 0.1})
    slow = optimizer_class({"layer.weight": params["layer.weight"].copy()},
                           {"layer.weight": numpy.zeros(5)}, lr=0.001)
    for _ in range(3):
        for optimizer in (plain, scaled, slow):
            for name in optimizer.params:
                optimizer.grads[name][...] = 2 * optimizer.params[name]
            optimizer.step()
    numpy.testing.assert_array_equal(scaled_params["layer.bias"], params["layer.bias"])
    numpy.testing.assert_allclose(scaled_params["layer.weight"], slow.params["layer.weight"], rtol=1e-12)
    assert not numpy.allclose(scaled_params["layer.weight"], params["layer.weight"])
    with pytest.raises(ValueError, match="lr_scales names 'layer.other'"):
        optimizer_class(params, grads, lr=0.01, lr_scales={"layer.other": 0.1})
    with pytest.raises(ValueError, match="the lr scale of 'layer.weight' must be positive, got 0.0"):
        optimizer_class(params, grads, lr=0.01, lr_scales={"layer.weight": 0})


def test_the_recurrent_lr_scale_slows_exactly_the_recurrent_weights(tiny_data, tmp_path):
    from minirnng.train import build_optimizer
    config = TrainConfig(epochs=1, batch_size=4, recurrent_lr_scale=0.1)
    trainer = Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None, workers=1)
    names = trainer.model.recurrent_weight_names()
    assert sorted(names) == sorted(f"rnn.{d}.W" for d in ("left_to_right", "right_to_left", "top_to_bottom",
                                                          "bottom_to_top"))
    assert trainer.optimizer.lr_scales == {name: 0.1 for name in names}
    assert build_optimizer(TrainConfig(), trainer.model).lr_scales == {}
    assert build_optimizer(TrainConfig(model="cnn-s"), Trainer(
        TrainConfig(model="cnn-s"), *tiny_data, tmp_path / "s", progress=False, workers=1).model).lr_scales == {}
    trainer.run()
    with pytest.raises(ValueError, match="recurrent_lr_scale must be positive, got -1"):
        TrainConfig(recurrent_lr_scale=-1).check()


def test_learning_rate_schedules():
    assert learning_rate("constant", 0.1, 0.7) == 0.1
    assert learning_rate("cosine", 0.1, 0.0) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.1, 1.0) == pytest.approx(0.001)
    assert learning_rate("step", 0.1, 0.7) == pytest.approx(0.01)
    assert learning_rate("constant", 0.1, 0.01, warmup=0.1) < 0.02
    for schedule in ("constant", "cosine", "step"):
        for warmup in (0.0005, 0.02, 0.3):
            rates = [learning_rate(schedule, 0.1, p, warmup=warmup) for p in numpy.linspace(0, warmup, 101)]
            plain = learning_rate(schedule, 0.1, warmup)
            # a straight rise, never above the schedule, meeting it where the warm-up ends
            assert all(a <= b + 1e-15 for a, b in zip(rates, rates[1:])) and rates[-1] == plain
            assert max(rates) <= learning_rate(schedule, 0.1, 0.0) + 1e-15 and rates[0] > 0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        learning_rate("exponential", 0.1, 0.5)
    for progress in (-0.5, float("nan")):  # a negative rate would climb the loss
        with pytest.raises(ValueError, match="progress must be a fraction of the run, at least 0"):
            learning_rate("cosine", 0.1, progress, warmup=0.1)


def test_the_step_schedule_counts_its_steps_for_a_numpy_progress():
    # two numpy.bool_ comparisons add up to True ("or"), not 2: the rate must still fall twice
    for progress in (0.9, numpy.float64(0.9), numpy.float32(0.9), numpy.array(0.9)):
        assert learning_rate("step", 1.0, progress) == pytest.approx(0.01)
        assert type(learning_rate("step", 1.0, progress)) is float
    assert learning_rate("step", 1.0, numpy.float64(0.7)) == pytest.approx(0.1)
    assert learning_rate("step", 1.0, numpy.float64(0.5)) == 1.0
    assert learning_rate("cosine", 1.0, numpy.float64(0.9)) == pytest.approx(learning_rate("cosine", 1.0, 0.9))


def test_weight_decay_spares_only_the_biases():
    from minirnng.optim import decays

    # the shipped recipe decays the recurrent W and the batch-norm scales too (documented, kept)
    assert decays("conv1.weight") and decays("rnn.left_to_right.W") and decays("bn1.weight")
    assert not decays("conv1.bias") and not decays("rnn.left_to_right.b") and not decays("bn1.bias")


def test_objective_weights_its_three_terms(rng):
    outputs = {"logits": rng.standard_normal((2, 3, 8, 8)), "coarse": rng.standard_normal((2, 3, 4, 4)),
               "edge": rng.standard_normal((2, 1, 4, 4))}
    labels = rng.integers(0, 3, (2, 8, 8))
    total, parts, grads = StageOneObjective(weights=(1.0, 0.5, 2.0))(outputs, labels, numpy.random.default_rng(0))
    assert total == pytest.approx(parts["logits"] + 0.5 * parts["coarse"] + 2.0 * parts["edge"])
    _, _, unit = StageOneObjective()(outputs, labels, numpy.random.default_rng(0))
    numpy.testing.assert_allclose(grads["coarse"], 0.5 * unit["coarse"])
    numpy.testing.assert_allclose(grads["edge"], 2.0 * unit["edge"])
    assert set(StageOneObjective(weights=(1.0, 0.0, 0.0))(outputs, labels, rng)[2]) == {"logits"}



def test_the_objective_names_labels_that_are_not_a_batch_of_label_maps():
    outputs = RNNG(rng=0).forward(numpy.zeros((1, 3, 8, 8), numpy.float32))
    for labels, shown in ((numpy.zeros((8, 8), int), r"int64 array of shape \(8, 8\)"),
                          ([[[0] * 8] * 8], "list"), (numpy.zeros((1, 8, 8)), r"float64 array")):
        with pytest.raises(ValueError, match=r"labels must be an integer array \(N, H, W\).*" + shown):
            StageOneObjective()(outputs, labels, numpy.random.default_rng(0))

def test_objective_adds_a_soft_dice_term_on_the_logits(rng):
    outputs = {"logits": rng.standard_normal((2, 3, 8, 8)), "coarse": rng.standard_normal((2, 3, 4, 4)),
               "edge": rng.standard_normal((2, 1, 4, 4))}
    labels = rng.integers(0, 3, (2, 8, 8))
    objective = StageOneObjective(dice_weight=0.5)
    assert objective.term_names() == ("logits", "coarse", "edge", "dice")
    assert StageOneObjective().term_names() == ("logits", "coarse", "edge")
    total, parts, grads = objective(outputs, labels, numpy.random.default_rng(0))
    _, plain_parts, plain = StageOneObjective()(outputs, labels, numpy.random.default_rng(0))
    dice = SoftDice()
    assert parts["dice"] == pytest.approx(dice.forward(outputs["logits"], labels), rel=1e-14)
    assert total == pytest.approx(sum(plain_parts.values()) + 0.5 * parts["dice"])
    numpy.testing.assert_allclose(grads["logits"], plain["logits"] + dice.backward(0.5), rtol=1e-13, atol=1e-17)
    numpy.testing.assert_array_equal(grads["edge"], plain["edge"])  # the edge sampling draws the same pixels
    # the Dice term alone, the cross-entropy on the logits switched off
    _, parts, grads = StageOneObjective(weights=(0.0, 1.0, 1.0), dice_weight=2.0)(outputs, labels, rng)
    assert "logits" not in parts
    numpy.testing.assert_allclose(grads["logits"], dice.backward(2.0), rtol=1e-13, atol=1e-17)


def test_objective_adds_a_colour_affinity_term_on_the_logits(rng):
    outputs = {"logits": rng.standard_normal((2, 3, 8, 8)), "coarse": rng.standard_normal((2, 3, 4, 4)),
               "edge": rng.standard_normal((2, 1, 4, 4))}
    labels = rng.integers(0, 3, (2, 8, 8))
    images = rng.uniform(-0.5, 0.5, (2, 3, 8, 8)) * 0.2
    objective = StageOneObjective(dice_weight=1.0, affinity_weight=0.5)
    assert objective.term_names() == ("logits", "coarse", "edge", "dice", "affinity")
    total, parts, grads = objective(outputs, labels, numpy.random.default_rng(0), images)
    _, plain_parts, plain = StageOneObjective(dice_weight=1.0)(outputs, labels, numpy.random.default_rng(0))
    affinity = ColourAffinity()
    assert parts["affinity"] == pytest.approx(affinity.forward(outputs["logits"], images), rel=1e-14)
    assert total == pytest.approx(sum(plain_parts.values()) + 0.5 * parts["affinity"])
    numpy.testing.assert_allclose(grads["logits"], plain["logits"] + affinity.backward(0.5), rtol=1e-13, atol=1e-17)
    with pytest.raises(ValueError, match="the affinity term needs the input images"):
        objective(outputs, labels, numpy.random.default_rng(0))


def test_training_with_an_affinity_term_logs_it(tiny_data, tmp_path):
    trainer = Trainer(TrainConfig(epochs=1, batch_size=4, affinity_weight=0.5), *tiny_data, tmp_path / "affinity",
                      progress=False, log=lambda line: None, workers=1)
    row = trainer.run()[0]
    assert 0 < row["train_affinity"] < 2
    assert row["train_loss"] == pytest.approx(row["train_logits"] + row["train_coarse"] + row["train_edge"]
                                              + 0.5 * row["train_affinity"])
    saved = dataclasses.asdict(TrainConfig())
    del saved["affinity_weight"]
    assert TrainConfig(**saved).affinity_weight == 0.0
    with pytest.raises(ValueError, match="affinity_weight must be a finite number >= 0, got -1"):
        TrainConfig(affinity_weight=-1).check()


def test_training_with_a_dice_term_logs_it_and_resumes_from_older_checkpoints(tiny_data, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, dice_weight=1.0)
    trainer = Trainer(config, *tiny_data, tmp_path / "dice", progress=False, log=lambda line: None, workers=1)
    history = trainer.run()
    row = history[0]
    assert 0 < row["train_dice"] < 1
    assert row["train_loss"] == pytest.approx(row["train_logits"] + row["train_coarse"] + row["train_edge"]
                                              + row["train_dice"])
    assert "train_dice" not in Trainer(TrainConfig(epochs=1, batch_size=4), *tiny_data, tmp_path / "plain",
                                       progress=False, log=lambda line: None, workers=1).run()[0]
    # a configuration saved before the field existed reads as the spec's objective
    saved = dataclasses.asdict(TrainConfig())
    del saved["dice_weight"]
    assert TrainConfig(**saved).dice_weight == 0.0
    with pytest.raises(ValueError, match="dice_weight must be a finite number >= 0, got -1"):
        TrainConfig(dice_weight=-1).check()


def test_class_balance_weights():
    labels = numpy.array([0] * 80 + [1] * 15 + [2] * 5)
    weights = class_balance_weights(labels, 3, power=1.0)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[2] / weights[0] == pytest.approx(16.0)
    numpy.testing.assert_allclose(class_balance_weights(labels, 3, power=0.0), 1.0)


class Interrupt(Exception):
    pass


def test_resume_continues_exactly_where_the_run_stopped(tiny_data, tmp_path):
    config = TrainConfig(epochs=3, batch_size=4, seed=7)
    straight = Trainer(config, *tiny_data, tmp_path / "straight", progress=False, log=lambda line: None)
    straight.run()

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt  # killed right after the epoch's checkpoint was written

    interrupted = Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=stop_after_first_epoch)
    with pytest.raises(Interrupt):
        interrupted.run()
    resumed = Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=lambda line: None)
    resumed.run(resume=True)
    for name, value in straight.model.params().items():
        numpy.testing.assert_array_equal(resumed.model.params()[name], value, err_msg=name)
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in straight.history]
    with open(tmp_path / "resumed" / "log.csv") as stream:
        assert len(list(csv.DictReader(stream))) == 3
    assert os.path.exists(tmp_path / "resumed" / "curves.png") and os.path.exists(tmp_path / "resumed" / "best.npz")


def test_a_damaged_training_state_is_a_clear_error_on_resume(tiny_data, tmp_path):
    from minirnng.models.checkpoint import read_checkpoint, save_model

    config = TrainConfig(epochs=2, batch_size=4)
    Trainer(dataclasses.replace(config, epochs=1), *tiny_data, tmp_path / "run", progress=False,
            log=lambda line: None).run()
    last = tmp_path / "run" / "last.npz"
    header, params, extra = read_checkpoint(last)
    model = RNNG(rng=0)
    model.load_params(params)

    def edited(change, name):
        training = json.loads(json.dumps(header["training"]))
        change(training)
        folder = tmp_path / name
        folder.mkdir()
        metadata = {key: value for key, value in header.items() if key not in
                    ("format", "format_version", "architecture", "config", "classes", "input_size", "minirnng_version")}
        save_model(model, folder / "last.npz", input_size=header["input_size"],
                   extra_arrays=extra, **{**metadata, "training": training})
        return folder

    cases = (
        (lambda t: t["config"].update(new_option=1), "new-option", r"settings this minirnng does not know \(new_option"),
        (lambda t: t.pop("rng_state"), "no-rng", "its training state is damaged"),
        (lambda t: t.update(epoch="1"), "text-epoch", "its training state is damaged"),
        (lambda t: t["config"].update(batch_size="4"), "text-batch", "cannot resume .*last.npz"),
        (lambda t: t["config"].update(loss_weights=5), "number-weights", "its training settings are not valid"),
        (lambda t: t["rng_state"].update(bit_generator="MT19937"), "other-rng", "cannot resume .*last.npz"),
    )
    for change, name, message in cases:
        folder = edited(change, name)
        resumed = Trainer(config, *tiny_data, folder, progress=False, log=lambda line: None)
        with pytest.raises(ValueError, match=message):
            resumed.run(resume=True)


def test_a_batch_norm_run_resumes_only_with_its_own_number_of_workers(tiny_data, tmp_path):
    config = TrainConfig(epochs=2, batch_size=4, batch_norm=True)

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config, *tiny_data, tmp_path, progress=False, workers=2, parallel="threads",
                log=stop_after_first_epoch).run()
    with pytest.raises(ValueError, match=r"with 1 worker\(s\): it was trained with each batch in 2 shard\(s\).*"
                                         r"resume it with --workers 2$"):
        Trainer(config, *tiny_data, tmp_path, progress=False, workers=1, log=lambda line: None).run(resume=True)
    last = tmp_path / "last.npz"
    original = last.read_bytes()
    # A GPU runs every batch whole, whatever the workers: a run it trained with 2 workers records 1
    # shard, and the host, which would cut each batch in 2, refuses to go on with it.
    rewrite_training(last, shards=1)
    with pytest.raises(ValueError, match=r"with 2 worker\(s\): .* in 1 shard\(s\).*--workers 1, or on the GPU"):
        Trainer(config, *tiny_data, tmp_path, progress=False, parallel="threads", log=print).run(resume=True)
    # a checkpoint of an earlier version, with the workers alone, is judged and worded by them, as it was then
    rewrite_training(last, shards=None)
    with pytest.raises(ValueError, match=r"with 1 worker\(s\): it was trained with 2, .*resume with --workers 2$"):
        Trainer(config, *tiny_data, tmp_path, progress=False, workers=1, log=lambda line: None).run(resume=True)
    last.write_bytes(original)
    resumed = Trainer(config, *tiny_data, tmp_path, progress=False, parallel="threads", log=lambda line: None)
    assert len(resumed.run(resume=True)) == 2 and resumed.workers == 2


def rewrite_training(path, **changes):
    """Change fields of a checkpoint's training record in place (None removes one), as another
    machine or an earlier version would have written them."""
    from minirnng.models.checkpoint import HEADER_KEY

    with numpy.load(path, allow_pickle=False) as stored:
        arrays = dict(stored)
    header = json.loads(arrays[HEADER_KEY].tobytes().decode("utf-8"))
    for name, value in changes.items():
        if value is None:
            header["training"].pop(name, None)
        else:
            header["training"][name] = value
    arrays[HEADER_KEY] = numpy.frombuffer(json.dumps(header).encode("utf-8"), dtype=numpy.uint8)
    with open(path, "wb") as stream:
        numpy.savez(stream, **arrays)


def test_more_workers_than_cores_are_noted(tiny_data, tmp_path):
    from minirnng.parallel import available_cores

    lines = []
    workers = available_cores() + 1
    Trainer(TrainConfig(epochs=1, batch_size=4), *tiny_data, tmp_path, progress=False, workers=workers,
            parallel="threads", log=lines.append).run()
    assert any(f"note: {workers} workers on {available_cores()} cores take turns" in line for line in lines)


def test_a_finished_run_is_never_overwritten(tiny_data, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4)
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run()
    before = (tmp_path / "last.npz").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run()
    assert (tmp_path / "last.npz").read_bytes() == before
    changed = TrainConfig(epochs=2, batch_size=4, lr=1.0)
    with pytest.raises(ValueError, match="configuration differs.*lr"):
        Trainer(changed, *tiny_data, tmp_path, progress=False, log=lambda line: None).run(resume=True)


def test_a_run_is_never_resumed_on_other_data(tiny_data, tmp_path):
    from minirnng.data.catalog import load_split

    config = TrainConfig(epochs=2, batch_size=4)
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run()
    train, validation = tiny_data
    larger = [load_split("synthetic", split, n_classes=3, input_size=48, size=len(dataset))
              for split, dataset in (("train", train), ("validation", validation))]
    with pytest.raises(ValueError, match=r"other data.*'input_size': \(\[32, 32\], \[48, 48\]\)"):
        Trainer(config, *larger, tmp_path, progress=False, log=lambda line: None).run(resume=True)
    fewer = load_split("synthetic", "train", n_classes=3, input_size=32, size=len(train) - 2)
    with pytest.raises(ValueError, match="other data.*'train_images': \\(12, 10\\)"):
        Trainer(config, fewer, validation, tmp_path, progress=False, log=lambda line: None).run(resume=True)


def test_splits_that_cannot_be_trained_and_scored_together_are_refused_before_any_work(tiny_data, tmp_path):
    from minirnng.data.catalog import load_split, open_dataset

    train, validation = tiny_data
    config = TrainConfig(epochs=1, batch_size=4)
    eleven = load_split("synthetic", "validation", n_classes=11, input_size=32, size=len(validation))
    with pytest.raises(ValueError, match=r"the validation set has 11 classes .* n_classes=3"):
        Trainer(config, train, eleven, tmp_path / "a")
    other_names = load_split("synthetic", "validation", n_classes=3, input_size=32, size=len(validation))
    other_names.classes = ["background", "face", "hair"]
    with pytest.raises(ValueError, match=r"validation set's classes \(background, face, hair\) are not"):
        Trainer(config, train, other_names, tmp_path / "b")
    larger = load_split("synthetic", "validation", n_classes=3, input_size=48, size=len(validation))
    with pytest.raises(ValueError, match=r"training images are 32x32 and the validation images 48x48"):
        Trainer(config, train, larger, tmp_path / "c")
    with pytest.raises(TypeError, match=r"the validation set must be preloaded"):
        Trainer(config, train, open_dataset("synthetic", "validation", n_classes=3), tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


@pytest.mark.parametrize("settings, error, message", [
    (dict(epochs=2.5), TypeError, "epochs must be an integer, got 2.5"),
    (dict(batch_size="4"), TypeError, "batch_size must be an integer, got '4'"),
    (dict(lr="1e-3"), TypeError, "lr must be a number, got '1e-3'"),
    (dict(n_classes=1), ValueError, "n_classes must be at least 2"),
])
def test_train_config_names_a_setting_of_the_wrong_type(settings, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**settings).check()


def test_training_reduces_the_loss_and_evaluate_reports_scores(tiny_data, tmp_path):
    trainer = Trainer(TrainConfig(epochs=4, batch_size=4, lr=5e-3), *tiny_data, tmp_path, progress=False,
                      log=lambda line: None)
    history = trainer.run()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    result = evaluate(trainer.model, tiny_data[1])
    assert 0 <= result["accuracy"] <= 1 and set(result["f_measure"]) == {"background", "skin", "hair"}
    assert result["ms_per_image"] > 0 and numpy.sum(result["confusion"]) == 6 * 32 * 32

    class Predictor:  # anything that predicts may be scored (a two-stage parser, a wrapper), not only a model
        predict = staticmethod(trainer.model.predict)

    assert evaluate(Predictor(), tiny_data[1])["accuracy"] == result["accuracy"]


def test_evaluate_times_the_kernel_path_after_one_untimed_pass(tiny_data):
    from minirnng import backend

    model = RNNG(rng=0)
    calls = []

    def predict(images):
        calls.append(len(images))
        return model.predict(images)

    evaluate(model, tiny_data[1], batch_size=4, predict=predict)
    assert calls == [4, 2]  # the NumPy path compiles nothing: every pass is a timed one
    calls.clear()
    with backend.use("cuda-emulator"):  # the first launches compile the kernels: one pass first, untimed
        evaluate(model, tiny_data[1], batch_size=4, predict=predict)
    assert calls == [4, 4, 2]


def test_a_training_run_warms_the_kernels_up_for_its_first_validation_only(tiny_data, tmp_path, monkeypatch):
    import minirnng.train as train_module

    warm_ups, score = [], train_module.evaluate

    def recorded(*arguments, **options):
        warm_ups.append(options.get("warm_up", True))
        return score(*arguments, **options)

    monkeypatch.setattr(train_module, "evaluate", recorded)
    Trainer(TrainConfig(epochs=3, batch_size=4), *tiny_data, tmp_path, progress=False, log=lambda line: None).run()
    assert warm_ups == [True, False, False]


def test_init_starts_from_a_checkpoints_weights_and_refuses_one_that_does_not_fit(tiny_data, tmp_path):
    from minirnng.models import RNNG, CheckpointError

    source = RNNG(n_classes=3, rng=11)
    source.classes = list(tiny_data[0].classes)
    source.save(tmp_path / "source.npz")
    logged = []
    trainer = Trainer(TrainConfig(epochs=1, batch_size=4, lr=1e-12, warmup=0.0, init=str(tmp_path / "source.npz")),
                      *tiny_data, tmp_path / "run", progress=False, log=logged.append)
    trainer.run()  # a vanishing learning rate keeps the weights: what is trained is what was loaded
    assert any("starting from the weights of" in line for line in logged)
    for name, value in source.params().items():
        numpy.testing.assert_allclose(trainer.model.params()[name], value, rtol=1e-6, atol=1e-9, err_msg=name)
    # resuming takes the weights from last.npz and never reads the init checkpoint again
    os.remove(tmp_path / "source.npz")
    resumed = Trainer(TrainConfig(epochs=2, batch_size=4, lr=1e-12, warmup=0.0, init=str(tmp_path / "source.npz")),
                      *tiny_data, tmp_path / "run", progress=False, log=lambda line: None)
    resumed.run(resume=True)
    assert resumed.epoch == 2

    other = RNNG(n_classes=3, rng=1)
    other.classes = ["background", "face", "hair"]
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="trained on the classes"):
        Trainer(TrainConfig(epochs=1, batch_size=4, init=str(tmp_path / "other.npz")), *tiny_data,
                tmp_path / "run2", progress=False, log=lambda line: None).run()
    with pytest.raises(CheckpointError, match="not 'cnn-s'"):
        Trainer(TrainConfig(model="cnn-s", epochs=1, batch_size=4, init=str(tmp_path / "other.npz")), *tiny_data,
                tmp_path / "run3", progress=False, log=lambda line: None).run()
    RNNG(n_classes=4, rng=1).save(tmp_path / "four.npz")
    with pytest.raises(ValueError, match="shape"):
        Trainer(TrainConfig(epochs=1, batch_size=4, init=str(tmp_path / "four.npz")), *tiny_data,
                tmp_path / "run4", progress=False, log=lambda line: None).run()
    with pytest.raises(FileNotFoundError, match="missing.npz' does not exist"):
        Trainer(TrainConfig(epochs=1, batch_size=4, init=str(tmp_path / "missing.npz")), *tiny_data,
                tmp_path / "run5", progress=False, log=lambda line: None).run()
    # a checkpoint that does not fit is refused before the output folder is made
    assert not any((tmp_path / f"run{k}").exists() for k in range(2, 6))


def test_the_progress_bar_redraws_rarely_into_a_file(tiny_data, tmp_path, monkeypatch):
    """Redirected to a log, each redraw of a bar is kept: an epoch's bar is drawn when it starts and
    then every 30 s, not after every batch; on a terminal ten times a second."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    for stream, interval in ((io.StringIO(), 30.0), (Terminal(), 0.1)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(10, "epoch 1/1", "img", enabled=True)
        assert bar.mininterval == interval
        bar.close()
    assert progress_bar(10, "epoch 1/1", "img", enabled=False).disable

    log_file = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log_file)
    Trainer(TrainConfig(epochs=2, batch_size=2), *tiny_data, tmp_path, log=lambda line: None).run()
    drawn = log_file.getvalue().count("epoch ")
    assert 2 <= drawn <= 4, f"{drawn} bars drawn for 2 epochs of 6 batches each"


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        TrainConfig(model="unet").check()
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="rmsprop").check()
    with pytest.raises(ValueError, match="unknown stability rule 'clip'"):
        TrainConfig(stability_rule="clip").check()
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        TrainConfig(augment="rotate").check()
    with pytest.raises(ValueError, match="lr must be a finite number, got nan"):
        TrainConfig(lr=float("nan")).check()
    with pytest.raises(ValueError, match="lr must be positive"):
        TrainConfig(lr=-1.0).check()
    with pytest.raises(ValueError, match="gate_bias must be a finite number"):
        TrainConfig(gate_bias=float("inf")).check()
    with pytest.raises(ValueError, match=r"loss_weights\[2\] must be a finite number"):
        TrainConfig(loss_weights=(1.0, 1.0, float("nan"))).check()
    with pytest.raises(ValueError, match="loss_weights must be three numbers >= 0"):
        TrainConfig(loss_weights=(1.0, -1.0, 1.0)).check()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_diverged_run_is_one_line_from_the_command_line(workers, tmp_path, capfd):
    """One line, and no overflow warning from any worker process (their error state is the caller's)."""
    from minirnng import cli

    out = tmp_path / "run"
    assert cli.main(["train", "--data", "synthetic", "--train-size", "8", "--validation-size", "4",
                     "--input-size", "32", "--epochs", "2", "--batch-size", "4", "--optimizer", "sgd",
                     "--lr", "1e12", "--quiet", "--workers", workers, "--out", str(out)]) == 1
    error = capfd.readouterr().err
    assert error.startswith("minirnng train: error: training diverged in epoch") and "smaller learning rate" in error
    assert "Traceback" not in error and "Warning" not in error, error


def test_augmentations_by_name_and_the_booleans_of_older_checkpoints():
    assert TrainConfig(augment=True).augment == "paper" and TrainConfig(augment=False).augment == "none"
    assert AUGMENTATIONS["none"] is None
    images = numpy.random.default_rng(0).integers(0, 256, (6, 12, 10, 3), dtype=numpy.uint8)
    labels = numpy.random.default_rng(1).integers(0, 11, (6, 12, 10)).astype(numpy.uint8)
    mirrored_images, mirrored_labels = AUGMENTATIONS["mirror"](images, labels, HELEN_CLASSES, 3)
    permutation = numpy.asarray(mirror_permutation(HELEN_CLASSES))
    flipped = 0
    for k in range(len(images)):  # each sample exactly as it was, or exactly mirrored: nothing resampled
        if (mirrored_images[k] == images[k]).all():
            assert (mirrored_labels[k] == labels[k]).all()
        else:
            assert (mirrored_images[k] == images[k][:, ::-1]).all()
            assert (mirrored_labels[k] == permutation[labels[k][:, ::-1]]).all()
            flipped += 1
    assert 0 < flipped < len(images)


def test_background_sampling_keeps_face_and_hair_and_five_times_as_much_background(rng):
    labels = numpy.zeros((2, 16, 16), dtype=numpy.int64)
    labels[0, 4:8, 4:8] = 1  # 16 face pixels in the first image, none in the second
    objective = StageOneObjective(background_ratio=5)
    mask = objective.label_mask(labels, numpy.random.default_rng(0))
    assert mask[0][labels[0] == 1].all() and mask[0].sum() == 16 + 80
    assert not mask[1].any()
    outputs = {"logits": rng.standard_normal((2, 3, 16, 16)), "coarse": rng.standard_normal((2, 3, 8, 8)),
               "edge": rng.standard_normal((2, 1, 8, 8))}
    _, _, grads = objective(outputs, labels, numpy.random.default_rng(0))
    assert not grads["logits"][1].any()  # an image without face or hair contributes nothing
    assert StageOneObjective().label_mask(labels, rng) is None


def test_class_balance_weights_and_the_objective_name_bad_arguments():
    with pytest.raises(ValueError, match=r"labels range over -1 .. 3; expected classes 0 .. 2"):
        class_balance_weights(numpy.array([-1, 0, 3]), 3)
    with pytest.raises(TypeError, match="labels must be integers, got dtype float64"):
        class_balance_weights(numpy.array([0.0, 1.0]), 3)
    for weights in ((1, 1), (1, 1, 1, 1)):
        with pytest.raises(ValueError, match="weights are three numbers"):
            StageOneObjective(weights)


def test_evaluating_an_empty_dataset_is_an_error_not_nan():
    from minirnng.data.pipeline import PreloadedDataset
    from minirnng.models import RNNG

    empty = PreloadedDataset(numpy.zeros((0, 16, 16, 3), numpy.uint8), numpy.zeros((0, 16, 16), numpy.uint8),
                             ("background", "skin", "hair"), ())
    with pytest.raises(ValueError, match="the dataset holds no images"):
        evaluate(RNNG(rng=0), empty)


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_writes(tiny_data, tmp_path):
    from minirnng.train import output_folder_lock

    pytest.importorskip("fcntl", reason="no file locks on this system")
    config = TrainConfig(epochs=1, batch_size=4)
    with output_folder_lock(str(tmp_path)):  # as a run in another process holds it
        with pytest.raises(BlockingIOError, match="another run is writing to"):
            Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run()
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run()  # free again
    lines = []
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lines.append).run(resume=True)
    assert any("has finished its 1 epochs; nothing to do" in line for line in lines)
    # a stop after the last checkpoint and before the log: the finished run writes it again
    log = (tmp_path / "log.csv").read_text()
    (tmp_path / "log.csv").write_text(log.splitlines()[0] + "\n")  # as the epoch before left it
    (tmp_path / "curves.png").unlink()
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run(resume=True)
    assert (tmp_path / "log.csv").read_text() == log and (tmp_path / "curves.png").exists()


def test_an_output_folder_that_is_a_file_or_a_broken_link_is_named(tmp_path):
    from minirnng.train import check_output_folder

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name, kind in (("a-file", "a file"), ("dangling", "a broken link")):
        with pytest.raises(NotADirectoryError, match=f"is {kind}, not a folder"):
            check_output_folder(str(tmp_path / name), resume=False)


def test_optimizer_settings_are_checked_when_it_is_built():
    params = {"w": numpy.ones(3)}
    grads = {"w": numpy.zeros(3)}
    for build, error, message in (
            (lambda: Adam(params, grads, lr=float("nan")), ValueError, "the learning rate must be a finite number"),
            (lambda: Adam(params, grads, lr="0.1"), TypeError, "the learning rate must be a number, got '0.1'"),
            (lambda: Adam(params, grads, lr=0.1, eps=0), ValueError, r"eps must be in \(0, inf\), got 0.0"),
            (lambda: Adam(params, grads, lr=0.1, betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\)"),
            (lambda: Adam(params, grads, lr=0.1, betas=(0.9,)), ValueError, "betas must be two numbers"),
            (lambda: Adam(params, grads, lr=0.1, weight_decay=-1), ValueError, r"weight_decay must be in \[0, inf\)"),
            (lambda: SGD(params, grads, lr=0.1, momentum=1.5), ValueError, r"momentum must be in \[0, 1\)"),
            (lambda: SGD(params, {"w": numpy.zeros(4)}, lr=0.1), ValueError, r"the gradient of 'w' has shape")):
        with pytest.raises(error, match=message):
            build()
    assert Adam(params, grads, lr=numpy.float32(0.1), betas=numpy.array([0.9, 0.99])).beta2 == 0.99
    adam = Adam(params, grads, lr=0.1)
    with pytest.raises(ValueError, match="without its step count"):
        adam.load_state_arrays({"m/w": numpy.zeros(3)})
    with pytest.raises(ValueError, match=r"'zz/w' is not one of Adam's buffers \(m, v\)"):
        adam.load_state_arrays({"steps": numpy.array(1), "zz/w": numpy.zeros(3)})


def test_a_trainer_trains_once_and_goes_on_only_from_its_checkpoint(tiny_data, tmp_path):
    # after a stop the weights and the optimizer are wherever the run was, in the middle of an
    # epoch after a Ctrl-C: a plain second run() would go on from there, unlike any seeded run
    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt

    trainer = Trainer(TrainConfig(epochs=2, batch_size=4), *tiny_data, tmp_path, progress=False,
                      log=stop_after_first_epoch)
    with pytest.raises(Interrupt):
        trainer.run()
    with pytest.raises(RuntimeError, match=r"has trained already.*run\(resume=True\) continues from .*last.npz"):
        trainer.run()
    trainer.log = lambda line: None
    assert len(trainer.run(resume=True)) == 2
    # stopped in its first epoch, before any checkpoint: there is nothing to resume from
    first = Trainer(TrainConfig(epochs=2, batch_size=4), *tiny_data, tmp_path / "first", progress=False,
                    log=lambda line: None)

    def stop_in_the_first_epoch():
        raise Interrupt

    first.optimizer.step = stop_in_the_first_epoch
    with pytest.raises(Interrupt):
        first.run()
    with pytest.raises(RuntimeError, match="stopped before its first checkpoint, so make a new Trainer"):
        first.run()


def test_an_epoch_whose_last_step_overflows_is_a_divergence_and_saves_nothing(tiny_data, tmp_path):
    # the losses of every step were finite; the last step's update overflowed the optimizer's state
    trainer = Trainer(TrainConfig(epochs=1, batch_size=4), *tiny_data, tmp_path, progress=False, log=lambda line: None)
    step = trainer.optimizer.step
    steps_per_epoch = -(-len(tiny_data[0]) // 4)

    def overflowing_last_step():
        step()
        if trainer.optimizer.steps == steps_per_epoch:
            name = next(iter(trainer.optimizer.state))
            trainer.optimizer.state[name][...] = numpy.inf

    trainer.optimizer.step = overflowing_last_step
    with pytest.raises(FloatingPointError, match=r"diverged in epoch 1: optimizer \S+ are no longer finite"):
        trainer.run()
    assert not os.path.exists(trainer.last_path) and not os.path.exists(trainer.best_path)


def test_an_empty_split_is_refused_before_training(tiny_data, tmp_path):
    from minirnng.data.pipeline import PreloadedDataset

    train, validation = tiny_data
    empty = PreloadedDataset(validation.images[:0], validation.labels[:0], validation.classes, [])
    for split, sets in (("training", (empty, validation)), ("validation", (train, empty))):
        with pytest.raises(ValueError, match=f"the {split} split has no images"):
            Trainer(TrainConfig(epochs=1, batch_size=4), *sets, tmp_path)


def test_a_term_of_weight_zero_is_not_logged_as_a_loss_of_zero(tiny_data, tmp_path):
    history = Trainer(TrainConfig(epochs=1, batch_size=4, loss_weights=(1.0, 0.0, 1.0)), *tiny_data, tmp_path,
                      progress=False, log=lambda line: None).run()
    assert "train_coarse" not in history[0] and history[0]["train_edge"] > 0
    with open(tmp_path / "log.csv") as stream:
        assert "train_coarse" not in next(csv.reader(stream))


def test_weights_whose_forward_pass_overflows_are_a_divergence_not_a_best_checkpoint(tiny_data, tmp_path):
    trainer = Trainer(TrainConfig(epochs=1, batch_size=4), *tiny_data, tmp_path, progress=False, log=lambda line: None)
    step = trainer.optimizer.step
    steps_per_epoch = -(-len(tiny_data[0]) // 4)

    def last_step_blows_up():  # finite weights, every one 1e30: the first convolution overflows
        step()
        if trainer.optimizer.steps == steps_per_epoch:
            for value in trainer.model.params().values():
                value[...] = 1e30

    trainer.optimizer.step = last_step_blows_up
    with pytest.raises(FloatingPointError, match="diverged in epoch 1: the weights are finite but their logits are not"):
        trainer.run()
    assert not os.path.exists(trainer.best_path) and not os.path.exists(trainer.last_path)


def test_train_config_takes_numpy_numbers_and_records_python_ones(tiny_data, tmp_path):
    config = TrainConfig(epochs=numpy.int64(1), batch_size=numpy.int64(4), lr=numpy.float32(5e-3),
                         seed=numpy.int64(0), loss_weights=(numpy.float32(1), 1, 1)).check()
    assert [type(value) for value in (config.epochs, config.lr, config.seed, config.loss_weights[0])] == [
        int, float, int, float]
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run()
    # its record read back: the resumed run finds the same configuration
    Trainer(config, *tiny_data, tmp_path, progress=False, log=lambda line: None).run(resume=True)
