"""Batch normalisation of each channel (Ioffe and Szegedy 2015), a training device for RNN-G.

For x (N, C, H, W), each channel c is normalised over the batch and the pixels, M = N H W values:

    mean_c = 1/M sum_{n,h,w} x[n, c, h, w]         var_c = 1/M sum_{n,h,w} (x[n, c, h, w] - mean_c)^2
    xhat   = (x - mean_c) / sqrt(var_c + eps)       y = weight_c * xhat + bias_c

and, from the sums of the upstream gradient dy over the same M values,

    dweight_c = sum dy * xhat        dbias_c = sum dy
    dx = weight_c / sqrt(var_c + eps) * (dy - mean(dy) - xhat * mean(dy * xhat))

(docs/derivations/batch-norm.md derives it: mean_c and var_c depend on every x of the channel, which
gives the two mean terms.) ``forward`` is the training pass: it uses the batch's statistics and,
when ``tracks_statistics``, moves the running ones towards them,

    running_mean <- running_mean + momentum * (mean - running_mean)     (likewise running_var)

``infer`` is the inference pass: the running statistics in place of the batch's, so that it is the
per-channel affine map ``y = scale_c x + shift_c`` with ``scale = weight / sqrt(running_var + eps)``
and ``shift = bias - running_mean * scale``. That map can be folded into the convolution before it
(:func:`fold_into_convolution`), which is how RNN-G trains with it and still ships the spec's
network. ``running_var`` averages the biased variance (PyTorch averages the unbiased one).

The running statistics live in ``params`` beside ``weight`` and ``bias`` (as in PyTorch's
``state_dict``), so that checkpoints and the replicas of data parallelism carry them, but only
``weight`` and ``bias`` have gradients: an optimizer trains the parameters in ``grads``.

On the kernel path (``kernels/batch_norm.cu``) the per-channel sums are the two-pass reductions of
``reduce.cu``; the normalisation and the input gradient are one elementwise launch each.
"""

import numpy

from .. import backend
from ..cuda.launch import channel_sum, contiguous, element_count, launch
from .base import Layer, check_array, check_number, check_positive_int

#: the statistics that ``forward`` measures and ``infer`` uses, by the names in ``params``
STATISTICS = ("running_mean", "running_var")


#: :func:`channel_totals` sums blocks of this many values in the array's own precision.
SUM_BLOCK = 256


def channel_totals(rows, other=None):
    """float64 (C,): ``sum over n, p of rows[n, c, p]`` (times ``other[n, c, p]`` if given), for
    rows (N, C, P): blocks of :data:`SUM_BLOCK` values of each row summed in the rows' own
    precision (a sum, or a dot product), then the blocks' sums in float64. In float32 that stays
    within a few roundings of the exact sums whatever the size of the rows (relative errors of
    4e-9 to 1e-8 on contiguous rows for RNN-G's three normalised layers, and at 512 x 512; up to
    4e-7 on strided rows, which NumPy sums without its pairwise steps; a dot product along a whole
    row of 262,144 pixels was off by 3e-6), and takes a third of the time of summing float64
    copies of the values."""
    n, c, p = rows.shape
    whole = p - p % SUM_BLOCK
    total = numpy.zeros(c)
    for part in (slice(0, whole), slice(whole, p)):
        if part.stop == part.start:
            continue
        blocks_shape = (n, c, -1, min(SUM_BLOCK, part.stop - part.start))
        these = rows[:, :, part].reshape(blocks_shape)
        if other is None:
            sums = these.sum(axis=3)
        else:
            sums = numpy.einsum("ncki,ncki->nck", these, other[:, :, part].reshape(blocks_shape))
        total += sums.sum(axis=(0, 2), dtype=numpy.float64)
    return total


