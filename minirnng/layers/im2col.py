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
    n, c, height, width = image_shape
    out_height = conv_output_size(height, kernel_size, stride, padding)
    out_width = conv_output_size(width, kernel_size, stride, padding)
    patches = cols.reshape(n, c, kernel_size, kernel_size, out_height, out_width)
    padded = numpy.zeros((n, c, height + 2 * padding, width + 2 * padding), dtype=cols.dtype)
    row_span = stride * (out_height - 1) + 1
    col_span = stride * (out_width - 1) + 1
    for i in range(kernel_size):
        for j in range(kernel_size):
            padded[:, :, i:i + row_span:stride, j:j + col_span:stride] += patches[:, :, i, j]
    if padding:
        return numpy.ascontiguousarray(padded[:, :, padding:padding + height, padding:padding + width])
    return padded


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
