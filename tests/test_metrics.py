"""Scores: confusion matrix, precision, recall, F-measure, Table 3's groups."""

import numpy
import pytest

from minirnng.data.classes import HELEN_CLASSES
from minirnng.metrics import (ConfusionAccumulator, confusion_matrix, group_f_measure, pixel_accuracy,
                              precision_recall_f, summarize, table3_scores)


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
