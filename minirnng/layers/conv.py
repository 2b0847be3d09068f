"""Convolution and transposed convolution, with PyTorch's semantics and weight layouts.

Conv2d (cross-correlation, zero padding p, stride s), weight ``w`` (O, C, k, k), bias ``b`` (O,):

    y[n, o, oy, ox] = b[o] + sum_{c, i, j} w[o, c, i, j] * xpad[n, c, oy*s + i, ox*s + j]
    x (N, C, H, W) -> y (N, O, Ho, Wo),    Ho = (H + 2p - k) // s + 1

With ``cols = im2col(x)`` (N, C*k*k, Ho*Wo) this is one matrix product, ``y = w2 @ cols`` with
``w2 = w.reshape(O, C*k*k)``, so the three gradients are matrix products too:

    dw2 = sum_n dy[n] @ cols[n].T        db = sum_{n, oy, ox} dy
    dx  = col2im(w2.T @ dy)                                  <- a transposed convolution of dy

ConvTranspose2d is the same pair of operations in the other order. Its weight ``w`` (C, O, k, k)
maps C input channels to O output channels, and

    y = col2im(w2.T @ x) + b,    w2 = w.reshape(C, O*k*k),    x (N, C, H, W) -> y (N, O, Ho, Wo)
    Ho = (H - 1) * s - 2p + k
    dx = w2 @ im2col(dy)                                     <- a convolution of dy
    dw2 = sum_n x[n] @ im2col(dy)[n].T

So the whole module rests on two functions, :func:`correlate` (im2col, then a product) and
:func:`correlate_transpose` (a product, then col2im): each layer's forward is one of them and its
input gradient is the other.

**The NumPy path** runs the same formulas image by image, or a few images at a time when their
columns are small (:func:`correlate_cpu`, :func:`correlate_transpose_cpu` and the two
``backward_cpu``): im2col into buffers allocated once per pass
(:class:`~minirnng.layers.im2col.ImageColumns`, which also explains the columns' layout), the
product, and, in the backward pass, the weight gradient and col2im of the same images while their
columns are still in cache. That is 1.5-2.5x faster than im2col over the whole batch (see
``im2col.py``) and keeps no columns between the passes: Conv2d's cache is its input ``x``, and its
backward pass unfolds ``x`` again (a copy that costs a tenth of the products), instead of holding
the columns of the whole batch (79 MB for RNN-G's conv1 at batch 16) from forward to backward.
Conv2d's bias and its gradient ride along in the products (a row of ones in the columns). The
products of the forward passes and of ConvTranspose2d's input gradient run in column blocks
where OpenBLAS has unpacked kernels for them (:func:`~minirnng.layers.products.matmul_blocks`:
conv1's forward 30% faster on an AVX-512 machine, the same numbers up to rounding); Conv2d's
input gradient and the weight gradients, which measured no faster in blocks, run whole.

**The kernel path** has two ways to run a forward pass. For small work (at most
:data:`DIRECT_MAX_MULTIPLY_ADDS` over the batch, e.g. all of RNN-G at batch 1) the ``conv_direct.cu``
kernels compute each output pixel by its defining sum, bias included: one launch, and no cuBLAS
call, so that a whole network can be captured in a CUDA graph. Otherwise it passes the kernels' launchers (``im2col_gpu``/``col2im_gpu``) to
:func:`correlate` and :func:`correlate_transpose`, which run the whole batch at once, and the
products are ``xp.matmul`` (cuBLAS). The bias: the ``bias_add`` kernel adds it in place after
Conv2d's product, the ``col2im`` launch of ConvTranspose2d adds it as it writes each pixel, and
the bias gradient is ``reduce.cu``'s ``channel_sum``. Kernel launches per pass (batch of any size)::

    Conv2d            forward   im2col, matmul, bias_add          (1x1, stride 1, no padding: no im2col)
                                or conv2d_direct                  (small work)
                      backward  matmul (+ sum over the batch), channel_sum x 2, matmul, col2im
                                                                  (1x1: no col2im)
    ConvTranspose2d   forward   matmul, col2im with the bias
                                or conv_transpose2d_direct        (small work)
                      backward  im2col, matmul, matmul (+ sum over the batch), channel_sum x 2
"""

import functools
import math

import numpy

