"""Spatial recurrent layers: the gated recurrence of the paper (eq. 3), its four-way merge, and eq. 1.

All three layers scan an ``(N, C, H, W)`` map along one of four directions: every row (for the
horizontal directions) or every column (for the vertical ones) is an independent 1-D sequence,
and the hidden state of a pixel is computed from the state of the pixel before it in the scan.

**One scan, four directions.** The fast path moves the scan axis first and lays the data out as a
contiguous *scan-layout* array ``(T, C, M)``: ``T`` is the scan length (``W`` or ``H``), ``M = N * S``
collects the images and the other spatial axis (``S = H`` or ``W``), so that one step of the scan
reads one contiguous ``(C, M)`` slab and mixes channels with a single ``(C, C) @ (C, M)`` product.
The reverse directions are the same scan run over the reversed view ``sequence[::-1]``, whose
every step is still a contiguous slab. So there is one forward and one backward scan
(:func:`gated_scan_forward`, :func:`gated_scan_backward`, and their eq. 1 counterparts), and the
layout functions (:func:`to_axis_layout`, :func:`in_scan_order` and what is built on them) are the
only places that know about directions. The four-way layers lay each axis out once for its two
directions and merge those two in the layout (:meth:`FourWayMaxMerge.forward_cpu`). The
derivations are in ``docs/derivations/gated-rnn.md``.

**The kernel path** (``kernels/gated_scan.cu``, described in ``docs/kernels.md``) works on NCHW
arrays directly: a direction is five integers (:func:`minirnng.cuda.scan_geometry`), one thread
scans one line, and one launch runs all the directions a layer has. :func:`scan_forward_gpu` and
:func:`scan_backward_gpu` are the only code that launches the scans; a single-direction layer
calls them with ``D = 1``, the four-way layer with ``D = 4`` and adds the max merge. Launches
per pass: a single direction, forward 1, backward 4 (the scan, a matmul for ``dW``, two for
``db``); the four-way layer, forward 2 (scans, merge), backward 7 (merge, scans, ``dW``, ``db``
twice, two sums over the directions for ``dx`` and ``dg``), plus one addition per parameter
gradient.

**Stability** (paper section 3.2). The gate is kept in (0, 1) by the sigmoid that produces it and
:func:`constrain_recurrent_weight` keeps every row of ``W`` within absolute sum 1 after each
optimizer step; together they make one step a contraction in the max norm, so long scans cannot
blow up. :func:`project_recurrent_weight` keeps the same bound by projecting each row instead of
rescaling the whole matrix, which preserves the recurrence's reach in training, and
:func:`clip_recurrent_singular_values` bounds the spectral norm instead (neither is the spec's
rule; ``STABILITY_RULES`` names all three).
"""

import functools

import numpy

from .. import backend
from ..cuda.directions import scan_geometry
from ..cuda.launch import channel_sum, element_count, launch, sum_first_axis
from .base import Layer, check_array, check_positive_int, check_same_shape, random_generator, routed_gradient

DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
ACTIVATIONS = ("tanh", "identity")

# For each direction: whether it scans along the columns of a row (horizontal) and whether it
# runs backwards (from the last column or row to the first).
SCAN = {
    "left_to_right": (True, False),
    "right_to_left": (True, True),
    "top_to_bottom": (False, False),
    "bottom_to_top": (False, True),
}
#: The two axes, each with whether it is horizontal and its forward and reverse direction, in
#: ``DIRECTIONS`` order (so direction ``2 * axis + offset`` is ``AXES[axis][1][offset]``).
AXES = ((True, ("left_to_right", "right_to_left")), (False, ("top_to_bottom", "bottom_to_top")))


