"""The naive twins: every layer written as loops that read like its equation.

These are the oracles the fast paths are tested against, and what a student reads first. Each
class has exactly the API of its fast twin (same constructor, ``params``, ``grads``, ``forward``,
``backward``) and overrides only ``forward_cpu`` / ``backward_cpu`` with plain Python loops, so a
test can copy parameters from one to the other and compare. They are slow: use them on small
arrays only.
"""

import numpy

from . import activations, conv, pool
from .im2col import conv_output_size


# -- convolution ----------------------------------------------------------------------------------

def _pad(x, padding):
    return numpy.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


class Conv2d(conv.Conv2d):
    """y[n, o, oy, ox] = b[o] + sum_{c,i,j} w[o, c, i, j] * xpad[n, c, oy*s + i, ox*s + j], one output at a time."""

    def forward_cpu(self, x):
        w, s, k, p = self.params["weight"], self.stride, self.kernel_size, self.padding
        xpad = _pad(x, p)
        n, _, height, width = x.shape
        out_height, out_width = conv_output_size(height, k, s, p), conv_output_size(width, k, s, p)
        y = numpy.zeros((n, self.out_channels, out_height, out_width), dtype=x.dtype)
        for image in range(n):
            for o in range(self.out_channels):
                for oy in range(out_height):
                    for ox in range(out_width):
                        patch = xpad[image, :, oy * s:oy * s + k, ox * s:ox * s + k]
                        y[image, o, oy, ox] = numpy.sum(w[o] * patch)
        return self.add_bias(y), x

    def backward_cpu(self, dy):
        x = self.cache
        w, s, k, p = self.params["weight"], self.stride, self.kernel_size, self.padding
        xpad = _pad(x, p)
        dxpad = numpy.zeros_like(xpad)
        dw = numpy.zeros_like(w)
        for image, o, oy, ox in numpy.ndindex(*dy.shape):
            window = (image, slice(None), slice(oy * s, oy * s + k), slice(ox * s, ox * s + k))
            dxpad[window] += dy[image, o, oy, ox] * w[o]  # each output pixel sends its gradient back to its patch
            dw[o] += dy[image, o, oy, ox] * xpad[window]
        self.accumulate_grad("weight", dw)
        self.accumulate_bias_grad(dy)
        return dxpad[:, :, p:p + x.shape[2], p:p + x.shape[3]].copy()


class ConvTranspose2d(conv.ConvTranspose2d):
    """Each input pixel x[n, c, iy, ix] paints ``x * w[c]`` (O, k, k) at (iy*s - p, ix*s - p); overlaps add."""

    def forward_cpu(self, x):
        w, s, k, p = self.params["weight"], self.stride, self.kernel_size, self.padding
        n, _, out_height, out_width = self.output_shape(x.shape)
        ypad = numpy.zeros((n, self.out_channels, out_height + 2 * p, out_width + 2 * p), dtype=x.dtype)
        for image, c, iy, ix in numpy.ndindex(*x.shape):
            ypad[image, :, iy * s:iy * s + k, ix * s:ix * s + k] += x[image, c, iy, ix] * w[c]
        return self.add_bias(ypad[:, :, p:p + out_height, p:p + out_width].copy()), x

    def backward_cpu(self, dy):
        x = self.cache
        w, s, k, p = self.params["weight"], self.stride, self.kernel_size, self.padding
        dypad = _pad(dy, p)
        dx = numpy.zeros_like(x)
        dw = numpy.zeros_like(w)
        for image, c, iy, ix in numpy.ndindex(*x.shape):
            window = dypad[image, :, iy * s:iy * s + k, ix * s:ix * s + k]
            dx[image, c, iy, ix] = numpy.sum(window * w[c])
            dw[c] += x[image, c, iy, ix] * window
        self.accumulate_grad("weight", dw)
        self.accumulate_bias_grad(dy)
        return dx


# -- pooling and activations ---------------------------------------------------------------------

class MaxPool2d(pool.MaxPool2d):
    """Scan every window in row-major order; the first strictly larger value becomes the winner."""

    def forward_cpu(self, x):
        k, s = self.kernel_size, self.stride
        y_shape = self.output_shape(x.shape)
        y = numpy.zeros(y_shape, dtype=x.dtype)
        winner = numpy.zeros(y_shape + (2,), dtype=numpy.int64)  # (row, column) in x of each maximum
        for image, c, oy, ox in numpy.ndindex(*y_shape):
            best = None
            for i in range(k):
                for j in range(k):
                    value = x[image, c, oy * s + i, ox * s + j]
                    if best is None or value > best:
                        best = value
                        winner[image, c, oy, ox] = (oy * s + i, ox * s + j)
            y[image, c, oy, ox] = best
        return y, (winner, x.shape)

    def backward_cpu(self, dy):
        winner, x_shape = self.cache
        dx = numpy.zeros(x_shape, dtype=dy.dtype)
        for image, c, oy, ox in numpy.ndindex(*dy.shape):
            row, column = winner[image, c, oy, ox]
            dx[image, c, row, column] += dy[image, c, oy, ox]
        return dx


