"""The naive twins: every layer written as loops that read like its equation.

These are the oracles the fast paths are tested against, and what a student reads first. Each
class has exactly the API of its fast twin (same constructor, ``params``, ``grads``, ``forward``,
``backward``) and overrides only ``forward_cpu`` / ``backward_cpu`` with plain Python loops, so a
test can copy parameters from one to the other and compare. They are slow: use them on small
arrays only.
"""

import numpy

from . import activations, conv, normalization, pool
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
    """Scan every window in row-major order; the first strictly larger value (or the first NaN)
    becomes the winner."""

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
                    # NaN compares false with everything: the first NaN wins and stays, as in the kernel
                    if best is None or value > best or (value != value and best == best):
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


# -- batch normalisation --------------------------------------------------------------------------

class BatchNorm2d(normalization.BatchNorm2d):
    """One channel at a time: its N*H*W values, their mean and variance, then each value normalised
    (and, backward, each value's gradient from the channel's two sums)."""

    def forward_cpu(self, x):
        n, channels, height, width = x.shape
        count = n * height * width
        y, xhat = numpy.zeros_like(x), numpy.zeros_like(x)
        means, variances, inverse_std = numpy.zeros(channels), numpy.zeros(channels), numpy.zeros(channels)
        for c in range(channels):
            values = [float(x[image, c, row, column]) for image, row, column in numpy.ndindex(n, height, width)]
            means[c] = sum(values) / count
            variances[c] = sum((value - means[c]) ** 2 for value in values) / count
            inverse_std[c] = 1 / numpy.sqrt(variances[c] + self.eps)
            for image, row, column in numpy.ndindex(n, height, width):
                xhat[image, c, row, column] = (x[image, c, row, column] - means[c]) * inverse_std[c]
                y[image, c, row, column] = self.params["weight"][c] * xhat[image, c, row, column] + self.params["bias"][c]
        self.update_statistics(means, variances)
        return y, (xhat, inverse_std)

    def backward_cpu(self, dy):
        xhat, inverse_std = self.cache
        n, channels, height, width = dy.shape
        count = n * height * width
        dx = numpy.zeros_like(dy)
        for c in range(channels):
            pixels = list(numpy.ndindex(n, height, width))
            sum_dy = sum(float(dy[image, c, row, column]) for image, row, column in pixels)
            sum_dy_xhat = sum(float(dy[image, c, row, column] * xhat[image, c, row, column])
                              for image, row, column in pixels)
            self.grads["weight"][c] += sum_dy_xhat
            self.grads["bias"][c] += sum_dy
            for image, row, column in pixels:
                dx[image, c, row, column] = self.params["weight"][c] * inverse_std[c] * (
                    dy[image, c, row, column] - sum_dy / count - xhat[image, c, row, column] * sum_dy_xhat / count)
        return dx


# -- losses ---------------------------------------------------------------------------------------
# (The losses live in minirnng.losses; their naive twins live here with the others.)

from .. import losses  # noqa: E402  (after the layers: losses imports layers.base)


def used_pixel_softmax(logits, target, mask, ignore_index):
    """Every pixel a loss on class scores uses (inside the mask, target not the ignore index), one
    at a time: yields ``((image, y, x), target, softmax of its logits in float64)``."""
    n, _, height, width = logits.shape
    for image, y, x in numpy.ndindex(n, height, width):
        t = int(target[image, y, x])
        if (mask is not None and not mask[image, y, x]) or t == ignore_index:
            continue
        z = logits[image, :, y, x].astype(numpy.float64)
        yield (image, y, x), t, numpy.exp(z - z.max()) / numpy.exp(z - z.max()).sum()


class SoftmaxCrossEntropy(losses.SoftmaxCrossEntropy):
    """One pixel at a time: -log softmax(z)[t], weighted, summed, divided by the summed weights."""

    def forward_cpu(self, logits, target, mask):
        k = logits.shape[1]
        grad = numpy.zeros_like(logits)
        total, weight_sum = 0.0, 0.0
        for (image, y, x), t, p in used_pixel_softmax(logits, target, mask, self.ignore_index):
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


