"""What the kernel tests share: the launch sequences, written once for either device, and plain
NumPy references for every kernel.

The launch functions take arrays of one device (NumPy arrays run on the CUDA emulator, CuPy
arrays on the GPU) and launch the kernels exactly as a layer's GPU path does: allocation with the
arrays' own module, scalars as numpy.int32 / float32 / float64, grids from blocks_for. The
references are written independently of the kernels (slicing, loops over steps, einsum) and
computed in float64, so that a test measures the kernel's error and nothing else.

Imported by test_cuda_emulator.py and test_cuda_gpu.py (pytest puts tests/ on sys.path).
"""

import numpy
from scipy.special import expit

from minirnng import backend
from minirnng.cuda import THREADS_PER_BLOCK, blocks_for, get_kernel, scan_geometry

i32 = numpy.int32


def assert_close(actual, expected):
    """Equal within 1e-6 (float32) or 1e-12 (float64) of the reference's largest magnitude.

    (A tolerance relative to each element alone would demand the impossible of elements that are
    sums cancelling to nearly zero.)"""
    actual = backend.to_numpy(actual)
    expected = numpy.asarray(backend.to_numpy(expected), dtype=numpy.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol = 1e-6 if actual.dtype == numpy.float32 else 1e-12
    scale = float(numpy.nanmax(numpy.abs(expected), initial=0.0))
    numpy.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))


def normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def directional_derivative(function, point, direction, step=1e-5):
    """(f(point + step*direction) - f(point - step*direction)) / (2*step): a central difference."""
    return (function(point + step * direction) - function(point - step * direction)) / (2 * step)


def _launch(source, name, dtype, work_items, args, directions=None):
    grid = (blocks_for(work_items),) if directions is None else (blocks_for(work_items), directions)
    get_kernel(source, name, dtype)(grid, (THREADS_PER_BLOCK,), args)


# ---- convolution: im2col / col2im / bias -------------------------------------------------------

def output_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def im2col(x, k, s, p):
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    cols = xp.empty((N, C * k * k, Ho * Wo), dtype=x.dtype)
    _launch("im2col", "im2col", x.dtype, cols.size,
            (x, cols, i32(N), i32(C), i32(H), i32(W), i32(k), i32(s), i32(p), i32(Ho), i32(Wo)))
    return cols


def col2im(cols, image_shape, k, s, p, bias=None):
    """The adjoint of im2col, plus ``bias[c]`` on channel c when a bias (C,) is given."""
    xp = backend.get_array_module(cols)
    N, C, H, W = image_shape
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    x = xp.empty(image_shape, dtype=cols.dtype)
    _launch("im2col", "col2im", cols.dtype, x.size,
            (cols, bias, x, i32(N), i32(C), i32(H), i32(W), i32(k), i32(s), i32(p), i32(Ho), i32(Wo)))
    return x


def bias_add(y, b):
    """y + b[channel] for y (N, C, P), on a copy (the kernel works in place)."""
    out = y.copy()
    N, C, P = y.shape
    _launch("bias", "bias_add", y.dtype, y.size, (out, b, i32(N), i32(C), i32(P)))
    return out


def channel_sum(x, chunks=None):
    """(N, C, P) -> (C,) in the two passes of reduce.cu."""
    xp = backend.get_array_module(x)
    N, C, P = x.shape
    chunks = min(1024, N * P) if chunks is None else chunks
    partial = xp.empty((C, chunks), dtype=x.dtype)
    out = xp.empty((C,), dtype=x.dtype)
    _launch("reduce", "channel_sum_partial", x.dtype, C * chunks, (x, partial, i32(N), i32(C), i32(P), i32(chunks)))
    _launch("reduce", "channel_sum_finish", x.dtype, C, (partial, out, i32(C), i32(chunks)))
    return out


def sum_first_axis(x):
    xp = backend.get_array_module(x)
    out = xp.empty(x.shape[1:], dtype=x.dtype)
    _launch("reduce", "sum_first_axis", x.dtype, out.size, (x, out, i32(x.shape[0]), i32(out.size)))
    return out


