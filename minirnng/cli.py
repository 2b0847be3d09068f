"""The ``minirnng`` command.

Each subcommand is a small function that parses its arguments and calls the library; run
``minirnng <subcommand> --help`` for its options.
"""

import argparse
import contextlib
import io
import os
import re
import sys
import traceback

# One BLAS thread unless the user asks for more: minirnng's matrix products are small (a few
# hundred rows per image), a second OpenBLAS thread gains nothing on them, and OpenBLAS threads
# busy-wait, so on a loaded machine they can slow a training step down a hundredfold. Training
# keeps several cores busy with worker threads instead (minirnng.parallel), each running its
# products on one core. This must run before NumPy is first imported, which for the command
# line is here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy  # noqa: E402

from . import __version__, backend, interruption
from .bootstrap import DEFAULT_REPLICATES, MIN_REPLICATES


# -- gradcheck ------------------------------------------------------------------------------------

def gradcheck_problems(rng):
    """Small random float64 problems, one per layer and loss: ``(report title, run)`` pairs.

    Inputs are tie-free for max pooling and kept away from ReLU's kink, so that a step of
    ``eps`` never changes which branch is taken. They are drawn on the host and put on the current
    backend's device, where the layers are built: the GPU's, where CuPy is the backend.
    """
    from . import backend, gradcheck, layers, losses, models

    device = backend.to_device

    f64 = numpy.float64

    def spaced(shape, spacing=0.01):
        count = int(numpy.prod(shape))
        values = rng.permutation((numpy.arange(count) - count / 2 + 0.5) * spacing).reshape(shape)
        return device(values + numpy.sign(values) * 0.05)

    def normal(*shape):
        return device(rng.standard_normal(shape))

    def uniform(low, high, shape):
        return device(rng.uniform(low, high, shape))

    def randomized(layer):
        # distinct, non-symmetric recurrent weights (identical ones tie the four directions exactly)
        # and small biases (a large one can make one direction win every output of a merge)
        for name, value in layer.params.items():
            value[...] = device(layers.constrain_recurrent_weight(rng.standard_normal(value.shape))
                                if name.endswith("W") else 0.1 * rng.standard_normal(value.shape))
        return layer

    def four_way(layer, *inputs):
        # Parameters under which every direction wins some outputs of the max merge: one that wins
        # none has zero gradients, and its rows would compare zero with zero, a check of nothing.
        for _ in range(20):
            randomized(layer)
            scans = numpy.stack([backend.to_numpy(layer.direction_layers[d].forward(*inputs))
                                 for d in layers.DIRECTIONS])
            if len(numpy.unique(scans.argmax(axis=0))) == len(layers.DIRECTIONS):
                return gradcheck.check_layer(layer, *inputs, rng=rng)
        raise RuntimeError(f"{layer!r}: no parameters in 20 draws under which every direction wins an output")

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
    for direction in layers.DIRECTIONS:
        yield f"GatedSpatialRNN(3, {direction!r})", lambda direction=direction: gradcheck.check_layer(
            randomized(layers.GatedSpatialRNN(3, direction, dtype=f64)), normal(2, 3, 4, 5),
            uniform(0.05, 0.95, (2, 3, 4, 5)), rng=rng)
    yield "FourWayGatedRNN(3)", lambda: four_way(
        layers.FourWayGatedRNN(3, dtype=f64), normal(2, 3, 5, 4), uniform(0.05, 0.95, (2, 3, 5, 4)))
    yield "SpatialRNN(3, 'left_to_right', tanh)", lambda: gradcheck.check_layer(
        randomized(layers.SpatialRNN(3, "left_to_right", dtype=f64)), normal(2, 3, 4, 5), rng=rng)
    yield "FourWaySpatialRNN(3)", lambda: four_way(layers.FourWaySpatialRNN(3, dtype=f64), normal(2, 3, 4, 5))

    def batch_norm():
        layer = layers.BatchNorm2d(3, dtype=f64)  # weight and bias away from 1 and 0, of both signs
        layer.params["weight"][...] = device(rng.choice([-1.0, 1.0], 3) * rng.uniform(0.5, 1.5, 3))
        layer.params["bias"][...] = normal(3)
        return gradcheck.check_layer(layer, 2 * normal(2, 3, 4, 5) + 1, rng=rng)
    yield "BatchNorm2d(3)", batch_norm
    target = rng.integers(0, 4, size=(2, 5, 6))
    target[0, 0, :3] = 255
    yield "SoftmaxCrossEntropy(class weights, ignore 255, mask)", lambda: gradcheck.check_loss(
        losses.SoftmaxCrossEntropy(class_weights=[0.5, 1.0, 2.0, 1.5], ignore_index=255),
        normal(2, 4, 5, 6) * 3, device(target), device(rng.random((2, 5, 6)) < 0.8), rng=rng)
    binary = device((rng.random((2, 1, 5, 6)) < 0.5).astype(f64))
    yield "SigmoidBinaryCrossEntropy(mask)", lambda: gradcheck.check_loss(
        losses.SigmoidBinaryCrossEntropy(), normal(2, 1, 5, 6) * 3, binary, device(rng.random((2, 1, 5, 6)) < 0.8),
        rng=rng)
    dice_target = rng.integers(0, 3, size=(2, 5, 6))
    yield "SoftDice(mask)", lambda: gradcheck.check_loss(
        losses.SoftDice(), normal(2, 3, 5, 6) * 2, device(dice_target), device(rng.random((2, 5, 6)) < 0.8), rng=rng)
    affinity = losses.ColourAffinity()
    # colour differences of the size of s_rgb, so that the pairs' weights spread over (0, 1)
    affinity_images = uniform(-0.1, 0.1, (2, 3, 5, 6))
    yield "ColourAffinity()", lambda: gradcheck.check(
        repr(affinity), lambda z: affinity.forward(z, affinity_images), affinity.backward,
        {"logits": normal(2, 3, 5, 6) * 2}, rng=rng)
    # CNN-CRF is CNN-S's network; its dense CRF runs at test time only and has no backward
    for architecture in ("rnng", "cnn-s", "cnn-deep", "rnn"):
        def check_architecture(architecture=architecture):
            model = models.ARCHITECTURES[architecture](3, rng=rng, dtype=f64)
            images = normal(2, 3, 12, 8)
            # As four_way above: a recurrence one of whose directions wins no output of the merge on these
            # images would leave that direction's rows zero against zero (ZERO); another draw of W and b.
            for _ in range(20):
                model.randomize_recurrence(rng)
                report = gradcheck.check_model(model, images, rng=rng)
                if not any(row.vacuous and row.name.startswith("rnn.") for row in report.rows):
                    break
            return report

        yield f"model {architecture} (3 classes, 12x8 images, 12 sampled entries per array)", check_architecture


def command_gradcheck(arguments):
    rng = numpy.random.default_rng(arguments.seed)
    from . import backend

    print(f"minirnng {__version__}: centred finite differences in float64 on the {backend.describe()}, random "
          f"upstream gradients (seed {arguments.seed}); pass if every relative error <= {arguments.tolerance:.0e}\n")
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


# -- train and eval -------------------------------------------------------------------------------

def non_negative_int(text):
    """argparse type: an integer of at least 0 (a seed)."""
    return positive_int(text, minimum=0)


