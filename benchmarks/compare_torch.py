"""minirnng's RNN-G against the same network in PyTorch eager mode, on the CPU, in one run.

    python benchmarks/compare_torch.py [--threads 2] [--parallelism processes|threads|blas] [--repeats 10]

1. Builds RNN-G (3 classes) in minirnng and the same network as a ``torch.nn.Module`` whose
   parameter names are minirnng's, copies our weights into it with
   ``module.load_state_dict({k: torch.from_numpy(v) ...})``, and checks that the two agree on the
   three outputs and on the parameter gradients of the same loss. Where the largest relative
   difference of the outputs exceeds 1e-4 (``timing.AGREEMENT_TOLERANCE``), or that of the parameter
   gradients 1e-2 (a max pooling's near-ties move them more; ``timing.GRADIENT_AGREEMENT_TOLERANCE``),
   the two do not compute the same thing (a weight mapped wrongly, a layer changed): the script says DISAGREES, prints no
   ratio, and exits with status 1 once it has measured the rest.
2. Times, at batch 16, 128 x 128, float32: inference (forward and arg-max) and a training step
   (forward, the three-term loss with a fresh edge-loss sample mask, backward, an Adam step, the
   stability rule on the recurrent W: the same work on both sides), medians of ``--repeats`` runs, and
   prints images per second and the ratios. Ours and PyTorch's run in turns (A, B, A, B, ...), so
   that both see the same load on a shared machine; with ``--threads 1`` the medians of the CPU
   time of each are printed too (the work itself, whatever the load). The PyTorch recurrence is
   written the straightforward way, in its faster form (a Python loop over the columns that one
   ``unbind`` takes, autograd for the backward: ``rnn.torch_direction_unbound``; see
   ``benchmarks/rnn.py``), and its inference computes the logits alone, as ours does. The labels
   the two infer are compared too, before any timing.

   ``--threads T`` is the number of cores each library may use. PyTorch runs with
   ``torch.set_num_threads(T)``; minirnng, with ``--parallelism processes`` (the default, what
   ``minirnng train`` does), shares each batch among T workers, this process and T - 1 worker
   processes (:class:`minirnng.processes.ProcessParallel`), with ``--parallelism threads`` among
   T threads (:class:`minirnng.parallel.DataParallel`), each running its products on one OpenBLAS
   thread, and with ``--parallelism blas`` runs the model alone on T OpenBLAS threads. With T > 1
   PyTorch is timed with one thread as well, in the same turns, and the ratios are given against
   each and against the faster of the two in this run (the row "PyTorch's best").
3. Measures the peak resident memory of a process that runs only minirnng's training steps (with
   worker processes, the sum of its peak and theirs).

With ``--keep-freed-memory``, glibc's malloc is first told to keep freed memory for reuse
(:func:`minirnng.train.keep_freed_memory`, for training to call once at its start).

Targets (issue: face parsing end to end): our training step >= 2x PyTorch eager's images/s, our
inference >= 1.5x, and the peak memory of our training <= 1 GB. PyTorch is never a dependency of
minirnng; without it only minirnng's side is measured.
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import AGREEMENT_TOLERANCE, GRADIENT_AGREEMENT_TOLERANCE, count  # noqa: E402  (no NumPy: the thread count is set before it loads)
BATCH, SIZE, CLASSES = 16, 128, 3
#: the share of pixels on which the two inferred label maps must agree (the rest: near-ties of two logits)
LABEL_AGREEMENT = 0.999


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=count, default=2, help="cores each library may use (default 2)")
    parser.add_argument("--parallelism", choices=("processes", "threads", "blas"), default="processes",
                        help="how minirnng uses --threads cores: workers sharing each batch, one BLAS thread each, "
                             "in processes (default, as minirnng train) or threads; or one model on that many "
                             "BLAS threads")
    parser.add_argument("--repeats", type=count, default=10)
    parser.add_argument("--openblas-core", metavar="NAME",
                        help="OPENBLAS_CORETYPE for NumPy's OpenBLAS, e.g. SkylakeX (AVX-512) or Haswell (AVX2); "
                             "default: the environment's (OpenBLAS detects the CPU when it is unset)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call minirnng.train.keep_freed_memory() first (glibc's malloc then reuses "
                             "freed memory instead of page-faulting it in again; it affects PyTorch, in the same "
                             "process, too)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def batch(numpy, seed=0):
    """Random images in [-0.5, 0.5] and labels made of three blobs, so all losses are non-trivial."""
    rng = numpy.random.default_rng(seed)
    images = rng.uniform(-0.5, 0.5, (BATCH, 3, SIZE, SIZE)).astype(numpy.float32)
    rows, cols = numpy.mgrid[0:SIZE, 0:SIZE]
    labels = numpy.zeros((BATCH, SIZE, SIZE), dtype=numpy.int64)
    for n in range(BATCH):
        cy, cx = rng.uniform(40, 88, 2)
        labels[n][(rows - cy) ** 2 + (cols - cx) ** 2 < 35 ** 2] = 2
        labels[n][(rows - cy - 8) ** 2 + (cols - cx) ** 2 < 25 ** 2] = 1
    return images, labels


class OurStep:
    """One minirnng training step and one inference, on a fixed batch, with ``workers`` threads or
    processes (``parallel``, as ``minirnng.train.PARALLEL`` names them) sharing each batch (1: the
    model alone)."""

    def __init__(self, numpy, workers=1, parallel="processes"):
        from minirnng.models import RNNG
        from minirnng.objective import StageOneObjective
        from minirnng.optim import Adam
        from minirnng.train import PARALLEL

        self.numpy = numpy
        self.model = RNNG(CLASSES, rng=0)
        self.model.randomize_recurrence(1)
        self.network = PARALLEL[parallel](self.model, workers)
        self.objective = StageOneObjective()
        self.optimizer = Adam(self.model.params(), self.model.grads(), lr=1e-4)
        self.images, self.labels = batch(numpy)
        self.rng = numpy.random.default_rng(0)

    def train_step(self):
        model = self.model
        model.zero_grad()
        self.network.objective_step(self.images, self.labels, self.objective, self.rng)  # as minirnng train does
        self.optimizer.step()
        model.constrain()

    def inference(self):
        return self.network.predict(self.images)


def torch_model(torch, hidden=8):
    """RNN-G as a torch.nn.Module with minirnng's parameter names (and PyTorch's layouts)."""
    from rnn import torch_direction_unbound, torch_four_way

    nn = torch.nn

    class Directions(nn.Module):
        def __init__(self):
            super().__init__()
            for direction in ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top"):
                module = nn.Module()
                module.W = nn.Parameter(torch.eye(hidden))
                module.b = nn.Parameter(torch.zeros(hidden))
                self.add_module(direction, module)

        def forward(self, x, g):
            params = {f"{name}.{p}": getattr(module, p) for name, module in self.named_children() for p in "Wb"}
            # the faster of rnn.py's two PyTorch loops: columns taken by one unbind, not one indexing a step
            return torch_four_way(torch, x, g, params, [name for name, _ in self.named_children()],
                                  one_direction=torch_direction_unbound)

    class TorchRNNG(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 5, padding=2)
            self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
            self.conv5 = nn.Conv2d(32, 32, 3, padding=1)
            self.deconv6 = nn.ConvTranspose2d(32, 2 * hidden, 4, stride=2, padding=1)
            self.rnn = Directions()
            self.conv8 = nn.Conv2d(hidden, CLASSES, 1)
            self.deconv9 = nn.ConvTranspose2d(CLASSES, CLASSES, 4, stride=2, padding=1)
            self.coarse = nn.Conv2d(hidden, CLASSES, 1)
            self.edge = nn.Conv2d(hidden, 1, 1)

        def trunk(self, images):
            relu, pool = torch.relu, nn.functional.max_pool2d
            a = pool(relu(self.conv1(images)), 2)
            a = pool(relu(self.conv3(a)), 2)
            a = self.deconv6(relu(self.conv5(a)))
            return a[:, :hidden], torch.sigmoid(a[:, hidden:])

        def forward(self, images):
            x, g = self.trunk(images)
            logits = self.deconv9(self.conv8(self.rnn(x, g)))
            return {"logits": logits, "coarse": self.coarse(x), "edge": self.edge(g)}

        def logits(self, images):
            """The logits alone, without the coarse and edge heads that only training reads (as ours infers)."""
            x, g = self.trunk(images)
            return self.deconv9(self.conv8(self.rnn(x, g)))

    return TorchRNNG()


class TorchStep:
    """The same step in PyTorch eager, with the same batch: as ours, each step draws a fresh
    edge-loss sample mask (the NumPy code of minirnng's objective, as a PyTorch training loop would
    prepare it with its data) and ends with the stability rule on the recurrent W."""

    def __init__(self, torch, numpy, ours):
        from minirnng.losses import boundary_sample_mask, boundary_target

        self.torch, self.numpy = torch, numpy
        self.module = torch_model(torch)
        self.module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.model.params().items()})
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=1e-4)
        self.recurrent_weights = [p for name, p in self.module.named_parameters() if name.endswith(".W")]
        images, labels = batch(numpy)
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.subsampled_labels = numpy.ascontiguousarray(labels[:, ::2, ::2])
        self.subsampled = torch.from_numpy(self.subsampled_labels)
        self.rng = numpy.random.default_rng(0)
        # the mask of the agreement check, which ours is given too (check_agreement)
        self.edge_target, self.edge_mask = self.edge_terms(boundary_target, boundary_sample_mask, rng=0)
        self.sample = (boundary_target, boundary_sample_mask)

    def edge_terms(self, boundary_target, boundary_sample_mask, rng):
        target = boundary_target(self.subsampled_labels)
        return self.torch.from_numpy(target), self.torch.from_numpy(boundary_sample_mask(target, rng=rng))

    def loss(self, edge_target=None, edge_mask=None):
        functional = self.torch.nn.functional
        edge_target = self.edge_target if edge_target is None else edge_target
        edge_mask = self.edge_mask if edge_mask is None else edge_mask
        outputs = self.module(self.images)
        edge = functional.binary_cross_entropy_with_logits(outputs["edge"][edge_mask], edge_target[edge_mask])
        return (functional.cross_entropy(outputs["logits"], self.labels)
                + functional.cross_entropy(outputs["coarse"], self.subsampled) + edge)

    def train_step(self):
        self.optimizer.zero_grad()
        self.loss(*self.edge_terms(*self.sample, rng=self.rng)).backward()
        self.optimizer.step()
        with self.torch.no_grad():  # the spec's rule, as minirnng.layers.recurrent.constrain_recurrent_weight
            for weight in self.recurrent_weights:
                largest_row_sum = float(weight.abs().sum(dim=1).max())
                if largest_row_sum > 1:
                    weight.div_(largest_row_sum)

    def inference(self):
        with self.torch.inference_mode():
            return self.module.logits(self.images).argmax(1)


def check_agreement(torch, numpy, ours, theirs):
    """Largest relative differences of the outputs and of the parameter gradients (same loss, same mask)."""
    from minirnng.losses import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy

    model = ours.model
    outputs = model.forward(ours.images)
    with torch.no_grad():
        reference = theirs.module(theirs.images)
    # numpy.max, not max(): a NaN anywhere makes the result NaN, which the caller's check rejects
    worst_output = float(numpy.max([numpy.abs(outputs[k] - reference[k].numpy()).max() / numpy.abs(outputs[k]).max()
                                    for k in outputs]))
    fine, coarse, edge = SoftmaxCrossEntropy(), SoftmaxCrossEntropy(), SigmoidBinaryCrossEntropy()
    fine.forward(outputs["logits"], theirs.labels.numpy())
    coarse.forward(outputs["coarse"], theirs.subsampled.numpy())
    edge.forward(outputs["edge"], theirs.edge_target.numpy(), theirs.edge_mask.numpy())
    model.zero_grad()
    model.backward({"logits": fine.backward(), "coarse": coarse.backward(), "edge": edge.backward()})
    theirs.module.zero_grad()
    theirs.loss().backward()
    named = dict(theirs.module.named_parameters())
    worst_grad = float(numpy.max([numpy.abs(g - named[k].grad.numpy()).max() / max(numpy.abs(g).max(), 1e-12)
                                  for k, g in model.grads().items()]))
    return worst_output, worst_grad


def peak_memory_of_our_training(threads, parallelism, keep_freed_memory):
    """Peak resident memory (MB) of a fresh process running minirnng training steps only (it
    inherits this process's environment, OPENBLAS_CORETYPE included)."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", "--threads", str(threads),
               "--parallelism", parallelism]
    if keep_freed_memory:
        command.append("--keep-freed-memory")
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def peak_resident_megabytes():
    """This process's peak resident memory in MB: ``VmHWM`` of /proc/self/status on Linux.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over from the parent across fork and exec,
    so a probe started by this script (with PyTorch and both models loaded) would report the
    parent's peak (600 MB) instead of its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def worker_peak_megabytes(network):
    """The summed peak resident memory (MB) of a network's worker processes (``VmHWM``, Linux)."""
    total = 0.0
    for worker in network.replicas[1:]:
        process = getattr(worker, "process", None)
        if process is not None:
            with open(f"/proc/{process.pid}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    return total


def memory_probe(workers, parallel):
    import numpy
    step = OurStep(numpy, workers, parallel)
    for _ in range(5):
        step.train_step()
    print(peak_resident_megabytes() + worker_peak_megabytes(step.network))
    step.network.close()


def main():
    arguments = parse_arguments()
    workers = 1 if arguments.parallelism == "blas" else arguments.threads
    parallel = "threads" if arguments.parallelism == "blas" else arguments.parallelism
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(arguments.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(arguments.threads // workers)
    if arguments.openblas_core:
        os.environ["OPENBLAS_CORETYPE"] = arguments.openblas_core
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    malloc = "default glibc malloc"
    if arguments.keep_freed_memory:
        from minirnng.train import keep_freed_memory
        if keep_freed_memory():
            malloc = "glibc malloc keeps freed memory (minirnng.train.keep_freed_memory)"
    if arguments.memory_probe:
        return memory_probe(workers, parallel)
    import numpy
    from timing import blas_description, interleaved_medians, median_seconds, print_table

    ours = OurStep(numpy, workers, parallel)
    status = 0  # 1 where PyTorch's network disagrees with ours
    try:
        import torch
    except ImportError:
        torch = None
    load = "load average %.1f %.1f %.1f" % os.getloadavg()
    ours_threads = (f"{workers} worker {parallel} sharing each batch, 1 BLAS thread each" if workers > 1
                    else f"{os.environ['OPENBLAS_NUM_THREADS']} BLAS thread(s)")
    print(f"RNN-G ({CLASSES} classes), batch {BATCH}, {SIZE}x{SIZE}, float32, CPU, {arguments.threads} thread(s): "
          f"minirnng {ours_threads}; medians of {arguments.repeats} runs; numpy {numpy.__version__}, "
          f"{blas_description()}; {malloc}; {os.cpu_count()} CPUs, {load} at the start")
    if arguments.openblas_core and blas_description() and \
            f"({arguments.openblas_core.lower()} kernels)" not in blas_description().lower():
        print(f"note: with --openblas-core {arguments.openblas_core}, OpenBLAS runs the kernels named above (it runs "
              "another core's kernels for some names, e.g. Haswell's for Zen, and ignores a name it does not know "
              "or one this CPU cannot run)")
    if torch is None:
        print("PyTorch is not installed (pip install torch==2.13.0 for a CPU build): minirnng only")
        our_train = median_seconds(ours.train_step, repeats=arguments.repeats, warmup=2)
        our_infer = median_seconds(ours.inference, repeats=arguments.repeats, warmup=2)
        print(f"training step: {BATCH / our_train:.0f} images/s; inference: {BATCH / our_infer:.0f} images/s")
    else:
        torch.set_num_threads(arguments.threads)
        theirs = TorchStep(torch, numpy, ours)
        worst_output, worst_grad = check_agreement(torch, numpy, ours, theirs)
        # False for NaN
        agrees = worst_output <= AGREEMENT_TOLERANCE and worst_grad <= GRADIENT_AGREEMENT_TOLERANCE
        print(f"agreement with PyTorch {torch.__version__}: outputs {worst_output:.1e}, "
              f"parameter gradients {worst_grad:.1e} (largest relative difference)"
              + ("" if agrees else f": DISAGREES (more than {AGREEMENT_TOLERANCE:.0e} for the outputs or "
                 f"{GRADIENT_AGREEMENT_TOLERANCE:.0e} for the gradients): the two networks do not compute the same "
                 "thing, so no ratio is given"))
        # the timed inference paths (ours: infer through the workers, fused ReLUs, no heads) give the
        # labels the checked forward passes give; a pixel whose two best logits are within rounding may differ
        same_labels = float((ours.inference() == theirs.inference().numpy()).mean())
        print(f"inference labels: the same for {100 * same_labels:.3f}% of the pixels"
              + ("" if same_labels >= LABEL_AGREEMENT else f": DISAGREES (less than {100 * LABEL_AGREEMENT:g}%)"))
        agrees = agrees and same_labels >= LABEL_AGREEMENT
        status = 0 if agrees else 1

        def ratio(theirs_seconds, ours_seconds):
            return f"{theirs_seconds / ours_seconds:.2f}x" if agrees else "DISAGREES"

        # ours and theirs in turns, so that both see the same load (see timing.py)
        threads = [arguments.threads] + ([1] if arguments.threads > 1 else [])

        def with_threads(count, function):
            def run():
                torch.set_num_threads(count)
                return function()
            return run

        rows = []
        for what, target, our_function, their_function in (("training step", "2x", ours.train_step, theirs.train_step),
                                                            ("inference", "1.5x", ours.inference, theirs.inference)):
            ours_seconds, *theirs_seconds = interleaved_medians(
                [our_function] + [with_threads(count, their_function) for count in threads], arguments.repeats,
                warmup=2)
            for count, seconds in zip(threads, theirs_seconds):
                rows.append([what, f"{BATCH / ours_seconds:.0f}", f"{BATCH / seconds:.0f} ({count} thread"
                             f"{'s' if count > 1 else ''})", ratio(seconds, ours_seconds), target])
            if len(threads) > 1:  # the ratio to quote: against PyTorch's faster setting in this run
                best = min(zip(theirs_seconds, threads))
                rows.append([f"{what}, PyTorch's best", f"{BATCH / ours_seconds:.0f}",
                             f"{BATCH / best[0]:.0f} ({best[1]} thread{'s' if best[1] > 1 else ''})",
                             ratio(best[0], ours_seconds), target])
        torch.set_num_threads(arguments.threads)
        if arguments.threads == 1:
            # With one thread each, the CPU time of the process is the work itself, whatever the load.
            cpu = interleaved_medians([ours.train_step, theirs.train_step, ours.inference, theirs.inference],
                                      arguments.repeats, warmup=0, clock=time.process_time)
            rows += [["training step (CPU time)", f"{BATCH / cpu[0]:.0f}", f"{BATCH / cpu[1]:.0f}",
                      ratio(cpu[1], cpu[0]), ""],
                     ["inference (CPU time)", f"{BATCH / cpu[2]:.0f}", f"{BATCH / cpu[3]:.0f}",
                      ratio(cpu[3], cpu[2]), ""]]
        print_table(["images per second", "minirnng", "PyTorch eager", "ratio", "target"], rows)
    print("load average %.1f %.1f %.1f at the end" % os.getloadavg())
    ours.network.close()
    peak = peak_memory_of_our_training(arguments.threads, arguments.parallelism, arguments.keep_freed_memory)
    print(f"peak resident memory of minirnng training (batch {BATCH}): {peak:.0f} MB (target <= 1024 MB)")
    if status:
        print("exit status 1: minirnng and PyTorch DISAGREE (see the agreement line above)")
    return status


if __name__ == "__main__":
    sys.exit(main())
