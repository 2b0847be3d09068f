"""Training and evaluation of the stage-1 models: the loop, checkpoints on disk, logs and curves.

One epoch: shuffle the preloaded training set, augment each batch (random affine and mirroring,
mirroring alone, or nothing),
run forward, the three-term objective (:mod:`minirnng.objective`), backward (each worker on its
shard of the batch, all three at once: :meth:`minirnng.parallel.DataParallel.objective_step`), an
optimizer step, and the stability rule (``model.constrain()``); then evaluate on the validation set.

What lands in the output folder after every epoch (each file written atomically, so a run
killed at any moment loses at most the epoch in progress):

``last.npz``    the model, the optimizer's state, the epoch, the generator's state and the history:
                ``--resume`` continues from it exactly as if the run had never stopped (with the
                same ``--epochs``; a larger one stretches the learning-rate schedule over the new
                length, so a decayed rate jumps back up);
``best.npz``    the model with the best validation accuracy so far (a plain checkpoint; a run
                with ``batch_norm`` stores it folded into the convolutions, the network without
                the normalisation, :meth:`minirnng.models.RNNG.folded`);
``log.csv``     one row per epoch: learning rate, losses, validation accuracy and F-measures, time;
``curves.png``  training loss and validation scores against the epoch.
"""

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy

from . import backend, interruption
from .atomic import check_can_create, replacing
from .data.pipeline import Augmentation, batches
from .layers.recurrent import STABILITY_RULES
from .metrics import ConfusionAccumulator
from .models import ARCHITECTURES
from .models.checkpoint import load_model, read_checkpoint, save_model
from .objective import StageOneObjective, class_balance_weights
from .optim import OPTIMIZERS, SCHEDULES, learning_rate
from .parallel import DataParallel, available_cores, default_workers, shard_count
from .processes import ProcessParallel


