"""Training and evaluation of stage 2, and the reproduction of the paper's Table 3.

The two stages are trained one after the other, as in the paper:

1. stage 1, an 11-class RNN-G on whole faces, by the stage-1 loop (:class:`minirnng.train.Trainer`,
   its three-term objective, class-balanced because the parts are small);
2. the crop geometry and the mean face shape, fitted on the training label maps and key points
   (:meth:`CropGeometry.fit`, :meth:`FaceShape.fit`);
3. the three component networks, together, on crops cut around the training faces' key points
   (the dataset's landmarks if it has them, else read off the label maps), jittered every step
   as augmentation (:func:`jitter_keypoints`): one epoch is one pass over the faces, each face
   giving two eye crops (the right one mirrored), a nose crop and a mouth crop. Each network has
   its own Adam optimizer and a softmax cross-entropy weighted by inverse class frequency to the
   power ``class_balance`` (the inner mouth is rare even in a mouth crop).

Evaluation follows the paper's Table 3: every pixel of the test images, one confusion matrix over
the set, F-measures of the components and of their union ("overall") from
:func:`minirnng.metrics.table3_scores`. "1-stage" is the stage-1 network alone (its arg-max over
11 classes); "2-stage" is the :class:`TwoStageParser` built on that same network, so the two rows
differ only by stage 2.
"""

import dataclasses
import hashlib
import json
import math
import os
import time

import numpy

from . import backend, interruption
from .atomic import write_json
from .data.catalog import load_split, open_dataset
from .data.classes import HELEN_CLASSES
from .data.datasets import MissingDataError
from .data.pipeline import normalize, preload
from .losses import SoftmaxCrossEntropy
from .metrics import confusion_matrix, precision_recall_f, table3_scores
from .models import load_model
from .models.checkpoint import write_npz_atomically
from .models.crops import CROPS, CropGeometry, crop_bilinear, crop_nearest, helen_to_crop
from .models.keypoints import FaceShape, complete_keypoints, jitter_keypoints, keypoints_from_labels
from .models.stage2 import CROP_NETWORK, EyeBrowNet, MouthNet, NoseNet, TwoStageParser
from .objective import class_balance_weights
from .optim import SCHEDULES, Adam, learning_rate
from .parallel import DataParallel, default_workers
from .train import (TrainConfig, Trainer, check_datasets, config_differences, data_description, evaluate, progress_bar,
                    write_log)

#: The paper's Table 3, rows "Ours 1-stage" and "Ours 2-stage" (F-measure, %).
PAPER_TABLE3 = {
    "1-stage": {"eyes": 63.3, "brows": 53.7, "nose": 87.5, "in mouth": 65.7, "U-lip": 54.0, "L-lip": 72.6,
                "mouth": 80.6, "skin": 91.1, "overall": 78.8},
    "2-stage": {"eyes": 86.8, "brows": 77.0, "nose": 93.0, "in mouth": 79.2, "U-lip": 74.3, "L-lip": 81.7,
                "mouth": 89.1, "skin": 92.1, "overall": 88.6},
}
TABLE3_COLUMNS = tuple(PAPER_TABLE3["1-stage"])
#: The columns on which two stages must beat one on synthetic faces (the issue's acceptance rule).
MUST_IMPROVE = ("eyes", "brows", "U-lip", "L-lip", "overall")

#: Training budgets: images per split (synthetic data) and epochs of each stage.
BUDGETS = {
    "small": {"synthetic": (1200, 150, 300), "stage1_epochs": 12, "component_epochs": 12},
    "paper": {"synthetic": (4000, 300, 500), "stage1_epochs": 40, "component_epochs": 40},
}
_NETWORK_CLASSES = {"eyes": EyeBrowNet, "nose": NoseNet, "mouth": MouthNet}


