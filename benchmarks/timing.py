"""Timing helpers shared by the benchmarks: medians of repeated runs, and a table printer."""

import statistics
import time


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


def print_table(header, rows):
    """Print rows (sequences of strings) under a header, columns padded to the widest cell."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
