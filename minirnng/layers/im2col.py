"""im2col and col2im: turning a convolution into one matrix product, and back.

A k x k correlation with stride s and zero padding p reads, for every output pixel, a
``C x k x k`` patch of the input. ``im2col`` copies all those patches into the columns of one
matrix so that the correlation becomes a single matrix product::

    x     (N, C, H, W)
    cols  (N, C*k*k, Ho*Wo),    cols[n, c*k*k + i*k + j, oy*Wo + ox] = xpad[n, c, oy*s + i, ox*s + j]

with ``Ho = (H + 2p - k) // s + 1`` (likewise ``Wo``) and ``xpad`` the input padded by ``p``
zeros on every side. ``col2im`` is its adjoint (transpose): it scatters columns back onto the
image and *adds* where patches overlap, then drops the padding. That adjoint is exactly a
transposed convolution, which is why the input gradient of a convolution is one.

Both are written with a strided view of the padded image, (N, C, k, k, Ho, Wo), so that the
only Python loop is over the k*k kernel offsets.

The layers' NumPy path does not call them on a whole batch: it convolves **image by image** (a few
images at a time when their columns are small), with :class:`ImageColumns`. The columns of a
batch are large (conv1 of RNN-G at batch 16: 16 x 75 x 16384 floats, 79 MB), so a batched im2col
writes them to main memory, page-faults them in fresh every call, and the matrix product reads
them back from memory at about a third of its in-cache speed (on the 2-core machine of
``docs/benchmarks.md``: 40 against 110 GFLOP/s). One image's columns (at most 4.9 MB in RNN-G,
2.4 MB for conv3) are written into a buffer allocated once per pass and read back by the product
while they are still in cache.

:func:`im2col_gpu` and :func:`col2im_gpu` are the same two functions on the kernel path
(``kernels/im2col.cu``, one thread per output element; CuPy arrays or, on the CUDA emulator, NumPy
arrays). For a 1x1 kernel with stride 1 and no padding both are the identity on the data, and
they return a reshaped view of their argument without launching anything.
"""

import numpy

from .. import backend
from ..cuda.launch import contiguous, launch


def conv_output_size(size, kernel_size, stride, padding):
    """Output length of a correlation along one axis: ``(size + 2*padding - kernel_size) // stride + 1``."""
    return (size + 2 * padding - kernel_size) // stride + 1


def transposed_output_size(size, kernel_size, stride, padding):
    """Output length of a transposed convolution along one axis: ``(size-1)*stride - 2*padding + kernel_size``."""
    return (size - 1) * stride - 2 * padding + kernel_size


def patch_view(x_padded, kernel_size, stride, out_height, out_width):
    """A read-only strided view ``(N, C, k, k, Ho, Wo)`` of the k x k patches of a padded image."""
    n, c, _, _ = x_padded.shape
    sn, sc, sh, sw = x_padded.strides
    return numpy.lib.stride_tricks.as_strided(
        x_padded,
        shape=(n, c, kernel_size, kernel_size, out_height, out_width),
        strides=(sn, sc, sh, sw, sh * stride, sw * stride),
        writeable=False,
    )


def im2col(x, kernel_size, stride=1, padding=0):
    """Unfold the k x k patches of ``x`` into columns.

    x : (N, C, H, W) -> cols : (N, C*k*k, Ho*Wo), a new C-contiguous array of x's dtype.
    """
    n, c, height, width = x.shape
    out_height = conv_output_size(height, kernel_size, stride, padding)
    out_width = conv_output_size(width, kernel_size, stride, padding)
    if padding:
        x = numpy.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    patches = patch_view(numpy.ascontiguousarray(x), kernel_size, stride, out_height, out_width)
    return patches.reshape(n, c * kernel_size * kernel_size, out_height * out_width)