def non_negative_float(text):
    """argparse type: a finite number of at least 0 (a tolerance; 0 asks for exact agreement)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text!r}")
    return value


def positive_int(text, minimum=1):
    """argparse type: an integer of at least ``minimum`` (1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def input_size(text):
    """argparse type: a model input size, a positive multiple of 4 (the network halves it twice)."""
    value = positive_int(text, minimum=4)
    if value % 4:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 (the network halves it twice), got {value}")
    return value


def add_data_arguments(parser, default_split=None, size_from_checkpoint=False):
    from .data.catalog import DATASETS

    parser.add_argument("--data", choices=DATASETS, default="synthetic",
                        help="dataset (default synthetic: generated in code, nothing to download)")
    parser.add_argument("--root", help="folder of the dataset in its official layout (not for synthetic)")
    parser.add_argument("--classes", type=int, choices=(3, 11), default=None,
                        help=("3 (background, skin, hair) or 11 (HELEN) classes; " + (
                            "the checkpoint's, which this checks" if size_from_checkpoint else
                            "default 3 for lfw-pl and synthetic, 11 for helen and celebamask")))
    if size_from_checkpoint:
        parser.add_argument("--input-size", type=input_size, default=None,
                            help="model input height and width (default: the checkpoint's, as it was trained)")
    else:
        parser.add_argument("--input-size", type=input_size, default=128,
                            help="model input height and width (default 128)")
    if default_split:
        parser.add_argument("--split", choices=("train", "validation", "test"), default=default_split,
                            help=f"split to use (default {default_split})")


def resolve_classes(arguments):
    if arguments.classes is not None:
        return arguments.classes
    return 3 if arguments.data == "lfw-pl" else 11 if arguments.data in ("helen", "celebamask") else 3


def command_train(arguments):
    from .data.catalog import load_split
    from .train import TrainConfig, Trainer, check_output_folder, starting_checkpoint

    n_classes = resolve_classes(arguments)
    config = TrainConfig(model=arguments.model, n_classes=n_classes, hidden=arguments.hidden, epochs=arguments.epochs,
                         batch_size=arguments.batch_size, optimizer=arguments.optimizer, lr=arguments.lr,
                         momentum=arguments.momentum, weight_decay=arguments.weight_decay,
                         schedule=arguments.schedule, warmup=arguments.warmup,
                         loss_weights=tuple(arguments.loss_weights), boundary_ratio=arguments.boundary_ratio,
                         background_ratio=arguments.background_ratio,
                         class_balance=arguments.class_balance, dice_weight=arguments.dice_weight,
                         affinity_weight=arguments.affinity_weight, gate_bias=arguments.gate_bias,
                         batch_norm=arguments.batch_norm,
                         recurrent_lr_scale=arguments.recurrent_lr_scale, stability_rule=arguments.stability_rule,
                         augment="none" if arguments.no_augment else (arguments.augment or TrainConfig().augment),
                         seed=arguments.seed,
                         init=arguments.init or "")
    # the checks that need no data first: loading it can take minutes
    if arguments.no_augment and arguments.augment not in (None, "none"):
        raise OptionsConflict(f"--no-augment and --augment {arguments.augment} contradict each other; give one")
    try:
        config.check()
    except ValueError as error:  # TrainConfig names its fields: say which option that is
        raise ValueError(option_names(str(error))) from None
    check_output_folder(arguments.out, arguments.resume, config)
    for note in ignored_options(config):
        print(f"note: {note}")
    if config.init and not arguments.resume:
        starting_checkpoint(config)  # its classes' names are checked again once the data is loaded
    print(f"loading {arguments.data} (train and validation) at {arguments.input_size}x{arguments.input_size} ...")
    train_set = load_split(arguments.data, "train", arguments.root, n_classes, arguments.input_size,
                           size=arguments.train_size)
    validation_set = load_split(arguments.data, "validation", arguments.root, n_classes, arguments.input_size,
                                size=arguments.validation_size)
    print(f"{len(train_set)} training and {len(validation_set)} validation images, classes {', '.join(train_set.classes)}; "
          f"training on the {backend.describe()}")
    trainer = Trainer(config, train_set, validation_set, arguments.out, progress=not arguments.quiet,
                      workers=arguments.workers, parallel=arguments.parallel)
    trainer.run(resume=arguments.resume)
    print(f"checkpoints: {trainer.last_path} (last), {trainer.best_path} (best validation accuracy)")
    print(f"log: {arguments.out}/log.csv, curves: {arguments.out}/curves.png")
    return 0


def ignored_options(config):
    """Notes on options set away from their defaults that this run does not use (they are still
    recorded in its checkpoint, so a --resume must repeat them)."""
    from .models import ARCHITECTURES
    from .train import TrainConfig

    defaults, notes = TrainConfig(), []
    if not ARCHITECTURES[config.model](n_classes=2, hidden=1, rng=0).recurrent_weight_names():
        unused = [f"--{name.replace('_', '-')}" for name in ("recurrent_lr_scale", "stability_rule")
                  if getattr(config, name) != getattr(defaults, name)]
        if unused:
            notes.append(f"{' and '.join(unused)} {'have' if len(unused) > 1 else 'has'} no effect on "
                         f"{config.model}, which has no recurrent weights")
    if config.optimizer != "sgd" and config.momentum != defaults.momentum:
        notes.append(f"--momentum has no effect with --optimizer {config.optimizer}")
    return notes


def option_names(message):
    """``message`` of :meth:`TrainConfig.check` with its field names as ``train``'s options
    (batch_size -> --batch-size, loss_weights[1] -> --loss-weights[1])."""
    fields = ("batch_size", "weight_decay", "loss_weights", "boundary_ratio", "background_ratio", "class_balance",
              "dice_weight", "affinity_weight", "gate_bias", "recurrent_lr_scale", "stability_rule", "lr", "epochs",
              "momentum", "warmup", "hidden")
    pattern = r"(?<![\w-])(" + "|".join(fields) + r")(?![\w-])"
    return re.sub(pattern, lambda match: "--" + match.group(1).replace("_", "-"), message)


def command_eval(arguments):
    from .data.catalog import load_split
    from .models import load_model
    from .train import evaluate

    # the outputs are checked first: a typo in a path must not cost the whole evaluation
    if arguments.bootstrap is not None and arguments.bootstrap < MIN_REPLICATES:
        raise ValueError(f"--bootstrap {arguments.bootstrap}: a 95% interval needs at least {MIN_REPLICATES} "
                         f"resamplings (default {DEFAULT_REPLICATES})")
    if arguments.confusion is not None:
        from .viz import check_figure_path
        check_figure_path(arguments.confusion, "--confusion")
    for path in (arguments.json, arguments.confusion):
        check_output_file(path, inputs=(arguments.checkpoint, arguments.compare))
    # a completed or mistyped name (a run's last.npz, a saved result, a photo) is not replaced
    check_replaceable(arguments.json, "--json", is_eval_record, "a record that eval --json wrote")
    recorded = arguments.confusion and arguments.confusion.lower().endswith((".png", ".pdf", ".svg"))
    check_replaceable(arguments.confusion, "--confusion", lambda path: output_role(path) == CONFUSION_ROLE,
                      "a confusion matrix that eval --confusion wrote" if recorded else
                      "known to be a confusion matrix of eval's (only a PNG, PDF or SVG records what wrote it)")
    if arguments.json and arguments.confusion and \
            os.path.realpath(arguments.json) == os.path.realpath(arguments.confusion):
        raise OptionsConflict(f"--json and --confusion name the same file {arguments.json!r}: the figure would be "
                         "overwritten by the JSON; give two file names")
    if arguments.multi_face and arguments.data != "synthetic":
        raise ValueError(f"--multi-face scores on synthetic multi-face pictures (--data synthetic), not on "
                         f"{arguments.data}")
    model = load_model(arguments.checkpoint)
    if arguments.data == "lfw-pl" and model.n_classes != 3:
        raise ValueError(f"checkpoint {arguments.checkpoint!r} parses {model.n_classes} classes and LFW-PL's labels "
                         "have 3 (background, skin, hair): it cannot be scored on LFW-PL")
    if arguments.classes is not None and model.n_classes != arguments.classes:
        raise ValueError(f"checkpoint {arguments.checkpoint!r} parses {model.n_classes} classes, not the "
                         f"{arguments.classes} that --classes asks for")
    height, width = model.checkpoint_header.get("input_size", (128, 128))
    input_size = arguments.input_size or height
    if arguments.input_size is None and height != width:
        raise ValueError(f"checkpoint {arguments.checkpoint!r} was trained at {height}x{width}; evaluation runs on "
                         "square inputs: give --input-size")
    if arguments.input_size is None and not (isinstance(height, int) and height > 0 and height % 4 == 0):
        # checked before the data are loaded; the networks take positive multiples of 4
        raise ValueError(f"checkpoint {arguments.checkpoint!r} records an input size of {height}x{width}, and the "
                         "networks take positive multiples of 4: give --input-size")
    other = load_comparison(arguments.compare, model, arguments.checkpoint) if arguments.compare else None
    replicates = arguments.bootstrap or (DEFAULT_REPLICATES if other is not None else None)
    resampling = "--compare" if other is not None else "--bootstrap"
    if replicates is not None and arguments.size is not None and arguments.size < 2:
        raise ValueError(f"{resampling} resamples the images and needs at least 2; --size is {arguments.size}")
    dataset = load_split(arguments.data, arguments.split, arguments.root, model.n_classes, input_size,
                         size=arguments.size, multi_face=arguments.multi_face)
    if replicates is not None and len(dataset) < 2:  # a split smaller than --size, found only once it is open
        raise ValueError(f"{resampling} resamples the images and needs at least 2; {arguments.data} "
                         f"{arguments.split} has {len(dataset)}")
    predict = predict_with_options(model, dataset.classes, arguments.mirror, arguments.crf)
    result = evaluate(model, dataset, predict=predict, per_image=replicates is not None)
    per_image = result.pop("per_image_confusion", None)
    # With files to write, the report is held until they are written: a reader that closes the
    # pipe early (`minirnng eval ... --json r.json | head -1`) must not cost the files.
    report = io.StringIO() if arguments.json or arguments.confusion else None
    written = []
    try:
        with contextlib.redirect_stdout(report) if report is not None else contextlib.nullcontext():
            record = report_eval(arguments, model, dataset, result, per_image, replicates, other, input_size)
        if arguments.confusion:
            from .viz import confusion_figure, save_figure
            extras = [name for name, wanted in (("mirrored", arguments.mirror), ("CRF", arguments.crf)) if wanted]
            title = (f"{model.architecture} on {data_description(arguments)} {arguments.split}"
                     + (f" ({', '.join(extras)})" if extras else ""))
            written.append(save_figure(confusion_figure(result["confusion"], dataset.classes, title),
                                       arguments.confusion, role=CONFUSION_ROLE))
        if arguments.json:
            from .atomic import write_json
            written.append(write_json(arguments.json, record))
    finally:  # what was computed is shown even when a later step fails or is interrupted
        if report is not None:
            print(report.getvalue(), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


CONFUSION_ROLE = "eval --confusion"


def output_role(path):
    from .viz import output_role as role_of
    return role_of(path)


def check_replaceable(path, option, earlier_output, what):
    """A FileExistsError now, before any work, where the output ``path`` exists and is not
    ``earlier_output`` of this command (a predicate of the path; ``what`` describes it): a rerun
    replaces its own result, never a file of the user's (an empty file holds nothing to lose:
    ``mktemp --suffix .json``)."""
    if path and os.path.isfile(path) and os.path.getsize(path) > 0 and not earlier_output(path):
        raise FileExistsError(f"{option} {path!r} exists and is not {what}: it would be replaced; give another "
                              "name, or move the file away first")


def json_object(path):
    """The JSON object in the file at ``path``, or None (unreadable, not JSON, not an object)."""
    import json

    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested beyond Python's limit
        return None
    return record if isinstance(record, dict) else None


def is_reproduce_record(path):
    """Whether the file at ``path`` is a JSON record that ``reproduce --json`` wrote."""
    record = json_object(path)
    return record is not None and isinstance(record.get("_meta"), dict) and "table" in record["_meta"]


def is_eval_record(path):
    """Whether the file at ``path`` is a JSON record that ``eval --json`` wrote (which it may replace)."""
    record = json_object(path)
    return record is not None and {"checkpoint", "accuracy", "confusion"} <= set(record)


def data_description(arguments):
    """``synthetic``, ``synthetic multi-face`` or ``lfw-pl``: what eval scored on, for its lines and titles."""
    return f"{arguments.data} multi-face" if arguments.multi_face else arguments.data


def report_eval(arguments, model, dataset, result, per_image, replicates, other, input_size):
    """Print eval's scores (and intervals and comparison); return the record its --json writes."""
    options = [name for name, wanted in (("test-time mirroring", arguments.mirror), ("the dense CRF", arguments.crf))
               if wanted]
    options = f", with {' and '.join(options)}" if options else ""
    scored = f"{data_description(arguments)} {arguments.split} ({len(dataset)} images{options})"
    print(f"{arguments.checkpoint} on {scored}: "
          f"accuracy {100 * result['accuracy']:.2f}%, {result['ms_per_image']:.2f} ms per image "
          f"on the {backend.describe()}")
    for name in dataset.classes:
        f = result["f_measure"][name]
        print(f"  F-{name:<12} {'n/a' if f is None else f'{100 * f:.2f}'}")
    record = {"checkpoint": arguments.checkpoint, "data": arguments.data, "split": arguments.split,
              "root": None if arguments.root is None else os.path.abspath(arguments.root),
              "images": len(dataset), "size": arguments.size, "input_size": input_size,
              "architecture": model.architecture, "mirror": arguments.mirror, "crf": arguments.crf,
              "multi_face": arguments.multi_face, "device": backend.describe(),
              **result}
    if replicates:
        record["bootstrap"] = print_intervals(per_image, dataset.classes, replicates)
    if other is not None:
        record["compare"] = print_comparison(arguments, other, dataset, per_image, result, replicates)
    return record


def load_comparison(path, model, model_path):
    """The checkpoint of ``eval --compare``, or a clear error before any evaluation where it
    cannot be scored on the same images as ``model``: other classes or another input size."""
    from .models import load_model

    other = load_model(path)
    if other.n_classes != model.n_classes:
        raise ValueError(f"--compare {path!r} has {other.n_classes} classes and {model_path!r} has "
                         f"{model.n_classes}: they cannot be scored on the same labels")
    sizes = [tuple(m.checkpoint_header.get("input_size", (128, 128))) for m in (model, other)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"--compare {path!r} was trained at {sizes[1][0]}x{sizes[1][1]} and {model_path!r} at "
                         f"{sizes[0][0]}x{sizes[0][1]}: compare checkpoints of one input size")
    return other


def print_intervals(per_image, classes, replicates):
    """Print and return :func:`minirnng.bootstrap.bootstrap_intervals` of an evaluation."""
    from .bootstrap import bootstrap_intervals

    intervals = bootstrap_intervals(per_image, classes, replicates)
    print(f"{100 * intervals['level']:.0f}% intervals over {replicates} resamplings of the {len(per_image)} images "
          "(minirnng.bootstrap; the choice of images only, not the training run's seed):")
    rows = [("accuracy", intervals["accuracy"])] + [(f"F-{name}", intervals["f_measure"][name]) for name in classes]
    for label, scores in rows:
        if scores["estimate"] is None:
            print(f"  {label:<14} n/a")
            continue
        print(f"  {label:<14} {100 * scores['low']:.2f} .. {100 * scores['high']:.2f}  "
              f"(standard error {100 * scores['standard_error']:.2f}{undefined_share(scores)})")
    return intervals


def undefined_share(scores):
    """``"; undefined in 35% of resamplings"`` where a class was missing from some resamplings, else ``""``."""
    if scores["defined"] == 1:
        return ""
    return (f"; undefined in {100 * (1 - scores['defined']):.0f}% of resamplings, which drew none of its pixels "
            "and predicted none")


def print_comparison(arguments, other, dataset, per_image, result, replicates):
    """Score ``--compare``'s checkpoint on the same images with the same options, print the paired
    differences (this checkpoint minus that one) and return them for the JSON record."""
    from .bootstrap import paired_bootstrap
    from .train import evaluate

    predict = predict_with_options(other, dataset.classes, arguments.mirror, arguments.crf)
    other_result = evaluate(other, dataset, predict=predict, per_image=True)
    paired = paired_bootstrap(per_image, other_result.pop("per_image_confusion"), dataset.classes, replicates)
    print(f"compared with {arguments.compare} on the same images (this checkpoint minus that one, "
          f"{100 * paired['level']:.0f}% interval over {replicates} paired resamplings; that one takes "
          f"{other_result['ms_per_image']:.2f} ms per image):")
    rows = [("accuracy", result["accuracy"], other_result["accuracy"], paired["accuracy"])]
    rows += [(f"F-{name}", result["f_measure"][name], other_result["f_measure"][name], paired["f_measure"][name])
             for name in dataset.classes]
    for label, mine, theirs, difference in rows:
        if difference["difference"] is None:
            print(f"  {label:<14} n/a")
            continue
        print(f"  {label:<14} {100 * mine:.2f} vs {100 * theirs:.2f}: {100 * difference['difference']:+.2f}, "
              f"interval {100 * difference['low']:+.2f} .. {100 * difference['high']:+.2f}, "
              f"ahead in {100 * difference['a_ahead']:.0f}% and tied in {100 * difference['tied']:.0f}% "
              f"of resamplings{undefined_share(difference)}")
    return {"checkpoint": arguments.compare, "architecture": other.architecture,
            "accuracy": other_result["accuracy"], "f_measure": other_result["f_measure"],
            "ms_per_image": other_result["ms_per_image"], "paired": paired}


def make_output_folder(path):
    """``os.makedirs(path)``, with a clear error where a file or a broken link holds the name."""
    if not os.fspath(path):
        raise ValueError("the output folder is an empty name; give a folder, e.g. --out .")
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a broken link" if os.path.islink(path) else "a file"
        raise NotADirectoryError(f"output folder {path!r} is {kind}, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except (NotADirectoryError, FileExistsError):  # afile/sub: a folder above it is a file
        raise NotADirectoryError(f"cannot make the output folder {path!r}: a part of its path is a file, "
                                 "not a folder") from None


def check_output_file(path, inputs=()):
    """A clear error now, before any work, for an output file that could not be written later:
    a folder by that name, a file where a folder of its path should be (missing folders are
    created when the file is written), a folder that cannot be written into, or one of the
    command's own ``inputs`` (which the output would replace). None means no such output; an empty
    name is an error, not silence."""
    from .atomic import check_can_create

    if path is None:
        return
    if not os.fspath(path):
        raise ValueError("an output file name is empty; give a file name")
    if os.path.isdir(path):
        raise IsADirectoryError(f"output {path!r} is a folder; give a file name")
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise ValueError(f"output {path!r} is the input {source!r}: writing it would destroy the input; "
                             "give another file name")
    check_can_create(path, "output")


def predict_with_options(model, classes, mirror=False, crf=False):
    """A ``predict`` (images -> labels) with the test-time options of ``eval``, or None for the
    model's own: the logits of ``model.infer`` (averaged with the mirror image's, see
    :mod:`minirnng.mirroring`), then with ``crf`` the marginals of dense-CRF mean-field inference
    (:class:`minirnng.models.DenseCRF`, its defaults; a CNN-CRF's own, with or without ``crf``) on
    them, then the arg-max."""
    from .mirroring import mirrored_predict
    from .models import DenseCRF

    if not mirror and not crf:
        return None
    own = getattr(model, "crf", None)  # CNN-CRF's predict runs its own CRF, and so does this one
    refine = own.refine if own is not None else DenseCRF().refine if crf else None
    if mirror:
        return mirrored_predict(model, classes, refine)

    def predict(images):
        return refine(model.infer(images), images).argmax(axis=1)
    return predict


# -- demo -----------------------------------------------------------------------------------------

#: the files ``minirnng demo`` writes into --out, in the order it writes them
DEMO_OUTPUTS = ("grace_hopper_parsed.png", "rnng_synthetic.npz", "synthetic_pipeline.png")
DEMO_ROLE = "demo"


def is_demo_output(path):
    """Whether the file at ``path`` is an earlier demo's output, which the demo replaces: a figure
    or a checkpoint that records the demo's role. A photo, a figure or a checkpoint of the user's is
    not (nor are the outputs of demos from before 2026-12-03, which recorded none: the demo refuses
    to replace them, and says so, before any work)."""
    if path.endswith(".npz"):
        from .models.checkpoint import CheckpointError, read_checkpoint
        try:
            return read_checkpoint(path)[0].get("role") == DEMO_ROLE
        except (CheckpointError, OSError, ValueError):
            return False
    return output_role(path) == DEMO_ROLE


def command_demo(arguments):
    import tempfile

    import matplotlib.cbook

    from .data.catalog import load_split
    from .data.pipeline import normalize
    from .parser import FaceParser, read_image
    from .train import TrainConfig, Trainer, evaluate
    from .viz import parse_figure, pipeline_figure, save_figure

    # the settings are checked before any work: a bad --lr is named before step 1 writes a file
    try:
        config = TrainConfig(epochs=arguments.epochs, lr=arguments.lr, seed=arguments.seed).check()
    except ValueError as error:
        raise ValueError(option_names(str(error))) from None  # --lr, not the field's name
    make_output_folder(arguments.out)
    written = []
    replaced = {path for path in (os.path.join(arguments.out, name) for name in DEMO_OUTPUTS) if os.path.exists(path)}
    for path in sorted(replaced):  # before any work, as eval's outputs are checked
        check_replaceable(path, "the demo's output", is_demo_output, "an earlier demo's output")

    print("1. A real portrait (grace_hopper.jpg, shipped with matplotlib) parsed by the pretrained RNN-G")
    image = read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    parser = FaceParser.pretrained()
    labels = parser.parse(image)
    shares = ", ".join(f"{name} {100 * (labels == k).mean():.1f}%" for k, name in enumerate(parser.classes))
    print(f"   {image.shape[1]}x{image.shape[0]} pixels: {shares}")
    written.append(save_figure(parse_figure(image, labels, parser.classes, title="pretrained RNN-G (LFW-PL)"),
                               os.path.join(arguments.out, DEMO_OUTPUTS[0]), role=DEMO_ROLE))

    print(f"\n2. Training a small RNN-G on {arguments.train_size} synthetic faces for {arguments.epochs} "
          f"epoch{'s' if arguments.epochs != 1 else ''} on the {backend.describe()}")
    train_set = load_split("synthetic", "train", n_classes=3, size=arguments.train_size)
    validation_set = load_split("synthetic", "validation", n_classes=3, size=100)
    test_set = load_split("synthetic", "test", n_classes=3, size=arguments.test_size)
    with tempfile.TemporaryDirectory(prefix="minirnng-demo-") as run_folder:
        trainer = Trainer(config, train_set, validation_set, run_folder, progress=not arguments.quiet,
                          log=lambda line: print("   " + line))
        try:
            trainer.run()
        except FloatingPointError:
            # the trainer's message names its folder, a temporary one that is gone when this ends
            raise FloatingPointError(f"the demo's training diverged at --lr {arguments.lr:g}; try a smaller "
                                     "--lr") from None
    model = trainer.model
    written.append(model.save(os.path.join(arguments.out, DEMO_OUTPUTS[1]), role=DEMO_ROLE))

    shown = min(arguments.figure_images, len(test_set))
    print(f"\n3. The pipeline on {shown} test images: input, truth, coarse map, gate map, result")
    images, truth = test_set.images[:shown], test_set.labels[:shown]
    outputs = model.forward(model.on_device(normalize(images)))
    coarse, predicted = (backend.to_numpy(outputs[name].argmax(axis=1)) for name in ("coarse", "logits"))
    # the whole gate map G: the figure draws its mean over the channels and says so
    figure = pipeline_figure(images, truth, coarse, backend.to_numpy(model.intermediates["gate"]), predicted,
                             test_set.classes,
                             title=f"RNN-G trained for {arguments.epochs} epoch{'s' if arguments.epochs != 1 else ''} "
                                   f"on {arguments.train_size} synthetic faces")
    written.append(save_figure(figure, os.path.join(arguments.out, DEMO_OUTPUTS[2]), role=DEMO_ROLE))

    print(f"\n4. Results on {len(test_set)} synthetic test faces")
    result = evaluate(model, test_set)
    print(f"   {'pixel accuracy':<16} {100 * result['accuracy']:6.2f}%")
    for name in test_set.classes:
        print(f"   {'F-' + name:<16} {100 * result['f_measure'][name]:6.2f}%")
    print(f"   {'time per image':<16} {result['ms_per_image']:6.2f} ms on the {backend.describe()}, "
          f"in batches of {min(32, len(test_set))}")
    print("\nwritten:")
    for path in written:
        print(f"   {path}" + ("   (replacing an earlier run's)" if path in replaced else ""))
    return 0


# -- parse ----------------------------------------------------------------------------------------

def load_parser(checkpoint, mirror, crf):
    """The parser a checkpoint holds: the two-stage parser for a two-stage checkpoint, else the
    stage-1 :class:`FaceParser` (the pretrained one without a checkpoint); None after an error message."""
    from .models.checkpoint import read_checkpoint
    from .models.stage2 import TwoStageParser
    from .parser import FaceParser

    if checkpoint and read_checkpoint(checkpoint)[0]["architecture"] == TwoStageParser.architecture:
        for option, wanted in (("--mirror", mirror), ("--crf", crf)):
            if wanted:
                print(f"minirnng parse: {option} works with a stage-1 parser; the two-stage parser "
                      f"{checkpoint} has no such test-time option", file=sys.stderr)
                return None
        return TwoStageParser.load(checkpoint)
    options = {"mirror": mirror, "crf": crf}
    return FaceParser.load(checkpoint, **options) if checkpoint else FaceParser.pretrained(**options)


def command_parse(arguments):
    from .detect import detector_available
    from .parser import parse_detected_faces, read_image
    from .viz import overlay, parse_figure, save_figure

    arguments.images = distinct_images(arguments.images)
    clash = output_replacing_an_input(arguments.images, arguments.out, arguments.figure)
    if clash:
        print(f"minirnng parse: the output {clash[0]} would replace the input image {clash[1]}; "
              "choose another --out", file=sys.stderr)
        return 2
    if arguments.classes == 11 and not arguments.checkpoint:
        print("minirnng parse --classes 11 needs --checkpoint: a two-stage parser, e.g. the "
              "runs/reproduce/table3-helen-paper/two_stage.npz that `minirnng reproduce table3 --data PATH-TO-HELEN "
              "--budget paper` writes "
              "(minirnng ships only the 3-class parser)", file=sys.stderr)
        return 2
    parser = load_parser(arguments.checkpoint, arguments.mirror, arguments.crf)
    if parser is None:
        return 2
    if arguments.classes is not None and len(parser.classes) != arguments.classes:
        # --classes is what the user expects to get: a checkpoint of another kind is named, not obeyed
        print(f"minirnng parse: the checkpoint {arguments.checkpoint} parses {len(parser.classes)} classes "
              f"({', '.join(parser.classes)}), not the {arguments.classes} that --classes asks for",
              file=sys.stderr)
        return 2
    make_output_folder(arguments.out)
    detect = not arguments.no_detect and detector_available()
    if not arguments.no_detect and not detector_available():
        print("note: OpenCV is not installed, so each image is parsed as one face "
              "(pip install '.[detect]' in minirnng's folder to detect several faces)")
    failed = 0
    stems = output_stems(arguments.images, arguments.out, arguments.figure)
    for path, stem in zip(arguments.images, stems):
        interruption.raise_if_requested()  # a stop whose KeyboardInterrupt Python dropped
        try:
            image = read_image(path)
        except (OSError, ValueError) as error:
            # one unreadable file among many does not stop the others
            if tracebacks_wanted():
                traceback.print_exc()
            print(f"minirnng parse: error: {error}; skipped", file=sys.stderr)
            failed += 1
            continue
        if detect:
            labels, boxes = parse_detected_faces(parser, image)
            faces = f"{len(boxes)} face(s) detected" if len(boxes) else "no face detected: parsed as one face"
        else:
            labels, faces = parser.parse(image), "parsed as one face"
        label_path, overlay_path, *figure_path = output_files(stem, arguments.out, arguments.figure)
        plain = output_files(output_stems([path])[0], arguments.out, arguments.figure)[0]
        if label_path != plain and os.path.exists(plain):
            print(f"note: {plain} exists and is not this image's earlier output: writing {label_path}")
        role = parse_role(path)
        try:
            write_png(label_path, labels, role)
            write_png(overlay_path, overlay(image, labels, parser.classes), role)
            if figure_path:
                save_figure(parse_figure(image, labels, parser.classes, title=os.path.basename(path)),
                            figure_path[0], role=role)
        except OSError as error:
            # an output this image cannot have (a name too long for the file system, say) does not
            # stop the others
            if tracebacks_wanted():
                traceback.print_exc()
            print(f"minirnng parse: error: {error}; {path} skipped", file=sys.stderr)
            failed += 1
            continue
        shares = ", ".join(f"{name} {100 * (labels == k).mean():.1f}%" for k, name in enumerate(parser.classes))
        print(f"{path}: {image.shape[1]}x{image.shape[0]}, {faces}; {shares}")
        print(f"  labels:  {label_path} (pixel value = class index: {', '.join(parser.classes)})")
        print(f"  overlay: {overlay_path}")
        if figure_path:
            print(f"  figure:  {figure_path[0]}")
    if failed:
        print(f"minirnng parse: {failed} of {len(arguments.images)} images could not be read or their outputs "
              "written", file=sys.stderr)
        return 1
    return 0


def output_stems(paths, out=None, figure=False):
    """The file-name stem of each image's outputs: its own, and ``stem-2``, ``stem-3``, ... for later
    images with the same name (``a/face.jpg b/face.png``), so that no image's outputs replace another's;
    with ``out``, also where a file of that name is already there and is not this image's earlier
    output (:func:`parse_role`): a file of the user's, or another image's parse."""
    stems, taken = [], set()
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0]
        stem, count = base, 1
        # casefold: Face.png and face.png are one file on some systems
        while stem.casefold() in taken or (out is not None and any(
                os.path.lexists(output) and output_role(output) != parse_role(path)
                for output in output_files(stem, out, figure))):
            count += 1
            stem = f"{base}-{count}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def parse_role(path):
    """What ``parse`` records in the PNGs it writes for the image at ``path``: a digest of the
    image's full path (not the path, which would travel with the outputs; any name, UTF-8 or not),
    so that parsing it again replaces them and parsing another image does not."""
    import hashlib

    return f"parse {hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:16]}"


def output_files(stem, out, figure):
    """The files ``parse`` writes for one image."""
    suffixes = ("labels", "overlay") + (("figure",) if figure else ())
    return [os.path.join(out, f"{stem}_{suffix}.png") for suffix in suffixes]


def distinct_images(paths):
    """``paths`` with each image once (the first time it is named: ``parse *.jpg face*`` may name
    one twice), a note for each repeat: parsing it again would only write a second copy."""
    seen, kept = set(), []
    for path in paths:
        key = os.path.normcase(os.path.realpath(path))
        if key in seen:
            print(f"note: {path} is named more than once; parsed once")
            continue
        seen.add(key)
        kept.append(path)
    return kept


def output_replacing_an_input(images, out, figure):
    """(output, input) for the first output of ``parse`` that is one of its own input images
    (``parse a.jpg a_labels.png --out .``), or None: an input is never overwritten, even by
    the labels of another input."""
    def key(path):
        return os.path.normcase(os.path.realpath(path))

    inputs = {key(path): path for path in images}
    for stem in output_stems(images, out, figure):  # the names the run will write, renamings included
        for path in output_files(stem, out, figure):
            if key(path) in inputs:
                return path, inputs[key(path)]
    return None


def write_png(path, array, role=None):
    """Write a uint8 array as PNG through a temporary file (an interrupted run leaves no half file);
    ``role`` is recorded in it for :func:`minirnng.viz.output_role`."""
    from PIL import Image, PngImagePlugin

    from .atomic import replacing
    from .viz import ROLE_KEY

    info = None
    if role:
        info = PngImagePlugin.PngInfo()
        info.add_text(ROLE_KEY, role)
    with replacing(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG", pnginfo=info)
    return path


# -- reproduce ------------------------------------------------------------------------------------

def command_reproduce(arguments):
    from .atomic import check_can_create

    if not arguments.out:
        raise ValueError("--out is an empty name; give the folder for the runs, e.g. --out runs/reproduce")
    # before hours of training, not after
    check_can_create(os.path.join(arguments.out, arguments.table), "the runs under --out")
    check_output_file(arguments.json)
    check_replaceable(arguments.json, "--json", is_reproduce_record, "a record that reproduce --json wrote")
    if arguments.table == "table3":
        from .train_stage2 import reproduce_table3
        if arguments.seed != 0:
            raise ValueError("--seed applies to table1 and table2; table3 trains with the seeds of minirnng.train_stage2")
        reproduce_table3(data=arguments.data, budget=arguments.budget, json_path=arguments.json,
                         out_dir=arguments.out, progress=not arguments.quiet)
    else:
        from .reproduce import reproduce
        reproduce(arguments.table, data=arguments.data, budget=arguments.budget, json_path=arguments.json,
                  out_dir=arguments.out, progress=not arguments.quiet, seed=arguments.seed)
    return 0


# -- the parser -----------------------------------------------------------------------------------

def build_parser():
    from .data.catalog import SYNTHETIC_SIZES

    parser = argparse.ArgumentParser(
        prog="minirnng",
        description="Face parsing via recurrent propagation (Liu et al., BMVC 2017), from scratch.")
    parser.add_argument("--version", action="version", version=f"minirnng {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    gradcheck = commands.add_parser(
        "gradcheck",
        help="check every layer's and loss's backward, and the four stage-1 networks', against finite differences",
        description="Run centred finite differences in float64 over every layer and loss and the four stage-1 "
                    "networks (CNN-CRF is CNN-S's) on small random problems, print a table of relative errors, "
                    "exit 1 if any exceeds the tolerance.")
    gradcheck.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random problems (default 0)")
    gradcheck.add_argument("--tolerance", type=non_negative_float, default=1e-6,
                           help="largest relative error that passes (default 1e-6)")
    gradcheck.set_defaults(handler=command_gradcheck)

    from .models import ARCHITECTURES
    from .optim import OPTIMIZERS, SCHEDULES
    from .train import AUGMENTATIONS, STABILITY_RULES, TrainConfig

    defaults = TrainConfig()
    train = commands.add_parser(
        "train", help="train a stage-1 model (RNN-G or a baseline)",
        description="Train a stage-1 model with the three-term loss, validating and checkpointing every epoch.")
    train.add_argument("--model", choices=sorted(ARCHITECTURES), default="rnng", help="architecture (default rnng)")
    add_data_arguments(train)
    train.add_argument("--hidden", type=int, default=defaults.hidden,
                       help=f"channels of X and of the gate G, each (default {defaults.hidden}, the spec's RNN-G)")
    train.add_argument("--out", default="runs/train",
                       help="output folder for checkpoints, log and curves (default %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help="%(default)s by default")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="%(default)s by default")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=defaults.optimizer,
                       help="adamw: Adam with decoupled weight decay (minirnng.optim) (default %(default)s)")
    train.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    train.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum (default %(default)s)")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                       help="an L2 term on every parameter but the biases (the recurrent W and batch-norm "
                            "scales included); with adamw, the fraction "
                            "of each weight taken off per step, times the learning rate (default %(default)s)")
    train.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule, help="%(default)s by default")
    train.add_argument("--warmup", type=float, default=defaults.warmup,
                       help="warm-up, fraction of the run (default %(default)s)")
    train.add_argument("--loss-weights", type=float, nargs=3, default=defaults.loss_weights,
                       metavar=("LOGITS", "COARSE", "EDGE"),
                       help="weights of the three loss terms (default %(default)s)")
    train.add_argument("--boundary-ratio", type=float, default=defaults.boundary_ratio,
                       help="non-boundary pixels sampled per boundary pixel in the edge loss (paper and default: "
                            "%(default)s)")
    train.add_argument("--background-ratio", type=float, default=defaults.background_ratio,
                       help="label losses on all face/hair pixels and this many times as many background "
                            "pixels (paper, Multi-Face: 5); 0 = every pixel (default %(default)s)")
    train.add_argument("--dice-weight", type=float, default=defaults.dice_weight,
                       help="weight of a soft Dice term on the logits (1 - mean over classes of a soft "
                            "F-measure) beside the three losses; 0 = none (default, the spec's objective)")
    train.add_argument("--affinity-weight", type=float, default=defaults.affinity_weight,
                       help="weight of a colour-affinity term on the logits (8-connected neighbours of one "
                            "colour asked to agree: a CRF's pairwise term) beside the three losses; 0 = none "
                            "(default, the spec's objective)")
    train.add_argument("--batch-norm", action="store_true",
                       help="batch normalisation after conv1, conv3 and conv5 while training, folded into "
                            "those convolutions in best.npz (the spec's network); default: none")
    train.add_argument("--class-balance", type=float, default=defaults.class_balance,
                       help="class weights (mean frequency / frequency) ** this power; 0 = none (default %(default)s)")
    train.add_argument("--gate-bias", type=float, default=defaults.gate_bias,
                       help="initial bias of the gate half of deconv6 (default %(default)s)")
    train.add_argument("--recurrent-lr-scale", type=float, default=defaults.recurrent_lr_scale,
                       help="learning rate of the recurrent weights W, as a multiple of --lr (default 1)")
    train.add_argument("--stability-rule", choices=tuple(STABILITY_RULES), default=defaults.stability_rule,
                       help="how each recurrent W is kept stable after every step: rescale the whole W to "
                            "absolute row sums of at most 1 (default, the spec's rule), project each row onto "
                            "the L1 ball (the same bound), or clip its singular values at 1 (spectral norm)")
    train.add_argument("--augment", choices=tuple(AUGMENTATIONS), default=None,
                       help="augmentation of each training batch: the paper's random affine warp and mirroring "
                            "(default), mirroring alone, or none")
    train.add_argument("--no-augment", action="store_true", help="the same as --augment none")
    train.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="%(default)s by default")
    train.add_argument("--train-size", type=positive_int, default=None,
                       help="number of training images (synthetic: how many are drawn, default "
                            f"{SYNTHETIC_SIZES['train']}; otherwise the first N of the split, default all)")
    train.add_argument("--validation-size", type=positive_int, default=None,
                       help="number of validation images (synthetic: how many are drawn, default "
                            f"{SYNTHETIC_SIZES['validation']}; otherwise the first N, default all)")
    train.add_argument("--init", metavar="CHECKPOINT",
                       help="start from this checkpoint's weights (fine-tuning; same model, sizes and classes) "
                            "instead of a random initialisation")
    train.add_argument("--workers", type=positive_int, default=None,
                       help="workers that share each batch on the CPU (default: a resumed run's number, else "
                            "one per core, at most 4; 1: the whole batch in one thread)")
    train.add_argument("--parallel", choices=("processes", "threads"), default="processes",
                       help="what the workers are (default: processes, which do not wait for each other's "
                            "interpreter lock; threads need nothing started; both give the same numbers)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint: accuracy, per-class F-measure, speed",
        description="Evaluate a checkpoint on a dataset split; print the scores, optionally write them as JSON.")
    evaluate.add_argument("--checkpoint", required=True, help="a .npz written by train or save")
    add_data_arguments(evaluate, default_split="test", size_from_checkpoint=True)
    evaluate.add_argument("--size", type=positive_int, default=None,
                          help="number of images (synthetic: how many are drawn, default the split's "
                               f"{SYNTHETIC_SIZES['train']} train, {SYNTHETIC_SIZES['validation']} validation, "
                               f"{SYNTHETIC_SIZES['test']} test; otherwise the first N of the split, default all)")
    evaluate.add_argument("--json", help="write the scores to this JSON file (an existing file is replaced only "
                                         "if eval wrote it)")
    evaluate.add_argument("--confusion", help="write the confusion matrix as a figure to this file, PNG or "
                                              "another format by its extension (an existing file is replaced "
                                              "only if eval wrote it as PNG, PDF or SVG)")
    evaluate.add_argument("--multi-face", action="store_true",
                          help="with --data synthetic: the multi-face pictures of Table 2 (512x512, letterboxed to "
                               "the checkpoint's input size), on which reproduce table2 scores its models")
    evaluate.add_argument("--mirror", action="store_true",
                          help="test-time mirroring: average the logits of each image and of its mirror image")
    evaluate.add_argument("--crf", action="store_true",
                          help="refine the scores with dense-CRF mean-field inference (about 0.1 s an image)")
    evaluate.add_argument("--bootstrap", type=positive_int, nargs="?", const=DEFAULT_REPLICATES, default=None,
                          metavar="N", help=f"95%% intervals of every score over N resamplings of the images "
                                            f"(default N: {DEFAULT_REPLICATES}, at least {MIN_REPLICATES}; "
                                            "minirnng.bootstrap)")
    evaluate.add_argument("--compare", metavar="CHECKPOINT",
                          help="also score this checkpoint on the same images, with the same options, and print "
                               "the paired differences with their 95%% intervals")
    evaluate.set_defaults(handler=command_eval)

    demo = commands.add_parser(
        "demo", help="the main job: parse a portrait, train a small RNN-G on synthetic faces, show and score it",
        description="Parse matplotlib's grace_hopper.jpg with the pretrained parser, train a small RNN-G on "
                    "synthetic faces for about half a minute, write figures and print a results table.")
    demo.add_argument("--out", default="minirnng-demo",
                      help="folder for the figures and the checkpoint (default %(default)s)")
    demo.add_argument("--train-size", type=positive_int, default=800, help="synthetic training images (default 800)")
    demo.add_argument("--test-size", type=positive_int, default=200, help="synthetic test images (default 200)")
    demo.add_argument("--epochs", type=positive_int, default=4, help="training epochs (default 4)")
    demo.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (default 4e-3)")
    demo.add_argument("--figure-images", type=positive_int, default=4,
                      help="test images in the pipeline figure (default %(default)s)")
    demo.add_argument("--seed", type=non_negative_int, default=0, help="0 by default")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=command_demo)

    parse = commands.add_parser(
        "parse", help="parse face images of any size",
        description="Parse images with a checkpoint (default: the pretrained 3-class RNN-G). With OpenCV "
                    "installed (extra 'detect') faces are detected and parsed one by one in LFW framing; "
                    "without it the whole image is one face. Writes NAME_labels.png and NAME_overlay.png "
                    "per image (NAME-2_... for a second image called NAME); an unreadable image is "
                    "reported and skipped, and the exit status is then 1.")
    parse.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parse.add_argument("--checkpoint", help="a checkpoint (default: the pretrained parser)")
    parse.add_argument("--classes", type=int, choices=(3, 11), default=None,
                       help="the number of classes expected: 3 (the pretrained stage-1 parser, the default "
                            "without --checkpoint) or 11 (the HELEN classes: a two-stage or 11-class "
                            "checkpoint, given with --checkpoint); a checkpoint with other classes is an error")
    parse.add_argument("--out", default="minirnng-parsed",
                       help="output folder (default minirnng-parsed); NAME_labels.png and NAME_overlay.png per "
                            "image, NAME-2_... where a file of that name is already there and is not this "
                            "image's earlier output")
    parse.add_argument("--no-detect", action="store_true", help="parse each whole image as one face")
    parse.add_argument("--figure", action="store_true", help="also write a figure: image, labels, overlay")
    parse.add_argument("--mirror", action="store_true",
                       help="a stage-1 parser: average the scores of each face and of its mirror image (twice the time)")
    parse.add_argument("--crf", action="store_true",
                       help="a stage-1 parser: refine the scores with dense-CRF mean-field inference (about 0.1 s a face)")
    parse.set_defaults(handler=command_parse)

    reproduce = commands.add_parser(
        "reproduce", help="train and evaluate the models of the paper's Table 1, 2 or 3",
        description="Train every model of a table of the paper at one budget, evaluate them, and print our "
                    "numbers beside the paper's. table1: LFW-PL (or synthetic); table2: synthetic multi-face; "
                    "table3: 1-stage against 2-stage on HELEN (or synthetic).")
    reproduce.add_argument("table", choices=("table1", "table2", "table3"))
    reproduce.add_argument("--data", default="synthetic",
                           help="'synthetic' (default) or the folder of the dataset (LFW-PL for table1, HELEN "
                                "for table3)")
    reproduce.add_argument("--budget", choices=("small", "paper", "full"), default="small",
                           help="small (default): minutes; paper: table1 40 epochs, table2 15, table3 40 + 40 "
                                "(the spec's training); full (table1 only): 250 epochs with run BK's recipe (the shipped "
                                "parser's, less its colour-affinity term and batch normalisation), hours on a CPU")
    reproduce.add_argument("--json", help="write the results to this JSON file (an existing file is replaced only "
                                           "if reproduce wrote it)")
    reproduce.add_argument("--seed", type=non_negative_int, default=0, help="table1 and table2: every model's seed (default 0)")
    reproduce.add_argument("--out", default="runs/reproduce",
                           help="folder for the trained models (default runs/reproduce)")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.set_defaults(handler=command_reproduce)
    return parser


