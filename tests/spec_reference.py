"""A slow, obvious float64 reference of the stage-1 networks, written from the spec alone.

Everything here follows the architecture spec, rnng-architecture.md (cited below as "spec, <section>"),
and nothing in minirnng: it reads a model's parameters only as a dict of arrays, by the spec's
names and PyTorch's layouts. Loops and ``numpy.einsum`` are used on purpose, so that a reader can
check each function against its formula; none of it is fast, and it need not be.

Choices the spec leaves open, and what this reference does (the same as the models' docstrings):

- ReLU: the spec puts it after conv1, conv3 and conv5; minirnng runs relu1 and relu3 after the
  pooling, which gives the same numbers (max commutes with ReLU). Here it comes straight after the
  convolution, as the spec's table says.
- CNN-Deep: "two Conv2d 8->32->8, 3x3, pad 1, ReLU" is read as a ReLU after *each* of the two
  convolutions (docs/architecture.md says so too). The spec does not name the two layers;
  minirnng calls them ``deep1`` and ``deep2``, and so does this reference.
- PlainRNN: "as RNNG" is read as: its four eq. 1 layers are named ``rnn.<direction>`` and merged by
  the elementwise maximum, like the gated ones.
"""

import numpy

#: the four scan directions, in the order of the spec ("The spatially variant recurrent layer")
DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
#: channels of X and of G: RNNG(n_classes=K, hidden=8) (spec, "Stage 1")
HIDDEN = 8


# -- layers (spec, "Conventions": PyTorch's layouts) -------------------------------------------------
def conv2d(x, weight, bias, padding):
    """PyTorch's Conv2d with stride 1: a cross-correlation (the kernel is not flipped) over a
    zero-padded input.

    x (N, C, H, W), weight (O, C, k, k), bias (O,) -> (N, O, H + 2p - k + 1, W + 2p - k + 1), with
    ``out[n, o, i, j] = bias[o] + sum_{c, a, b} weight[o, c, a, b] * xpad[n, c, i + a, j + b]``.
    """
    n, c, h, w = x.shape
    out_channels, in_channels, k, _ = weight.shape
    assert in_channels == c, (weight.shape, x.shape)
    padded = numpy.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h, out_w = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    out = numpy.zeros((n, out_channels, out_h, out_w))
    for a in range(k):
        for b in range(k):
            window = padded[:, :, a:a + out_h, b:b + out_w]
            out += numpy.einsum("nchw,oc->nohw", window, weight[:, :, a, b])
    return out + bias[None, :, None, None]


