"""Pictures of images and labels: colour palettes, colour-coded label maps, overlays, sample grids.

Figures are drawn with Matplotlib's object-oriented API on the Agg canvas (no ``pyplot``, no
window, no global state), so this module works on machines without a display and never changes
the Matplotlib backend of the program that imports it.

Images are uint8 ``(H, W, 3)`` RGB; label maps are integer ``(H, W)`` class indices into a class
list of :mod:`minirnng.data.classes`.
"""

import os

import numpy
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from minirnng.atomic import replacing
from minirnng.data.classes import HELEN_CLASSES, LFW_CLASSES
from minirnng.metrics import checked_confusion

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

#: The colour map of gate values in [0, 1] (dark = propagation stopped), as in :mod:`minirnng.propagation`.
GATE_COLOURMAP = "viridis"
GATE_LABEL = "gate (0 = stopped)"


#: Colours for classes of other lists (a checkpoint saved without class names has "class 0", ...),
#: uint8 ``(10, 3)``: Matplotlib's "tab10" qualitative colours, taken in turn.
OTHER_CLASS_COLOURS = numpy.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
], dtype=numpy.uint8)


def palette(classes):
    """The uint8 ``(K, 3)`` palette of a class list: ``HELEN_CLASSES`` and ``LFW_CLASSES`` have
    their own; in any other list a HELEN class name keeps its HELEN colour, the background is
    black, and every other class takes the next of :data:`OTHER_CLASS_COLOURS` (repeating after
    ten)."""
    classes = tuple(classes)
    if classes == HELEN_CLASSES:
        return HELEN_PALETTE
    if classes == LFW_CLASSES:
        return LFW_PALETTE
    colours, others = [], 0
    for name in classes:
        if name in HELEN_CLASSES:
            colours.append(HELEN_PALETTE[HELEN_CLASSES.index(name)])
        else:
            colours.append(OTHER_CLASS_COLOURS[others % len(OTHER_CLASS_COLOURS)])
            others += 1
    return numpy.array(colours, dtype=numpy.uint8).reshape(len(classes), 3)


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
    in [0, 1]. Background pixels (the class named "background", else class 0) are left as they are.
    """
    image = numpy.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != numpy.uint8:
        raise ValueError(f"overlay: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if numpy.shape(labels) != image.shape[:2]:
        raise ValueError(f"overlay: labels {numpy.shape(labels)} do not match the image {image.shape[:2]}")
    if isinstance(opacity, bool) or not isinstance(opacity, (int, float, numpy.integer, numpy.floating)) \
            or not 0.0 <= opacity <= 1.0:
        raise ValueError(f"overlay: opacity must be a number in [0, 1], got {opacity!r}")
    colours = colorize(labels, classes).astype(numpy.float32)
    blended = image.astype(numpy.float32)
    classes = list(classes)
    foreground = numpy.asarray(labels) != (classes.index("background") if "background" in classes else 0)
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
    for name, value, least in (("n", n, 1), ("start", start, 0), ("per_row", per_row, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < least:
            raise ValueError(f"save_sample_grid: {name} must be a whole number of at least {least}, got {value!r}")
    check_figure_path(path, "save_sample_grid: path")  # a .txt fails now, not after every sample is drawn
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
        figure.suptitle(title, fontsize=9, parse_math=False)  # titles hold file names: $5_and_$6.png is text
    _save_atomically(figure, path)


def _short(name, limit=24):
    # the end of a name is what tells samples apart ("..._s0_00017"): cut the front
    return name if len(name) <= limit else "\N{HORIZONTAL ELLIPSIS}" + name[-(limit - 1):]


#: the PNG text key under which a figure records what wrote it (:func:`output_role`)
ROLE_KEY = "minirnng"


#: where each format keeps a figure's role: a PNG text chunk, the PDF's Subject, the SVG's description
_ROLE_FIELDS = {".png": ROLE_KEY, ".pdf": "Subject", ".svg": "Description"}


def _save_atomically(figure, path, role=None):
    extension = os.path.splitext(path)[1] or ".png"
    field = _ROLE_FIELDS.get(extension.lower())
    metadata = {field: f"{ROLE_KEY} {role}" if field != ROLE_KEY else role} if role and field else None
    with replacing(path, suffix=extension) as temporary:
        figure.savefig(temporary, dpi=110, format=extension.lstrip("."), metadata=metadata)


def check_figure_path(path, what="figure"):
    """A ValueError now for a file name whose extension Matplotlib cannot write (``.txt``), rather
    than after the work that makes the figure."""
    extension = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise ValueError(f"{what} {os.fspath(path)!r}: Matplotlib cannot write .{extension} files; use one of "
                         f"{', '.join('.' + name for name in sorted(formats))}")


def save_figure(figure, path, role=None):
    """Write a Matplotlib figure to ``path`` (format from the extension) through a temporary file.
    ``role`` (PNG, PDF and SVG): what wrote it, kept in the file for :func:`output_role`, so that a
    command can tell its own earlier output, which it may replace, from a file of the user's."""
    _save_atomically(figure, os.fspath(path), role)
    return os.fspath(path)