@dataclasses.dataclass
class ComponentTrainConfig:
    """How the three component networks are trained (stored in the parser's checkpoint)."""

    epochs: int = 12
    batch_size: int = 16          # faces per step: 32 eye crops, 16 nose and 16 mouth crops
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup: float = 0.02
    class_balance: float = 0.5
    jitter: float = 0.08          # key point jitter, standard deviation in eye distances
    width: int = 8
    seed: int = 0

    def check(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "width", "seed"):
            value = getattr(self, name)
            if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, numpy.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))  # a NumPy integer as Python's: the checkpoint's JSON record takes it
        for name in ("lr", "warmup", "class_balance", "jitter"):
            value = getattr(self, name)
            if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, float, numpy.number)) \
                    or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if not self.lr > 0 or not 0 <= self.warmup < 1 or self.seed < 0:
            raise ValueError(f"lr must be positive, warmup at least 0 and below 1 and seed at least 0, got "
                             f"{self.lr}, {self.warmup} and {self.seed}")
        if self.epochs < 1 or self.batch_size < 1 or self.width < 1:
            raise ValueError(f"epochs, batch_size and width must be positive, got {self.epochs}, "
                             f"{self.batch_size} and {self.width}")
        if self.jitter < 0 or self.class_balance < 0:
            raise ValueError(f"jitter and class_balance must be non-negative, got {self.jitter} and {self.class_balance}")
        return self


# -- crops of a whole data set ----------------------------------------------------------------------

def training_keypoints(dataset, landmarks=None, shape=None):
    """Key points float64 (N, 5, 2) for a preloaded dataset: its ``landmarks`` if given, else read
    off its label maps, missing ones filled in from ``shape`` (a :class:`FaceShape`; default mean).
    The labels must name the sides as :data:`~minirnng.data.classes.HELEN_CLASSES` does
    (:func:`check_side_convention`)."""
    check_side_convention(dataset.labels)
    if landmarks is not None:
        landmarks = numpy.asarray(landmarks, dtype=numpy.float64)
        if landmarks.shape != (len(dataset), 5, 2):
            raise ValueError(f"landmarks must be ({len(dataset)}, 5, 2), got {landmarks.shape}")
        if not numpy.isfinite(landmarks).all():
            raise ValueError("landmarks must be finite: a missing point would become the crops' NaN")
        return landmarks
    points, found = keypoints_from_labels(dataset.labels)
    return complete_keypoints(points, found, shape or FaceShape(), dataset.labels)


def check_side_convention(labels):
    """Refuse label maps whose "left" eye lies right of their "right" eye in most faces.

    minirnng's left is the image's left (:mod:`minirnng.data.classes`); a data set that names the
    person's left instead would put the other eye's labels into each eye crop, and the eye network
    would learn its own class as "other" without any error. labels : (N, H, W) HELEN classes."""
    left, right = HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")
    flipped = counted = 0
    for face in labels:
        left_columns, right_columns = numpy.nonzero(face == left)[1], numpy.nonzero(face == right)[1]
        if len(left_columns) and len(right_columns):
            counted += 1
            flipped += left_columns.mean() > right_columns.mean()
    if counted and flipped > counted / 2:
        raise ValueError(f"the labels name the eyes the other way round: in {flipped} of {counted} faces with both "
                         "eyes the 'left eye' lies right of the 'right eye'. minirnng's left is the image's left (the "
                         "person's right); swap classes 2 <-> 3 and 4 <-> 5 of these labels")


def cut_crops(images, labels, matrices):
    """The four crops of a batch: ``{crop: (images float32 (N, 3, h, w), labels uint8 (N, h, w))}``.

    images float32 (N, 3, H, W) normalised; labels (N, H, W) HELEN classes; matrices from
    :meth:`CropGeometry.matrices`. Crop labels are in the crop's network classes; pixels outside
    the image are "other".
    """
    crops = {}
    for crop, spec in CROPS.items():
        crop_labels = helen_to_crop(crop)[crop_nearest(labels, matrices[crop], spec.size)]
        crops[crop] = (crop_bilinear(images, matrices[crop], spec.size), crop_labels)
    return crops


