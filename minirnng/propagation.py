"""The gated recurrence at work: spreading a few seed labels over an image, stopped by its edges.

This is what the spatially variant RNN does inside RNN-G (paper section 3.2), stripped of
learning. With ``W = I`` and ``b = 0`` (the layers' initialisation), eq. 3 along one direction is

    h[j] = x[j] + g[j] * h[j-1]

so a score placed at a pixel is carried along the scan while the gate stays near 1, and is cut
where the gate drops to 0. Here the gate is computed from the image itself: near 1 inside flat
regions, near 0 on edges, the role the gate CNN branch learns to play. The scores ``x`` are
one-hot at a few seed pixels (one channel per label), zero elsewhere.

One pass of :class:`~minirnng.layers.recurrent.FourWayGatedRNN` spreads a seed along its row and
column only (each direction scans straight lines), so :func:`propagate_labels` feeds the merged
output back in for a few passes: the second pass spreads every point of that cross along the other
axis, and so on, until the seeds' labels fill their regions. A pixel takes the label with the
largest score.

    from minirnng.propagation import demonstrate_propagation
    figure = demonstrate_propagation(path="propagation.png")   # a synthetic image, or image=...
"""

import numpy
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from . import backend
from .layers.recurrent import FourWayGatedRNN
from .viz import GATE_COLOURMAP, GATE_LABEL, check_figure_path, save_figure

UNLABELLED = -1
LABEL_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
UNLABELLED_COLOUR = "#d9d9d9"


def synthetic_image(height=72, width=96, noise=0.01, rng=0):
    """A grey image of flat regions with sharp edges, and its region map.

    Returns ``(image, regions)``: ``image`` float ``(H, W)`` in [0, 1] with mild Gaussian noise,
    ``regions`` int ``(H, W)``: 0 background, 1 a disc, 2 a rectangle, 3 a slanted bar. Each region
    is connected (the background wraps around the others), and the regions are the labels a
    perfect propagation would reproduce.
    """
    rng = numpy.random.default_rng(rng)
    rows, columns = numpy.mgrid[0:height, 0:width] / numpy.array([height, width]).reshape(2, 1, 1)
    regions = numpy.zeros(rows.shape, dtype=numpy.int64)
    # the bar: coordinates across and along a line through (0.75, 0.5) that rises to the right
    across, along = (rows - 0.75) + 0.5 * (columns - 0.5), (columns - 0.5) - 0.5 * (rows - 0.75)
    regions[(numpy.abs(across) < 0.08) & (numpy.abs(along) < 0.3)] = 3
    regions[(rows >= 0.12) & (rows < 0.5) & (columns >= 0.55) & (columns < 0.9)] = 2
    regions[((rows - 0.35) * height) ** 2 + ((columns - 0.27) * width) ** 2 < (0.22 * height) ** 2] = 1
    brightness = numpy.array([0.15, 0.85, 0.55, 0.4])
    image = brightness[regions] + noise * rng.standard_normal(regions.shape)
    return numpy.clip(image, 0, 1), regions


def edge_gates(image, edge_scale=0.04, openness=0.99):
    """The gate map of an image: ``g = openness * exp(-(|grad I| / edge_scale)^2)``, float ``(H, W)``.

    ``image``: ``(H, W)`` grey levels in [0, 1], or an ``(H, W, 3)`` RGB image (uint8 or float),
    which is converted to grey. ``|grad I|`` uses central differences, so both pixels beside an
    edge get a small gate and the scan is cut from either side. ``edge_scale`` is the gradient
    that counts as an edge; ``openness`` < 1 makes scores fade slowly with distance, so that
    where two seeds share a region the nearer one wins.
    """
    grey = as_grey(image)
    if min(grey.shape) < 2:
        raise ValueError(f"edge_gates: the image must be at least 2 x 2 pixels (central differences), "
                         f"got {grey.shape[0]} x {grey.shape[1]}")
    d_rows, d_columns = numpy.gradient(grey)
    magnitude = numpy.hypot(d_rows, d_columns)
    return openness * numpy.exp(-(magnitude / edge_scale) ** 2)