from .. import backend
from ..cuda.launch import channel_sum, contiguous, launch
from .activations import ReLU
from .base import Layer, batch_chunks, check_array, check_positive_int, random_generator, uniform_fan_in
from .products import matmul_blocks
from .im2col import ImageColumns, col2im, col2im_gpu, conv_output_size, im2col, im2col_gpu, transposed_output_size


#: The kernel path computes a forward pass by the ``conv_direct.cu`` kernels when it takes at most
#: this many multiply-adds over the batch (:meth:`_ConvolutionBase.multiply_adds`), and through
#: im2col and cuBLAS above it: three steps with a fixed cost of some microseconds each, against one
#: launch whose time grows with the work, since a thread reads each weight and input value itself
#: where cuBLAS reuses them from fast memory. Measured on an H200 (docs/benchmarks.md), the direct
#: kernel won for every RNN-G layer up to about 5e7 multiply-adds, and the two crossed between 6.7e7
#: (transposed convolution) and beyond 1.3e9 (conv1); 2**26 (6.7e7) keeps batches 1 to 3 of
#: RNN-G at 128 x 128 direct, so that they can be recorded in a CUDA graph. A layer's ``gpu_algorithm``
#: ("direct" or "im2col", default "auto") overrides the rule, for tests and benchmarks.
DIRECT_MAX_MULTIPLY_ADDS = 2 ** 26

GPU_ALGORITHMS = ("auto", "direct", "im2col")


def direct_convolution(x, weight, bias, stride, padding, out_shape, transposed=False, relu=False):
    """A convolution (``weight`` (O, C, k, k)) or transposed convolution (``weight`` (C, O, k, k)) of
    x (N, C, H, W) C-contiguous into a new (N, O, Ho, Wo) array ``out_shape``, by one launch of
    ``conv_direct.cu`` with the bias added in the same sum (``bias`` (O,) or None), and with
    ``relu`` a ReLU applied as each output is written."""
    n, channels, height, width = x.shape
    _, out_channels, out_height, out_width = out_shape
    y = backend.get_array_module(x).empty(out_shape, dtype=x.dtype)
    i32 = numpy.int32
    launch("conv_direct", "conv_transpose2d_direct" if transposed else "conv2d_direct", x.dtype, y.size,
           (x, weight, bias, y, i32(n), i32(channels), i32(height), i32(width), i32(out_channels),
            i32(weight.shape[2]), i32(stride), i32(padding), i32(out_height), i32(out_width), i32(relu)))
    return y


def correlate(x, weight, stride, padding, unfold=im2col):
    """Cross-correlate ``x`` with ``weight`` through im2col and one matrix product.

    x : (N, C, H, W), weight : (O, C, k, k) -> (y (N, O, Ho, Wo), cols (N, C*k*k, Ho*Wo)).
    ``unfold`` is the im2col to use (the NumPy one, or the CUDA kernel's launcher).
    """
    n, _, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    cols = unfold(x, kernel_size, stride, padding)
    xp = backend.get_array_module(x)
    y = xp.matmul(weight.reshape(out_channels, -1), cols)
    out_height = conv_output_size(height, kernel_size, stride, padding)
    out_width = conv_output_size(width, kernel_size, stride, padding)
    return y.reshape(n, out_channels, out_height, out_width), cols


def correlate_transpose(y, weight, stride, padding, image_shape, fold=col2im):
    """The adjoint of :func:`correlate` in ``x``: a transposed convolution.

    y : (N, O, Ho, Wo), weight : (O, C, k, k), image_shape : (N, C, H, W) -> (N, C, H, W).
    ``fold`` is the col2im to use.
    """
    n, out_channels = y.shape[:2]
    kernel_size = weight.shape[2]
    xp = backend.get_array_module(y)
    cols = xp.matmul(weight.reshape(out_channels, -1).T, y.reshape(n, out_channels, -1))
    return fold(cols, image_shape, kernel_size, stride, padding)


def weight_gradient(upstream, cols):
    """``sum_n upstream[n] @ cols[n].T``: upstream (N, A, P), cols (N, B, P) -> (A, B)."""
    xp = backend.get_array_module(upstream)
    return xp.matmul(upstream, cols.transpose(0, 2, 1)).sum(axis=0)


