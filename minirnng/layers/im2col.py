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
"""

import numpy


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
