"""Losses of the training objective and the boundary supervision of the gate.

Three losses: softmax cross-entropy (the label terms), sigmoid binary cross-entropy (the gate's
edge term) and soft Dice (:class:`SoftDice`, an optional term on the logits that the paper does
not have; its formulas are in its docstring); and one pairwise term, :class:`ColourAffinity`,
which asks neighbours of one colour to agree (optional too, not the paper's).

Softmax cross-entropy over K classes, per pixel ``i`` with target ``t_i`` and weight
``w_i = class_weights[t_i]`` (1 without class weights), over the set U of pixels used (inside the
mask, target not the ignore index)::

    p_i = softmax(z_i),    L = sum_{i in U} w_i * (-log p_i[t_i]) / sum_{i in U} w_i
    dL/dz_i = w_i * (p_i - onehot(t_i)) / sum_{i in U} w_i     (0 outside U)

(PyTorch's weighted mean). ``-log p[t] = logsumexp(z) - z[t]`` is computed after subtracting the
maximum logit, so logits of 1e4 neither overflow nor lose the answer. The target class's
``p[t] - 1`` is computed as ``-(sum of the other classes' probabilities)``: when a pixel is
classified confidently, ``p[t]`` is within a few float32 steps (6e-8) of 1 and ``p[t] - 1`` keeps
only the rounding (logits (12, 0, 0): -1.2398e-5 instead of -1.2288e-5; logits (20, 0, 0): 0
instead of -4.1e-9), while the sum of the small probabilities keeps all its digits.

Sigmoid binary cross-entropy, per pixel with target ``t`` in {0, 1}, mean over the pixels used::

    L_i = max(z, 0) - z t + log(1 + e^{-|z|}),      dL/dz_i = (sigmoid(z) - t) / |U|

which is the textbook ``-t log s - (1 - t) log(1 - s)`` rewritten so no exponent is positive;
``sigmoid(z) - t`` is likewise written from ``e = e^{-|z|}`` without cancellation:
``(1 - t) - e / (1 + e)`` for ``z >= 0`` and ``e / (1 + e) - t`` for ``z < 0``.

If no pixel is used, a loss is 0 and its gradient is 0 (not NaN): a batch whose boundary mask
happens to be empty must not poison training.

Every loss returns the loss as a Python float from ``forward`` and the gradient with respect to
the logits from ``backward(grad_output=1.0)``, scaled by ``grad_output`` (the chain rule when the
loss is one term of a weighted sum).

Like the layers, each loss has a NumPy path (``forward_cpu`` / ``backward_cpu``) and a kernel
path (``forward_gpu`` / ``backward_gpu``: ``kernels/softmax_cross_entropy.cu``,
``kernels/sigmoid_bce.cu``, ``kernels/soft_dice.cu`` and ``kernels/colour_affinity.cu``), chosen by
:func:`minirnng.backend.uses_kernels` of the logits. The two compute the same formulas,
including the cancellation-free gradients above, so they agree to rounding. On the kernel path
the forward is three launches (the per-pixel terms, then their sums in the two passes of
``channel_sum``) and one copy of the totals (two; 2K for soft Dice) to the host for the float it
returns (the argument checks, shared by both paths, read back one more boolean: whether every
label is valid); the backward is one launch, which reads the totals on the device.
"""

import math
import numbers

import numpy

from . import backend
from .cuda.launch import channel_sum, contiguous, element_count, launch
from .layers.base import check_array, check_number

#: The ignore index the kernel is given when nothing is ignored (no label is negative, so none matches).
NO_IGNORE_INDEX = -100


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
    # a mask chooses pixels; a weight of 0.5 read as "counted" would be a silent mistake
    if mask.dtype != bool and mask.size and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{owner}: mask must be boolean or 0/1 (it chooses the pixels counted); got values other "
                         "than 0 and 1 (for per-class weights use class_weights)")
    return mask.astype(bool, copy=False)