class OptionsConflict(ValueError):
    """Options that do not go together: exit status 2, as argparse gives for its own refusals."""


def tracebacks_wanted():
    return bool(os.environ.get("MINIRNNG_TRACEBACK"))


def main(argv=None):
    """Run one subcommand: 0 on success, 1 when a check fails or the input is bad (a missing or
    unreadable file, a corrupt checkpoint, a dataset not in its layout) or training diverged, 2 for
    options that do not go together, 130 when interrupted, 141 when the reader of its output closed
    the pipe. Bad input is reported in one line naming the problem, not as a traceback;
    ``MINIRNNG_TRACEBACK=1`` shows the traceback as well."""
    try:
        parser = build_parser()  # imports the training modules: a Ctrl-C may come in meanwhile
    except KeyboardInterrupt:
        print("\nminirnng: interrupted", file=sys.stderr)
        return 130
    arguments = parser.parse_args(argv)
    # `kill` or `timeout` end a command as Ctrl-C does: the files being written are cleaned up
    with interruption.handling_signals():
        return run_command(arguments)


def run_command(arguments):
    """``arguments.handler(arguments)``, with the errors of :func:`main` turned into its exit statuses."""
    try:
        status = arguments.handler(arguments)
        interruption.raise_if_requested()  # a stop whose KeyboardInterrupt Python dropped
        return status
    except KeyboardInterrupt:
        return report_interrupted(arguments)
    except Exception as error:
        if interruption.requested():  # the stop's KeyboardInterrupt, wrapped in another error
            return report_interrupted(arguments)
        status = report_error(arguments, error)
        if status is None:
            raise
        return status


