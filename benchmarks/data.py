"""How fast the data layer is: synthetic faces per second, and the augmentation of a batch.

Run ``python benchmarks/data.py`` (single process). It prints the median of several runs of:
- SyntheticFaces at 128x128, single face (the target is at least 500 images per second);
- SyntheticFaces in the 512x512 multi-face setting;
- Augmentation of a batch of 16 images at 128x128.
"""

import argparse
import os
import statistics
import sys
import time

import numpy

# the checkout this script is in, before any installed minirnng, then this folder (timing.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import blas_description, count  # noqa: E402

from minirnng.data import HELEN_CLASSES, Augmentation, SyntheticFaces, preload  # noqa: E402


def images_per_second(dataset, count, start):
    began = time.perf_counter()
    for index in range(start, start + count):
        dataset[index]
    return count / (time.perf_counter() - began)


def milliseconds_per_batch(augmentation, images, labels, rng):
    began = time.perf_counter()
    augmentation(images, labels, HELEN_CLASSES, rng)
    return 1000.0 * (time.perf_counter() - began)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=count, default=7, help="runs to take the median of")
    parser.add_argument("--images", type=count, default=200, help="single-face images per run")
    arguments = parser.parse_args()
    print(f"numpy {numpy.__version__}, {blas_description() or 'BLAS unknown'}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
          "load average %.1f %.1f %.1f" % os.getloadavg())

    single = SyntheticFaces(arguments.runs * arguments.images, size=128)
    rates = [images_per_second(single, arguments.images, run * arguments.images) for run in range(arguments.runs)]
    print(f"SyntheticFaces 128x128 single face: {statistics.median(rates):7.0f} images/s "
          f"(median of {arguments.runs} runs of {arguments.images}; min {min(rates):.0f}, max {max(rates):.0f})")

    multi_count = 10
    multi = SyntheticFaces(arguments.runs * multi_count, multi_face=True)
    rates = [images_per_second(multi, multi_count, run * multi_count) for run in range(arguments.runs)]
    print(f"SyntheticFaces 512x512 multi-face:  {statistics.median(rates):7.1f} images/s "
          f"(median of {arguments.runs} runs of {multi_count})")

    batch = preload(SyntheticFaces(16, size=128))
    rng = numpy.random.default_rng(0)
    times = [milliseconds_per_batch(Augmentation(), batch.images, batch.labels, rng) for _ in range(arguments.runs * 3)]
    print(f"Augmentation of 16 x 128x128:        {statistics.median(times):7.1f} ms per batch "
          f"(median of {len(times)} runs)")


if __name__ == "__main__":
    main()
