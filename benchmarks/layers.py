"""Forward+backward time of each layer's fast path against its naive twin, and the conv target.

Run: ``python benchmarks/layers.py``. Prints medians and ratios measured in this one run.

Then RNN-G's convolutions as one worker runs them in training (half a batch, 8 images at 128 x 128,
forward and backward), with their products whole and in column blocks
(:mod:`minirnng.layers.products`), in turns in this one process: what the blocks gain here.

Target (issue: foundation): the fast Conv2d 16->32, 3x3, pad 1 on a (16, 16, 64, 64) float32 batch
does forward+backward in at most 2x the time of plain matrix products of the same FLOP count. The
products are timed on the whole batch and image by image (faster, since one image's operands stay
in cache, which is how the layers run them); the ratio is against the faster of the two.
"""

import argparse
import os
import sys

import numpy

# the checkout this script is in, before any installed minirnng, then this folder (timing.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import blas_description, interleaved_medians, median_seconds, print_table  # noqa: E402

from minirnng import layers  # noqa: E402
from minirnng.layers import naive  # noqa: E402


def forward_backward(layer, x):
    y = layer.forward(x)
    layer.backward(numpy.ones_like(y))


def compare_fast_and_naive(rng):
    """Each layer on an input small enough for the naive loops; the naive one is timed once (one
    run, no warm-up: its Python loops are slow), the fast one by the median of 9 runs."""
    x = rng.standard_normal((2, 8, 16, 16)).astype(numpy.float32)
    cases = [
        ("Conv2d 8->16 3x3 pad 1", lambda m: m.Conv2d(8, 16, 3, padding=1, rng=0)),
        ("ConvTranspose2d 8->4 4x4 s2 p1", lambda m: m.ConvTranspose2d(8, 4, 4, stride=2, padding=1, rng=0)),
        ("MaxPool2d 2", lambda m: m.MaxPool2d(2)),
        ("ReLU", lambda m: m.ReLU()),
        ("Sigmoid", lambda m: m.Sigmoid()),
        ("Tanh", lambda m: m.Tanh()),
    ]
    rows = []
    for name, build in cases:
        # Built once, outside the timed calls: the times are forward+backward only, not the
        # construction (the fast layer's first call, its allocations, is the warm-up run).
        fast_layer, naive_layer = build(layers), build(naive)
        fast = median_seconds(lambda layer=fast_layer: forward_backward(layer, x), repeats=9)
        slow = median_seconds(lambda layer=naive_layer: forward_backward(layer, x), repeats=1, warmup=0)
        rows.append([name, f"{fast * 1e3:.3f}", f"{slow * 1e3:.1f}", f"{slow / fast:.0f}x"])
    print(f"fast against naive, input {x.shape} float32, forward+backward in ms: the fast layer's median of 9 "
          "runs after one warm-up, the naive one's single run:")
    print_table(["layer", "fast ms (median of 9)", "naive ms (1 run)", "naive / fast"], rows)


