"""How sure a score is: intervals by resampling the evaluated images (the bootstrap).

A validation accuracy is measured on one sample of faces: 500 images in LFW-PL's validation
split. Another 500 faces of the same kind would give another figure, and the question "is 95.23%
below 95.46%?" is only meaningful against that spread. The pixels are not the unit to resample:
neighbouring pixels of one image are right or wrong together (a dark background, a second person),
so the 8 million pixels of the split carry far less information than their number suggests. The
images are independent draws; the bootstrap (Efron, 1979) resamples them.

Each *replicate* draws N of the N images with replacement, sums their confusion matrices and
computes the scores from the sum, exactly as the whole set's scores are computed
(:mod:`minirnng.metrics`: over pixels, not an average over images). Over R replicates:

    standard error = the standard deviation of the R replicate scores
    interval       = their (1 - level)/2 and (1 + level)/2 quantiles  (the percentile interval)

*Paired* comparison: two models, or one model with and without a test-time option, scored on the
same images. Each replicate uses the same draw for both, so how hard the drawn images are cancels
in the difference, and its interval is far narrower than either score's:

    difference_r = score_a(draw_r) - score_b(draw_r)
    a_ahead = share of replicates with difference_r > 0,  tied = share with difference_r == 0

A replicate that draws no pixel of a class and predicts none has no F-measure for it (0/0): the
interval and the standard error are those of the replicates in which the score is defined, ``defined`` says what
share of all replicates that is, and ``a_ahead`` and ``tied`` are shares of all replicates, so
that with ``b_ahead`` and the undefined ones they add up to 1. One that draws no pixel of the
class but predicts some scores 0 for it, as the whole set would (all its predictions are false):
where a class lies in a few images, the replicates that miss them and keep a few false pixels
elsewhere pull the interval down to 0, which is what the score would do on such a set of images.

Ties are reported on their own, not split between the two: a set compared with itself, or two
models that label every drawn image alike, is tied in every replicate (a_ahead 0, tied 1), which
"a ahead in 0%" alone would misreport as b being better.

These intervals say how much the *choice of images* moves a score. They say nothing about how
much the training run's seed moves it; that is a second spread, measured by training again.

Arrays: ``per_image`` is (N, K, K) int64, ``per_image[n, t, p]`` the pixels of image n of true
class t predicted as p (:func:`minirnng.metrics.per_image_confusion`,
``evaluate(..., per_image=True)``); ``indices`` is (R, N) int64, one draw of image numbers per row.
"""

import numpy

DEFAULT_REPLICATES = 2000
#: The fewest resamplings for which a 95% percentile interval means anything: with 100, each end is
#: set by the 2 or 3 most extreme replicates; with 1 or 2 the "interval" is a point, which can even
#: miss the estimate.
MIN_REPLICATES = 100


