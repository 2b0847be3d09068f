"""From dataset samples to network inputs, shared by training, evaluation and parsing.

- :func:`resize` brings an image (bilinear) and its labels (nearest) to the model's input size,
  128x128 by default (the paper's setting for LFW-PL and HELEN).
- :class:`Letterbox` is the paper's Multi-Face preprocessing: scale the long side to 512, keep
  the aspect ratio, zero-pad to 512x512; it also maps predictions and points back.
- :func:`normalize` / :func:`denormalize` convert uint8 images to the float32 ``NCHW`` the networks
  take (values in ``INPUT_RANGE``) and back; :func:`make_batch` also turns labels into int64.
- :func:`preload` resizes a whole dataset once into arrays (:class:`PreloadedDataset`), so that
  training does not decode JPEG files every epoch; :func:`batches` cuts it into shuffled,
  optionally augmented batches.
- :class:`Augmentation` draws the paper's random affine warps and mirrorings; :func:`warp` applies
  them to images (bilinear) and labels (nearest) with the same matrix, and relabels left and
  right parts of mirrored faces.

Coordinates: pixel ``(row, column)`` has its centre at ``(x, y) = (column, row)``; an affine
matrix maps input ``(x, y, 1)`` to output ``(x, y, 1)``. Sizes are ``(height, width)``.
"""

import dataclasses

import numpy
from PIL import Image

from .classes import BACKGROUND, KEYPOINT_MIRROR_ORDER, mirror_permutation
from .datasets import Dataset

#: Normalised pixel values: uint8 0 becomes ``INPUT_RANGE[0]`` and 255 becomes ``INPUT_RANGE[1]``.
INPUT_RANGE = (-0.5, 0.5)
#: The network input size ``(height, width)`` of the paper's single-face experiments.
DEFAULT_INPUT_SIZE = (128, 128)
#: The side of the square canvas of the paper's Multi-Face experiments.
MULTI_FACE_CANVAS = 512


# ---------------------------------------------------------------------------------------------
# Checks with messages that name the problem


def _check_image(image, owner):
    image = numpy.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != numpy.uint8:
        raise ValueError(f"{owner}: image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    return image


def check_image(image, owner="FaceParser"):
    """A picture to parse as uint8 (H, W, 3) RGB, more lenient than the pipeline's own check: greyscale
    (H, W) repeated into three channels, an alpha channel dropped, anything else (another dtype or
    shape, no pixels) a clear error. What the parsers take from their users.

    A PIL picture of 8 bits a channel is converted to RGB first: a palette picture's array holds
    palette indices, and a CMYK one's four channels would pass for RGBA. Pictures of wider pixels
    (modes I, I;16, F) stay arrays of their own dtype, which the rule above refuses:
    :func:`minirnng.parser.read_image` knows their white."""
    if _is_pil_image(image) and image.mode not in ("L", "RGB", "RGBA") and not image.mode.startswith(("I", "F")):
        image = image.convert("RGB")
    image = numpy.asarray(image)
    if image.dtype != numpy.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"{owner}: image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{owner}: image is empty, {image.shape[0]}x{image.shape[1]} pixels (height x width)")
    if image.ndim == 2:
        image = numpy.repeat(image[:, :, None], 3, axis=2)  # greyscale: the same value in R, G and B
    return numpy.ascontiguousarray(image[:, :, :3])


def _is_pil_image(image):
    """Whether ``image`` is a PIL picture, without importing PIL where nobody passed one."""
    module = type(image).__module__ or ""
    return module.startswith("PIL.") and hasattr(image, "mode") and hasattr(image, "convert")


def _check_labels(labels, owner, shape=None):
    labels = numpy.asarray(labels)
    if labels.ndim != 2 or not numpy.issubdtype(labels.dtype, numpy.integer):
        raise ValueError(f"{owner}: labels must be an integer (H, W) array, got {labels.dtype} {labels.shape}")
    if shape is not None and labels.shape != tuple(shape):
        raise ValueError(f"{owner}: labels are {labels.shape[0]}x{labels.shape[1]} but the image is "
                         f"{shape[0]}x{shape[1]} (height x width)")
    # kept as uint8 from here on: 300 would silently become 44, and -1 become 255
    if labels.dtype != numpy.uint8 and labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{owner}: labels range over {labels.min()} .. {labels.max()}; expected class "
                         "indices in 0 .. 255")
    return labels


