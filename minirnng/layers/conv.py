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

Both layers run on either path with the same code: the NumPy path passes the NumPy
``im2col``/``col2im`` to those two functions, the kernel path passes the kernels' launchers
(``im2col_gpu``/``col2im_gpu``), and the products are ``xp.matmul`` either way (cuBLAS on a GPU).
Only the bias differs: on the kernel path the ``bias_add`` kernel adds it in place after
Conv2d's product, the ``col2im`` launch of ConvTranspose2d adds it as it writes each pixel, and
the bias gradient is ``reduce.cu``'s ``channel_sum``. Kernel launches per pass (batch of any size)::

    Conv2d            forward   im2col, matmul, bias_add          (1x1, stride 1, no padding: no im2col)
                      backward  matmul (+ sum over the batch), channel_sum x 2, matmul, col2im
                                                                  (1x1: no col2im)
    ConvTranspose2d   forward   matmul, col2im with the bias
                      backward  im2col, matmul, matmul (+ sum over the batch), channel_sum x 2
"""

import functools

import numpy

from .. import backend
from ..cuda.launch import channel_sum, contiguous, launch
from .base import Layer, check_array, check_positive_int, uniform_fan_in
from .im2col import col2im, col2im_gpu, conv_output_size, im2col, im2col_gpu, transposed_output_size


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
        self.stride = check_positive_int(stride, owner, "stride")
        self.padding = check_positive_int(padding, owner, "padding", minimum=0)
        self.has_bias = bool(bias)
        rng = numpy.random.default_rng(rng)
        shape = self.weight_shape()
        # PyTorch computes the fan-in from the weight's second axis, for both layers.
        fan_in = shape[1] * self.kernel_size * self.kernel_size
        self.add_param("weight", uniform_fan_in(rng, shape, fan_in))
        if self.has_bias:
            self.add_param("bias", uniform_fan_in(rng, (self.out_channels,), fan_in))

    def check_input(self, x):
        check_array(x, type(self).__name__, "input x", ndim=4, dtype=self.dtype,
                    channels=self.in_channels, like=self.params["weight"])

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

    def output_shape(self, input_shape):
        n, _, height, width = input_shape
        return (n, self.out_channels,
                conv_output_size(height, self.kernel_size, self.stride, self.padding),
                conv_output_size(width, self.kernel_size, self.stride, self.padding))

    def forward(self, x):
        self.check_input(x)
        height, width = x.shape[2:]
        if min(height, width) + 2 * self.padding < self.kernel_size:
            raise ValueError(f"{self!r}: input of spatial size {height}x{width} is too small for a "
                             f"{self.kernel_size}x{self.kernel_size} kernel with padding {self.padding}")
        return self.run_forward(x)

    def forward_cpu(self, x):
        y, cols = correlate(x, self.params["weight"], self.stride, self.padding)
        return self.add_bias(y), (cols, x.shape)

    def forward_gpu(self, x):
        """x (N, C, H, W) C-contiguous: the im2col kernel, cuBLAS, the bias_add kernel.

        The cache is (cols (N, C*k*k, Ho*Wo), x's shape); for a 1x1 convolution cols is a view of x.
        """
        y, cols = correlate(x, self.params["weight"], self.stride, self.padding, unfold=im2col_gpu)
        return self.add_bias_gpu(y), (cols, x.shape)

    def backward(self, grad_output):
        return self.run_backward(grad_output)

    def backward_cpu(self, grad_output):
        return self.backward_with(grad_output, fold=col2im, bias_gradient=bias_gradient_cpu)

    def backward_gpu(self, grad_output):
        return self.backward_with(grad_output, fold=col2im_gpu, bias_gradient=bias_gradient_gpu)

    def backward_with(self, grad_output, fold, bias_gradient):
        """The backward pass of either path, given that path's col2im and bias gradient.

        grad_output (N, O, Ho, Wo) -> dx (N, C, H, W), or None when ``needs_input_grad`` is False.
        """
        cols, x_shape = self.cache
        weight = self.params["weight"]
        n = grad_output.shape[0]
        upstream = grad_output.reshape(n, self.out_channels, -1)
        self.accumulate_grad("weight", weight_gradient(upstream, cols).reshape(weight.shape))
        self.accumulate_bias_grad(grad_output, bias_gradient)
        if not self.needs_input_grad:
            return None
        return correlate_transpose(grad_output, weight, self.stride, self.padding, x_shape, fold=fold)


class ConvTranspose2d(_ConvolutionBase):
    """2-D transposed convolution, ``torch.nn.ConvTranspose2d`` semantics (no output padding).

    Parameters: ``weight`` (in_channels, out_channels, k, k), ``bias`` (out_channels,).
    forward: x (N, in_channels, H, W) -> y (N, out_channels, Ho, Wo), Ho = (H - 1) * s - 2p + k.
    backward: dy (N, out_channels, Ho, Wo) -> dx (N, in_channels, H, W); adds into grads.
    """

    def weight_shape(self):
        return (self.in_channels, self.out_channels, self.kernel_size, self.kernel_size)

    def output_shape(self, input_shape):
        n, _, height, width = input_shape
        return (n, self.out_channels,
                transposed_output_size(height, self.kernel_size, self.stride, self.padding),
                transposed_output_size(width, self.kernel_size, self.stride, self.padding))

    def forward(self, x):
        self.check_input(x)
        output_shape = self.output_shape(x.shape)
        if min(output_shape[2:]) < 1:
            raise ValueError(f"{self!r}: input of spatial size {x.shape[2]}x{x.shape[3]} gives an empty output "
                             f"{output_shape[2]}x{output_shape[3]}")
        return self.run_forward(x)

    def forward_cpu(self, x):
        y = correlate_transpose(x, self.params["weight"], self.stride, self.padding, self.output_shape(x.shape))
        return self.add_bias(y), x

    def forward_gpu(self, x):
        """x (N, C, H, W) C-contiguous: cuBLAS, then the col2im kernel, which adds the bias as it
        writes each output pixel. The cache is x."""
        fold = functools.partial(col2im_gpu, bias=self.params.get("bias"))
        y = correlate_transpose(x, self.params["weight"], self.stride, self.padding, self.output_shape(x.shape),
                                fold=fold)
        return y, x

    def backward(self, grad_output):
        return self.run_backward(grad_output)

    def backward_cpu(self, grad_output):
        return self.backward_with(grad_output, unfold=im2col, bias_gradient=bias_gradient_cpu)

    def backward_gpu(self, grad_output):
        return self.backward_with(grad_output, unfold=im2col_gpu, bias_gradient=bias_gradient_gpu)

    def backward_with(self, grad_output, unfold, bias_gradient):
        """The backward pass of either path, given that path's im2col and bias gradient.

        grad_output (N, O, Ho, Wo) -> dx (N, C, H, W).
        """
        x = self.cache
        weight = self.params["weight"]
        n = x.shape[0]
        dx, cols = correlate(grad_output, weight, self.stride, self.padding, unfold=unfold)
        inputs = x.reshape(n, self.in_channels, -1)
        self.accumulate_grad("weight", weight_gradient(inputs, cols).reshape(weight.shape))
        self.accumulate_bias_grad(grad_output, bias_gradient)
        return dx
