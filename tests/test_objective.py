"""The stage-1 objective (minirnng.objective) against oracles of its own: finite differences of the
whole weighted sum for each output, and each term rebuilt by hand from the losses and the targets
the architecture spec names (the labels at half resolution, the boundary target, the 1:5 sampling)."""

import numpy
import pytest

from minirnng.gradcheck import check
from minirnng.losses import (ColourAffinity, SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy,
                             balanced_sample_mask, boundary_sample_mask, boundary_target)
from minirnng.objective import StageOneObjective

SIZE = 32


def problem(seed=3):
    """Outputs of a 3-class model at SIZE x SIZE, labels with a face and hair on background, and images."""
    rng = numpy.random.default_rng(seed)
    outputs = {"logits": rng.standard_normal((2, 3, SIZE, SIZE)),
               "coarse": rng.standard_normal((2, 3, SIZE // 2, SIZE // 2)),
               "edge": rng.standard_normal((2, 1, SIZE // 2, SIZE // 2))}
    labels = numpy.zeros((2, SIZE, SIZE), dtype=numpy.int64)
    # odd edges: the pixels (2i, 2j) and (2i + 1, 2j + 1) disagree along them, so which of the two
    # the outputs at half resolution are scored against shows in the losses
    labels[0, 7:25, 11:22], labels[0, 3:10, 9:24] = 1, 2
    labels[1, 13:30, 5:18], labels[1, 5:14, 3:19] = 1, 2
    images = 0.05 * rng.standard_normal((2, 3, SIZE, SIZE))  # colours within s_rgb of each other
    return outputs, labels, images


@pytest.mark.parametrize("background_ratio", [0, 1])
def test_the_objectives_gradients_match_finite_differences(background_ratio):
    outputs, labels, images = problem()
    objective = StageOneObjective(weights=(0.7, 0.5, 2.0), class_weights=[1.0, 1.5, 2.5],
                                  background_ratio=background_ratio, dice_weight=0.3, affinity_weight=0.4)

    def evaluate(replaced):
        # the same generator every call: the sampled pixels stay put while an output is perturbed
        return objective(dict(outputs, **replaced), labels, numpy.random.default_rng(0), images)

    for name in outputs:
        report = check(f"objective, d/d{name}", lambda z, name=name: evaluate({name: z})[0],
                       lambda upstream, name=name: upstream * evaluate({})[2][name],
                       {name: outputs[name].copy()}, rng=1, max_entries=60)
        assert report.max_error < 1e-6, str(report)


def test_each_term_is_its_loss_on_the_spec_targets():
    outputs, labels, images = problem()
    weights = (0.7, 0.5, 2.0)
    total, parts, grads = StageOneObjective(weights=weights, boundary_ratio=1, dice_weight=0.3, affinity_weight=0.4)(
        outputs, labels, numpy.random.default_rng(0), images)
    half = labels[:, ::2, ::2]  # the labels of pixel (2i, 2j) for the outputs at half resolution
    target = boundary_target(half)
    mask = boundary_sample_mask(target, ratio=1, rng=numpy.random.default_rng(0))  # the objective's first draw
    assert 0 < mask.sum() < mask.size  # the 1:1 sampling leaves pixels out here (1:5 would take all of these)
    by_hand = {"logits": SoftmaxCrossEntropy(), "coarse": SoftmaxCrossEntropy(), "edge": SigmoidBinaryCrossEntropy(),
               "dice": SoftDice(), "affinity": ColourAffinity()}
    expected = {"logits": by_hand["logits"].forward(outputs["logits"], labels),
                "coarse": by_hand["coarse"].forward(outputs["coarse"], half),
                "edge": by_hand["edge"].forward(outputs["edge"], target.astype(numpy.float64), mask),
                "dice": by_hand["dice"].forward(outputs["logits"], labels),
                "affinity": by_hand["affinity"].forward(outputs["logits"], images)}
    assert parts == pytest.approx(expected, rel=1e-13)
    term_weights = dict(zip(("logits", "coarse", "edge"), weights), dice=0.3, affinity=0.4)
    assert total == pytest.approx(sum(term_weights[name] * value for name, value in expected.items()), rel=1e-13)
    numpy.testing.assert_allclose(grads["coarse"], by_hand["coarse"].backward(0.5), rtol=1e-13)
    numpy.testing.assert_allclose(grads["edge"], by_hand["edge"].backward(2.0), rtol=1e-13)
    numpy.testing.assert_allclose(grads["logits"], by_hand["logits"].backward(0.7) + by_hand["dice"].backward(0.3)
                                  + by_hand["affinity"].backward(0.4), rtol=1e-12, atol=1e-17)


def test_with_a_background_ratio_the_label_losses_use_the_sampled_pixels():
    outputs, labels, _ = problem()
    _, parts, _ = StageOneObjective(weights=(1.0, 1.0, 0.0), background_ratio=1)(
        outputs, labels, numpy.random.default_rng(0))
    draws = numpy.random.default_rng(0)  # the logits' mask is drawn first, then the coarse one
    fine = balanced_sample_mask(labels != 0, 1, draws)
    half = labels[:, ::2, ::2]
    coarse = balanced_sample_mask(half != 0, 1, draws)
    assert fine.sum() < fine.size and coarse.sum() < coarse.size
    assert parts["logits"] == pytest.approx(SoftmaxCrossEntropy().forward(outputs["logits"], labels, fine), rel=1e-13)
    assert parts["coarse"] == pytest.approx(SoftmaxCrossEntropy().forward(outputs["coarse"], half, coarse), rel=1e-13)


# -- shards of a batch computing their own terms (DataParallel.objective_step) -------------------

def shard_problem(seed=5, n=5):
    """``problem``'s kind of outputs and labels for ``n`` images, one of them without a boundary."""
    rng = numpy.random.default_rng(seed)
    outputs = {"logits": rng.standard_normal((n, 3, SIZE, SIZE)),
               "coarse": rng.standard_normal((n, 3, SIZE // 2, SIZE // 2)),
               "edge": rng.standard_normal((n, 1, SIZE // 2, SIZE // 2))}
    labels = numpy.zeros((n, SIZE, SIZE), dtype=numpy.int64)
    for image in range(n - 1):  # the last image is all background: no boundary, nothing to sample
        top, left = rng.integers(2, 12, 2)
        labels[image, top:top + 14, left:left + 12] = 1
        labels[image, top:top + 5, left:left + 16] = 2
    labels[0, 0, :4] = 7  # an ignored label (with ignore_index=7)
    images = 0.05 * rng.standard_normal((n, 3, SIZE, SIZE))
    return outputs, labels, images


@pytest.mark.parametrize("options", [{}, {"class_weights": [1.0, 1.5, 2.5], "ignore_index": 7, "background_ratio": 1},
                                     {"weights": (0.7, 0.0, 2.0), "affinity_weight": 0.4}])
def test_the_shards_terms_add_up_to_the_whole_batchs(options):
    """Each shard's parts and gradients, weighed by its share of the batch's counts, add up to what
    the objective gives for the whole batch (the shards cut 5 images 2 + 2 + 1; the last image has
    no boundary, so its shard's edge term counts nothing); the generator ends where it does unsplit."""
    outputs, labels, images = shard_problem()
    if "ignore_index" not in options:
        labels[labels == 7] = 0
    objective = StageOneObjective(**options)
    generator = numpy.random.default_rng(0)
    total, parts, grads = objective(outputs, labels, generator, images)
    split_generator = numpy.random.default_rng(0)
    batch = objective.prepare(labels, split_generator, images, counts=True)
    assert split_generator.bit_generator.state == generator.bit_generator.state
    totals = {name[len("count:"):]: value.sum() for name, value in batch.items() if name.startswith("count:")}
    assert set(totals) == set(parts)
    summed_parts, shard_grads = {}, []
    for part in (slice(0, 2), slice(2, 4), slice(4, 5)):
        shard = objective.replica()  # as each worker has its own
        shard_parts, shard_grad = shard.shard_terms({name: value[part] for name, value in outputs.items()},
                                                    {name: value[part] for name, value in batch.items()}, totals)
        for name, value in shard_parts.items():
            summed_parts[name] = summed_parts.get(name, 0.0) + value
        shard_grads.append(shard_grad)
    for name, value in parts.items():
        assert summed_parts[name] == pytest.approx(value, rel=1e-12), name
    assert sum(objective.weights[name] * value for name, value in summed_parts.items()) == pytest.approx(total)
    for name, grad in grads.items():
        numpy.testing.assert_allclose(numpy.concatenate([shard[name] for shard in shard_grads]), grad,
                                      rtol=1e-12, atol=1e-15, err_msg=name)
    assert batch["count:edge"][-1] == 0 and not numpy.abs(shard_grads[-1]["edge"]).any()


def test_each_images_count_is_what_its_loss_divides_by(rng):
    """``pixel_weights_per_image`` against the weight sum the cross-entropy's forward divides by."""
    for class_weights, ignore_index, masked in [(None, None, False), (None, 2, True), ([0.5, 1.0, 3.0], 2, True),
                                                ([0.5, 1.0, 3.0], None, False)]:
        loss = SoftmaxCrossEntropy(class_weights=class_weights, ignore_index=ignore_index)
        target = rng.integers(0, 3, (4, 6, 5))
        mask = rng.random((4, 6, 5)) < 0.6 if masked else None
        counts = loss.pixel_weights_per_image(target, mask)
        for image in range(4):
            loss.forward(rng.standard_normal((1, 3, 6, 5)), target[image:image + 1],
                         None if mask is None else mask[image:image + 1])
            assert counts[image] == pytest.approx(loss.cache[3], rel=1e-12)


def test_the_soft_dice_term_is_not_shared_out():
    outputs, labels, images = problem()
    objective = StageOneObjective(dice_weight=1.0)
    assert not objective.shardable and StageOneObjective(affinity_weight=1.0).shardable
    batch = objective.prepare(labels, numpy.random.default_rng(0), counts=True)
    totals = {name[len("count:"):]: value.sum() for name, value in batch.items() if name.startswith("count:")}
    with pytest.raises(ValueError, match="soft Dice term is a ratio of sums over the whole batch"):
        objective.shard_terms(outputs, batch, totals)
    assert StageOneObjective(**objective.config()).config().keys() == objective.config().keys()