def _network_batches(crops, rng=None):
    """Group crops by network: ``{network: (images, labels)}``; with ``rng``, nose and mouth crops
    are mirrored at random (their classes have no side; eye crops are already side-normalised)."""
    grouped = {}
    for crop, (images, labels) in crops.items():
        grouped.setdefault(CROP_NETWORK[crop], []).append((images, labels))
    batches = {}
    for network, parts in grouped.items():
        images = numpy.concatenate([p[0] for p in parts])
        labels = numpy.concatenate([p[1] for p in parts])
        if rng is not None and network != "eyes":
            flip = rng.random(len(images)) < 0.5
            images[flip] = images[flip][..., ::-1]
            labels[flip] = labels[flip][..., ::-1]
        batches[network] = (images, labels)
    return batches


def crop_class_weights(dataset, keypoints, geometry, power, limit=400):
    """Per network, class weights (K,) from the crop labels of up to ``limit`` training faces."""
    count = min(len(dataset), limit)
    matrices = geometry.matrices(keypoints[:count])
    crop_labels = {crop: helen_to_crop(crop)[crop_nearest(dataset.labels[:count], matrices[crop], spec.size)]
                   for crop, spec in CROPS.items()}
    weights = {}
    for network, cls in _NETWORK_CLASSES.items():
        labels = numpy.concatenate([labels for crop, labels in crop_labels.items() if CROP_NETWORK[crop] == network])
        weights[network] = class_balance_weights(labels, len(cls.component_classes), power)
    return weights


# -- training -----------------------------------------------------------------------------------

def train_components(train_set, keypoints, geometry, config=None, validation_set=None, validation_keypoints=None,
                     progress=True, log=print, workers=None, state_path=None):
    """Train the three component networks; returns ``(networks {"eyes", "nose", "mouth"}, history)``.

    train_set : a preloaded HELEN-class dataset (uint8 images (N, H, W, 3), labels (N, H, W));
    keypoints : float (N, 5, 2) in its pixels; geometry : a :class:`CropGeometry`; config : a
    :class:`ComponentTrainConfig`. With a validation set (and its key points), each epoch ends
    with the networks' F-measures on its crops (:func:`evaluate_components`). workers : threads
    that share each network's batch of crops (:class:`minirnng.parallel.DataParallel`; None: one
    per core, at most 4). state_path : an ``.npz`` written after every epoch (the three networks,
    their optimizers, the generator, the epoch and the history); where it exists, training
    continues from it, as if it had never stopped, when it was written with the same
    configuration, data, key points and geometry, and is refused otherwise.
    """
    config = (config or ComponentTrainConfig()).check()
    # checked before the first epoch, not found wrong after it
    _check_keypoints(keypoints, train_set, "keypoints", "train_set")
    if validation_set is not None:
        if validation_keypoints is None:
            raise ValueError("train_components: a validation_set needs its validation_keypoints")
        _check_keypoints(validation_keypoints, validation_set, "validation_keypoints", "validation_set")
    rng = numpy.random.default_rng(config.seed)
    networks = {name: cls(width=config.width, rng=rng) for name, cls in _NETWORK_CLASSES.items()}
    for network in networks.values():
        network.classes = list(network.component_classes)
    optimizers = {name: Adam(net.params(), net.grads(), lr=config.lr) for name, net in networks.items()}
    workers = default_workers() if workers is None else workers
    weights = crop_class_weights(train_set, keypoints, geometry, config.class_balance)
    losses = {name: SoftmaxCrossEntropy(class_weights=weights[name]) for name in networks}
    log("component class weights: " + "; ".join(
        f"{name} " + ", ".join(f"{cls} {w:.2f}" for cls, w in zip(networks[name].component_classes, weights[name]))
        for name in networks))
    state = _ComponentState(state_path, networks, optimizers, rng, {
        "config": dataclasses.asdict(config), "geometry": geometry.to_dict(), "faces": len(train_set),
        "fingerprint": _fingerprint(train_set.labels, keypoints, validation_keypoints)})
    history = state.resume(log)
    shared = {name: DataParallel(net, workers) for name, net in networks.items()}
    try:
        history = _train_component_epochs(networks, shared, optimizers, losses, train_set, keypoints, geometry,
                                          config, rng, validation_set, validation_keypoints, progress, log,
                                          history, state)
    finally:
        for parallel in shared.values():
            parallel.close()  # its worker threads, which would otherwise wait for the garbage collector
    return networks, history