class SoftDice(losses.SoftDice):
    """One pixel at a time: the sums I_k and S_k over the pixels used, then
    dL/dz = p * (g - p . g) with g = dL/dp, the chain rule through the softmax as written."""

    def forward_cpu(self, logits, target, mask):
        k = logits.shape[1]
        intersection, size = numpy.zeros(k), numpy.zeros(k)
        pixels = []  # (index, p, onehot) of every pixel used
        for index, t, p in used_pixel_softmax(logits, target, mask, self.ignore_index):
            onehot = numpy.zeros(k)
            onehot[t] = 1
            intersection += p * onehot
            size += p + onehot
            pixels.append((index, p, onehot))
        dice = (2 * intersection + self.smooth) / (size + self.smooth)
        return 1 - dice.mean(), (logits.shape, logits.dtype, pixels, dice, size)

    def backward_cpu(self, grad_output):
        shape, dtype, pixels, dice, size = self.cache
        k = shape[1]
        grad = numpy.zeros(shape, dtype=dtype)
        for (image, y, x), p, onehot in pixels:
            g = -grad_output * (2 * onehot - dice) / (k * (size + self.smooth))
            grad[image, :, y, x] = p * (g - p @ g)
        return grad


class ColourAffinity(losses.ColourAffinity):
    """One pair of neighbours at a time: for every pixel and each of its 8-connected neighbours
    after it, w (1 - p_i . p_j) added to the loss and -w p_j, -w p_i to the two slopes g; then
    dL/dz = p * (g - p . g)."""

    def pairs(self, height, width):
        """((y, x), (y + dy, x + dx), spatial weight) for every pair of 8-connected pixels, once."""
        for y in range(height):
            for x in range(width):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        after = dy > 0 or (dy == 0 and dx > 0)
                        if after and 0 <= y + dy < height and 0 <= x + dx < width:
                            spatial = numpy.exp(-(dy * dy + dx * dx) / (2 * self.s_xy ** 2))
                            yield (y, x), (y + dy, x + dx), spatial

    def forward_cpu(self, logits, images):
        n, k, height, width = logits.shape
        z = logits.astype(numpy.float64)
        p = numpy.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        total, slopes = 0.0, numpy.zeros_like(p)
        for image in range(n):
            for (yi, xi), (yj, xj), spatial in self.pairs(height, width):
                colour = numpy.sum((images[image, :, yi, xi].astype(numpy.float64) - images[image, :, yj, xj]) ** 2)
                w = spatial * numpy.exp(-colour / (2 * self.s_rgb ** 2))
                pi, pj = p[image, :, yi, xi], p[image, :, yj, xj]
                total += w * (1 - pi @ pj)
                slopes[image, :, yi, xi] -= w * pj
                slopes[image, :, yj, xj] -= w * pi
        pixels = n * height * width
        return total / pixels, (p, slopes / pixels, logits.dtype)

    def backward_cpu(self, grad_output):
        p, slopes, dtype = self.cache
        grad = numpy.zeros_like(p)
        for image, y, x in numpy.ndindex(p.shape[0], p.shape[2], p.shape[3]):
            pixel, g = p[image, :, y, x], grad_output * slopes[image, :, y, x]
            grad[image, :, y, x] = pixel * (g - pixel @ g)
        return grad.astype(dtype)


# -- spatial recurrent layers (paper eq. 1 and 3) ----------------------------------------------------
from . import recurrent  # noqa: E402  (kept with the section it serves)

# The pixel that comes before (y, j) in each direction is (y - dy, j - dj).
SCAN_STEP = {"left_to_right": (0, 1), "right_to_left": (0, -1), "top_to_bottom": (1, 0), "bottom_to_top": (-1, 0)}


def scan_order(height, width, direction):
    """Every pixel ``(y, j)`` of a ``height x width`` plane with its predecessor, predecessors first.

    Yields ``((y, j), previous)``; ``previous`` is the pixel just before ``(y, j)`` along the scan
    (the left neighbour for ``left_to_right``, the one below for ``bottom_to_top``, ...), or None
    where the scan starts.
    """
    dy, dj = SCAN_STEP[direction]
    rows = list(range(height)) if dy >= 0 else list(reversed(range(height)))
    columns = list(range(width)) if dj >= 0 else list(reversed(range(width)))
    for y in rows:
        for j in columns:
            py, pj = y - dy, j - dj
            inside = 0 <= py < height and 0 <= pj < width
            yield (y, j), ((py, pj) if inside else None)