#: The NumPy path convolves chunks of the batch whose columns take about this many bytes (at least
#: one image): big enough that the few Python calls per chunk cost little, small enough that the
#: columns are still in cache (L3) when the product reads them. RNN-G's conv1 and conv3 then run
#: one image at a time, deconv9 five. Pointwise convolutions, which copy nothing, take the batch at once.
COLUMN_CHUNK_BYTES = 4 << 20


def column_chunks(image_shape, kernel_size, stride, padding, dtype, batch_size, ones_row=False):
    """The chunks of the batch that the NumPy path convolves at once (see :data:`COLUMN_CHUNK_BYTES`),
    and an :class:`ImageColumns` with buffers for the largest."""
    chunks = batch_chunks(batch_size, ImageColumns.bytes_per_image(image_shape, kernel_size, stride, padding, dtype),
                          COLUMN_CHUNK_BYTES)
    unfold = ImageColumns(image_shape, kernel_size, stride, padding, dtype, images=chunks[0].stop, ones_row=ones_row)
    return chunks, unfold


def correlate_cpu(x, weight, stride, padding, bias=None, view=False, relu=False):
    """:func:`correlate` on the NumPy path, image by image: x (N, C, H, W) -> y (N, O, Ho, Wo).

    For each chunk of images: their columns (m, C*k*k, Ho * grid_width) into a reused buffer, then
    ``w2 @ cols`` (on the columns' grid, then cropped to (Ho, Wo), see :class:`ImageColumns`) into
    the chunk's slice of ``y``. ``bias`` (O,) is added by the product, as a last column of ``w2``
    against a row of ones in the columns (or, for a pointwise kernel, while the slice is in cache).

    For inference (the stage-2 networks), where the grid is wider than the output: ``view``
    returns y as a strided view (N, O, Ho, Wo) of the products on the grid instead of copying it
    out of them (when what reads y next reads it once anyway, as a max pooling: 4-9% of a stage-2
    convolution's time); ``relu`` applies a ReLU to y as it is copied out (one pass, not two).
    """
    n, channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    chunks, unfold = column_chunks((channels, height, width), kernel_size, stride, padding, x.dtype, n,
                                   ones_row=bias is not None)
    on_grid = None  # the products on the columns' grid, where it is wider than the output
    if unfold.grid_width != unfold.out_width:
        images = n if view else chunks[0].stop  # as a view, all of them; else one chunk's, reused
        on_grid = numpy.empty((images, out_channels, unfold.out_height * unfold.grid_width), dtype=x.dtype)
    else:
        view = False
    y = None if view else numpy.empty((n, out_channels, unfold.out_height, unfold.out_width), dtype=x.dtype)
    w2 = weight.reshape(out_channels, -1)
    if unfold.ones_row:
        w2 = numpy.concatenate([w2, bias[:, None]], axis=1)  # [w2 | b] (O, C*k*k + 1)
    for chunk in chunks:
        m = chunk.stop - chunk.start
        if on_grid is None:
            matmul_blocks(w2, unfold(x[chunk]), out=y[chunk].reshape(m, out_channels, -1))
        elif view:
            matmul_blocks(w2, unfold(x[chunk]), out=on_grid[chunk])
        else:
            products = unfold.crop(matmul_blocks(w2, unfold(x[chunk]), out=on_grid[:m]))
            if relu:
                numpy.maximum(products, 0, out=y[chunk])
            else:
                y[chunk] = products
        if bias is not None and not unfold.ones_row:
            y[chunk] += bias[:, None, None]
    if view:
        return unfold.crop(on_grid)
    if relu and on_grid is None:
        numpy.maximum(y, 0, out=y)
    return y


def correlate_transpose_cpu(y, weight, stride, padding, image_shape, bias=None):
    """:func:`correlate_transpose` on the NumPy path, image by image.

    y : (N, O, Ho, Wo), weight : (O, C, k, k) -> x (N, C, H, W) of ``image_shape``: for each chunk
    of images, ``w2.T @ y[chunk]`` (put on the grid of :class:`ImageColumns` first) into a reused
    (m, C*k*k, Ho * grid_width) buffer, folded by :meth:`ImageColumns.fold`, plus ``bias`` (C,).
    """
    n, out_channels = y.shape[:2]
    kernel_size = weight.shape[2]
    w2_t = weight.reshape(out_channels, -1).T
    chunks, unfold = column_chunks(image_shape[1:], kernel_size, stride, padding, y.dtype, n)
    x = numpy.empty(image_shape, dtype=y.dtype)
    for chunk in chunks:
        m = chunk.stop - chunk.start
        cols = unfold.columns[:m] if not unfold.pointwise else None  # the columns' buffer, free here
        unfold.fold(matmul_blocks(w2_t, unfold.extend(y[chunk]), out=cols), x[chunk], bias)
    return x