def _check_keypoints(points, dataset, name, set_name):
    shape = numpy.shape(points)
    if shape != (len(dataset), 5, 2):
        raise ValueError(f"train_components: {name} must be ({len(dataset)}, 5, 2), one set of five key points "
                         f"per face of {set_name}, got {shape}")


def _fingerprint(*arrays):
    """A short digest of the arrays a component run trains on: a resumed run must see the same."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is not None:
            array = numpy.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class _ComponentState:
    """The component networks' training state in one ``.npz`` (written atomically after each epoch):
    ``<network>.param.<name>`` and ``<network>.optimizer.<key>`` arrays, and a JSON ``header``
    with the epoch, the history, the generator's state and what the run was trained on."""

    def __init__(self, path, networks, optimizers, rng, recipe):
        self.path, self.networks, self.optimizers, self.rng = path, networks, optimizers, rng
        self.recipe = json.loads(json.dumps(recipe))  # as it reads back from the file

    def resume(self, log):
        """The history so far, with the networks, optimizers and generator restored; [] for a new run."""
        if self.path is None or not os.path.exists(self.path):
            return []
        try:
            with numpy.load(self.path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
            header = json.loads(bytes(arrays.pop("header")).decode("utf-8"))
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path} is not a readable component training state ({error}); delete it to "
                             "train the component networks from their first epoch") from None
        changed = sorted(key for key in self.recipe if header.get("recipe", {}).get(key) != self.recipe[key])
        if changed:
            raise ValueError(f"{self.path} holds component training of another {', '.join(changed)}; delete it to "
                             "train the component networks from their first epoch")
        for name, network in self.networks.items():
            network.load_params({key[len(f"{name}.param."):]: value for key, value in arrays.items()
                                 if key.startswith(f"{name}.param.")}, source=self.path)
            self.optimizers[name].load_state_arrays({key[len(f"{name}.optimizer."):]: value
                                                     for key, value in arrays.items()
                                                     if key.startswith(f"{name}.optimizer.")})
        self.rng.bit_generator.state = header["rng_state"]
        log(f"resumed the component networks from {self.path} after epoch {len(header['history'])}")
        return list(header["history"])

    def save(self, history):
        if self.path is None:
            return
        arrays = {}
        for name, network in self.networks.items():
            arrays.update({f"{name}.param.{key}": backend.to_numpy(value) for key, value in network.params().items()})
            arrays.update({f"{name}.optimizer.{key}": backend.to_numpy(value)
                           for key, value in self.optimizers[name].state_arrays().items()})
        header = {"recipe": self.recipe, "history": history, "rng_state": self.rng.bit_generator.state}
        arrays["header"] = numpy.frombuffer(json.dumps(header).encode("utf-8"), dtype=numpy.uint8)
        write_npz_atomically(self.path, arrays)


