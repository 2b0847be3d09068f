"""Losses of the training objective and the boundary supervision of the gate.

Softmax cross-entropy over K classes, per pixel ``i`` with target ``t_i`` and weight
``w_i = class_weights[t_i]`` (1 without class weights), over the set U of pixels used (inside the
mask, target not the ignore index)::

    p_i = softmax(z_i),    L = sum_{i in U} w_i * (-log p_i[t_i]) / sum_{i in U} w_i
    dL/dz_i = w_i * (p_i - onehot(t_i)) / sum_{i in U} w_i     (0 outside U)

(PyTorch's weighted mean). ``-log p[t] = logsumexp(z) - z[t]`` is computed after subtracting the
maximum logit, so logits of 1e4 neither overflow nor lose the answer.

Sigmoid binary cross-entropy, per pixel with target ``t`` in {0, 1}, mean over the pixels used::

    L_i = max(z, 0) - z t + log(1 + e^{-|z|}),      dL/dz_i = (sigmoid(z) - t) / |U|

which is the textbook ``-t log s - (1 - t) log(1 - s)`` rewritten so no exponent is positive.

If no pixel is used, a loss is 0 and its gradient is 0 (not NaN): a batch whose boundary mask
happens to be empty must not poison training.

Both losses return the loss as a Python float from ``forward`` and the gradient with respect to
the logits from ``backward(grad_output=1.0)``, scaled by ``grad_output`` (the chain rule when the
loss is one term of a weighted sum).
"""

import numpy

from . import backend
from .layers.base import check_array


