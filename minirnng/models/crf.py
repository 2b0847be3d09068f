"""Dense CRF mean-field inference (Krähenbühl and Koltun 2011), the post-processing of CNN-CRF.

A fully connected CRF over the pixels with the Potts compatibility and two Gaussian kernels,
a *spatial* one on positions and a *bilateral* one on positions and colours:

    k(i, j) = w_b exp(-|p_i - p_j|^2 / 2 s_xy^2 - |c_i - c_j|^2 / 2 s_rgb^2)
            + w_s exp(-|p_i - p_j|^2 / 2 s_sp^2)

Mean-field inference starts from the network's softmax ``Q = softmax(z)`` and repeats

    m_l(i) = sum_{j != i} k~(i, j) Q_l(j)          (message passing, k~ normalised)
    Q(i)   = softmax(z(i) + m(i))                  (Potts: agreeing with neighbours lowers the energy)

For the Potts model the compatibility transform ``sum_{l' != l} m_{l'} = sum_{l'} m_{l'} - m_l``
differs from ``-m_l`` by a constant over ``l``, which the softmax cancels; hence the ``+ m``.

Kernels are normalised symmetrically, ``D^-1/2 K D^-1/2`` (as common dense-CRF implementations do
by default), so a message is an average of neighbours' beliefs rather than a sum that grows with
the image size. The spatial kernel is SciPy's sampled Gaussian (normalised taps, radius
``round(4 s_sp)``), separable, and applied exactly by Gaussian filtering: the image is padded
with zeros, so that a pixel near the border hears only the pixels that exist, its degree ``D_i``
is their total weight, and the centre tap is removed from the filtered beliefs.

The bilateral kernel is computed exactly, as a dense matrix, on a grid subsampled so that it has at
most ``max_grid_points`` points: the image is box-averaged over ``stride x stride`` blocks (128 x 128
becomes 64 x 64 with stride 2; where a side is not a multiple of the stride, the blocks along the
bottom and right borders are cut short and average the pixels they have), the messages are exact
between the blocks, and each block's message is copied to its pixels. That is an approximation, in a form a student can read in ten
lines: a pixel hears its block's message whatever its own colour, and its block-mates are not
heard at all. A permutohedral lattice instead reads the messages back at each pixel's own colour,
so it keeps an edge that runs through a block; here a block that straddles a colour edge can take
one side's label (at 128 x 128, 25 of 16,384 labels differ from the exact full-resolution CRF's on
Matplotlib's grace_hopper.jpg, and 40 to 108, median 84.5 or about 0.5%, on ten LFW-PL validation
faces, all in such blocks). With ``max_grid_points`` of at least the number of pixels the stride is
1 and the bilateral term is exact too. Host (NumPy) arrays only.
"""

import math
import numbers

import numpy
from scipy import ndimage

from .. import backend
from ..subnormals import flush_subnormals