def _check_size(size, owner):
    if isinstance(size, (int, numpy.integer)):
        size = (size, size)
    if (not isinstance(size, (tuple, list, numpy.ndarray)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, numpy.integer)) or s < 1 for s in size)):
        raise ValueError(f"{owner}: size must be a positive int or a (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


def _labels_as_picture(labels, owner):
    """A Pillow 'L' picture of integer labels in 0..255 (as :func:`_check_labels` leaves them)."""
    return Image.fromarray(_check_labels(labels, owner).astype(numpy.uint8, copy=False))  # mode "L"


# ---------------------------------------------------------------------------------------------
# Resizing


def resize_image(image, size=DEFAULT_INPUT_SIZE):
    """uint8 ``(H, W, 3)`` -> uint8 ``(height, width, 3)``, bilinear (antialiased when shrinking)."""
    image = _check_image(image, "resize_image")
    height, width = _check_size(size, "resize_image")
    if image.shape[:2] == (height, width):
        return image.copy()
    return numpy.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_labels(labels, size=DEFAULT_INPUT_SIZE):
    """integer ``(H, W)`` (values 0..255) -> same dtype ``(height, width)``, nearest neighbour."""
    labels = _check_labels(labels, "resize_labels")
    height, width = _check_size(size, "resize_labels")
    if labels.shape == (height, width):
        return labels.copy()
    resized = _labels_as_picture(labels, "resize_labels").resize((width, height), Image.NEAREST)
    return numpy.asarray(resized).astype(labels.dtype, copy=False)


def resize(image, labels, size=DEFAULT_INPUT_SIZE):
    """Resize a sample to ``size``: the image bilinear, the labels nearest (the same pixel grid)."""
    image = _check_image(image, "resize")
    labels = _check_labels(labels, "resize", shape=image.shape[:2])
    return resize_image(image, size), resize_labels(labels, size)


# ---------------------------------------------------------------------------------------------
# Multi-face letterbox


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """Where an ``original`` (height, width) image sits on a square zero-padded canvas.

    The image is scaled so that its long side fills the canvas (aspect ratio kept, the short side
    rounded to whole pixels) and centred; the rest is zero (black pixels, background labels).
    Build one with :meth:`fit`; :meth:`pad_image`/:meth:`pad_labels` go to the canvas,
    :meth:`restore_labels`/:meth:`restore_scores` come back to the original size, and
    :meth:`to_canvas`/:meth:`from_canvas` map points both ways.
    """

    original: tuple   # (height, width) of the image
    scaled: tuple     # (height, width) of the image on the canvas
    offset: tuple     # (top, left) of the image on the canvas
    canvas: int = MULTI_FACE_CANVAS

    @classmethod
    def fit(cls, height, width, canvas=MULTI_FACE_CANVAS):
        """The letterbox of a ``height x width`` image on a ``canvas x canvas`` square."""
        height, width = _check_size((height, width), "Letterbox.fit")
        canvas = _check_size(canvas, "Letterbox.fit")[0]
        scale = canvas / max(height, width)
        scaled = (min(canvas, max(1, round(height * scale))), min(canvas, max(1, round(width * scale))))
        offset = ((canvas - scaled[0]) // 2, (canvas - scaled[1]) // 2)
        return cls(original=(height, width), scaled=scaled, offset=offset, canvas=canvas)

    @property
    def window(self):
        """``(rows, columns)`` slices of the canvas that hold the image."""
        (top, left), (height, width) = self.offset, self.scaled
        return slice(top, top + height), slice(left, left + width)

    def pad_image(self, image):
        """uint8 ``original + (3,)`` -> uint8 ``(canvas, canvas, 3)``, zero outside the image."""
        image = _check_image(image, "Letterbox.pad_image")
        self._check_original(image.shape[:2], "pad_image")
        padded = numpy.zeros((self.canvas, self.canvas, 3), dtype=numpy.uint8)
        padded[self.window] = resize_image(image, self.scaled)
        return padded

    def pad_labels(self, labels):
        """integer ``original`` -> same dtype ``(canvas, canvas)``, background outside the image."""
        labels = _check_labels(labels, "Letterbox.pad_labels")
        self._check_original(labels.shape, "pad_labels")
        padded = numpy.full((self.canvas, self.canvas), BACKGROUND, dtype=labels.dtype)
        padded[self.window] = resize_labels(labels, self.scaled)
        return padded

    def restore_labels(self, labels):
        """integer ``(canvas, canvas)`` (a prediction) -> same dtype ``original``, nearest neighbour."""
        labels = _check_labels(labels, "Letterbox.restore_labels", shape=(self.canvas, self.canvas))
        return resize_labels(labels[self.window], self.original)

    def restore_scores(self, scores):
        """float ``(C, canvas, canvas)`` (class scores) -> float32 ``(C,) + original``, bilinear."""
        scores = numpy.asarray(scores)
        if scores.ndim != 3 or scores.shape[1:] != (self.canvas, self.canvas):
            raise ValueError(f"Letterbox.restore_scores: scores must be (C, {self.canvas}, {self.canvas}), "
                             f"got {scores.shape}")
        height, width = self.original
        window = scores[(slice(None),) + self.window].astype(numpy.float32)
        return numpy.stack([numpy.asarray(Image.fromarray(channel).resize((width, height), Image.BILINEAR))
                            for channel in window])

    def to_canvas(self, points):
        """float ``(..., 2)`` ``(x, y)`` points of the original image -> float64 canvas points."""
        points = numpy.asarray(points, dtype=numpy.float64)
        scale, shift = self._scale_and_shift()
        return (points + 0.5) * scale - 0.5 + shift

    def from_canvas(self, points):
        """float ``(..., 2)`` ``(x, y)`` canvas points -> float64 points of the original image."""
        points = numpy.asarray(points, dtype=numpy.float64)
        scale, shift = self._scale_and_shift()
        return (points - shift + 0.5) / scale - 0.5

    def _scale_and_shift(self):
        scale = numpy.array([self.scaled[1] / self.original[1], self.scaled[0] / self.original[0]])
        return scale, numpy.array([self.offset[1], self.offset[0]], dtype=numpy.float64)

    def _check_original(self, shape, method):
        if tuple(shape) != tuple(self.original):
            raise ValueError(f"Letterbox.{method}: got a {shape[0]}x{shape[1]} array, but this letterbox "
                             f"was fitted to {self.original[0]}x{self.original[1]} (height x width)")


def letterbox(image, labels, canvas=MULTI_FACE_CANVAS):
    """Letterbox a sample: ``(image (canvas, canvas, 3), labels (canvas, canvas), Letterbox)``."""
    image = _check_image(image, "letterbox")
    labels = _check_labels(labels, "letterbox", shape=image.shape[:2])
    box = Letterbox.fit(*image.shape[:2], canvas=canvas)
    return box.pad_image(image), box.pad_labels(labels), box


# ---------------------------------------------------------------------------------------------
# Normalisation and batches


def normalize(images):
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` in ``INPUT_RANGE`` (one image
    ``(H, W, 3)`` -> ``(3, H, W)``)."""
    images = numpy.asarray(images)
    if images.dtype != numpy.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError("normalize: images must be uint8 (N, H, W, 3) or (H, W, 3), "
                         f"got {images.dtype} {images.shape}")
    low, high = INPUT_RANGE
    channels_first = numpy.moveaxis(images, -1, -3)
    return (channels_first.astype(numpy.float32) * numpy.float32((high - low) / 255.0) + numpy.float32(low))


def denormalize(inputs):
    """float ``(N, 3, H, W)`` in ``INPUT_RANGE`` -> uint8 ``(N, H, W, 3)`` for display (one image
    ``(3, H, W)`` -> ``(H, W, 3)``); values outside the range are clipped."""
    inputs = numpy.asarray(inputs)
    if not numpy.issubdtype(inputs.dtype, numpy.floating) or inputs.ndim not in (3, 4) or inputs.shape[-3] != 3:
        raise ValueError("denormalize: inputs must be float (N, 3, H, W) or (3, H, W), "
                         f"got {inputs.dtype} {inputs.shape}")
    low, high = INPUT_RANGE
    pixels = (numpy.moveaxis(inputs, -3, -1) - low) * (255.0 / (high - low))
    return numpy.rint(numpy.clip(pixels, 0.0, 255.0)).astype(numpy.uint8)


def make_batch(images, labels):
    """Network inputs from uint8 ``(N, H, W, 3)`` images and integer ``(N, H, W)`` labels:
    ``(float32 (N, 3, H, W), int64 (N, H, W))``."""
    images, labels = numpy.asarray(images), numpy.asarray(labels)
    if labels.ndim != 3 or not numpy.issubdtype(labels.dtype, numpy.integer):
        raise ValueError(f"make_batch: labels must be an integer (N, H, W) array, got {labels.dtype} {labels.shape}")
    if images.shape[:3] != labels.shape:
        raise ValueError(f"make_batch: images {images.shape} and labels {labels.shape} differ in N, H or W")
    return normalize(images), labels.astype(numpy.int64)


def stack_samples(samples):
    """Stack ``(image, labels)`` pairs of one size: ``(uint8 (N, H, W, 3), uint8 (N, H, W))``."""
    samples = list(samples)
    if not samples:
        raise ValueError("stack_samples: no samples")
    shape = numpy.shape(samples[0][0])
    for number, (image, labels) in enumerate(samples):
        _check_image(image, f"stack_samples (sample {number})")
        _check_labels(labels, f"stack_samples (sample {number})", shape=numpy.shape(image)[:2])
        if numpy.shape(image) != shape:
            raise ValueError(f"stack_samples: sample {number} is {numpy.shape(image)}, sample 0 is {shape}; "
                             "resize or letterbox them first")
    return (numpy.stack([image for image, _ in samples]),
            numpy.stack([labels for _, labels in samples]).astype(numpy.uint8))


# ---------------------------------------------------------------------------------------------
# A whole dataset in memory


class PreloadedDataset(Dataset):
    """A dataset held in memory at one size: ``images`` uint8 ``(N, H, W, 3)`` and ``labels``
    uint8 ``(N, H, W)`` (both read-only), with the ``classes`` and ``names`` of its source.
    Build it with :func:`preload`."""

    def __init__(self, images, labels, classes, names):
        images, labels = numpy.asarray(images), numpy.asarray(labels)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != numpy.uint8:
            raise ValueError(f"PreloadedDataset: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if labels.shape != images.shape[:3] or labels.dtype != numpy.uint8:
            raise ValueError(f"PreloadedDataset: labels must be uint8 {images.shape[:3]}, "
                             f"got {labels.dtype} {labels.shape}")
        if len(names) != len(images):
            raise ValueError(f"PreloadedDataset: {len(names)} names for {len(images)} images")
        classes = tuple(classes)
        if labels.size and labels.max() >= len(classes):
            # found now, not as an IndexError deep in the mirroring that reorders left and right classes
            first = int(numpy.argmax(labels.reshape(len(labels), -1).max(axis=1) >= len(classes)))
            raise ValueError(f"PreloadedDataset: the labels of {names[first]!r} hold class {int(labels[first].max())}, "
                             f"but there are {len(classes)} classes ({', '.join(classes)})")
        images.flags.writeable = False
        labels.flags.writeable = False
        self.images, self.labels = images, labels
        self.classes, self._names = classes, tuple(names)

    def _load(self, index):
        return self.images[index], self.labels[index]


def preload(dataset, size=DEFAULT_INPUT_SIZE, fit="resize"):
    """Read every sample of ``dataset`` once and bring it to one size, in memory.

    ``fit="resize"``: each sample is resized to ``size`` ``(height, width)`` (bilinear image,
    nearest labels), the paper's single-face setting. ``fit="letterbox"``: each sample is
    letterboxed onto a ``size x size`` canvas (``size`` an int, 512 in the paper's Multi-Face
    setting). Returns a :class:`PreloadedDataset`.
    """
    if fit not in ("resize", "letterbox"):
        raise ValueError(f"preload: fit must be 'resize' or 'letterbox', got {fit!r}")
    if fit == "letterbox":
        side = _check_size(size, "preload")
        if side[0] != side[1]:
            raise ValueError(f"preload: a letterbox canvas is square; got size {size!r}")
        height = width = side[0]
    else:
        height, width = _check_size(size, "preload")
    count = len(dataset)
    images = numpy.empty((count, height, width, 3), dtype=numpy.uint8)
    labels = numpy.empty((count, height, width), dtype=numpy.uint8)
    for index in range(count):
        image, label_map = dataset[index]
        if fit == "resize":
            images[index], labels[index] = resize(image, label_map, (height, width))
        else:
            images[index], labels[index], _ = letterbox(image, label_map, canvas=height)
    return PreloadedDataset(images, labels, dataset.classes, dataset.names)


def batches(dataset, batch_size, rng=None, shuffle=True, augmentation=None, drop_last=False):
    """Yield ``(float32 (B, 3, H, W), int64 (B, H, W))`` batches of a :class:`PreloadedDataset`.

    ``rng`` (a seed or a ``numpy.random.Generator``) orders the samples when ``shuffle`` and
    draws the warps of ``augmentation`` (an :class:`Augmentation`, or ``None`` for none); the
    same seed gives the same batches. The last batch may be smaller unless ``drop_last``.
    """
    if not isinstance(dataset, PreloadedDataset):
        raise TypeError(f"batches: expected a PreloadedDataset (see preload), got {type(dataset).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, numpy.integer)) or batch_size < 1:
        raise ValueError(f"batches: batch_size must be a positive integer, got {batch_size!r}")
    rng = numpy.random.default_rng(rng)
    order = rng.permutation(len(dataset)) if shuffle else numpy.arange(len(dataset))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        chosen = order[start:start + batch_size]
        images, labels = dataset.images[chosen], dataset.labels[chosen]
        if augmentation is not None:
            images, labels = augmentation(images, labels, dataset.classes, rng)
        yield make_batch(images, labels)


# ---------------------------------------------------------------------------------------------
# Augmentation


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The paper's training augmentation: a random affine warp and a random mirroring.

    Each image is rotated by up to ``max_rotation`` degrees about its centre, scaled by a factor
    drawn from ``scale_range``, shifted by up to ``max_shift`` of its width and height, and
    mirrored with probability ``mirror_probability``. Calling it on uint8 ``(N, H, W, 3)`` images
    and integer ``(N, H, W)`` labels returns warped copies of both (see :func:`warp`).
    """

    max_rotation: float = 15.0
    scale_range: tuple = (0.9, 1.1)
    max_shift: float = 0.08
    mirror_probability: float = 0.5

    def sample(self, n, height, width, rng):
        """float64 ``(n, 3, 3)`` random affine matrices for ``height x width`` images."""
        rng = numpy.random.default_rng(rng)
        angles = numpy.deg2rad(rng.uniform(-self.max_rotation, self.max_rotation, n))
        scales = rng.uniform(self.scale_range[0], self.scale_range[1], n)
        shifts = rng.uniform(-self.max_shift, self.max_shift, (n, 2)) * (width, height)
        mirrored = rng.random(n) < self.mirror_probability
        centre = numpy.array([(width - 1) / 2.0, (height - 1) / 2.0])
        matrices = numpy.empty((n, 3, 3))
        for k in range(n):
            matrices[k] = affine_matrix(angles[k], scales[k], shifts[k], centre, mirrored[k], width)
        return matrices

    def __call__(self, images, labels, classes, rng):
        """Warp a batch: ``(uint8 (N, H, W, 3), labels (N, H, W))`` -> the same shapes and dtypes."""
        images = numpy.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"Augmentation: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        matrices = self.sample(len(images), images.shape[1], images.shape[2], rng)
        return warp(images, labels, matrices, classes)


def affine_matrix(angle, scale, shift, centre, mirrored=False, width=None):
    """float64 ``(3, 3)``: mirror (``x -> width - 1 - x``) if asked, then rotate by ``angle`` radians
    and scale about ``centre`` ``(x, y)``, then shift by ``shift`` ``(dx, dy)`` pixels."""
    cos, sin = numpy.cos(angle) * scale, numpy.sin(angle) * scale
    about_centre = numpy.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    about_centre[:2, 2] = centre + numpy.asarray(shift) - about_centre[:2, :2] @ centre
    if mirrored:
        if width is None:
            raise ValueError("affine_matrix: mirroring needs the image width")
        flip = numpy.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        return about_centre @ flip
    return about_centre


def moves_whole_pixels(matrix, width):
    """Whether the affine ``matrix`` (3, 3) is exactly the identity or the left-right mirror of an
    image ``width`` pixels wide (``x -> width - 1 - x``): a copy or a flip then gives :func:`warp`'s
    result, pixel for pixel, without resampling."""
    mirror = numpy.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return bool(numpy.array_equal(matrix, numpy.eye(3)) or numpy.array_equal(matrix, mirror))


def is_mirroring(matrices):
    """bool ``(N,)``: which affine matrices ``(N, 3, 3)`` reverse orientation (mirror the image)."""
    matrices = numpy.asarray(matrices)
    return numpy.linalg.det(matrices[..., :2, :2]) < 0


def warp(images, labels, matrices, classes):
    """Apply one affine matrix per sample to images (bilinear) and labels (nearest).

    ``images`` uint8 ``(N, H, W, 3)``; ``labels`` integer ``(N, H, W)`` (values 0..255) in
    ``classes``; ``matrices`` float ``(N, 3, 3)`` mapping input to output pixel coordinates.
    Pixels that come from outside the input are black and background. Labels of mirrored samples
    (negative determinant) go through ``mirror_permutation(classes)``, so that the left eye of the
    new picture is labelled "left eye"; a value beyond the classes (an ignore label) stays as it is.
    Returns new arrays of the input shapes and dtypes.
    """
    images, labels = numpy.asarray(images), numpy.asarray(labels)
    matrices = numpy.asarray(matrices, dtype=numpy.float64)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != numpy.uint8:
        raise ValueError(f"warp: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:3] or not numpy.issubdtype(labels.dtype, numpy.integer):
        raise ValueError(f"warp: labels must be integer {images.shape[:3]}, got {labels.dtype} {labels.shape}")
    if matrices.shape != (len(images), 3, 3):
        raise ValueError(f"warp: matrices must be ({len(images)}, 3, 3), got {matrices.shape}")
    height, width = images.shape[1:3]
    # every value 0..255 a label map can hold (its pictures are 8-bit): a value beyond the classes,
    # such as an ignore label, stays as it is, mirrored or not
    permutation = numpy.arange(256, dtype=numpy.uint8)
    permutation[:len(classes)] = mirror_permutation(classes)
    mirrored = is_mirroring(matrices)
    warped_images, warped_labels = numpy.empty_like(images), numpy.empty_like(labels)
    for k in range(len(images)):
        if moves_whole_pixels(matrices[k], width):
            # the identity or the mirror (``--augment mirror`` draws only these): the values that
            # Pillow's resampling gives them, by a copy, in a tenth of its time
            columns = slice(None, None, -1) if mirrored[k] else slice(None)
            warped_images[k] = images[k, :, columns]
            label_map = _check_labels(labels[k], "warp")[:, columns]
            warped_labels[k] = permutation[label_map] if mirrored[k] else label_map
            continue
        coefficients = _pillow_inverse(matrices[k])
        # Channel by channel in floating point, then rounded: on uint8 pictures Pillow's bilinear
        # rounds down, which would leave every warped image half a grey level darker on average.
        for channel in range(3):
            plane = Image.fromarray(images[k, :, :, channel].astype(numpy.float32), mode="F")
            warped = numpy.asarray(plane.transform((width, height), Image.AFFINE, coefficients,
                                                   resample=Image.BILINEAR))
            warped_images[k, :, :, channel] = numpy.clip(numpy.rint(warped), 0, 255)
        picture = _labels_as_picture(labels[k], "warp")
        warped = numpy.asarray(picture.transform((width, height), Image.AFFINE, coefficients,
                                                 resample=Image.NEAREST, fillcolor=BACKGROUND))
        warped_labels[k] = permutation[warped] if mirrored[k] else warped
    return warped_images, warped_labels


def _pillow_inverse(matrix):
    """Pillow's AFFINE coefficients for ``matrix``: Pillow maps *output* to *input* positions and
    puts pixel centres at half-integers, minirnng at integers."""
    try:
        inverse = numpy.linalg.inv(matrix)
    except numpy.linalg.LinAlgError:
        raise ValueError(f"warp: the affine matrix {numpy.asarray(matrix).tolist()} is singular (it squashes "
                         "the image onto a line or a point); give an invertible one") from None
    linear, translation = inverse[:2, :2], inverse[:2, 2]
    translation = translation + 0.5 - linear @ numpy.array([0.5, 0.5])
    return (linear[0, 0], linear[0, 1], translation[0], linear[1, 0], linear[1, 1], translation[1])


def warp_keypoints(points, matrices):
    """Move key points with their images: float ``(N, 5, 2)`` ``(x, y)`` -> float64 ``(N, 5, 2)``.

    For mirrored samples the points are also reordered (``KEYPOINT_MIRROR_ORDER``), so that the
    first is still the left eye of the new picture.
    """
    points, matrices = numpy.asarray(points, dtype=numpy.float64), numpy.asarray(matrices, dtype=numpy.float64)
    if points.ndim != 3 or points.shape[1:] != (len(KEYPOINT_MIRROR_ORDER), 2) or matrices.shape != (len(points), 3, 3):
        raise ValueError(f"warp_keypoints: expected points (N, 5, 2) and matrices (N, 3, 3), "
                         f"got {points.shape} and {matrices.shape}")
    moved = points @ numpy.swapaxes(matrices[:, :2, :2], 1, 2) + matrices[:, None, :2, 2]
    mirrored = is_mirroring(matrices)
    moved[mirrored] = moved[mirrored][:, list(KEYPOINT_MIRROR_ORDER)]
    return moved