def _check_int_target(target, owner, expected_shape):
    if not (isinstance(target, numpy.ndarray) or backend.is_cupy_array(target)):
        raise TypeError(f"{owner}: target must be an integer array, got {type(target).__name__}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"{owner}: target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(expected_shape):
        raise ValueError(f"{owner}: target must have shape {tuple(expected_shape)} to match the logits, "
                         f"got {tuple(target.shape)}")


def _check_mask(mask, owner, expected_shape):
    if mask is None:
        return None
    if not (isinstance(mask, numpy.ndarray) or backend.is_cupy_array(mask)):
        raise TypeError(f"{owner}: mask must be an array, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{owner}: mask must have shape {tuple(expected_shape)}, got {tuple(mask.shape)}")
    return mask.astype(bool, copy=False)


class SoftmaxCrossEntropy:
    """Softmax cross-entropy of logits (N, K, H, W) against integer targets (N, H, W).

    class_weights : optional (K,) non-negative weights (PyTorch's ``weight=``).
    ignore_index : optional target value that contributes nothing (PyTorch's ``ignore_index``).
    forward(logits, target, mask=None) -> float, the weighted mean over the pixels used;
    mask : optional (N, H, W) bool, True where a pixel is used.
    backward(grad_output=1.0) -> dlogits (N, K, H, W), the logits' dtype.
    """

    def __init__(self, class_weights=None, ignore_index=None):
        if class_weights is not None:
            class_weights = numpy.asarray(backend.to_numpy(class_weights), dtype=numpy.float64)
            if class_weights.ndim != 1 or numpy.any(class_weights < 0) or not numpy.all(numpy.isfinite(class_weights)):
                raise ValueError("SoftmaxCrossEntropy: class_weights must be a 1-D array of finite, "
                                 f"non-negative numbers, got {class_weights!r}")
        self.class_weights = class_weights
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.cache = None

    def __repr__(self):
        return f"SoftmaxCrossEntropy(class_weights={self.class_weights}, ignore_index={self.ignore_index})"

    def check(self, logits, target, mask):
        owner = "SoftmaxCrossEntropy"
        check_array(logits, owner, "logits", ndim=4)
        n, k, height, width = logits.shape
        _check_int_target(target, owner, (n, height, width))
        if self.class_weights is not None and len(self.class_weights) != k:
            raise ValueError(f"{owner}: {len(self.class_weights)} class weights given for logits with {k} classes")
        mask = _check_mask(mask, owner, (n, height, width))
        valid = (target >= 0) & (target < k)
        if self.ignore_index is not None:
            valid |= target == self.ignore_index
        if not bool(valid.all()):
            bad = backend.to_numpy(target[~valid])
            raise ValueError(f"{owner}: target holds labels outside [0, {k}) that are not the ignore index "
                             f"({self.ignore_index}): {sorted(set(bad.tolist()))[:10]} in {bad.size} pixels")
        return mask

    def forward(self, logits, target, mask=None):
        mask = self.check(logits, target, mask)
        loss, self.cache = self.forward_cpu(logits, target, mask)
        return loss

    def forward_cpu(self, logits, target, mask):
        used = numpy.ones(target.shape, dtype=bool) if mask is None else mask.copy()
        if self.ignore_index is not None:
            used &= target != self.ignore_index
        safe_target = numpy.where(used, target, 0)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = numpy.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        probabilities = exp / total
        picked = numpy.take_along_axis(shifted, safe_target[:, None], axis=1)[:, 0]
        nll = numpy.log(total[:, 0]) - picked
        weights = used.astype(logits.dtype)
        if self.class_weights is not None:
            weights *= self.class_weights.astype(logits.dtype)[safe_target]
        weight_sum = float(weights.sum())
        loss = float((weights * nll).sum()) / weight_sum if weight_sum > 0 else 0.0
        return loss, (probabilities, safe_target, weights, weight_sum)

    def backward(self, grad_output=1.0):
        if self.cache is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return self.backward_cpu(grad_output)

    def backward_cpu(self, grad_output):
        probabilities, safe_target, weights, weight_sum = self.cache
        if weight_sum == 0:
            return numpy.zeros_like(probabilities)
        grad = probabilities.copy()
        numpy.put_along_axis(grad, safe_target[:, None],
                             numpy.take_along_axis(grad, safe_target[:, None], axis=1) - 1, axis=1)
        grad *= (weights * (grad_output / weight_sum))[:, None]
        return grad


class SigmoidBinaryCrossEntropy:
    """Sigmoid binary cross-entropy of logits (N, 1, H, W) against targets (N, 1, H, W) in {0, 1}.

    forward(logits, target, mask=None) -> float, the mean over the pixels used;
    mask : optional bool array of the logits' shape, True where a pixel is used.
    backward(grad_output=1.0) -> dlogits of the logits' shape and dtype.
    """

    def __init__(self):
        self.cache = None

    def __repr__(self):
        return "SigmoidBinaryCrossEntropy()"

    def check(self, logits, target, mask):
        owner = "SigmoidBinaryCrossEntropy"
        check_array(logits, owner, "logits", ndim=4, channels=1)
        if not (isinstance(target, numpy.ndarray) or backend.is_cupy_array(target)):
            raise TypeError(f"{owner}: target must be an array, got {type(target).__name__}")
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"{owner}: target must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        if not bool(((target == 0) | (target == 1)).all()):
            raise ValueError(f"{owner}: target must hold only 0 and 1")
        return _check_mask(mask, owner, logits.shape)

    def forward(self, logits, target, mask=None):
        mask = self.check(logits, target, mask)
        loss, self.cache = self.forward_cpu(logits, target, mask)
        return loss

    def forward_cpu(self, logits, target, mask):
        target = target.astype(logits.dtype)
        used = numpy.ones(logits.shape, dtype=logits.dtype) if mask is None else mask.astype(logits.dtype)
        count = float(used.sum())
        per_pixel = numpy.maximum(logits, 0) - logits * target + numpy.log1p(numpy.exp(-numpy.abs(logits)))
        loss = float((per_pixel * used).sum()) / count if count > 0 else 0.0
        return loss, (logits, target, used, count)

    def backward(self, grad_output=1.0):
        if self.cache is None:
            raise RuntimeError("SigmoidBinaryCrossEntropy.backward called before forward")
        return self.backward_cpu(grad_output)

    def backward_cpu(self, grad_output):
        logits, target, used, count = self.cache
        if count == 0:
            return numpy.zeros_like(logits)
        decay = numpy.exp(-numpy.abs(logits))
        probability = numpy.where(logits >= 0, 1 / (1 + decay), decay / (1 + decay))
        return ((probability - target) * used * (grad_output / count)).astype(logits.dtype, copy=False)


def boundary_target(labels):
    """The gate's supervision: 0 on semantic boundaries, 1 elsewhere.

    labels : (N, H, W) integer -> (N, 1, H, W) float32, 0 where a pixel has a 4-neighbour
    (up, down, left, right, inside the image) with a different label, 1 elsewhere. The model
    calls it on the labels subsampled to the gate's 64 x 64 resolution.
    """
    if not isinstance(labels, numpy.ndarray) and not backend.is_cupy_array(labels):
        raise TypeError(f"boundary_target: labels must be an array, got {type(labels).__name__}")
    if labels.ndim != 3:
        raise ValueError(f"boundary_target: labels must have shape (N, H, W), got {tuple(labels.shape)}")
    xp = backend.get_array_module(labels)
    boundary = xp.zeros(labels.shape, dtype=bool)
    vertical = labels[:, 1:, :] != labels[:, :-1, :]
    horizontal = labels[:, :, 1:] != labels[:, :, :-1]
    boundary[:, 1:, :] |= vertical
    boundary[:, :-1, :] |= vertical
    boundary[:, :, 1:] |= horizontal
    boundary[:, :, :-1] |= horizontal
    return (~boundary).astype(numpy.float32)[:, None]


def boundary_sample_mask(target, ratio=5, rng=None):
    """The paper's 1:5 sampling of the boundary loss: every boundary pixel, and ``ratio`` times as many others.

    target : (N, 1, H, W) from :func:`boundary_target` (0 = boundary). Returns a bool mask of the
    same shape: per image, all boundary pixels plus ``min(ratio * n_boundary, n_other)``
    non-boundary pixels drawn uniformly without replacement. An image without a boundary
    contributes no pixel. ``rng``: seed or Generator.
    """
    if ratio < 0:
        raise ValueError(f"boundary_sample_mask: ratio must be >= 0, got {ratio}")
    rng = numpy.random.default_rng(rng)
    host = backend.to_numpy(target)
    if host.ndim != 4 or host.shape[1] != 1:
        raise ValueError(f"boundary_sample_mask: target must have shape (N, 1, H, W), got {host.shape}")
    is_boundary = host.reshape(host.shape[0], -1) == 0
    mask = is_boundary.copy()
    for image, boundary in enumerate(is_boundary):
        others = numpy.flatnonzero(~boundary)
        wanted = min(int(ratio * boundary.sum()), others.size)
        if wanted:
            mask[image, rng.choice(others, size=wanted, replace=False)] = True
    mask = mask.reshape(host.shape)
    return backend.to_device(mask) if backend.is_cupy_array(target) else mask