def bias_gradient_cpu(grad_output):
    """``db[o] = sum over n, y, x of dy[n, o, y, x]``: grad_output (N, O, H, W) -> (O,)."""
    return grad_output.sum(axis=(0, 2, 3))


def bias_gradient_gpu(grad_output):
    """:func:`bias_gradient_cpu` by the ``channel_sum`` kernels (two launches, summed in double)."""
    n, channels = grad_output.shape[:2]
    return channel_sum(grad_output.reshape(n, channels, -1))


class _ConvolutionBase(Layer):
    """What Conv2d and ConvTranspose2d share: hyper-parameters, initialisation and input checks."""

    input_names = ("x",)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=numpy.float32):
        super().__init__(dtype)
        owner = type(self).__name__
        self.in_channels = check_positive_int(in_channels, owner, "in_channels")
        self.out_channels = check_positive_int(out_channels, owner, "out_channels")
        self.kernel_size = check_positive_int(kernel_size, owner, "kernel_size")
        #: How the kernel path runs forward: "auto" (by DIRECT_MAX_MULTIPLY_ADDS), "direct" or "im2col".
        self.gpu_algorithm = "auto"
        self.stride = check_positive_int(stride, owner, "stride")
        self.padding = check_positive_int(padding, owner, "padding", minimum=0)
        if not isinstance(bias, (bool, numpy.bool_)):  # bias="no" would be true
            raise TypeError(f"{owner}: bias must be True or False, got {bias!r}")
        self.has_bias = bool(bias)
        rng = random_generator(rng, type(self).__name__)
        shape = self.weight_shape()
        # PyTorch computes the fan-in from the weight's second axis, for both layers.
        fan_in = shape[1] * self.kernel_size * self.kernel_size
        self.add_param("weight", uniform_fan_in(rng, shape, fan_in))
        if self.has_bias:
            self.add_param("bias", uniform_fan_in(rng, (self.out_channels,), fan_in))

    def check_input(self, x):
        check_array(x, type(self).__name__, "input x", ndim=4, dtype=self.dtype,
                    channels=self.in_channels, like=self.params["weight"])

    def multiply_adds(self, output_shape):
        """Multiply-adds of a forward pass to ``output_shape`` (N, O, Ho, Wo): each output value sums
        ``in_channels * taps_per_channel()`` products."""
        return math.prod(output_shape) * self.in_channels * self.taps_per_channel()

    def uses_direct_kernel(self, output_shape):
        """Whether the kernel path's forward runs ``conv_direct.cu`` for this output shape."""
        if self.gpu_algorithm not in GPU_ALGORITHMS:
            raise ValueError(f"{self!r}: gpu_algorithm must be one of {', '.join(GPU_ALGORITHMS)}, "
                             f"got {self.gpu_algorithm!r}")
        if self.gpu_algorithm == "auto":
            return self.multiply_adds(output_shape) <= DIRECT_MAX_MULTIPLY_ADDS
        return self.gpu_algorithm == "direct"

    def add_bias(self, y):
        """y (N, O, Ho, Wo) += bias, in place (NumPy path)."""
        if self.has_bias:
            y += self.params["bias"].reshape(1, -1, 1, 1)
        return y

    def add_bias_gpu(self, y):
        """y (N, O, Ho, Wo), the product, += bias in place by the ``bias_add`` kernel."""
        if self.has_bias:
            y = contiguous(y)
            n, channels, height, width = y.shape
            i32 = numpy.int32
            launch("bias", "bias_add", y.dtype, y.size,
                   (y, self.params["bias"], i32(n), i32(channels), i32(height * width)))
        return y

    def accumulate_bias_grad(self, grad_output, bias_gradient=bias_gradient_cpu):
        if self.has_bias:
            self.accumulate_grad("bias", bias_gradient(grad_output))

    def __repr__(self):
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.has_bias}, dtype={self.dtype.name})")


