"""Intervals by resampling images: the fast sums against the loop, the scores against metrics, the
spread against the delta method's formula, and the paired difference's properties."""

import numpy
import pytest

from minirnng.bootstrap import (bootstrap_intervals, paired_bootstrap, replicate_confusions,
                                replicate_confusions_naive, replicate_scores, resample_indices)
from minirnng.metrics import (ConfusionAccumulator, confusion_matrix, per_image_confusion, pixel_accuracy,
                              precision_recall_f)

CLASSES = ["background", "skin", "hair"]


def random_labels(rng, n_images=40, size=12, flip=0.1, k=3):
    """Targets and predictions that disagree on about ``flip`` of the pixels, more on some images."""
    target = rng.integers(0, k, size=(n_images, size, size))
    wrong = rng.random((n_images, size, size)) < flip * rng.uniform(0.2, 2.0, size=(n_images, 1, 1))
    predicted = numpy.where(wrong, rng.integers(0, k, size=target.shape), target)
    return predicted, target


def test_per_image_confusion_sums_to_the_whole_sets_and_ignores_pixels():
    rng = numpy.random.default_rng(0)
    predicted, target = random_labels(rng)
    target[0, :3] = 255
    per_image = per_image_confusion(predicted, target, 3, ignore_index=255)
    assert per_image.shape == (40, 3, 3) and per_image.dtype == numpy.int64
    numpy.testing.assert_array_equal(per_image.sum(axis=0), confusion_matrix(predicted, target, 3, ignore_index=255))
    for n in (0, 7, 39):
        numpy.testing.assert_array_equal(per_image[n], confusion_matrix(predicted[n], target[n], 3, ignore_index=255))
    assert per_image[0].sum() == 12 * 12 - 3 * 12


def test_the_accumulator_keeps_each_images_matrix_in_order():
    rng = numpy.random.default_rng(1)
    predicted, target = random_labels(rng, n_images=10)
    accumulator = ConfusionAccumulator(CLASSES, per_image=True)
    for start in range(0, 10, 4):
        accumulator.add(predicted[start:start + 4], target[start:start + 4])
    numpy.testing.assert_array_equal(accumulator.per_image, per_image_confusion(predicted, target, 3))
    numpy.testing.assert_array_equal(accumulator.matrix, confusion_matrix(predicted, target, 3))
    with pytest.raises(RuntimeError, match="per_image=True"):
        ConfusionAccumulator(CLASSES).per_image


def test_replicate_sums_equal_the_loop():
    rng = numpy.random.default_rng(2)
    per_image = per_image_confusion(*random_labels(rng), 3)
    indices = resample_indices(len(per_image), 25, rng=3)
    assert indices.shape == (25, 40) and indices.min() >= 0 and indices.max() < 40
    numpy.testing.assert_array_equal(replicate_confusions(per_image, indices),
                                     replicate_confusions_naive(per_image, indices))


def test_replicate_scores_are_the_metrics_formulas():
    rng = numpy.random.default_rng(4)
    per_image = per_image_confusion(*random_labels(rng), 3)
    confusions = replicate_confusions(per_image, resample_indices(40, 5, rng=5))
    accuracy, f_measure = replicate_scores(confusions)
    for r in range(5):
        assert accuracy[r] == pytest.approx(pixel_accuracy(confusions[r]), rel=1e-15)
        numpy.testing.assert_allclose(f_measure[r], precision_recall_f(confusions[r])[2], rtol=1e-15)


def test_the_estimate_is_the_whole_sets_score_and_lies_in_its_interval():
    rng = numpy.random.default_rng(6)
    predicted, target = random_labels(rng, n_images=60)
    per_image = per_image_confusion(predicted, target, 3)
    result = bootstrap_intervals(per_image, CLASSES, replicates=500)
    whole = confusion_matrix(predicted, target, 3)
    assert result["accuracy"]["estimate"] == pytest.approx(pixel_accuracy(whole), rel=1e-15)
    for k, name in enumerate(CLASSES):
        scores = result["f_measure"][name]
        assert scores["estimate"] == pytest.approx(precision_recall_f(whole)[2][k], rel=1e-15)
        assert scores["low"] <= scores["estimate"] <= scores["high"]
    assert result["accuracy"]["low"] < result["accuracy"]["estimate"] < result["accuracy"]["high"]
    assert (result["images"], result["replicates"], result["level"]) == (60, 500, 0.95)
    # the same seed, the same draws
    assert bootstrap_intervals(per_image, CLASSES, replicates=500) == result


def test_identical_images_leave_no_spread():
    one = per_image_confusion(*random_labels(numpy.random.default_rng(7), n_images=1), 3)
    result = bootstrap_intervals(numpy.repeat(one, 30, axis=0), CLASSES, replicates=100)
    assert result["accuracy"]["standard_error"] == pytest.approx(0.0, abs=1e-15)
    assert result["accuracy"]["low"] == pytest.approx(result["accuracy"]["high"], abs=1e-15)


