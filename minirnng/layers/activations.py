"""Elementwise activations: ReLU, sigmoid and tanh, on arrays of any shape.

    ReLU     y = max(x, 0)            dx = dy * [x > 0]        (the kink at 0 gets slope 0, as PyTorch)
    Sigmoid  y = 1 / (1 + e^-x)       dx = dy * y * (1 - y)
    Tanh     y = tanh(x)              dx = dy * (1 - y^2)

Sigmoid and tanh express their derivative through the output, so the cache holds ``y``; ReLU
needs only the sign pattern, so on the NumPy path it holds a boolean mask (a quarter of float32's
memory).

On the kernel path (``kernels/activation.cu``) each pass is one launch, a thread per element, and
all three keep ``y``: the backward kernels read it (ReLU's as ``y > 0``). In a network ``y`` is
the next layer's input and is kept alive anyway, so this cache costs no memory of its own.
"""

import numpy

from .. import backend
from ..cuda.launch import element_count, launch
from .base import Layer, check_array, routed_gradient


def as_array(result):
    """A 0-d array where NumPy's arithmetic on a 0-d input gave a scalar, which the next layer
    (checking for arrays) would refuse."""
    return numpy.asarray(result) if isinstance(result, numpy.generic) else result


class _Elementwise(Layer):
    """What the three share: checks, and the kernel path, which differs only in the kernels' names."""

    input_names = ("x",)
    #: the prefix of this activation's kernels in activation.cu: <kernel>_forward, <kernel>_backward
    kernel = None

    def __repr__(self):
        return f"{type(self).__name__}()"

    def forward(self, x):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        check_array(x, type(self).__name__, "input x")
        return as_array(self.run_forward(x))

    def backward(self, grad_output):
        return as_array(self.run_backward(grad_output))

    def forward_gpu(self, x):
        """x C-contiguous, any shape -> y of x's shape; the cache is y."""
        y = backend.get_array_module(x).empty_like(x)
        launch("activation", f"{self.kernel}_forward", x.dtype, x.size, (x, y, element_count(x.size)))
        return y, y

    def backward_gpu(self, grad_output):
        """dy C-contiguous -> dx, a new array (dy is not overwritten)."""
        dx = backend.get_array_module(grad_output).empty_like(grad_output)
        launch("activation", f"{self.kernel}_backward", grad_output.dtype, grad_output.size,
               (grad_output, self.cache, dx, element_count(grad_output.size)))
        return dx


class ReLU(_Elementwise):
    """``y = max(x, 0)``; x and y of any shape. The cache is the mask ``x > 0`` (NumPy path) or y (kernels)."""

    kernel = "relu"

    def forward_cpu(self, x):
        positive = x > 0
        return numpy.maximum(x, 0), positive

    def backward_cpu(self, grad_output):
        return routed_gradient(grad_output, self.cache)


class Sigmoid(_Elementwise):
    """``y = 1 / (1 + exp(-x))``, computed without overflow for large ``|x|``; the cache is ``y``."""

    kernel = "sigmoid"

    def forward_cpu(self, x):
        # exp of a non-positive number never overflows: with e = e^-|x| in (0, 1], the sigmoid is
        # a = 1 / (1 + e) where x >= 0 and b = e / (1 + e) where x < 0. Since a >= 1/2 >= b, the
        # choice is max(a, b) for x >= 0 and min(a, b) = -max(-a, -b) for x < 0, that is
        # |max(copysign(a, x), copysign(b, x))|: exact, and five times faster than numpy.where,
        # which crawls when the signs of x are mixed at random. (out= keeps a 0-d x an array:
        # NumPy's ufuncs return scalars for 0-d inputs, which the out= calls below cannot fill.)
        e = numpy.abs(x, out=numpy.empty_like(x))
        numpy.negative(e, out=e)
        numpy.exp(e, out=e)
        denominator = numpy.add(e, 1, out=numpy.empty_like(e))
        a = numpy.divide(1, denominator, out=numpy.empty_like(e))
        b = numpy.divide(e, denominator, out=e)
        numpy.copysign(a, x, out=a)
        numpy.copysign(b, x, out=b)
        y = numpy.maximum(a, b, out=a)
        return numpy.abs(y, out=y), y

    def backward_cpu(self, grad_output):
        y = self.cache
        return grad_output * y * (1 - y)


class Tanh(_Elementwise):
    """``y = tanh(x)``; the cache is ``y``."""

    kernel = "tanh"

    def forward_cpu(self, x):
        y = numpy.tanh(x)
        return y, y

    def backward_cpu(self, grad_output):
        y = self.cache
        return grad_output * (1 - y * y)