def col2im(cols, image_shape, kernel_size, stride=1, padding=0):
    """Fold columns back onto an image, summing where patches overlap (the adjoint of im2col).

    cols : (N, C*k*k, Ho*Wo), image_shape : (N, C, H, W) -> (N, C, H, W).
    ``Ho, Wo`` follow from ``image_shape`` by the correlation formula; any rows or columns of the
    image that no patch reaches (when ``(H + 2p - k) % s != 0``) receive zero.
    """
    return col2im_into(cols, numpy.empty(image_shape, dtype=cols.dtype), kernel_size, stride, padding)


def phase_size(phase, size, stride):
    """How many of the pixels ``0 .. size-1`` are ``phase`` modulo ``stride``."""
    return len(range(phase, size, stride))


def shifted_span(shift, out_size, size):
    """The outputs ``o`` in ``0 .. out_size-1`` with ``o + shift`` in ``0 .. size-1``, and those
    ``o + shift``: a pair of slices, or None when there is no such output."""
    first, stop = max(0, -shift), min(out_size, size - shift)
    if first >= stop:
        return None
    return slice(first, stop), slice(first + shift, stop + shift)


def col2im_into(cols, image, kernel_size, stride=1, padding=0, bias=None):
    """:func:`col2im` written into ``image`` (N, C, H, W), which it overwrites; returns ``image``.

    cols : (N, C*k*k, Ho*Wo). Kernel tap (i, j) of output pixel (o, u) came from image pixel
    ``(o*s + i - p, u*s + j - p)``. Split the image into its s x s *phases*, the planes of pixels
    ``(a + s*r, b + s*q)``: that pixel is pixel ``(o + di, u + dj)`` of phase
    ``(a, b) = ((i - p) % s, (j - p) % s)``, with ``di = (i - p) // s`` and ``dj = (j - p) // s``.
    So each tap adds its (C, Ho, Wo) slab of ``cols``, shifted, onto one phase plane: k*k additions
    of contiguous rows, without the zero padding (the parts of a slab outside the plane are skipped),
    then one strided copy per phase into ``image``. With stride 1 the only phase is the image
    itself. (Adding each slab straight into the strided pixels of the image, the textbook way,
    measures 1.6x slower for RNN-G's stride-2 transposed convolutions.) ``bias`` (C,), optional,
    is added to every pixel of its channel (the transposed convolution's bias), by the copies.

    Short rows (``Wo <= FLAT_GRID_MAX_WIDTH``) where every phase plane is Ho x Wo, as in the
    stage-2 networks' transposed convolutions: :func:`_add_shifted` adds each slab as one long
    run instead of row by row (numpy's cost per row dominates rows of 16 or 32 pixels; measured
    15-25% faster for the stage-2 networks). The sums are the same, in the same order.
    """
    n, c, height, width = image.shape
    s = stride
    out_height = conv_output_size(height, kernel_size, s, padding)
    out_width = conv_output_size(width, kernel_size, s, padding)
    patches = cols.reshape(n, c, kernel_size, kernel_size, out_height, out_width)
    if s == 1:
        planes = image[None, None]
    else:
        planes = numpy.empty((s, s, n, c, -(-height // s), -(-width // s)), dtype=image.dtype)
    planes[...] = 0
    runs = s > 1 and planes.shape[-2:] == (out_height, out_width) and out_width <= FLAT_GRID_MAX_WIDTH
    for i in range(kernel_size):
        a, di = (i - padding) % s, (i - padding) // s
        rows = shifted_span(di, out_height, phase_size(a, height, s))
        if rows is None:
            continue
        for j in range(kernel_size):
            b, dj = (j - padding) % s, (j - padding) // s
            columns = shifted_span(dj, out_width, phase_size(b, width, s))
            if columns is None:
                continue
            if runs:
                _add_shifted(planes[a, b], patches[:, :, i, j], rows, dj)
            else:
                planes[a, b, :, :, rows[1], columns[1]] += patches[:, :, i, j, rows[0], columns[0]]
    bias = None if bias is None else bias[:, None, None]
    if s == 1:
        if bias is not None:
            image += bias
        return image
    for a in range(s):
        for b in range(s):
            plane = planes[a, b, :, :, :phase_size(a, height, s), :phase_size(b, width, s)]
            if bias is None:
                image[:, :, a::s, b::s] = plane
            else:
                numpy.add(plane, bias, out=image[:, :, a::s, b::s])
    return image


def _add_shifted(plane, slab, rows, shift):
    """``plane[..., rows[1], u + shift] += slab[..., rows[0], u]`` for every column u that lands in
    the plane, as one addition over a long run of elements (plane and slab (N, C, R, W), same W).

    Flattened, a shift by ``shift`` columns is a shift by ``shift`` elements; but then, of each row,
    the ``|shift|`` elements that fall off its end land on the far edge of the neighbouring row.
    Those ``|shift|`` edge columns are ones this addition never reaches, so they are saved before
    and put back after (and the first or last of the run, which would land outside the plane, is
    left out). Every element that is reached gets the same addition as row by row.
    """
    n, c, _, width = plane.shape
    if shift == 0:  # whole rows: numpy runs over them as one
        plane[:, :, rows[1]] += slab[:, :, rows[0]]
        return
    source = slice(rows[0].start * width + max(0, -shift), rows[0].stop * width - max(0, shift))
    target = slice(rows[1].start * width + max(0, shift), rows[1].stop * width - max(0, -shift))
    edge = plane[..., :shift] if shift > 0 else plane[..., shift:]
    kept = edge.copy()
    plane.reshape(n, c, -1)[:, :, target] += slab.reshape(n, c, -1)[:, :, source]
    edge[...] = kept


#: The widest output rows for which :class:`ImageColumns` lays stride-1 columns on the flat grid.
FLAT_GRID_MAX_WIDTH = 64


class ImageColumns:
    """im2col and col2im of a few images at a time, in buffers allocated once: the NumPy path's convolutions.

    Built for images of shape (C, H, W), a k x k kernel with stride s and padding p, and chunks of
    at most ``images`` images (see the module docstring for why the layers convolve a few images at
    a time). Calling it on a chunk ``x`` (m, C, H, W), m <= images, returns the columns
    (m, C*k*k, Ho * grid_width), a view of a buffer that the next call overwrites; :meth:`fold` is
    the adjoint, the col2im of such columns. With ``ones_row`` the columns have one more row, of
    ones (not for a pointwise kernel): a product with ``[w2 | b]`` then adds the bias, and the
    weight gradient's product ``cols @ dy.T`` gives the bias gradient ``sum dy`` as its last row,
    so neither takes a pass of its own.

    The columns are laid out on a *grid* of Ho rows of ``grid_width`` output pixels:

    * **stride 1, short rows** (``Wo <= FLAT_GRID_MAX_WIDTH``, any padding): the grid is as wide
      as the padded image, ``Wp = W + 2p``, and column ``q = oy*Wp + ox`` of the row for (c, i, j)
      is pixel ``q + i*Wp + j`` of the flattened padded plane c. So that row is *one contiguous
      slice* of the plane, and im2col is C*k*k long copies, and col2im C*k*k long additions,
      instead of C*k*k*Ho short rows each: numpy pays a fixed cost per row, which dominates rows
      of 32 or 64 pixels (RNN-G's conv3 and conv5 backward: 10% and 8% faster). The price: the
      last ``Wp - Wo = k - 1`` columns of every grid row are padding, which the products compute
      for nothing (3-6% more work) and :meth:`crop` drops; for conv1's rows of 128 pixels that
      costs more than it saves. :meth:`extend` puts an upstream gradient (m, O, Ho, Wo) on the grid
      with zeros there, so that those columns contribute nothing to the weight gradient or col2im.
    * **pointwise** (1x1, stride 1, no padding): the columns are the images themselves, reshaped.
    * **otherwise** the grid is the output, ``grid_width = Wo``: one strided copy from
      :func:`patch_view` of the padded images, and :func:`col2im_into` to fold.

    The zero padding lives in a padded buffer whose border is zeroed once: each call copies only
    the interior.
    """

    def __init__(self, image_shape, kernel_size, stride, padding, dtype, images=1, ones_row=False):
        channels, height, width = image_shape
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.out_height = conv_output_size(height, kernel_size, stride, padding)
        self.out_width = conv_output_size(width, kernel_size, stride, padding)
        self.pointwise = is_pointwise(kernel_size, stride, padding)
        self.flat = stride == 1 and not self.pointwise and self.out_width <= FLAT_GRID_MAX_WIDTH
        self.grid_width = width + 2 * padding if self.flat else self.out_width
        self.ones_row = ones_row and not self.pointwise
        if self.pointwise:
            return
        self.rows = channels * kernel_size * kernel_size
        self.columns = numpy.empty((images, self.rows + self.ones_row, self.out_height * self.grid_width), dtype=dtype)
        if self.ones_row:
            self.columns[:, self.rows] = 1
        padded_shape = (images, channels, height + 2 * padding, width + 2 * padding)
        if self.flat:
            # each padded plane flattened, plus k - 1 zeros: the taps of the last grid row's
            # padding columns read up to k - 1 elements past the plane (only into the padding
            # columns; never read by the valid outputs)
            self.plane_size = padded_shape[2] * padded_shape[3]
            self.planes = numpy.zeros((images, channels, self.plane_size + kernel_size - 1), dtype=dtype)
            self.padded = self.planes[:, :, :self.plane_size].reshape(padded_shape)
            self.sums = self.grid = None  # the buffers of :meth:`fold` and :meth:`extend`, made at first use
        elif padding:
            self.padded = numpy.zeros(padded_shape, dtype=dtype)

    @staticmethod
    def bytes_per_image(image_shape, kernel_size, stride, padding, dtype):
        """About the size of one image's columns, to choose the chunk size (:func:`~.base.batch_chunks`);
        0 for a pointwise kernel, whose columns are the images themselves (nothing is copied)."""
        if is_pointwise(kernel_size, stride, padding):
            return 0
        channels, height, width = image_shape
        pixels = conv_output_size(height, kernel_size, stride, padding) * (width + 2 * padding)
        return channels * kernel_size * kernel_size * pixels * numpy.dtype(dtype).itemsize

    def __call__(self, images):
        """images (m, C, H, W) -> columns (m, C*k*k, Ho * grid_width)."""
        m, channels, height, width = images.shape
        if self.pointwise:
            return images.reshape(m, channels, height * width)
        p, k = self.padding, self.kernel_size
        if p or self.flat:
            self.padded[:m, :, p:p + height, p:p + width] = images
        columns = self.columns[:m]
        if self.flat:
            planes = self.planes[:m]
            item = planes.itemsize
            # (m, C, k, k, Ho*Wp): row (c, i, j) starts at element i*Wp + j of plane c
            taps = numpy.lib.stride_tricks.as_strided(
                planes, shape=(m, channels, k, k, self.out_height * self.grid_width),
                strides=(planes.strides[0], planes.strides[1], self.grid_width * item, item, item), writeable=False)
        else:
            source = self.padded[:m] if p else images
            taps = patch_view(source, k, self.stride, self.out_height, self.out_width)
        numpy.copyto(columns[:, :self.rows].reshape(taps.shape, copy=False), taps)
        return columns

    def crop(self, grid):
        """(m, O, Ho * grid_width) on the grid -> the view (m, O, Ho, Wo) of its valid pixels."""
        m, channels = grid.shape[:2]
        return grid.reshape(m, channels, self.out_height, self.grid_width)[:, :, :, :self.out_width]

    def extend(self, outputs):
        """(m, O, Ho, Wo) -> (m, O, Ho * grid_width) on the grid, zero in the padding columns.

        A reshape when the grid is the output; else a copy into a buffer reused by the next call.
        """
        m, channels = outputs.shape[:2]
        if not self.flat:
            return outputs.reshape(m, channels, -1)
        if self.grid is None or self.grid.shape[1] != channels:
            self.grid = numpy.zeros((len(self.columns), channels, self.out_height, self.grid_width),
                                    dtype=outputs.dtype)
        self.grid[:m, :, :, :self.out_width] = outputs
        return self.grid[:m].reshape(m, channels, -1)

    def fold(self, columns, images, bias=None):
        """col2im: columns (m, C*k*k, Ho * grid_width) -> ``images`` (m, C, H, W), overwritten; returns it.

        On the flat grid, every tap's row is added onto its plane as one contiguous slice, then
        the interior is copied out; otherwise :func:`col2im_into`. The padding columns of
        ``columns`` must be zero (as :meth:`extend` makes the upstream gradient). ``bias`` (C,),
        optional, is added to every pixel of its channel (a transposed convolution's bias).
        """
        m, channels, height, width = images.shape
        if not self.pointwise and not self.flat:
            return col2im_into(columns, images, self.kernel_size, self.stride, self.padding, bias)
        if self.pointwise:
            images[...] = columns.reshape(images.shape)
        else:
            self._fold_flat(columns, images)
        if bias is not None:
            images += bias[:, None, None]
        return images

    def _fold_flat(self, columns, images):
        """:meth:`fold` on the flat grid."""
        m, channels, height, width = images.shape
        k, p, length = self.kernel_size, self.padding, self.out_height * self.grid_width
        if self.sums is None:
            self.sums = numpy.empty_like(self.planes)
        sums = self.sums[:m]
        sums[...] = 0
        taps = columns.reshape(m, channels, k, k, length)
        for i in range(k):
            for j in range(k):
                start = i * self.grid_width + j
                sums[:, :, start:start + length] += taps[:, :, i, j]
        padded = sums[:, :, :self.plane_size].reshape(self.padded[:m].shape)
        images[...] = padded[:, :, p:p + height, p:p + width]


def is_pointwise(kernel_size, stride, padding):
    """Whether im2col and col2im are reshapes: a 1x1 kernel, stride 1, no padding."""
    return kernel_size == 1 and stride == 1 and padding == 0


def im2col_gpu(x, kernel_size, stride=1, padding=0):
    """:func:`im2col` by the ``im2col`` kernel: x (N, C, H, W) C-contiguous -> cols (N, C*k*k, Ho*Wo).

    For a pointwise (1x1, stride 1, no padding) kernel, cols is ``x`` itself, reshaped: no copy.
    """
    n, c, height, width = x.shape
    if is_pointwise(kernel_size, stride, padding):
        return x.reshape(n, c, height * width)
    out_height = conv_output_size(height, kernel_size, stride, padding)
    out_width = conv_output_size(width, kernel_size, stride, padding)
    cols = backend.get_array_module(x).empty((n, c * kernel_size * kernel_size, out_height * out_width),
                                             dtype=x.dtype)
    i32 = numpy.int32
    launch("im2col", "im2col", x.dtype, cols.size,
           (x, cols, i32(n), i32(c), i32(height), i32(width), i32(kernel_size), i32(stride), i32(padding),
            i32(out_height), i32(out_width)))
    return cols


def col2im_gpu(cols, image_shape, kernel_size, stride=1, padding=0, bias=None):
    """:func:`col2im` by the ``col2im`` kernel: cols (N, C*k*k, Ho*Wo) C-contiguous -> (N, C, H, W).

    ``bias`` (C,), optional, is added to every pixel of its channel by the same launch (the
    transposed convolution's bias). For a pointwise kernel without bias, the result is ``cols``
    reshaped: no launch.
    """
    n, c, height, width = image_shape
    if bias is None and is_pointwise(kernel_size, stride, padding):
        return cols.reshape(image_shape)
    cols = contiguous(cols)  # cols comes from a matrix product
    out_height = conv_output_size(height, kernel_size, stride, padding)
    out_width = conv_output_size(width, kernel_size, stride, padding)
    image = backend.get_array_module(cols).empty(image_shape, dtype=cols.dtype)
    i32 = numpy.int32
    launch("im2col", "col2im", cols.dtype, image.size,
           (cols, bias, image, i32(n), i32(c), i32(height), i32(width), i32(kernel_size), i32(stride),
            i32(padding), i32(out_height), i32(out_width)))
    return image
