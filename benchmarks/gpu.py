"""minirnng on a CUDA GPU: the GPU tests, then layer and RNN-G timings, and PyTorch eager on the same card.

    python benchmarks/gpu.py [--out gpu-run.md] [--skip-tests] [--quick] [--profile]

One prepared run for a machine with a CUDA GPU (about a minute and a half on an H200, the GPU
tests about 60 s of it):

1. ``pytest -m gpu -q tests/``: every kernel, layer, loss and model on the GPU against the NumPy
   path and finite differences; its summary is printed (the timings run even if a test fails, and
   the script then exits with pytest's status).
2. Each layer's forward+backward (and each loss's) at the sizes RNN-G uses at batch 16, 128 x 128
   float32: median of many runs, timed with CUDA events around each synchronised call.
3. Each RNN-G convolution's forward by the direct kernel and by im2col + cuBLAS at batches 1 to
   64, and which one ``gpu_algorithm = "auto"`` picks.
4. RNN-G inference (``model.predict``: forward and arg-max) at 128 x 128 for batch 1 and batch 256:
   images per second from back-to-back calls (the steady state of an inference loop), and the
   latency of one synchronised call. Also a training step at batch 16 (forward, the three-term
   loss, backward, Adam, the stability rule), and the same with batch normalisation (``--batch-norm``).
5. The same batch-1 inference recorded once into a CUDA graph by
   ``minirnng.cuda.graph.CapturedPredict`` and replayed: what is left when the Python launch
   overhead goes. Reported separately, after checking that the replay gives the eager predict's
   labels; a failure to record, or labels that differ (DISAGREES), is printed and does not stop
   the script, but makes it exit with status 1.
6. If PyTorch with CUDA is importable: the same network in PyTorch eager mode
   (``benchmarks/compare_torch.py``'s ``torch_model``, with our weights loaded and its logits
   compared with ours), timed the same way, and the ratio. Where the logits differ by more than
   1e-4 (largest relative difference, ``timing.AGREEMENT_TOLERANCE``), the two do not compute the
   same thing (weights mapped wrongly, say): the table says DISAGREES instead of the ratio and
   the script exits with status 1.

Targets (issue 6, on an H100): inference >= 3,000 images/s at batch 1, >= 20,000 at batch 256,
faster than PyTorch eager. Without a GPU (or without CuPy) the tests are skipped by pytest and the
timings are skipped with the reason; the script still exits 0.

Exit status: pytest's where the GPU tests fail; otherwise 1 where a section of the timings failed
(each failure is printed, and the other sections still run), the graph's labels differ from the
eager predict's, or PyTorch disagrees; otherwise 0.

``--out FILE`` writes the results as Markdown (card, date, versions, the table) for docs/benchmarks.md.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from timing import AGREEMENT_TOLERANCE, count  # noqa: E402

SIZE, CLASSES, HIDDEN, LAYER_BATCH = 128, 3, 8, 16
TARGETS = {1: 3000, 256: 20000}


class Disagreement(RuntimeError):
    """A result that differs from the reference it is checked against (the script then exits 1)."""


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the results to this Markdown file")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test of the script)")
    parser.add_argument("--test-timeout", type=count, default=240, help="seconds allowed for the GPU tests")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the CPU time of a batch-1 predict goes (cProfile, top functions)")
    arguments = parser.parse_args()
    if arguments.out and os.path.isdir(arguments.out):
        parser.error(f"--out {arguments.out!r} is a folder; give a file name")
    if arguments.out:  # now, not after minutes of a lent GPU
        from minirnng.atomic import check_can_create

        try:
            check_can_create(arguments.out, "--out")
        except OSError as error:
            parser.error(str(error))
    return arguments


# -- 1. the GPU tests -----------------------------------------------------------------------------

def run_gpu_tests(timeout):
    """Run ``pytest -m gpu -q tests/``; print its tail; return (exit status, summary line)."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "tests/"]
    print("$", " ".join(command[2:]), flush=True)
    began = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"the GPU tests did not finish within {timeout} s; going on with the timings")
        return 1, f"timed out after {timeout} s"
    lines = (result.stdout + result.stderr).strip().splitlines()
    print("\n".join(lines[-60:]))
    summary = lines[-1] if lines else "(no output)"
    print(f"GPU tests: exit status {result.returncode}, {time.perf_counter() - began:.0f} s", flush=True)
    return result.returncode, summary