def softmax(z, axis=1):
    shifted = z - z.max(axis=axis, keepdims=True)
    e = numpy.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def grid_shape(height, width, stride):
    """(h, w) = (ceil(H / stride), ceil(W / stride)), the blocks of :func:`box_downsample`."""
    return -(-height // stride), -(-width // stride)


def box_downsample(array, stride):
    """Average ``stride x stride`` blocks of a (C, H, W) array -> (C, ceil(H/stride), ceil(W/stride)).
    A block cut short by the bottom or right border averages the pixels it has: the last rows and
    columns of an image whose sides are not multiples of the stride are heard like any other."""
    c, height, width = array.shape
    h, w = grid_shape(height, width, stride)
    if (height, width) == (h * stride, w * stride):
        return array.reshape(c, h, stride, w, stride).mean(axis=(2, 4))
    padded = numpy.zeros((c, h * stride, w * stride), dtype=array.dtype)
    padded[:, :height, :width] = array
    rows = numpy.minimum(stride, height - stride * numpy.arange(h))  # pixels in each block row
    cols = numpy.minimum(stride, width - stride * numpy.arange(w))
    return padded.reshape(c, h, stride, w, stride).sum(axis=(2, 4)) / numpy.outer(rows, cols).astype(array.dtype)


def upsample_nearest(array, stride, height, width):
    """Repeat each cell of a (C, h, w) grid of :func:`box_downsample` into its block of the (C, H, W) image."""
    return array.repeat(stride, axis=1)[:, :height].repeat(stride, axis=2)[:, :, :width]


def _integer(name, value, least):
    """``value`` as an int of at least ``least``, or a ValueError (a TypeError for a non-integer) naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"DenseCRF: {name} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"DenseCRF: {name} must be >= {least}, got {value}")
    return int(value)


#: The range of each width :class:`DenseCRF` takes: narrower, the float32 features and messages
#: overflow or divide by zero (NaN marginals); wider, a spatial Gaussian's taps outgrow any image
#: (1e4 pixels already takes 20 s on 128 x 128) and memory; a bilateral one is flat long before.
WIDTHS = {"bilateral_xy": (1e-3, 1e4), "bilateral_rgb": (1e-6, 1e6), "spatial_xy": (1e-3, 1e4)}

#: The largest setting :class:`DenseCRF` takes: a weight times the (normalised) messages, summed
#: over a few classes, must stay finite in float32, whose largest number is about 3.4e38.
MAX_SETTING = 1e30


def _real(name, value, positive):
    """``value`` as a float, at most :data:`MAX_SETTING` and > 0 (``positive``) or >= 0, or an
    error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"DenseCRF: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > MAX_SETTING:
        raise ValueError(f"DenseCRF: {name} must be finite and {'> 0' if positive else '>= 0'}, got {value}; the "
                         f"largest it takes is {MAX_SETTING:g} (the messages are float32)")
    return value


class DenseCRF:
    """Mean-field inference of a fully connected Potts CRF with Gaussian spatial and bilateral kernels.

    iterations : mean-field steps (5 is customary; 0 gives the softmax).
    bilateral_weight, bilateral_xy, bilateral_rgb : w_b, s_xy (pixels), s_rgb (units of the image
        as given, e.g. the default 0.06 for images scaled to [-0.5, 0.5], about 15 grey levels).
    spatial_weight, spatial_xy : w_s, s_sp (pixels).
    max_grid_points : size cap of the dense bilateral matrix (its memory is 4 * points^2 bytes).
    Widths must lie in ``WIDTHS``' ranges, weights be >= 0 and at most 1e30 (``MAX_SETTING``), iterations an integer
    >= 0 and max_grid_points one >= 1: anything else is refused here (a ValueError, a TypeError
    for what is not a number), not NaN marginals or a division by zero at the first image.
    """

    #: the constructor's arguments, in order: what :meth:`config` stores and a checkpoint rebuilds
    SETTINGS = ("iterations", "bilateral_weight", "bilateral_xy", "bilateral_rgb", "spatial_weight", "spatial_xy",
                "max_grid_points")

    def __init__(self, iterations=5, bilateral_weight=4.0, bilateral_xy=12.0, bilateral_rgb=0.06,
                 spatial_weight=2.0, spatial_xy=2.0, max_grid_points=4096):
        self.iterations = _integer("iterations", iterations, 0)
        self.max_grid_points = _integer("max_grid_points", max_grid_points, 1)
        for name, value, positive in (("bilateral_weight", bilateral_weight, False),
                                      ("bilateral_xy", bilateral_xy, True), ("bilateral_rgb", bilateral_rgb, True),
                                      ("spatial_weight", spatial_weight, False), ("spatial_xy", spatial_xy, True)):
            setattr(self, name, _real(name, value, positive))
        for name, (low, high) in WIDTHS.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"DenseCRF: {name} must lie in [{low:g}, {high:g}], got {getattr(self, name):g}")

    def config(self):
        """The settings as a plain dict of numbers, ``DenseCRF(**crf.config())`` being the same CRF
        (what a CNN-CRF checkpoint stores)."""
        return {name: getattr(self, name) for name in self.SETTINGS}

    def __repr__(self):
        return f"DenseCRF({', '.join(f'{name}={value!r}' for name, value in self.config().items())})"

    def bilateral_kernel(self, image, stride):
        """The dense bilateral kernel on the subsampled grid and its normalisation.

        Returns ``(kernel, scale)``: ``kernel`` (P, P) float32, ``exp(-|f_i - f_j|^2 / 2)`` off the
        diagonal and 0 on it, for the features ``f = (row, col) * stride / s_xy, colour / s_rgb``
        of the P grid points; ``scale`` (P,) = ``1 / sqrt(row sums + 1e-12)`` (the 1e-12 keeps the
        scale of a point that hears nobody finite; its row is zero anyway), so that the normalised
        kernel is ``scale_i kernel_ij scale_j`` (applied to the beliefs, not stored: two sweeps of the
        P x P matrix fewer). The exponent comes from one product of the features with two extra
        columns, ``[f_i, -|f_i|^2/2, 1] . [f_j, 1, -|f_j|^2/2] = -|f_i - f_j|^2 / 2``.
        """
        guide = box_downsample(image, stride)  # (3, h, w)
        _, h, w = guide.shape
        rows, cols = numpy.mgrid[0:h, 0:w]
        features = numpy.concatenate([
            numpy.stack([rows.ravel(), cols.ravel()], axis=1) * (stride / self.bilateral_xy),
            guide.reshape(3, -1).T / self.bilateral_rgb,
        ], axis=1).astype(numpy.float32)  # (P, 5)
        half_squared = 0.5 * (features ** 2).sum(axis=1, keepdims=True)
        ones = numpy.ones_like(half_squared)
        kernel = numpy.concatenate([features, -half_squared, ones], axis=1) @ \
            numpy.concatenate([features, ones, -half_squared], axis=1).T
        numpy.minimum(kernel, 0, out=kernel)  # -|f_i - f_j|^2 / 2, rounding kept non-positive
        numpy.exp(kernel, out=kernel)
        # weights below float32's smallest normal number (5.5% of the pairs of a face's grid on
        # average, 3.4 to 6.9% over 20 LFW faces) add nothing a float32 sum keeps, and every
        # product with one takes the CPU's slow path: zero, they halve the time of the messages
        flush_subnormals(kernel)
        numpy.fill_diagonal(kernel, 0)  # a pixel sends no message to itself
        return kernel, 1 / numpy.sqrt(kernel.sum(axis=1) + 1e-12)

    def spatial_filter(self, array):
        """SciPy's Gaussian filter of width ``spatial_xy`` over the last two axes, zeros beyond the
        image: ``sum_j g(i - j) array_j`` over the pixels j that exist, the centre tap included."""
        sigma = (0,) * (array.ndim - 2) + (self.spatial_xy, self.spatial_xy)
        return ndimage.gaussian_filter(array, sigma=sigma, mode="constant", cval=0.0)

    def spatial_centre_tap(self):
        """``g(0)``, the weight the filter gives a pixel itself: the square of the middle of SciPy's
        normalised 1-D taps (read off the filter itself, so that it is that filter's for any width)."""
        radius = int(4 * self.spatial_xy + 0.5)
        impulse = numpy.zeros(2 * radius + 1)
        impulse[radius] = 1
        return float(ndimage.gaussian_filter1d(impulse, self.spatial_xy, mode="constant")[radius]) ** 2

    def refine_one(self, logits, image):
        """logits (K, H, W), image (3, H, W) -> Q (K, H, W), the mean-field marginals (float32)."""
        k, height, width = logits.shape
        logits = logits.astype(numpy.float32)
        stride = max(1, math.ceil(math.sqrt(height * width / self.max_grid_points)))
        while math.prod(grid_shape(height, width, stride)) > self.max_grid_points:  # blocks cut short count too
            stride += 1
        if stride > min(height, width):
            raise ValueError(f"DenseCRF: an image of {height}x{width} needs a bilateral grid of {stride}x{stride} "
                             f"blocks (max_grid_points {self.max_grid_points}), larger than the image is on one "
                             "side; raise max_grid_points or give a less elongated image")
        bilateral, scale = self.bilateral_kernel(image.astype(numpy.float32), stride)
        # the spatial kernel's degrees, D_i = sum_{j != i} g(i - j) over the pixels that exist
        centre = self.spatial_centre_tap()
        degree = self.spatial_filter(numpy.ones((height, width))) - centre
        # a pixel with no neighbour (a 1 x 1 image) hears nothing, rather than rounding noise
        with numpy.errstate(divide="ignore"):
            spatial_scale = numpy.where(degree > 1e-9, 1 / numpy.sqrt(degree), 0).astype(numpy.float32)
        q = softmax(logits, axis=0)
        for _ in range(self.iterations):
            q_grid = box_downsample(q, stride).reshape(k, -1)  # (K, P)
            message = (((q_grid * scale) @ bilateral) * scale).reshape((k,) + grid_shape(height, width, stride))
            message = self.bilateral_weight * upsample_nearest(message, stride, height, width)
            # the spatial kernel without its centre tap, normalised as the bilateral one
            scaled = q * spatial_scale
            message += self.spatial_weight * spatial_scale * (self.spatial_filter(scaled) - centre * scaled)
            q = softmax(logits + message, axis=0)
        return q

    def refine(self, logits, images):
        """logits (N, K, H, W) and images (N, 3, H, W) -> marginals Q (N, K, H, W), on the logits' device."""
        host_logits, host_images = backend.to_numpy(logits), backend.to_numpy(images)
        if host_logits.ndim != 4 or host_images.ndim != 4 or host_logits.shape[0] != host_images.shape[0] \
                or host_images.shape[1] != 3 or host_logits.shape[2:] != host_images.shape[2:]:
            raise ValueError(f"DenseCRF: logits (N, K, H, W) and images (N, 3, H, W) must agree, got "
                             f"{host_logits.shape} and {host_images.shape}")
        if host_logits.shape[0] == 0:
            raise ValueError("DenseCRF: the batch is empty; give at least one image")
        if 0 in host_logits.shape[1:]:
            raise ValueError(f"DenseCRF: logits of shape {host_logits.shape} have no class or no pixel; "
                             "give at least one of each")
        for what, array in (("logits", host_logits), ("images", host_images)):
            if array.dtype not in (numpy.float32, numpy.float64):  # uint8 images would be cast without a word
                raise TypeError(f"DenseCRF: {what} must be float32 or float64, got {array.dtype}")
            # the dense bilateral kernel would spread one NaN to every pixel of the image
            if not numpy.isfinite(array).all():
                raise ValueError(f"DenseCRF: the {what} hold NaN or infinite values")
        q = numpy.stack([self.refine_one(z, image) for z, image in zip(host_logits, host_images)])
        return backend.to_device_of(q, logits)