class ReLU(activations.ReLU):
    def forward_cpu(self, x):
        y = numpy.zeros_like(x)
        for index in numpy.ndindex(*x.shape):
            y[index] = x[index] if x[index] > 0 else 0
        return y, x

    def backward_cpu(self, dy):
        x = self.cache
        dx = numpy.zeros_like(dy)
        for index in numpy.ndindex(*dy.shape):
            dx[index] = dy[index] if x[index] > 0 else 0
        return dx


class Sigmoid(activations.Sigmoid):
    def forward_cpu(self, x):
        y = numpy.zeros_like(x)
        for index in numpy.ndindex(*x.shape):
            y[index] = 1 / (1 + numpy.exp(-x[index])) if x[index] >= 0 else numpy.exp(x[index]) / (1 + numpy.exp(x[index]))
        return y, y

    def backward_cpu(self, dy):
        y = self.cache
        dx = numpy.zeros_like(dy)
        for index in numpy.ndindex(*dy.shape):
            dx[index] = dy[index] * y[index] * (1 - y[index])
        return dx


class Tanh(activations.Tanh):
    def forward_cpu(self, x):
        y = numpy.zeros_like(x)
        for index in numpy.ndindex(*x.shape):
            y[index] = numpy.tanh(x[index])
        return y, y

    def backward_cpu(self, dy):
        y = self.cache
        dx = numpy.zeros_like(dy)
        for index in numpy.ndindex(*dy.shape):
            dx[index] = dy[index] * (1 - y[index] ** 2)
        return dx


# -- losses ---------------------------------------------------------------------------------------
# (The losses live in minirnng.losses; their naive twins live here with the others.)

from .. import losses  # noqa: E402  (after the layers: losses imports layers.base)


class SoftmaxCrossEntropy(losses.SoftmaxCrossEntropy):
    """One pixel at a time: -log softmax(z)[t], weighted, summed, divided by the summed weights."""

    def forward_cpu(self, logits, target, mask):
        n, k, height, width = logits.shape
        grad = numpy.zeros_like(logits)
        total, weight_sum = 0.0, 0.0
        for image, y, x in numpy.ndindex(n, height, width):
            t = int(target[image, y, x])
            if (mask is not None and not mask[image, y, x]) or t == self.ignore_index:
                continue
            z = logits[image, :, y, x].astype(numpy.float64)
            p = numpy.exp(z - z.max()) / numpy.exp(z - z.max()).sum()
            w = 1.0 if self.class_weights is None else float(self.class_weights[t])
            total += w * -numpy.log(p[t])
            weight_sum += w
            onehot = numpy.zeros(k)
            onehot[t] = 1
            grad[image, :, y, x] = w * (p - onehot)
        return (total / weight_sum if weight_sum else 0.0), (grad, weight_sum)

    def backward_cpu(self, grad_output):
        grad, weight_sum = self.cache
        return grad * (grad_output / weight_sum) if weight_sum else numpy.zeros_like(grad)


class SigmoidBinaryCrossEntropy(losses.SigmoidBinaryCrossEntropy):
    """One pixel at a time: -t log s - (1 - t) log(1 - s), with s computed from e^{-|z|}."""

    def forward_cpu(self, logits, target, mask):
        grad = numpy.zeros_like(logits)
        total, count = 0.0, 0
        for index in numpy.ndindex(*logits.shape):
            if mask is not None and not mask[index]:
                continue
            z, t = float(logits[index]), float(target[index])
            s = 1 / (1 + numpy.exp(-z)) if z >= 0 else numpy.exp(z) / (1 + numpy.exp(z))
            # log s and log(1 - s) without taking the log of a number that rounded to 0
            log_s = -numpy.log1p(numpy.exp(-abs(z))) + min(z, 0)
            log_not_s = -numpy.log1p(numpy.exp(-abs(z))) - max(z, 0)
            total += -t * log_s - (1 - t) * log_not_s
            count += 1
            grad[index] = s - t
        return (total / count if count else 0.0), (grad, count)

    def backward_cpu(self, grad_output):
        grad, count = self.cache
        return grad * (grad_output / count) if count else numpy.zeros_like(grad)
