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

    def term_names(self):
        """The names of the terms ``parts`` can hold: logits, coarse, edge, and dice and affinity if used."""
        return tuple(self.weights)

    def __call__(self, outputs, labels, rng, images=None):
        # the half-resolution labels are sliced before any loss sees them: check them first
        if not hasattr(labels, "ndim") or labels.ndim != 3 or labels.dtype.kind not in "iu":
            described = (f"{labels.dtype} array of shape {tuple(labels.shape)}" if hasattr(labels, "ndim")
                         else type(labels).__name__)
            raise ValueError(f"StageOneObjective: labels must be an integer array (N, H, W), one label map "
                             f"per image, got a {described}")
        subsampled = labels[:, ::2, ::2]
        parts, grads = {}, {}
        weights = self.weights
        dice_weight = weights.get("dice", 0.0)
        if weights["logits"] or dice_weight:
            mask = self.label_mask(labels, rng)
        if weights["logits"]:
            parts["logits"] = self.fine.forward(outputs["logits"], labels, mask)
            grads["logits"] = self.fine.backward(weights["logits"])
        if dice_weight:
            parts["dice"] = self.dice.forward(outputs["logits"], labels, mask)
            dice_grad = self.dice.backward(dice_weight)
            grads["logits"] = dice_grad if "logits" not in grads else grads["logits"] + dice_grad
        if weights["coarse"] and "coarse" in outputs:
            parts["coarse"] = self.coarse.forward(outputs["coarse"], subsampled, self.label_mask(subsampled, rng))
            grads["coarse"] = self.coarse.backward(weights["coarse"])
        if weights["edge"] and "edge" in outputs:
            target = boundary_target(subsampled)
            mask = boundary_sample_mask(target, ratio=self.boundary_ratio, rng=rng)
            edge = outputs["edge"]
            target = backend.get_array_module(edge).asarray(target, dtype=edge.dtype)
            parts["edge"] = self.edge.forward(edge, target, mask)
            grads["edge"] = self.edge.backward(weights["edge"])
        affinity_weight = weights.get("affinity", 0.0)
        if affinity_weight:
            if images is None:
                raise ValueError("StageOneObjective: the affinity term needs the input images (images=...)")
            parts["affinity"] = self.affinity.forward(outputs["logits"], images)
            affinity_grad = self.affinity.backward(affinity_weight)
            grads["logits"] = affinity_grad if "logits" not in grads else grads["logits"] + affinity_grad
        total = float(sum(weights[name] * value for name, value in parts.items()))
        return total, parts, grads

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