class BatchNorm2d(Layer):
    """Batch normalisation over (N, H, W) for each of ``channels`` channels (module docstring).

    eps : added to the variance before the square root; momentum : the weight of the newest batch
    in the running statistics. Initially weight = 1, bias = 0, running_mean = 0, running_var = 1.
    """

    input_names = ("x",)

    def __init__(self, channels, eps=1e-5, momentum=0.05, dtype=numpy.float32):
        super().__init__(dtype)
        self.channels = check_positive_int(channels, type(self).__name__, "channels")
        self.eps, self.momentum = (check_number(value, type(self).__name__, name)
                                   for name, value in (("eps", eps), ("momentum", momentum)))
        if not 0 < self.eps < numpy.inf:
            raise ValueError(f"BatchNorm2d: eps must be positive and finite, got {eps!r}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"BatchNorm2d: momentum must lie in [0, 1], got {momentum!r}")
        #: whether ``forward`` updates the running statistics (data parallelism's replicas do not:
        #: the model's own copy averages the statistics of its shard, and the replicas receive them)
        self.tracks_statistics = True
        self.add_param("weight", numpy.ones(self.channels))
        self.add_param("bias", numpy.zeros(self.channels))
        for name, start in zip(STATISTICS, (0.0, 1.0)):
            self.params[name] = backend.to_device(numpy.full(self.channels, start), dtype=self.dtype)

    def __repr__(self):
        return f"BatchNorm2d({self.channels}, eps={self.eps:g}, momentum={self.momentum:g})"

    def check_input(self, x):
        check_array(x, type(self).__name__, "input x", ndim=4, dtype=self.dtype, channels=self.channels,
                    like=self.reference_array())

    def forward(self, x):
        """Training pass: x (N, C, H, W) -> y (N, C, H, W), normalised by the batch's statistics."""
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_input(x)
        if x.size <= self.channels:
            # one value per channel is its own mean: xhat = 0, y = bias whatever x, and dx = 0
            raise ValueError(f"BatchNorm2d: the training pass needs more than one value per channel to "
                             f"normalise by, got an input of shape {tuple(x.shape)} (N * H * W = "
                             f"{x.size // self.channels}: one image at this size, a batch of one or a worker's "
                             f"share of one); use larger batches or images, fewer workers, or infer")
        return self.run_forward(x)

    def backward(self, grad_output):
        """grad_output (N, C, H, W) -> dx (N, C, H, W); adds to grads["weight"], grads["bias"]."""
        return self.run_backward(grad_output)

    def inference_scale_shift(self):
        """(scale, shift), each (C,): ``infer(x) = scale_c * x + shift_c``."""
        p = self.params
        scale = p["weight"] / backend.get_array_module(p["weight"]).sqrt(p["running_var"] + self.eps)
        return scale, p["bias"] - p["running_mean"] * scale

    def infer(self, x):
        """Inference pass: x (N, C, H, W) -> y, normalised by the running statistics; nothing is kept."""
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_input(x)
        if backend.uses_kernels(x):
            y, _ = self._normalize_gpu(contiguous(x), self.params["running_mean"], self.params["running_var"],
                                       keep_xhat=False)
            return y
        # centred first, as the kernel and the training pass do: scale * x + shift would subtract
        # two large numbers where the inputs are far from 0 and close to their mean
        shape = (1, -1, 1, 1)
        scale = self.inference_scale_shift()[0].reshape(shape)
        centred = x - self.params["running_mean"].reshape(shape)
        return (centred * scale + self.params["bias"].reshape(shape)).astype(x.dtype, copy=False)

    # -- NumPy path ---------------------------------------------------------------------------
    def forward_cpu(self, x):
        """The statistics by :func:`channel_totals` (blocks of each image's row of a channel summed in
        the array's own precision, the blocks' sums in float64); the normalisation in place. The
        cache is (xhat, 1 / sqrt(var + eps))."""
        n, c = x.shape[:2]
        shape, count = (1, -1, 1, 1), x.size // c
        mean = channel_totals(x.reshape(n, c, -1)) / count
        centred = x - mean.reshape(shape).astype(x.dtype)
        variance = channel_totals(centred.reshape(n, c, -1), centred.reshape(n, c, -1)) / count
        self.update_statistics(mean, variance)
        inverse_std = (1.0 / numpy.sqrt(variance + self.eps)).astype(x.dtype)
        xhat = numpy.multiply(centred, inverse_std.reshape(shape), out=centred)
        y = numpy.multiply(xhat, self.params["weight"].reshape(shape))
        y += self.params["bias"].reshape(shape)
        return y, (xhat, inverse_std)

    def update_statistics(self, mean, variance):
        """Move the running statistics towards this batch's (NumPy path; the kernels do it themselves)."""
        if not self.tracks_statistics:
            return
        for name, batch in zip(STATISTICS, (mean, variance)):
            running = self.params[name]
            running += self.momentum * (batch.astype(self.dtype) - running)

    def backward_cpu(self, grad_output):
        """``dx = weight * inverse_std * (dy - mean(dy) - xhat * mean(dy * xhat))`` with the two
        means from the same channel sums as the weight's and the bias's gradients; one array made."""
        xhat, inverse_std = self.cache
        n, c = xhat.shape[:2]
        shape, count = (1, -1, 1, 1), xhat.size // c
        rows = grad_output.reshape(n, c, -1)
        sum_dy = channel_totals(rows)
        sum_dy_xhat = channel_totals(rows, xhat.reshape(n, c, -1))
        dtype = xhat.dtype
        self.accumulate_grad("weight", sum_dy_xhat.astype(dtype))
        self.accumulate_grad("bias", sum_dy.astype(dtype))
        dx = numpy.multiply(xhat, (-sum_dy_xhat / count).astype(dtype).reshape(shape))
        dx += grad_output
        dx -= (sum_dy / count).astype(dtype).reshape(shape)
        dx *= (self.params["weight"] * inverse_std).reshape(shape)
        return dx

    # -- kernel path --------------------------------------------------------------------------
    def forward_gpu(self, x):
        """Four launches for the statistics (sums, centred squares, then mean and variance, which
        also moves the running statistics), one for the normalisation. The cache is (xhat, var)."""
        xp = backend.get_array_module(x)
        n, c, h, w = x.shape
        i32, count = numpy.int32, n * h * w
        sums = channel_sum(x.reshape(n, c, h * w))
        chunks = min(1024, count)
        partial = xp.empty((c, chunks), dtype=x.dtype)
        launch("batch_norm", "batch_norm_centred_squares", x.dtype, c * chunks,
               (x, sums, partial, i32(n), i32(c), i32(h * w), i32(chunks)))
        squares = xp.empty(c, dtype=x.dtype)
        launch("reduce", "channel_sum_finish", x.dtype, c, (partial, squares, i32(c), i32(chunks)))
        mean, variance = xp.empty(c, dtype=x.dtype), xp.empty(c, dtype=x.dtype)
        launch("batch_norm", "batch_norm_statistics", x.dtype, c,
               (sums, squares, mean, variance, self.params["running_mean"], self.params["running_var"],
                i32(c), i32(count), self._scalar(self.momentum), i32(self.tracks_statistics)))
        return self._normalize_gpu(x, mean, variance, keep_xhat=True)

    def _normalize_gpu(self, x, mean, variance, keep_xhat):
        """y (and xhat, for backward) from x and per-channel statistics; returns (y, (xhat, variance))."""
        xp = backend.get_array_module(x)
        n, c, h, w = x.shape
        y = xp.empty_like(x)
        xhat = xp.empty_like(x) if keep_xhat else None
        launch("batch_norm", "batch_norm_forward", x.dtype, x.size,
               (x, mean, variance, self.params["weight"], self.params["bias"], xhat, y,
                numpy.int32(c), numpy.int32(h * w), element_count(x.size), self._scalar(self.eps)))
        return y, (xhat, variance)

    def backward_gpu(self, grad_output):
        """Two launches for the sums of dy and dy * xhat (2C of them), one for dx."""
        xhat, variance = self.cache
        xp = backend.get_array_module(grad_output)
        n, c, h, w = grad_output.shape
        i32, count = numpy.int32, n * h * w
        chunks = min(1024, count)
        partial = xp.empty((2 * c, chunks), dtype=grad_output.dtype)
        launch("batch_norm", "batch_norm_gradient_sums", grad_output.dtype, c * chunks,
               (grad_output, xhat, partial, i32(n), i32(c), i32(h * w), i32(chunks)))
        sums = xp.empty(2 * c, dtype=grad_output.dtype)  # [sum dy (C), sum dy * xhat (C)]
        launch("reduce", "channel_sum_finish", grad_output.dtype, 2 * c, (partial, sums, i32(2 * c), i32(chunks)))
        self.accumulate_grad("weight", sums[c:])
        self.accumulate_grad("bias", sums[:c])
        dx = xp.empty_like(grad_output)
        launch("batch_norm", "batch_norm_backward", grad_output.dtype, grad_output.size,
               (grad_output, xhat, sums, variance, self.params["weight"], dx,
                i32(c), i32(h * w), i32(count), i32(grad_output.size), self._scalar(self.eps)))
        return dx

    def _scalar(self, value):
        """A float scalar argument in the kernel's precision (the kernels take scalar_t)."""
        return self.dtype.type(value)


def fold_into_convolution(weight, bias, batch_norm, transposed=False):
    """The (weight, bias) of the convolution that computes ``batch_norm.infer(conv(x))``.

    Each output channel o of the convolution is scaled by ``s_o = weight_o / sqrt(running_var_o +
    eps)`` (the normalisation's weight and statistics): ``W'[o] = s_o W[o]`` and
    ``b'_o = (b_o - running_mean_o) s_o + bias_o``.
    weight : (O, C, k, k) for a convolution, (C, O, k, k) for a transposed one (``transposed``);
    bias : (O,), or None for a convolution without one (a zero bias). Returns new arrays; the
    inputs are not changed.
    """
    outputs = weight.shape[1 if transposed else 0] if getattr(weight, "ndim", 0) == 4 else None
    if outputs != batch_norm.channels:
        raise ValueError(f"fold_into_convolution: a weight of shape {tuple(getattr(weight, 'shape', ()))} has "
                         f"{outputs} output channels on axis {1 if transposed else 0}; the BatchNorm2d normalises "
                         f"{batch_norm.channels}")
    if bias is None:
        bias = backend.get_array_module(weight).zeros(outputs, dtype=weight.dtype)
    scale, _ = batch_norm.inference_scale_shift()
    per_output = (1, -1, 1, 1) if transposed else (-1, 1, 1, 1)
    return (weight * scale.reshape(per_output),
            (bias - batch_norm.params["running_mean"]) * scale + batch_norm.params["bias"])
