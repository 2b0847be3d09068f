"""Scores of a face parser: pixel accuracy, per-class precision, recall and F-measure, Table 3's groups.

Everything is computed from one confusion matrix ``C`` (K x K, int64), ``C[t, p]`` = the number of
pixels of true class ``t`` predicted as ``p``, accumulated over a whole evaluation set (so the
scores are over pixels, not averages over images, as the paper's tables are):

    accuracy     = trace(C) / sum(C)
    precision_k  = C[k, k] / sum_t C[t, k]        recall_k = C[k, k] / sum_p C[k, p]
    F_k          = 2 precision_k recall_k / (precision_k + recall_k)

A *group* of classes (Table 3's "eyes" = left eye + right eye, "mouth" = both lips and the inner
mouth, "overall" = every facial component) is scored as one merged class: a pixel counts as a hit
when truth and prediction are both inside the group (so "overall" counts a brow pixel labelled
eye as a hit, as the convention of merging every component into one class does).

A ratio whose denominator is 0 is undefined and reports NaN (JSON ``null``): the precision of a
class that is never predicted, the recall of one that never occurs, and all three for a class
that neither occurs nor is predicted. A class that occurs and is never predicted (or the other
way round) has F 0, not NaN.
"""

import numpy

from .data.classes import COMPONENT_GROUPS, HELEN_CLASSES


def confusion_matrix(predicted, target, n_classes, ignore_index=None):
    """Confusion matrix (K, K) int64 of integer label arrays of the same shape (any shape).

    ``C[t, p]`` counts pixels of true class t predicted as p; pixels whose target is
    ``ignore_index`` are skipped. Labels outside [0, K) are a ValueError.
    """
    return _count_pairs(predicted, target, n_classes, ignore_index, per_image=False)


def per_image_confusion(predicted, target, n_classes, ignore_index=None):
    """One confusion matrix per image: (N, K, K) int64 of label arrays (N, ...) of the same shape.

    ``C[n, t, p]`` counts the pixels of image n of true class t predicted as p; summed over n it
    is :func:`confusion_matrix` of the whole set. What :mod:`minirnng.bootstrap` resamples.
    """
    return _count_pairs(predicted, target, n_classes, ignore_index, per_image=True)


