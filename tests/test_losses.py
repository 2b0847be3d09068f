"""Softmax and sigmoid cross-entropy, soft Dice, the colour affinity, and the boundary target and sampling of the gate's loss."""

import numpy
import pytest

from minirnng.gradcheck import check, check_loss
from minirnng.layers import naive
from minirnng.losses import (ColourAffinity, SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy,
                             boundary_sample_mask, boundary_target)

CE_SETTINGS = [
    dict(),
    dict(class_weights=[0.5, 2.0, 1.0, 3.0]),
    dict(ignore_index=255),
    dict(class_weights=[1.0, 0.0, 2.0, 1.0], ignore_index=-1),
]


def _targets(rng, shape, k, ignore_index):
    target = rng.integers(0, k, size=shape)
    if ignore_index is not None:
        target[rng.random(shape) < 0.2] = ignore_index
    return target


DICE_SETTINGS = [dict(), dict(smooth=0.1), dict(ignore_index=255)]
#: (fast loss, naive loss, settings): every loss on class scores, with each of its settings
CLASS_SCORE_LOSSES = ([(SoftmaxCrossEntropy, naive.SoftmaxCrossEntropy, settings) for settings in CE_SETTINGS]
                      + [(SoftDice, naive.SoftDice, settings) for settings in DICE_SETTINGS])
LOSS_IDS = [f"{fast.__name__}-{settings}" for fast, _, settings in CLASS_SCORE_LOSSES]