#: What ``TrainConfig.augment`` (``--augment``) names: the paper's random affine warp and mirroring,
#: mirroring alone (an exact flip, which ``warp`` makes by copying pixels: no resampling), or nothing.
AUGMENTATIONS = {
    "paper": Augmentation(),
    "mirror": Augmentation(max_rotation=0.0, scale_range=(1.0, 1.0), max_shift=0.0),
    "none": None,
}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoints)."""

    model: str = "rnng"
    n_classes: int = 3
    hidden: int = 8
    gate_bias: float = 0.0
    epochs: int = 30
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.02
    loss_weights: tuple = (1.0, 1.0, 1.0)
    boundary_ratio: float = 5.0
    background_ratio: float = 0.0
    class_balance: float = 0.0
    #: the weight of a soft Dice term on the logits beside the three losses (0: none, the spec's
    #: objective; docs/training.md, run BF)
    dice_weight: float = 0.0
    #: the weight of a colour-affinity term on the logits (the pairwise term of a CRF; 0: none;
    #: docs/training.md, run BV)
    affinity_weight: float = 0.0
    #: batch normalisation after conv1, conv3 and conv5 while training, folded into them in
    #: ``best.npz`` (not the spec's training; docs/training.md, run BY)
    batch_norm: bool = False
    #: the recurrent weights' learning rate, as a multiple of ``lr`` (docs/training.md, run AK)
    recurrent_lr_scale: float = 1.0
    #: how the recurrent W are kept stable after each step: "rescale" (the spec's), "project"
    #: (the same bound; docs/training.md, run AL) or "spectral" (spectral norm at most 1, run BC)
    stability_rule: str = "rescale"
    #: the augmentation of each training batch, a name in :data:`AUGMENTATIONS`: "paper" (random
    #: affine warp and mirroring), "mirror" (mirroring alone) or "none"
    augment: str = "paper"
    seed: int = 0
    #: a checkpoint to start from instead of a random initialisation (fine-tuning); "" for none
    init: str = ""

    def __post_init__(self):
        # checkpoints written before the augmentation had a name stored True or False
        if isinstance(self.augment, bool):
            self.augment = "paper" if self.augment else "none"
        self.loss_weights = tuple(self.loss_weights)  # a list, as a checkpoint's JSON record holds it

    def check(self):
        if self.model not in ARCHITECTURES:
            raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "n_classes"):  # hidden and seed: below
            value = getattr(self, name)
            if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, numpy.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        if self.stability_rule not in STABILITY_RULES:
            raise ValueError(f"unknown stability rule {self.stability_rule!r}; expected one of "
                             f"{', '.join(STABILITY_RULES)}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; expected one of {', '.join(AUGMENTATIONS)}")
        numbers = {name: getattr(self, name) for name in (
            "lr", "gate_bias", "momentum", "weight_decay", "warmup", "boundary_ratio", "background_ratio",
            "class_balance", "dice_weight", "affinity_weight", "recurrent_lr_scale")}
        numbers.update({f"loss_weights[{k}]": weight for k, weight in enumerate(self.loss_weights)})
        for name, value in numbers.items():
            if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, float, numpy.integer,
                                                                                 numpy.floating)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):  # a NaN would only show as a diverged run, epochs later
                raise ValueError(f"{name} must be a finite number, got {value}")
        # NumPy numbers as Python's, which the checkpoints' JSON records take
        for name in numbers:
            if "[" not in name:
                setattr(self, name, float(getattr(self, name)))
        self.loss_weights = tuple(float(weight) for weight in self.loss_weights)
        for name in ("epochs", "batch_size", "n_classes"):
            setattr(self, name, int(getattr(self, name)))
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.loss_weights) != 3 or min(self.loss_weights) < 0:
            raise ValueError(f"loss_weights must be three numbers >= 0 (logits, coarse, edge), got {self.loss_weights}")
        for name in ("dice_weight", "affinity_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not self.recurrent_lr_scale > 0:
            raise ValueError(f"recurrent_lr_scale must be positive, got {self.recurrent_lr_scale}")
        for name in ("weight_decay", "boundary_ratio", "background_ratio", "class_balance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("momentum", "warmup"):  # a fraction: of the last step's velocity, of the run
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 0 and below 1, got {getattr(self, name)}")
        if not (max(self.loss_weights) > 0 or self.dice_weight > 0 or self.affinity_weight > 0):
            raise ValueError("every term of the objective has weight 0 (loss_weights, dice_weight, affinity_weight): "
                             "nothing would be trained")
        for name in ("hidden", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < (name == "hidden"):
                raise ValueError(f"{name} must be an integer of at least {int(name == 'hidden')}, got {value!r}")
            setattr(self, name, int(value))
        if not isinstance(self.batch_norm, bool):
            raise TypeError(f"batch_norm must be True or False, got {self.batch_norm!r}")
        return self


def build_model(config, rng):
    return ARCHITECTURES[config.model](n_classes=config.n_classes, hidden=config.hidden, rng=rng,
                                      gate_bias=config.gate_bias, batch_norm=config.batch_norm)


def starting_checkpoint(config, classes=None):
    """The model of the checkpoint ``config.init``, from which a run starts (fine-tuning), checked
    against the run: the same architecture, sizes and batch normalisation, and the same ``classes``
    where they are known; otherwise a clear error. Cheap (no data needed), so ``minirnng train``
    calls it before loading the dataset."""
    path = config.init
    source = load_model(path, expect=config.model)
    if getattr(source, "batch_norm", False) != config.batch_norm:
        raise ValueError(f"cannot start from {path!r}: it holds a network "
                         f"{'with' if getattr(source, 'batch_norm', False) else 'without'} batch normalisation "
                         f"and this run trains one {'with' if config.batch_norm else 'without'}; the "
                         "last.npz of a --batch-norm run holds its normalisations, its best.npz the folded network")
    if source.classes and classes is not None and list(source.classes) != list(classes):
        raise ValueError(f"cannot start from {path!r}: it was trained on the classes "
                         f"{list(source.classes)}, this run has {list(classes)}")
    # the sizes (hidden width, number of classes): a network of this run's configuration must take them
    build_model(config, numpy.random.default_rng(0)).load_params(source.params(), source=f"checkpoint {path!r}")
    return source


def build_optimizer(config, model):
    options = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.recurrent_lr_scale != 1:
        options["lr_scales"] = {name: config.recurrent_lr_scale for name in model.recurrent_weight_names()}
    if config.optimizer == "sgd":
        options["momentum"] = config.momentum
    grads = model.grads()
    # the trained parameters: those with a gradient (batch normalisation's running statistics,
    # which are parameters of the model too, are measured instead)
    params = {name: value for name, value in model.params().items() if name in grads}
    return OPTIMIZERS[config.optimizer](params, grads, **options)


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of giving it back to the kernel.

    A training step of the NumPy path allocates and frees the same few dozen arrays of 0.1-16 MB
    every time. By default glibc serves the largest from fresh ``mmap`` calls and returns freed
    memory at the top of its heap to the kernel, so every step page-faults them in again, zeroed by
    the kernel: on the benchmark machine 3,000 page faults and 7 ms of system time per RNN-G
    training step (batch 16), about 6% of it. This serves allocations up to 32 MB (glibc's largest
    setting) from the heap and never trims it, so the memory of one step is reused by the next.

    Process-wide: :meth:`Trainer.run` calls it once (it is never called on import); returns
    whether it took effect (False where the C library is not glibc). The price: the peak memory
    of the process stays reserved until it exits.
    """
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# -- evaluation -----------------------------------------------------------------------------------

