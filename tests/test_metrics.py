"""Scores: confusion matrix, precision, recall, F-measure, Table 3's groups."""

import numpy
import pytest

from minirnng.data.classes import HELEN_CLASSES
from minirnng.metrics import (ConfusionAccumulator, accuracy_range, confusion_matrix, group_f_measure,
                              pixel_accuracy, precision_recall_f, summarize, table3_scores)


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    truth = numpy.array([0, 0, 1, 1, 2, 255])
    predicted = numpy.array([0, 1, 1, 1, 0, 2])
    matrix = confusion_matrix(predicted, truth, 3, ignore_index=255)
    numpy.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert pixel_accuracy(matrix) == pytest.approx(3 / 5)
    precision, recall, f = precision_recall_f(matrix)
    numpy.testing.assert_allclose(precision, [0.5, 2 / 3, numpy.nan])
    numpy.testing.assert_allclose(recall, [0.5, 1.0, 0.0])
    numpy.testing.assert_allclose(f, [0.5, 0.8, 0.0])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        confusion_matrix(numpy.array([5]), numpy.array([0]), 3)


def test_summary_is_keyed_by_class_name_and_json_ready():
    matrix = numpy.array([[5, 0], [0, 0]])
    summary = summarize(matrix, ["background", "skin"])
    assert summary["accuracy"] == 1.0
    assert summary["f_measure"] == {"background": 1.0, "skin": None}


def test_groups_merge_classes():
    k = len(HELEN_CLASSES)
    matrix = numpy.zeros((k, k), dtype=int)
    left, right = HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")
    matrix[left, right] = 10  # left eyes called right eyes: wrong per class, right for "eyes"
    matrix[1, 1] = 100
    assert group_f_measure(matrix, [left, right]) == 1.0
    assert precision_recall_f(matrix)[2][left] == 0.0
    scores = table3_scores(matrix)
    assert scores["eyes"] == 100.0 and scores["skin"] == 100.0 and scores["overall"] == 100.0
    assert list(scores) == ["eyes", "brows", "nose", "in mouth", "U-lip", "L-lip", "mouth", "skin", "overall"]


def test_accumulator_adds_batches():
    accumulator = ConfusionAccumulator(["a", "b"])
    accumulator.add(numpy.array([[0, 1]]), numpy.array([[0, 1]]))
    accumulator.add(numpy.array([[1]]), numpy.array([[0]]))
    assert accumulator.matrix.tolist() == [[1, 1], [0, 1]]


def test_scores_of_a_confusion_matrix_check_it_and_its_class_names():
    matrix = numpy.array([[3, 1, 0], [0, 2, 1], [1, 0, 4]])
    with pytest.raises(ValueError, match=r"2 class names \['a', 'b'\] for a 3x3 confusion matrix"):
        summarize(matrix, ["a", "b"])
    with pytest.raises(ValueError, match="4 class names"):
        summarize(matrix, ["a", "b", "c", "d"])
    assert summarize(matrix.tolist(), ["a", "b", "c"]) == summarize(matrix, ["a", "b", "c"])
    assert pixel_accuracy(matrix.tolist()) == pytest.approx(9 / 12)
    with pytest.raises(ValueError, match=r"must be square \(K, K\), got shape \(2, 3\)"):
        pixel_accuracy(matrix[:2])
    with pytest.raises(ValueError, match="negative or non-finite"):
        precision_recall_f(-matrix)


def test_the_per_image_accumulator_refuses_a_single_label_map():
    accumulator = ConfusionAccumulator(["a", "b"], per_image=True)
    with pytest.raises(ValueError, match=r"a batch \(B, H, W\), got shape \(4, 5\); add one image as labels\[None\]"):
        accumulator.add(numpy.zeros((4, 5), int), numpy.zeros((4, 5), int))
    accumulator.add(numpy.zeros((1, 4, 5), int), numpy.zeros((1, 4, 5), int))
    assert accumulator.per_image.shape == (1, 2, 2)


# -- accuracy_range: which accuracies per-class F-measures allow ---------------------------------

def _random_confusion(generator, n_classes):
    """A confusion matrix of a plausible parser: mostly right, with uneven class sizes and errors."""
    sizes = generator.dirichlet(numpy.full(n_classes, 0.8)) * 1e6
    confusion = generator.dirichlet(numpy.full(n_classes, 0.3), size=n_classes) * sizes[:, None]
    confusion[numpy.diag_indices(n_classes)] += sizes * generator.uniform(0, 8, n_classes)
    return confusion


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_accuracy_range_contains_the_accuracy_of_every_confusion_matrix(n_classes):
    generator = numpy.random.default_rng(n_classes)
    for _ in range(40):
        confusion = _random_confusion(generator, n_classes)
        _, _, f_measure = precision_recall_f(confusion)
        class_fractions = confusion.sum(axis=1) / confusion.sum()
        lowest, highest = accuracy_range(f_measure, class_fractions)
        assert lowest - 1e-9 <= pixel_accuracy(confusion) <= highest + 1e-9