# -- timing ---------------------------------------------------------------------------------------

class GpuTimer:
    """Median times of GPU work measured with CUDA events, for CuPy or PyTorch."""

    def __init__(self, library):
        self.library = library  # "cupy" or "torch"
        if library == "cupy":
            import cupy
            self.event = lambda: cupy.cuda.Event()
            self.elapsed_ms = cupy.cuda.get_elapsed_time
            self.synchronize = cupy.cuda.Device().synchronize
        else:
            import torch
            self.event = lambda: torch.cuda.Event(enable_timing=True)
            self.elapsed_ms = lambda start, end: start.elapsed_time(end)
            self.synchronize = torch.cuda.synchronize

    def latency(self, function, repeats, warmup=3):
        """Median milliseconds of one call, synchronised before and after (events on the current stream)."""
        for _ in range(warmup):
            function()
        self.synchronize()
        start, end = self.event(), self.event()
        times = []
        for _ in range(repeats):
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(self.elapsed_ms(start, end))
        return statistics.median(times)

    def throughput(self, function, calls, blocks, warmup=3):
        """Median milliseconds per call over ``blocks`` runs of ``calls`` back-to-back calls (no
        synchronisation in between, so the CPU queues work while the GPU runs it)."""
        for _ in range(warmup):
            function()
        self.synchronize()
        start, end = self.event(), self.event()
        times = []
        for _ in range(blocks):
            start.record()
            for _ in range(calls):
                function()
            end.record()
            end.synchronize()
            times.append(self.elapsed_ms(start, end) / calls)
        return statistics.median(times)


def random_images(numpy, batch, seed=0):
    return numpy.random.default_rng(seed).uniform(-0.5, 0.5, (batch, 3, SIZE, SIZE)).astype(numpy.float32)


def build_rnng():
    """RNN-G on the GPU, with distinct random recurrent weights (the trained case, not the identity)."""
    from minirnng import backend
    from minirnng.models import RNNG

    with backend.use("numpy"):
        host = RNNG(CLASSES, hidden=HIDDEN, rng=0)
        host.randomize_recurrence(1)
    with backend.use("cupy"):
        model = RNNG(CLASSES, hidden=HIDDEN, rng=0)
        model.load_params({name: value for name, value in host.params().items()})
    return model


# -- 2. layers at batch 16 ------------------------------------------------------------------------

