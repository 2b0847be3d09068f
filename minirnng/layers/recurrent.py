"""Spatial recurrent layers: the gated recurrence of the paper (eq. 3), its four-way merge, and eq. 1.

All three layers scan an ``(N, C, H, W)`` map along one of four directions: every row (for the
horizontal directions) or every column (for the vertical ones) is an independent 1-D sequence,
and the hidden state of a pixel is computed from the state of the pixel before it in the scan.

**One scan, four directions.** The fast path moves the scan axis first and lays the data out as a
contiguous *scan-layout* array ``(T, C, M)``: ``T`` is the scan length (``W`` or ``H``), ``M = N * S``
collects the images and the other spatial axis (``S = H`` or ``W``), so that one step of the scan
reads one contiguous ``(C, M)`` slab and mixes channels with a single ``(C, C) @ (C, M)`` product.
The reverse directions are the same scan run over the flipped sequence. So there is one forward
and one backward scan (:func:`gated_scan_forward`, :func:`gated_scan_backward`, and their eq. 1
counterparts), and :func:`to_scan_layout` / :func:`from_scan_layout` are the only places that know
about directions. The derivations are in ``docs/derivations/gated-rnn.md``.

**Stability** (paper section 3.2). The gate is kept in (0, 1) by the sigmoid that produces it and
:func:`constrain_recurrent_weight` keeps every row of ``W`` within absolute sum 1 after each
optimizer step; together they make one step a contraction in the max norm, so long scans cannot
blow up.
"""

import numpy

from .. import backend
from .base import Layer, check_array, check_positive_int, check_same_shape

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