def checked_ignore_index(ignore_index, owner):
    """None, or the label value that counts nothing, as an int (1.5 would silently become 1)."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, numpy.bool_)) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{owner}: ignore_index must be None or an integer label, got {ignore_index!r}")
    return int(ignore_index)


def check_grad_output(grad_output, owner):
    """The upstream gradient of a loss, a real number (the loss is a scalar) as a Python float."""
    if getattr(grad_output, "ndim", None) == 0 and getattr(grad_output, "dtype", None) is not None \
            and grad_output.dtype.kind == "f":
        grad_output = float(grad_output)  # a 0-d array (a NumPy or CuPy scalar result) is a number too
    if isinstance(grad_output, (bool, numpy.bool_)) or not isinstance(grad_output, numbers.Real):
        raise TypeError(f"{owner}.backward: grad_output is the gradient of a scalar loss, a real number; got "
                        f"{type(grad_output).__name__}")
    if not math.isfinite(grad_output):
        raise ValueError(f"{owner}.backward: grad_output must be finite, got {grad_output}")
    return float(grad_output)


def _check_same_device(array, logits, owner, what):
    if array is not None and backend.is_cupy_array(array) != backend.is_cupy_array(logits):
        where = "the GPU (CuPy)" if backend.is_cupy_array(logits) else "the host (NumPy)"
        raise ValueError(f"{owner}: {what} is on the wrong device; the logits are on {where}. "
                         "Move it with minirnng.backend.to_device / to_numpy.")


def _check_class_scores(owner, logits, target, mask, ignore_index):
    """The checks of a loss on class scores (N, K, H, W) against integer targets (N, H, W): shapes,
    dtypes, devices, and that every label counted is a class in [0, K). Returns the mask as bool."""
    check_array(logits, owner, "logits", ndim=4)
    n, k, height, width = logits.shape
    _check_int_target(target, owner, (n, height, width))
    _check_same_device(target, logits, owner, "target")
    _check_same_device(mask, logits, owner, "mask")
    mask = _check_mask(mask, owner, (n, height, width))
    if isinstance(target, numpy.ndarray) and target.min() >= 0 and target.max() < k:
        return mask  # two reductions tell that every label is a class, a third of the sweeps below
    valid = (target >= 0) & (target < k)
    if ignore_index is not None:
        valid |= target == ignore_index
    if not bool(valid.all()):
        bad = backend.to_numpy(target[~valid])
        raise ValueError(f"{owner}: target holds labels outside [0, {k}) that are not the ignore index "
                         f"({ignore_index}): {sorted(set(bad.tolist()))[:10]} in {bad.size} pixels")
    return mask


def _used_pixels(target, mask, ignore_index):
    """The pixels a loss on class scores uses, (N, H, W) bool, or None when it uses all of them:
    inside the mask and not the ignore index (NumPy path)."""
    used = None if mask is None else mask.copy()
    if ignore_index is not None:
        counted = target != ignore_index
        used = counted if used is None else numpy.logical_and(used, counted, out=used)
    return used


def _class_index_array(target, used, k):
    """The targets of the pixels used, 0 elsewhere, in the narrowest integer type (faster compares)."""
    index_dtype = numpy.uint8 if k <= 256 else numpy.int64
    return (target if used is None else numpy.where(used, target, 0)).astype(index_dtype)


def _zero_where_unused(values, unused):
    """Set ``values`` (N, H, W) or (N, K, H, W) to 0, in place, at the pixels where ``unused``
    (N, H, W) bool is True, and return them. A pixel that does not count then adds an exact 0, as
    in the kernels, which skip it: multiplying by its weight of 0 would keep a NaN or infinite
    score's NaN and spoil the whole sum."""
    numpy.copyto(values, 0, where=unused if values.ndim == unused.ndim else unused[:, None])
    return values


def _softmax_cpu(logits):
    """The softmax over the classes of logits (N, K, H, W), one contiguous (N, H, W) slab at a time.

    Returns (probabilities (N, K, H, W), largest (N, H, W) = max_k z_k, total (N, H, W) =
    sum_k exp(z_k - largest)), all in the logits' dtype: the largest score is subtracted first, so
    exp never overflows, and the cross-entropy takes its log-sum-exp from the last two.
    """
    k = logits.shape[1]
    largest = logits[:, 0].copy()
    for c in range(1, k):
        numpy.maximum(largest, logits[:, c], out=largest)
    probabilities = numpy.empty_like(logits)
    total = numpy.zeros_like(largest)
    for c in range(k):
        numpy.subtract(logits[:, c], largest, out=probabilities[:, c])
        numpy.exp(probabilities[:, c], out=probabilities[:, c])
        total += probabilities[:, c]
    probabilities /= total[:, None]
    return probabilities, largest, total


def _kernel_ignore_index(owner, ignore_index):
    """The ignore index as the kernels' int parameter (:data:`NO_IGNORE_INDEX` when there is none)."""
    value = NO_IGNORE_INDEX if ignore_index is None else ignore_index
    if not numpy.iinfo(numpy.int32).min <= value <= numpy.iinfo(numpy.int32).max:
        raise ValueError(f"{owner}: ignore_index {value} does not fit the kernels' int32 "
                         "parameter; use a value between -2**31 and 2**31 - 1 (255 or -100 are usual)")
    return numpy.int32(value)


class Loss:
    """The dispatch the losses with targets share (the cross-entropies and soft Dice; the colour
    affinity takes images instead): ``forward(logits, target, mask=None) -> float`` checks its
    arguments, then runs ``forward_gpu`` when the logits take the kernel path, ``forward_cpu``
    otherwise; ``backward(grad_output=1.0) -> dlogits`` runs the backward of the same path."""

    def __init__(self):
        self.cache = None

    def forward(self, logits, target, mask=None):
        self.cache = None  # a forward that fails leaves nothing for backward, not the previous pass's
        mask = self.check(logits, target, mask)
        on_kernels = backend.uses_kernels(logits)
        loss, cache = (self.forward_gpu if on_kernels else self.forward_cpu)(logits, target, mask)
        self.cache, self.cache_on_kernels = cache, on_kernels
        return loss

    def backward(self, grad_output=1.0):
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward (or after a forward that failed)")
        grad_output = check_grad_output(grad_output, type(self).__name__)
        # The path of the forward, whatever the backend is now: the cache is that path's.
        return self.backward_gpu(grad_output) if self.cache_on_kernels else self.backward_cpu(grad_output)

    @staticmethod
    def mean_of_totals(totals):
        """``totals[0] / totals[1]`` as a Python float (0.0 when nothing was counted): the one copy to
        the host of a kernel-path forward, both numbers at once."""
        loss_sum, count = (float(value) for value in backend.to_numpy(totals))
        return loss_sum / count if count > 0 else 0.0


