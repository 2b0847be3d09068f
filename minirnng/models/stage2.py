"""Stage 2 (paper section 4): component networks on crops, and the two-stage 11-class parser.

The component networks
----------------------
One network per kind of facial component, each five convolutions, two max-poolings and two
transposed convolutions, no recurrence (the paper's Figure 2(b)). For an ``h x w`` crop and
width ``c`` (8 by default)::

    conv1    Conv2d 3->c, 3x3, pad 1, ReLU           c  x h   x w
    pool2    MaxPool 2x2                             c  x h/2 x w/2
    conv3    Conv2d c->2c, 3x3, pad 1, ReLU          2c x h/2 x w/2
    pool4    MaxPool 2x2                             2c x h/4 x w/4
    conv5    Conv2d 2c->2c, 3x3, pad 1, ReLU         2c x h/4 x w/4
    conv6    Conv2d 2c->2c, 3x3, pad 1, ReLU         2c x h/4 x w/4
    deconv7  ConvTranspose2d 2c->c, 4x4, s2, p1, ReLU c x h/2 x w/2
    conv8    Conv2d c->c, 1x1, ReLU                  c  x h/2 x w/2
    deconv9  ConvTranspose2d c->K, 4x4, s2, p1       logits K x h x w

=================  ===========  =============================================  =======
class              crop (h x w) classes                                        K
=================  ===========  =============================================  =======
``EyeBrowNet``     64 x 64      other, brow, eye (both sides: the right crop     3
                                is mirrored in and out)
``NoseNet``        64 x 64      other, nose                                      2
``MouthNet``       32 x 64      other, upper lip, inner mouth, lower lip         4
=================  ===========  =============================================  =======

The width is ours (the paper's figure is not reproduced): with 8, the three networks on the four
crops of a face do 22% of stage 1's multiply-adds (``benchmarks/stage2.py`` times them); narrower
ones lost F-measure (``docs/stage2.md``). Crops are easier than whole faces (section 4: "the
segmentation task in the second stage is easier"), hence no recurrence. The weights start from
He's initialisation (:meth:`ComponentNet.initialize`).

The two-stage parser
--------------------
:class:`TwoStageParser` runs an 11-class stage-1 model (RNN-G) on the whole face, reads the five key
points off its prediction (:mod:`.keypoints`), cuts the four crops (:mod:`.crops`), runs the
component networks, and composes the result:

1. every pixel starts with stage 1's best class among background, skin and hair (stage 1 gives
   the main regions and the part locations, not the parts' labels);
2. a crop *claims* the pixels of its footprint where its network's arg-max is a part (not
   "other"), with that class's probability as the claim's confidence; a claimed pixel takes the
   claimed HELEN class (left or right by the crop's side);
3. overlapping crops (an eye crop and the nose crop, say): the most confident claim wins; an exact
   tie goes to the crop pasted first, in the order left eye, right eye, nose, mouth.

Checkpoints
-----------
All four networks go into one ``.npz`` file in the format of :mod:`.checkpoint` (atomic write, JSON
header), architecture ``"two-stage"``, their parameters prefixed with the network's name
(``stage1.conv1.weight``, ``eyes.conv1.weight``, ``nose.deconv9.bias``, ``mouth.conv5.weight``:
PyTorch's ``state_dict`` names for a module holding the four as submodules); the header's
``config`` rebuilds each network and holds the crop geometry and the mean face shape. A single
component network saves and loads like any model. :func:`load_stage2_model` reads all of these
(and stage-1 checkpoints, through :func:`.checkpoint.load_model`).
"""

import os

import numpy

from .. import backend
from ..data.classes import HELEN_CLASSES
from ..data.pipeline import check_image, normalize, resize_image, resize_labels
from ..layers import Conv2d, ConvTranspose2d, MaxPool2d, ReLU
from ..layers.base import check_positive_int, random_generator
from . import checkpoint
from .base import Model, infer_chain
from .crops import (CROPS, CropGeometry, crop_bilinear, crop_nearest, crop_to_helen, footprints, frame_images,
                    resize_matrices)
from .keypoints import FaceShape, keypoints_from_labels

#: The stage-1 classes kept in the final labels; the parts come from stage 2.
MAIN_CLASSES = tuple(HELEN_CLASSES.index(name) for name in ("background", "skin", "hair"))
_MAIN = numpy.array(MAIN_CLASSES)
_IS_MAIN = numpy.isin(numpy.arange(len(HELEN_CLASSES)), MAIN_CLASSES)
_SKIN = HELEN_CLASSES.index("skin")
#: The order the networks take in a two-stage checkpoint, and their prefixes.
NETWORKS = ("stage1", "eyes", "nose", "mouth")