def check_direction(direction, owner):
    if direction not in SCAN:
        raise ValueError(f"{owner}: unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    return direction


# -- layout: the only code that knows about directions -------------------------------------------
def to_scan_layout(array, direction):
    """A fresh C-contiguous ``(T, C, M)`` copy of an ``(N, C, H, W)`` array, in scan order.

    ``T`` is the scan length (``W`` for the horizontal directions, ``H`` for the vertical ones) and
    ``M = N * S`` with ``S`` the other spatial size. Step ``t`` of the scan reads ``result[t]``, a
    contiguous ``(C, M)`` slab; for a reverse direction ``result[0]`` is the last column or row.
    Always a copy, so the scans may overwrite it (the forward turns ``x`` into ``h`` in place,
    the backward ``dh`` into ``dx``).
    """
    horizontal, reverse = SCAN[direction]
    if horizontal:
        # Swap the spatial axes so that every scan runs down the rows. Two copies (a transpose
        # within each 2-D image plane, then a move of whole rows) measure 2-4x faster than one
        # 4-D transpose, whose innermost loop would stride across rows and planes.
        array = array.swapaxes(2, 3).copy()  # (N, C, W, H)
    rows_first = array.transpose(2, 1, 0, 3)  # (T, C, N, S), a view
    if reverse:
        rows_first = rows_first[::-1]
    steps, channels, images, across = rows_first.shape
    return rows_first.copy().reshape(steps, channels, images * across)


def from_scan_layout(sequence, direction, shape):
    """The inverse of :func:`to_scan_layout`: a ``(T, C, M)`` array back to a new NCHW array of ``shape``."""
    horizontal, reverse = SCAN[direction]
    images, channels, height, width = shape
    steps, across = (width, height) if horizontal else (height, width)
    rows_first = sequence.reshape(steps, channels, images, across)
    if reverse:
        rows_first = rows_first[::-1]
    planes = rows_first.transpose(2, 1, 0, 3).copy()  # (N, C, T, S)
    if horizontal:
        planes = planes.swapaxes(2, 3).copy()  # (N, C, H, W)
    return planes


# -- the gated scan (eq. 3) ----------------------------------------------------------------------
def gated_scan_forward(h, g, W, b):
    """Eq. 3 along axis 0 of scan-layout arrays, in place: ``h`` holds ``x`` on entry, ``h`` on exit.

        h[t] = x[t] + g[t] * (W @ h[t-1] + b),      h[-1] = 0

    h : (T, C, M) contiguous; on entry the input ``x``, on exit the hidden states.
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

    h : (T, C, M) contiguous. W : (C, C). b : (C,). theta is tanh or the identity.
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


# -- the stability rule --------------------------------------------------------------------------
def constrain_recurrent_weight(W):
    """Rescale ``W`` in place so that its largest absolute row sum is at most 1; return ``W``.

    W : (C, C), NumPy or CuPy. ``max_i sum_j |W[i, j]|`` is the max-norm of ``W`` as an operator;
    keeping it <= 1 while the gate is in (0, 1) makes each step of eq. 3 shrink differences in the
    max norm, so the hidden state cannot grow exponentially along a scan (paper section 3.2). The
    whole matrix is divided by one factor, so its direction is kept; a ``W`` that already satisfies
    the rule is left untouched. Call it on every recurrent ``W`` after each optimizer step.
    """
    xp = backend.get_array_module(W)
    largest_row_sum = float(xp.abs(W).sum(axis=1).max())
    if largest_row_sum > 1:
        W /= largest_row_sum
    return W


# -- the layers ----------------------------------------------------------------------------------
class RecurrentLayer(Layer):
    """What the spatial recurrent layers share: the channel count and the check of their inputs."""

    def __init__(self, channels, dtype=numpy.float32):
        super().__init__(dtype=dtype)
        self.channels = check_positive_int(channels, type(self).__name__, "channels")

    def check_inputs(self, x, g=None):
        """Validate ``x`` (and the gate ``g``, which must have the shape of ``x``)."""
        owner = type(self).__name__
        check_array(x, owner, "x", ndim=4, dtype=self.dtype, channels=self.channels, like=self.reference_array())
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


class GatedSpatialRNN(RecurrentLayer):
    """The spatially variant recurrent layer of the paper (eq. 3), along one direction.

    For ``direction="left_to_right"``, every image ``n`` and row ``y``, along the columns
    ``j = 0 .. W-1`` (``*`` elementwise over channels, ``@`` mixes channels):

        h[n, :, y, j] = x[n, :, y, j] + g[n, :, y, j] * (W @ h[n, :, y, j-1] + b),    h[n, :, y, -1] = 0

    ``right_to_left`` runs ``j = W-1 .. 0``; ``top_to_bottom`` and ``bottom_to_top`` run along the
    rows in the same way. The activation is the identity.

    Parameters: ``W`` (C, C), ``b`` (C,); initialised to the identity and zero (see
    :func:`identity_recurrent_weight`). ``rng`` is accepted so that every layer has the same
    constructor; this deterministic initialisation draws nothing from it.

    ``forward(x, g) -> h``: ``x``, ``g`` and ``h`` are ``(N, C, H, W)``.
    ``backward(dh) -> (dx, dg)``, both ``(N, C, H, W)``; adds ``dL/dW`` and ``dL/db`` into ``grads``.
    """

    input_names = ("x", "g")

    def __init__(self, channels, direction, rng=None, dtype=numpy.float32):
        super().__init__(channels, dtype=dtype)
        self.direction = check_direction(direction, type(self).__name__)
        self.add_param("W", identity_recurrent_weight(self.channels))
        self.add_param("b", numpy.zeros(self.channels))

    def forward(self, x, g):
        self.check_inputs(x, g)
        return self.run_forward(x, g)

    def forward_cpu(self, x, g):
        h = to_scan_layout(x, self.direction)  # becomes h in place
        g = to_scan_layout(g, self.direction)
        gated_scan_forward(h, g, self.params["W"], self.params["b"])
        return from_scan_layout(h, self.direction, x.shape), (h, g)

    def backward_cpu(self, grad_output):
        h, g = self.cache  # scan layout (T, C, M)
        delta = to_scan_layout(grad_output, self.direction)  # a copy: becomes dx in place
        dW, db, dg = gated_scan_backward(delta, g, h, self.params["W"], self.params["b"])
        self.accumulate_grad("W", dW)
        self.accumulate_grad("b", db)
        shape = grad_output.shape
        return from_scan_layout(delta, self.direction, shape), from_scan_layout(dg, self.direction, shape)

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
    """

    direction_class = None

    def __init__(self, channels, rng=None, dtype=numpy.float32, **direction_options):
        super().__init__(channels, dtype=dtype)
        rng = numpy.random.default_rng(rng)
        self.direction_layers = {
            direction: self.direction_class(self.channels, direction, rng=rng, dtype=dtype, **direction_options)
            for direction in DIRECTIONS}
        for direction, layer in self.direction_layers.items():
            for name in layer.params:
                self.params[f"{direction}.{name}"] = layer.params[name]
                self.grads[f"{direction}.{name}"] = layer.grads[name]

    def forward_cpu(self, *inputs):
        shape = inputs[0].shape
        # winner[i]: the index in DIRECTIONS of the direction whose output is merged[i]. A later
        # direction takes a pixel only where it is strictly larger, so ties stay with the first.
        winner = numpy.zeros(shape, dtype=numpy.int8)
        larger = numpy.empty(shape, dtype=bool)
        claim = numpy.empty(shape, dtype=numpy.int8)
        merged = None
        for index, layer in enumerate(self.direction_layers.values()):
            h, layer.cache = layer.forward_cpu(*inputs)  # each direction keeps its own cache
            if merged is None:
                merged = h
                continue
            numpy.greater(h, merged, out=larger)
            # index exceeds every earlier winner, so max(winner, larger * index) sets winner = index
            # exactly where larger holds (and is much faster than a masked assignment).
            numpy.multiply(larger, numpy.int8(index), out=claim)
            numpy.maximum(winner, claim, out=winner)
            numpy.maximum(merged, h, out=merged)
        return merged, winner

    def backward_cpu(self, grad_output):
        winner = self.cache
        won = numpy.empty(winner.shape, dtype=bool)
        routed = numpy.empty_like(grad_output)  # dh where a direction won, 0 elsewhere; reused
        totals = None
        for index, layer in enumerate(self.direction_layers.values()):
            numpy.equal(winner, index, out=won)
            numpy.multiply(grad_output, won, out=routed)
            grads = layer.backward_cpu(routed)
            grads = grads if isinstance(grads, tuple) else (grads,)
            if totals is None:
                totals = grads
            else:
                for total, grad in zip(totals, grads):
                    total += grad
        return totals if len(totals) > 1 else totals[0]

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
        self.check_inputs(x, g)
        return self.run_forward(x, g)


class SpatialRNN(RecurrentLayer):
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
        super().__init__(channels, dtype=dtype)
        self.direction = check_direction(direction, type(self).__name__)
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: unknown activation {activation!r}; "
                             f"expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.add_param("W", identity_recurrent_weight(self.channels))
        self.add_param("b", numpy.zeros(self.channels))

    def forward(self, x):
        self.check_inputs(x)
        return self.run_forward(x)

    def forward_cpu(self, x):
        h = to_scan_layout(x, self.direction)
        plain_scan_forward(h, self.params["W"], self.params["b"], self.activation)
        return from_scan_layout(h, self.direction, x.shape), h

    def backward_cpu(self, grad_output):
        h = self.cache  # scan layout (T, C, M)
        delta = to_scan_layout(grad_output, self.direction)  # a copy: becomes dx in place
        dW, db = plain_scan_backward(delta, h, self.params["W"], self.activation)
        self.accumulate_grad("W", dW)
        self.accumulate_grad("b", db)
        return from_scan_layout(delta, self.direction, grad_output.shape)

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
        self.check_inputs(x)
        return self.run_forward(x)
