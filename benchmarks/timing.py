"""Timing helpers shared by the benchmarks: medians of repeated runs, a table printer, and the
argparse type of their counts.

On a shared machine the load changes from one second to the next, so two functions timed one
after the other can see different machines. :func:`interleaved_medians` times them in turns (A, B,
then B, A, ...: each repeat starts with the next one), so that each sees the same mix of load, and
returns the median of each.
"""

import argparse
import statistics
import time

# The largest relative difference (max |ours - theirs| / max |ours|) at which a benchmark still
# takes PyTorch's network for the same computation as ours. The differences measured so far, from
# float32 rounding, are below 1e-6 (docs/benchmarks.md: 4.1e-7 for RNN-G's logits on a GPU, 6.6e-7
# for the recurrence's outputs and gradients); a wrongly mapped weight or a changed layer gives
# differences far above rounding. Above it, a benchmark prints DISAGREES instead of the speed ratio
# and exits with status 1.
AGREEMENT_TOLERANCE = 1e-4
# The same for parameter gradients, where a max pooling's near-tie counts: where the two largest
# values of a window differ by less than float32's rounding, float32 and float64 (or two float32
# programs) may pick different winners and route that pixel's gradient elsewhere, both correctly.
# In compare_torch's batch this moves conv1's weight gradient by 3.3e-4 (relative) between minirnng's
# float32 and float64 runs; with the images made tie-free (noise of 1e-3 added) by 1.1e-7
# (measured 2026-12-02). A wrongly mapped weight still gives differences of order 1.
GRADIENT_AGREEMENT_TOLERANCE = 1e-2


def count(text):
    """argparse type of a benchmark's counts (``--threads``, ``--repeats``, ``--batch``, ...): a
    whole number of at least 1. Here, not from minirnng.cli, because the scripts parse their
    arguments before NumPy is imported, to set its thread count first."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def median_seconds(function, repeats=7, warmup=1):
    """Median wall-clock seconds of ``function()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(functions, repeats=7, warmup=1, clock=time.perf_counter):
    """Medians of the seconds of each function of ``functions``, called in turns ``repeats`` times
    (the order rotated from one repeat to the next).

    ``clock`` is ``time.perf_counter`` (wall clock) or ``time.process_time`` (the CPU time of this
    process, all its threads: less sensitive to other processes, meaningful for one thread only).
    """
    for function in functions:
        for _ in range(warmup):
            function()
    times = [[] for _ in functions]
    turns = list(zip(functions, times))
    for repeat in range(repeats):
        # each repeat starts with the next function: none always runs right after the same other one
        # (whose threads may still be winding down) or always first
        first = repeat % len(turns)
        for function, recorded in turns[first:] + turns[:first]:
            start = clock()
            function()
            recorded.append(clock() - start)
    return [statistics.median(recorded) for recorded in times]


def print_table(header, rows):
    """Print rows (sequences of strings) under a header, columns padded to the widest cell."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def blas_description():
    """NumPy's BLAS as OpenBLAS reports it, e.g. ``OpenBLAS 0.3.31 (Haswell kernels)``, or '' if unknown.

    The kernels matter: OpenBLAS picks them from the CPU unless ``OPENBLAS_CORETYPE`` names them,
    and on the benchmark machine RNN-G's conv3 and conv5 run 1.4x faster with the AVX-512 (SkylakeX)
    kernels than with the AVX2 (Haswell) ones (docs/benchmarks.md). Read through
    :func:`minirnng.layers.products.openblas_call`, as the layers read it (the caller puts this
    checkout on ``sys.path`` first).
    """
    from minirnng.layers.products import openblas_call, openblas_core
    config, core = openblas_call("get_config"), openblas_core()
    if config is None or core is None:
        return ""
    return f"{' '.join(config.split()[:2])} ({core} kernels)"