def layer_rows(timer, repeats):
    """Forward+backward of each RNN-G layer and loss at the sizes of a batch of 16, 128 x 128."""
    import cupy
    import numpy

    from minirnng import backend
    from minirnng.layers import BatchNorm2d, Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sigmoid
    from minirnng.layers.recurrent import FourWayGatedRNN, constrain_recurrent_weight
    from minirnng.losses import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy

    n, k, h = LAYER_BATCH, CLASSES, HIDDEN
    s, half, quarter = SIZE, SIZE // 2, SIZE // 4
    rng = numpy.random.default_rng(0)

    def normal(*shape):
        return cupy.asarray(rng.standard_normal(shape).astype(numpy.float32))

    with backend.use("cupy"):
        rnn = FourWayGatedRNN(h)
        for name, value in rnn.params.items():
            random = 0.3 * rng.standard_normal(value.shape)
            value[...] = cupy.asarray(constrain_recurrent_weight(random) if name.endswith("W") else random)
        layers = [
            ("conv1 Conv2d 3->16 5x5", Conv2d(3, 16, 5, padding=2, rng=0), [(n, 3, s, s)]),
            ("bn1 BatchNorm2d(16) (--batch-norm only)", BatchNorm2d(16), [(n, 16, s, s)]),
            ("relu1 ReLU", ReLU(), [(n, 16, s, s)]),
            ("pool2 MaxPool2d 2", MaxPool2d(2), [(n, 16, s, s)]),
            ("conv3 Conv2d 16->32 3x3", Conv2d(16, 32, 3, padding=1, rng=0), [(n, 16, half, half)]),
            ("relu3 ReLU", ReLU(), [(n, 32, half, half)]),
            ("pool4 MaxPool2d 2", MaxPool2d(2), [(n, 32, half, half)]),
            ("conv5 Conv2d 32->32 3x3", Conv2d(32, 32, 3, padding=1, rng=0), [(n, 32, quarter, quarter)]),
            ("relu5 ReLU", ReLU(), [(n, 32, quarter, quarter)]),
            ("deconv6 ConvTranspose2d 32->16 4x4 s2", ConvTranspose2d(32, 2 * h, 4, stride=2, padding=1, rng=0),
             [(n, 32, quarter, quarter)]),
            ("gate Sigmoid", Sigmoid(), [(n, h, half, half)]),
            ("rnn FourWayGatedRNN(8)", rnn, [(n, h, half, half), (n, h, half, half)]),
            ("conv8 Conv2d 8->3 1x1", Conv2d(h, k, 1, rng=0), [(n, h, half, half)]),
            ("deconv9 ConvTranspose2d 3->3 4x4 s2", ConvTranspose2d(k, k, 4, stride=2, padding=1, rng=0),
             [(n, k, half, half)]),
            ("coarse / edge Conv2d 8->3 1x1", Conv2d(h, k, 1, rng=0), [(n, h, half, half)]),
        ]
        rows = []
        for name, layer, shapes in layers:
            inputs = [normal(*shape) for shape in shapes]
            if isinstance(layer, FourWayGatedRNN):
                inputs[1] = 1 / (1 + cupy.exp(-inputs[1]))  # gates in (0, 1)
            upstream = normal(*layer.forward(*inputs).shape)

            def step(layer=layer, inputs=inputs, upstream=upstream):
                layer.forward(*inputs)
                layer.backward(upstream)
            rows.append((name, n, timer.latency(step, repeats)))

        logits, labels = normal(n, k, s, s), cupy.asarray(rng.integers(0, k, (n, s, s)))
        cross_entropy = SoftmaxCrossEntropy()
        rows.append(("loss SoftmaxCrossEntropy", n, timer.latency(
            lambda: (cross_entropy.forward(logits, labels), cross_entropy.backward()), repeats)))
        edge, edge_target = normal(n, 1, half, half), cupy.asarray((rng.random((n, 1, half, half)) < 0.5)
                                                                    .astype(numpy.float32))
        edge_mask = cupy.asarray(rng.random((n, 1, half, half)) < 0.3)
        binary = SigmoidBinaryCrossEntropy()
        rows.append(("loss SigmoidBinaryCrossEntropy", n, timer.latency(
            lambda: (binary.forward(edge, edge_target, edge_mask), binary.backward()), repeats)))
    return rows