def output_role(path):
    """The ``role`` that a PNG, PDF or SVG minirnng wrote records (:func:`save_figure`, ``parse``'s
    label maps), or None for any other file (another format, unreadable, or written by something
    else)."""
    import re

    from PIL import Image

    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in (".pdf", ".svg"):
        # only the file's own metadata counts, not a figure of minirnng's pasted into the user's
        try:
            with open(path, "rb") as stream:
                if extension == ".pdf":  # the last trailer names the Info dictionary, near the end
                    stream.seek(max(0, os.fstat(stream.fileno()).st_size - (1 << 16)))
                text = stream.read(1 << 22).decode("latin-1")
        except OSError:
            return None
        if extension == ".pdf":
            trailers = re.findall(r"/Info (\d+) 0 R", text)
            info = trailers and re.search(rf"(?<!\d){trailers[-1]} 0 obj\s*<<(.*?)>>\s*endobj", text, re.DOTALL)
            found = info and re.search(r"/Subject \(" + ROLE_KEY + r" ([^)]*)\)", info.group(1))
        else:  # the root element's metadata, before any nested <svg
            root = re.match(r"(.*?<svg\b.*?)(<svg\b|$)", text, re.DOTALL)
            found = root and re.search(r"<dc:description>" + ROLE_KEY + r" ([^<]*)</dc:description>", root.group(1))
        return found.group(1) if found else None
    try:
        with Image.open(path) as image:
            return image.text.get(ROLE_KEY) if image.format == "PNG" else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _legend(figure, classes):
    handles = [Patch(facecolor=colour / 255.0, edgecolor="grey", label=name)
               for name, colour in zip(classes, palette(classes))]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)


