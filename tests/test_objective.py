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
