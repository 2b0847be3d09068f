"""Benchmark: what stage 2 adds to stage 1's inference time, on the CPU, at batch 16.

    python benchmarks/stage2.py [--checkpoint runs/reproduce/table3-synthetic-small/two_stage.npz] \\
        [--threads 1] [--repeats 25]

Times, on 16 synthetic 128 x 128 faces (float32):

* **stage 1**: the 11-class RNN-G's ``predict`` (forward and arg-max), the "1-stage" parser;
* **two stages**: :meth:`TwoStageParser.predict` on the same batch: stage 1, then key points from
  its labels, the four crops, the three component networks and the pasting;

and prints their medians, what stage 2 adds (the difference) and its ratio to stage 1, which the
issue bounds by 50%. Also a breakdown of stage 2's parts (medians of the parts timed alone, each
on the batch's own stage-1 output: their sum is close to what stage 2 adds, not equal, since a
part timed alone finds the cache warmer than inside the parser), and the machine's load average.

Two clocks: the CPU time of this process (``time.process_time``, every thread's, BLAS workers
included), which other processes on a shared machine do not inflate, and the wall-clock time
(``time.perf_counter``). With the default ``--threads 1`` everything runs in one thread, so on an
idle machine the two agree (with more BLAS threads the CPU time is their sum and exceeds it); on
a loaded one only the first is a fair
measure (a busy machine slows stage 1's large matrix products and stage 2's many small steps
differently). The two are timed in alternation, so a load that comes and goes falls on both
alike. Use a trained checkpoint (``--checkpoint``, as written by ``reproduce_table3``): the key
point step's work depends on how many regions stage 1 predicts, and an untrained stage 1 predicts
noise. Without one, the parser has random weights and the script says so.
"""

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import blas_description, count  # noqa: E402  (no NumPy: the thread count is set before it loads)


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a two-stage checkpoint (default: untrained networks)")
    parser.add_argument("--threads", type=count, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--repeats", type=count, default=25, help="timed runs of each (default 25)")
    parser.add_argument("--batch", type=count, default=16, help="images per batch (default 16)")
    return parser.parse_args()


def timed(function):
    """(CPU seconds of this process, every thread's, and wall-clock seconds) of one call of ``function``."""
    cpu, wall = time.process_time(), time.perf_counter()
    function()
    return time.process_time() - cpu, time.perf_counter() - wall


def medians(samples):
    """Medians of (cpu, wall) pairs: (cpu, wall)."""
    return tuple(statistics.median(sample[k] for sample in samples) for k in range(2))


def main():
    arguments = parse_arguments()
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(arguments.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import numpy

    from minirnng.data.pipeline import normalize
    from minirnng.data.synthetic import SyntheticFaces
    from minirnng.models import RNNG
    from minirnng.models.crops import CROPS, crop_bilinear, frame_images
    from minirnng.models.keypoints import keypoints_from_labels
    from minirnng.models.stage2 import TwoStageParser

    if arguments.checkpoint:
        try:
            parser = TwoStageParser.load(arguments.checkpoint)
        except (OSError, ValueError) as error:  # missing, corrupt or not a two-stage checkpoint
            sys.exit(f"benchmarks/stage2.py: {error}")
        source = arguments.checkpoint
    else:
        parser = TwoStageParser(RNNG(n_classes=11, rng=0), rng=0)
        source = "untrained networks (pass --checkpoint for a trained parser)"
    faces = SyntheticFaces(arguments.batch, size=128, n_classes=11, seed=2)
    images = normalize(numpy.stack([faces[i][0] for i in range(len(faces))]))

    stage1_times, total_times = [], []
    parser.predict(images)  # warm-up: allocations, caches
    for _ in range(arguments.repeats):
        stage1_times.append(timed(lambda: parser.stage1.predict(images)))
        total_times.append(timed(lambda: parser.predict(images)))
    stage1, total = medians(stage1_times), medians(total_times)

    # The parts of stage 2, each timed alone on the same batch.
    scores, labels = parser.stage_one(images)
    keypoints, _ = keypoints_from_labels(labels, parser.shape)
    crops = parser.run_crops(images, keypoints)
    main_regions = parser.main_regions(scores, labels)
    matrices = parser.geometry.matrices(keypoints)
    sizes = dict.fromkeys(spec.size for spec in CROPS.values())

    def cut_all():
        framed = frame_images(images)
        for size in sizes:
            crop_bilinear(framed, numpy.stack([matrices[c] for c, spec in CROPS.items() if spec.size == size]), size)

    network_inputs = {}  # each network's batch of crops, as run_crops makes it (both eyes in one)
    for crop, spec in CROPS.items():
        network_inputs.setdefault(spec.network, []).append(crop_bilinear(images, matrices[crop], spec.size))
    parts = {"key points": lambda: keypoints_from_labels(labels, parser.shape), "cutting the crops": cut_all}
    for name, batch in network_inputs.items():
        batch = numpy.concatenate(batch)
        parts[f"{name} network ({len(batch)} crops)"] = functools.partial(parser.networks[name].infer, batch)
    parts["main regions"] = lambda: parser.main_regions(scores, labels)
    parts["pasting"] = lambda: parser.compose(main_regions, crops)
    breakdown = {name: medians([timed(part) for _ in range(arguments.repeats)]) for name, part in parts.items()}

    print(f"stage 2 on the CPU: batch {arguments.batch} of 128 x 128 faces, {arguments.threads} BLAS thread(s), "
          f"medians of {arguments.repeats} runs; numpy {numpy.__version__}, {blas_description() or 'BLAS unknown'}; "
          f"parser: {source}")
    print("load average (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))
    print(f"{'':<38}{'CPU time':>12}{'wall clock':>12}")
    print(f"  {'stage 1 (11-class RNN-G predict)':<36}" + "".join(f"{1000 * t:9.1f} ms" for t in stage1))
    print(f"  {'two stages (TwoStageParser)':<36}" + "".join(f"{1000 * t:9.1f} ms" for t in total))
    print(f"  {'stage 2 adds':<36}" + "".join(f"{1000 * (b - a):9.1f} ms" for a, b in zip(stage1, total)))
    print(f"  {'   as a share of stage 1':<36}" + "".join(f"{100 * (b - a) / a:11.0f}%" for a, b in zip(stage1, total))
          + "   (bound: 50%)")
    for name, seconds in breakdown.items():
        print(f"    {name:<34}" + "".join(f"{1000 * t:9.1f} ms" for t in seconds))


if __name__ == "__main__":
    main()