def evaluate(model, dataset, batch_size=32, predict=None, per_image=False, warm_up=True):
    """Score ``model`` on a preloaded dataset: the metrics summary plus ``ms_per_image``.

    ``predict`` (images -> labels) defaults to ``model.predict``. Labels are compared at the
    dataset's resolution. ``ms_per_image`` times every batch; on the kernel path the first batch is
    first predicted once untimed, since the first launches compile the kernels (``warm_up=False``
    leaves that out where they have run already). With ``per_image``, the summary also holds ``per_image_confusion``,
    (N, K, K) int64 in the dataset's order, for :mod:`minirnng.bootstrap`.
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset holds no images; there is nothing to score")
    predict = predict or model.predict
    # where the model's parameters are (a model, or a DataParallel of one); for anything else that
    # predicts (a two-stage parser, a wrapper), or no model, the device of the backend in force
    place = getattr(model, "on_device", None) or backend.to_device
    accumulator = ConfusionAccumulator(dataset.classes, per_image=per_image)
    elapsed = 0.0
    first = True
    for images, labels in batches(dataset, batch_size, shuffle=False):
        interruption.raise_if_requested()
        if first and warm_up and backend.uses_kernels(place(images[:1])):
            # the first launches compile and load the kernels (NVRTC's, and CuPy's own): a cost paid
            # once, not the model's speed, so the first batch is predicted once untimed
            backend.to_numpy(predict(place(images)))
        first = False
        start = time.perf_counter()
        predicted = backend.to_numpy(predict(place(images)))
        elapsed += time.perf_counter() - start
        accumulator.add(predicted, labels)
    summary = accumulator.summary()
    summary["ms_per_image"] = 1000 * elapsed / len(dataset)
    summary["confusion"] = accumulator.matrix.tolist()
    if per_image:
        summary["per_image_confusion"] = accumulator.per_image
    return summary


# -- the loop -------------------------------------------------------------------------------------

def config_differences(saved, current, ignore=()):
    """``{field: (saved, current)}`` of two configurations of one dataclass (a run's saved one,
    rebuilt from its checkpoint so that fields added since take their defaults, and the one asked
    for now), leaving out the fields in ``ignore``."""
    return {name: (value, getattr(current, name)) for name, value in dataclasses.asdict(saved).items()
            if name not in ignore and getattr(current, name) != value}


def saved_training_state(path, header, config):
    """The training state in the header of the ``last.npz`` at ``path``, or a clear error where
    there is none or it was saved with another configuration than ``config`` (only ``epochs``
    may change)."""
    training = header.get("training")
    if training is None:
        raise ValueError(f"{path} is not a training checkpoint (no training state)")
    expected = {"config": dict, "epoch": int, "rng_state": dict, "history": list, "best_accuracy": (int, float)}
    if not isinstance(training, dict) or any(not isinstance(training.get(key), kind) or isinstance(training.get(key), bool)
                                             for key, kind in expected.items()):
        raise ValueError(f"cannot resume {path}: its training state is damaged (it needs {', '.join(expected)} "
                         "of the right kinds)")
    unknown = sorted(set(training["config"]) - {field.name for field in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"cannot resume {path}: it was trained with settings this minirnng does not know "
                         f"({', '.join(unknown)}; written by minirnng {header.get('minirnng_version', '?')})")
    try:
        saved = TrainConfig(**training["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot resume {path}: its training settings are not valid ({error})") from None
    changed = config_differences(saved, config, ignore=("epochs",))
    if changed:
        raise ValueError(f"cannot resume {path}: the configuration differs (saved, now): {changed}; "
                         "only --epochs may change (the learning-rate schedule then stretches over the new length)")
    return training


def check_datasets(train_set, validation_set, n_classes):
    """A clear error, before any training, where the two splits cannot be trained and scored
    together: not preloaded (arrays of images and labels), other classes than each other's or than
    the model's ``n_classes``, or images of another size (validation would score one class's
    predictions as another's, or fail after a whole epoch)."""
    for split, dataset in (("training", train_set), ("validation", validation_set)):
        if not all(hasattr(dataset, name) for name in ("images", "labels", "classes")):
            raise TypeError(f"Trainer: the {split} set must be preloaded, arrays of images and labels "
                            f"(minirnng.data.preload, or minirnng.data.catalog.load_split), got a "
                            f"{type(dataset).__name__}")
        if len(dataset.classes) != n_classes:
            raise ValueError(f"Trainer: the {split} set has {len(dataset.classes)} classes "
                             f"({', '.join(dataset.classes)}) and the model n_classes={n_classes}")
    if list(validation_set.classes) != list(train_set.classes):
        raise ValueError(f"Trainer: the validation set's classes ({', '.join(validation_set.classes)}) are not "
                         f"the training set's ({', '.join(train_set.classes)})")
    sizes = [tuple(dataset.images.shape[1:3]) for dataset in (train_set, validation_set)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"Trainer: the training images are {sizes[0][0]}x{sizes[0][1]} and the validation "
                         f"images {sizes[1][0]}x{sizes[1][1]}: preload both at one input size")