def conv_transpose2d(x, weight, bias, stride, padding):
    """PyTorch's ConvTranspose2d: every input pixel scatters a weighted copy of the kernel.

    x (N, C, H, W), weight (C, O, k, k), bias (O,) -> (N, O, (H - 1) * s - 2p + k, likewise for W),
    with ``full[n, o, i * s + a, j * s + b] += x[n, c, i, j] * weight[c, o, a, b]`` and the output
    ``full`` with ``p`` rows and columns cut from every side, plus the bias.
    """
    n, c, h, w = x.shape
    in_channels, out_channels, k, _ = weight.shape
    assert in_channels == c, (weight.shape, x.shape)
    full = numpy.zeros((n, out_channels, (h - 1) * stride + k, (w - 1) * stride + k))
    for i in range(h):
        for j in range(w):
            # (N, C) pixel times (C, O, k, k) kernel -> (N, O, k, k) patch at (i * s, j * s)
            patch = numpy.einsum("nc,cokl->nokl", x[:, :, i, j], weight)
            full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += patch
    out_h, out_w = (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k
    return full[:, :, padding:padding + out_h, padding:padding + out_w] + bias[None, :, None, None]


def max_pool2x2(x):
    """MaxPool 2x2, stride 2: each output pixel is the maximum of a 2 x 2 block of the input."""
    n, c, h, w = x.shape
    out = numpy.empty((n, c, h // 2, w // 2))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(2, 3))
    return out


def relu(x):
    return numpy.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + numpy.exp(-x))


# -- the recurrences (spec, "The spatially variant recurrent layer (paper eq. 3)") -------------------
def scan_lines(direction, height, width):
    """The lines a scan in ``direction`` runs along, each a list of (row, column) in scan order.

    left_to_right: every row, columns 0 .. W-1; right_to_left: every row, columns W-1 .. 0;
    top_to_bottom: every column, rows 0 .. H-1; bottom_to_top: every column, rows H-1 .. 0.
    """
    if direction == "left_to_right":
        return [[(y, j) for j in range(width)] for y in range(height)]
    if direction == "right_to_left":
        return [[(y, j) for j in reversed(range(width))] for y in range(height)]
    if direction == "top_to_bottom":
        return [[(i, x) for i in range(height)] for x in range(width)]
    if direction == "bottom_to_top":
        return [[(i, x) for i in reversed(range(height))] for x in range(width)]
    raise ValueError(direction)


def scan(x, W, b, direction, g=None, activation=None):
    """One direction of a spatial recurrence, t along each line of ``scan_lines(direction)``, ``h_{-1} = 0``:

    - eq. 3 (``g`` given, no activation): ``h_t = x_t + g_t * (W @ h_{t-1} + b)``, ``*`` elementwise over
      the channels;
    - eq. 1 (``g`` None, ``activation=numpy.tanh``; spec, ``SpatialRNN``): ``h_t = tanh(x_t + W @ h_{t-1} + b)``.

    x, g (N, C, H, W), W (C, C), b (C,) -> h (N, C, H, W)."""
    n_images, channels, height, width = x.shape
    h = numpy.zeros_like(x)
    for n in range(n_images):
        for line in scan_lines(direction, height, width):
            previous = numpy.zeros(channels)
            for row, column in line:
                gate = 1.0 if g is None else g[n, :, row, column]
                value = x[n, :, row, column] + gate * (W @ previous + b)
                h[n, :, row, column] = value if activation is None else activation(value)
                previous = h[n, :, row, column]
    return h


def four_way_max(per_direction):
    """The node-wise max pooling of ``FourWayGatedRNN``: the elementwise maximum of the four
    directions' outputs (a list of four (N, C, H, W) arrays, in DIRECTIONS order). Also returns
    how many elements each direction wins, so that a test can see that every direction matters."""
    stacked = numpy.stack(per_direction)
    winner = stacked.argmax(axis=0)
    return stacked.max(axis=0), [int((winner == d).sum()) for d in range(len(per_direction))]


# -- the networks (spec, "Stage 1" and "Baselines of the paper's Table 1 and 2") ---------------------
def reference_forward(architecture, params, images):
    """The outputs of the spec's network ``architecture`` ("rnng", "cnn-s", "cnn-deep" or "rnn") for
    ``images`` (N, 3, H, W), with ``params`` a dict from the spec's parameter names to arrays.

    Returns ``(outputs, notes)``: ``outputs`` has the spec's ``logits``, ``coarse`` and ``edge``;
    ``notes`` says, for each ReLU, the fraction of its inputs it set to zero and, for the four-way
    merges, how many elements each direction won: a comparison is only as sharp as these are
    away from 0 (a ReLU that clips nothing could be missing and no output would change).
    """
    P = {name: numpy.asarray(value, dtype=numpy.float64) for name, value in params.items()}
    images = numpy.asarray(images, dtype=numpy.float64)
    notes = {}

    def rectified(name, a):
        notes[f"{name} zeroes"] = float((a < 0).mean())
        return relu(a)

    # the trunk, conv1 .. deconv6 (spec, "Stage 1" table)
    a = rectified("relu1", conv2d(images, P["conv1.weight"], P["conv1.bias"], padding=2))
    a = max_pool2x2(a)                                                          # pool2
    a = rectified("relu3", conv2d(a, P["conv3.weight"], P["conv3.bias"], padding=1))
    a = max_pool2x2(a)                                                          # pool4
    a = rectified("relu5", conv2d(a, P["conv5.weight"], P["conv5.bias"], padding=1))
    a = conv_transpose2d(a, P["deconv6.weight"], P["deconv6.bias"], stride=2, padding=1)
    # the split: the first 8 channels are X, the sigmoid of the last 8 is G
    X, G = a[:, :HIDDEN], sigmoid(a[:, HIDDEN:])

    # what conv8 reads: the only part where the networks differ
    if architecture == "rnng":            # FourWayGatedRNN(8) on (X, G)
        scans = [scan(X, P[f"rnn.{d}.W"], P[f"rnn.{d}.b"], d, g=G) for d in DIRECTIONS]
        features, notes["wins"] = four_way_max(scans)
    elif architecture == "rnn":           # PlainRNN: four SpatialRNN (eq. 1, tanh) on X
        scans = [scan(X, P[f"rnn.{d}.W"], P[f"rnn.{d}.b"], d, activation=numpy.tanh) for d in DIRECTIONS]
        features, notes["wins"] = four_way_max(scans)
    elif architecture == "cnn-s":         # CNNS: conv8 reads X
        features = X
    elif architecture == "cnn-deep":      # CNNDeep: Conv2d 8->32, ReLU, Conv2d 32->8, ReLU
        features = rectified("deep1 relu", conv2d(X, P["deep1.weight"], P["deep1.bias"], padding=1))
        features = rectified("deep2 relu", conv2d(features, P["deep2.weight"], P["deep2.bias"], padding=1))
    else:
        raise ValueError(architecture)

    # the three heads: logits from the features, coarse from X, edge from G
    logits = conv_transpose2d(conv2d(features, P["conv8.weight"], P["conv8.bias"], padding=0),
                              P["deconv9.weight"], P["deconv9.bias"], stride=2, padding=1)
    outputs = {
        "logits": logits,
        "coarse": conv2d(X, P["coarse.weight"], P["coarse.bias"], padding=0),
        "edge": conv2d(G, P["edge.weight"], P["edge.bias"], padding=0),
    }
    return outputs, notes