def test_the_spread_matches_the_delta_method():
    """For a ratio of sums over independent images, accuracy = sum c_n / sum m_n, the delta method
    gives the standard error sqrt(N / (N - 1) * sum (c_n - A m_n)^2) / sum m_n. With 400 images
    and 4,000 replicates the bootstrap's must agree to a few percent."""
    rng = numpy.random.default_rng(8)
    predicted, target = random_labels(rng, n_images=400, size=8, flip=0.2)
    per_image = per_image_confusion(predicted, target, 3)
    correct = numpy.trace(per_image, axis1=1, axis2=2).astype(float)
    pixels = per_image.sum(axis=(1, 2)).astype(float)
    accuracy = correct.sum() / pixels.sum()
    n = len(per_image)
    delta = numpy.sqrt(n / (n - 1) * ((correct - accuracy * pixels) ** 2).sum()) / pixels.sum()
    result = bootstrap_intervals(per_image, CLASSES, replicates=4000, rng=9)
    assert result["accuracy"]["standard_error"] == pytest.approx(delta, rel=0.06)
    # and the 95% interval is about 2 x 1.96 standard errors wide
    width = result["accuracy"]["high"] - result["accuracy"]["low"]
    assert width == pytest.approx(2 * 1.96 * delta, rel=0.1)


def test_a_class_missing_from_every_image_has_no_interval():
    per_image = numpy.zeros((5, 3, 3), dtype=numpy.int64)
    per_image[:, 0, 0] = 10
    per_image[:, 1, 0] = numpy.arange(5)
    result = bootstrap_intervals(per_image, CLASSES, replicates=50)
    assert result["f_measure"]["hair"] == {"estimate": None, "standard_error": None, "low": None, "high": None,
                                           "defined": 0.0}
    assert result["f_measure"]["background"]["estimate"] is not None


def test_paired_difference_of_a_set_with_itself_is_zero():
    per_image = per_image_confusion(*random_labels(numpy.random.default_rng(10)), 3)
    result = paired_bootstrap(per_image, per_image, CLASSES, replicates=200)
    # tied in every resampling, which "ahead in 0%" alone would misreport as the other set being better
    assert result["accuracy"] == {"difference": 0.0, "standard_error": 0.0, "low": 0.0, "high": 0.0,
                                  "a_ahead": 0.0, "tied": 1.0, "defined": 1.0}


def test_resamplings_without_a_class_count_in_the_shares_and_are_reported():
    """A class in one image of ten is missing from about 0.9 ** 10 = 35% of the resamplings: a set
    that gets its pixel right is ahead in the other 65%, not in all of them."""
    a = numpy.zeros((10, 3, 3), dtype=numpy.int64)
    a[:, 0, 0] = 50
    a[0, 2, 2] = 1                                  # image 0 holds the only hair pixel, a labels it hair
    b = a.copy()
    b[0, 2, 2], b[0, 2, 0] = 0, 1                   # b calls it background
    paired = paired_bootstrap(a, b, CLASSES, replicates=2000)["f_measure"]["hair"]
    assert paired["defined"] == pytest.approx(1 - 0.9 ** 10, abs=0.03)
    assert paired["a_ahead"] == pytest.approx(paired["defined"]) and paired["tied"] == 0.0
    single = bootstrap_intervals(a, CLASSES, replicates=2000)["f_measure"]["hair"]
    assert single["defined"] == paired["defined"] and single["standard_error"] == 0.0
    from minirnng.cli import undefined_share
    assert undefined_share({"defined": 0.65}) == ("; undefined in 35% of resamplings, which drew none of its pixels "
                                                  "and predicted none")
    assert undefined_share({"defined": 1.0}) == ""


def test_paired_difference_is_narrower_than_either_interval_and_has_its_sign():
    rng = numpy.random.default_rng(11)
    predicted, target = random_labels(rng, n_images=80)
    better = predicted.copy()
    fix = rng.random(target.shape) < 0.05          # a second predictor: the first with 5% of pixels set right
    better[fix] = target[fix]
    a, b = per_image_confusion(better, target, 3), per_image_confusion(predicted, target, 3)
    paired = paired_bootstrap(a, b, CLASSES, replicates=1000)
    alone = bootstrap_intervals(a, CLASSES, replicates=1000)
    assert paired["accuracy"]["difference"] > 0 and paired["accuracy"]["low"] > 0
    assert paired["accuracy"]["a_ahead"] == 1.0
    assert paired["accuracy"]["standard_error"] < alone["accuracy"]["standard_error"] / 2
    assert paired["accuracy"]["difference"] == pytest.approx(
        alone["accuracy"]["estimate"] - bootstrap_intervals(b, CLASSES, replicates=10)["accuracy"]["estimate"],
        rel=1e-12)


