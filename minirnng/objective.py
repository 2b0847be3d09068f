"""The training objective of stage 1: three losses on RNN-G's three outputs (the architecture spec).

For labels ``y`` (N, H, W) and the model's outputs:

    L = w_logits * CE(logits, y)
      + w_coarse * CE(coarse, y[:, ::2, ::2])
      + w_edge   * BCE(edge, boundary_target(y[:, ::2, ::2]), mask = boundary_sample_mask(1:5))
      + w_dice   * Dice(logits, y)                      (w_dice = 0 unless asked for)
      + w_affinity * ColourAffinity(logits, images)      (w_affinity = 0 unless asked for)

CE is softmax cross-entropy (optionally class-weighted), BCE sigmoid binary cross-entropy, each a
mean over the pixels it uses; Dice is the soft Dice loss over the pixels of the whole batch that
the logits' CE uses (1 minus the mean over the classes of a soft F-measure), a term the paper does
not have (docs/training.md, run BF); ColourAffinity the pairwise term of a CRF, which asks
8-connected neighbours of one colour in the input image to agree (not the paper's either; run BV). With ``background_ratio`` the two CE terms use every face and hair
pixel and that many times as many background pixels drawn at random (the paper's sampling for
Multi-Face images, where background covers most of the picture). The edge term samples every boundary pixel and five times as many
others at random (the paper's 1:5 balance); the draw comes from the caller's generator, so a
seeded run is reproducible. The gradient of ``L`` for each output is ``w * dloss/doutput``.

Calling the objective is :meth:`StageOneObjective.prepare` (what a batch needs besides the
outputs: the checked labels, their half-resolution copy, the boundary target and every random
draw) followed by :meth:`StageOneObjective.shard_terms` (the terms and their gradients). Training
on several workers calls the two apart (:meth:`minirnng.parallel.DataParallel.objective_step`):
``prepare`` once for the batch, ``shard_terms`` in each worker on its shard, where each term is the
shard's share of the batch's mean, ``mean over the shard's pixels * n_shard / n_batch`` with ``n``
the counts of :meth:`prepare` (``counts=True``), so that the shards' terms and gradients add up to
the whole batch's. The soft Dice term, a ratio of sums over the whole batch, is not shared out:
:attr:`StageOneObjective.batch_terms` names it, and the caller computes it on the gathered logits.
"""

import numpy

from . import backend
from .data.classes import BACKGROUND
from .losses import (ColourAffinity, SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy,
                     balanced_sample_mask, boundary_sample_mask, boundary_target)


