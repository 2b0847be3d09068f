"""Max pooling, ``torch.nn.MaxPool2d`` semantics (no padding, floor mode).

    y[n, c, oy, ox] = max_{0 <= i, j < k} x[n, c, oy*s + i, ox*s + j]
    x (N, C, H, W) -> y (N, C, Ho, Wo),    Ho = (H - k) // s + 1

The maximum is a router: its gradient goes, whole, to the one input that won, and zero goes to
the others. On a tie the first maximum in row-major window order wins (as ``argmax`` and
PyTorch's CPU kernel choose), so the gradient is deterministic. Forward records the winner as an
index ``i*k + j`` into the window (a small integer array); backward only needs that and the shape.

On the kernel path (``kernels/maxpool.cu``) the forward is one launch, a thread per output
element, and the backward one launch, a thread per input element that gathers the gradient of the
windows it won. The kernels store the winner as int8, so there a window has at most 127 elements
(``kernel_size <= 11``); larger windows are refused with an error saying so.
"""

import numpy

from .. import backend
from ..cuda.launch import launch
from .base import Layer, batch_chunks, check_array, check_positive_int
from .im2col import conv_output_size

#: The largest window the GPU kernels can pool: they record the winner's offset as an int8.
MAX_KERNEL_WINDOW = 127


def smallest_index_dtype(count):
    """The narrowest unsigned integer type that can hold indices ``0 .. count-1``."""
    for dtype in (numpy.uint8, numpy.uint16, numpy.uint32):
        if count <= numpy.iinfo(dtype).max + 1:
            return dtype
    return numpy.int64