def gated_recurrent_term(h, W, b, n, c, previous):
    """``b[c] + sum_d W[c, d] * h[n, d, previous]``: channel c of what eq. 3 gates at a pixel, from
    the hidden state at the pixel ``previous`` before it in the scan (``b[c]`` alone at a line's start)."""
    term = b[c]
    if previous is not None:
        py, pj = previous
        for d in range(W.shape[1]):
            term += W[c, d] * h[n, d, py, pj]
    return term


def gated_recurrence(x, g, W, b, direction):
    """Eq. 3: ``h[:, p] = x[:, p] + g[:, p] * (W @ h[:, previous] + b)``, ``h[:, previous] = 0`` at the start.

    x, g : (N, C, H, W). W : (C, C). b : (C,). Returns h : (N, C, H, W).
    """
    images, channels, height, width = x.shape
    h = numpy.zeros_like(x)
    for n in range(images):
        for (y, j), previous in scan_order(height, width, direction):
            for c in range(channels):
                recurrent_term = gated_recurrent_term(h, W, b, n, c, previous)
                h[n, c, y, j] = x[n, c, y, j] + g[n, c, y, j] * recurrent_term
    return h


def gated_recurrence_backward(dh, h, g, W, b, direction):
    """Back-propagation through :func:`gated_recurrence`, visiting the pixels in reverse scan order.

    Returns ``(dx, dg, dW, db)``. ``delta`` holds dL/dh; it is complete at a pixel once every later
    pixel has sent back its share ``W[c, d] * u`` (``u`` being the gradient that reaches the
    recurrent term ``W @ h[:, previous] + b``), so it is final when the reverse scan arrives there.
    """
    images, channels, height, width = dh.shape
    delta = dh.copy()
    dg = numpy.zeros_like(g)
    dW = numpy.zeros_like(W)
    db = numpy.zeros_like(b)
    for n in range(images):
        for (y, j), previous in reversed(list(scan_order(height, width, direction))):
            for c in range(channels):
                recurrent_term = gated_recurrent_term(h, W, b, n, c, previous)
                dg[n, c, y, j] = delta[n, c, y, j] * recurrent_term
                u = g[n, c, y, j] * delta[n, c, y, j]
                db[c] += u
                if previous is not None:
                    py, pj = previous
                    for d in range(channels):
                        dW[c, d] += u * h[n, d, py, pj]
                        delta[n, d, py, pj] += W[c, d] * u
    return delta, dg, dW, db


def plain_recurrence(x, W, b, direction, activation):
    """Eq. 1: ``h[:, p] = theta(x[:, p] + W @ h[:, previous] + b)``, theta = tanh or the identity."""
    images, channels, height, width = x.shape
    h = numpy.zeros_like(x)
    for n in range(images):
        for (y, j), previous in scan_order(height, width, direction):
            for c in range(channels):
                a = x[n, c, y, j] + b[c]
                if previous is not None:
                    py, pj = previous
                    for d in range(channels):
                        a += W[c, d] * h[n, d, py, pj]
                h[n, c, y, j] = numpy.tanh(a) if activation == "tanh" else a
    return h


def plain_recurrence_backward(dh, h, W, direction, activation):
    """Back-propagation through :func:`plain_recurrence` (eq. 2 with ``W`` transposed): ``(dx, dW, db)``.

    ``grad_h`` collects dL/dh; at each pixel, in reverse scan order, ``delta = theta'(a) * grad_h``
    (``tanh'(a) = 1 - h**2``) is dL/da = dL/dx, and sends ``W[c, d] * delta`` back to the predecessor.
    """
    images, channels, height, width = dh.shape
    grad_h = dh.copy()
    dx = numpy.zeros_like(dh)
    dW = numpy.zeros_like(W)
    db = numpy.zeros(channels, dtype=dh.dtype)
    for n in range(images):
        for (y, j), previous in reversed(list(scan_order(height, width, direction))):
            for c in range(channels):
                slope = 1 - h[n, c, y, j] ** 2 if activation == "tanh" else 1
                delta = slope * grad_h[n, c, y, j]
                dx[n, c, y, j] = delta
                db[c] += delta
                if previous is not None:
                    py, pj = previous
                    for d in range(channels):
                        dW[c, d] += delta * h[n, d, py, pj]
                        grad_h[n, d, py, pj] += W[c, d] * delta
    return dx, dW, db