class ComponentNet(Model):
    """A stage-2 network (see the module docstring); subclasses fix the classes and the crop size.

    width : channels of conv1 (the others are 1x or 2x this); rng : seed or Generator; dtype :
    float32 or float64. ``forward(crops)`` -> ``{"logits": (N, K, h, w)}``.
    """

    #: class names, "other" first
    component_classes = ()
    #: the crop size (h, w) the network is trained on
    input_size = (64, 64)
    #: the layers in the order they run: relu1 and relu3 after the pooling that follows them, which
    #: gives the same outputs and gradients (max pooling commutes with the ReLU) on a quarter of the
    #: pixels, as in RNN-G
    order = ("conv1", "pool2", "relu1", "conv3", "pool4", "relu3", "conv5", "relu5", "conv6", "relu6",
             "deconv7", "relu7", "conv8", "relu8", "deconv9")

    def __init__(self, width=8, rng=None, dtype=numpy.float32):
        super().__init__(len(self.component_classes), dtype)
        self.width = check_positive_int(width, type(self).__name__, "width")
        self.classes = list(self.component_classes)
        rng = random_generator(rng, type(self).__name__)
        c, k, dt = self.width, self.n_classes, self.dtype
        self.layers = {
            "conv1": Conv2d(3, c, 3, padding=1, rng=rng, dtype=dt),
            "relu1": ReLU(),
            "pool2": MaxPool2d(2),
            "conv3": Conv2d(c, 2 * c, 3, padding=1, rng=rng, dtype=dt),
            "relu3": ReLU(),
            "pool4": MaxPool2d(2),
            "conv5": Conv2d(2 * c, 2 * c, 3, padding=1, rng=rng, dtype=dt),
            "relu5": ReLU(),
            "conv6": Conv2d(2 * c, 2 * c, 3, padding=1, rng=rng, dtype=dt),
            "relu6": ReLU(),
            "deconv7": ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, rng=rng, dtype=dt),
            "relu7": ReLU(),
            "conv8": Conv2d(c, c, 1, rng=rng, dtype=dt),
            "relu8": ReLU(),
            "deconv9": ConvTranspose2d(c, k, 4, stride=2, padding=1, rng=rng, dtype=dt),
        }
        self.initialize(rng)

    def initialize(self, rng):
        """He initialisation, zero biases.

        The layers' own default (PyTorch's, uniform with variance 1/(3 fan-in)) shrinks the signal
        about sixfold per ReLU layer; through eight layers that stalls training (measured: the brow
        class never leaves zero F-measure). Normal weights of variance 2/fan-in keep the signal's
        scale through a ReLU; the last layer, with no ReLU after it, gets 1/fan-in. A transposed
        convolution with stride 2 and a 4x4 kernel feeds each output pixel from 2x2 taps of each
        input channel, so its fan-in is 4 * in_channels.
        """
        last = list(self.layers)[-1]
        for name, layer in self.layers.items():
            if "weight" not in layer.params:
                continue
            weight = layer.params["weight"]
            if isinstance(layer, ConvTranspose2d):
                fan_in = weight.shape[0] * (layer.kernel_size // layer.stride) ** 2
            else:
                fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
            gain = 1.0 if name == last else 2.0
            weight[...] = backend.get_array_module(weight).asarray(
                rng.normal(0.0, numpy.sqrt(gain / fan_in), size=weight.shape))
            layer.params["bias"][...] = 0.0

    def config(self):
        return {"width": self.width}

    def forward(self, images):
        """crops (N, 3, h, w), h and w multiples of 4 -> {"logits": (N, K, h, w)}."""
        a = self.check_images(images)
        self.forward_cached = False  # until this pass has filled every cache (it may fail midway)
        for name in self.order:
            a = self.layers[name].forward(a)
        self.forward_cached = True
        return {"logits": a}

    def infer(self, images):
        """``forward(images)["logits"]`` for inference only (no ``backward`` may follow), cheaper:
        crops (N, 3, h, w) -> logits (N, K, h, w), the same numbers, by :func:`~.base.infer_chain`
        (the two-stage parser runs its networks this way).
        """
        self.forward_cached = False
        logits = infer_chain(self.layers, self.order, self.check_images(images))
        self.clear_caches()
        return logits

    def backward(self, grads, input_gradient=True):
        """grads {"logits": (N, K, h, w)} -> dcrops (N, 3, h, w) (None if not ``input_gradient``)."""
        self.check_forward_cached()
        dlogits = self.upstream(grads, "logits", self.layers["deconv9"].output_shape_seen)
        if dlogits is None:
            raise ValueError(f"{type(self).__name__}.backward: needs the gradient of 'logits'")
        for name in reversed(self.order[1:]):
            dlogits = self.layers[name].backward(dlogits)
        first = self.layers["conv1"]
        first.needs_input_grad = input_gradient
        try:
            return first.backward(dlogits)
        finally:
            first.needs_input_grad = True

    @classmethod
    def load(cls, path, dtype=numpy.float32):
        return load_stage2_model(path, dtype=dtype, expect=cls.architecture)


class EyeBrowNet(ComponentNet):
    """Eye and eyebrow of one side, 64 x 64 crops; the right side's crop arrives mirrored."""

    architecture = "eye-brow-net"
    component_classes = ("other", "brow", "eye")
    input_size = (64, 64)


class NoseNet(ComponentNet):
    """The nose, 64 x 64 crops."""

    architecture = "nose-net"
    component_classes = ("other", "nose")
    input_size = (64, 64)


class MouthNet(ComponentNet):
    """Upper lip, inner mouth and lower lip, 32 x 64 (h x w) crops."""

    architecture = "mouth-net"
    component_classes = ("other", "upper lip", "inner mouth", "lower lip")
    input_size = (32, 64)


#: architecture name -> component network class
COMPONENT_NETWORKS = {cls.architecture: cls for cls in (EyeBrowNet, NoseNet, MouthNet)}
#: the network each crop goes through, by its name in a TwoStageParser
CROP_NETWORK = {crop: spec.network for crop, spec in CROPS.items()}


class TwoStageParser:
    """Stage 1 for the main regions and the key points, stage 2 for the parts (module docstring).

    stage1 : an 11-class stage-1 model (``RNNG(n_classes=11)``); eyes, nose, mouth : an
    :class:`EyeBrowNet`, :class:`NoseNet` and :class:`MouthNet` (new ones, seeded by ``rng``, if
    None); geometry : a :class:`CropGeometry`; shape : a :class:`FaceShape`; stage1_size : the
    (h, w) stage 1 works at (its training size).
    """

    architecture = "two-stage"

    def __init__(self, stage1, eyes=None, nose=None, mouth=None, geometry=None, shape=None,
                 stage1_size=(128, 128), rng=None, dtype=numpy.float32):
        if getattr(stage1, "n_classes", None) != len(HELEN_CLASSES):
            raise ValueError(f"TwoStageParser: stage 1 must be an 11-class (HELEN) model, got "
                             f"{type(stage1).__name__} with {getattr(stage1, 'n_classes', None)} classes")
        rng = random_generator(rng, type(self).__name__)
        self.networks = {
            "stage1": stage1,
            "eyes": eyes if eyes is not None else EyeBrowNet(rng=rng, dtype=dtype),
            "nose": nose if nose is not None else NoseNet(rng=rng, dtype=dtype),
            "mouth": mouth if mouth is not None else MouthNet(rng=rng, dtype=dtype),
        }
        for name, expected in (("eyes", EyeBrowNet), ("nose", NoseNet), ("mouth", MouthNet)):
            if not isinstance(self.networks[name], expected):
                raise TypeError(f"TwoStageParser: {name} must be a {expected.__name__}, "
                                f"got {type(self.networks[name]).__name__}")
        self.geometry = geometry or CropGeometry()
        self.shape = shape or FaceShape()
        if (not isinstance(stage1_size, (tuple, list)) or len(stage1_size) != 2
                or any(isinstance(s, bool) or not isinstance(s, (int, numpy.integer)) or s < 4 or s % 4
                       for s in stage1_size)):
            # stage 1 halves the image twice: checked here, not at the first predict
            raise ValueError(f"TwoStageParser: stage1_size must be (height, width), positive multiples of 4, "
                             f"got {stage1_size!r}")
        self.stage1_size = tuple(int(s) for s in stage1_size)
        self.classes = list(HELEN_CLASSES)
        self.n_classes = len(HELEN_CLASSES)

    @property
    def stage1(self):
        return self.networks["stage1"]

    # -- parameters -------------------------------------------------------------------------
    def params(self):
        """Every network's parameters, prefixed with its name: ``stage1.conv1.weight``, ..."""
        return {f"{prefix}.{name}": value for prefix, network in self.networks.items()
                for name, value in network.params().items()}

    def parameter_count(self):
        return {prefix: network.parameter_count() for prefix, network in self.networks.items()}

    def load_params(self, arrays, source="parameters"):
        """Copy prefixed arrays into the four networks, every array of every network checked first
        (all or nothing)."""
        unknown = sorted({name.split(".", 1)[0] for name in arrays} - set(self.networks))
        if unknown:
            raise ValueError(f"{source}: parameters of unknown networks {unknown}; a two-stage parser "
                             f"holds {list(self.networks)}")
        split = {prefix: {name[len(prefix) + 1:]: value for name, value in arrays.items()
                          if name.startswith(prefix + ".")} for prefix in self.networks}
        own = self.params()
        missing, unexpected = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
        if missing:
            raise ValueError(f"{source}: missing parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            raise ValueError(f"{source}: unexpected parameters {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
                             "the four networks have no such arrays")
        checked = {prefix: network.checked_params(split[prefix], source=f"{source} ({prefix})")
                    for prefix, network in self.networks.items()}
        for prefix, network in self.networks.items():
            network.load_params(checked[prefix], source=f"{source} ({prefix})")

    def config(self):
        """What rebuilds the parser (stored in the checkpoint header)."""
        return {
            "networks": {prefix: {"architecture": network.architecture, "config": network.config()}
                         for prefix, network in self.networks.items()},
            "geometry": self.geometry.to_dict(),
            "shape": self.shape.to_dict(),
            "stage1_size": list(self.stage1_size),
        }

    # -- inference ----------------------------------------------------------------------------
    def stage_one(self, images):
        """Stage 1 on float images (N, 3, h1, w1) at its size: ``(scores, labels)``, the logits
        (N, 11, h1, w1) and their arg-max (N, h1, w1) int64."""
        # infer, not forward: a batch-normalised stage 1 then uses its running statistics, so that
        # an image's labels do not depend on the others in its batch
        scores = backend.to_numpy(self.stage1.infer(self.stage1.on_device(images)))
        return scores, scores.argmax(axis=1)

    def main_regions(self, scores, labels):
        """Stage 1's best of background, skin and hair: int64 (N, h1, w1) from its logits (N, 11, h1, w1)
        and their arg-max ``labels``. Where the arg-max is one of the three it is also the best of
        them, so only the pixels stage 1 gives a part are looked at again: one gather of their
        three main scores, (3, P), from the flat logits."""
        main = labels.copy()
        n, classes, height, width = scores.shape
        parts = numpy.flatnonzero(~_IS_MAIN[labels])                   # flat in (N, h1, w1)
        if len(parts):
            class_zero = parts // (height * width) * (classes * height * width) + parts % (height * width)
            main_scores = numpy.take(scores, class_zero + (_MAIN * (height * width))[:, None], mode="wrap")
            main.reshape(-1)[parts] = _MAIN[main_scores.argmax(axis=0)]
        return main

    def run_crops(self, images, keypoints):
        """The component networks on the four crops of every face.

        images float (N, 3, H, W); keypoints (N, 5, 2) in the images' pixels. Returns
        ``{crop: (matrices (N, 2, 3), logits (N, K, h, w))}``, the logits in the crop network's
        classes (``K`` of them, "other" first).
        """
        matrices = self.geometry.matrices(keypoints)
        n = len(images)
        framed = frame_images(images)  # once for all crop sizes
        results = {}
        for size in dict.fromkeys(spec.size for spec in CROPS.values()):
            # All crops of one size in one pass over the images: (crops * N, 3, h, w), crop by crop.
            names = [crop for crop, spec in CROPS.items() if spec.size == size]
            cut = crop_bilinear(framed, numpy.stack([matrices[crop] for crop in names]), size)
            cut = cut.reshape((-1,) + cut.shape[2:])
            for network_name in dict.fromkeys(CROP_NETWORK[crop] for crop in names):
                # A network's crops are adjacent in CROPS, so its batch is a slice (both eyes at once).
                mine = [k for k, crop in enumerate(names) if CROP_NETWORK[crop] == network_name]
                batch = cut[mine[0] * n:(mine[-1] + 1) * n]
                network = self.networks[network_name]
                logits = backend.to_numpy(network.infer(network.on_device(batch)))
                for k, index in enumerate(mine):
                    results[names[index]] = (matrices[names[index]], logits[k * n:(k + 1) * n])
        return results

    def compose(self, main, crop_results):
        """Paste the crops' parts over the main regions (the rule of the module docstring).

        main int64 (N, H, W); crop_results from :meth:`run_crops`. Returns int64 (N, H, W).
        Only the crop pixels that image pixels read are scored (a few hundred of each crop's
        thousands: the crops are finer than the image).
        """
        labels = main.copy()
        best = numpy.zeros(main.shape, dtype=numpy.float32)  # confidence of the winning claim; 0: none
        flat_labels, flat_best = labels.reshape(-1), best.reshape(-1)
        for crop in CROPS:  # paste order = tie order
            matrices, logits = crop_results[crop]
            pixels, scores = footprints(matrices, logits.shape[2:], main.shape[1:]).read_inside(logits)  # (P,), (K, P)
            claimed = scores.argmax(axis=0)
            # The claim's confidence is the softmax probability of its class: 1 / sum_k exp(z_k - z_max).
            strength = 1.0 / numpy.exp(scores - scores.max(axis=0)).sum(axis=0)
            wins = claimed > 0
            wins[wins] = strength[wins] > flat_best[pixels[wins]]
            flat_labels[pixels[wins]] = crop_to_helen(crop)[claimed[wins]]
            flat_best[pixels[wins]] = strength[wins]
        return labels

    def explain(self, images):
        """Everything the parser computes for float images (N, 3, H, W) (normalised, any size).

        The parser works at the size it was trained at (``stage1_size``): other images are resized
        to it (bilinear) and the labels brought back (nearest). Returns a dict: ``stage1`` (N, H, W)
        stage 1's own 11-class labels, ``keypoints`` (N, 5, 2) in the images' pixels, ``found``
        (N, 5) bool (False: filled in from the mean shape), ``crops`` (see :meth:`run_crops`, at
        ``stage1_size``) and ``labels`` (N, H, W) int64, the two-stage result (stage 1's main
        regions alone in an image where stage 1 finds no skin: there is no face to put parts on).
        """
        images = self._check_images(images)
        n, _, height, width = images.shape
        resized = (height, width) != self.stage1_size
        if resized:
            images = crop_bilinear(images, resize_matrices(n, (height, width), self.stage1_size), self.stage1_size,
                                   fill=None)
        scores, stage1_labels = self.stage_one(images)
        keypoints, found = keypoints_from_labels(stage1_labels, self.shape)
        crops = self.run_crops(images, keypoints)
        main = self.main_regions(scores, stage1_labels)
        labels = self.compose(main, crops)
        # Where stage 1 saw no face at all, the key points are the mean shape's last-resort guess
        # in the middle of the image, and parts pasted there would be invented: stage 1 stands.
        faceless = ~(main == _SKIN).any(axis=(1, 2))
        labels[faceless] = main[faceless]
        if resized:
            back = resize_matrices(n, self.stage1_size, (height, width))
            labels = crop_nearest(labels, back, (height, width))
            stage1_labels = crop_nearest(stage1_labels, back, (height, width))
            scale = numpy.array([width / self.stage1_size[1], height / self.stage1_size[0]])
            keypoints = (keypoints + 0.5) * scale - 0.5
        return {"stage1": stage1_labels, "keypoints": keypoints, "found": found, "crops": crops, "labels": labels}

    def predict(self, images):
        """Float images (N, 3, H, W) in minirnng's normalised range, any size -> int64 (N, H, W)
        labels in :data:`HELEN_CLASSES`."""
        return self.explain(images)["labels"]

    def parse(self, image):
        """One uint8 (H, W, 3) RGB image (or (H, W) grey, or RGBA) of any size -> uint8 (H, W)
        labels in :data:`HELEN_CLASSES`.

        The image is resized to the parser's size (antialiased, as for training), parsed, and the
        labels resized back (nearest).
        """
        image = check_image(image, "TwoStageParser.parse")  # the single-face parser's rules: grey, RGBA too
        labels = self.predict(normalize(resize_image(image, self.stage1_size)[None]))[0].astype(numpy.uint8)
        return resize_labels(labels, image.shape[:2])

    def __call__(self, images):
        return self.predict(images)

    def _check_images(self, images):
        if not isinstance(images, numpy.ndarray):
            images = backend.to_numpy(images)
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype.kind != "f":
            raise ValueError(f"TwoStageParser: images must be float (N, 3, H, W) (normalised, see "
                             f"minirnng.data.pipeline.normalize), got {images.dtype} {images.shape}")
        if min(images.shape[2:]) < 8:
            raise ValueError(f"TwoStageParser: images of {images.shape[2]}x{images.shape[3]} are too small to parse")
        return images

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path, **metadata):
        """All four networks in one checkpoint at ``path`` (.npz, written atomically), stage 1's
        input size as the checkpoint's; checked as :func:`.checkpoint.save_model` checks a model."""
        return checkpoint.save_model(self, path, input_size=self.stage1_size, **metadata)

    @classmethod
    def load(cls, path, dtype=numpy.float32):
        return load_stage2_model(path, dtype=dtype, expect=cls.architecture)

    def __repr__(self):
        counts = ", ".join(f"{name} {count}" for name, count in self.parameter_count().items())
        return f"TwoStageParser({type(self.stage1).__name__} stage 1, parameters: {counts})"


# ---------------------------------------------------------------------------------------------
# Loading


def load_stage2_model(path, dtype=numpy.float32, expect=None):
    """The model in the checkpoint at ``path``: a :class:`TwoStageParser`, a component network, or
    (through :func:`.checkpoint.load_model`) any stage-1 model.

    expect : optional architecture name the caller needs; another one is a :class:`CheckpointError`.
    The header is in the result's ``checkpoint_header``.
    """
    from . import ARCHITECTURES  # here, not at the top: the package imports this module

    header, params, _ = checkpoint.read_checkpoint(path)
    where = f"checkpoint {os.fspath(path)!r}"
    architecture = header.get("architecture")
    if expect is not None and architecture != expect:
        raise checkpoint.CheckpointError(f"{where} holds a {architecture!r} model, not {expect!r}")
    if architecture in ARCHITECTURES:
        return checkpoint.load_model(path, dtype=dtype)
    try:
        if architecture in COMPONENT_NETWORKS:
            model = checkpoint.build_from_config(COMPONENT_NETWORKS[architecture], header.get("config", {}), dtype,
                                                 where, header.get("minirnng_version"))
        elif architecture == TwoStageParser.architecture:
            model = _build_two_stage(header.get("config") or {}, dtype, where)
        else:
            known = sorted(ARCHITECTURES) + sorted(COMPONENT_NETWORKS) + [TwoStageParser.architecture]
            raise checkpoint.CheckpointError(f"{where}: unknown architecture {architecture!r}; known: {', '.join(known)}")
        model.load_params(params, source=where)
    except (TypeError, ValueError) as error:
        if isinstance(error, checkpoint.CheckpointError) or str(error).startswith(where):
            raise checkpoint.CheckpointError(str(error)) from None  # it names the file already
        raise checkpoint.CheckpointError(f"{where}: {error}") from None
    model.checkpoint_header = header
    return model


def _build_two_stage(config, dtype, where):
    from . import ARCHITECTURES  # here, not at the top: the package imports this module

    networks = config.get("networks")
    if not isinstance(networks, dict) or sorted(networks) != sorted(NETWORKS):
        raise checkpoint.CheckpointError(f"{where}: a two-stage header must describe the networks {list(NETWORKS)}, "
                                         f"got {sorted(networks) if isinstance(networks, dict) else networks!r}")
    built = {}
    for prefix, description in networks.items():
        if not isinstance(description, dict):
            raise checkpoint.CheckpointError(f"{where}: network {prefix!r} is described by a JSON "
                                             f"{type(description).__name__}, not an object")
        architecture = description.get("architecture")
        registry = ARCHITECTURES if prefix == "stage1" else COMPONENT_NETWORKS
        if not isinstance(architecture, str) or architecture not in registry:
            raise checkpoint.CheckpointError(f"{where}: network {prefix!r} has unknown architecture {architecture!r}")
        built[prefix] = checkpoint.build_from_config(registry[architecture], description.get("config", {}), dtype,
                                                     f"{where}, network {prefix!r}")
    built["stage1"].classes = list(HELEN_CLASSES)
    return TwoStageParser(built["stage1"], built["eyes"], built["nose"], built["mouth"],
                          geometry=CropGeometry.from_dict(config.get("geometry") or {}),
                          shape=FaceShape.from_dict(config.get("shape") or {}),
                          stage1_size=config.get("stage1_size", (128, 128)))


__all__ = ["ComponentNet", "EyeBrowNet", "NoseNet", "MouthNet", "COMPONENT_NETWORKS", "TwoStageParser",
           "MAIN_CLASSES", "load_stage2_model"]