def data_description(train_set, validation_set):
    """What a resumed run must find again: the input size, the classes, and the number and names
    of the training and validation images (a digest of the names), so that a run is never
    continued on another dataset, split or resolution. The pixels are not hashed: generated
    synthetic images may differ in their last bits from one CPU to another."""
    def names_digest(dataset):
        return hashlib.sha256("\n".join(dataset.names).encode("utf-8")).hexdigest()[:16]

    return {"input_size": [int(s) for s in train_set.images.shape[1:3]], "classes": list(train_set.classes),
            "train_images": len(train_set), "validation_images": len(validation_set),
            "train_names": names_digest(train_set), "validation_names": names_digest(validation_set)}


def progress_bar(total, desc, unit, enabled):
    """A tqdm bar of one epoch. Redrawn ten times a second on a terminal or in a notebook; every
    30 seconds when stderr goes to a file or a pipe, where no redraw erases the last one (a
    250-epoch run would otherwise write megabytes of bars into its log)."""
    from tqdm import tqdm

    interactive = (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()) or "ipykernel" in sys.modules
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0)


def last_checkpoint_path(out_dir):
    return os.path.join(out_dir, "last.npz")


def check_output_folder(out_dir, resume, config=None):
    """Refuse a run that would overwrite another run's checkpoints, or a resume with nothing to resume;
    cheap, so that the command line can call it before loading the data."""
    if not os.fspath(out_dir):
        raise ValueError("the output folder is an empty name; give a folder, e.g. --out .")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        kind = "a broken link" if os.path.islink(out_dir) else "a file"
        raise NotADirectoryError(f"output folder {os.fspath(out_dir)!r} is {kind}, not a folder")
    # a file part-way along the path, or a folder that cannot be written into: now, not after the data
    check_can_create(os.path.join(out_dir, "last.npz"), "the output folder's checkpoint")
    last = last_checkpoint_path(out_dir)
    if resume and not os.path.exists(last):
        raise FileNotFoundError(f"{last} does not exist: there is no run in {out_dir} to --resume")
    if resume and config is not None:
        saved_training_state(last, read_checkpoint(last)[0], config)
    if not resume and os.path.exists(last):
        raise FileExistsError(f"{last} exists: pass resume=True (--resume) to continue that run, "
                              "or choose another output folder; nothing was overwritten")
    if not resume:
        earlier = earlier_run_output(out_dir, config)
        if earlier:
            raise FileExistsError(f"{earlier} exists, from an earlier run: a new run would replace it; choose another "
                                  "output folder or move it away; nothing was overwritten")