def _train_component_epochs(networks, shared, optimizers, losses, train_set, keypoints, geometry, config, rng,
                            validation_set, validation_keypoints, progress, log, history, state):
    """The epochs of :func:`train_components` after those of ``history``; returns the history,
    saving ``state`` after each epoch."""
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    history = list(history)
    for epoch in range(len(history), config.epochs):
        start = time.perf_counter()
        totals = {name: 0.0 for name in networks}
        order = rng.permutation(len(train_set))
        bar = progress_bar(len(order), f"components {epoch + 1}/{config.epochs}", "face", progress)
        for step, first in enumerate(range(0, len(order), config.batch_size)):
            interruption.raise_if_requested()  # a stop whose KeyboardInterrupt Python dropped
            chosen = order[first:first + config.batch_size]
            points = jitter_keypoints(keypoints[chosen], config.jitter, rng)
            crops = cut_crops(normalize(train_set.images[chosen]), train_set.labels[chosen],
                              geometry.matrices(points))
            rate = learning_rate(config.schedule, config.lr, (epoch + step / steps_per_epoch) / config.epochs,
                                 config.warmup)
            for name, (images, labels) in _network_batches(crops, rng).items():
                network, optimizer = shared[name], optimizers[name]
                network.zero_grad()
                logits = network.forward(networks[name].on_device(images))["logits"]
                totals[name] += losses[name].forward(logits, networks[name].on_device(labels.astype(numpy.int64))) \
                    * len(chosen)
                network.backward({"logits": losses[name].backward()}, input_gradient=False)
                optimizer.lr = rate
                optimizer.step()
            bar.update(len(chosen))
        bar.close()
        row = {"epoch": epoch + 1, "lr": rate}
        row.update({f"train_loss_{name}": total / len(order) for name, total in totals.items()})
        if not all(numpy.isfinite(v) for v in totals.values()):
            raise FloatingPointError(f"component training diverged in epoch {epoch + 1}: {totals}")
        if validation_set is not None:
            scores = evaluate_components(networks, validation_set, validation_keypoints, geometry)
            row.update({f"val_F_{name}": value for name, value in scores.items()})
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        losses_text = ", ".join(f"{name} {row[f'train_loss_{name}']:.3f}" for name in networks)
        scores_text = ", ".join(f"{key[6:]} {value:.1f}" for key, value in row.items() if key.startswith("val_F_"))
        log(f"components epoch {epoch + 1}/{config.epochs}: loss {losses_text}"
            + (f"; validation F (%) {scores_text}" if scores_text else "") + f" ({row['seconds']:.0f} s)")
        with interruption.deferred():  # the epoch's state is written whole or not at all
            state.save(history)
    return history


def evaluate_components(networks, dataset, keypoints, geometry, batch_size=32):
    """F-measure (%) of each part class on the crops of ``dataset`` cut at ``keypoints`` (no jitter):
    ``{"<network> <class>": F}`` over all crop pixels of the set, e.g. ``"eyes brow"``."""
    confusions = {name: 0 for name in networks}
    for first in range(0, len(dataset), batch_size):
        chosen = slice(first, first + batch_size)
        crops = cut_crops(normalize(dataset.images[chosen]), dataset.labels[chosen],
                          geometry.matrices(keypoints[chosen]))
        for name, (images, labels) in _network_batches(crops).items():
            predicted = backend.to_numpy(networks[name].predict(networks[name].on_device(images)))
            confusions[name] = confusions[name] + confusion_matrix(predicted, labels, networks[name].n_classes)
    scores = {}
    for name, confusion in confusions.items():
        f_measure = precision_recall_f(confusion)[2]
        for cls, value in zip(networks[name].component_classes[1:], f_measure[1:]):
            scores[f"{name} {cls}"] = 100 * float(value)
    return scores