def conv_against_matmul(rng):
    n, c_in, c_out, k, size = 16, 16, 32, 3, 64
    x = rng.standard_normal((n, c_in, size, size)).astype(numpy.float32)
    conv = layers.Conv2d(c_in, c_out, k, padding=1, rng=0)
    dy = rng.standard_normal((n, c_out, size, size)).astype(numpy.float32)

    def conv_step():
        conv.forward(x)
        conv.backward(dy)

    # The same three products on ready-made operands (forward, weight gradient, input columns), two
    # ways: on the whole batch (operands of 38 MB, read from main memory), and image by image on one
    # image's operands (2.4 MB, in cache), which is faster. The faster is the reference.
    cols = rng.standard_normal((n, c_in * k * k, size * size)).astype(numpy.float32)
    weight = rng.standard_normal((c_out, c_in * k * k)).astype(numpy.float32)
    upstream = dy.reshape(n, c_out, -1)

    def matmul_step():
        numpy.matmul(weight, cols)
        numpy.matmul(upstream, cols.transpose(0, 2, 1))
        numpy.matmul(weight.T, upstream)

    def matmul_step_in_cache():
        for _ in range(n):
            numpy.matmul(weight, cols[0])
            numpy.matmul(upstream[0], cols[0].T)
            numpy.matmul(weight.T, upstream[0])

    conv_time, batch_time, cache_time = interleaved_medians([conv_step, matmul_step, matmul_step_in_cache],
                                                            repeats=15, warmup=2)
    matmul_time = min(batch_time, cache_time)
    gflop = 3 * 2 * n * size * size * c_in * k * k * c_out / 1e9
    print(f"\nConv2d {c_in}->{c_out}, {k}x{k}, pad 1 on {x.shape} float32, forward+backward "
          f"({gflop:.2f} GFLOP of products), medians of 15 interleaved runs:")
    print_table(["what", "median ms", "GFLOP/s"], [
        ["Conv2d forward+backward", f"{conv_time * 1e3:.1f}", f"{gflop / conv_time:.1f}"],
        ["the products on the whole batch", f"{batch_time * 1e3:.1f}", f"{gflop / batch_time:.1f}"],
        ["the products image by image (in cache)", f"{cache_time * 1e3:.1f}", f"{gflop / cache_time:.1f}"],
    ])
    ratio = conv_time / matmul_time
    print(f"ratio conv / the faster products = {ratio:.2f} (target <= 2): {'met' if ratio <= 2 else 'NOT met'}")


def products_whole_and_in_blocks(rng):
    """RNN-G's conv1, conv3, conv5 and deconv6 on half a batch, forward and backward (dx too, but
    conv1's, which training skips), their products whole and in blocks, interleaved medians of 15."""
    from minirnng.layers import products

    cases = [("conv1 3->16 5x5", layers.Conv2d(3, 16, 5, padding=2, rng=0), (8, 3, 128, 128), False),
             ("conv3 16->32 3x3", layers.Conv2d(16, 32, 3, padding=1, rng=0), (8, 16, 64, 64), True),
             ("conv5 32->32 3x3", layers.Conv2d(32, 32, 3, padding=1, rng=0), (8, 32, 32, 32), True),
             ("deconv6 32->16 4x4 s2", layers.ConvTranspose2d(32, 16, 4, stride=2, padding=1, rng=0),
              (8, 32, 32, 32), True)]
    chosen = products.BLOCKS_PAY
    rows, totals = [], [0.0, 0.0]
    try:
        for name, layer, shape, input_gradient in cases:
            x = rng.standard_normal(shape).astype(numpy.float32)
            dy = rng.standard_normal(layer.output_shape(shape)).astype(numpy.float32)
            layer.needs_input_grad = input_gradient

            def step(blocks, layer=layer, x=x, dy=dy):
                products.BLOCKS_PAY = blocks
                layer.forward(x)
                layer.backward(dy)

            whole, blocks = interleaved_medians([lambda: step(False), lambda: step(True)], repeats=15, warmup=2)
            totals[0] += whole
            totals[1] += blocks
            rows.append([name, f"{whole * 1e3:.2f}", f"{blocks * 1e3:.2f}", f"{whole / blocks:.2f}x"])
    finally:
        products.BLOCKS_PAY = chosen
    rows.append(["the four", f"{totals[0] * 1e3:.2f}", f"{totals[1] * 1e3:.2f}", f"{totals[0] / totals[1]:.2f}x"])
    print(f"\nRNN-G's convolutions on half a batch (8 images, 128 x 128), forward+backward in ms, float32, "
          f"products whole and in column blocks, medians of 15 interleaved runs (OpenBLAS core "
          f"{products.openblas_core() or 'unknown'}: minirnng {'cuts' if chosen else 'does not cut'} them here):")
    print_table(["layer", "whole", "in blocks", "whole / blocks"], rows)


if __name__ == "__main__":
    # no options; --help says what the script does instead of starting it
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(f"numpy {numpy.__version__}, {blas_description()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
          "load average %.1f %.1f %.1f" % os.getloadavg())
    generator = numpy.random.default_rng(0)
    compare_fast_and_naive(generator)
    conv_against_matmul(generator)
    products_whole_and_in_blocks(generator)