def reference_im2col(x, k, s, p):
    N, C, H, W = x.shape
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    padded = numpy.pad(x.astype(numpy.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    cols = numpy.zeros((N, C, k, k, Ho, Wo))
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = padded[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s]
    return cols.reshape(N, C * k * k, Ho * Wo)


def reference_col2im(cols, image_shape, k, s, p):
    N, C, H, W = image_shape
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    padded = numpy.zeros((N, C, H + 2 * p, W + 2 * p))
    blocks = cols.astype(numpy.float64).reshape(N, C, k, k, Ho, Wo)
    for i in range(k):
        for j in range(k):
            padded[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] += blocks[:, :, i, j]
    return padded[:, :, p:p + H, p:p + W]


def conv_direct(x, weight, bias, s, p, transposed=False, relu=False):
    """conv_direct.cu: a convolution (weight (O, C, k, k)) or transposed convolution (weight
    (C, O, k, k)) of x (N, C, H, W), plus ``bias`` (O,) when given, then with ``relu`` a ReLU,
    in one launch."""
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    k = weight.shape[2]
    O = weight.shape[0 if not transposed else 1]
    Ho, Wo = ((H - 1) * s - 2 * p + k, (W - 1) * s - 2 * p + k) if transposed else (output_size(H, k, s, p),
                                                                                    output_size(W, k, s, p))
    y = xp.empty((N, O, Ho, Wo), dtype=x.dtype)
    _launch("conv_direct", "conv_transpose2d_direct" if transposed else "conv2d_direct", x.dtype, y.size,
            (x, weight, bias, y, i32(N), i32(C), i32(H), i32(W), i32(O), i32(k), i32(s), i32(p), i32(Ho), i32(Wo),
             i32(relu)))
    return y


def reference_conv_direct(x, weight, bias, s, p, transposed=False):
    """The same through the slicing references: ``w2 @ im2col(x)``, or ``col2im(w2.T @ x)`` onto
    the transposed convolution's (H-1)*s - 2p + k grid; in float64."""
    N, C, H, W = x.shape
    k = weight.shape[2]
    w = weight.astype(numpy.float64)
    if transposed:
        O = w.shape[1]
        shape = (N, O, (H - 1) * s - 2 * p + k, (W - 1) * s - 2 * p + k)
        y = reference_col2im(numpy.matmul(w.reshape(C, -1).T, x.astype(numpy.float64).reshape(N, C, -1)), shape, k, s, p)
    else:
        O = w.shape[0]
        y = numpy.matmul(w.reshape(O, -1), reference_im2col(x, k, s, p))
        y = y.reshape(N, O, output_size(H, k, s, p), output_size(W, k, s, p))
    return y if bias is None else y + bias.astype(numpy.float64)[:, None, None]


# ---- max pooling ---------------------------------------------------------------------------------

def maxpool(x, k, s):
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    y = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
    argmax = xp.empty((N, C, Ho, Wo), dtype=numpy.int8)
    _launch("maxpool", "maxpool_forward", x.dtype, y.size,
            (x, y, argmax, i32(N), i32(C), i32(H), i32(W), i32(k), i32(s), i32(Ho), i32(Wo)))
    return y, argmax


def maxpool_backward(dy, argmax, image_shape, k, s):
    xp = backend.get_array_module(dy)
    N, C, H, W = image_shape
    _, _, Ho, Wo = dy.shape
    dx = xp.empty(image_shape, dtype=dy.dtype)
    _launch("maxpool", "maxpool_backward", dy.dtype, dx.size,
            (dy, argmax, dx, i32(N), i32(C), i32(H), i32(W), i32(k), i32(s), i32(Ho), i32(Wo)))
    return dx


def reference_maxpool(x, k, s):
    """(y, argmax) with numpy.argmax's rules: the first maximum, or the first NaN."""
    N, C, H, W = x.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    windows = numpy.empty((N, C, Ho, Wo, k * k), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            windows[..., i * k + j] = x[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s]
    argmax = windows.argmax(axis=-1)
    return numpy.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0], argmax


def reference_maxpool_backward(dy, argmax, image_shape, k, s):
    dx = numpy.zeros(image_shape)
    N, C, Ho, Wo = dy.shape
    for oy in range(Ho):
        for ox in range(Wo):
            i, j = numpy.divmod(argmax[:, :, oy, ox], k)
            n, c = numpy.meshgrid(numpy.arange(N), numpy.arange(C), indexing="ij")
            numpy.add.at(dx, (n, c, oy * s + i, ox * s + j), dy[:, :, oy, ox])
    return dx


# ---- activations -----------------------------------------------------------------------------------

def activation(name, x):
    xp = backend.get_array_module(x)
    y = xp.empty_like(x)
    _launch("activation", f"{name}_forward", x.dtype, x.size, (x, y, i32(x.size)))
    return y


def activation_backward(name, dy, y):
    xp = backend.get_array_module(dy)
    dx = xp.empty_like(dy)
    _launch("activation", f"{name}_backward", dy.dtype, dy.size, (dy, y, dx, i32(dy.size)))
    return dx


def reference_activation(name, x):
    x = x.astype(numpy.float64)
    if name == "relu":
        return numpy.maximum(x, 0)
    if name == "sigmoid":
        return expit(x)
    return numpy.tanh(x)


def reference_activation_backward(name, dy, y):
    dy, y = dy.astype(numpy.float64), y.astype(numpy.float64)
    if name == "relu":
        return dy * (y > 0)
    if name == "sigmoid":
        return dy * y * (1 - y)
    return dy * (1 - y * y)


# ---- the recurrent scans and the max merge --------------------------------------------------------

def scan_inputs(rng, shape, directions, dtype):
    """x; gates g in (0, 1), as a sigmoid gives them; per direction a W with row sums of about 0.7
    (training keeps them at most 1, so h stays bounded) and a b."""
    N, C, H, W = shape
    D = len(directions)
    x = normal(rng, shape, dtype)
    g = expit(rng.standard_normal(shape)).astype(dtype)
    weight = normal(rng, (D, C, C), dtype, scale=0.9 / C)
    bias = normal(rng, (D, C), dtype, scale=0.5)
    return x, g, weight, bias


def scan(kind, x, g, weight, bias, directions):
    """h (D, N, C, H, W) of the gated (eq. 3) or tanh (eq. 1) scan; weight (D, C, C), bias (D, C)."""
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    D = len(directions)
    geometry = xp.asarray(scan_geometry(directions, H, W))
    h = xp.empty((D, N, C, H, W), dtype=x.dtype)
    sizes = (i32(D), i32(N), i32(C), i32(H * W))
    if kind == "gated":
        args = (x, g, weight, bias, geometry, h, *sizes)
    else:
        args = (x, weight, bias, geometry, h, *sizes)
    _launch("gated_scan", f"{kind}_scan_forward", x.dtype, N * max(H, W), args, directions=D)
    return h


def scan_backward(kind, dh, g, h, weight, bias, directions):
    """dx and dg summed over the directions, dW (D, C, C) and db (D, C): the whole GPU recipe."""
    xp = backend.get_array_module(dh)
    D, N, C, H, W = dh.shape
    geometry = xp.asarray(scan_geometry(directions, H, W))
    dx = xp.empty_like(dh)
    dg = xp.empty_like(dh)
    e = xp.empty((D, C, N, H, W), dtype=dh.dtype)
    h_prev = xp.empty_like(e)
    sizes = (i32(D), i32(N), i32(C), i32(H * W))
    if kind == "gated":  # without gates (g None) there is no dg either
        args = (dh, g, h, weight, bias, geometry, dx, None if g is None else dg, e, h_prev, *sizes)
    else:
        args = (dh, h, weight, geometry, dx, e, h_prev, *sizes)
    _launch("gated_scan", f"{kind}_scan_backward", dh.dtype, N * max(H, W), args, directions=D)
    pixels = N * H * W
    gradients = {
        "dx": sum_first_axis(dx),
        "dW": xp.matmul(e.reshape(D, C, pixels), h_prev.reshape(D, C, pixels).transpose(0, 2, 1)),
        "db": channel_sum(e.reshape(1, D * C, pixels)).reshape(D, C),
    }
    if kind == "gated" and g is not None:
        gradients["dg"] = sum_first_axis(dg)
    return gradients


def check_scan_against_reference(kind, x, g, weight, bias, directions, h, dh, gradients):
    """Compare a scan's output h (D, N, C, H, W) and its gradients (from scan_backward, for the
    upstream dh) with the step-by-step references, direction by direction. g None means g = 1."""
    gates = numpy.ones_like(x) if g is None else g
    expected = []
    for d, direction in enumerate(directions):
        assert_close(h[d], reference_scan(kind, x, gates, weight[d], bias[d], direction))
        expected.append(reference_scan_backward(kind, dh[d], gates, weight[d], bias[d], h[d], direction))
    assert_close(gradients["dx"], sum(e[0] for e in expected))
    if kind == "gated" and g is not None:
        assert_close(gradients["dg"], sum(e[1] for e in expected))
    assert_close(gradients["dW"], numpy.stack([e[2] for e in expected]))
    assert_close(gradients["db"], numpy.stack([e[3] for e in expected]))


def check_scan_gradients_by_finite_differences(kind, run):
    """The derivative of sum(dh * h) along a random direction, for each of x, g, W and b, against
    the backward's gradients; four directions in one launch, float64. ``run(function, *args)``
    calls a launch function on the device under test and returns NumPy arrays."""
    rng = numpy.random.default_rng(9)
    directions = ["left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top"]
    x, g, weight, bias = scan_inputs(rng, (2, 3, 4, 5), directions, numpy.float64)
    h = run(scan, kind, x, g, weight, bias, directions)
    dh = rng.standard_normal(h.shape)
    gradients = run(scan_backward, kind, dh, g, h, weight, bias, directions)
    inputs = {"x": x, "g": g, "W": weight, "b": bias}
    analytic = {"x": gradients["dx"], "W": gradients["dW"], "b": gradients["db"]}
    if kind == "gated":
        analytic["g"] = gradients["dg"]
    for name, gradient in analytic.items():
        def objective(value, name=name):
            moved = dict(inputs, **{name: value})
            return numpy.vdot(dh, run(scan, kind, moved["x"], moved["g"], moved["W"], moved["b"], directions))
        direction = rng.standard_normal(inputs[name].shape)
        numeric = directional_derivative(objective, inputs[name], direction)
        assert abs(numpy.vdot(gradient, direction) - numeric) <= 1e-7 * abs(numeric), name


def max_merge(h):
    xp = backend.get_array_module(h)
    D, n = h.shape[0], h[0].size
    out = xp.empty(h.shape[1:], dtype=h.dtype)
    winner = xp.empty(h.shape[1:], dtype=numpy.int8)
    _launch("gated_scan", "max_merge_forward", h.dtype, n, (h, out, winner, i32(D), i32(n)))
    return out, winner


def max_merge_backward(dout, winner, directions):
    xp = backend.get_array_module(dout)
    dh = xp.empty((directions,) + dout.shape, dtype=dout.dtype)
    _launch("gated_scan", "max_merge_backward", dout.dtype, dout.size,
            (dout, winner, dh, i32(directions), i32(dout.size)))
    return dh


def _along_rows(a, direction):
    """A view of a (..., H, W) array in which ``direction`` runs along the last axis, forwards."""
    return {"left_to_right": a,
            "right_to_left": a[..., ::-1],
            "top_to_bottom": a.swapaxes(-1, -2),
            "bottom_to_top": a.swapaxes(-1, -2)[..., ::-1]}[direction]


def reference_scan(kind, x, g, W, b, direction):
    """One direction of eq. 3 (gated) or eq. 1 (tanh), step by step, in float64."""
    x, g, W, b = (numpy.asarray(a, dtype=numpy.float64) for a in (x, g, W, b))
    h = numpy.zeros_like(x)
    X, G, Hr = _along_rows(x, direction), _along_rows(g, direction), _along_rows(h, direction)
    previous = numpy.zeros(X.shape[:-1])
    for t in range(X.shape[-1]):
        a = numpy.einsum("ck,nkl->ncl", W, previous) + b[None, :, None]
        Hr[..., t] = X[..., t] + G[..., t] * a if kind == "gated" else numpy.tanh(X[..., t] + a)
        previous = Hr[..., t]
    return h


def reference_scan_backward(kind, dh, g, W, b, h, direction):
    """(dx, dg, dW, db) of one direction by backpropagation through the steps, in float64."""
    dh, g, W, b, h = (numpy.asarray(a, dtype=numpy.float64) for a in (dh, g, W, b, h))
    dx, dg = numpy.zeros_like(dh), numpy.zeros_like(dh)
    dW, db = numpy.zeros_like(W), numpy.zeros_like(b)
    dH, G, Hr = _along_rows(dh, direction), _along_rows(g, direction), _along_rows(h, direction)
    DX, DG = _along_rows(dx, direction), _along_rows(dg, direction)
    carried = numpy.zeros(dH.shape[:-1])  # W^T e_{t+1}
    for t in reversed(range(dH.shape[-1])):
        delta = dH[..., t] + carried
        previous = Hr[..., t - 1] if t > 0 else numpy.zeros_like(delta)
        if kind == "gated":
            e = delta * G[..., t]
            DX[..., t] = delta
            DG[..., t] = delta * (numpy.einsum("ck,nkl->ncl", W, previous) + b[None, :, None])
        else:
            e = delta * (1 - Hr[..., t] ** 2)
            DX[..., t] = e
        dW += numpy.einsum("ncl,nkl->ck", e, previous)
        db += e.sum(axis=(0, 2))
        carried = numpy.einsum("ck,ncl->nkl", W, e)
    return dx, dg, dW, db


# ---- losses ------------------------------------------------------------------------------------------

def loss_inputs(rng, options, dtype, K=5, shape=(2, 3, 7), logit_scale=3.0):
    """logits, int64 targets, and the keyword arguments (mask, class_weights, ignore_index) that
    ``options`` asks for; a fifth of the targets are set to the ignore index when there is one."""
    N, H, W = shape
    logits = normal(rng, (N, K, H, W), dtype, scale=logit_scale)
    targets = rng.integers(0, K, shape).astype(numpy.int64)
    kwargs = {}
    if "ignore_index" in options:
        targets[rng.random(shape) < 0.2] = options["ignore_index"]
        kwargs["ignore_index"] = options["ignore_index"]
    if options.get("mask"):
        kwargs["mask"] = (rng.random(shape) < 0.7).astype(numpy.uint8)
    if options.get("class_weights"):
        kwargs["class_weights"] = rng.uniform(0.2, 2.0, K).astype(dtype)
    return logits, targets, kwargs


def softmax_cross_entropy(logits, targets, mask=None, class_weights=None, ignore_index=-100):
    """totals (2,) = [sum of weighted losses, sum of weights]; the loss is their ratio."""
    xp = backend.get_array_module(logits)
    N, K, H, W = logits.shape
    terms = xp.empty((2, N * H * W), dtype=logits.dtype)
    _launch("softmax_cross_entropy", "softmax_cross_entropy_forward", logits.dtype, N * H * W,
            (logits, targets, mask, class_weights, terms, i32(N), i32(K), i32(H * W), i32(ignore_index)))
    return channel_sum(terms.reshape(1, 2, N * H * W))


def softmax_cross_entropy_backward(logits, targets, totals, scale, mask=None, class_weights=None,
                                   ignore_index=-100):
    xp = backend.get_array_module(logits)
    N, K, H, W = logits.shape
    dlogits = xp.empty_like(logits)
    _launch("softmax_cross_entropy", "softmax_cross_entropy_backward", logits.dtype, N * H * W,
            (logits, targets, mask, class_weights, totals, logits.dtype.type(scale), dlogits,
             i32(N), i32(K), i32(H * W), i32(ignore_index)))
    return dlogits


def sigmoid_bce(logits, targets, mask=None):
    xp = backend.get_array_module(logits)
    n = logits.size
    terms = xp.empty((2, n), dtype=logits.dtype)
    _launch("sigmoid_bce", "sigmoid_bce_forward", logits.dtype, n, (logits, targets, mask, terms, i32(n)))
    return channel_sum(terms.reshape(1, 2, n))


def sigmoid_bce_backward(logits, targets, totals, scale, mask=None):
    xp = backend.get_array_module(logits)
    dlogits = xp.empty_like(logits)
    _launch("sigmoid_bce", "sigmoid_bce_backward", logits.dtype, logits.size,
            (logits, targets, mask, totals, logits.dtype.type(scale), dlogits, i32(logits.size)))
    return dlogits


def soft_dice(logits, targets, mask=None, ignore_index=-100):
    """totals (2K,) = [soft intersections I_k, soft sizes S_k]; the loss is computed from them."""
    xp = backend.get_array_module(logits)
    N, K, H, W = logits.shape
    terms = xp.empty((2 * K, N * H * W), dtype=logits.dtype)
    _launch("soft_dice", "soft_dice_forward", logits.dtype, N * H * W,
            (logits, targets, mask, terms, i32(N), i32(K), i32(H * W), i32(ignore_index)))
    return channel_sum(terms.reshape(1, 2 * K, N * H * W))


def soft_dice_backward(logits, targets, totals, smooth, scale, mask=None, ignore_index=-100):
    xp = backend.get_array_module(logits)
    N, K, H, W = logits.shape
    dlogits = xp.empty_like(logits)
    scalar = logits.dtype.type
    _launch("soft_dice", "soft_dice_backward", logits.dtype, N * H * W,
            (logits, targets, mask, totals, scalar(smooth), scalar(scale), dlogits,
             i32(N), i32(K), i32(H * W), i32(ignore_index)))
    return dlogits


def reference_softmax_cross_entropy(logits, targets, mask=None, class_weights=None, ignore_index=-100,
                                    scale=1.0):
    """(loss sum, weight sum, dlogits) with PyTorch's weighted-mean semantics, in float64."""
    z = logits.astype(numpy.float64)
    largest = z.max(axis=1, keepdims=True)
    log_sum_exp = largest + numpy.log(numpy.exp(z - largest).sum(axis=1, keepdims=True))
    counted = targets != ignore_index
    if mask is not None:
        counted &= mask.astype(bool)
    label = numpy.where(counted, targets, 0)
    picked = numpy.take_along_axis(z, label[:, None], axis=1)
    weight = numpy.ones(targets.shape) if class_weights is None else class_weights.astype(numpy.float64)[label]
    weight = numpy.where(counted, weight, 0.0)
    losses = (log_sum_exp - picked)[:, 0]
    weight_sum = weight.sum()
    onehot = numpy.arange(z.shape[1])[None, :, None, None] == label[:, None]
    probability = numpy.exp(z - log_sum_exp)
    dlogits = scale * weight[:, None] * (probability - onehot) / weight_sum if weight_sum else numpy.zeros_like(z)
    return (weight * losses).sum(), weight_sum, dlogits


def reference_soft_dice(logits, targets, smooth, mask=None, ignore_index=-100, scale=1.0):
    """(totals (2K,), loss, dlogits) of the soft Dice loss, in float64, with the textbook chain rule
    through the softmax, dz = p * (g - sum_k p_k g_k)."""
    z = logits.astype(numpy.float64)
    K = z.shape[1]
    probability = numpy.exp(z - z.max(axis=1, keepdims=True))
    probability /= probability.sum(axis=1, keepdims=True)
    counted = targets != ignore_index
    if mask is not None:
        counted &= mask.astype(bool)
    used = counted[:, None].astype(numpy.float64)
    onehot = (numpy.arange(K)[None, :, None, None] == targets[:, None]) * used
    intersection = (probability * onehot).sum(axis=(0, 2, 3))
    size = (probability * used + onehot).sum(axis=(0, 2, 3))
    dice = (2 * intersection + smooth) / (size + smooth)
    slope = -scale * used * (2 * onehot - dice[:, None, None]) / (K * (size[:, None, None] + smooth))
    dlogits = probability * (slope - (probability * slope).sum(axis=1, keepdims=True))
    return numpy.concatenate([intersection, size]), 1 - dice.mean(), dlogits


def reference_sigmoid_bce(logits, targets, mask=None, scale=1.0):
    z, t = logits.astype(numpy.float64), targets.astype(numpy.float64)
    weight = numpy.ones(z.shape) if mask is None else mask.astype(numpy.float64).reshape(z.shape)
    losses = numpy.logaddexp(0.0, z) - z * t
    weight_sum = weight.sum()
    return (weight * losses).sum(), weight_sum, scale * weight * (expit(z) - t) / weight_sum


def colour_affinity(logits, images, straight, diagonal, colour_scale):
    """terms (1, 1, N*H*W) summed by channel_sum: the loss times N*H*W."""
    xp = backend.get_array_module(logits)
    N, K, H, W = logits.shape
    terms = xp.empty((1, 1, N * H * W), dtype=logits.dtype)
    scalar = logits.dtype.type
    _launch("colour_affinity", "colour_affinity_forward", logits.dtype, N * H * W,
            (logits, images, terms, scalar(straight), scalar(diagonal), scalar(colour_scale),
             i32(N), i32(K), i32(images.shape[1]), i32(H), i32(W)))
    return channel_sum(terms)


def colour_affinity_backward(logits, images, straight, diagonal, colour_scale, scale):
    xp = backend.get_array_module(logits)
    N, K, H, W = logits.shape
    dlogits = xp.empty_like(logits)
    scalar = logits.dtype.type
    _launch("colour_affinity", "colour_affinity_backward", logits.dtype, N * H * W,
            (logits, images, dlogits, scalar(straight), scalar(diagonal), scalar(colour_scale), scalar(scale),
             i32(N), i32(K), i32(images.shape[1]), i32(H), i32(W)))
    return dlogits


def reference_colour_affinity(logits, images, straight, diagonal, colour_scale, scale=1.0):
    """(sum over pairs, dlogits) in float64, by a loop over every ordered pair of 8-connected pixels:
    sum_(i,j) w_ij (1 - p_i . p_j) over each unordered pair once, and the gradient of
    ``scale`` times it through the softmax."""
    z = logits.astype(numpy.float64)
    colours = images.astype(numpy.float64)
    N, K, H, W = z.shape
    p = numpy.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    total = 0.0
    dp = numpy.zeros_like(p)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if (dy, dx) == (0, 0) or not (0 <= ny < H and 0 <= nx < W):
                            continue
                        difference = colours[n, :, y, x] - colours[n, :, ny, nx]
                        w = (diagonal if dy and dx else straight) * numpy.exp(-colour_scale * difference @ difference)
                        total += 0.5 * w * (1 - p[n, :, y, x] @ p[n, :, ny, nx])  # each pair is met twice
                        dp[n, :, y, x] -= scale * w * p[n, :, ny, nx]
    dz = p * (dp - (p * dp).sum(axis=1, keepdims=True))
    return total, dz


# ---- batch normalisation --------------------------------------------------------------------------

def batch_norm(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, track=True):
    """batch_norm.cu's training forward as the layer launches it: the sums, the centred squares,
    the statistics (moving copies of the running statistics when ``track``), the normalisation."""
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    pixels, count, scalar = h * w, n * h * w, x.dtype.type
    chunks = min(1024, count)
    sums = channel_sum(x.reshape(n, c, pixels))
    partial = xp.empty((c, chunks), dtype=x.dtype)
    _launch("batch_norm", "batch_norm_centred_squares", x.dtype, c * chunks,
            (x, sums, partial, i32(n), i32(c), i32(pixels), i32(chunks)))
    squares = xp.empty(c, dtype=x.dtype)
    _launch("reduce", "channel_sum_finish", x.dtype, c, (partial, squares, i32(c), i32(chunks)))
    mean, variance = xp.empty(c, dtype=x.dtype), xp.empty(c, dtype=x.dtype)
    running_mean, running_var = running_mean.copy(), running_var.copy()
    _launch("batch_norm", "batch_norm_statistics", x.dtype, c,
            (sums, squares, mean, variance, running_mean, running_var, i32(c), i32(count), scalar(momentum),
             i32(track)))
    return {**batch_norm_normalize(x, mean, variance, weight, bias, eps, keep_xhat=True), "mean": mean,
            "variance": variance, "running_mean": running_mean, "running_var": running_var}


def batch_norm_normalize(x, mean, variance, weight, bias, eps=1e-5, keep_xhat=False):
    """batch_norm_forward alone: y (and xhat) from given per-channel statistics (inference)."""
    xp = backend.get_array_module(x)
    c, pixels = x.shape[1], x.shape[2] * x.shape[3]
    y = xp.empty_like(x)
    xhat = xp.empty_like(x) if keep_xhat else None
    _launch("batch_norm", "batch_norm_forward", x.dtype, x.size,
            (x, mean, variance, weight, bias, xhat, y, i32(c), i32(pixels), i32(x.size), x.dtype.type(eps)))
    return {"y": y} if xhat is None else {"y": y, "xhat": xhat}


def batch_norm_backward(dy, xhat, variance, weight, eps=1e-5):
    """The backward launches: the 2C sums (dbias, dweight) and dx."""
    xp = backend.get_array_module(dy)
    n, c, h, w = dy.shape
    pixels, count = h * w, n * h * w
    chunks = min(1024, count)
    partial = xp.empty((2 * c, chunks), dtype=dy.dtype)
    _launch("batch_norm", "batch_norm_gradient_sums", dy.dtype, c * chunks,
            (dy, xhat, partial, i32(n), i32(c), i32(pixels), i32(chunks)))
    sums = xp.empty(2 * c, dtype=dy.dtype)
    _launch("reduce", "channel_sum_finish", dy.dtype, 2 * c, (partial, sums, i32(2 * c), i32(chunks)))
    dx = xp.empty_like(dy)
    _launch("batch_norm", "batch_norm_backward", dy.dtype, dy.size,
            (dy, xhat, sums, variance, weight, dx, i32(c), i32(pixels), i32(count), i32(dy.size), dy.dtype.type(eps)))
    return {"sums": sums, "dx": dx}


def reference_batch_norm(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, track=True):
    """The training forward in float64 from the textbook formulas."""
    x = x.astype(numpy.float64)
    mean, variance = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    per_channel = (1, -1, 1, 1)
    xhat = (x - mean.reshape(per_channel)) / numpy.sqrt(variance.reshape(per_channel) + eps)
    if track:
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * variance
    return {"y": weight.reshape(per_channel) * xhat + bias.reshape(per_channel), "xhat": xhat, "mean": mean,
            "variance": variance, "running_mean": running_mean, "running_var": running_var}


def reference_batch_norm_backward(dy, xhat, variance, weight, eps=1e-5):
    dy, xhat = dy.astype(numpy.float64), xhat.astype(numpy.float64)
    per_channel = (1, -1, 1, 1)
    sum_dy, sum_dy_xhat = dy.sum(axis=(0, 2, 3)), (dy * xhat).sum(axis=(0, 2, 3))
    count = dy.size // dy.shape[1]
    dx = (weight / numpy.sqrt(variance + eps)).reshape(per_channel) * (
        dy - sum_dy.reshape(per_channel) / count - xhat * sum_dy_xhat.reshape(per_channel) / count)
    return {"sums": numpy.concatenate([sum_dy, sum_dy_xhat]), "dx": dx}