class Conv2d(_ConvolutionBase):
    """2-D cross-correlation, ``torch.nn.Conv2d`` semantics.

    Parameters: ``weight`` (out_channels, in_channels, k, k), ``bias`` (out_channels,).
    forward: x (N, in_channels, H, W) -> y (N, out_channels, Ho, Wo), Ho = (H + 2p - k) // s + 1.
    backward: dy (N, out_channels, Ho, Wo) -> dx (N, in_channels, H, W); adds into grads.
    """

    def weight_shape(self):
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def taps_per_channel(self):
        """Products per output value and input channel: the k * k taps of the window."""
        return self.kernel_size * self.kernel_size

    def output_shape(self, input_shape):
        n, _, height, width = input_shape
        return (n, self.out_channels,
                conv_output_size(height, self.kernel_size, self.stride, self.padding),
                conv_output_size(width, self.kernel_size, self.stride, self.padding))

    def check_size(self, x):
        height, width = x.shape[2:]
        if min(height, width) + 2 * self.padding < self.kernel_size:
            raise ValueError(f"{self!r}: input of spatial size {height}x{width} is too small for a "
                             f"{self.kernel_size}x{self.kernel_size} kernel with padding {self.padding}")

    def forward(self, x):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_input(x)
        self.check_size(x)
        return self.run_forward(x)

    def forward_cpu(self, x):
        """x (N, C, H, W) -> y (N, O, Ho, Wo); the cache is x itself (backward unfolds it again)."""
        return correlate_cpu(x, self.params["weight"], self.stride, self.padding, self.params.get("bias")), x

    def infer(self, x, relu=False):
        """``forward(x)`` for inference, the same numbers; with ``relu``, followed by a ReLU. No
        cache is kept (``backward`` cannot follow).

        On the NumPy path, without ``relu`` the result may be a strided view (N, O, Ho, Wo) (see
        ``correlate_cpu``'s ``view`` and ``relu``). On the kernel path the direct kernel applies
        the ReLU as it writes (one launch, not two); after im2col the ReLU is its own launch.
        """
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_input(x)
        self.check_size(x)
        if not backend.uses_kernels(x):
            return correlate_cpu(x, self.params["weight"], self.stride, self.padding, self.params.get("bias"),
                                 view=not relu, relu=relu)
        x = contiguous(x)
        output_shape = self.output_shape(x.shape)
        if self.uses_direct_kernel(output_shape):
            return direct_convolution(x, self.params["weight"], self.params.get("bias"), self.stride, self.padding,
                                      output_shape, relu=relu)
        y = self.forward_gpu(x)[0]
        return ReLU().forward(y) if relu else y

    def forward_gpu(self, x):
        """x (N, C, H, W) C-contiguous: the ``conv2d_direct`` kernel for small work, else the
        im2col kernel, cuBLAS, the bias_add kernel.

        The cache is (cols (N, C*k*k, Ho*Wo), x's shape, None) after im2col (for a 1x1 convolution
        cols is a view of x), and (None, x's shape, x) after the direct kernel: backward then
        unfolds x itself.
        """
        output_shape = self.output_shape(x.shape)
        if self.uses_direct_kernel(output_shape):
            y = direct_convolution(x, self.params["weight"], self.params.get("bias"), self.stride, self.padding,
                                   output_shape)
            return y, (None, x.shape, x)
        y, cols = correlate(x, self.params["weight"], self.stride, self.padding, unfold=im2col_gpu)
        return self.add_bias_gpu(y), (cols, x.shape, None)

    def backward(self, grad_output):
        return self.run_backward(grad_output)

    def backward_cpu(self, grad_output):
        """dy (N, O, Ho, Wo) -> dx (N, C, H, W) (None without ``needs_input_grad``), image by image.

        For each chunk of images: unfold x[chunk] again, ``dW += dy[n] @ cols[n].T`` (and
        ``db += dy[n]`` summed over pixels, as the last row of that product when the columns have
        a row of ones), then ``dx[n] = col2im(w2.T @ dy[n])``.
        """
        x = self.cache
        weight = self.params["weight"]
        n, channels, height, width = x.shape
        w2 = weight.reshape(self.out_channels, -1)
        chunks, unfold = column_chunks((channels, height, width), self.kernel_size, self.stride, self.padding,
                                       x.dtype, n, ones_row=self.has_bias)
        # dW2.T (C*k*k [+ 1], O) += cols @ dy[n].T: this orientation of the product runs 10-15% faster
        # than dy[n] @ cols.T with OpenBLAS for these shapes (O is only 16 or 32)
        weight_grad_t = numpy.zeros((w2.shape[1] + unfold.ones_row, self.out_channels), dtype=w2.dtype)
        bias_grad = numpy.zeros(self.out_channels, dtype=w2.dtype)
        products = numpy.empty((chunks[0].stop,) + weight_grad_t.shape, dtype=w2.dtype)
        dx = dcols = None
        if self.needs_input_grad:
            dx = numpy.empty(x.shape, dtype=x.dtype)
            columns_shape = x.shape if unfold.pointwise else (len(unfold.columns), unfold.rows, unfold.columns.shape[2])
            dcols = numpy.empty(columns_shape, dtype=x.dtype)
        for chunk in chunks:
            m = chunk.stop - chunk.start
            dy = unfold.extend(grad_output[chunk])  # (m, O, Ho * grid_width)
            weight_grad_t += numpy.matmul(unfold(x[chunk]), dy.transpose(0, 2, 1), out=products[:m]).sum(axis=0)
            if not unfold.ones_row:
                bias_grad += grad_output[chunk].sum(axis=(0, 2, 3))
            if dx is not None:
                # whole: in column blocks this product measured no faster in place (docs/benchmarks.md)
                unfold.fold(numpy.matmul(w2.T, dy, out=dcols[:m].reshape(m, w2.shape[1], -1)), dx[chunk])
        if unfold.ones_row:
            weight_grad_t, bias_grad = weight_grad_t[:-1], weight_grad_t[-1]
        self.accumulate_grad("weight", weight_grad_t.T.reshape(weight.shape))
        if self.has_bias:
            self.accumulate_grad("bias", bias_grad)
        return dx

    def backward_gpu(self, grad_output):
        """The whole batch at once: matmul (+ sum over the batch) for dW, ``channel_sum`` for db,
        matmul and the ``col2im`` kernel for dx. The cache is (cols, x's shape, x), see forward_gpu."""
        cols, x_shape, x = self.cache
        if cols is None:  # the forward pass ran the direct kernel
            cols = im2col_gpu(x, self.kernel_size, self.stride, self.padding)
        weight = self.params["weight"]
        n = grad_output.shape[0]
        upstream = grad_output.reshape(n, self.out_channels, -1)
        self.accumulate_grad("weight", weight_gradient(upstream, cols).reshape(weight.shape))
        self.accumulate_bias_grad(grad_output, bias_gradient_gpu)
        if not self.needs_input_grad:
            return None
        return correlate_transpose(grad_output, weight, self.stride, self.padding, x_shape, fold=col2im_gpu)