@pytest.mark.parametrize("fast_loss, naive_loss, settings", CLASS_SCORE_LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_class_score_loss_finite_differences(fast_loss, naive_loss, settings, use_mask, rng):
    logits = rng.standard_normal((2, 4, 3, 5)) * 3
    target = _targets(rng, (2, 3, 5), 4, settings.get("ignore_index"))
    mask = rng.random((2, 3, 5)) < 0.6 if use_mask else None
    report = check_loss(fast_loss(**settings), logits, target, mask, rng=rng)
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("fast_loss, naive_loss, settings", CLASS_SCORE_LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_class_score_loss_fast_matches_naive(fast_loss, naive_loss, settings, dtype, use_mask, rng):
    logits = (rng.standard_normal((2, 4, 6, 3)) * 3).astype(dtype)
    target = _targets(rng, (2, 6, 3), 4, settings.get("ignore_index"))
    mask = rng.random((2, 6, 3)) < 0.7 if use_mask else None  # without: every pixel weighs 1, a path of its own
    fast, slow = fast_loss(**settings), naive_loss(**settings)
    tolerance = 1e-6 if dtype == numpy.float32 else 1e-13
    assert fast.forward(logits, target, mask) == pytest.approx(slow.forward(logits, target, mask), rel=tolerance)
    want = slow.backward(0.7)
    numpy.testing.assert_allclose(fast.backward(0.7), want, rtol=0, atol=tolerance * numpy.abs(want).max())
    assert fast.backward().dtype == dtype


def test_softmax_ce_matches_a_hand_computed_value():
    logits = numpy.zeros((1, 2, 1, 1))
    logits[0, :, 0, 0] = [numpy.log(3.0), 0.0]  # softmax = (3/4, 1/4)
    assert SoftmaxCrossEntropy().forward(logits, numpy.array([[[1]]])) == pytest.approx(numpy.log(4.0))


def test_softmax_ce_is_stable_for_huge_logits():
    logits = numpy.array([1e4, -1e4, 0.0], dtype=numpy.float32).reshape(1, 3, 1, 1)
    loss = SoftmaxCrossEntropy()
    assert loss.forward(logits, numpy.array([[[0]]])) == 0.0
    assert loss.forward(logits, numpy.array([[[1]]])) == pytest.approx(2e4, rel=1e-6)
    assert numpy.all(numpy.isfinite(loss.backward()))


@pytest.mark.parametrize("make_loss", [SoftmaxCrossEntropy, SoftDice])
def test_class_score_loss_with_no_pixel_used_is_zero_not_nan(make_loss):
    loss = make_loss()
    logits = numpy.ones((1, 3, 2, 2))
    assert loss.forward(logits, numpy.zeros((1, 2, 2), dtype=int), mask=numpy.zeros((1, 2, 2), bool)) == 0.0
    assert not loss.backward().any()


def test_softmax_ce_bad_input():
    loss = SoftmaxCrossEntropy(ignore_index=255)
    logits = numpy.zeros((1, 3, 2, 2), dtype=numpy.float32)
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[3, 7\]"):
        loss.forward(logits, numpy.array([[[0, 3], [7, 255]]]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[-1\] in 1 pixels"):
        SoftmaxCrossEntropy().forward(logits, numpy.array([[[0, 2], [-1, 1]]]))
    with pytest.raises(ValueError, match=r"target must have shape \(1, 2, 2\)"):
        loss.forward(logits, numpy.zeros((1, 2, 3), dtype=int))
    with pytest.raises(TypeError, match="integer class indices.*float"):
        loss.forward(logits, numpy.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="logits must have 4 dimensions"):
        loss.forward(logits[0], numpy.zeros((1, 2, 2), dtype=int))
    with pytest.raises(ValueError, match="2 class weights given for logits with 3 classes"):
        SoftmaxCrossEntropy(class_weights=[1, 2]).forward(logits, numpy.zeros((1, 2, 2), dtype=int))
    with pytest.raises(ValueError, match="mask must have shape"):
        loss.forward(logits, numpy.zeros((1, 2, 2), dtype=int), mask=numpy.ones((2, 2), bool))
    with pytest.raises(RuntimeError, match="before forward"):
        SoftmaxCrossEntropy().backward()
    loss = SoftmaxCrossEntropy()
    loss.forward(logits, numpy.zeros((1, 2, 2), dtype=int))
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
        loss.forward(logits, numpy.full((1, 2, 2), 9))
    with pytest.raises(RuntimeError, match="after a forward that failed"):
        loss.backward()  # not the gradient of the pass before the failed one


@pytest.mark.parametrize("use_mask", [False, True])
def test_sigmoid_bce_finite_differences(use_mask, rng):
    logits = rng.standard_normal((2, 1, 4, 3)) * 3
    target = (rng.random((2, 1, 4, 3)) < 0.5).astype(numpy.float64)
    mask = rng.random((2, 1, 4, 3)) < 0.6 if use_mask else None
    report = check_loss(SigmoidBinaryCrossEntropy(), logits, target, mask, rng=rng)
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_sigmoid_bce_fast_matches_naive(dtype, rng):
    logits = (rng.standard_normal((3, 1, 5, 4)) * 5).astype(dtype)
    target = (rng.random((3, 1, 5, 4)) < 0.5).astype(dtype)
    mask = rng.random((3, 1, 5, 4)) < 0.5
    fast, slow = SigmoidBinaryCrossEntropy(), naive.SigmoidBinaryCrossEntropy()
    tolerance = 1e-6 if dtype == numpy.float32 else 1e-13
    assert fast.forward(logits, target, mask) == pytest.approx(slow.forward(logits, target, mask), rel=tolerance)
    want = slow.backward(1.3)
    numpy.testing.assert_allclose(fast.backward(1.3), want, rtol=0, atol=tolerance * numpy.abs(want).max())


def test_sigmoid_bce_is_stable_for_large_logits_of_either_sign():
    loss = SigmoidBinaryCrossEntropy()
    logits = numpy.array([-1e4, 1e4, -1e4, 1e4]).reshape(1, 1, 2, 2)
    target = numpy.array([0.0, 1.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    assert loss.forward(logits, target) == pytest.approx(1e4 / 2)
    numpy.testing.assert_allclose(loss.backward().ravel(), [0, 0, -0.25, 0.25])


def test_sigmoid_bce_bad_input():
    loss = SigmoidBinaryCrossEntropy()
    with pytest.raises(ValueError, match="1 channels"):
        loss.forward(numpy.zeros((1, 2, 2, 2)), numpy.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        loss.forward(numpy.zeros((1, 1, 2, 2)), numpy.full((1, 1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="target must have the logits' shape"):
        loss.forward(numpy.zeros((1, 1, 2, 2)), numpy.zeros((1, 1, 2, 3)))


def test_soft_dice_matches_a_hand_computed_value():
    """Two pixels, two classes, probabilities (3/4, 1/4) and (1/2, 1/2), targets 0 and 1:
    I = (3/4, 1/2), S = (3/4 + 1/2 + 1, 1/4 + 1/2 + 1), and with s = 1, D = (5/2 / 13/4, 2 / 11/4)."""
    logits = numpy.zeros((1, 2, 1, 2))
    logits[0, 0, 0, 0] = numpy.log(3.0)
    target = numpy.array([[[0, 1]]])
    expected = 1 - ((2.5 / 3.25) + (2.0 / 2.75)) / 2
    assert SoftDice().forward(logits, target) == pytest.approx(expected, rel=1e-14)


def test_soft_dice_weighs_a_small_class_as_much_as_a_large_one():
    """Missing a class of 2 pixels out of 64 costs the Dice loss as much as missing one of 62
    costs it, where the cross-entropy barely notices the small one."""
    target = numpy.zeros((1, 8, 8), dtype=int)
    target[0, 0, :2] = 1
    right = numpy.where(numpy.arange(2)[None, :, None, None] == target[:, None], 10.0, -10.0)
    small_missed = right.copy()
    small_missed[0, :, 0, :2] = right[0, ::-1, 0, :2]  # the two class-1 pixels called class 0
    dice, cross_entropy = SoftDice(smooth=1e-6), SoftmaxCrossEntropy()
    assert dice.forward(right, target) < 1e-6
    assert dice.forward(small_missed, target) > 0.49  # class 1's D falls to 0
    assert cross_entropy.forward(small_missed, target) < 0.7  # 2 of 64 pixels wrong by 20


def test_soft_dice_is_stable_for_huge_and_confident_logits():
    loss = SoftDice()
    logits = numpy.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]], dtype=numpy.float32).reshape(1, 3, 1, 2)
    assert loss.forward(logits, numpy.array([[[0, 1]]])) == pytest.approx(0.0, abs=1e-6)
    assert numpy.all(numpy.isfinite(loss.backward()))
    # logits (20, 0, 0): p_t rounds to 1 in float32, and the gradient keeps its digits anyway
    confident = numpy.array([20.0, 0.0, 0.0], dtype=numpy.float32).reshape(1, 3, 1, 1)
    target = numpy.zeros((1, 1, 1), dtype=int)
    loss.forward(confident, target)
    want = naive.SoftDice()
    want.forward(confident.astype(numpy.float64), target)
    numpy.testing.assert_allclose(loss.backward(), want.backward(), rtol=1e-5)
    assert loss.backward()[0, 0, 0, 0] != 0


def test_soft_dice_bad_input():
    with pytest.raises(ValueError, match="smooth must be a positive number"):
        SoftDice(smooth=0)
    with pytest.raises(ValueError, match="smooth must be a positive number"):
        SoftDice(smooth=float("nan"))
    with pytest.raises(TypeError, match="SoftDice: smooth must be a number, got 'a'"):
        SoftDice(smooth="a")
    from decimal import Decimal
    from fractions import Fraction
    for number in (numpy.array(0.5), Fraction(1, 2), Decimal("0.5"), numpy.float32(0.5)):
        assert SoftDice(smooth=number).smooth == 0.5  # any real number, as float() reads it
    loss = SoftDice()
    logits = numpy.zeros((1, 3, 2, 2), dtype=numpy.float32)
    with pytest.raises(ValueError, match=r"SoftDice: target holds labels outside \[0, 3\).*\[3\]"):
        loss.forward(logits, numpy.array([[[0, 3], [1, 2]]]))
    with pytest.raises(ValueError, match=r"SoftDice: target must have shape \(1, 2, 2\)"):
        loss.forward(logits, numpy.zeros((1, 2, 3), dtype=int))
    with pytest.raises(TypeError, match="integer class indices"):
        loss.forward(logits, numpy.zeros((1, 2, 2)))
    with pytest.raises(RuntimeError, match="before forward"):
        SoftDice().backward()


def test_boundary_target_marks_pixels_with_a_different_4_neighbour():
    labels = numpy.array([[[0, 0, 0, 1],
                           [0, 0, 0, 1],
                           [2, 2, 0, 0]]])
    expected = numpy.array([[[1, 1, 0, 0],
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]]], dtype=numpy.float32)
    target = boundary_target(labels)
    assert target.shape == (1, 1, 3, 4) and target.dtype == numpy.float32
    numpy.testing.assert_array_equal(target[:, 0], expected)
    assert boundary_target(numpy.zeros((2, 5, 5), dtype=int)).all()  # one label: no boundary anywhere


def test_boundary_sample_mask_keeps_all_boundaries_and_five_times_as_many_others(rng):
    labels = numpy.zeros((2, 32, 32), dtype=int)
    labels[0, 10:20, 10:20] = 1
    target = boundary_target(labels)
    mask = boundary_sample_mask(target, ratio=5, rng=0)
    assert mask.shape == target.shape and mask.dtype == bool
    boundary = target[0] == 0
    assert mask[0][boundary].all()
    assert (mask[0] & ~boundary).sum() == 5 * boundary.sum()
    assert not mask[1].any()  # no boundary in the second image: nothing sampled
    numpy.testing.assert_array_equal(mask, boundary_sample_mask(target, ratio=5, rng=0))  # seeded
    small = numpy.zeros((1, 6, 6), dtype=int)
    small[0, :, 3:] = 1  # 12 boundary pixels, 24 others: all of them are taken
    assert boundary_sample_mask(boundary_target(small), rng=0).all()
    for ratio in (-1, float("nan")):
        with pytest.raises(ValueError, match="balanced_sample_mask: ratio must be a number >= 0"):
            boundary_sample_mask(target, ratio=ratio, rng=0)


def test_an_empty_batch_is_named_not_divided_by_zero():
    with pytest.raises(ValueError, match=r"logits is empty, shape \(0, 3, 4, 4\)"):
        SoftmaxCrossEntropy().forward(numpy.zeros((0, 3, 4, 4)), numpy.zeros((0, 4, 4), numpy.int64))


# ---- colour affinity ------------------------------------------------------------------------------

def _affinity_arguments(rng, dtype=numpy.float64, shape=(2, 3, 5, 6)):
    logits = (rng.standard_normal(shape) * 2).astype(dtype)
    # colour differences of the size of s_rgb, so that the weights spread over (0, 1)
    images = (rng.uniform(-0.5, 0.5, (shape[0], 3) + shape[2:]) * 0.2).astype(dtype)
    return logits, images


@pytest.mark.parametrize("settings", [{}, {"s_xy": 0.8, "s_rgb": 0.2}])
def test_colour_affinity_finite_differences(settings, rng):
    logits, images = _affinity_arguments(rng)
    loss = ColourAffinity(**settings)
    report = check(repr(loss), lambda z: loss.forward(z, images), loss.backward, {"logits": logits}, rng=rng)
    assert report.max_error < 1e-7, str(report)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_colour_affinity_fast_matches_naive(dtype, rng):
    logits, images = _affinity_arguments(rng, dtype, shape=(2, 4, 6, 5))
    fast, slow = ColourAffinity(s_rgb=0.1), naive.ColourAffinity(s_rgb=0.1)
    tolerance = 1e-6 if dtype == numpy.float32 else 1e-13
    assert fast.forward(logits, images) == pytest.approx(slow.forward(logits, images), rel=tolerance)
    want = slow.backward(0.7)
    numpy.testing.assert_allclose(fast.backward(0.7), want, rtol=0, atol=tolerance * numpy.abs(want).max())
    assert fast.backward().dtype == dtype


def test_colour_affinity_matches_a_hand_computed_value():
    # two pixels side by side, one colour: the loss is the straight weight times (1 - p . q) over 2 pixels
    logits = numpy.zeros((1, 2, 1, 2))
    logits[0, :, 0, 0] = [numpy.log(3.0), 0.0]  # p = (3/4, 1/4); the other pixel (1/2, 1/2)
    images = numpy.zeros((1, 3, 1, 2))
    loss = ColourAffinity(s_xy=1.0)
    assert loss.forward(logits, images) == pytest.approx(numpy.exp(-0.5) * (1 - 0.5) / 2, rel=1e-14)
    # a colour edge three widths high (|dI| = 3 s_rgb on each channel) all but cuts the pair
    images[0, :, 0, 1] = 3 * loss.s_rgb
    assert loss.forward(logits, images) < 1e-5


def test_colour_affinity_rewards_agreement_where_the_colour_is_uniform():
    images = numpy.zeros((1, 3, 4, 4))
    agreeing = numpy.zeros((1, 2, 4, 4))
    agreeing[:, 0] = 16.0  # every pixel confidently class 0
    split = agreeing.copy()
    split[:, :, :, 2:] = agreeing[:, ::-1, :, 2:]  # the right half class 1
    loss = ColourAffinity()
    assert loss.forward(agreeing, images) < 1e-5 < 0.1 < loss.forward(split, images)
    images[:, :, :, 2:] = 0.5  # a colour edge where the labels change: nothing to pay
    assert loss.forward(split, images) < 1e-5


def test_colour_affinity_bad_input():
    loss = ColourAffinity()
    with pytest.raises(ValueError, match="agree in N, H and W"):
        loss.forward(numpy.zeros((1, 3, 4, 4)), numpy.zeros((1, 3, 4, 5)))
    with pytest.raises(ValueError, match="s_rgb must be a number of at least 1e-6"):
        ColourAffinity(s_rgb=0)
    with pytest.raises(ValueError, match="s_xy must be a number of at least 1e-6"):
        ColourAffinity(s_xy=1e-20)
    with pytest.raises(TypeError, match="ColourAffinity: s_xy must be a number, got 'a'"):
        ColourAffinity(s_xy="a")
    with pytest.raises(RuntimeError, match="before forward"):
        ColourAffinity().backward()


@pytest.mark.parametrize("path", ["numpy", "cuda-emulator"])
def test_a_losss_upstream_gradient_is_one_real_number(path, rng):
    from minirnng import backend
    from minirnng.losses import ColourAffinity, SoftDice

    with backend.use(path):
        logits = backend.to_device(rng.standard_normal((1, 3, 4, 4)))
        target = backend.to_device(rng.integers(0, 3, (1, 4, 4)))
        for loss, arguments in ((SoftmaxCrossEntropy(), (logits, target)), (SoftDice(), (logits, target)),
                                (ColourAffinity(), (logits, backend.to_device(rng.standard_normal((1, 3, 4, 4)))))):
            loss.forward(*arguments)
            for bad, error, message in ((None, TypeError, "a real number; got NoneType"),
                                        (numpy.ones(2), TypeError, "a real number; got ndarray"),
                                        (True, TypeError, "a real number; got bool"),
                                        (float("nan"), ValueError, "must be finite")):
                with pytest.raises(error, match=message):
                    loss.backward(bad)
            assert numpy.isfinite(backend.to_numpy(loss.backward(numpy.float32(0.5)))).all()
            assert numpy.isfinite(backend.to_numpy(loss.backward(numpy.array(0.5)))).all()  # a 0-d array


def test_a_mask_chooses_pixels_and_is_not_a_weight(rng):
    logits = rng.standard_normal((1, 3, 2, 2))
    target = numpy.zeros((1, 2, 2), dtype=int)
    loss = SoftmaxCrossEntropy()
    as_bool = loss.forward(logits, target, numpy.array([[[True, False], [True, True]]]))
    assert loss.forward(logits, target, numpy.array([[[1, 0], [1, 1]]])) == as_bool  # 0/1 integers
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        loss.forward(logits, target, numpy.full((1, 2, 2), 0.5))


@pytest.mark.parametrize("path", ["numpy", "cuda-emulator"])
def test_a_pixel_that_does_not_count_adds_nothing_even_with_nan_or_infinite_scores(path, rng):
    # the kernels skip such a pixel; the NumPy path multiplied its NaN by a weight of 0. The batch
    # spans several blocks of threads (3034 pixels), which the reductions must add up across.
    from minirnng import backend

    n, k, height, width = 2, 4, 37, 41
    logits = rng.standard_normal((n, k, height, width))
    target = rng.integers(0, k, (n, height, width))
    mask = rng.random((n, height, width)) < 0.8
    ignored = rng.random((n, height, width)) < 0.1
    target[ignored] = 255

    def spoiled(where, channels=k):  # the logits with NaN and infinite scores at the pixels ``where``
        scores = logits[:, :channels].copy()
        scores[:, 0][where] = numpy.nan
        scores[:, -1][where] = numpy.inf
        return scores

    labels = numpy.where(ignored, 1, target)  # no ignore index: the second class weighs 0 instead
    cases = (
        (lambda: SoftmaxCrossEntropy(ignore_index=255), spoiled(~mask | ignored), (target, mask)),
        (lambda: SoftDice(ignore_index=255), spoiled(~mask | ignored), (target, mask)),
        (lambda: SoftmaxCrossEntropy(class_weights=[1.0, 0.0, 2.0, 0.5]), spoiled(~mask | (labels == 1)),
         (labels, mask)),
        (lambda: SigmoidBinaryCrossEntropy(), spoiled(~mask, channels=1),
         ((target[:, None] == 0).astype(numpy.float64), mask[:, None])),
    )
    # NumPy warns of the invalid values it meets on the way (a kernel cannot); the results must not show them
    with backend.use(path), numpy.errstate(invalid="ignore"):
        for make_loss, bad_logits, rest in cases:
            good_logits = logits[:, :bad_logits.shape[1]]
            results = []
            for scores in (good_logits, bad_logits):
                loss = make_loss()
                value = loss.forward(backend.to_device(scores), *map(backend.to_device, rest))
                results.append((value, backend.to_numpy(loss.backward(0.7))))
            (want, want_grad), (got, got_grad) = results
            assert numpy.isfinite(got) and got == pytest.approx(want, rel=1e-12), make_loss()
            numpy.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15, err_msg=repr(make_loss()))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class-weights"])
def test_a_minus_infinite_score_of_another_class_is_a_finite_loss_as_on_the_kernels(weighted, rng):
    # a class the network rules out entirely: picking z[t] by 0/1 masks gave 0 * -inf = NaN
    from minirnng import backend

    logits = rng.standard_normal((2, 3, 5, 6))
    target = rng.integers(0, 3, (2, 5, 6))
    logits[:, 2][target != 2] = -numpy.inf
    settings = {"class_weights": [1.0, 2.0, 0.5]} if weighted else {}
    results = []
    for path in ("numpy", "cuda-emulator"):
        with backend.use(path):
            loss = SoftmaxCrossEntropy(**settings)
            value = loss.forward(backend.to_device(logits), backend.to_device(target))
            results.append((value, backend.to_numpy(loss.backward(0.7))))
    (got, got_grad), (want, want_grad) = results
    assert numpy.isfinite(got) and got == pytest.approx(want, rel=1e-12)
    numpy.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)