def check_direction(direction, owner):
    if direction not in SCAN:
        raise ValueError(f"{owner}: unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    return direction


# -- layout: the only code that knows about directions -------------------------------------------
def to_axis_layout(array, horizontal):
    """A fresh C-contiguous ``(T, C, M)`` copy of an ``(N, C, H, W)`` array, in forward scan order.

    ``T`` is the scan length (``W`` for the horizontal axis, ``H`` for the vertical one) and
    ``M = N * S`` with ``S`` the other spatial size, so that step ``t`` of a scan along the axis
    reads ``result[t]``, one contiguous ``(C, M)`` slab. Works for any dtype (the max merge moves
    its int8 winners with it).
    """
    if horizontal:
        # Swap the spatial axes so that every scan runs down the rows. Two copies (a transpose
        # within each 2-D image plane, then a move of whole rows) measure 2-4x faster than one
        # 4-D transpose, whose innermost loop would stride across rows and planes.
        array = array.swapaxes(2, 3).copy()  # (N, C, W, H)
    rows_first = array.transpose(2, 1, 0, 3)  # (T, C, N, S), a view
    steps, channels, images, across = rows_first.shape
    return rows_first.copy().reshape(steps, channels, images * across)


def from_axis_layout(sequence, horizontal, shape):
    """The inverse of :func:`to_axis_layout`: a ``(T, C, M)`` array in forward scan order back to a
    new NCHW array of ``shape``."""
    images, channels, height, width = shape
    steps, across = (width, height) if horizontal else (height, width)
    planes = sequence.reshape(steps, channels, images, across).transpose(2, 1, 0, 3).copy()  # (N, C, T, S)
    if horizontal:
        planes = planes.swapaxes(2, 3).copy()  # (N, C, H, W)
    return planes


def in_scan_order(sequence, reverse):
    """A forward-order ``(T, C, M)`` array seen in the order a scan visits it: itself, or for a
    reverse direction the view ``sequence[::-1]``, whose step ``t`` is still a contiguous slab.
    The view costs nothing, and applied twice gives the forward order back."""
    return sequence[::-1] if reverse else sequence


def to_scan_layout(array, direction):
    """An ``(N, C, H, W)`` array as a fresh ``(T, C, M)`` copy in ``direction``'s scan order.

    Step ``t`` of the scan reads ``result[t]``, a contiguous ``(C, M)`` slab; for a reverse
    direction the result is the reversed view of a forward-order copy (:func:`in_scan_order`), so
    ``result[0]`` is the last column or row. Always a copy, so the scans may overwrite it (the
    forward turns ``x`` into ``h`` in place, the backward ``dh`` into ``dx``).
    """
    horizontal, reverse = SCAN[direction]
    return in_scan_order(to_axis_layout(array, horizontal), reverse)


def from_scan_layout(sequence, direction, shape):
    """The inverse of :func:`to_scan_layout`: a ``(T, C, M)`` array in scan order back to a new NCHW
    array of ``shape``."""
    horizontal, reverse = SCAN[direction]
    return from_axis_layout(in_scan_order(sequence, reverse), horizontal, shape)


# -- the gated scan (eq. 3) ----------------------------------------------------------------------
def gated_scan_forward(h, g, W, b):
    """Eq. 3 along axis 0 of scan-layout arrays, in place: ``h`` holds ``x`` on entry, ``h`` on exit.

        h[t] = x[t] + g[t] * (W @ h[t-1] + b),      h[-1] = 0

    h : (T, C, M), each step h[t] contiguous (a C-contiguous array or its reversed view, see
    :func:`in_scan_order`); on entry the input ``x``, on exit the hidden states.
    g : (T, C, M) gates. W : (C, C). b : (C,).

    Written as ``h[t] = (x[t] + g[t] * b) + g[t] * (W @ h[t-1])`` so that the part that does not
    depend on the previous state is added for all steps at once, and each sequential step is one
    matrix product, one multiply and one add on a ``(C, M)`` slab.
    """
    h += g * b[:, None]
    propagated = numpy.empty_like(h[0])  # (C, M): W @ h[t-1], then times g[t]
    for t in range(1, h.shape[0]):
        numpy.matmul(W, h[t - 1], out=propagated)
        propagated *= g[t]
        h[t] += propagated
    return h


def gated_scan_backward(delta, g, h, W, b):
    """Back-propagation through :func:`gated_scan_forward`, on scan-layout arrays.

    delta : (T, C, M); on entry ``xi = dL/dh`` from the layers above, on exit ``dL/dx``.
    g, h : (T, C, M) gates and hidden states of the forward. W : (C, C). b : (C,).
    Returns ``(dW, db, dg)``: ``(C, C)``, ``(C,)`` and ``(T, C, M)``.

    With ``u[t] = g[t] * delta[t]`` (the gradient that reaches ``W @ h[t-1] + b``):

        delta[t] = xi[t] + W.T @ u[t+1]                  (delta[T-1] = xi[T-1])
        dL/dx[t] = delta[t]
        dL/dg[t] = delta[t] * (W @ h[t-1] + b)          (h[-1] = 0)
        dL/dW    = sum_t u[t] @ h[t-1].T,     dL/db = sum_t u[t]   (summed over M as well)
    """
    steps = delta.shape[0]
    u = numpy.empty_like(delta)
    carried = numpy.empty_like(delta[0])  # (C, M): W.T @ u[t]
    for t in range(steps - 1, 0, -1):
        numpy.multiply(g[t], delta[t], out=u[t])
        numpy.matmul(W.T, u[t], out=carried)
        delta[t - 1] += carried
    numpy.multiply(g[0], delta[0], out=u[0])

    # All steps at once: T-1 products (C, M) @ (M, C) in one call, then summed.
    dW = numpy.matmul(u[1:], h[:-1].transpose(0, 2, 1)).sum(axis=0)
    db = u.sum(axis=(0, 2))

    # u is no longer needed: reuse it for W @ h[t-1] + b, then for dg.
    gated_input = u
    numpy.matmul(W, h[:-1], out=gated_input[1:])
    gated_input[0] = 0
    gated_input += b[:, None]
    dg = numpy.multiply(delta, gated_input, out=gated_input)
    return dW, db, dg


# -- the spatially invariant scan (eq. 1) --------------------------------------------------------
def plain_scan_forward(h, W, b, activation):
    """Eq. 1 along axis 0 of scan-layout arrays, in place: ``h`` holds ``x`` on entry, ``h`` on exit.

        a[t] = x[t] + W @ h[t-1] + b,    h[t] = theta(a[t]),    h[-1] = 0

    h : (T, C, M), each step h[t] contiguous. W : (C, C). b : (C,). theta is tanh or the identity.
    """
    h += b[:, None]
    propagated = numpy.empty_like(h[0])
    for t in range(h.shape[0]):
        if t > 0:
            numpy.matmul(W, h[t - 1], out=propagated)
            h[t] += propagated
        if activation == "tanh":
            numpy.tanh(h[t], out=h[t])
    return h


def plain_scan_backward(delta, h, W, activation):
    """Back-propagation through :func:`plain_scan_forward` (eq. 2 with ``W`` transposed).

    delta : (T, C, M); on entry ``xi = dL/dh``, on exit ``delta = dL/da = dL/dx``.
    h : (T, C, M) hidden states of the forward. W : (C, C). Returns ``(dW, db)``.

        delta[t] = theta'(a[t]) * (xi[t] + W.T @ delta[t+1]),   tanh'(a[t]) = 1 - h[t]**2
        dL/dW = sum_t delta[t] @ h[t-1].T,    dL/db = sum_t delta[t]
    """
    slope = 1 - h * h if activation == "tanh" else None  # (T, C, M), computed for all steps at once
    carried = numpy.empty_like(delta[0])
    for t in range(delta.shape[0] - 1, -1, -1):
        if t < delta.shape[0] - 1:
            numpy.matmul(W.T, delta[t + 1], out=carried)
            delta[t] += carried
        if slope is not None:
            delta[t] *= slope[t]
    dW = numpy.matmul(delta[1:], h[:-1].transpose(0, 2, 1)).sum(axis=0)
    db = delta.sum(axis=(0, 2))
    return dW, db


# -- the kernel path: D directions in one launch -------------------------------------------------
#: The scans the kernels implement: eq. 3 ("gated"), eq. 1 with tanh ("tanh") and eq. 1 without an
#: activation ("identity", which is the gated kernel with every gate 1: g = None).
SCAN_KINDS = ("gated", "tanh", "identity")


def scan_geometry_on(directions, height, width, like):
    """:func:`minirnng.cuda.scan_geometry` ``(D, 5)`` int32 on the device of ``like`` (an array).

    It depends only on the directions and the image size, so it is built and copied to the GPU
    once per device and size, and reused: a copy from the host at every call would cost a
    synchronous transfer (and would break the capture of a forward pass into a CUDA graph).
    """
    device = like.device.id if backend.is_cupy_array(like) else None
    return _scan_geometry_cached(tuple(directions), int(height), int(width), device)


# Never evicted: a CUDA graph (minirnng.cuda.graph) records the device address of the geometry
# its scans read, so the array must live as long as the process; each is 20 ints.
@functools.lru_cache(maxsize=None)
def _scan_geometry_cached(directions, height, width, device):
    geometry = scan_geometry(directions, height, width)
    if device is None:
        geometry.flags.writeable = False  # shared by every call from now on
        return geometry
    import cupy
    # from CUDA itself, not from the allocator in force: that may be a CUDA graph's private pool
    # (minirnng.cuda.graph), which older CuPy releases free with the graph, while this lives on
    with cupy.cuda.Device(device), cupy.cuda.using_allocator(None):
        return cupy.asarray(geometry)


def scan_forward_gpu(kind, x, g, weight, bias, geometry):
    """D directions of a scan (one of :data:`SCAN_KINDS`) in one launch of ``kernels/gated_scan.cu``.

    x : (N, C, H, W) and g : (N, C, H, W) (None for "tanh" and "identity"), C-contiguous, shared
    by all directions; weight : (D, C, C) and bias : (D, C), one slice per direction; geometry :
    (D, 5) from :func:`scan_geometry_on`. Returns h : (D, N, C, H, W), direction d in ``h[d]``.
    """
    xp = backend.get_array_module(x)
    n, channels, height, width = x.shape
    directions = weight.shape[0]
    h = xp.empty((directions, n, channels, height, width), dtype=x.dtype)
    i32 = numpy.int32
    sizes = (i32(directions), i32(n), i32(channels), i32(height * width))
    lines = n * max(height, width)  # threads per direction; the kernel skips those past its own line count
    if kind == "tanh":
        launch("gated_scan", "tanh_scan_forward", x.dtype, lines, (x, weight, bias, geometry, h, *sizes),
               grid_y=directions)
    else:
        launch("gated_scan", "gated_scan_forward", x.dtype, lines, (x, g, weight, bias, geometry, h, *sizes),
               grid_y=directions)
    return h


def scan_backward_gpu(kind, dh, g, h, weight, bias, geometry):
    """Back-propagation through :func:`scan_forward_gpu`, the recipe of ``docs/kernels.md``.

    dh : (D, N, C, H, W) upstream gradient of each direction's output, C-contiguous; g, h, weight,
    bias, geometry : as in and from the forward. Returns ``(dx, dg, dW, db)``: dx (D, N, C, H, W)
    and dg (D, N, C, H, W) per direction (dg None unless kind is "gated"), dW (D, C, C), db (D, C).

    The scan kernel writes, besides dx and dg, the gradient ``e`` of each step's ``W h + b`` and
    the state ``h_prev`` it multiplied, channel-major (D, C, N*H*W); then ``dW[d] = e[d] @ h_prev[d].T``
    is one batched product for all directions and ``db`` one ``channel_sum``.
    """
    xp = backend.get_array_module(dh)
    directions, n, channels, height, width = dh.shape
    dx = xp.empty_like(dh)
    dg = xp.empty_like(dh) if kind == "gated" else None
    e = xp.empty((directions, channels, n, height, width), dtype=dh.dtype)
    h_prev = xp.empty_like(e)
    i32 = numpy.int32
    sizes = (i32(directions), i32(n), i32(channels), i32(height * width))
    lines = n * max(height, width)
    if kind == "tanh":
        launch("gated_scan", "tanh_scan_backward", dh.dtype, lines, (dh, h, weight, geometry, dx, e, h_prev, *sizes),
               grid_y=directions)
    else:
        launch("gated_scan", "gated_scan_backward", dh.dtype, lines,
               (dh, g, h, weight, bias, geometry, dx, dg, e, h_prev, *sizes), grid_y=directions)
    pixels = n * height * width
    e = e.reshape(directions, channels, pixels)
    dW = xp.matmul(e, h_prev.reshape(directions, channels, pixels).transpose(0, 2, 1))
    db = channel_sum(e.reshape(1, directions * channels, pixels)).reshape(directions, channels)
    return dx, dg, dW, db


# -- the stability rule --------------------------------------------------------------------------
# Each rule meets its bound up to the rounding of its own arithmetic: after it, a row sum or the
# largest singular value may exceed 1 by a few units in the last place (float32: up to about 1e-6
# for the projection), which no scan of a few hundred steps can turn into growth.
def check_recurrent_weight(W, owner):
    """Refuse a ``W`` that is not a matrix (the rules act on its rows), naming ``owner``."""
    shape = tuple(getattr(W, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"{owner}: W must be a (C, C) matrix, got shape {shape}")


def constrain_recurrent_weight(W):
    """Rescale ``W`` in place so that its largest absolute row sum is at most 1; return ``W``.

    W : (C, C), NumPy or CuPy. ``max_i sum_j |W[i, j]|`` is the max-norm of ``W`` as an operator;
    keeping it <= 1 while the gate is in (0, 1) makes each step of eq. 3 shrink differences in the
    max norm, so the hidden state cannot grow exponentially along a scan (paper section 3.2). The
    whole matrix is divided by one factor, so its direction is kept; a ``W`` that already satisfies
    the rule is left untouched. Call it on every recurrent ``W`` after each optimizer step.
    """
    check_recurrent_weight(W, "constrain_recurrent_weight")
    xp = backend.get_array_module(W)
    largest_row_sum = float(xp.abs(W).sum(axis=1).max())
    if largest_row_sum > 1:
        W /= largest_row_sum
    return W


def project_recurrent_weight(W):
    """Project each row of ``W`` (in place) onto the L1 ball ``sum_j |W[i, j]| <= 1``; return ``W``.

    W : (C, C), NumPy or CuPy. The same bound as :func:`constrain_recurrent_weight`, kept another
    way: a row over the bound becomes its nearest point on the ball (Euclidean projection, Duchi et
    al. 2008), ``W[i, j] = sign(W[i, j]) * max(|W[i, j]| - theta_i, 0)`` with ``theta_i`` chosen so
    that the row's absolute sum is 1. Every entry of the row loses the same ``theta_i``, so small
    entries go to 0 and large ones lose little; a rescale instead divides every entry, the largest
    too, by the row sum. Rows within the bound are left untouched.

    Why it exists: with Adam, which moves every entry by about the learning rate whatever its
    gradient, the rescale shrinks the identity ``W`` starts from step after step, and the trained
    recurrence reaches only a few pixels (docs/training.md, runs AK and AL). It is not the spec's
    rule, which rescales; ``TrainConfig.stability_rule`` (``--stability-rule``) chooses.
    """
    check_recurrent_weight(W, "project_recurrent_weight")
    xp = backend.get_array_module(W)
    magnitude = xp.abs(W)
    over = magnitude.sum(axis=1) > 1
    if not bool(over.any()):
        return W
    descending = -xp.sort(-magnitude, axis=1)
    cumulative = xp.cumsum(descending, axis=1)
    counts = xp.arange(1, W.shape[1] + 1)
    # the last position where an entry still exceeds the threshold that would make the row sum 1
    kept = descending > (cumulative - 1) / counts
    last = kept.shape[1] - 1 - xp.argmax(kept[:, ::-1], axis=1)
    theta = (cumulative[xp.arange(W.shape[0]), last] - 1) / (last + 1)
    projected = xp.sign(W) * xp.maximum(magnitude - theta[:, None], 0)
    W[over] = projected[over]
    return W


def clip_recurrent_singular_values(W):
    """Clip the singular values of ``W`` (in place) at 1, so that its spectral norm is at most 1; return ``W``.

    W : (C, C), NumPy or CuPy. With ``W = U diag(s) V^T``, ``W`` becomes ``U diag(min(s, 1)) V^T``:
    the nearest matrix (in the Frobenius norm) whose largest singular value is at most 1. Another
    reading of the paper's "norm of w_h normalized to be within one" (section 3.2), with the
    Euclidean norm where the spec takes the max norm: ``||diag(g) W v||_2 <= ||v||_2`` for a gate
    in (0, 1), so a scan is stable in that norm instead. The two bounds differ: a channel
    permutation meets both; a ``W`` whose every row is ``(1, 0, ..., 0)`` (each channel copies the
    first) meets the spec's (row sums 1) and not this one (spectral norm ``sqrt(C)``); a rotation
    by 45 degrees in two channels meets this one (spectral norm 1) and not the spec's (row sums
    ``sqrt(2)``). A ``W`` within the bound is left untouched. Not the spec's rule; training chooses
    it with ``--stability-rule spectral``.
    """
    check_recurrent_weight(W, "clip_recurrent_singular_values")
    xp = backend.get_array_module(W)
    if not bool(xp.isfinite(W).all()):  # the SVD would fail with LAPACK's "did not converge"
        raise ValueError("clip_recurrent_singular_values: W has NaN or infinite entries "
                         "(training diverged: try a smaller learning rate)")
    left, singular, right = xp.linalg.svd(W)
    if float(singular.max()) <= 1:
        return W
    W[...] = (left * xp.minimum(singular, 1)) @ right
    return W


#: The stability rules training can apply after each optimizer step (``TrainConfig.stability_rule``).
STABILITY_RULES = {"rescale": constrain_recurrent_weight, "project": project_recurrent_weight,
                   "spectral": clip_recurrent_singular_values}


# -- the layers ----------------------------------------------------------------------------------
class RecurrentLayer(Layer):
    """What the spatial recurrent layers share: the channel count and the check of their inputs."""

    def __init__(self, channels, dtype=numpy.float32):
        super().__init__(dtype=dtype)
        self.channels = check_positive_int(channels, type(self).__name__, "channels")

    def check_inputs(self, x, g=None, gated=False):
        """Validate ``x`` and, for a ``gated`` layer, the gate ``g``, which must have the shape of ``x``."""
        owner = type(self).__name__
        check_array(x, owner, "x", ndim=4, dtype=self.dtype, channels=self.channels, like=self.reference_array())
        if gated and g is None:
            raise TypeError(f"{owner}.forward: the gate g is missing (None); give the gate map, an array of "
                            f"x's shape {tuple(x.shape)} with values in [0, 1]")
        if g is not None:
            check_array(g, owner, "g", ndim=4, dtype=self.dtype, channels=self.channels, like=self.reference_array())
            check_same_shape(g, x, owner, "g", "x")

    def backward(self, grad_output):
        return self.run_backward(grad_output)


def identity_recurrent_weight(channels):
    """The initial ``W``: the identity (its row sums are exactly 1, so the stability rule holds).

    Why the identity: with ``W = I`` and ``b = 0``, eq. 3 is the gated running sum
    ``h[j] = x[j] + g[j] * h[j-1]``, which carries every channel's score along undiminished
    wherever the gate is open and stops it where the gate is shut. Propagation works from the first
    step and its reach is decided by the gate alone; a random ``W`` would mix the label channels,
    and a small one would fade the propagation out within a few pixels (and starve the gate of
    gradient). The four directions start equal and drift apart as their gradients differ.
    """
    return numpy.eye(channels)


class DirectionalRNN(RecurrentLayer):
    """One recurrent scan along one direction: the parameters and the kernel path that
    :class:`GatedSpatialRNN` and :class:`SpatialRNN` share (subclasses set :attr:`scan_kind`).

    Parameters ``W`` (C, C) and ``b`` (C,), initialised by :func:`identity_recurrent_weight` and 0.
    """

    #: which scan of :data:`SCAN_KINDS` the kernel path runs
    scan_kind = None

    def __init__(self, channels, direction, dtype=numpy.float32):
        super().__init__(channels, dtype=dtype)
        self.direction = check_direction(direction, type(self).__name__)
        self.add_param("W", identity_recurrent_weight(self.channels))
        self.add_param("b", numpy.zeros(self.channels))

    def forward_gpu(self, x, g=None):
        """x (and g), (N, C, H, W) C-contiguous -> h (N, C, H, W), one launch with D = 1.

        The cache is (g, h (1, N, C, H, W), geometry); ``h[0]`` is the output itself.
        """
        geometry = scan_geometry_on((self.direction,), x.shape[2], x.shape[3], like=x)
        h = scan_forward_gpu(self.scan_kind, x, g, self.params["W"][None], self.params["b"][None], geometry)
        return h[0], (g, h, geometry)

    def backward_gpu(self, grad_output):
        """dh (N, C, H, W) -> dx, or (dx, dg) for the gated scan; adds dW and db into ``grads``."""
        g, h, geometry = self.cache
        dx, dg, dW, db = scan_backward_gpu(self.scan_kind, grad_output[None], g, h, self.params["W"][None],
                                           self.params["b"][None], geometry)
        self.accumulate_grad("W", dW[0])
        self.accumulate_grad("b", db[0])
        return dx[0] if dg is None else (dx[0], dg[0])


class GatedSpatialRNN(DirectionalRNN):
    """The spatially variant recurrent layer of the paper (eq. 3), along one direction.

    For ``direction="left_to_right"``, every image ``n`` and row ``y``, along the columns
    ``j = 0 .. W-1`` (``*`` elementwise over channels, ``@`` mixes channels):

        h[n, :, y, j] = x[n, :, y, j] + g[n, :, y, j] * (W @ h[n, :, y, j-1] + b),    h[n, :, y, -1] = 0

    ``right_to_left`` runs ``j = W-1 .. 0``; ``top_to_bottom`` and ``bottom_to_top`` run along the
    rows in the same way. The activation is the identity.

    Parameters: ``W`` (C, C), ``b`` (C,); initialised to the identity and zero (see
    :func:`identity_recurrent_weight`). ``rng`` is accepted so that every layer has the same
    constructor; this deterministic initialisation draws nothing from it.

    ``forward(x, g) -> h``: ``x``, ``g`` and ``h`` are ``(N, C, H, W)``. The gate is meant to lie
    in [0, 1] (in RNN-G it is a sigmoid's output), which with the stability rule keeps ``h``
    bounded; the layer does not check it (a pass over ``g`` every call), and a gate beyond 1
    lets the state grow along the scan.
    ``backward(dh) -> (dx, dg)``, both ``(N, C, H, W)``; adds ``dL/dW`` and ``dL/db`` into ``grads``.
    """

    input_names = ("x", "g")
    scan_kind = "gated"

    def __init__(self, channels, direction, rng=None, dtype=numpy.float32):
        random_generator(rng, type(self).__name__)  # checked like every layer's rng, though nothing is drawn
        super().__init__(channels, direction, dtype=dtype)

    def forward(self, x, g):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_inputs(x, g, gated=True)
        return self.run_forward(x, g)

    def forward_cpu(self, x, g):
        h, cache = self.scan_cpu(to_scan_layout(x, self.direction), to_scan_layout(g, self.direction))
        return from_scan_layout(h, self.direction, x.shape), cache

    def scan_cpu(self, h, g):
        """Eq. 3 on scan-layout arrays in this direction's order (:func:`to_scan_layout`).

        h : (T, C, M), holds x on entry and h on exit (overwritten). g : (T, C, M), only read
        (:class:`FourWayGatedRNN` shares one between the two directions of an axis).
        Returns ``(h, cache)`` with the cache ``(h, g)``.
        """
        gated_scan_forward(h, g, self.params["W"], self.params["b"])
        return h, (h, g)

    def backward_cpu(self, grad_output):
        shape = grad_output.shape
        dx, dg = self.scan_backward_cpu(to_scan_layout(grad_output, self.direction))
        return from_scan_layout(dx, self.direction, shape), from_scan_layout(dg, self.direction, shape)

    def scan_backward_cpu(self, delta):
        """delta (T, C, M) = dL/dh in scan order, overwritten -> ``(dx, dg)`` in scan order;
        adds dL/dW and dL/db into ``grads``."""
        h, g = self.cache
        dW, db, dg = gated_scan_backward(delta, g, h, self.params["W"], self.params["b"])
        self.accumulate_grad("W", dW)
        self.accumulate_grad("b", db)
        return delta, dg

    def __repr__(self):
        return f"{type(self).__name__}(channels={self.channels}, direction={self.direction!r})"


class FourWayMaxMerge(RecurrentLayer):
    """Four recurrent layers of one kind, one per direction, fed the same inputs, merged by the maximum.

        h_d = layer_d(inputs)   for d in DIRECTIONS (each with its own W_d, b_d)
        h   = max_d h_d         (the paper's node-wise max pooling)

    ``backward(dh)``: each entry of ``dh`` goes to the direction that won the maximum there (on a
    tie, to the first in ``DIRECTIONS``), and the input gradients are the sums of the four
    directions' gradients. ``params`` / ``grads`` are named ``left_to_right.W``,
    ``left_to_right.b``, ... and are the live arrays of the four layers in ``self.direction_layers``
    (a dict in ``DIRECTIONS`` order). Subclasses name the layer kind in ``direction_class``.

    Those arrays are views into two stacked arrays, ``stacked_params["W"]`` (4, C, C) and
    ``stacked_params["b"]`` (4, C) (and likewise ``stacked_grads``), in ``DIRECTIONS`` order. The
    kernel path runs the four scans in one launch, which reads all four ``W`` as one array; with
    views, an update of any direction's ``W`` (by an optimizer, the stability rule or a checkpoint,
    all of which write in place) is already an update of the stack, and no copy is made per call.
    """

    direction_class = None

    def __init__(self, channels, rng=None, dtype=numpy.float32, **direction_options):
        super().__init__(channels, dtype=dtype)
        rng = random_generator(rng, type(self).__name__)
        self.direction_layers = {
            direction: self.direction_class(self.channels, direction, rng=rng, dtype=dtype, **direction_options)
            for direction in DIRECTIONS}
        layers = list(self.direction_layers.values())
        xp = backend.get_array_module(layers[0].params["W"])
        self.stacked_params, self.stacked_grads = {}, {}
        for name in layers[0].params:
            stacked = xp.stack([layer.params[name] for layer in layers])
            stacked_grad = xp.zeros_like(stacked)
            for index, layer in enumerate(layers):
                layer.params[name], layer.grads[name] = stacked[index], stacked_grad[index]
            self.stacked_params[name], self.stacked_grads[name] = stacked, stacked_grad
        for direction, layer in self.direction_layers.items():
            for name in layer.params:
                self.params[f"{direction}.{name}"] = layer.params[name]
                self.grads[f"{direction}.{name}"] = layer.grads[name]

    def clear_cache(self):
        """Drop the merge's cache and the four directions' (each keeps its own scan's)."""
        super().clear_cache()
        for layer in self.direction_layers.values():
            layer.clear_cache()

    def forward_cpu(self, *inputs):
        """The four scans, an axis at a time, in the scan layout: the axis's inputs are laid out
        once (x copied for the first direction, whose scan overwrites it; g shared), its two
        directions merged there, and only their maximum and winner go back to NCHW, to be merged
        with the other axis's. Half the layout copies of four independent layers.

        The cache is ``winner`` int8 (N, C, H, W): the index in ``DIRECTIONS`` of the direction whose
        output is merged there. A direction takes a pixel only where it is strictly larger than
        every direction before it, so a tie stays with the first; where an output is NaN, the first
        direction whose output is NaN takes it, as in the kernel (NaN is never larger).
        """
        shape = inputs[0].shape
        merged = winner = None
        scanned = []  # (forward-order output, horizontal) of each direction, in DIRECTIONS' order
        for axis, (horizontal, pair) in enumerate(AXES):
            layouts = [to_axis_layout(array, horizontal) for array in inputs]  # forward order
            outputs = []
            for direction in pair:
                reverse = SCAN[direction][1]
                x = layouts[0] if reverse else layouts[0].copy()  # the reverse scan, last, may overwrite it
                others = (in_scan_order(array, reverse) for array in layouts[1:])
                layer = self.direction_layers[direction]
                h, layer.cache = layer.scan_cpu(in_scan_order(x, reverse), *others)
                outputs.append(in_scan_order(h, reverse))  # forward order again
            forward, backward = outputs
            scanned += [(forward, horizontal), (backward, horizontal)]
            backward_won = numpy.greater(backward, forward)
            axis_maximum = from_axis_layout(numpy.maximum(forward, backward), horizontal, shape)
            axis_winner = from_axis_layout(backward_won.view(numpy.int8), horizontal, shape)  # 0 or 1
            axis_winner += numpy.int8(2 * axis)  # the indices in DIRECTIONS
            if merged is None:
                merged, winner = axis_maximum, axis_winner
                continue
            # This axis's indices exceed every earlier one, so max(winner, larger * axis_winner)
            # takes them exactly where larger holds (a masked copy of int8 is 50x slower).
            larger = numpy.greater(axis_maximum, merged)
            numpy.maximum(winner, numpy.multiply(larger, axis_winner, out=axis_winner), out=winner)
            numpy.maximum(merged, axis_maximum, out=merged)
        nan = numpy.isnan(merged)  # one sweep of the output when there is no NaN (a diverged pass)
        if nan.any():
            first_nan = winner.copy()
            for index in reversed(range(len(scanned))):
                output, horizontal = scanned[index]
                first_nan[from_axis_layout(numpy.isnan(output), horizontal, shape)] = index
            winner[nan] = first_nan[nan]
        return merged, winner

    def backward_cpu(self, grad_output):
        """Each direction's scan backward on dh where it won (0 elsewhere), in the scan layout; an
        axis's two directions sum their input gradients there, and the two axes' sums in NCHW."""
        winner = self.cache
        shape = grad_output.shape
        totals = None
        for axis, (horizontal, pair) in enumerate(AXES):
            upstream = to_axis_layout(grad_output, horizontal)
            won_by = to_axis_layout(winner, horizontal)
            sums = None
            for offset, direction in enumerate(pair):
                reverse = SCAN[direction][1]
                won = numpy.equal(won_by, 2 * axis + offset)
                # the second direction routes in place: nothing reads upstream after it
                routed = routed_gradient(upstream, won, out=upstream if offset else None)
                layer = self.direction_layers[direction]
                grads = [in_scan_order(grad, reverse) for grad in layer.scan_backward_cpu(in_scan_order(routed, reverse))]
                if sums is None:
                    sums = grads
                else:
                    for total, grad in zip(sums, grads):
                        total += grad
            in_planes = [from_axis_layout(total, horizontal, shape) for total in sums]
            if totals is None:
                totals = in_planes
            else:
                for total, grad in zip(totals, in_planes):
                    total += grad
        return tuple(totals) if len(totals) > 1 else totals[0]

    @property
    def scan_kind(self):
        """The scan of the four direction layers (one of :data:`SCAN_KINDS`)."""
        return next(iter(self.direction_layers.values())).scan_kind

    def check_stacks(self):
        """Refuse to run the kernels if a direction's parameter or gradient is no longer a view of
        the stacks they read: they would use stale weights or lose gradients, silently."""
        for stacks, kind in ((self.stacked_params, "params"), (self.stacked_grads, "grads")):
            for name, stacked in stacks.items():
                for direction, layer in self.direction_layers.items():
                    if getattr(layer, kind)[name].base is not stacked:
                        raise RuntimeError(
                            f"{type(self).__name__}: {kind}['{direction}.{name}'] is no longer a view of the stacked "
                            "array the GPU kernels read (was a parameter array replaced, or the layer deep-copied, "
                            "which copies views as separate arrays?); build a new layer and copy the values in, "
                            "e.g. with Model.load_params")

    def forward_gpu(self, x, g=None):
        """x (and g), (N, C, H, W) C-contiguous -> the merged h (N, C, H, W).

        Two launches: the four scans (D = 4), then ``max_merge_forward``, which writes the maximum
        and the index of the first direction attaining it. The cache is (g, h (4, N, C, H, W),
        winner int8 (N, C, H, W), geometry).
        """
        self.check_stacks()
        xp = backend.get_array_module(x)
        geometry = scan_geometry_on(DIRECTIONS, x.shape[2], x.shape[3], like=x)
        h = scan_forward_gpu(self.scan_kind, x, g, self.stacked_params["W"], self.stacked_params["b"], geometry)
        merged = xp.empty_like(x)
        winner = xp.empty(x.shape, dtype=numpy.int8)
        launch("gated_scan", "max_merge_forward", x.dtype, x.size,
               (h, merged, winner, numpy.int32(len(DIRECTIONS)), element_count(x.size)))
        return merged, (g, h, winner, geometry)

    def backward_gpu(self, grad_output):
        """dh (N, C, H, W) -> dx, or (dx, dg) for the gated layer; adds into the four directions' grads.

        ``max_merge_backward`` routes dh to the winners as (4, N, C, H, W), the scans run backward
        in one launch, and ``sum_first_axis`` adds the four directions' dx (and dg).
        """
        g, h, winner, geometry = self.cache
        xp = backend.get_array_module(grad_output)
        routed = xp.empty_like(h)
        launch("gated_scan", "max_merge_backward", grad_output.dtype, grad_output.size,
               (grad_output, winner, routed, numpy.int32(h.shape[0]), element_count(grad_output.size)))
        dx, dg, dW, db = scan_backward_gpu(self.scan_kind, routed, g, h, self.stacked_params["W"],
                                           self.stacked_params["b"], geometry)
        self.stacked_grads["W"] += dW  # the four directions' gradients at once (they are views)
        self.stacked_grads["b"] += db
        dx = sum_first_axis(dx)
        return dx if dg is None else (dx, sum_first_axis(dg))

    def __repr__(self):
        return f"{type(self).__name__}(channels={self.channels})"


class FourWayGatedRNN(FourWayMaxMerge):
    """Four :class:`GatedSpatialRNN`, one per direction, merged by the elementwise maximum.

    ``forward(x, g) -> h``, all ``(N, C, H, W)``; ``backward(dh) -> (dx, dg)``. See
    :class:`FourWayMaxMerge` for the merge and the names of the parameters.
    """

    input_names = ("x", "g")
    direction_class = GatedSpatialRNN

    def forward(self, x, g):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_inputs(x, g, gated=True)
        return self.run_forward(x, g)


class SpatialRNN(DirectionalRNN):
    """The spatially invariant recurrent layer of eq. 1 (the paper's "RNN" baseline), one direction.

    For ``direction="left_to_right"``, every image ``n`` and row ``y``, along ``j = 0 .. W-1``:

        a[n, :, y, j] = x[n, :, y, j] + W @ h[n, :, y, j-1] + b,   h[n, :, y, j] = theta(a[n, :, y, j]),
        h[n, :, y, -1] = 0

    with ``theta = tanh`` (``activation="tanh"``, the default) or the identity
    (``activation="identity"``). The other directions as in :class:`GatedSpatialRNN`.

    Parameters ``W`` (C, C), ``b`` (C,), initialised to the identity and zero like the gated layer.
    ``forward(x) -> h`` and ``backward(dh) -> dx``, all ``(N, C, H, W)``.
    """

    def __init__(self, channels, direction, activation="tanh", rng=None, dtype=numpy.float32):
        random_generator(rng, type(self).__name__)  # checked like every layer's rng, though nothing is drawn
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: unknown activation {activation!r}; "
                             f"expected one of {', '.join(ACTIVATIONS)}")
        super().__init__(channels, direction, dtype=dtype)
        self.activation = activation

    @property
    def scan_kind(self):
        """The scan the kernels run: "tanh", or "identity" (eq. 1 without activation is the gated
        scan with every gate 1)."""
        return "tanh" if self.activation == "tanh" else "identity"

    def forward(self, x):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_inputs(x)
        return self.run_forward(x)

    def forward_cpu(self, x):
        h, cache = self.scan_cpu(to_scan_layout(x, self.direction))
        return from_scan_layout(h, self.direction, x.shape), cache

    def scan_cpu(self, h):
        """Eq. 1 on a scan-layout array (T, C, M) in this direction's order, in place (h holds x on
        entry). Returns ``(h, cache)``, the cache being h."""
        plain_scan_forward(h, self.params["W"], self.params["b"], self.activation)
        return h, h

    def backward_cpu(self, grad_output):
        dx, = self.scan_backward_cpu(to_scan_layout(grad_output, self.direction))
        return from_scan_layout(dx, self.direction, grad_output.shape)

    def scan_backward_cpu(self, delta):
        """delta (T, C, M) = dL/dh in scan order, overwritten -> ``(dx,)`` in scan order; adds
        dL/dW and dL/db into ``grads``."""
        h = self.cache
        dW, db = plain_scan_backward(delta, h, self.params["W"], self.activation)
        self.accumulate_grad("W", dW)
        self.accumulate_grad("b", db)
        return (delta,)

    def __repr__(self):
        return (f"{type(self).__name__}(channels={self.channels}, direction={self.direction!r}, "
                f"activation={self.activation!r})")


class FourWaySpatialRNN(FourWayMaxMerge):
    """Four :class:`SpatialRNN` (eq. 1), one per direction, merged by the elementwise maximum: the
    paper's "RNN" baseline. ``forward(x) -> h`` and ``backward(dh) -> dx``, all ``(N, C, H, W)``;
    ``activation`` is passed to the four layers."""

    direction_class = SpatialRNN

    def __init__(self, channels, activation="tanh", rng=None, dtype=numpy.float32):
        super().__init__(channels, rng=rng, dtype=dtype, activation=activation)

    def forward(self, x):
        self.cache = None  # neither a failed check nor an inference pass may leave backward an older pass's cache
        self.check_inputs(x)
        return self.run_forward(x)