class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy of logits (N, K, H, W) against integer targets (N, H, W).

    class_weights : optional (K,) non-negative weights (PyTorch's ``weight=``).
    ignore_index : optional target value that contributes nothing (PyTorch's ``ignore_index``).
    forward(logits, target, mask=None) -> float, the weighted mean over the pixels used;
    mask : optional (N, H, W) bool, True where a pixel is used.
    backward(grad_output=1.0) -> dlogits (N, K, H, W), the logits' dtype.
    """

    def __init__(self, class_weights=None, ignore_index=None):
        super().__init__()
        if class_weights is not None:
            class_weights = numpy.asarray(backend.to_numpy(class_weights), dtype=numpy.float64)
            if class_weights.ndim != 1 or numpy.any(class_weights < 0) or not numpy.all(numpy.isfinite(class_weights)):
                raise ValueError("SoftmaxCrossEntropy: class_weights must be a 1-D array of finite, "
                                 f"non-negative numbers, got {class_weights!r}")
        self.class_weights = class_weights
        self.ignore_index = checked_ignore_index(ignore_index, type(self).__name__)
        self._class_weights_on_device = {}  # (dtype, device) -> class_weights there, for the kernels

    def __repr__(self):
        return f"SoftmaxCrossEntropy(class_weights={self.class_weights}, ignore_index={self.ignore_index})"

    def check(self, logits, target, mask):
        mask = _check_class_scores("SoftmaxCrossEntropy", logits, target, mask, self.ignore_index)
        k = logits.shape[1]
        if self.class_weights is not None and len(self.class_weights) != k:
            raise ValueError(f"SoftmaxCrossEntropy: {len(self.class_weights)} class weights given for logits "
                             f"with {k} classes")
        return mask

    def pixel_weights_per_image(self, target, mask=None):
        """What each image adds to the denominator of the weighted mean, ``sum_{i in U} w_i`` over
        its pixels: target (N, H, W) integers, mask (N, H, W) bool or None -> (N,) float64 on the
        host. Shards of a batch use it to weigh their means (``StageOneObjective.shard_terms``).
        A label outside the class weights counts the last one's weight here; ``forward`` refuses it.
        """
        target = numpy.asarray(backend.to_numpy(target))
        used = _used_pixels(target, None if mask is None else numpy.asarray(backend.to_numpy(mask), dtype=bool),
                            self.ignore_index)
        n = len(target)
        if self.class_weights is None:
            pixels = target[0].size if n else 0
            return (numpy.full(n, float(pixels)) if used is None
                    else used.reshape(n, -1).sum(axis=1, dtype=numpy.float64))
        weights = numpy.take(self.class_weights, numpy.clip(target, 0, len(self.class_weights) - 1))
        if used is not None:
            weights = weights * used
        return weights.reshape(n, -1).sum(axis=1)

    def forward_cpu(self, logits, target, mask):
        """The NumPy path. K is small (3 for LFW-PL, 11 for HELEN) and the class axis is not the
        innermost one, so every step loops over the classes and works on contiguous (N, H, W)
        slabs: about twice as fast as reductions along axis 1 and ``take_along_axis``. Where a pixel's
        class decides, the masks ``target == c`` multiply (no ``numpy.where`` or masked copies, which
        crawl on masks that change from pixel to pixel). Without a mask, an ignore index or class
        weights (training on LFW-PL) every pixel has weight 1, and no per-pixel weight is made or
        multiplied. The cache is (probabilities (N, K, H, W), the targets as small integers, the
        weights (N, H, W) or None for all ones, their sum)."""
        k = logits.shape[1]
        used = _used_pixels(target, mask, self.ignore_index)
        safe_target = _class_index_array(target, used, k)
        probabilities, largest, total = _softmax_cpu(logits)
        # picked = z[t] (the other classes add exact zeros)
        picked = numpy.zeros_like(largest)
        is_class = numpy.empty(target.shape, dtype=bool)
        with numpy.errstate(invalid="ignore"):  # 0 * -inf: _exact_terms takes over below
            for c in range(k):
                numpy.equal(safe_target, c, out=is_class)
                picked += logits[:, c] * is_class
        picked -= largest
        nll = numpy.log(total, out=total)
        nll -= picked
        weights = None if used is None else used.astype(logits.dtype)
        if self.class_weights is not None:
            class_weight = self.class_weights.astype(logits.dtype)[safe_target]
            weights = class_weight if weights is None else numpy.multiply(weights, class_weight, out=weights)
        weight_sum = float(nll.size) if weights is None else float(weights.sum())
        terms = nll if weights is None else numpy.multiply(weights, nll, out=nll)
        terms_sum = float(terms.sum())
        if not math.isfinite(terms_sum):
            # rare, so done only now: a NaN or infinite score somewhere (see _exact_terms)
            probabilities, terms = self._exact_terms(logits, safe_target, weights)
            terms_sum = float(terms.sum())
        loss = terms_sum / weight_sum if weight_sum > 0 else 0.0
        return loss, (probabilities, safe_target, weights, weight_sum)

    @staticmethod
    def _exact_terms(logits, safe_target, weights):
        """(probabilities, weighted terms) as the kernel has them where a score is NaN or infinite.
        The fast forward picks z[t] by multiplying with 0/1 masks, so a -inf score of another class
        gives 0 * -inf = NaN; and a pixel of weight 0 with a NaN score adds 0 * NaN = NaN where the
        kernel skips it. Here z[t] is taken by index, and the pixels of weight 0 get exact zeros,
        in their terms and in their probabilities (so that the backward's softmax - onehot is 0)."""
        probabilities, largest, total = _softmax_cpu(logits)
        picked = numpy.take_along_axis(logits, safe_target[:, None].astype(numpy.intp), axis=1)[:, 0]
        terms = numpy.log(total) - (picked - largest)
        if weights is not None:
            unused = weights == 0
            _zero_where_unused(probabilities, unused)
            terms = _zero_where_unused(weights * terms, unused)
        return probabilities, terms

    def backward_cpu(self, grad_output):
        probabilities, safe_target, weights, weight_sum = self.cache
        if weight_sum == 0:
            return numpy.zeros_like(probabilities)
        k = probabilities.shape[1]
        # one scale for every pixel when all weights are 1, else each pixel's own (N, H, W)
        scale = probabilities.dtype.type(grad_output / weight_sum)
        if weights is not None:
            scale = weights * scale
        # softmax - onehot, the target's entry as minus the sum of the others (see the module doc);
        # each entry is one of two values times a 0/1 mask plus the other times the opposite mask,
        # which is exact (the unused value adds a zero)
        is_class = numpy.empty(safe_target.shape, dtype=bool)
        others = numpy.zeros(safe_target.shape, dtype=probabilities.dtype)
        for c in range(k):
            numpy.not_equal(safe_target, c, out=is_class)
            others += probabilities[:, c] * is_class
        target_entry = numpy.multiply(others, scale, out=others)
        numpy.negative(target_entry, out=target_entry)
        grad = numpy.empty_like(probabilities)
        for c in range(k):
            numpy.not_equal(safe_target, c, out=is_class)
            numpy.multiply(probabilities[:, c], scale, out=grad[:, c])
            grad[:, c] *= is_class
            numpy.logical_not(is_class, out=is_class)
            grad[:, c] += target_entry * is_class
        return grad

    def forward_gpu(self, logits, target, mask):
        """logits (N, K, H, W), target (N, H, W) integers, mask (N, H, W) bool or None.

        One thread per pixel writes its weighted loss and weight (``terms`` (2, N*H*W)), and
        ``channel_sum`` adds them up on the device; the cache keeps the logits (the model's own
        output: nothing is copied), the targets as int64, the mask and the two totals.
        """
        xp = backend.get_array_module(logits)
        target = xp.ascontiguousarray(target, dtype=numpy.int64)
        logits, mask = contiguous(logits), None if mask is None else contiguous(mask)
        n, k, height, width = logits.shape
        pixels = n * height * width
        class_weights = self.class_weights_like(logits)
        ignore_index = self.kernel_ignore_index()
        terms = xp.empty((2, pixels), dtype=logits.dtype)
        i32 = numpy.int32
        launch("softmax_cross_entropy", "softmax_cross_entropy_forward", logits.dtype, pixels,
               (logits, target, mask, class_weights, terms, i32(n), i32(k), i32(height * width), ignore_index))
        totals = channel_sum(terms.reshape(1, 2, pixels))
        return self.mean_of_totals(totals), (logits, target, mask, class_weights, totals)

    def backward_gpu(self, grad_output):
        """dlogits (N, K, H, W) = grad_output * w * (softmax - onehot) / sum of w, one launch."""
        logits, target, mask, class_weights, totals = self.cache
        n, k, height, width = logits.shape
        dlogits = backend.get_array_module(logits).empty_like(logits)
        i32 = numpy.int32
        launch("softmax_cross_entropy", "softmax_cross_entropy_backward", logits.dtype, n * height * width,
               (logits, target, mask, class_weights, totals, logits.dtype.type(grad_output), dlogits,
                i32(n), i32(k), i32(height * width), self.kernel_ignore_index()))
        return dlogits

    def class_weights_like(self, logits):
        """The class weights (K,) as an array of the logits' dtype on their device, or None.

        Copied there once per dtype and device, then reused: a copy at every call would be a
        synchronous transfer.
        """
        if self.class_weights is None:
            return None
        device = logits.device.id if backend.is_cupy_array(logits) else None
        key = (logits.dtype, device)
        if key not in self._class_weights_on_device:
            weights = self.class_weights.astype(logits.dtype)
            if device is None:
                self._class_weights_on_device[key] = weights
            else:
                import cupy
                with cupy.cuda.Device(device):  # the logits' device, which need not be the current one
                    self._class_weights_on_device[key] = cupy.asarray(weights)
        return self._class_weights_on_device[key]

    def kernel_ignore_index(self):
        return _kernel_ignore_index("SoftmaxCrossEntropy", self.ignore_index)


class SigmoidBinaryCrossEntropy(Loss):
    """Sigmoid binary cross-entropy of logits (N, 1, H, W) against targets (N, 1, H, W) in {0, 1}.

    forward(logits, target, mask=None) -> float, the mean over the pixels used;
    mask : optional bool array of the logits' shape, True where a pixel is used.
    backward(grad_output=1.0) -> dlogits of the logits' shape and dtype.
    """

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
        _check_same_device(target, logits, owner, "target")
        _check_same_device(mask, logits, owner, "mask")
        if not bool(((target == 0) | (target == 1)).all()):
            raise ValueError(f"{owner}: target must hold only 0 and 1")
        return _check_mask(mask, owner, logits.shape)

    def forward_cpu(self, logits, target, mask):
        target = target.astype(logits.dtype)
        used = None if mask is None else mask.astype(logits.dtype)  # None: every pixel counts
        count = float(logits.size if used is None else used.sum())
        per_pixel = numpy.maximum(logits, 0) - logits * target + numpy.log1p(numpy.exp(-numpy.abs(logits)))
        total = float((per_pixel if used is None else per_pixel * used).sum())
        # a NaN or infinite score outside the mask adds 0 * NaN: zeroed only then, since it is rare
        spoiled = mask is not None and not math.isfinite(total)
        if spoiled:
            total = float((_zero_where_unused(per_pixel, ~mask) * used).sum())
        loss = total / count if count > 0 else 0.0
        return loss, (logits, target, used, count, spoiled)

    def backward_cpu(self, grad_output):
        logits, target, used, count, spoiled = self.cache
        if count == 0:
            return numpy.zeros_like(logits)
        # sigmoid(z) - t without cancellation (see the module doc): small = sigmoid(-|z|) = e / (1 + e)
        decay = numpy.exp(-numpy.abs(logits))
        small = decay / (1 + decay)
        difference = numpy.where(logits >= 0, (1 - target) - small, small - target)
        if spoiled:  # a NaN score outside the mask gives 0, not NaN
            _zero_where_unused(difference, used == 0)
        if used is not None:
            difference *= used
        return (difference * (grad_output / count)).astype(logits.dtype, copy=False)

    def forward_gpu(self, logits, target, mask):
        """logits and target (N, 1, H, W), mask (N, 1, H, W) bool or None: one thread per pixel
        writes its loss and weight, ``channel_sum`` adds them up. The cache keeps the logits, the
        target in the logits' dtype, the mask and the two totals."""
        xp = backend.get_array_module(logits)
        target = xp.ascontiguousarray(target, dtype=logits.dtype)
        logits, mask = contiguous(logits), None if mask is None else contiguous(mask)
        pixels = logits.size
        terms = xp.empty((2, pixels), dtype=logits.dtype)
        launch("sigmoid_bce", "sigmoid_bce_forward", logits.dtype, pixels,
               (logits, target, mask, terms, numpy.int32(pixels)))
        totals = channel_sum(terms.reshape(1, 2, pixels))
        return self.mean_of_totals(totals), (logits, target, mask, totals)

    def backward_gpu(self, grad_output):
        """dlogits (N, 1, H, W) = grad_output * (sigmoid(z) - t) / count where counted, else 0; one launch."""
        logits, target, mask, totals = self.cache
        dlogits = backend.get_array_module(logits).empty_like(logits)
        launch("sigmoid_bce", "sigmoid_bce_backward", logits.dtype, logits.size,
               (logits, target, mask, totals, logits.dtype.type(grad_output), dlogits,
                element_count(logits.size)))
        return dlogits


class SoftDice(Loss):
    """Soft Dice loss of logits (N, K, H, W) against integer targets (N, H, W): one minus the mean
    over the classes of a differentiable F-measure (Milletari et al. 2016, V-Net, in its
    multi-class form), over all the pixels of the batch that are used::

        I_k = sum_i u_i p_ik y_ik,   S_k = sum_i u_i (p_ik + y_ik),   D_k = (2 I_k + s) / (S_k + s)
        L = 1 - (1/K) sum_k D_k
        dL/dp_ik = -u_i (2 y_ik - D_k) / (K (S_k + s))
        dL/dz_ik = p_ik (g_ik - sum_j p_ij g_ij) = p_ik sum_{j != k} p_ij (g_ik - g_ij),   g = dL/dp

    with ``p = softmax(z)``, ``y`` the one-hot targets and ``u_i = 1`` for a pixel used (inside the
    mask, target not the ignore index). ``D_k`` is the F-measure of class k with the soft
    prediction in place of the hard one, so every class weighs the same however few pixels it
    has: hair counts as much as the background, where the cross-entropy weighs every pixel alike.
    ``smooth`` (s > 0) makes ``D_k = 1`` for a class absent from both prediction and truth.
    Unlike the cross-entropy it is not a mean over pixels: it is computed over the whole batch at
    once (data parallelism gathers the batch's logits first, so it sees them all).

    The last form of the gradient has no cancellation when a pixel is classified confidently
    (the first would subtract two numbers within a float32 step of each other). Derivation:
    docs/derivations/losses.md.

    smooth : float > 0 (default 1); ignore_index : optional target value that contributes nothing.
    forward(logits, target, mask=None) -> float; mask : optional (N, H, W) bool, True where used.
    backward(grad_output=1.0) -> dlogits (N, K, H, W), the logits' dtype.
    """

    def __init__(self, smooth=1.0, ignore_index=None):
        super().__init__()
        smooth = check_number(smooth, type(self).__name__, "smooth")
        if not (numpy.isfinite(smooth) and smooth > 0):
            raise ValueError(f"SoftDice: smooth must be a positive number, got {smooth!r}")
        self.smooth = smooth
        self.ignore_index = checked_ignore_index(ignore_index, type(self).__name__)

    def __repr__(self):
        return f"SoftDice(smooth={self.smooth}, ignore_index={self.ignore_index})"

    def check(self, logits, target, mask):
        return _check_class_scores("SoftDice", logits, target, mask, self.ignore_index)

    def dice_from_totals(self, totals):
        """``(loss, D)`` from totals (2K,) = [I_0 .. I_{K-1}, S_0 .. S_{K-1}] on the host: the loss
        as a Python float and ``D`` (K,) float64."""
        totals = numpy.asarray(backend.to_numpy(totals), dtype=numpy.float64)
        k = totals.size // 2
        dice = (2 * totals[:k] + self.smooth) / (totals[k:] + self.smooth)
        return 1.0 - float(dice.mean()), dice

    def forward_cpu(self, logits, target, mask):
        """The NumPy path, class slab by class slab (see SoftmaxCrossEntropy.forward_cpu). The cache
        is (probabilities (N, K, H, W), the targets as small integers, the used pixels (N, H, W)
        bool or None for all, the totals (2K,))."""
        k = logits.shape[1]
        used = _used_pixels(target, mask, self.ignore_index)
        safe_target = _class_index_array(target, used, k)
        probabilities, _, _ = _softmax_cpu(logits)
        totals = self._totals(probabilities, safe_target, used)
        if used is not None and not numpy.isfinite(totals).all():
            # a NaN or infinite score at a pixel not used adds 0 * NaN; zeroed only then (it is rare),
            # and in the cached probabilities too, for a gradient of exactly 0 there
            totals = self._totals(_zero_where_unused(probabilities, ~used), safe_target, used)
        loss, _ = self.dice_from_totals(totals)
        return loss, (probabilities, safe_target, used, totals)

    @staticmethod
    def _totals(probabilities, safe_target, used):
        """totals (2K,) = [I_0 .. I_{K-1}, S_0 .. S_{K-1}] on the NumPy path."""
        k = probabilities.shape[1]
        totals = numpy.zeros(2 * k)
        is_class = numpy.empty(safe_target.shape, dtype=bool)
        for c in range(k):
            numpy.equal(safe_target, c, out=is_class)
            if used is not None:
                is_class &= used
            p = probabilities[:, c]
            totals[c] = float((p * is_class).sum())
            totals[k + c] = float((p if used is None else p * used).sum()) + float(is_class.sum())
        return totals

    def backward_cpu(self, grad_output):
        probabilities, safe_target, used, totals = self.cache
        k = probabilities.shape[1]
        _, dice = self.dice_from_totals(totals)
        sizes = totals[k:] + self.smooth
        dtype = probabilities.dtype
        # g_c = dL/dp_c = -grad_output (2 y_c - D_c) / (K (S_c + s)): one of two values per class,
        # picked by the target (exactly: the unused one adds a zero), zero where a pixel is not used
        slopes = numpy.empty_like(probabilities)
        is_class = numpy.empty(safe_target.shape, dtype=bool)
        for c in range(k):
            on_class = dtype.type(-grad_output * (2 - dice[c]) / (k * sizes[c]))
            off_class = dtype.type(grad_output * dice[c] / (k * sizes[c]))
            numpy.equal(safe_target, c, out=is_class)
            slopes[:, c] = off_class
            slopes[:, c] += (on_class - off_class) * is_class
            if used is not None:
                slopes[:, c] *= used
        grad = numpy.zeros_like(probabilities)
        for c in range(k):
            for j in range(k):
                if j != c:
                    grad[:, c] += probabilities[:, j] * (slopes[:, c] - slopes[:, j])
            grad[:, c] *= probabilities[:, c]
        return grad

    def forward_gpu(self, logits, target, mask):
        """logits (N, K, H, W), target (N, H, W) integers, mask (N, H, W) bool or None.

        One thread per pixel writes its 2K terms (``terms`` (2K, N*H*W)), ``channel_sum`` adds
        them up on the device and one copy brings the 2K totals to the host for the loss; the cache
        keeps the logits (nothing is copied), the targets as int64, the mask and the totals.
        """
        xp = backend.get_array_module(logits)
        target = xp.ascontiguousarray(target, dtype=numpy.int64)
        logits, mask = contiguous(logits), None if mask is None else contiguous(mask)
        n, k, height, width = logits.shape
        pixels = n * height * width
        terms = xp.empty((2 * k, pixels), dtype=logits.dtype)
        i32 = numpy.int32
        launch("soft_dice", "soft_dice_forward", logits.dtype, pixels,
               (logits, target, mask, terms, i32(n), i32(k), i32(height * width), self.kernel_ignore_index()))
        totals = channel_sum(terms.reshape(1, 2 * k, pixels))
        loss, _ = self.dice_from_totals(totals)
        return loss, (logits, target, mask, totals)

    def backward_gpu(self, grad_output):
        """dlogits (N, K, H, W) from the totals on the device, one launch."""
        logits, target, mask, totals = self.cache
        n, k, height, width = logits.shape
        dlogits = backend.get_array_module(logits).empty_like(logits)
        scalar = logits.dtype.type
        i32 = numpy.int32
        launch("soft_dice", "soft_dice_backward", logits.dtype, n * height * width,
               (logits, target, mask, totals, scalar(self.smooth), scalar(grad_output), dlogits,
                i32(n), i32(k), i32(height * width), self.kernel_ignore_index()))
        return dlogits

    def kernel_ignore_index(self):
        return _kernel_ignore_index("SoftDice", self.ignore_index)


#: The neighbour offsets (dy, dx) of :class:`ColourAffinity`: each pair of 8-connected pixels once.
AFFINITY_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _neighbour_slices(dy, dx, height, width):
    """Index slices ``(a, b)`` of the (H, W) grid such that pixel ``a`` has its neighbour at
    offset (dy, dx) in ``b``: the pixels whose neighbour lies inside the image (dy >= 0)."""
    rows_a, rows_b = slice(0, height - dy), slice(dy, height)
    if dx >= 0:
        cols_a, cols_b = slice(0, width - dx), slice(dx, width)
    else:
        cols_a, cols_b = slice(-dx, width), slice(0, width + dx)
    return (rows_a, cols_a), (rows_b, cols_b)


class ColourAffinity:
    """A pairwise loss that asks neighbouring pixels of one colour to agree: the pairwise term of a
    CRF, on the softmax of the logits and in a 3 x 3 neighbourhood (Tang et al. 2018, "On
    regularized losses for weakly-supervised CNN segmentation"). An optional term of the training
    objective that the paper does not have (docs/training.md, run BV)::

        L = 1/(N H W) sum_n sum_{(i, j) in E} w_nij (1 - p_ni . p_nj)
        w_nij = exp(-|d_ij|^2 / (2 s_xy^2)) exp(-|I_ni - I_nj|^2 / (2 s_rgb^2))
        dL/dp_ni = -1/(N H W) sum_{j ~ i} w_nij p_nj
        dL/dz_ni = p_ni * (g_ni - p_ni . g_ni),   g = dL/dp

    with ``p = softmax(z)`` over the K classes, ``E`` every pair of 8-connected pixels (each once:
    the offsets :data:`AFFINITY_OFFSETS`), ``d_ij`` the pair's offset (1 or sqrt 2 pixels) and
    ``I`` the network's input image. Two neighbours of nearly one colour weigh about
    ``exp(-|d|^2 / (2 s_xy^2))``; across a colour edge of ``3 s_rgb`` the weight falls below 1%.
    It is what the dense CRF does at test time (:class:`minirnng.models.DenseCRF`, whose colour
    width is of the same size), moved into training so that the network learns to put its label
    boundaries on the image's colour edges. ``1 - p_i . p_j`` is also smallest for confident
    pixels, so the term rewards confidence where the colour is uniform.

    The gradient through the softmax is written ``p (g - p . g)``: ``g`` here is a weighted sum
    of probabilities, with no one-hot target subtracted, so its terms are all of one sign and the
    subtraction loses only what is below the gradient's own rounding.

    s_xy : the spatial width in pixels (default 1.5); s_rgb : the colour width in the image's
    units (default 0.06, as the dense CRF's, for inputs scaled to [-0.5, 0.5]).
    forward(logits (N, K, H, W), images (N, C, H, W)) -> float; backward(grad_output=1.0) ->
    dlogits (N, K, H, W), the logits' dtype.
    """

    def __init__(self, s_xy=1.5, s_rgb=0.06):
        for name, value in (("s_xy", s_xy), ("s_rgb", s_rgb)):
            # below 1e-6, 1 / (2 s^2) leaves float32's range on the kernels: inf * 0 = NaN weights
            if not (numpy.isfinite(check_number(value, "ColourAffinity", name)) and float(value) >= 1e-6):
                raise ValueError(f"ColourAffinity: {name} must be a number of at least 1e-6, got {value!r}")
        self.s_xy, self.s_rgb = float(s_xy), float(s_rgb)
        self.cache = None

    def __repr__(self):
        return f"ColourAffinity(s_xy={self.s_xy}, s_rgb={self.s_rgb})"

    def spatial_weights(self):
        """exp(-|d|^2 / (2 s_xy^2)) for each offset of :data:`AFFINITY_OFFSETS`, Python floats."""
        return [float(numpy.exp(-(dy * dy + dx * dx) / (2 * self.s_xy ** 2))) for dy, dx in AFFINITY_OFFSETS]

    def check(self, logits, images):
        check_array(logits, "ColourAffinity", "logits", ndim=4)
        check_array(images, "ColourAffinity", "images", ndim=4)
        if images.shape[0] != logits.shape[0] or images.shape[2:] != logits.shape[2:]:
            raise ValueError(f"ColourAffinity: images {tuple(images.shape)} and logits {tuple(logits.shape)} "
                             "must agree in N, H and W")
        _check_same_device(images, logits, "ColourAffinity", "images")

    def forward(self, logits, images):
        self.cache = None  # as in Loss.forward: a failed pass leaves nothing to differentiate
        self.check(logits, images)
        on_kernels = backend.uses_kernels(logits)
        loss, cache = (self.forward_gpu if on_kernels else self.forward_cpu)(logits, images)
        self.cache, self.cache_on_kernels = cache, on_kernels
        return loss

    def backward(self, grad_output=1.0):
        if self.cache is None:
            raise RuntimeError("ColourAffinity.backward called before forward (or after a forward that failed)")
        grad_output = check_grad_output(grad_output, "ColourAffinity")
        return self.backward_gpu(grad_output) if self.cache_on_kernels else self.backward_cpu(grad_output)

    def forward_cpu(self, logits, images):
        """The NumPy path, offset by offset. The pair weights are formed in float64 for the loss's
        sum and kept in the logits' dtype for the backward: the cache is (probabilities (N, K, H, W),
        the weights of each offset (N, H - dy, W - |dx|))."""
        n, _, height, width = logits.shape
        probabilities, _, _ = _softmax_cpu(logits)
        images = images.astype(logits.dtype, copy=False)
        total, weights = 0.0, []
        for (dy, dx), spatial in zip(AFFINITY_OFFSETS, self.spatial_weights()):
            a, b = _neighbour_slices(dy, dx, height, width)
            colour = ((images[:, :, a[0], a[1]] - images[:, :, b[0], b[1]]) ** 2).sum(axis=1)
            weight = numpy.float64(spatial) * numpy.exp(-colour / (2 * self.s_rgb ** 2))
            agreement = (probabilities[:, :, a[0], a[1]] * probabilities[:, :, b[0], b[1]]).sum(axis=1)
            total += float((weight * (1 - agreement)).sum(dtype=numpy.float64))
            weights.append(weight.astype(logits.dtype))
        return total / (n * height * width), (probabilities, weights)

    def backward_cpu(self, grad_output):
        probabilities, weights = self.cache
        n, _, height, width = probabilities.shape
        slopes = numpy.zeros_like(probabilities)  # g = dL/dp
        scale = probabilities.dtype.type(grad_output / (n * height * width))
        for (dy, dx), weight in zip(AFFINITY_OFFSETS, weights):
            a, b = _neighbour_slices(dy, dx, height, width)
            scaled = (scale * weight)[:, None]
            slopes[:, :, a[0], a[1]] -= scaled * probabilities[:, :, b[0], b[1]]
            slopes[:, :, b[0], b[1]] -= scaled * probabilities[:, :, a[0], a[1]]
        return probabilities * (slopes - (probabilities * slopes).sum(axis=1, keepdims=True))

    def kernel_scalars(self, dtype):
        """The kernels' scalars: the spatial weights of a straight and a diagonal step and
        1 / (2 s_rgb^2), in the logits' dtype."""
        straight, _, diagonal, _ = self.spatial_weights()
        return dtype.type(straight), dtype.type(diagonal), dtype.type(1 / (2 * self.s_rgb ** 2))

    def forward_gpu(self, logits, images):
        """One thread per pixel writes the terms of its pairs with the neighbours after it
        (``terms`` (N*H*W,)), ``channel_sum`` adds them up on the device, one copy brings the sum
        to the host. The cache keeps the logits and the images (nothing is copied)."""
        xp = backend.get_array_module(logits)
        logits, images = contiguous(logits), contiguous(images.astype(logits.dtype, copy=False))
        n, k, height, width = logits.shape
        pixels = n * height * width
        terms = xp.empty((1, 1, pixels), dtype=logits.dtype)
        i32 = numpy.int32
        launch("colour_affinity", "colour_affinity_forward", logits.dtype, pixels,
               (logits, images, terms, *self.kernel_scalars(logits.dtype),
                i32(n), i32(k), i32(images.shape[1]), i32(height), i32(width)))
        total = float(backend.to_numpy(channel_sum(terms))[0])
        return total / pixels, (logits, images)

    def backward_gpu(self, grad_output):
        """dlogits (N, K, H, W), one launch: each pixel gathers its eight neighbours."""
        logits, images = self.cache
        n, k, height, width = logits.shape
        dlogits = backend.get_array_module(logits).empty_like(logits)
        i32 = numpy.int32
        launch("colour_affinity", "colour_affinity_backward", logits.dtype, n * height * width,
               (logits, images, dlogits, *self.kernel_scalars(logits.dtype),
                logits.dtype.type(grad_output / (n * height * width)),
                i32(n), i32(k), i32(images.shape[1]), i32(height), i32(width)))
        return dlogits


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


def balanced_sample_mask(keep, ratio=5, rng=None):
    """Every pixel where ``keep`` is True and, per image, ``ratio`` times as many of the others at random.

    keep : bool (N, ...) (NumPy or CuPy). Returns a bool mask of the same shape and device: per
    image, all ``keep`` pixels plus ``min(ratio * n_keep, n_other)`` other pixels drawn uniformly
    without replacement. An image without a ``keep`` pixel contributes nothing. ``rng``: seed or
    Generator. The paper balances two losses this way: the gate's boundary loss (keep the boundary
    pixels, ratio 5) and, on Multi-Face images, the label losses (keep face and hair, ratio 5).
    """
    if not check_number(ratio, "balanced_sample_mask", "ratio") >= 0:  # NaN too
        raise ValueError(f"balanced_sample_mask: ratio must be a number >= 0, got {ratio}")
    rng = numpy.random.default_rng(rng)
    host = numpy.asarray(backend.to_numpy(keep), dtype=bool)
    flat = host.reshape(host.shape[0], -1)
    mask = flat.copy()
    for image, kept in enumerate(flat):
        others = numpy.flatnonzero(~kept)
        wanted = min(int(ratio * kept.sum()), others.size)
        if wanted:
            mask[image, rng.choice(others, size=wanted, replace=False)] = True
    return backend.get_array_module(keep).asarray(mask.reshape(host.shape))  # back on keep's device


def boundary_sample_mask(target, ratio=5, rng=None):
    """The paper's 1:5 sampling of the boundary loss: every boundary pixel, and ``ratio`` times as many others.

    target : (N, 1, H, W) from :func:`boundary_target` (0 = boundary). Returns a bool mask of the
    same shape (see :func:`balanced_sample_mask`); an image without a boundary contributes no pixel.
    """
    if target.ndim != 4 or target.shape[1] != 1:
        raise ValueError(f"boundary_sample_mask: target must have shape (N, 1, H, W), got {tuple(target.shape)}")
    return balanced_sample_mask(target == 0, ratio, rng)