class ConvTranspose2d(_ConvolutionBase):
    """2-D transposed convolution, ``torch.nn.ConvTranspose2d`` semantics (no output padding).

    Parameters: ``weight`` (in_channels, out_channels, k, k), ``bias`` (out_channels,).
    forward: x (N, in_channels, H, W) -> y (N, out_channels, Ho, Wo), Ho = (H - 1) * s - 2p + k.
    backward: dy (N, out_channels, Ho, Wo) -> dx (N, in_channels, H, W); adds into grads.
    """

    def weight_shape(self):
        return (self.in_channels, self.out_channels, self.kernel_size, self.kernel_size)

    def taps_per_channel(self):
        """Products per output value and input channel: only every stride-th tap of a row or column
        meets an input, about ceil(k / s)^2 of the k * k."""
        return (-(-self.kernel_size // self.stride)) ** 2

    def output_shape(self, input_shape):
        n, _, height, width = input_shape
        return (n, self.out_channels,
                transposed_output_size(height, self.kernel_size, self.stride, self.padding),
                transposed_output_size(width, self.kernel_size, self.stride, self.padding))

    def forward(self, x):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_input(x)
        output_shape = self.output_shape(x.shape)
        if min(output_shape[2:]) < 1:
            raise ValueError(f"{self!r}: input of spatial size {x.shape[2]}x{x.shape[3]} gives no output: "
                             f"(size - 1) * stride - 2 * padding + kernel_size gives {output_shape[2]} rows and "
                             f"{output_shape[3]} columns, and both must be at least 1")
        return self.run_forward(x)

    def forward_cpu(self, x):
        """x (N, C, H, W) -> y (N, O, Ho, Wo), image by image; the cache is x."""
        return correlate_transpose_cpu(x, self.params["weight"], self.stride, self.padding, self.output_shape(x.shape),
                                       self.params.get("bias")), x

    def forward_gpu(self, x):
        """x (N, C, H, W) C-contiguous: the ``conv_transpose2d_direct`` kernel for small work,
        else cuBLAS, then the col2im kernel, which adds the bias as it writes each output pixel.
        The cache is x."""
        output_shape = self.output_shape(x.shape)
        if self.uses_direct_kernel(output_shape):
            y = direct_convolution(x, self.params["weight"], self.params.get("bias"), self.stride, self.padding,
                                   output_shape, transposed=True)
            return y, x
        fold = functools.partial(col2im_gpu, bias=self.params.get("bias"))
        y = correlate_transpose(x, self.params["weight"], self.stride, self.padding, self.output_shape(x.shape),
                                fold=fold)
        return y, x

    def backward(self, grad_output):
        return self.run_backward(grad_output)

    def backward_cpu(self, grad_output):
        """dy (N, O, Ho, Wo) -> dx (N, C, H, W), image by image.

        For each chunk of images: ``cols = im2col(dy[chunk])``, ``dx[n] = w2 @ cols[n]``,
        ``dW += x[n] @ cols[n].T`` and ``db += dy[n]`` summed over pixels.
        """
        x = self.cache
        weight = self.params["weight"]
        n, out_channels, out_height, out_width = grad_output.shape
        w2 = weight.reshape(self.in_channels, -1)
        chunks, unfold = column_chunks((out_channels, out_height, out_width), self.kernel_size, self.stride,
                                       self.padding, x.dtype, n)
        dx = numpy.empty(x.shape, dtype=x.dtype)
        on_grid = None  # dx on the columns' grid, where it is wider than x
        if unfold.grid_width != unfold.out_width:
            on_grid = numpy.empty((chunks[0].stop, self.in_channels, unfold.out_height * unfold.grid_width),
                                  dtype=x.dtype)
        weight_grad = numpy.zeros(w2.shape, dtype=w2.dtype)
        bias_grad = numpy.zeros(out_channels, dtype=w2.dtype)
        products = numpy.empty((chunks[0].stop,) + weight_grad.shape, dtype=w2.dtype)
        for chunk in chunks:
            m = chunk.stop - chunk.start
            cols = unfold(grad_output[chunk])  # (m, O*k*k, H * grid_width): on the grid of x's pixels
            if on_grid is None:
                matmul_blocks(w2, cols, out=dx[chunk].reshape(m, self.in_channels, -1))
            else:
                dx[chunk] = unfold.crop(matmul_blocks(w2, cols, out=on_grid[:m]))
            inputs = unfold.extend(x[chunk])
            weight_grad += numpy.matmul(inputs, cols.transpose(0, 2, 1), out=products[:m]).sum(axis=0)
            bias_grad += grad_output[chunk].sum(axis=(0, 2, 3))
        self.accumulate_grad("weight", weight_grad.reshape(weight.shape))
        if self.has_bias:
            self.accumulate_grad("bias", bias_grad)
        return dx

    def backward_gpu(self, grad_output):
        """The whole batch at once: the ``im2col`` kernel and matmul for dx, matmul (+ sum over the
        batch) for dW, ``channel_sum`` for db."""
        x = self.cache
        weight = self.params["weight"]
        n = x.shape[0]
        dx, cols = correlate(grad_output, weight, self.stride, self.padding, unfold=im2col_gpu)
        inputs = x.reshape(n, self.in_channels, -1)
        self.accumulate_grad("weight", weight_gradient(inputs, cols).reshape(weight.shape))
        self.accumulate_bias_grad(grad_output, bias_gradient_gpu)
        return dx