def earlier_run_output(out_dir, config=None):
    """A file of another run in ``out_dir`` that a new run would replace, or None. Each epoch
    writes best.npz (when it is the best), then last.npz, then log.csv and curves.png; so a best.npz
    alone is also what a run stopped within its first epoch leaves, and the same run may start again
    over it. Anything else, without a last.npz, was put there by someone."""
    log, best = os.path.join(out_dir, "log.csv"), os.path.join(out_dir, "best.npz")
    for name in ("log.csv", "curves.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    if not os.path.exists(best):
        return None
    try:
        header = read_checkpoint(best)[0]
    except (OSError, ValueError):
        return best
    first_epoch_of_this_run = (config is not None and header.get("epoch") == 1
                               and header.get("train_config") == json.loads(json.dumps(dataclasses.asdict(config))))
    return None if first_epoch_of_this_run else best


@contextlib.contextmanager
def output_folder_lock(out_dir):
    """Hold ``out_dir/.lock`` exclusively while a run writes into ``out_dir``: a second run started
    there at the same time (or a ``--resume`` of a run still going) is refused instead of mixing
    its checkpoints and log with the first's. The lock goes with the process, however it ends.
    On systems without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(out_dir, ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(f"another run is writing to {out_dir}; wait for it to end, or choose "
                                  "another output folder") from None
        yield


#: What the workers that share each batch can be (``Trainer(parallel=...)``, ``--parallel``).
PARALLEL = {"processes": ProcessParallel, "threads": DataParallel}


class Trainer:
    """Train one model on preloaded datasets; see the module docstring for what it writes.

    config : :class:`TrainConfig`; train_set, validation_set : ``PreloadedDataset`` at the model's
    input size; out_dir : folder for checkpoints and logs; progress : show a tqdm bar.
    workers : workers that share each batch on the NumPy path; None: the number a resumed run was
        using, and for a new run one per core (at most 4). It is not part of the configuration:
        without batch normalisation it changes only the rounding of the gradient sums, so a run
        may move to a machine with other cores. With ``batch_norm`` each worker's shard is
        normalised by its own statistics, so the number of workers is part of the training (pass
        it explicitly; a resume with another number is refused, and the GPU path, which does not
        split the batch, normalises over the whole of it). The same seed and workers give the
        same bits.
    parallel : what the workers are: ``"processes"`` (:class:`minirnng.processes.ProcessParallel`,
        the default: no interpreter lock between them, 10% faster on two cores) or ``"threads"``
        (:class:`minirnng.parallel.DataParallel`: nothing to start); both give the same bits.
    """

    def __init__(self, config, train_set, validation_set, out_dir, progress=True, log=print, workers=None,
                 parallel="processes"):
        if parallel not in PARALLEL:
            raise ValueError(f"Trainer: parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
        self.parallel = parallel
        self.config = config.check()
        for split, dataset in (("training", train_set), ("validation", validation_set)):
            if len(dataset) == 0:
                raise ValueError(f"Trainer: the {split} split has no images; training needs at least one "
                                 "in each split")
        check_datasets(train_set, validation_set, config.n_classes)
        self.train_set, self.validation_set = train_set, validation_set
        self.out_dir = os.fspath(out_dir)
        self.progress = progress
        self.log = log
        self.rng = numpy.random.default_rng(config.seed)
        self.model = build_model(config, self.rng)
        self.model.classes = list(train_set.classes)
        self.optimizer = build_optimizer(config, self.model)
        class_weights = None
        if config.class_balance:
            class_weights = class_balance_weights(train_set.labels, config.n_classes, config.class_balance)
        self.objective = StageOneObjective(config.loss_weights, config.boundary_ratio, class_weights,
                                           background_ratio=config.background_ratio,
                                           dice_weight=config.dice_weight,
                                           affinity_weight=config.affinity_weight)
        self.augmentation = AUGMENTATIONS[config.augment]
        self.epoch = 0
        self.history = []
        self.best_accuracy = -1.0
        self.input_size = tuple(train_set.images.shape[1:3])
        self.data = data_description(train_set, validation_set)
        self.workers = workers
        self._network = None
        # set once training has changed the weights: a second run() would go on from wherever the
        # first one stopped (in the middle of an epoch after a Ctrl-C), unlike any seeded run
        self.trained = False
        self.validated = False  # whether this trainer has validated once (evaluate's warm_up)

    @property
    def network(self):
        """The model as training runs it: ``workers`` threads or processes that share each batch
        (started on first use; :meth:`close` stops them)."""
        if self._network is None:
            if self.workers is None:
                self.workers = default_workers()
            self._network = PARALLEL[self.parallel](self.model, self.workers)
        return self._network

    def close(self):
        """Stop the worker processes (or threads); the next use of :attr:`network` starts new ones."""
        if self._network is not None:
            self._network.close()
            self._network = None

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self):
        return last_checkpoint_path(self.out_dir)

    @property
    def best_path(self):
        return os.path.join(self.out_dir, "best.npz")

    def save_state(self):
        save_model(self.model, self.last_path, input_size=self.input_size,
                   extra_arrays=self.optimizer.state_arrays(),
                   training={"config": dataclasses.asdict(self.config), "epoch": self.epoch,
                             "rng_state": self.rng.bit_generator.state, "history": self.history,
                             "best_accuracy": self.best_accuracy, "workers": self.network.workers,
                             # the shards each batch ran in (1 on the GPU, whatever the workers): what a
                             # batch normalisation's statistics depend on
                             "shards": shard_count(self.model, self.network.workers),
                             "data": self.data})

    def resume(self):
        """Continue from ``last.npz`` in ``out_dir``: weights, optimizer, epoch, generator, history."""
        header, params, extra = read_checkpoint(self.last_path)
        training = saved_training_state(self.last_path, header, self.config)
        # runs saved before the description of their data was stored: their input size at least
        saved_data = training.get("data") or {"input_size": list(header.get("input_size", self.data["input_size"]))}
        changed = {k: (v, self.data[k]) for k, v in saved_data.items() if self.data.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {self.last_path}: it was trained on other data (saved, now): "
                             f"{changed}; --data, --root, --input-size and the split sizes must stay as they "
                             "were (or start a new run in another --out)")
        self.model.load_params(params, source=self.last_path)
        try:
            self.optimizer.load_state_arrays(extra)
            self.rng.bit_generator.state = training["rng_state"]
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"cannot resume {self.last_path}: {error}") from None
        self.epoch = int(training["epoch"])
        self.history = list(training["history"])
        self.best_accuracy = float(training["best_accuracy"])
        self.log(f"resumed {self.last_path} after epoch {self.epoch}")
        saved_workers = training.get("workers")  # absent in checkpoints of runs before DataParallel: 1
        saved_workers = 1 if saved_workers is None else int(saved_workers)
        requested = self._network.workers if self._network is not None else self.workers
        if requested is None:  # the run goes on with the workers it was started with
            self.workers = requested = saved_workers
        saved_shards = training.get("shards")
        if saved_shards is None:
            # a checkpoint of an earlier version, which recorded the workers alone (on a GPU too, where
            # a batch runs whole): it cannot tell its shards, so it is judged by the workers, as then
            self.check_resumed_workers(saved_workers, requested)
            return
        before, now = int(saved_shards), shard_count(self.model, requested)
        if now == before:
            return
        on_gpu = shard_count(self.model, 2) == 1
        if self.config.batch_norm:
            where = "on the GPU, which runs each batch whole" if on_gpu else f"with {requested} worker(s)"
            advice = ("resume it with --workers 1, or on the GPU" if before == 1 else
                      f"resume it on the CPU (MINIRNNG_BACKEND=numpy) with --workers {before}" if on_gpu else
                      f"resume it with --workers {before}")
            raise ValueError(f"cannot resume {self.last_path} {where}: it was trained with each batch in {before} "
                             f"shard(s), and with batch normalisation each shard is normalised by its own "
                             f"statistics, so that number is part of the training; {advice}")
        self.log(f"note: the run cut each batch into {before} shard(s) and continues with {now}; the gradient sums "
                 "are rounded differently from here on")

    def check_resumed_workers(self, saved_workers, requested):
        """:meth:`resume` for a checkpoint without its shard count: the workers must match with
        batch normalisation, and a change is noted otherwise."""
        if requested == saved_workers:
            return
        if self.config.batch_norm:
            raise ValueError(f"cannot resume {self.last_path} with {requested} worker(s): it was trained with "
                             f"{saved_workers}, and with batch normalisation each worker's shard is normalised by "
                             f"its own statistics, so that number is part of the training; resume with --workers "
                             f"{saved_workers}")
        self.log(f"note: the run used {saved_workers} worker(s) and continues with {requested}; the gradient sums "
                 "are rounded differently from here on")

    def initialize_from(self, source):
        """Start from the weights of ``source``, the model :func:`starting_checkpoint` read
        (fine-tuning), instead of the random ones. The optimizer, the schedule and the epoch count
        start afresh. A resumed run takes its weights from ``last.npz`` and never reads the
        checkpoint again."""
        self.model.load_params(source.params(), source=f"checkpoint {self.config.init!r}")
        self.log(f"starting from the weights of {self.config.init}")

    # -- one epoch --------------------------------------------------------------------------
    def train_epoch(self):
        config, model, network = self.config, self.model, self.network
        steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        totals = {"loss": 0.0, **{name: 0.0 for name in self.objective.term_names()}}
        computed = {"loss"}  # a term of weight 0 is not computed: a blank in the log, not a loss of 0
        seen = 0
        start = time.perf_counter()
        bar = progress_bar(len(self.train_set), f"epoch {self.epoch + 1}/{config.epochs}", "img", self.progress)
        for step, (images, labels) in enumerate(batches(self.train_set, config.batch_size, rng=self.rng,
                                                        augmentation=self.augmentation)):
            interruption.raise_if_requested()  # a stop whose KeyboardInterrupt Python dropped
            progress = (self.epoch + step / steps_per_epoch) / config.epochs
            self.optimizer.lr = learning_rate(config.schedule, config.lr, progress, config.warmup)
            images, labels = model.on_device(images), model.on_device(labels)
            model.zero_grad()
            # forward, the objective and backward, each shard of the batch computing its own terms
            total, parts = network.objective_step(images, labels, self.objective, self.rng)
            self.optimizer.step()
            model.constrain(config.stability_rule)
            batch = len(labels)
            seen += batch
            totals["loss"] += total * batch
            for name, value in parts.items():
                totals[name] += value * batch
            computed.update(parts)
            # set quietly, then shown by update(), which keeps to the bar's interval
            bar.set_postfix(loss=f"{total:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
            bar.update(batch)
        bar.close()
        advice = f"try a smaller learning rate (the finished epochs are in {self.out_dir})"
        if not all(numpy.isfinite(v) for v in totals.values()):
            raise FloatingPointError(f"training diverged in epoch {self.epoch + 1}: losses {totals}; {advice}")
        # a huge but finite loss in the last step can still overflow the step it makes
        state = {**model.params(), **{f"optimizer {name}": value for name, value in self.optimizer.state.items()}}
        overflowed = [name for name, value in state.items()
                      if not bool(backend.get_array_module(value).isfinite(value).all())]
        if overflowed:
            raise FloatingPointError(f"training diverged in epoch {self.epoch + 1}: {', '.join(overflowed[:4])}"
                                     f"{' ...' if len(overflowed) > 4 else ''} are no longer finite; {advice}")
        # finite weights so large that a forward pass overflows: validation would score the NaN
        # logits as one class and keep the run as its best; one batch of it tells
        images, _ = next(batches(self.validation_set, config.batch_size, shuffle=False))
        logits = network.infer(self.model.on_device(images))
        if not bool(backend.get_array_module(logits).isfinite(logits).all()):
            raise FloatingPointError(f"training diverged in epoch {self.epoch + 1}: the weights are finite but "
                                     f"their logits are not (a forward pass overflows); {advice}")
        row = {f"train_{name}": value / max(seen, 1) for name, value in totals.items() if name in computed}
        row["images_per_second"] = seen / (time.perf_counter() - start)
        row["lr"] = self.optimizer.lr
        return row

    def run(self, resume=False):
        """Train until ``config.epochs``; returns the history (one dict per epoch). A trainer trains
        once: after a stop, ``run(resume=True)`` goes on from the last checkpoint."""
        if self.trained and not resume:
            going_on = (f"run(resume=True) continues from {self.last_path}, or " if os.path.exists(self.last_path)
                        else "it stopped before its first checkpoint, so ")
            raise RuntimeError(f"Trainer.run: this trainer has trained already, and its weights and optimizer are "
                               f"where that run stopped; {going_on}make a new Trainer to start afresh")
        check_output_folder(self.out_dir, resume, self.config)
        # read before the output folder exists, so that a checkpoint that does not fit leaves nothing behind
        source = starting_checkpoint(self.config, self.model.classes) if self.config.init and not resume else None
        os.makedirs(self.out_dir, exist_ok=True)
        with output_folder_lock(self.out_dir):
            keep_freed_memory()
            if resume:
                self.resume()
            elif source is not None:
                self.initialize_from(source)
            if self.epoch >= self.config.epochs:
                self.log(f"the run in {self.out_dir} has finished its {self.epoch} epochs; nothing to do "
                         "(more epochs, `minirnng train ... --epochs N --resume`, continue it, with the "
                         "learning-rate schedule stretched over the new "
                         "number of epochs: a cosine or step rate that had decayed jumps back up)")
                self.write_history()  # a stop between the last checkpoint and the log may have cut them
                return self.history
            if self.network.workers > 1 and not backend.uses_kernels(next(iter(self.model.params().values()))):
                self.log(f"{self.network.workers} worker {self.parallel} share each batch "
                         f"({type(self.network).__module__}.{type(self.network).__name__})")
                if self.network.workers > available_cores():
                    self.log(f"note: {self.network.workers} workers on {available_cores()} cores take turns, "
                             "which costs time: --workers at most the number of cores is faster")
            self.trained = True
            try:
                self.train_epochs()
            finally:
                self.close()
        return self.history

    def train_epochs(self):
        """The epochs from ``self.epoch + 1`` to ``config.epochs``: train, validate, checkpoint, log."""
        while self.epoch < self.config.epochs:
            epoch_start = time.perf_counter()
            row = {"epoch": self.epoch + 1}
            # a diverging run overflows long before its epoch ends; the check at the end of
            # train_epoch reports it once, with the epoch, instead of a warning per operation
            with numpy.errstate(over="ignore", invalid="ignore"):
                row.update(self.train_epoch())
            # the kernels have run by the second validation of this process: no untimed first batch then
            validation = evaluate(self.network, self.validation_set, warm_up=not self.validated)
            self.validated = True
            row["val_accuracy"] = validation["accuracy"]
            for name, value in validation["f_measure"].items():
                row[f"val_F_{name}"] = value
            row["seconds"] = time.perf_counter() - epoch_start
            self.epoch += 1
            self.history.append(row)
            if validation["accuracy"] > self.best_accuracy:
                self.best_accuracy = validation["accuracy"]
                chosen = self.model.folded() if self.config.batch_norm else self.model
                save_model(chosen, self.best_path, input_size=self.input_size, epoch=self.epoch,
                           validation=validation, train_config=dataclasses.asdict(self.config))
            self.save_state()
            self.write_history()
            scores = ", ".join(f"F-{name} {100 * value:.2f}" for name, value in validation["f_measure"].items()
                               if value is not None)
            self.log(f"epoch {self.epoch}/{self.config.epochs}: loss {row['train_loss']:.4f}, "
                     f"val accuracy {100 * row['val_accuracy']:.2f}%, {scores} "
                     f"({row['images_per_second']:.0f} img/s, {row['seconds']:.0f} s)")

    def write_history(self):
        """``log.csv`` and ``curves.png`` of the epochs so far."""
        if self.history:
            write_log(self.history, os.path.join(self.out_dir, "log.csv"))
            plot_curves(self.history, os.path.join(self.out_dir, "curves.png"))


def write_log(history, path):
    """Write the history as CSV (atomically: the log of a killed run stays readable)."""
    columns = []
    for row in history:
        columns += [key for key in row if key not in columns]
    with replacing(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)


def plot_curves(history, path):
    """Training loss and validation scores against the epoch, as a PNG (see minirnng.viz)."""
    from .viz import save_figure, training_curves_figure
    save_figure(training_curves_figure(history), path)