def train_two_stage(train_set, validation_set, out_dir, stage1_config=None, component_config=None,
                    landmarks=None, progress=True, log=print):
    """Train both stages (module docstring) and save the parser to ``out_dir/two_stage.npz``.

    train_set, validation_set : preloaded 11-class (HELEN) datasets at stage 1's input size;
    stage1_config : a :class:`TrainConfig` (default: RNN-G, 11 classes, class balance 0.5);
    component_config : a :class:`ComponentTrainConfig`; landmarks : optional ``(train, validation)``
    key point arrays (N, 5, 2) from the dataset; without them key points are read off the labels.
    Stage 1 resumes from ``out_dir/stage1/last.npz`` if a run with the same configuration is there,
    the component networks from ``out_dir/components_last.npz`` (removed once the parser is saved),
    and a ``two_stage.npz`` trained with the same configurations, data and ``landmarks`` is returned
    as it is, not trained again. Returns the :class:`TwoStageParser`.
    """
    if tuple(getattr(train_set, "classes", ())) != HELEN_CLASSES:
        raise ValueError(f"train_two_stage needs 11-class (HELEN) labels, got classes "
                         f"{getattr(train_set, 'classes', None)}")
    check_datasets(train_set, validation_set, len(HELEN_CLASSES))  # before the output folder is made
    stage1_config = stage1_config or TrainConfig(model="rnng", n_classes=11, class_balance=0.5)
    if stage1_config.n_classes != len(HELEN_CLASSES):
        raise ValueError(f"train_two_stage: stage1_config.n_classes must be {len(HELEN_CLASSES)} (HELEN's classes), "
                         f"got {stage1_config.n_classes}")
    component_config = (component_config or ComponentTrainConfig()).check()
    os.makedirs(out_dir, exist_ok=True)
    input_size = tuple(train_set.images.shape[1:3])
    path = os.path.join(out_dir, "two_stage.npz")
    data = data_description(train_set, validation_set)
    # the key points decide the crops the component networks learn on: a parser trained on others is not this one
    # (to a thousandth of a pixel: points computed by cos and sin may differ in their last bits between machines)
    data["landmarks"] = None if landmarks is None else hashlib.sha256(b"".join(
        numpy.round(numpy.asarray(points, dtype=numpy.float64), 3).tobytes()
        for points in landmarks)).hexdigest()[:16]
    if os.path.exists(path):
        finished = TwoStageParser.load(path)
        training = finished.checkpoint_header.get("training") or {}
        changed = {f"{stage} {name}": values for stage, saved, config in (
            ("stage1", TrainConfig(**training.get("stage1", {})), stage1_config),
            ("components", ComponentTrainConfig(**training.get("components", {})), component_config))
            for name, values in config_differences(saved, config).items()}
        # parsers saved before the data was recorded: their input size at least
        saved_data = training.get("data") or {"input_size": list(finished.stage1_size)}
        changed.update({k: (v, data[k]) for k, v in saved_data.items() if data.get(k) != v})
        if changed:
            raise ValueError(f"{path} holds a two-stage parser trained otherwise (saved, now): {changed}; "
                             "give another output folder to train this one")
        log(f"reusing the two-stage parser in {path} (trained with this configuration and data)")
        return finished

    folder = os.path.join(out_dir, "stage1")
    log(f"stage 1: {stage1_config.model}, {stage1_config.n_classes} classes, {stage1_config.epochs} epochs -> {folder}")
    trainer = Trainer(stage1_config, train_set, validation_set, folder, progress=progress, log=log)
    trainer.run(resume=os.path.exists(trainer.last_path))
    stage1 = load_model(trainer.best_path)
    # the epochs' own times: right also when stage 1 was resumed, or had finished before this call
    stage1_seconds = sum(row["seconds"] for row in trainer.history)

    train_landmarks, validation_landmarks = landmarks if landmarks is not None else (None, None)
    train_points = training_keypoints(train_set, train_landmarks)
    validation_points = training_keypoints(validation_set, validation_landmarks)
    shape = FaceShape.fit(train_points, train_set.labels)
    geometry = CropGeometry.fit(train_set.labels, train_points)
    log("crop boxes (frame units: centre x, y, half width, half height): " + "; ".join(
        f"{crop} " + ", ".join(f"{v:.2f}" for v in values) for crop, values in geometry.to_dict().items()))
    state_path = os.path.join(out_dir, "components_last.npz")
    networks, history = train_components(train_set, train_points, geometry, component_config, validation_set,
                                         validation_points, progress=progress, log=log, state_path=state_path)
    write_log(history, os.path.join(out_dir, "components_log.csv"))
    parser = TwoStageParser(stage1, networks["eyes"], networks["nose"], networks["mouth"], geometry=geometry,
                            shape=shape, stage1_size=input_size)
    parser.save(path, training={"stage1": dataclasses.asdict(stage1_config),
                                "components": dataclasses.asdict(component_config), "data": data,
                                "stage1_seconds": stage1_seconds,
                                # the epochs' own times, as stage 1's: right also after a resume
                                "component_seconds": sum(row["seconds"] for row in history),
                                "component_history": history})
    log(f"saved the two-stage parser to {path}")
    os.remove(state_path)  # the parser holds the networks now; a later call reuses it
    return TwoStageParser.load(path)  # as a later call reuses it, with its header (the training record)