def conv_algorithm_rows(timer, repeats, batches=(1, 2, 4, 8, 16, 64)):
    """Forward of each RNN-G convolution shape, by the direct kernel and by im2col + cuBLAS, at
    several batches: where they cross sets ``conv.DIRECT_MAX_MULTIPLY_ADDS``.
    Rows: (layer, batch, multiply-adds, direct ms, im2col ms, the algorithm "auto" picks)."""
    import cupy
    import numpy

    from minirnng import backend
    from minirnng.layers import Conv2d, ConvTranspose2d

    s, half, quarter, h, k = SIZE, SIZE // 2, SIZE // 4, HIDDEN, CLASSES
    shapes = [("conv1 3->16 5x5", lambda: Conv2d(3, 16, 5, padding=2, rng=0), (3, s, s)),
              ("conv3 16->32 3x3", lambda: Conv2d(16, 32, 3, padding=1, rng=0), (16, half, half)),
              ("conv5 32->32 3x3", lambda: Conv2d(32, 32, 3, padding=1, rng=0), (32, quarter, quarter)),
              ("deconv6 32->16 4x4 s2", lambda: ConvTranspose2d(32, 2 * h, 4, stride=2, padding=1, rng=0),
               (32, quarter, quarter)),
              ("conv8 8->3 1x1", lambda: Conv2d(h, k, 1, rng=0), (h, half, half)),
              ("deconv9 3->3 4x4 s2", lambda: ConvTranspose2d(k, k, 4, stride=2, padding=1, rng=0), (k, half, half))]
    rng = numpy.random.default_rng(1)
    rows = []
    with backend.use("cupy"):
        for name, build, shape in shapes:
            layer = build()
            for batch in batches:
                x = cupy.asarray(rng.standard_normal((batch,) + shape).astype(numpy.float32))
                times = {}
                for algorithm in ("direct", "im2col"):
                    layer.gpu_algorithm = algorithm
                    times[algorithm] = timer.throughput(lambda: layer.forward(x), calls=20, blocks=repeats // 3 or 1)
                layer.gpu_algorithm = "auto"
                output_shape = layer.output_shape(x.shape)
                picked = "direct" if layer.uses_direct_kernel(output_shape) else "im2col"
                rows.append((name, batch, layer.multiply_adds(output_shape), times["direct"], times["im2col"], picked))
    return rows


def conv_algorithm_table(rows):
    lines = ["| layer | batch | multiply-adds | direct ms | im2col + cuBLAS ms | faster | auto picks |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, batch, multiply_adds, direct, im2col, picked in rows:
        lines.append(f"| {name} | {batch} | {multiply_adds:,} | {direct:.4f} | {im2col:.4f} | "
                     f"{'direct' if direct < im2col else 'im2col'} | {picked} |")
    return lines


# -- 3. RNN-G ---------------------------------------------------------------------------------------

def count_launches(call):
    """Our kernel launches in one ``call()`` (cuBLAS products and CuPy's own kernels come on top)."""
    from minirnng.cuda import launch

    launched = []
    original = launch.Kernel.__call__

    def counting(self, grid, block, args):
        launched.append(self.name)
        return original(self, grid, block, args)
    launch.Kernel.__call__ = counting
    try:
        call()
    finally:
        launch.Kernel.__call__ = original
    return len(launched)


def rnng_rows(timer, quick):
    """Inference at batch 1 and 256 and a training step at batch 16; returns (rows, notes, model)."""
    import cupy
    import numpy

    from minirnng import backend
    from minirnng.models import RNNG
    from minirnng.objective import StageOneObjective
    from minirnng.train import TrainConfig, build_optimizer

    rows, notes = [], []
    with backend.use("cupy"):
        model = build_rnng()
        one = cupy.asarray(random_images(numpy, 1))
        notes.append(f"our kernel launches at batch 1: {count_launches(lambda: model.predict(one))} per predict "
                     f"(model.infer, plus CuPy's arg-max), {count_launches(lambda: model.forward(one))} per "
                     "training forward; no cuBLAS product at this size")
        blocks = 5 if quick else 15
        per_call = timer.throughput(lambda: model.predict(one), calls=50, blocks=blocks, warmup=10)
        latency = timer.latency(lambda: model.predict(one), repeats=20 if quick else 100, warmup=5)
        rows.append(("RNN-G predict (back to back)", 1, per_call))
        rows.append(("RNN-G predict (one synchronised call)", 1, latency))
        many = cupy.asarray(random_images(numpy, 256))
        rows.append(("RNN-G predict", 256, timer.latency(lambda: model.predict(many), repeats=5 if quick else 15)))
        many = None  # the batch of 256 is not needed any more
        cupy.get_default_memory_pool().free_all_blocks()

        from compare_torch import batch as labelled_batch
        images, labels = (cupy.asarray(a) for a in labelled_batch(numpy))
        objective = StageOneObjective()
        rng = numpy.random.default_rng(0)
        normalized = RNNG(CLASSES, hidden=HIDDEN, rng=0, batch_norm=True)
        normalized.load_params({**normalized.params(), **model.params()})
        for name, network in [("RNN-G training step", model), ("RNN-G training step with --batch-norm", normalized)]:
            optimizer = build_optimizer(TrainConfig(lr=1e-4), network)  # Adam on the trained parameters

            def train_step(network=network, optimizer=optimizer):
                network.zero_grad()
                outputs = network.forward(images)
                _, _, grads = objective(outputs, labels, rng)
                network.backward(grads, input_gradient=False)
                optimizer.step()
                network.constrain()
            rows.append((name, LAYER_BATCH, timer.latency(train_step, repeats=5 if quick else 20)))
    return rows, notes


def graph_rows(timer, quick):
    """Batch-1 predict recorded once into a CUDA graph (``minirnng.cuda.graph.CapturedPredict``)
    and replayed: the GPU time without Python. Checked against the eager labels first."""
    import cupy
    import numpy

    from minirnng import backend
    from minirnng.cuda.graph import CapturedPredict

    with backend.use("cupy"):
        model = build_rnng()
        images = cupy.asarray(random_images(numpy, 1, seed=5))
        captured = CapturedPredict(model, images.shape)
        if not bool((captured(images) == model.predict(images)).all()):
            raise Disagreement("DISAGREES: the replayed graph's labels differ from the eager predict's")
        per_call = timer.throughput(lambda: captured(images), calls=50, blocks=5 if quick else 15)
    return [("RNN-G predict, CUDA graph replay (CapturedPredict)", 1, per_call)]


def profile_batch_one(calls=300, top=25):
    """Print cProfile's top functions by own time over ``calls`` batch-1 predicts: at batch 1 the GPU
    waits for Python, so this is where launch overhead can be cut."""
    import cProfile
    import pstats

    import cupy
    import numpy

    from minirnng import backend

    with backend.use("cupy"):
        model = build_rnng()
        one = cupy.asarray(random_images(numpy, 1))
        for _ in range(10):
            model.predict(one)
        cupy.cuda.Device().synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            model.predict(one)
        cupy.cuda.Device().synchronize()
        profiler.disable()
    print(f"\ncProfile of {calls} batch-1 predicts (own time, top {top}):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


# -- 5. PyTorch eager -------------------------------------------------------------------------------

def torch_rows(timer_factory, quick):
    """The same network in PyTorch eager (with our weights): (rows, note, whether its logits agree
    with ours), or (None, reason, None) without torch + CUDA."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed: no comparison", None
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no CUDA GPU: no comparison", None
    import numpy

    from compare_torch import torch_model
    from minirnng import backend

    # Full float32 like ours: PyTorch would otherwise run its convolutions in TF32 on Ampere and later.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    timer = timer_factory("torch")
    ours = build_rnng()
    module = torch_model(torch, hidden=HIDDEN)
    module.load_state_dict({name: torch.from_numpy(backend.to_numpy(value).copy())
                            for name, value in ours.params().items()})
    module = module.cuda().eval()
    rows = []
    with torch.no_grad():
        check = random_images(numpy, 2, seed=7)
        with backend.use("cupy"):
            expected = backend.to_numpy(ours.forward(backend.to_device(check))["logits"])
        theirs = module(torch.from_numpy(check).cuda())["logits"].cpu().numpy()
        difference = float(numpy.abs(theirs - expected).max() / numpy.abs(expected).max())
        agrees = difference <= AGREEMENT_TOLERANCE  # False for NaN
        for batch in (1, 256):
            images = torch.from_numpy(random_images(numpy, batch)).cuda()

            def predict(images=images):
                return module.logits(images).argmax(1)  # no training heads, as our predict
            # the same calls, blocks and repeats as ours (rnng_rows), so the two medians are alike
            if batch == 1:
                milliseconds = timer.throughput(predict, calls=50, blocks=5 if quick else 15, warmup=10)
            else:
                milliseconds = timer.latency(predict, repeats=5 if quick else 15)
            rows.append((batch, milliseconds))
    note = (f"PyTorch {torch.__version__} eager (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
            f"float32 without TF32, same weights; its logits differ from ours by {difference:.1e} "
            "(largest relative difference)")
    if not agrees:
        note += (f": DISAGREES (more than {AGREEMENT_TOLERANCE:.0e}), the two networks do not compute the same "
                 "thing, so no ratio is given")
    return rows, note, agrees


# -- the report -------------------------------------------------------------------------------------

def device_description():
    import cupy
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = properties["name"]
    name = name.decode() if isinstance(name, bytes) else name

    def version(number):
        return f"{number // 1000}.{number % 1000 // 10}"
    return (f"{name}, CuPy {cupy.__version__}, CUDA runtime {version(cupy.cuda.runtime.runtimeGetVersion())}, "
            f"driver {version(cupy.cuda.runtime.driverGetVersion())}, Python {platform.python_version()}")


def table(rows, torch_by_batch, torch_agrees=True):
    """Markdown table lines: what, batch, ms, images/s (and PyTorch's, and the ratio, for inference;
    DISAGREES instead of the ratio where PyTorch's logits do not agree with ours)."""
    lines = ["| what | batch | ms | images/s | PyTorch eager images/s | ours / PyTorch | target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, batch, milliseconds in rows:
        rate = batch / (milliseconds / 1e3)
        theirs = ratio = target = ""
        if name.startswith("RNN-G predict") and "synchronised" not in name:
            if batch in torch_by_batch and "graph" not in name:
                their_rate = batch / (torch_by_batch[batch] / 1e3)
                theirs, ratio = f"{their_rate:,.0f}", f"{rate / their_rate:.1f}x" if torch_agrees else "DISAGREES"
            if batch in TARGETS:
                target = f">= {TARGETS[batch]:,} ({'met' if rate >= TARGETS[batch] else 'not met'})"
        lines.append(f"| {name} | {batch} | {milliseconds:.3f} | {rate:,.0f} | {theirs} | {ratio} | {target} |")
    return lines


def main():
    arguments = parse_arguments()
    began = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    status, summary = (0, "not run (--skip-tests)") if arguments.skip_tests else run_gpu_tests(arguments.test_timeout)
    report = [f"### GPU run, {stamp}", ""]  # a dated section of docs/benchmarks.md's GPU part

    from minirnng import backend
    usable, reason = backend.cupy_status()
    if not usable:
        message = f"No GPU timing: {reason}."
        print(message)
        report += [message, "", f"GPU tests: {summary}"]
    else:
        description = device_description()
        print(f"\n{description}", flush=True)
        timer = GpuTimer("cupy")
        repeats = 10 if arguments.quick else 30
        rows, notes = [], []
        sections = [("layers at batch 16", lambda: layer_rows(timer, repeats)),
                    ("RNN-G", lambda: rnng_rows(timer, arguments.quick)),
                    ("CUDA graph", lambda: (graph_rows(timer, arguments.quick), []))]
        failed = False  # a section failed or disagreed: exit 1 at the end
        for title, run in sections:
            try:
                result = run()
            except Exception as error:  # report and go on: the other sections still count
                notes.append(f"{title}: failed ({type(error).__name__}: {error})")
                print(notes[-1], flush=True)
                failed = True
                continue
            new_rows, new_notes = result if isinstance(result, tuple) else (result, [])
            rows += new_rows
            notes += new_notes
            print(f"{title}: done ({time.perf_counter() - began:.0f} s so far)", flush=True)
        if arguments.profile:
            try:
                profile_batch_one()
            except Exception as error:
                print(f"profile failed ({type(error).__name__}: {error})", flush=True)
                failed = True
        algorithm_lines = []
        try:
            algorithm_lines = conv_algorithm_table(conv_algorithm_rows(timer, repeats))
            print("\nconvolution forward, back-to-back calls, median ms per call:\n" + "\n".join(algorithm_lines),
                  flush=True)
        except Exception as error:
            notes.append(f"convolution algorithms: failed ({type(error).__name__}: {error})")
            print(notes[-1], flush=True)
            failed = True
        torch_by_batch, torch_agrees = {}, None
        try:
            compared, note, torch_agrees = torch_rows(GpuTimer, arguments.quick)
            torch_by_batch = dict(compared or [])
        except Exception as error:
            note = f"PyTorch comparison failed ({type(error).__name__}: {error})"
            failed = True
        notes.append(note)
        failed = failed or torch_agrees is False
        lines = table(rows, torch_by_batch, torch_agrees is not False)
        report += [description, "", f"GPU tests: {summary}", "", *lines, "", *[f"- {note}" for note in notes],
                   "", "Layers: forward+backward, one synchronised call, median. Predict at batch 1: back-to-back "
                   "calls, median per call over blocks of 50; at batch 256 and the training step: one "
                   "synchronised call, median. float32 throughout."]
        if algorithm_lines:
            report += ["", "Convolution forward by algorithm (back-to-back calls, median ms per call):", "",
                       *algorithm_lines]
        print("\n" + "\n".join(lines))
        print("\n".join(f"- {note}" for note in notes))
        if failed and not status:
            status = 1
            print("exit status 1: a section failed or disagreed (see the notes above)")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    if arguments.out:
        # the run is minutes of a lent GPU: make the folder rather than lose the results
        os.makedirs(os.path.dirname(os.path.abspath(arguments.out)), exist_ok=True)
        with open(arguments.out, "w") as handle:
            handle.write("\n".join(report) + "\n")
        print(f"written to {arguments.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