def pipeline_figure(images, truth, coarse, gates, result, classes, title=None):
    """One row per image: input, ground truth, coarse map, gate map, result (the paper's Figure 1).

    images : uint8 (N, H, W, 3); truth, result : integer (N, H, W) (truth may be None);
    coarse : integer (N, h, w), the coarse head's arg-max; gates : float in [0, 1], either the
    gate map G itself, (N, C, h, w), which is drawn as its mean over the C channels (the column's
    title says so), or a map already reduced to (N, h, w). Gates are drawn with
    :data:`GATE_COLOURMAP` on a fixed 0..1 scale, with a colour bar (dark = propagation stopped).
    Returns a Figure.
    """
    images = numpy.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != numpy.uint8 or not len(images):
        raise ValueError(f"pipeline_figure: images must be uint8 (N, H, W, 3) with N >= 1, got "
                         f"{images.dtype} {images.shape}")
    gate_title = "gate map"
    if gates is not None:
        gates = numpy.asarray(gates)
        # a NaN would draw as a bright colour, which reads as an open gate; a gate is a sigmoid in [0, 1]
        if gates.size and not numpy.isfinite(gates).all():
            raise ValueError("pipeline_figure: the gate map holds NaN or infinite values")
        if gates.size and (gates.min() < 0 or gates.max() > 1):
            raise ValueError(f"pipeline_figure: the gate map must hold values in [0, 1], got "
                             f"{gates.min():.3g} .. {gates.max():.3g}")
        if gates.ndim == 4 and len(gates) != len(images):  # named before the channels are averaged away
            raise ValueError(f"pipeline_figure: the gate map must be ({len(images)}, C, h, w) or ({len(images)}, h, w), "
                             f"one map per image, got shape {gates.shape}")
        if gates.ndim == 4:
            gate_title = f"gate map\n(mean of {gates.shape[1]} channels)"
            gates = gates.mean(axis=1)
    columns = [("input", None), ("ground truth", truth), ("coarse map", coarse), ("gate map", gates),
               ("result", result)]
    columns = [(name, value) for name, value in columns if name == "input" or value is not None]
    for name, value in columns[1:]:
        if numpy.ndim(value) != 3 or len(value) != len(images):
            n = len(images)
            shape = f"({n}, C, h, w) or ({n}, h, w)" if name == "gate map" else f"({n}, H, W)"
            raise ValueError(f"pipeline_figure: the {name} must be {shape}, one map per image, "
                             f"got shape {numpy.shape(value)}")
    rows = len(images)
    figure = Figure(figsize=(2.0 * len(columns), 2.0 * rows + (1.5 if gates is not None else 0.7)),
                    layout="constrained")
    axes = figure.subplots(rows, len(columns), squeeze=False)
    for row in range(rows):
        for column, (name, value) in enumerate(columns):
            axis = axes[row, column]
            axis.set_axis_off()
            if name == "input":
                axis.imshow(images[row])
            elif name == "gate map":
                shown = axis.imshow(value[row], cmap=GATE_COLOURMAP, vmin=0, vmax=1)
            else:
                axis.imshow(colorize(value[row], classes), interpolation="nearest")
            if row == 0:
                axis.set_title(gate_title if name == "gate map" else name, fontsize=8)
    if gates is not None:
        # the bar takes its height from every row (a bar on the gate column alone would shift that column's
        # images against the others) and is drawn under the gate column, about one column wide
        gate_column, width = [name for name, _ in columns].index("gate map"), 0.9 / len(columns)
        centre = (gate_column + 0.5) / len(columns)
        bar = figure.colorbar(shown, ax=axes, location="bottom", fraction=0.06 / rows, shrink=width, aspect=15,
                              anchor=((centre - width / 2) / (1 - width), 1.0))
        bar.set_label(GATE_LABEL, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    _legend(figure, classes)
    if title:
        figure.suptitle(title, fontsize=9, parse_math=False)  # titles hold file names: $5_and_$6.png is text
    return figure


def parse_figure(image, labels, classes, title=None):
    """The image, its labels and their overlay side by side. Returns a Figure."""
    figure = Figure(figsize=(9, 3.4), layout="constrained")
    axes = figure.subplots(1, 3)
    for axis, picture, name in zip(axes, (image, colorize(labels, classes), overlay(image, labels, classes)),
                                   ("image", "labels", "overlay")):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(name, fontsize=8)
        axis.set_axis_off()
    _legend(figure, classes)
    if title:
        figure.suptitle(title, fontsize=9, parse_math=False)  # titles hold file names: $5_and_$6.png is text
    return figure


def training_curves_figure(history):
    """Training losses (log scale) and validation scores against the epoch, from a Trainer's history."""
    history = list(history)
    if not history or any(key not in history[0] for key in ("epoch", "val_accuracy")):
        raise ValueError("training_curves_figure: needs a stage-1 Trainer's history, one row per epoch with "
                         f"'epoch' and 'val_accuracy'; got {len(history)} rows"
                         + (f" with the keys {sorted(history[0])}" if history else ""))
    epochs = [row["epoch"] for row in history]
    # markers: a run of one epoch (or a value between missing ones) is a single point, which a bare line never draws
    points = dict(marker="o", markersize=3)
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    losses = (("train_loss", "total", "black"), ("train_logits", "logits CE", "tab:blue"),
              ("train_coarse", "coarse CE", "tab:orange"), ("train_edge", "edge BCE", "tab:green"),
              ("train_dice", "soft Dice", "tab:red"), ("train_affinity", "colour affinity", "tab:purple"))
    for key, label, colour in losses:
        values = [row.get(key) for row in history]
        # the Dice and affinity terms are logged only by runs that use them; a log scale cannot draw a 0
        if any(value is not None and value > 0 for value in values):
            left.plot(epochs, [value if value is not None else numpy.nan for value in values], label=label,
                      color=colour, **points)
    left.set_ylabel("training loss")
    left.set_yscale("log")
    right.plot(epochs, [100 * row["val_accuracy"] for row in history], label="pixel accuracy", color="black",
               **points)
    # each F line in its class's colour of the label maps; the background's black is the accuracy's, so it is
    # drawn grey and dashed instead
    names = [key[6:] for key in history[0] if key.startswith("val_F_")]
    for name, colour in zip(names, palette(names) / 255.0):
        style = dict(color="grey", linestyle="--") if name == "background" else dict(color=colour)
        if name != "background" and colour @ (0.2126, 0.7152, 0.0722) > 0.7:  # skin, nose: outline on white
            style.update(markeredgecolor="0.35", markeredgewidth=0.6)
        right.plot(epochs, [100 * (row[f"val_F_{name}"] if row[f"val_F_{name}"] is not None else numpy.nan)
                            for row in history], label=f"F {name}", **style, **points)
    right.set_ylabel("validation (%)")
    for axis in (left, right):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if max(epochs) == min(epochs):  # one epoch: Matplotlib would label the tiny span around it 0.945 .. 1.05
            axis.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
            axis.set_xticks([epochs[0]])
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return figure


def confusion_figure(confusion, classes, title=None):
    """A confusion matrix (rows: truth, columns: prediction) normalised per row, with the counts' shares;
    the row of a class with no true pixel (a small subset of HELEN, say) is blank, marked "–", not 0%."""
    confusion = checked_confusion(confusion, "confusion_figure")  # a NaN row would read as "no true pixel"
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion_figure: a matrix of {len(classes)} classes is {len(classes)}x{len(classes)}, "
                         f"got shape {confusion.shape}")
    totals = confusion.sum(axis=1, keepdims=True)
    shares = numpy.divide(confusion, totals, out=numpy.full(confusion.shape, numpy.nan), where=totals > 0)
    size = 1.0 + 0.55 * len(classes)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
    axis.set_yticks(range(len(classes)), classes, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (row, column), share in numpy.ndenumerate(shares):
        axis.text(column, row, "–" if numpy.isnan(share) else f"{100 * share:.0f}", ha="center", va="center",
                  fontsize=6, color="white" if share > 0.5 else "black")
    # the cells are percentages, and so is the bar
    figure.colorbar(image, ax=axis, label="share of the true class (%)", format=PercentFormatter(1.0))
    if title:
        axis.set_title(title, fontsize=9)
    return figure
