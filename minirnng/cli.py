"""The ``minirnng`` command.

Each subcommand is a small function that parses its arguments and calls the library; run
``minirnng <subcommand> --help`` for its options.
"""

import argparse
import sys

import numpy

from . import __version__


# -- gradcheck ------------------------------------------------------------------------------------

def gradcheck_problems(rng):
    """Small random float64 problems, one per layer and loss: ``(report title, run)`` pairs.

    Inputs are tie-free for max pooling and kept away from ReLU's kink, so that a step of
    ``eps`` never changes which branch is taken.
    """
    from . import gradcheck, layers, losses

    f64 = numpy.float64

    def spaced(shape, spacing=0.01):
        count = int(numpy.prod(shape))
        values = rng.permutation((numpy.arange(count) - count / 2 + 0.5) * spacing).reshape(shape)
        return values + numpy.sign(values) * 0.05

    def normal(*shape):
        return rng.standard_normal(shape)

    yield "Conv2d(3, 4, 3, stride=1, padding=1)", lambda: gradcheck.check_layer(
        layers.Conv2d(3, 4, 3, padding=1, rng=rng, dtype=f64), normal(2, 3, 7, 6), rng=rng)
    yield "Conv2d(2, 3, 5, stride=2, padding=2)", lambda: gradcheck.check_layer(
        layers.Conv2d(2, 3, 5, stride=2, padding=2, rng=rng, dtype=f64), normal(2, 2, 9, 8), rng=rng)
    yield "ConvTranspose2d(3, 2, 4, stride=2, padding=1)", lambda: gradcheck.check_layer(
        layers.ConvTranspose2d(3, 2, 4, stride=2, padding=1, rng=rng, dtype=f64), normal(2, 3, 5, 4), rng=rng)
    yield "MaxPool2d(2)", lambda: gradcheck.check_layer(layers.MaxPool2d(2), spaced((2, 3, 6, 8)), rng=rng)
    yield "MaxPool2d(3, stride=2)", lambda: gradcheck.check_layer(layers.MaxPool2d(3, 2), spaced((2, 2, 7, 9)), rng=rng)
    for activation in (layers.ReLU, layers.Sigmoid, layers.Tanh):
        yield f"{activation.__name__}()", lambda activation=activation: gradcheck.check_layer(
            activation(), spaced((2, 3, 4, 5), spacing=0.05), rng=rng)
    target = rng.integers(0, 4, size=(2, 5, 6))
    target[0, 0, :3] = 255
    yield "SoftmaxCrossEntropy(class weights, ignore 255, mask)", lambda: gradcheck.check_loss(
        losses.SoftmaxCrossEntropy(class_weights=[0.5, 1.0, 2.0, 1.5], ignore_index=255),
        normal(2, 4, 5, 6) * 3, target, rng.random((2, 5, 6)) < 0.8, rng=rng)
    binary = (rng.random((2, 1, 5, 6)) < 0.5).astype(f64)
    yield "SigmoidBinaryCrossEntropy(mask)", lambda: gradcheck.check_loss(
        losses.SigmoidBinaryCrossEntropy(), normal(2, 1, 5, 6) * 3, binary, rng.random((2, 1, 5, 6)) < 0.8, rng=rng)


def command_gradcheck(arguments):
    rng = numpy.random.default_rng(arguments.seed)
    print(f"minirnng {__version__}: centred finite differences in float64, random upstream gradients "
          f"(seed {arguments.seed}); pass if every relative error <= {arguments.tolerance:.0e}\n")
    worst = 0.0
    failed = []
    for title, run in gradcheck_problems(rng):
        report = run()
        report.title = title
        print(report.format(arguments.tolerance))
        worst = max(worst, report.max_error)
        if not report.passed(arguments.tolerance):
            failed.append(title)
    print(f"\nlargest relative error: {worst:.2e} (tolerance {arguments.tolerance:.0e})")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    print("all gradients agree with finite differences")
    return 0


# -- the parser -----------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="minirnng",
        description="Face parsing via recurrent propagation (Liu et al., BMVC 2017), from scratch.")
    parser.add_argument("--version", action="version", version=f"minirnng {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    gradcheck = commands.add_parser(
        "gradcheck", help="check every layer's and loss's backward against finite differences",
        description="Run centred finite differences in float64 over every layer and loss on small random "
                    "problems, print a table of relative errors, exit 1 if any exceeds the tolerance.")
    gradcheck.add_argument("--seed", type=int, default=0, help="seed of the random problems (default 0)")
    gradcheck.add_argument("--tolerance", type=float, default=1e-6,
                           help="largest relative error that passes (default 1e-6)")
    gradcheck.set_defaults(handler=command_gradcheck)
    return parser


def main(argv=None):
    parser = build_parser()
    arguments = parser.parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