def report_error(arguments, error):
    """The exit status for ``error`` after a one-line message, or None for an error that keeps its
    traceback: the library raises OSError, ValueError, BackendError and FloatingPointError (a
    training run that diverged) for input it cannot use, each with a message that names the file,
    the shape or the option; an error of any other type is a bug to be seen whole."""
    from .backend import BackendError

    if isinstance(error, BrokenPipeError):
        # the reader of our output went away (`minirnng eval ... | head`): stop quietly, as other
        # command-line tools do, and keep Python from reporting the pipe again when it exits
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program ended by a closed pipe
    if tracebacks_wanted():
        return None
    if isinstance(error, MemoryError):
        print(f"minirnng {arguments.command}: error: out of memory; use smaller batches (--batch-size), a smaller "
              "--input-size or fewer --workers, or smaller images", file=sys.stderr)
        return 1
    if isinstance(error, OptionsConflict):
        print(f"minirnng {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, (OSError, ValueError, BackendError, FloatingPointError)):
        # a worker process that was killed (by the kernel's out-of-memory killer, say) stopped the
        # run, not the run's own input: where it can go on from is worth saying
        hint = where_to_continue(arguments) if isinstance(error, ChildProcessError) else ""
        print(f"minirnng {arguments.command}: error: {error}{hint}", file=sys.stderr)
        return 1
    return None


def report_interrupted(arguments):
    """Exit status 130, after a line that says where the finished work is (where there is still a
    terminal to say it on: a hang-up is a closed one)."""
    try:
        print(f"\nminirnng {arguments.command}: interrupted{where_to_continue(arguments)}", file=sys.stderr)
    except OSError:
        pass
    return 130


def where_to_continue(arguments):
    """For a command stopped before its end: where its finished work is and how to go on from it
    (training and ``reproduce``), as the end of a message; "" for the other commands."""
    from .train import last_checkpoint_path

    hint = ""
    if arguments.command == "train" and os.path.exists(last_checkpoint_path(arguments.out)):
        hint = f"; every finished epoch is saved in {arguments.out}: continue with the same command and --resume"
    elif arguments.command == "train":
        # --resume would only fail: there is no last.npz to continue from
        hint = "; no epoch finished; run the same command again (without --resume)"
    elif arguments.command == "reproduce":
        hint = (f"; every finished epoch is saved under {arguments.out}: the same command again continues "
                "where it stopped")
    elif arguments.command == "demo":
        done = [name for name in DEMO_OUTPUTS if os.path.exists(os.path.join(arguments.out, name))]
        hint = (f"; in {arguments.out}: {', '.join(done)} (perhaps from an earlier run); the same command again "
                "starts over" if done else "")
    return hint


if __name__ == "__main__":
    sys.exit(main())
