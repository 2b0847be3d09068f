"""Elementwise activations: ReLU, sigmoid and tanh, on arrays of any shape.

    ReLU     y = max(x, 0)            dx = dy * [x > 0]        (the kink at 0 gets slope 0, as PyTorch)
    Sigmoid  y = 1 / (1 + e^-x)       dx = dy * y * (1 - y)
    Tanh     y = tanh(x)              dx = dy * (1 - y^2)

Sigmoid and tanh express their derivative through the output, so the cache holds ``y``; ReLU
needs only the sign pattern, so it holds a boolean mask (a quarter of float32's memory).
"""

import numpy

from .base import Layer, check_array


class _Elementwise(Layer):
    input_names = ("x",)

    def __repr__(self):
        return f"{type(self).__name__}()"

    def forward(self, x):
        check_array(x, type(self).__name__, "input x")
        return self.run_forward(x)

    def backward(self, grad_output):
        return self.run_backward(grad_output)


class ReLU(_Elementwise):
    """``y = max(x, 0)``; x and y of any shape. The cache is the mask ``x > 0``."""

    def forward_cpu(self, x):
        positive = x > 0
        return numpy.maximum(x, 0), positive

    def backward_cpu(self, grad_output):
        return grad_output * self.cache


class Sigmoid(_Elementwise):
    """``y = 1 / (1 + exp(-x))``, computed without overflow for large ``|x|``; the cache is ``y``."""

    def forward_cpu(self, x):
        # exp of a non-positive number never overflows: use e^-|x| on both branches.
        decay = numpy.exp(-numpy.abs(x))
        y = numpy.where(x >= 0, 1 / (1 + decay), decay / (1 + decay)).astype(x.dtype, copy=False)
        return y, y

    def backward_cpu(self, grad_output):
        y = self.cache
        return grad_output * y * (1 - y)


class Tanh(_Elementwise):
    """``y = tanh(x)``; the cache is ``y``."""

    def forward_cpu(self, x):
        y = numpy.tanh(x)
        return y, y

    def backward_cpu(self, grad_output):
        y = self.cache
        return grad_output * (1 - y * y)
