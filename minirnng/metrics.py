"""Scores of a face parser: pixel accuracy, per-class precision, recall and F-measure, Table 3's groups.

Everything is computed from one confusion matrix ``C`` (K x K, int64), ``C[t, p]`` = the number of
pixels of true class ``t`` predicted as ``p``, accumulated over a whole evaluation set (so the
scores are over pixels, not averages over images, as the paper's tables are):

    accuracy     = trace(C) / sum(C)
    precision_k  = C[k, k] / sum_t C[t, k]        recall_k = C[k, k] / sum_p C[k, p]
    F_k          = 2 precision_k recall_k / (precision_k + recall_k)

A *group* of classes (Table 3's "eyes" = left eye + right eye, "mouth" = both lips and the inner
mouth, "overall" = every facial component) is scored as one merged class: a pixel counts as a hit
when truth and prediction are both inside the group. A class that never occurs and is never
predicted has no defined score and reports NaN (JSON ``null``).
"""

import numpy

from .data.classes import COMPONENT_GROUPS, HELEN_CLASSES


def confusion_matrix(predicted, target, n_classes, ignore_index=None):
    """Confusion matrix (K, K) int64 of integer label arrays of the same shape (any shape).

    ``C[t, p]`` counts pixels of true class t predicted as p; pixels whose target is
    ``ignore_index`` are skipped. Labels outside [0, K) are a ValueError.
    """
    predicted = numpy.asarray(predicted).ravel()
    target = numpy.asarray(target).ravel()
    if predicted.shape != target.shape:
        raise ValueError(f"confusion_matrix: predicted and target differ in size "
                         f"({predicted.size} and {target.size} pixels)")
    if ignore_index is not None:
        keep = target != ignore_index
        predicted, target = predicted[keep], target[keep]
    for name, labels in (("predicted", predicted), ("target", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"confusion_matrix: {name} labels must be in [0, {n_classes}), "
                             f"found {int(labels.min())}..{int(labels.max())}")
    flat = target.astype(numpy.int64) * n_classes + predicted.astype(numpy.int64)
    return numpy.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(numerator, denominator):
    with numpy.errstate(invalid="ignore", divide="ignore"):
        return numpy.where(denominator > 0, numerator / numpy.maximum(denominator, 1), numpy.nan)


def precision_recall_f(confusion):
    """Per-class precision, recall and F-measure, each a float64 (K,) array (NaN where undefined)."""
    confusion = numpy.asarray(confusion, dtype=numpy.float64)
    hits = numpy.diag(confusion)
    precision = _ratio(hits, confusion.sum(axis=0))
    recall = _ratio(hits, confusion.sum(axis=1))
    f_measure = _ratio(2 * hits, confusion.sum(axis=0) + confusion.sum(axis=1))
    return precision, recall, f_measure


def pixel_accuracy(confusion):
    total = confusion.sum()
    return float(numpy.trace(confusion) / total) if total else float("nan")


def group_f_measure(confusion, group):
    """F-measure of the classes in ``group`` (indices) merged into one class."""
    group = list(group)
    confusion = numpy.asarray(confusion, dtype=numpy.float64)
    hits = confusion[numpy.ix_(group, group)].sum()
    predicted = confusion[:, group].sum()
    actual = confusion[group, :].sum()
    return float(2 * hits / (predicted + actual)) if predicted + actual else float("nan")


def summarize(confusion, classes):
    """A JSON-ready dict: ``accuracy`` and per-class ``precision``, ``recall``, ``f_measure`` keyed by name.

    All values are fractions in [0, 1] (or None where undefined).
    """
    precision, recall, f_measure = precision_recall_f(confusion)

    def by_name(values):
        return {name: (None if numpy.isnan(v) else float(v)) for name, v in zip(classes, values)}

    return {
        "accuracy": pixel_accuracy(confusion),
        "precision": by_name(precision),
        "recall": by_name(recall),
        "f_measure": by_name(f_measure),
        "pixels": int(numpy.asarray(confusion).sum()),
    }


def table3_scores(confusion):
    """The columns of the paper's Table 3 from an 11-class (HELEN) confusion matrix, F in percent."""
    if numpy.shape(confusion) != (len(HELEN_CLASSES), len(HELEN_CLASSES)):
        raise ValueError(f"table3_scores needs an 11 x 11 HELEN confusion matrix, got {numpy.shape(confusion)}")
    return {column: 100 * group_f_measure(confusion, group) for column, group in COMPONENT_GROUPS.items()}


class ConfusionAccumulator:
    """Accumulate a confusion matrix batch by batch: ``add(predicted, target)``, then ``summary()``."""

    def __init__(self, classes, ignore_index=None):
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.matrix = numpy.zeros((len(self.classes), len(self.classes)), dtype=numpy.int64)

    def add(self, predicted, target):
        self.matrix += confusion_matrix(predicted, target, len(self.classes), self.ignore_index)

    def summary(self):
        return summarize(self.matrix, self.classes)
