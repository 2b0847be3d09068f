"""Parse face images of any size: a trained stage-1 model behind a three-line interface.

    from minirnng.parser import FaceParser
    parser = FaceParser.pretrained()          # RNN-G trained on LFW-PL, shipped in the package
    labels = parser.parse(image)              # uint8 (H, W, 3) RGB -> uint8 (H, W) class indices

The image is resized to the model's input (128 x 128), parsed, and the class scores are resized
back to the image's own size (bilinear) before the arg-max, so the labels have the image's
resolution and smooth boundaries. ``parser.classes`` names the labels. ``FaceParser.pretrained(
mirror=True)`` averages the scores of the image and of its mirror image (:mod:`minirnng.mirroring`):
a little more accurate, twice the time. ``crf=True`` refines the scores with dense-CRF mean-field
inference (:class:`minirnng.models.DenseCRF`, its defaults) on the model's input grid before they
are resized: smoother labels that follow the image's edges, at about 0.1 s a face on one CPU core
(docs/training.md: +0.6 points of pixel accuracy on the LFW-PL validation split).
"""

import os

import numpy
from PIL import Image

from . import backend
from .data.classes import mirror_permutation
from .data.datasets import read_rgb
from .data.pipeline import check_image, normalize, resize_image
from .mirroring import mirrored_logits, model_classes
from .models import DenseCRF, load_model
from .models.checkpoint import CheckpointError

WEIGHTS_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
#: The shipped RNN-G: 3 classes (background, skin, hair), trained on the LFW-PL train split.
PRETRAINED_WEIGHTS = os.path.join(WEIGHTS_FOLDER, "rnng_lfw.npz")


def read_image(path):
    """An image file as uint8 (H, W, 3) RGB, turned upright as its EXIF orientation says (as a
    viewer shows it), with a clear error for a missing, unreadable or oversized file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {os.fspath(path)!r} does not exist")
    return read_rgb(path, "image", exif_orientation=True)


def resize_scores(scores, height, width):
    """Class scores (K, h, w) float -> (K, height, width), bilinear per class."""
    return numpy.stack([numpy.asarray(Image.fromarray(channel.astype(numpy.float32)).resize(
        (width, height), Image.BILINEAR)) for channel in scores])


class FaceParser:
    """A stage-1 model with its input size; ``parse`` works on images of any size.

    model : a trained stage-1 model (``RNNG`` or a baseline) with ``classes`` set; one with batch
        normalisation is kept folded (``model.folded()``), the network it infers with.
    input_size : (height, width) the model was trained at (an int for a square), multiples of 4.
    mirror : test-time mirroring (:mod:`minirnng.mirroring`).
    crf : dense-CRF refinement of the scores: False (none), True (a :class:`DenseCRF` with its
        defaults) or a :class:`DenseCRF`. A CNN-CRF model always uses its own.
    """

    def __init__(self, model, input_size=(128, 128), mirror=False, crf=False):
        if getattr(model, "batch_norm", False):
            # a --batch-norm run's last.npz: its normalisations folded into the convolutions, the
            # same function as its infer, so that every pass (run's forward too) uses the running
            # statistics and no face's labels depend on the others parsed with it
            model = model.folded()
        self.model = model
        if isinstance(input_size, (int, numpy.integer)):
            input_size = (input_size, input_size)
        if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
                or any(isinstance(s, bool) or not isinstance(s, (int, numpy.integer)) or s < 4 or s % 4
                       for s in input_size)):
            # the network halves the image twice; the parser resizes every face to this size
            raise ValueError(f"FaceParser: input_size must be (height, width), positive multiples of 4, "
                             f"got {input_size!r}")
        self.input_size = tuple(int(s) for s in input_size)
        self.classes = tuple(model.classes) if model.classes else tuple(f"class {k}" for k in range(model.n_classes))
        if len(self.classes) != model.n_classes:
            raise ValueError(f"FaceParser: the model has {model.n_classes} outputs and {len(self.classes)} class "
                             f"names ({', '.join(map(str, self.classes))}): one name for each output")
        self.mirror = bool(mirror)
        if self.mirror:
            # which outputs mirroring swaps (left eye and right eye) comes from the class names:
            # a model without them, or with names a mirror image cannot pair, is refused now, not
            # at its first image
            try:
                names = model_classes(model)
            except ValueError:
                raise ValueError(f"FaceParser: mirror=True needs the model's class names, to know which "
                                 f"classes a mirror image swaps; this {type(model).__name__} has none and "
                                 f"{model.n_classes} outputs (set model.classes)") from None
            try:
                mirror_permutation(names)
            except ValueError as error:
                raise ValueError(f"FaceParser: mirror=True: {error}") from None
        if getattr(model, "crf", None) is not None:
            crf = model.crf  # CNN-CRF: its CRF is part of the model, as in its predict
        elif crf is True:
            crf = DenseCRF()
        if crf is not False and crf is not None and not isinstance(crf, DenseCRF):
            raise TypeError(f"FaceParser: crf must be True, False or a DenseCRF, got {type(crf).__name__}")
        self.crf = crf or None

    @classmethod
    def load(cls, path, mirror=False, crf=False):
        """A parser from a checkpoint written by ``minirnng train`` or ``model.save``; with
        ``mirror``, test-time mirroring (:mod:`minirnng.mirroring`: better, twice the time); with
        ``crf``, dense-CRF refinement of the scores."""
        model = load_model(path)
        try:
            return cls(model, model.checkpoint_header.get("input_size", (128, 128)), mirror=mirror, crf=crf)
        except ValueError as error:  # the header's input size, say: name the file it came from
            raise CheckpointError(f"checkpoint {os.fspath(path)!r}: {error}") from None

    @classmethod
    def pretrained(cls, mirror=False, crf=False):
        """The RNN-G that ships with minirnng (3 classes, LFW-PL); see docs/training.md."""
        if not os.path.exists(PRETRAINED_WEIGHTS):
            raise FileNotFoundError(f"the pretrained weights {PRETRAINED_WEIGHTS} are missing from this "
                                    "installation; reinstall minirnng")
        return cls.load(PRETRAINED_WEIGHTS, mirror=mirror, crf=crf)

    def __repr__(self):
        return (f"FaceParser({self.model!r}, input_size={self.input_size}, classes={self.classes}"
                f"{', mirror=True' if self.mirror else ''}{f', crf={self.crf!r}' if self.crf else ''})")

    def run(self, images):
        """The model's outputs (host arrays) for a list of uint8 images, each resized to the input size."""
        outputs = self.model.forward(self.model_input(images))
        return {name: backend.to_numpy(value) for name, value in outputs.items()}

    def model_input(self, images):
        """A list of uint8 images -> the model's input batch (N, 3, h, w), resized, normalised, on
        the model's device."""
        # one array of three or fewer dimensions is one picture, not a list: iterating over it would
        # parse each of its rows as a greyscale picture of its own
        one_picture = images.ndim <= 2 or (images.ndim == 3 and images.shape[2] in (3, 4)) \
            if isinstance(images, numpy.ndarray) else False
        if one_picture:
            raise ValueError(f"FaceParser.run: pass a list of images (or an (N, H, W, 3) or (N, H, W) array), got "
                             f"one array of shape {images.shape}; for one picture use [image]")
        images = list(images)
        if not images:
            raise ValueError("FaceParser.run: the list of images is empty")
        batch = numpy.stack([resize_image(check_image(image), self.input_size) for image in images])
        return self.model.on_device(normalize(batch))

    def scores(self, image):
        """Class probabilities (K, H, W) float32 at the image's own size."""
        image = check_image(image)
        batch = self.model_input([image])
        logits = mirrored_logits(self.model, batch) if self.mirror else self.model.infer(batch)
        if self.crf is not None:
            # the CRF's marginals on the input grid; bilinear resizing keeps each pixel's sum at 1
            # up to rounding, which the division restores
            probabilities = resize_scores(backend.to_numpy(self.crf.refine(logits, batch))[0], *image.shape[:2])
            return probabilities / probabilities.sum(axis=0, keepdims=True)
        logits = resize_scores(backend.to_numpy(logits)[0], *image.shape[:2])
        shifted = numpy.exp(logits - logits.max(axis=0, keepdims=True))
        return shifted / shifted.sum(axis=0, keepdims=True)

    def parse(self, image):
        """uint8 (H, W, 3) RGB -> uint8 (H, W) labels (indices into ``self.classes``): the whole
        image is one face."""
        return self.scores(image).argmax(axis=0).astype(numpy.uint8)

    def parse_faces(self, image, undetected="parse"):
        """Detect faces, parse each in LFW framing, paste the results back: ``(labels, boxes)``;
        :func:`parse_detected_faces` with this parser."""
        return parse_detected_faces(self, image, undetected)