class StageOneObjective:
    """The three-term loss (more with ``dice_weight`` or ``affinity_weight``):
    ``objective(outputs, labels, rng, images=None) -> (total, parts, grads)``.

    outputs : the model's dict (``logits`` (N, K, H, W), ``coarse`` (N, K, H/2, W/2), ``edge``
        (N, 1, H/2, W/2)); labels : (N, H, W) integers; rng : numpy Generator for the sampling;
        images : the model's input (N, 3, H, W), needed only by the affinity term.
    Returns the total (float), the terms by name (floats) and the gradients by output name, ready
    for ``model.backward``.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0), boundary_ratio=5, class_weights=None, ignore_index=None,
                 background_ratio=0, dice_weight=0.0, affinity_weight=0.0):
        weights = tuple(weights)
        if len(weights) != 3:
            raise ValueError(f"StageOneObjective: weights are three numbers (logits, coarse, edge), got {weights!r}")
        self.weights = dict(zip(("logits", "coarse", "edge"), (float(w) for w in weights)))
        if dice_weight:
            self.weights["dice"] = float(dice_weight)
        if affinity_weight:
            self.weights["affinity"] = float(affinity_weight)
        self.boundary_ratio = boundary_ratio
        self.background_ratio = background_ratio
        self.fine = SoftmaxCrossEntropy(class_weights=class_weights, ignore_index=ignore_index)
        self.coarse = SoftmaxCrossEntropy(class_weights=class_weights, ignore_index=ignore_index)
        self.edge = SigmoidBinaryCrossEntropy()
        self.dice = SoftDice(ignore_index=ignore_index)
        self.affinity = ColourAffinity()

    #: The order in which :meth:`shard_terms` computes the terms, and ``parts`` holds them.
    TERM_ORDER = ("logits", "dice", "coarse", "edge", "affinity")

    @property
    def needs_images(self):
        """Whether a term reads the input images (the colour-affinity term)."""
        return "affinity" in self.weights

    def term_names(self):
        """The names of the terms ``parts`` can hold: logits, coarse, edge, and dice and affinity if used."""
        return tuple(self.weights)

    def config(self):
        """The constructor's arguments: ``StageOneObjective(**objective.config())`` is the same objective."""
        return {"weights": (self.weights["logits"], self.weights["coarse"], self.weights["edge"]),
                "boundary_ratio": self.boundary_ratio, "class_weights": self.fine.class_weights,
                "ignore_index": self.fine.ignore_index, "background_ratio": self.background_ratio,
                "dice_weight": self.weights.get("dice", 0.0), "affinity_weight": self.weights.get("affinity", 0.0)}

    def replica(self):
        """The same objective with losses of its own (their caches), for another shard of a batch."""
        return type(self)(**self.config())

    @property
    def shardable(self):
        """Whether shards of a batch can compute all the terms (:meth:`shard_terms`): every term
        is a sum over pixels, or pairs of pixels inside one image, divided by a count over the
        batch; the soft Dice term is not (a ratio of sums over the whole batch)."""
        return not self.batch_terms

    @property
    def batch_terms(self):
        """The terms only the whole batch can compute: ``("dice",)`` with the soft Dice term, else ``()``."""
        return tuple(name for name in ("dice",) if name in self.weights)

    @property
    def shard_term_names(self):
        """The terms that shards can compute, each its share (:meth:`shard_terms`)."""
        return tuple(name for name in self.weights if name not in self.batch_terms)

    def __call__(self, outputs, labels, rng, images=None):
        batch = self.prepare(labels, rng, images, output_names=tuple(outputs))
        parts, grads = self.shard_terms(outputs, batch)
        total = float(sum(self.weights[name] * value for name, value in parts.items()))
        return total, parts, grads

    def prepare(self, labels, rng, images=None, output_names=("logits", "coarse", "edge"), counts=False):
        """What the terms need of a whole batch besides the model's outputs: the labels checked and
        subsampled, every random draw (in the order :meth:`__call__` has always made them, so that
        a seeded run draws the same pixels), and with ``counts`` how many pixels each image
        counts in each term. Returns a dict of arrays with the batch on axis 0 (a shard of the
        batch is ``{name: array[part]}``): ``labels``, ``coarse_labels``, ``edge_target``, the
        masks ``label_mask``, ``coarse_mask`` and ``edge_mask`` where there are any, ``images``
        for the affinity term, and ``count:<term>`` (N,) float64 with ``counts``.
        ``output_names`` are the model's outputs: a term whose output is missing is left out.
        """
        # the half-resolution labels are sliced before any loss sees them: check them first
        if not hasattr(labels, "ndim") or labels.ndim != 3 or labels.dtype.kind not in "iu":
            described = (f"{labels.dtype} array of shape {tuple(labels.shape)}" if hasattr(labels, "ndim")
                         else type(labels).__name__)
            raise ValueError(f"StageOneObjective: labels must be an integer array (N, H, W), one label map "
                             f"per image, got a {described}")
        weights = self.weights
        batch = {"labels": labels}
        if weights["logits"] or weights.get("dice", 0.0):
            batch["label_mask"] = self.label_mask(labels, rng)
        subsampled = labels[:, ::2, ::2]
        if weights["coarse"] and "coarse" in output_names:
            batch["coarse_labels"] = subsampled
            batch["coarse_mask"] = self.label_mask(subsampled, rng)
        if weights["edge"] and "edge" in output_names:
            batch["edge_target"] = target = boundary_target(subsampled)
            batch["edge_mask"] = boundary_sample_mask(target, ratio=self.boundary_ratio, rng=rng)
        if weights.get("affinity", 0.0):
            if images is None:
                raise ValueError("StageOneObjective: the affinity term needs the input images (images=...)")
            batch["images"] = images
        batch = {name: value for name, value in batch.items() if value is not None}
        if counts:
            pixels = float(labels.shape[1] * labels.shape[2])
            if weights["logits"]:
                batch["count:logits"] = self.fine.pixel_weights_per_image(labels, batch.get("label_mask"))
            if "coarse_labels" in batch:
                batch["count:coarse"] = self.coarse.pixel_weights_per_image(subsampled, batch.get("coarse_mask"))
            if "edge_mask" in batch:
                batch["count:edge"] = batch["edge_mask"].reshape(len(labels), -1).sum(axis=1, dtype=numpy.float64)
            if "images" in batch:
                batch["count:affinity"] = numpy.full(len(labels), pixels)
        return batch

    def shard_terms(self, outputs, batch, totals=None, terms=None):
        """The terms and their gradients for the images of ``batch`` (all of :meth:`prepare`'s, or a
        shard of them) and the model's ``outputs`` for those images: ``(parts, grads)``.

        ``totals`` : for a shard, ``{term: the whole batch's count}`` (the sums of ``count:<term>``);
        each term is then its shard's share of the batch's mean, ``mean over the shard's pixels *
        shard's count / batch's count``, and its gradient that of this share, so that the shards'
        parts and gradients add up to the whole batch's. None: ``batch`` is the whole batch.
        ``terms`` : the names of the terms to compute (by default all): a shard computes
        :attr:`shard_term_names`, and the whole batch then :attr:`batch_terms`.
        """
        weights = self.weights if terms is None else {name: self.weights.get(name, 0.0) if name in terms else 0.0
                                                      for name in ("logits", "coarse", "edge", "dice", "affinity")}
        parts, grads = {}, {}

        def share(term):
            if totals is None:
                return 1.0
            here, whole = float(batch[f"count:{term}"].sum()), float(totals[term])
            return 1.0 if here == whole else here / whole

        def add(term, output, value, loss, weight):
            part = share(term)
            parts[term] = value * part
            grad = loss.backward(weight * part)
            grads[output] = grad if output not in grads else grads[output] + grad

        labels, mask = batch["labels"], batch.get("label_mask")
        if weights["logits"]:
            add("logits", "logits", self.fine.forward(outputs["logits"], labels, mask), self.fine, weights["logits"])
        if weights.get("dice", 0.0):
            if totals is not None:
                raise ValueError("StageOneObjective: the soft Dice term is a ratio of sums over the whole batch; "
                                 "shards cannot compute it apart (see shardable)")
            add("dice", "logits", self.dice.forward(outputs["logits"], labels, mask), self.dice, weights["dice"])
        if "coarse_labels" in batch and weights["coarse"]:
            value = self.coarse.forward(outputs["coarse"], batch["coarse_labels"], batch.get("coarse_mask"))
            add("coarse", "coarse", value, self.coarse, weights["coarse"])
        if "edge_target" in batch and weights["edge"]:
            edge = outputs["edge"]
            target = backend.get_array_module(edge).asarray(batch["edge_target"], dtype=edge.dtype)
            add("edge", "edge", self.edge.forward(edge, target, batch["edge_mask"]), self.edge, weights["edge"])
        if "images" in batch and weights.get("affinity", 0.0):
            value = self.affinity.forward(outputs["logits"], batch["images"])
            add("affinity", "logits", value, self.affinity, weights["affinity"])
        return parts, grads

    def label_mask(self, labels, rng):
        """The pixels the label losses use: all of them, or with ``background_ratio`` (the paper's
        Multi-Face setting) every face and hair pixel and that many times as many background ones."""
        if not self.background_ratio:
            return None
        return balanced_sample_mask(labels != BACKGROUND, self.background_ratio, rng)


def class_balance_weights(labels, n_classes, power=0.5):
    """Class weights ``(mean frequency / frequency_k) ** power`` from label arrays, normalised to mean 1.

    power = 0 gives equal weights, 1 full inverse-frequency balancing; 0.5 is a common middle way
    for a rare class such as hair. A class that never occurs in ``labels`` gets 1 before the
    normalisation, so ``1 / mean`` of the unnormalised weights after it (not 1).
    """
    labels = numpy.asarray(backend.to_numpy(labels)).ravel()
    if not numpy.issubdtype(labels.dtype, numpy.integer):
        raise TypeError(f"class_balance_weights: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"class_balance_weights: labels range over {labels.min()} .. {labels.max()}; "
                         f"expected classes 0 .. {n_classes - 1}")
    counts = numpy.bincount(labels, minlength=n_classes)
    frequency = counts / max(counts.sum(), 1)
    weights = numpy.ones(n_classes)
    present = frequency > 0
    weights[present] = (frequency[present].mean() / frequency[present]) ** power
    return weights / weights.mean()
