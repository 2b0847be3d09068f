"""Benchmark of the four-way gated recurrence (paper eq. 3): fast NumPy, naive loops, PyTorch eager.

    python benchmarks/rnn.py [--threads 1] [--repeats 20]

Times ``forward`` and ``forward + backward`` of ``FourWayGatedRNN(8)`` on ``(16, 8, 64, 64)``
float32 inputs (the shape of the recurrent layer in stage 1 with a batch of 16), and prints the
medians and their ratios:

* **fast**: :class:`minirnng.layers.recurrent.FourWayGatedRNN`, the vectorized scan.
* **naive**: :class:`minirnng.layers.naive.FourWayGatedRNN`, loops over pixels. It takes minutes
  on the full problem, so it runs on ``(1, 8, 16, 16)`` and its time is multiplied by the ratio of
  pixels (256): both passes do the same work per pixel, so the time is linear in the pixel count.
* **torch** (only where ``import torch`` works; it is never a dependency): the same recurrence
  written the straightforward way in eager mode, a Python loop over the columns (or rows) of each
  direction, ``torch.maximum`` to merge and autograd for the backward pass. Its output and
  gradients are compared with ours to make sure both compute the same thing: above a relative
  difference of 1e-4 (``timing.AGREEMENT_TOLERANCE``) its row says DISAGREES instead of the ratios
  and the script exits with status 1.

Threads: the BLAS thread count of NumPy and the intra-op thread count of PyTorch are both set to
``--threads`` (default 1) before either library is imported, so the comparison is like for like.
NumPy's elementwise operations are single-threaded in any case.

Memory: a fast forward + backward allocates a few dozen 2 MB temporaries. glibc returns freed
memory at the top of the heap to the kernel and page-faults it back on the next call; on the
virtual machine where this was written that cost about a fifth of the forward + backward time
(``MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=100000000`` in the environment removes
it). The numbers printed are without such tuning.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import AGREEMENT_TOLERANCE, blas_description, count, median_seconds  # noqa: E402

SHAPE = (16, 8, 64, 64)
NAIVE_SHAPE = (1, 8, 16, 16)


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=count, default=1, help="BLAS / PyTorch threads (default 1)")
    parser.add_argument("--repeats", type=count, default=20, help="timed runs per measurement (default 20)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loops")
    return parser.parse_args()


def make_inputs(numpy, shape, seed=0):
    """Random scores ``x``, sigmoid gates ``g`` in (0, 1) and an upstream gradient, float32."""
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(numpy.float32)
    g = (1 / (1 + numpy.exp(-rng.standard_normal(shape)))).astype(numpy.float32)
    upstream = rng.standard_normal(shape).astype(numpy.float32)
    return x, g, upstream


def randomize_parameters(layer, numpy, recurrent, seed=1):
    """Random recurrent weights that obey the stability rule, random biases (float32)."""
    rng = numpy.random.default_rng(seed)
    for name, value in layer.params.items():
        value[...] = rng.standard_normal(value.shape) * (0.3 if name.endswith(".W") else 0.1)
        if name.endswith(".W"):
            recurrent.constrain_recurrent_weight(value)


def time_layer(layer, x, g, upstream, repeats):
    def forward():
        layer.forward(x, g)

    def forward_backward():
        layer.zero_grad()
        layer.forward(x, g)
        layer.backward(upstream)

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


# -- the PyTorch version, written the obvious way ------------------------------------------------
def torch_direction(torch, x, g, W, b, direction):
    """Eq. 3 along one direction with a Python loop over columns; x, g (N, C, H, W) tensors."""
    if direction in ("top_to_bottom", "bottom_to_top"):  # scan rows: swap the spatial axes
        x, g = x.transpose(2, 3), g.transpose(2, 3)
    columns = range(x.shape[3])
    if direction in ("right_to_left", "bottom_to_top"):
        columns = reversed(columns)
    h = torch.zeros_like(x[..., 0])  # (N, C, S)
    outputs = [None] * x.shape[3]
    for j in columns:
        h = x[..., j] + g[..., j] * (torch.matmul(W, h) + b[:, None])
        outputs[j] = h
    out = torch.stack(outputs, dim=3)
    if direction in ("top_to_bottom", "bottom_to_top"):
        out = out.transpose(2, 3)
    return out


def torch_direction_unbound(torch, x, g, W, b, direction):
    """As :func:`torch_direction`, but the columns are taken with one ``unbind`` instead of one
    indexing per step. Same arithmetic; autograd then gathers the column gradients with one stack
    instead of writing each into its own zero-filled tensor of the full size."""
    if direction in ("top_to_bottom", "bottom_to_top"):
        x, g = x.transpose(2, 3), g.transpose(2, 3)
    x_columns, g_columns = x.unbind(3), g.unbind(3)
    columns = range(len(x_columns))
    if direction in ("right_to_left", "bottom_to_top"):
        columns = reversed(columns)
    h = torch.zeros_like(x_columns[0])
    outputs = [None] * len(x_columns)
    for j in columns:
        h = x_columns[j] + g_columns[j] * (torch.matmul(W, h) + b[:, None])
        outputs[j] = h
    out = torch.stack(outputs, dim=3)
    if direction in ("top_to_bottom", "bottom_to_top"):
        out = out.transpose(2, 3)
    return out


def torch_four_way(torch, x, g, params, directions, one_direction=torch_direction):
    merged = None
    for direction in directions:
        h = one_direction(torch, x, g, params[f"{direction}.W"], params[f"{direction}.b"], direction)
        merged = h if merged is None else torch.maximum(merged, h)
    return merged


def time_torch(torch, layer, x, g, upstream, directions, repeats, one_direction=torch_direction):
    params = {name: torch.tensor(value, requires_grad=True) for name, value in layer.params.items()}
    x_t = torch.tensor(x, requires_grad=True)
    g_t = torch.tensor(g, requires_grad=True)
    upstream_t = torch.tensor(upstream)

    def forward():
        torch_four_way(torch, x_t, g_t, params, directions, one_direction)

    def forward_backward():
        for tensor in [x_t, g_t, *params.values()]:
            tensor.grad = None
        torch_four_way(torch, x_t, g_t, params, directions, one_direction).backward(upstream_t)

    # Check that both compute the same: outputs, and the gradients of x, g and one W.
    forward_backward()
    layer.zero_grad()
    ours = layer.forward(x, g)
    dx, dg = layer.backward(upstream)
    theirs = torch_four_way(torch, x_t, g_t, params, directions, one_direction).detach().numpy()
    difference = max(float(abs(ours - theirs).max()) / float(abs(ours).max()),
                     float(abs(dx - x_t.grad.numpy()).max()) / float(abs(dx).max()),
                     float(abs(dg - g_t.grad.numpy()).max()) / float(abs(dg).max()),
                     float(abs(layer.grads["left_to_right.W"] - params["left_to_right.W"].grad.numpy()).max())
                     / float(abs(layer.grads["left_to_right.W"]).max()))
    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats), difference


def main():
    arguments = parse_arguments()
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(arguments.threads)
    # Imported only now, so that the thread counts above are read by the BLAS libraries.
    import numpy
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from minirnng.layers import naive, recurrent

    print(f"FourWayGatedRNN(8), input {SHAPE} float32, median of {arguments.repeats} runs, "
          f"{arguments.threads} thread(s) for NumPy's BLAS and for PyTorch; numpy {numpy.__version__}, "
          f"{blas_description() or 'BLAS unknown'}")
    x, g, upstream = make_inputs(numpy, SHAPE)
    fast = recurrent.FourWayGatedRNN(8)
    randomize_parameters(fast, numpy, recurrent)
    fast_forward, fast_both = time_layer(fast, x, g, upstream, arguments.repeats)
    rows = [("fast (NumPy)", fast_forward, fast_both, "")]
    status = 0  # 1 where PyTorch's recurrence disagrees with ours

    if not arguments.no_naive:
        scale = numpy.prod(SHAPE) / numpy.prod(NAIVE_SHAPE)
        slow = naive.FourWayGatedRNN(8)
        randomize_parameters(slow, numpy, recurrent)
        small = make_inputs(numpy, NAIVE_SHAPE)
        naive_forward, naive_both = time_layer(slow, *small, repeats=3)
        rows.append(("naive (loops)", naive_forward * scale, naive_both * scale,
                     f"measured on {NAIVE_SHAPE}, times x{scale:.0f}"))

    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch is not installed: skipping the PyTorch comparison (pip install torch)")
    if torch is not None:
        torch.set_num_threads(arguments.threads)
        for name, one_direction in (("torch eager", torch_direction),
                                    ("torch eager, unbind", torch_direction_unbound)):
            torch_forward, torch_both, difference = time_torch(torch, fast, x, g, upstream, recurrent.DIRECTIONS,
                                                               arguments.repeats, one_direction)
            note = f"max relative difference from ours {difference:.1e} (h, dx, dg, dW)"
            if not difference <= AGREEMENT_TOLERANCE:  # NaN too
                note, status = f"DISAGREES: {note}, more than {AGREEMENT_TOLERANCE:.0e}", 1
            rows.append((name, torch_forward, torch_both, note))
        print(f"PyTorch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")

    print(f"{'':24}{'forward':>12}{'fwd+bwd':>12}{'fwd vs fast':>13}{'fwd+bwd vs fast':>17}")
    for name, forward, both, note in rows:
        ratios = (f"{forward / fast_forward:>12.1f}x{both / fast_both:>16.1f}x" if not note.startswith("DISAGREES")
                  else f"{'DISAGREES':>13}{'DISAGREES':>17}")
        print(f"{name:24}{forward * 1e3:>10.2f}ms{both * 1e3:>10.2f}ms{ratios}  {note}")
    return status


if __name__ == "__main__":
    sys.exit(main())
