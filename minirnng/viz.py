"""Pictures of images and labels: colour palettes, colour-coded label maps, overlays, sample grids.

Figures are drawn with Matplotlib's object-oriented API on the Agg canvas (no ``pyplot``, no
window, no global state), so this module works on machines without a display and never changes
the Matplotlib backend of the program that imports it.

Images are uint8 ``(H, W, 3)`` RGB; label maps are integer ``(H, W)`` class indices into a class
list of :mod:`minirnng.data.classes`.
"""

import os
import tempfile

import numpy
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from minirnng.data.classes import HELEN_CLASSES, LFW_CLASSES

#: One RGB colour per class of ``HELEN_CLASSES``, uint8 ``(11, 3)``: left parts dark, right parts light.
HELEN_PALETTE = numpy.array([
    (0, 0, 0),         # background
    (255, 204, 153),   # skin
    (0, 140, 0),       # left brow
    (130, 255, 130),   # right brow
    (0, 70, 255),      # left eye
    (0, 210, 255),     # right eye
    (255, 255, 0),     # nose
    (255, 0, 110),     # upper lip
    (110, 0, 140),     # inner mouth
    (255, 120, 190),   # lower lip
    (140, 70, 20),     # hair
], dtype=numpy.uint8)

#: One RGB colour per class of ``LFW_CLASSES``, uint8 ``(3, 3)``: the HELEN colours of the same classes.
LFW_PALETTE = HELEN_PALETTE[[HELEN_CLASSES.index(name) for name in LFW_CLASSES]]

KEYPOINT_COLOUR = "red"


def palette(classes):
    """The uint8 ``(K, 3)`` palette of a class list (``HELEN_CLASSES`` or ``LFW_CLASSES``)."""
    classes = tuple(classes)
    if classes == HELEN_CLASSES:
        return HELEN_PALETTE
    if classes == LFW_CLASSES:
        return LFW_PALETTE
    raise ValueError(f"no palette for the classes {classes}; expected HELEN_CLASSES or LFW_CLASSES")


def colorize(labels, classes):
    """Colour-code a label map: integer ``(H, W)`` -> uint8 ``(H, W, 3)`` with the palette of ``classes``."""
    labels = numpy.asarray(labels)
    colours = palette(classes)
    if labels.ndim != 2 or not numpy.issubdtype(labels.dtype, numpy.integer):
        raise ValueError(f"colorize: labels must be an integer (H, W) array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(colours)):
        raise ValueError(f"colorize: labels range over {labels.min()} .. {labels.max()}, "
                         f"but there are only {len(colours)} classes ({', '.join(classes)})")
    return colours[labels]


def overlay(image, labels, classes, opacity=0.5):
    """The image with its colour-coded labels blended over it: uint8 ``(H, W, 3)``.

    ``image`` uint8 ``(H, W, 3)``; ``labels`` integer ``(H, W)``; ``opacity`` of the label colours
    in [0, 1]. Background pixels are left as they are.
    """
    image = numpy.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != numpy.uint8:
        raise ValueError(f"overlay: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if numpy.shape(labels) != image.shape[:2]:
        raise ValueError(f"overlay: labels {numpy.shape(labels)} do not match the image {image.shape[:2]}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"overlay: opacity must be in [0, 1], got {opacity}")
    colours = colorize(labels, classes).astype(numpy.float32)
    blended = image.astype(numpy.float32)
    foreground = numpy.asarray(labels) != 0
    blended[foreground] = (1.0 - opacity) * blended[foreground] + opacity * colours[foreground]
    return numpy.rint(blended).astype(numpy.uint8)


def save_sample_grid(dataset, path, n=8, start=0, per_row=4, title=None, overwrite=False):
    """Render samples of a dataset beside their colour-coded labels to an image file (PNG).

    ``dataset`` follows the minirnng dataset protocol (``ds[i] -> (image, labels)``, ``ds.classes``);
    samples ``start .. start + n - 1`` are shown, ``per_row`` samples to a row, each as the image
    and its labels side by side. When the dataset has ``keypoints(i)`` (SyntheticFaces), the key
    points are marked on the image. An existing file at ``path`` is replaced only with
    ``overwrite=True``; the file is written under a temporary name first, so an interrupted run
    never leaves a half-written picture.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"save_sample_grid: {path} exists; pass overwrite=True to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save_sample_grid: folder {folder} does not exist")
    n = min(n, len(dataset) - start)
    if n < 1:
        raise ValueError(f"save_sample_grid: no samples to show (start={start}, {len(dataset)} samples)")

    per_row = min(per_row, n)
    rows = -(-n // per_row)
    figure = Figure(figsize=(2.2 * 2 * per_row, 2.3 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, 2 * per_row, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for k in range(n):
        index = start + k
        image, labels = dataset[index]
        image_axis, label_axis = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        image_axis.imshow(image, interpolation="nearest")
        image_axis.set_title(_short(dataset.names[index]), fontsize=7)
        if hasattr(dataset, "keypoints"):
            points = numpy.asarray(dataset.keypoints(index)).reshape(-1, 2)
            image_axis.scatter(points[:, 0], points[:, 1], s=4, c=KEYPOINT_COLOUR, linewidths=0)
            image_axis.set_xlim(-0.5, image.shape[1] - 0.5)
            image_axis.set_ylim(image.shape[0] - 0.5, -0.5)
        label_axis.imshow(colorize(labels, dataset.classes), interpolation="nearest")
        label_axis.set_title("labels", fontsize=7)
    legend = [Patch(facecolor=colour / 255.0, edgecolor="grey", label=name)
              for name, colour in zip(dataset.classes, palette(dataset.classes))]
    figure.legend(handles=legend, loc="outside lower center", ncol=min(len(legend), 6), fontsize=7, frameon=False)
    if title:
        figure.suptitle(title, fontsize=9)
    _save_atomically(figure, path)


def _short(name, limit=24):
    return name if len(name) <= limit else name[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def _save_atomically(figure, path):
    folder, base = os.path.split(os.path.abspath(path))
    extension = os.path.splitext(base)[1] or ".png"
    handle, temporary = tempfile.mkstemp(prefix=f".{base}.", suffix=extension, dir=folder)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=110, format=extension.lstrip("."))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