def resample_indices(n_images, replicates, rng=None):
    """(R, N) int64: for each of ``replicates`` rows, ``n_images`` image numbers drawn with replacement."""
    for name, value in (("n_images", n_images), ("replicates", replicates)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
            raise ValueError(f"resample_indices: {name} must be a positive integer, got {value!r}")
    return numpy.random.default_rng(rng).integers(0, n_images, size=(replicates, n_images), dtype=numpy.int64)


def replicate_confusions(per_image, indices):
    """(R, K, K) int64: the confusion matrix of each replicate, the sum of its drawn images' matrices.

    Fast path: each row of ``indices`` becomes a count of how often each image was drawn, (R, N),
    and one matrix product sums every replicate at once: counts (R, N) @ per_image (N, K*K).
    :func:`replicate_confusions_naive` is the loop it must equal.
    """
    per_image = check_per_image(per_image)
    indices = _check_indices(indices, len(per_image))
    replicates, n_images = indices.shape[0], len(per_image)
    rows = numpy.repeat(numpy.arange(replicates, dtype=numpy.int64) * n_images, indices.shape[1])
    counts = numpy.bincount(rows + indices.ravel(), minlength=replicates * n_images)
    counts = counts.reshape(replicates, n_images)
    k = per_image.shape[1]
    return (counts @ per_image.reshape(n_images, k * k)).reshape(replicates, k, k)


def replicate_confusions_naive(per_image, indices):
    """The obvious loop: for each replicate, add up the matrices of the images it drew."""
    per_image = check_per_image(per_image)
    indices = _check_indices(indices, len(per_image))
    out = numpy.zeros((indices.shape[0],) + per_image.shape[1:], dtype=numpy.int64)
    for r, draw in enumerate(indices):
        for n in draw:
            out[r] += per_image[n]
    return out


def replicate_scores(confusions):
    """Accuracy (R,) and per-class F-measure (R, K), as fractions, of confusion matrices (R, K, K).

    The formulas of :mod:`minirnng.metrics`, over a leading axis; NaN where a class neither
    occurs nor is predicted in a replicate.
    """
    confusions = numpy.asarray(confusions, dtype=numpy.float64)
    if confusions.ndim != 3 or confusions.shape[1] != confusions.shape[2]:
        raise ValueError(f"replicate_scores: confusion matrices must be stacked as (R, K, K), got shape "
                         f"{confusions.shape} (one matrix: add a leading axis, matrix[None])")
    hits = numpy.diagonal(confusions, axis1=1, axis2=2)
    totals = confusions.sum(axis=(1, 2))
    marginals = confusions.sum(axis=1) + confusions.sum(axis=2)   # predicted + actual, per class
    # NaN only where the denominator is 0: dividing by max(denominator, 1) would also change
    # the scores of matrices whose entries are fractions below 1
    accuracy = numpy.divide(hits.sum(axis=1), totals, out=numpy.full(totals.shape, numpy.nan), where=totals > 0)
    f_measure = numpy.divide(2 * hits, marginals, out=numpy.full(marginals.shape, numpy.nan), where=marginals > 0)
    return accuracy, f_measure


def bootstrap_intervals(per_image, classes, replicates=DEFAULT_REPLICATES, level=0.95, rng=0):
    """Intervals of the accuracy and of each class's F-measure over resamplings of the images.

    per_image : (N, K, K) int64, N >= 2.  classes : K names.
    Returns a JSON-ready dict, fractions in [0, 1]::

        {"images": N, "replicates": R, "level": 0.95,
         "accuracy": {"estimate", "standard_error", "low", "high", "defined"},
         "f_measure": {name: {...the same...}, ...}}

    ``estimate`` is the score of the whole set (not the replicates' mean). ``defined`` is the
    share of replicates in which the score is defined (a class neither drawn nor predicted in any
    of a replicate's images has no F-measure there); the interval is that of those replicates. A class with no
    defined score in any replicate has None in every field but ``defined``, 0.
    """
    per_image = check_per_image(per_image, classes, needs_classes=True)
    level = _check_level(level)
    indices = resample_indices(len(per_image), replicates, rng)
    accuracy, f_measure = replicate_scores(replicate_confusions(per_image, indices))
    whole_accuracy, whole_f = replicate_scores(per_image.sum(axis=0)[None])
    return {
        "images": len(per_image), "replicates": int(replicates), "level": level,
        "accuracy": _summary(whole_accuracy[0], accuracy, level),
        "f_measure": {name: _summary(whole_f[0, k], f_measure[:, k], level) for k, name in enumerate(classes)},
    }


def paired_bootstrap(per_image_a, per_image_b, classes, replicates=DEFAULT_REPLICATES, level=0.95, rng=0):
    """Interval of the difference of two sets of predictions of the same images, score a - score b.

    per_image_a, per_image_b : (N, K, K) int64 of the same images in the same order (the same
    targets: each image's row sums must agree, or they are not the same images).
    Returns ``{"images", "replicates", "level", "accuracy": {...}, "f_measure": {name: {...}}}``
    where each ``{...}`` holds ``difference`` (on the whole set), ``standard_error``, ``low``,
    ``high``, ``a_ahead``, the share of replicates in which a scores higher than b, ``tied``, the
    share in which they score exactly alike, and ``defined``, the share in which the difference
    is defined (b is ahead in the rest of those); the interval is that of the defined replicates.
    """
    per_image_a = check_per_image(per_image_a, classes, needs_classes=True)
    per_image_b = check_per_image(per_image_b, classes, needs_classes=True)
    if per_image_a.shape != per_image_b.shape:
        raise ValueError(f"paired_bootstrap: the two sets differ in shape ({per_image_a.shape} and "
                         f"{per_image_b.shape}); pair the predictions of the same images")
    if not numpy.array_equal(per_image_a.sum(axis=2), per_image_b.sum(axis=2)):
        image = int(numpy.nonzero((per_image_a.sum(axis=2) != per_image_b.sum(axis=2)).any(axis=1))[0][0])
        raise ValueError(f"paired_bootstrap: image {image} has different targets in the two sets; "
                         "pair the predictions of the same images, in the same order")
    level = _check_level(level)
    indices = resample_indices(len(per_image_a), replicates, rng)
    accuracy_a, f_a = replicate_scores(replicate_confusions(per_image_a, indices))
    accuracy_b, f_b = replicate_scores(replicate_confusions(per_image_b, indices))
    whole_a = replicate_scores(per_image_a.sum(axis=0)[None])
    whole_b = replicate_scores(per_image_b.sum(axis=0)[None])
    return {
        "images": len(per_image_a), "replicates": int(replicates), "level": level,
        "accuracy": _difference(whole_a[0][0] - whole_b[0][0], accuracy_a - accuracy_b, level),
        "f_measure": {name: _difference(whole_a[1][0, k] - whole_b[1][0, k], f_a[:, k] - f_b[:, k], level)
                      for k, name in enumerate(classes)},
    }


def check_per_image(per_image, classes=None, needs_classes=False):
    """``per_image`` as an int64 (N, K, K) array of non-negative counts, N >= 2, or a clear error;
    ``classes`` (required with ``needs_classes``) must name its K classes."""
    if needs_classes and (classes is None or isinstance(classes, str)):
        raise TypeError(f"the class names must be a list of K names, got {classes!r}")
    array = numpy.asarray(per_image)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"per-image confusion matrices must be (N, K, K), got shape {array.shape}")
    if not numpy.issubdtype(array.dtype, numpy.integer):
        raise TypeError(f"per-image confusion matrices must hold integer pixel counts, got dtype {array.dtype}")
    if len(array) < 2:
        raise ValueError(f"resampling images needs at least 2 images, got {len(array)}")
    if (array < 0).any():
        raise ValueError("per-image confusion matrices hold negative counts")
    if classes is not None and len(classes) != array.shape[1]:
        raise ValueError(f"{len(classes)} class names for {array.shape[1]} x {array.shape[2]} confusion matrices")
    return array.astype(numpy.int64, copy=False)