def as_grey(image):
    """``(H, W)`` float grey levels in [0, 1] from a grey, RGB or RGBA image (uint8 or uint16, whose
    white is 255 or 65535, float in [0, 1], or bool; the alpha channel, which ``plt.imread`` gives a PNG,
    is ignored)."""
    image = numpy.asarray(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(f"as_grey: expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    if image.dtype in (numpy.uint8, numpy.uint16):
        scale = float(numpy.iinfo(image.dtype).max)
    elif numpy.issubdtype(image.dtype, numpy.floating) or image.dtype == bool:  # a mask: True is white
        scale = 1.0
    else:  # a signed or boolean picture has no agreed white: guessing one would make every gate 0
        raise ValueError(f"as_grey: expected a uint8, uint16, float or bool image, got {image.dtype}")
    image = image.astype(numpy.float64) / scale
    if scale == 1.0 and image.size and not (image.min() >= 0 and image.max() <= 1):  # NaN fails too
        # a float picture in 0 .. 255 would make every step an edge and every gate shut
        raise ValueError(f"as_grey: a float image must hold values in [0, 1], got {image.min():.4g} .. "
                         f"{image.max():.4g} (divide a 0-255 picture by 255, or give it as uint8)")
    if image.ndim == 3:
        image = image[:, :, :3] @ numpy.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    return image


def random_seeds(regions, per_region=2, margin=3, rng=0):
    """A sparse seed map: ``per_region`` pixels of each region, at least ``margin`` pixels inside it.

    Returns int ``(H, W)``: the region label at the seed pixels, ``UNLABELLED`` (-1) elsewhere.
    """
    rng = numpy.random.default_rng(rng)
    seeds = numpy.full(regions.shape, UNLABELLED, dtype=numpy.int64)
    for label in numpy.unique(regions):
        inside = regions == label
        for shift in range(1, margin + 1):  # erode: keep pixels whose 4-neighbours at distance <= margin agree
            for axis in (0, 1):
                for sign in (1, -1):
                    inside &= numpy.roll(regions, sign * shift, axis=axis) == label
        candidates = numpy.flatnonzero(inside) if inside.any() else numpy.flatnonzero(regions == label)
        for index in rng.choice(candidates, size=min(per_region, len(candidates)), replace=False):
            seeds.flat[index] = label
    return seeds


def propagate_labels(seeds, gate, passes=4, reach=1e-6):
    """Spread seed labels with the four-way gated recurrence; return ``(labels, scores)``.

    seeds : int ``(H, W)``, a label ``0 .. K-1`` at seed pixels and -1 elsewhere.
    gate : float ``(H, W)`` in [0, 1], used for every label channel.
    passes : how many times the merged output is fed back as the next input ``x``.

    ``scores`` is float ``(K, H, W)``, scaled so that its maximum is 1; ``labels`` int ``(H, W)``
    is its argmax over the labels, or -1 where every score is below ``reach`` (no seed got
    there: what leaks through a shut gate is smaller still, by about two orders of magnitude on the
    demonstration's image). Runs the real
    :class:`~minirnng.layers.recurrent.FourWayGatedRNN` (float64, ``W = I``, ``b = 0``).
    """
    seeds = numpy.asarray(seeds)
    if seeds.ndim != 2 or seeds.dtype.kind not in "iu":
        raise ValueError(f"propagate_labels: seeds must be an integer (H, W) map, got {seeds.dtype} {seeds.shape}")
    if numpy.shape(gate) != seeds.shape:
        raise ValueError(f"propagate_labels: the gate map has shape {numpy.shape(gate)}, the seed map "
                         f"{seeds.shape}; they must be the same")
    if seeds.size == 0:
        raise ValueError(f"propagate_labels: the seed map is empty (shape {seeds.shape})")
    if int(seeds.min()) < UNLABELLED:
        raise ValueError(f"propagate_labels: seeds are labels 0 .. K-1, or {UNLABELLED} for no seed; "
                         f"got {int(seeds.min())}")
    gate = numpy.asarray(gate)
    if gate.dtype.kind not in "biuf" or not numpy.all((gate >= 0) & (gate <= 1)):  # NaN fails too
        raise ValueError(f"propagate_labels: the gate must be real numbers in [0, 1], got {gate.dtype} "
                         "values outside it (or NaN)")
    n_labels = int(seeds.max()) + 1
    if n_labels < 1:
        raise ValueError("propagate_labels: the seed map has no seed (all -1)")
    if n_labels > seeds.size:  # one score map per label 0 .. max: a label of 10**9 would ask for terabytes
        raise ValueError(f"propagate_labels: the largest seed label is {n_labels - 1}, more than the map has "
                         f"pixels ({seeds.size}); number the labels 0 .. K-1")
    height, width = seeds.shape
    x = numpy.zeros((1, n_labels, height, width))
    rows, columns = numpy.nonzero(seeds >= 0)
    x[0, seeds[rows, columns], rows, columns] = 1.0
    g = numpy.broadcast_to(numpy.asarray(gate, dtype=numpy.float64), x.shape).copy()
    # the maps are NumPy arrays: the layer computes on the host, whatever the backend in force (a
    # GPU's), or on the emulator's kernels where that is the backend
    with backend.use(backend.matching(x)):
        layer = FourWayGatedRNN(n_labels, dtype=numpy.float64)
        scores = x
        for _ in range(passes):
            scores = layer.forward(scores, g)
            scores /= scores.max()  # one common scale for all labels: keeps the numbers readable
    scores = scores[0]
    labels = numpy.where(scores.max(axis=0) > reach, scores.argmax(axis=0), UNLABELLED)
    return labels, scores


def demonstrate_propagation(image=None, seeds=None, regions=None, passes=4, edge_scale=0.04,
                            openness=0.99, path=None):
    """Draw the propagation of sparse seed labels over an image: a Matplotlib ``Figure``.

    With no arguments, uses :func:`synthetic_image` and two :func:`random_seeds` per region.
    image : ``(H, W)`` grey or ``(H, W, 3)`` RGB. seeds : int ``(H, W)``, labels at seed pixels and
    -1 elsewhere. regions : optional int ``(H, W)`` true labels, to score the results.
    path : if given, the figure is also saved there (PNG, or any format Matplotlib knows).

    Panels: the image; the gate map; the seeds; the labels after ``passes`` passes of the gated
    four-way recurrence; and, for contrast, the same with a constant gate (``openness``
    everywhere), where nothing stops a label at an edge.
    """
    if image is None:
        image, regions = synthetic_image()
        if seeds is None:
            seeds = random_seeds(regions)
    if path is not None:
        check_figure_path(path, "demonstrate_propagation: path")  # a .txt fails now, not after the work
    if seeds is None:
        raise ValueError("demonstrate_propagation: give seeds with your image (an int (H, W) map, -1 = none)")
    seeds = numpy.asarray(seeds)
    if seeds.size and seeds.max() >= len(LABEL_COLOURS):
        raise ValueError(f"demonstrate_propagation: draws at most {len(LABEL_COLOURS)} labels (0 .. "
                         f"{len(LABEL_COLOURS) - 1}), one colour each; the seeds go up to {seeds.max()}")
    grey = as_grey(image)
    gate = edge_gates(grey, edge_scale=edge_scale, openness=openness)
    gated, _ = propagate_labels(seeds, gate, passes=passes)
    ungated, _ = propagate_labels(seeds, numpy.full_like(gate, openness), passes=passes)

    n_labels = int(numpy.max(seeds)) + 1
    colours = ListedColormap([UNLABELLED_COLOUR] + LABEL_COLOURS[:n_labels])

    def show_labels(axes, labels, title):
        axes.imshow(labels + 1, cmap=colours, vmin=0, vmax=n_labels, interpolation="nearest")
        if regions is not None:
            wrong = numpy.mean((labels != regions) & (labels != UNLABELLED))
            title += (f"\n{numpy.mean(labels == regions):.1%} right, {wrong:.1%} wrong, "
                      f"{numpy.mean(labels == UNLABELLED):.1%} unlabelled")
        axes.set_title(title, fontsize=9)

    figure = Figure(figsize=(15, 3.4), layout="constrained")
    panels = figure.subplots(1, 5)
    panels[0].imshow(grey, cmap="gray", vmin=0, vmax=1)
    panels[0].set_title("image", fontsize=9)
    shown = panels[1].imshow(gate, cmap=GATE_COLOURMAP, vmin=0, vmax=1)
    panels[1].set_title("gate g from the image's edges", fontsize=9)
    figure.colorbar(shown, ax=panels[1], fraction=0.046, label=GATE_LABEL)
    panels[2].imshow(grey, cmap="gray", vmin=0, vmax=1, alpha=0.35)
    seed_rows, seed_columns = numpy.nonzero(seeds >= 0)
    panels[2].scatter(seed_columns, seed_rows, c=[LABEL_COLOURS[k] for k in seeds[seed_rows, seed_columns]],
                      s=30, edgecolors="black", linewidths=0.6)
    panels[2].set_title(f"{len(seed_rows)} seed labels", fontsize=9)
    show_labels(panels[3], gated, f"gated recurrence, {passes} passes")
    show_labels(panels[4], ungated, f"constant gate {openness}, {passes} passes")
    for axes in panels:
        axes.set_xticks([])
        axes.set_yticks([])
    if path is not None:
        # like every minirnng figure: through a temporary file, into a folder created if missing
        save_figure(figure, path)
    return figure


if __name__ == "__main__":
    import sys
    demonstrate_propagation(path=sys.argv[1] if len(sys.argv) > 1 else "propagation.png")