def cpu_seconds():
    """CPU seconds used so far by this process and by its finished child processes (the training
    workers, which do most of the work and are stopped when each training run ends)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# -- evaluation ---------------------------------------------------------------------------------

def evaluate_table3(predict, dataset, batch_size=16):
    """Table 3's columns (F-measure, %) of ``predict`` (float images (N, 3, H, W) -> labels (N, H, W))
    on a preloaded 11-class dataset, plus ``ms_per_image`` and the ``confusion`` matrix (a list)."""
    summary = evaluate(None, dataset, batch_size=batch_size, predict=predict)
    scores = table3_scores(numpy.asarray(summary["confusion"]))
    scores["ms_per_image"] = summary["ms_per_image"]
    scores["accuracy"] = 100 * summary["accuracy"]
    scores["confusion"] = summary["confusion"]
    return scores


def format_table3(ours, title):
    """Our "1-stage" and "2-stage" rows beside the paper's (F-measure, %)."""
    width = 9
    lines = [title, f"{'':<20}" + "".join(f"{column:>{width}}" for column in TABLE3_COLUMNS)]
    for row in ("1-stage", "2-stage"):
        for source, values in ((f"ours {row}", ours.get(row, {})), (f"paper {row}", PAPER_TABLE3[row])):
            cells = "".join(f"{values[c]:>{width}.1f}" if values.get(c) is not None else f"{'n/a':>{width}}"
                            for c in TABLE3_COLUMNS)
            lines.append(f"{source:<20}{cells}")
    if "1-stage" in ours and "2-stage" in ours:
        gains = "".join(f"{ours['2-stage'][c] - ours['1-stage'][c]:>+{width}.1f}"
                        if ours["2-stage"].get(c) is not None and ours["1-stage"].get(c) is not None
                        else f"{'n/a':>{width}}" for c in TABLE3_COLUMNS)
        lines.append(f"{'ours 2 - 1':<20}{gains}")
    return "\n".join(lines)


# -- Table 3 ------------------------------------------------------------------------------------

def _synthetic_splits(sizes, input_size):
    """Preloaded synthetic train, validation and test splits with the generator's key points."""
    splits, landmarks = {}, {}
    for split, count in zip(("train", "validation", "test"), sizes):
        faces = open_dataset("synthetic", split, n_classes=11, size=count)
        splits[split] = preload(faces, size=(input_size, input_size))
        scale = input_size / faces.size  # the generator's pixels -> the preloaded pixels (centres aligned)
        landmarks[split] = numpy.stack([(faces.keypoints(i) + 0.5) * scale - 0.5 for i in range(len(faces))])
    return splits, landmarks


def _helen_splits(root, input_size, log):
    splits = {split: load_split("helen", split, root, n_classes=11, input_size=input_size)
              for split in ("train", "validation")}
    try:
        splits["test"] = load_split("helen", "test", root, n_classes=11, input_size=input_size)
    except MissingDataError as error:
        log(f"no HELEN test split ({str(error).splitlines()[0]}); scoring on validation")
        splits["test"] = splits["validation"]
    return splits