def parse_detected_faces(parser, image, undetected="parse"):
    """Detect the faces of ``image`` (with the extra ``detect``), parse each in LFW framing with
    ``parser`` (a :class:`FaceParser` or a two-stage parser: anything with ``parse(image)`` and
    ``classes``), paste the results back: ``(labels, boxes)``.

    labels : uint8 (H, W); boxes : int (F, 4) face detections ``(x, y, width, height)``. Where
    crops overlap, a pixel takes the labels of the face most certain that it is not background:
    by the parser's class probabilities where it has them (``scores``), else the first face that
    does not call it background. Without OpenCV, or when no face is found, the whole image is
    parsed as one face with ``undetected="parse"`` (and ``boxes`` is empty), or left background
    with ``undetected="background"`` (a detector-based baseline, which sees only the faces its
    detector finds).
    """
    from .detect import parse_faces

    if undetected not in ("parse", "background"):
        raise ValueError(f"parse_detected_faces: undetected must be 'parse' or 'background', got {undetected!r}")
    classes = tuple(parser.classes)
    background = classes.index("background") if "background" in classes else 0

    def parse_face(crop):
        if hasattr(parser, "scores"):
            probabilities = parser.scores(crop)
            return probabilities.argmax(axis=0).astype(numpy.uint8), 1 - probabilities[background]
        labels = parser.parse(crop)
        return labels, (labels != background).astype(numpy.float32)

    def nothing_found(picture):
        return numpy.full(picture.shape[:2], background, dtype=numpy.uint8)
    return parse_faces(check_image(image, "parse_detected_faces"), parse_face,
                       parser.parse if undetected == "parse" else nothing_found, background)