def test_accuracy_range_of_perfect_and_of_useless_predictions():
    assert accuracy_range([1.0, 1.0, 1.0], [0.5, 0.3, 0.2]) == pytest.approx((1.0, 1.0))
    # all pixels called class 0: F_0 = 2 * 0.6 / 1.6, F_1 = 0, accuracy 0.6
    assert accuracy_range([1.2 / 1.6, 0.0], [0.6, 0.4]) == pytest.approx((0.6, 0.6))


def test_the_papers_table_1_rnng_column_needs_its_skin_and_background_swapped():
    # LFW-PL's class shares (background, skin, hair), measured on the train and validation splits
    # at 250 x 250 (docs/results.md); the paper's RNN-G F-measures and accuracy from its Table 1.
    lfw_pl = [0.6833, 0.2136, 0.1031]
    assert accuracy_range([0.9437, 0.9755, 0.8343], lfw_pl) is None      # as printed: impossible
    lowest, highest = accuracy_range([0.9755, 0.9437, 0.8343], lfw_pl)  # F-skin and F-bg swapped
    assert lowest <= 0.9546 <= highest


def test_accuracy_range_names_bad_input():
    with pytest.raises(ValueError, match="one F-measure per class"):
        accuracy_range([0.9, 0.8], [0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="not percentages"):
        accuracy_range([94.4, 97.6, 83.4], [0.68, 0.21, 0.11])
    with pytest.raises(ValueError, match="sum to 1"):
        accuracy_range([0.9, 0.8, 0.7], [0.5, 0.3, 0.1])


def test_confusion_matrix_names_arrays_it_cannot_count():
    labels = numpy.zeros((4, 5), numpy.int64)
    with pytest.raises(ValueError, match=r"differ in shape \(\(5, 4\) and \(4, 5\)\)"):
        confusion_matrix(labels.T, labels, 3)  # as many pixels, the wrong ones
    with pytest.raises(TypeError, match="predicted labels must be integers, got dtype float64"):
        confusion_matrix(labels + 0.5, labels, 3)
    for n_classes in (3.0, -1, 0):
        with pytest.raises(ValueError, match="n_classes must be a positive integer"):
            confusion_matrix(labels, labels, n_classes)


def test_a_matrix_of_fractions_scores_as_its_counts_do():
    # every denominator of C / C.sum() is below 1: only the zero ones may be set aside
    counts = numpy.array([[50, 10, 0, 0], [5, 30, 5, 0], [0, 5, 20, 0], [0, 0, 0, 0]])
    fractions = counts / counts.sum()
    for mine, expected in zip(precision_recall_f(fractions), precision_recall_f(counts)):
        numpy.testing.assert_allclose(mine, expected, rtol=1e-12)
    numpy.testing.assert_allclose(precision_recall_f(fractions)[2][:3], [20 / 23, 60 / 85, 40 / 50], rtol=1e-12)
    assert numpy.isnan(precision_recall_f(fractions)[2][3])  # a class that is absent still has no score
    assert pixel_accuracy(fractions) == pytest.approx(pixel_accuracy(counts), rel=1e-12)
    assert group_f_measure(fractions, [0, 1]) == pytest.approx(group_f_measure(counts, [0, 1]), rel=1e-12)


def test_a_group_is_distinct_class_indices_within_the_matrix():
    confusion = numpy.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    assert group_f_measure(confusion, (1,)) == pytest.approx(0.6)
    assert group_f_measure(confusion, numpy.array([1, 2])) == pytest.approx(2 * 8 / (9 + 10))
    # a repeated class counted its hits k^2 times (F above 1); -1 scored the last class
    for group in ((1, 1), (0, 0, 0), (-1,), (5,), ("skin",), (), (True,)):
        with pytest.raises(ValueError, match=r"group_f_measure: the group must be distinct class indices in 0 .. 2"):
            group_f_measure(confusion, group)


def test_a_matrix_of_fractions_counts_its_pixels_and_a_ragged_one_is_named():
    fractions = numpy.full((3, 3), 1 / 9) * (1 - 4e-7)
    assert summarize(fractions, ["a", "b", "c"])["pixels"] == 1
    with pytest.raises(TypeError, match="table3_scores: a confusion matrix must be a"):
        table3_scores([[1, 2], [3]])