def _check_indices(indices, n_images):
    indices = numpy.asarray(indices)
    if indices.ndim != 2 or not numpy.issubdtype(indices.dtype, numpy.integer):
        raise ValueError(f"indices must be an integer (R, N) array, got shape {indices.shape}, dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_images):
        raise ValueError(f"indices must be image numbers in [0, {n_images}), "
                         f"found {int(indices.min())}..{int(indices.max())}")
    return indices.astype(numpy.int64, copy=False)


def _check_level(level):
    if isinstance(level, bool) or not isinstance(level, (int, float, numpy.floating)) or not 0 < level < 1:
        raise ValueError(f"level must be a probability strictly between 0 and 1 (0.95 for 95%), got {level!r}")
    return float(level)


def _interval(values, level):
    values = values[~numpy.isnan(values)]
    if values.size == 0:
        return None, None, None
    low, high = numpy.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return spread, float(low), float(high)


def _summary(estimate, values, level):
    spread, low, high = _interval(values, level)
    estimate = None if numpy.isnan(estimate) or spread is None else float(estimate)
    return {"estimate": estimate, "standard_error": spread, "low": low, "high": high,
            "defined": float((~numpy.isnan(values)).mean())}


def _difference(difference, values, level):
    spread, low, high = _interval(values, level)
    defined = values[~numpy.isnan(values)]
    # shares of all replicates, not of the defined ones: a class that one image in ten holds is
    # absent from a third of the replicates, in which neither set is ahead
    return {"difference": None if numpy.isnan(difference) or spread is None else float(difference),
            "standard_error": spread, "low": low, "high": high,
            "a_ahead": float((defined > 0).sum() / values.size) if defined.size else None,
            "tied": float((defined == 0).sum() / values.size) if defined.size else None,
            "defined": float(defined.size / values.size)}