def _count_pairs(predicted, target, n_classes, ignore_index, per_image):
    caller = "per_image_confusion" if per_image else "confusion_matrix"
    predicted, target = numpy.asarray(predicted), numpy.asarray(target)
    if predicted.shape != target.shape:
        # a transposed map has as many pixels and would be counted without a word
        raise ValueError(f"{caller}: predicted and target differ in shape "
                         f"({predicted.shape} and {target.shape})")
    if per_image and predicted.ndim < 1:
        raise ValueError(f"{caller}: labels need a leading image axis (N, ...), got a scalar")
    for name, labels in (("predicted", predicted), ("target", target)):
        if not (numpy.issubdtype(labels.dtype, numpy.integer) or labels.dtype == bool):
            raise TypeError(f"{caller}: {name} labels must be integers, got dtype {labels.dtype}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, numpy.integer)) or n_classes < 1:
        raise ValueError(f"{caller}: n_classes must be a positive integer, got {n_classes!r}")
    n_images = predicted.shape[0] if per_image else 1
    # the image each pixel belongs to, only where it is asked for: it costs 8 bytes a pixel
    image = (numpy.repeat(numpy.arange(n_images, dtype=numpy.int64), predicted.size // max(n_images, 1))
             if per_image else None)
    predicted, target = predicted.ravel(), target.ravel()
    if ignore_index is not None:
        keep = target != ignore_index
        predicted, target = predicted[keep], target[keep]
        image = image[keep] if per_image else None
    for name, labels in (("predicted", predicted), ("target", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{caller}: {name} labels must be in [0, {n_classes}), "
                             f"found {int(labels.min())}..{int(labels.max())}")
    cells = n_classes * n_classes
    flat = target.astype(numpy.int64) * n_classes + predicted.astype(numpy.int64)
    if per_image:
        flat += image * cells
    counts = numpy.bincount(flat, minlength=n_images * cells).reshape(n_images, n_classes, n_classes)
    return counts if per_image else counts[0]


def _ratio(numerator, denominator):
    """numerator / denominator elementwise, NaN where the denominator is 0 (a class that is absent).

    Only the zeros are set aside: a matrix of fractions (C / C.sum()) has every denominator below 1,
    and gives the same scores as the counts."""
    numerator, denominator = numpy.broadcast_arrays(numpy.asarray(numerator, dtype=numpy.float64),
                                                    numpy.asarray(denominator, dtype=numpy.float64))
    out = numpy.full(numerator.shape, numpy.nan)
    return numpy.divide(numerator, denominator, out=out, where=denominator > 0)


def checked_confusion(confusion, caller):
    """``confusion`` as a float64 (K, K) array, or a clear error: a square matrix of counts."""
    try:
        matrix = numpy.asarray(confusion, dtype=numpy.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: a confusion matrix must be a (K, K) array of counts, "
                        f"got {type(confusion).__name__}") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{caller}: a confusion matrix must be square (K, K), got shape {matrix.shape}")
    if not numpy.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError(f"{caller}: a confusion matrix holds counts, found negative or non-finite values")
    return matrix


def precision_recall_f(confusion):
    """Per-class precision, recall and F-measure, each a float64 (K,) array (NaN where undefined)."""
    confusion = checked_confusion(confusion, "precision_recall_f")
    hits = numpy.diag(confusion)
    precision = _ratio(hits, confusion.sum(axis=0))
    recall = _ratio(hits, confusion.sum(axis=1))
    f_measure = _ratio(2 * hits, confusion.sum(axis=0) + confusion.sum(axis=1))
    return precision, recall, f_measure


def pixel_accuracy(confusion):
    """trace(C) / sum(C) of a (K, K) confusion matrix; NaN when it counts no pixel."""
    confusion = checked_confusion(confusion, "pixel_accuracy")
    total = confusion.sum()
    return float(numpy.trace(confusion) / total) if total else float("nan")


def group_f_measure(confusion, group):
    """F-measure of the classes in ``group`` (indices) merged into one class."""
    confusion = checked_confusion(confusion, "group_f_measure")
    group = list(group)
    # a repeated index would count its hits k^2 times and its pixels k times (an F above 1), and
    # a negative one would score a class counted from the end
    if (not group or any(isinstance(k, bool) or not isinstance(k, (int, numpy.integer)) for k in group)
            or len(set(group)) != len(group) or min(group) < 0 or max(group) >= len(confusion)):
        raise ValueError(f"group_f_measure: the group must be distinct class indices in 0 .. {len(confusion) - 1}, "
                         f"got {group!r}")
    hits = confusion[numpy.ix_(group, group)].sum()
    predicted = confusion[:, group].sum()
    actual = confusion[group, :].sum()
    return float(2 * hits / (predicted + actual)) if predicted + actual else float("nan")


def summarize(confusion, classes):
    """A JSON-ready dict: ``accuracy`` and per-class ``precision``, ``recall``, ``f_measure`` keyed by name.

    All values are fractions in [0, 1] (or None where undefined). ``classes`` names every row
    of the matrix, in order.
    """
    confusion = checked_confusion(confusion, "summarize")
    classes = list(classes)
    if len(classes) != len(confusion):
        raise ValueError(f"summarize: {len(classes)} class names {classes} for a {len(confusion)}x{len(confusion)} "
                         "confusion matrix; give one name per class")
    precision, recall, f_measure = precision_recall_f(confusion)

    def by_name(values):
        return {name: (None if numpy.isnan(v) else float(v)) for name, v in zip(classes, values)}

    accuracy = pixel_accuracy(confusion)
    return {
        "accuracy": None if numpy.isnan(accuracy) else accuracy,  # a matrix that counts no pixel
        "precision": by_name(precision),
        "recall": by_name(recall),
        "f_measure": by_name(f_measure),
        "pixels": int(round(float(confusion.sum()))),  # a matrix of fractions sums to 1 up to rounding
    }


def table3_scores(confusion):
    """The columns of the paper's Table 3 from an 11-class (HELEN) confusion matrix, F in percent."""
    confusion = checked_confusion(confusion, "table3_scores")
    if confusion.shape != (len(HELEN_CLASSES), len(HELEN_CLASSES)):
        raise ValueError(f"table3_scores needs an 11 x 11 HELEN confusion matrix, got {confusion.shape}")
    return {column: 100 * group_f_measure(confusion, group) for column, group in COMPONENT_GROUPS.items()}


class ConfusionAccumulator:
    """Accumulate a confusion matrix batch by batch: ``add(predicted, target)``, then ``summary()``.

    With ``per_image=True`` it also keeps each image's matrix (``per_image``, (N, K, K)), for
    the intervals of :mod:`minirnng.bootstrap`; ``add`` then takes labels (B, ...), one per image.
    """

    def __init__(self, classes, ignore_index=None, per_image=False):
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.matrix = numpy.zeros((len(self.classes), len(self.classes)), dtype=numpy.int64)
        self._per_image = [] if per_image else None

    def add(self, predicted, target):
        if self._per_image is None:
            self.matrix += confusion_matrix(predicted, target, len(self.classes), self.ignore_index)
            return
        if numpy.ndim(predicted) < 3:
            # a single (H, W) map would be counted as H images of one row each
            raise ValueError(f"ConfusionAccumulator.add: with per_image=True the labels are a batch (B, H, W), "
                             f"got shape {numpy.shape(predicted)}; add one image as labels[None]")
        matrices = per_image_confusion(predicted, target, len(self.classes), self.ignore_index)
        self._per_image.append(matrices)
        self.matrix += matrices.sum(axis=0)

    @property
    def per_image(self):
        """(N, K, K) int64: the matrix of every image added so far, in order."""
        if self._per_image is None:
            raise RuntimeError("ConfusionAccumulator: per-image matrices were not kept; "
                               "create it with per_image=True")
        k = len(self.classes)
        return numpy.concatenate(self._per_image) if self._per_image else numpy.zeros((0, k, k), numpy.int64)

    def summary(self):
        return summarize(self.matrix, self.classes)


def accuracy_range(f_measures, class_fractions):
    """The pixel accuracies that a table's per-class F-measures allow, given how often each class occurs.

    A table that prints F_k for every class and the pixel accuracy of the same predictions must
    satisfy an identity. In fractions of all pixels, let G_k be the share of class k in the
    ground truth, P_k its share in the predictions and T_k the share of pixels that are k in both.
    Then F_k = 2 T_k / (P_k + G_k) and the accuracy is sum_k T_k, so

        accuracy = sum_k F_k (P_k + G_k) / 2.

    P is unknown, but not free:

    - sum_k P_k = 1;
    - T_k <= min(P_k, G_k), which puts each P_k in  G_k F_k / (2 - F_k) <= P_k <= G_k (2 - F_k) / F_k;
    - every mistake is counted twice, as a miss of its true class and a false alarm of its
      predicted class, so no class takes part in more mistakes than there are:
      (P_k + G_k)(1 - F_k) <= 1 - accuracy.

    All three are linear in P, and so is the accuracy: its smallest and largest values are two
    small linear programs (``scipy.optimize.linprog``). These are conditions any confusion matrix
    meets, so an accuracy outside the returned interval cannot come from these F-measures on data
    with these class shares.

    f_measures, class_fractions: sequences of K numbers in [0, 1]; the fractions sum to 1.
    Returns ``(lowest, highest)`` as fractions, or None when no predictions at all have these
    F-measures on data with these class shares.
    """
    from scipy.optimize import linprog

    f = numpy.asarray(f_measures, dtype=numpy.float64)
    g = numpy.asarray(class_fractions, dtype=numpy.float64)
    if f.ndim != 1 or f.shape != g.shape or f.size < 2:
        raise ValueError(f"accuracy_range needs one F-measure per class fraction (two classes or more), "
                         f"got shapes {f.shape} and {g.shape}")
    if not (numpy.all((f >= 0) & (f <= 1)) and numpy.all(g >= 0)):
        raise ValueError("accuracy_range: F-measures must be in [0, 1] and class fractions >= 0 "
                         "(pass fractions, not percentages)")
    if not numpy.isclose(g.sum(), 1.0):
        raise ValueError(f"accuracy_range: the class fractions must sum to 1, they sum to {g.sum():.6g}")

    half_f = f / 2                                   # accuracy = half_f @ P + half_f @ G
    lowest_share = g * f / (2 - f)
    highest_share = numpy.ones_like(g)
    numpy.divide(g * (2 - f), f, out=highest_share, where=f > 0)
    highest_share = numpy.minimum(highest_share, 1.0)
    # (P_k + G_k)(1 - F_k) + half_f @ P + half_f @ G <= 1, one row per class k
    mistakes = numpy.diag(1 - f) + half_f[None, :]
    mistakes_bound = 1 - half_f @ g - (1 - f) * g

    extremes = []
    for sign in (1, -1):
        solution = linprog(sign * half_f, A_ub=mistakes, b_ub=mistakes_bound,
                           A_eq=numpy.ones((1, f.size)), b_eq=[1.0],
                           bounds=list(zip(lowest_share, highest_share)), method="highs")
        if solution.status == 2:                     # infeasible
            return None
        if not solution.success:
            raise RuntimeError(f"accuracy_range: the linear program failed: {solution.message}")
        extremes.append(float(half_f @ solution.x + half_f @ g))
    return extremes[0], extremes[1]