@pytest.mark.parametrize("bad, message", [
    (numpy.zeros((5, 3)), r"\(N, K, K\)"),
    (numpy.zeros((5, 3, 2), dtype=numpy.int64), r"\(N, K, K\)"),
    (numpy.zeros((5, 3, 3)), "integer pixel counts"),
    (numpy.zeros((1, 3, 3), dtype=numpy.int64), "at least 2 images"),
    (-numpy.ones((4, 3, 3), dtype=numpy.int64), "negative"),
    (numpy.zeros((4, 2, 2), dtype=numpy.int64), "3 class names for 2 x 2"),
])
def test_bad_per_image_matrices_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bootstrap_intervals(bad, CLASSES, replicates=10)


def test_bad_options_and_mismatched_pairs_are_named():
    per_image = per_image_confusion(*random_labels(numpy.random.default_rng(12), n_images=6), 3)
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(per_image, CLASSES, level=95)
    with pytest.raises(ValueError, match="replicates"):
        bootstrap_intervals(per_image, CLASSES, replicates=0)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_bootstrap(per_image, per_image[:5], CLASSES)
    other = per_image.copy()
    other[3, 1, 1] += 1                              # one more pixel of skin in image 3: not the same targets
    with pytest.raises(ValueError, match="image 3 has different targets"):
        paired_bootstrap(per_image, other, CLASSES)
    with pytest.raises(ValueError, match=r"image numbers in \[0, 6\)"):
        replicate_confusions(per_image, numpy.array([[0, 6]]))


def test_bad_labels_for_per_image_matrices_are_named():
    with pytest.raises(ValueError, match="per_image_confusion: predicted and target differ in shape"):
        per_image_confusion(numpy.zeros((2, 4, 4), int), numpy.zeros((2, 4, 5), int), 3)
    with pytest.raises(ValueError, match="leading image axis"):
        per_image_confusion(numpy.int64(1), numpy.int64(1), 3)
    with pytest.raises(ValueError, match=r"per_image_confusion: target labels must be in \[0, 3\)"):
        per_image_confusion(numpy.zeros((2, 4), int), numpy.full((2, 4), 3), 3)
    assert per_image_confusion(numpy.zeros((0, 4), int), numpy.zeros((0, 4), int), 3).shape == (0, 3, 3)


def test_ahead_tied_and_behind_share_the_resamplings():
    per_image = per_image_confusion(*random_labels(numpy.random.default_rng(12), n_images=6), 3)
    other = per_image.copy()
    other[0] = numpy.diag(per_image[0].sum(axis=1))  # image 0 predicted perfectly, the rest alike
    paired = paired_bootstrap(other, per_image, CLASSES, replicates=400)
    ahead, tied = paired["accuracy"]["a_ahead"], paired["accuracy"]["tied"]
    # a replicate that did not draw image 0 is a tie: (5/6)^6 of them
    assert 0 < tied < 1 and ahead + tied == pytest.approx(1.0)
    assert tied == pytest.approx((5 / 6) ** 6, abs=0.08)


def test_replicate_scores_of_fractions_are_those_of_counts():
    per_image = per_image_confusion(*random_labels(numpy.random.default_rng(13)), 3)
    counts = per_image.sum(axis=0)[None]
    for mine, expected in zip(replicate_scores(counts / counts.sum()), replicate_scores(counts)):
        numpy.testing.assert_allclose(mine, expected, rtol=1e-12)
    accuracy, f_measure = replicate_scores(numpy.zeros((1, 3, 3)))
    assert numpy.isnan(accuracy).all() and numpy.isnan(f_measure).all()


def test_a_class_predicted_in_a_resampling_that_drew_none_of_it_scores_0_not_undefined():
    # as on the whole set: all its predictions are false; undefined only when neither is there
    drew_none = numpy.array([[[5, 0, 1], [0, 3, 0], [0, 0, 0]]])  # class 2: none true, 1 predicted
    neither = numpy.array([[[5, 0, 0], [0, 3, 0], [0, 0, 0]]])
    _, f_measure = replicate_scores(numpy.concatenate([drew_none, neither]))
    assert f_measure[0, 2] == 0.0 and numpy.isnan(f_measure[1, 2])


def test_replicate_scores_and_intervals_name_input_they_cannot_use():
    with pytest.raises(ValueError, match=r"stacked as \(R, K, K\), got shape \(3, 3\)"):
        replicate_scores(numpy.eye(3))
    per_image = numpy.repeat(numpy.eye(3, dtype=numpy.int64)[None], 4, axis=0)
    for run in (lambda: bootstrap_intervals(per_image, None), lambda: paired_bootstrap(per_image, per_image, None)):
        with pytest.raises(TypeError, match="the class names must be a list of K names, got None"):
            run()