def reproduce_table3(data="synthetic", budget="small", json_path=None, out_dir="runs/reproduce", progress=True,
                     log=print, input_size=128):
    """Train stage 1 and stage 2 at ``budget`` and score "1-stage" against "2-stage" as Table 3.

    data : ``"synthetic"`` or the folder of HELEN (the ``Helen`` loader's layout); budget :
    ``"small"`` (minutes on a laptop CPU) or ``"paper"``; json_path : where to write the results
    (atomically); out_dir : checkpoints and logs go to ``out_dir/table3-<synthetic|helen>-<budget>/``
    (``stage1/``, ``components_log.csv``, ``two_stage.npz``); running the same command again
    resumes an interrupted run there, or reuses a finished one.
    Returns ``{"1-stage": {column: F %}, "2-stage": {...}, "_meta": {...}}``; the columns are
    :data:`TABLE3_COLUMNS`.
    """
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {', '.join(BUDGETS)}")
    if data != "synthetic" and not os.path.isdir(data):
        raise MissingDataError(f"reproduce_table3: data must be 'synthetic' or the HELEN folder; {data!r} is not a folder")
    if not os.fspath(out_dir):
        raise ValueError("reproduce_table3: out_dir is an empty name; give the folder for the runs, "
                         "e.g. runs/reproduce")
    setting = BUDGETS[budget]
    # one folder per dataset and budget, as for tables 1 and 2: another budget never meets this one's runs
    out_dir = os.path.join(out_dir, f"table3-{'synthetic' if data == 'synthetic' else 'helen'}-{budget}")
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if data == "synthetic":
        splits, landmarks = _synthetic_splits(setting["synthetic"], input_size)
        landmarks = (landmarks["train"], landmarks["validation"])
    else:
        splits, landmarks = _helen_splits(data, input_size, log), None
    test_name = "test" if splits["test"] is not splits["validation"] else "validation"
    log(f"table3 on {data}: {len(splits['train'])} training, {len(splits['validation'])} validation, "
        f"{len(splits['test'])} {test_name} images at {input_size}x{input_size}; budget {budget}: "
        f"{setting['stage1_epochs']} stage-1 epochs, {setting['component_epochs']} component epochs")
    stage1_config = TrainConfig(model="rnng", n_classes=11, epochs=setting["stage1_epochs"], class_balance=0.5)
    component_config = ComponentTrainConfig(epochs=setting["component_epochs"])
    parser = train_two_stage(splits["train"], splits["validation"], out_dir, stage1_config, component_config,
                             landmarks=landmarks, progress=progress, log=log)
    # from the checkpoint: the training's own time, also when this call reused a finished run
    recorded = parser.checkpoint_header["training"]
    training_minutes = (recorded["stage1_seconds"] + recorded["component_seconds"]) / 60

    results = {}
    for row, predict in (("1-stage", parser.stage1.predict), ("2-stage", parser.predict)):
        scores = evaluate_table3(predict, splits["test"])
        # A class group absent from both truth and prediction has no F-measure: null in the JSON.
        results[row] = {column: None if math.isnan(scores[column]) else scores[column] for column in TABLE3_COLUMNS}
        results.setdefault("_details", {})[row] = {key: scores[key] for key in ("accuracy", "ms_per_image", "confusion")}
    improved = {column: (results["2-stage"][column] or 0.0) > (results["1-stage"][column] or 0.0)
                for column in MUST_IMPROVE}
    results["_meta"] = {
        "table": "table3", "data": data, "budget": budget, "evaluated_on": test_name, "input_size": input_size,
        "images": {split: len(dataset) for split, dataset in splits.items()},
        "stage1_epochs": setting["stage1_epochs"], "component_epochs": setting["component_epochs"],
        "training_minutes": training_minutes, "minutes": (time.perf_counter() - started) / 60,
        "cpu_minutes": (cpu_seconds() - cpu_started) / 60,
        "two_stage_beats_one_stage": improved, "checkpoint": os.path.join(out_dir, "two_stage.npz"),
        "backend": backend.current(), "paper": PAPER_TABLE3,
    }
    log(format_table3(results, f"Table 3 on {data} ({test_name} split), budget {budget}: F-measure (%), ours "
                               f"beside the paper's HELEN numbers"))
    log(f"{results['_meta']['minutes']:.1f} minutes ({results['_meta']['cpu_minutes']:.1f} of CPU time); "
        "two stages beat one on "
        + ", ".join(f"{column} {'yes' if better else 'NO'}" for column, better in improved.items()))
    if json_path:
        log(f"wrote {write_json(json_path, results)}")
    return results


__all__ = ["ComponentTrainConfig", "train_components", "evaluate_components", "train_two_stage", "evaluate_table3",
           "reproduce_table3", "format_table3", "PAPER_TABLE3", "BUDGETS"]