class MaxPool2d(Layer):
    """Max pooling over k x k windows with stride s (default s = k).

    forward: x (N, C, H, W) -> y (N, C, Ho, Wo), Ho = (H - k) // s + 1; needs H, W >= k.
    backward: dy (N, C, Ho, Wo) -> dx (N, C, H, W), dy routed to each window's first maximum.
    """

    input_names = ("x",)

    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size = check_positive_int(kernel_size, "MaxPool2d", "kernel_size")
        self.stride = self.kernel_size if stride is None else check_positive_int(stride, "MaxPool2d", "stride")

    def __repr__(self):
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride})"

    def output_shape(self, input_shape):
        n, c, height, width = input_shape
        return (n, c, conv_output_size(height, self.kernel_size, self.stride, 0),
                conv_output_size(width, self.kernel_size, self.stride, 0))

    def check_input(self, x):
        check_array(x, "MaxPool2d", "input x", ndim=4)
        if min(x.shape[2:]) < self.kernel_size:
            raise ValueError(f"{self!r}: input of spatial size {x.shape[2]}x{x.shape[3]} is smaller "
                             f"than the {self.kernel_size}x{self.kernel_size} window")

    def forward(self, x):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_input(x)
        return self.run_forward(x)

    def window_offsets(self, out_height, out_width):
        """Yield ``(index, rows, cols)``: for each window offset (i, j) in row-major order, its
        index ``i*k + j`` and the slices that pick that offset's element of every window."""
        k, s = self.kernel_size, self.stride
        for i in range(k):
            for j in range(k):
                yield i * k + j, slice(i, i + s * (out_height - 1) + 1, s), slice(j, j + s * (out_width - 1) + 1, s)

    def forward_cpu(self, x):
        """x (N, C, H, W) -> y (N, C, Ho, Wo); the cache is (winner (N, C, Ho, Wo), x's shape).

        A sweep per window offset, each on a chunk of the batch (:func:`~.base.batch_chunks`) so
        that the sweeps after the first read the chunk from cache, with preallocated temporaries.
        """
        n, c, out_height, out_width = self.output_shape(x.shape)
        index_dtype = smallest_index_dtype(self.kernel_size ** 2)
        y = numpy.empty((n, c, out_height, out_width), dtype=x.dtype)
        winner = numpy.zeros(y.shape, dtype=index_dtype)
        chunks = batch_chunks(n, x[0].nbytes)
        larger = numpy.empty((chunks[0].stop, c, out_height, out_width), dtype=bool)
        claim = numpy.empty(larger.shape, dtype=index_dtype)
        offsets = list(self.window_offsets(out_height, out_width))
        for chunk in chunks:
            images, pooled, won = x[chunk], y[chunk], winner[chunk]
            larger_here, claim_here = larger[:len(pooled)], claim[:len(pooled)]
            for index, rows, cols in offsets:
                candidate = images[:, :, rows, cols]
                if index == 0:
                    pooled[...] = candidate
                    continue
                # strictly larger only, so that on a tie the earlier offset keeps the window; and since
                # index grows, max(winner, larger * index) sets winner = index exactly where larger holds
                numpy.greater(candidate, pooled, out=larger_here)
                numpy.multiply(larger_here, index_dtype(index), out=claim_here)
                numpy.maximum(won, claim_here, out=won)
                numpy.maximum(pooled, candidate, out=pooled)
            self.first_nan_wins(images, pooled, won, offsets)
        return y, (winner, x.shape)

    @staticmethod
    def first_nan_wins(images, pooled, won, offsets):
        """Where a window holds NaN (``numpy.maximum`` has made its output NaN, but NaN is never
        greater), make its first NaN the winner, as the kernel and PyTorch do, so that the gradient
        goes to the pixel the output came from. One check of the output when there is no NaN."""
        nan_windows = numpy.isnan(pooled)
        if not nan_windows.any():
            return
        first_nan = won.copy()
        for index, rows, cols in reversed(offsets):
            first_nan[numpy.isnan(images[:, :, rows, cols])] = index
        won[nan_windows] = first_nan[nan_windows]

    def pooled(self, x):
        """The forward pass's output alone, for inference: x (N, C, H, W) -> y (N, C, Ho, Wo).

        Keeps no cache (``backward`` cannot follow). On the NumPy path it records no winners,
        which is most of :meth:`forward_cpu`'s work: 0.28 against 0.67 ms on a stage-2 eye batch
        (32 x 8 x 64 x 64). The maximum over a window is the maximum over its k rows, then over
        its k columns: the first sweeps read whole contiguous rows, the second the k-times smaller
        result (for 2x2 windows three ``numpy.maximum`` calls in all). Maxima are exact, so y is
        the same. On the kernel path it is the forward kernel (whose winners cost one byte a pixel).
        """
        self.cache = None  # backward cannot follow an inference pass: no older pass's cache either
        self.check_input(x)
        if backend.uses_kernels(x):
            y = self.forward(x)
            self.cache = None  # as on the NumPy path: backward cannot follow
            return y
        n, c, out_height, out_width = self.output_shape(x.shape)
        k, s = self.kernel_size, self.stride
        row_window = [x[:, :, i:i + s * (out_height - 1) + 1:s] for i in range(k)]  # (N, C, Ho, W) each
        rows = numpy.maximum(row_window[0], row_window[1]) if k > 1 else row_window[0].copy()
        for window in row_window[2:]:
            numpy.maximum(rows, window, out=rows)
        y = numpy.empty((n, c, out_height, out_width), dtype=x.dtype)
        y[...] = rows[..., 0:s * (out_width - 1) + 1:s]
        for j in range(1, k):
            numpy.maximum(y, rows[..., j:j + s * (out_width - 1) + 1:s], out=y)
        return y

    def forward_gpu(self, x):
        """x (N, C, H, W) C-contiguous -> y (N, C, Ho, Wo); the cache is (argmax int8 (N, C, Ho, Wo), x's shape)."""
        k, s = self.kernel_size, self.stride
        if k * k > MAX_KERNEL_WINDOW:
            raise ValueError(f"{self!r}: the GPU kernel records each window's winner as an int8 offset, so a window "
                             f"may have at most {MAX_KERNEL_WINDOW} elements, and {k}x{k} has {k * k}; use "
                             "kernel_size <= 11, or run this layer on the NumPy backend")
        n, c, out_height, out_width = self.output_shape(x.shape)
        xp = backend.get_array_module(x)
        y = xp.empty((n, c, out_height, out_width), dtype=x.dtype)
        argmax = xp.empty(y.shape, dtype=numpy.int8)
        i32 = numpy.int32
        launch("maxpool", "maxpool_forward", x.dtype, y.size,
               (x, y, argmax, i32(n), i32(c), i32(x.shape[2]), i32(x.shape[3]), i32(k), i32(s),
                i32(out_height), i32(out_width)))
        return y, (argmax, x.shape)

    def backward(self, grad_output):
        return self.run_backward(grad_output)

    def backward_gpu(self, grad_output):
        """dy (N, C, Ho, Wo) C-contiguous -> dx (N, C, H, W): each input gathers dy of the windows it won."""
        argmax, x_shape = self.cache
        n, c, height, width = x_shape
        out_height, out_width = argmax.shape[2:]
        dx = backend.get_array_module(grad_output).empty(x_shape, dtype=grad_output.dtype)
        i32 = numpy.int32
        launch("maxpool", "maxpool_backward", grad_output.dtype, dx.size,
               (grad_output, argmax, dx, i32(n), i32(c), i32(height), i32(width), i32(self.kernel_size),
                i32(self.stride), i32(out_height), i32(out_width)))
        return dx

    def backward_cpu(self, grad_output):
        """dy (N, C, Ho, Wo) -> dx (N, C, H, W), a sweep per window offset on chunks of the batch.

        Each sweep multiplies dy by the 0/1 mask of the windows that its offset won, which is exact
        for finite dy; an inf or NaN in dy would give NaN (inf * 0) to the inputs that lost its
        window, so when dx holds a NaN (one reduction finds it) the sweeps run again, adding dy
        only where the offset won, as the naive layer and the kernel route it.
        """
        with numpy.errstate(invalid="ignore"):  # inf * 0, routed again right below
            dx = self._route(grad_output, select=False)
        if dx.size and numpy.isnan(dx.max()):
            dx = self._route(grad_output, select=True)
        return dx

    def _route(self, grad_output, select):
        """:meth:`backward_cpu`'s sweeps: dy times each offset's mask, or with ``select`` dy added
        where the mask holds (slower, for a non-finite dy)."""
        winner, x_shape = self.cache
        out_height, out_width = winner.shape[2:]
        dx = numpy.zeros(x_shape, dtype=grad_output.dtype)
        overlapping = self.kernel_size > self.stride
        chunks = batch_chunks(len(dx), dx[0].nbytes)
        won = numpy.empty((chunks[0].stop,) + winner.shape[1:], dtype=bool)
        offsets = list(self.window_offsets(out_height, out_width))
        for chunk in chunks:
            upstream, won_here = grad_output[chunk], won[:chunk.stop - chunk.start]
            for index, rows, cols in offsets:
                numpy.equal(winner[chunk], index, out=won_here)
                inputs = dx[chunk, :, rows, cols]
                if select:
                    numpy.add(inputs, upstream, out=inputs, where=won_here)
                elif overlapping:  # an input may win several windows: add up what it receives
                    inputs += upstream * won_here
                else:  # each input belongs to one window at most: write in place, no temporary
                    numpy.multiply(upstream, won_here, out=inputs)
        return dx