class GatedSpatialRNN(recurrent.GatedSpatialRNN):
    """Eq. 3 one pixel and one channel at a time; see :func:`gated_recurrence`."""

    def forward_cpu(self, x, g):
        h = gated_recurrence(x, g, self.params["W"], self.params["b"], self.direction)
        return h, (h, g)

    def backward_cpu(self, dh):
        h, g = self.cache
        dx, dg, dW, db = gated_recurrence_backward(dh, h, g, self.params["W"], self.params["b"], self.direction)
        self.accumulate_grad("W", dW)
        self.accumulate_grad("b", db)
        return dx, dg


def max_merge(outputs):
    """Pixel by pixel, the largest of the four directions' outputs (the first on a tie, and the
    first NaN where there is one) and its index."""
    merged = numpy.zeros_like(outputs[0])
    winner = numpy.zeros(merged.shape, dtype=numpy.int64)
    for index in numpy.ndindex(*merged.shape):
        best = 0
        for k in range(1, len(outputs)):
            value, best_value = outputs[k][index], outputs[best][index]
            # strictly larger: a tie stays with the first; NaN compares false with everything, so
            # the first NaN takes the pixel and keeps it, as in the fast merge and the kernel
            if value > best_value or (value != value and best_value == best_value):
                best = k
        winner[index] = best
        merged[index] = outputs[best][index]
    return merged, winner


def route_to_winner(dh, winner, k):
    """``dh`` where direction ``k`` won the maximum, 0 elsewhere."""
    routed = numpy.zeros_like(dh)
    for index in numpy.ndindex(*dh.shape):
        if winner[index] == k:
            routed[index] = dh[index]
    return routed


class FourWayGatedRNN(recurrent.FourWayGatedRNN):
    """The four directions of eq. 3, then, pixel by pixel, the largest output (the first on a tie)."""

    def forward_cpu(self, x, g):
        outputs = [gated_recurrence(x, g, self.params[f"{direction}.W"], self.params[f"{direction}.b"], direction)
                   for direction in recurrent.DIRECTIONS]
        merged, winner = max_merge(outputs)
        return merged, (outputs, winner, g)

    def backward_cpu(self, dh):
        outputs, winner, g = self.cache
        dx = numpy.zeros_like(dh)
        dg = numpy.zeros_like(dh)
        for k, direction in enumerate(recurrent.DIRECTIONS):
            W, b = self.params[f"{direction}.W"], self.params[f"{direction}.b"]
            dx_k, dg_k, dW, db = gated_recurrence_backward(route_to_winner(dh, winner, k), outputs[k], g, W, b,
                                                           direction)
            self.accumulate_grad(f"{direction}.W", dW)
            self.accumulate_grad(f"{direction}.b", db)
            dx += dx_k
            dg += dg_k
        return dx, dg


class SpatialRNN(recurrent.SpatialRNN):
    """Eq. 1 one pixel and one channel at a time; see :func:`plain_recurrence`."""

    def forward_cpu(self, x):
        h = plain_recurrence(x, self.params["W"], self.params["b"], self.direction, self.activation)
        return h, h

    def backward_cpu(self, dh):
        dx, dW, db = plain_recurrence_backward(dh, self.cache, self.params["W"], self.direction, self.activation)
        self.accumulate_grad("W", dW)
        self.accumulate_grad("b", db)
        return dx


class FourWaySpatialRNN(recurrent.FourWaySpatialRNN):
    """The four directions of eq. 1, then, pixel by pixel, the largest output (the first on a tie)."""

    def forward_cpu(self, x):
        activation = self.direction_layers[recurrent.DIRECTIONS[0]].activation
        outputs = [plain_recurrence(x, self.params[f"{direction}.W"], self.params[f"{direction}.b"], direction,
                                    activation) for direction in recurrent.DIRECTIONS]
        merged, winner = max_merge(outputs)
        return merged, (outputs, winner)

    def backward_cpu(self, dh):
        outputs, winner = self.cache
        activation = self.direction_layers[recurrent.DIRECTIONS[0]].activation
        dx = numpy.zeros_like(dh)
        for k, direction in enumerate(recurrent.DIRECTIONS):
            dx_k, dW, db = plain_recurrence_backward(route_to_winner(dh, winner, k), outputs[k],
                                                     self.params[f"{direction}.W"], direction, activation)
            self.accumulate_grad(f"{direction}.W", dW)
            self.accumulate_grad(f"{direction}.b", db)
            dx += dx_k
        return dx
