"""The four scan directions as the strides the recurrent kernels take (see ``kernels/gated_scan.cu``).

Pixel ``(y, x)`` of a channel plane is element ``q = y * W + x``. A scan walks the lines of the
image (rows or columns), one step at a time, and every direction is the same walk::

    q(l, t) = first + l * line_stride + t * step_stride,    line l < lines, step t < length

so the kernels need no code per direction: Python hands them these five numbers.
"""

import numpy

DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")


def direction_strides(direction, height, width):
    """``(lines, length, line_stride, step_stride, first)`` of one direction on a ``height x width`` image."""
    if direction == "left_to_right":   # each row, x = 0 .. W-1
        return height, width, width, 1, 0
    if direction == "right_to_left":   # each row, x = W-1 .. 0
        return height, width, width, -1, width - 1
    if direction == "top_to_bottom":   # each column, y = 0 .. H-1
        return width, height, 1, width, 0
    if direction == "bottom_to_top":   # each column, y = H-1 .. 0
        return width, height, 1, -width, (height - 1) * width
    raise ValueError(f"unknown scan direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")


def scan_geometry(directions, height, width):
    """The ``geometry`` argument of the scan kernels: an int32 array ``(D, 5)``, one row per direction.

    ``directions`` is a sequence of names from :data:`DIRECTIONS` (a single name is accepted too).
    The result is a NumPy array; on the GPU path pass ``cupy.asarray`` of it (and keep it: it only
    depends on the directions and the image size).
    """
    if isinstance(directions, str):
        directions = [directions]
    for name, size in (("height", height), ("width", width)):
        # a negative size would give strides that walk outside the image; 2.5 would be truncated
        if isinstance(size, bool) or not isinstance(size, (int, numpy.integer)) or size < 0:
            raise ValueError(f"scan_geometry: {name} must be a whole number of pixels, at least 0; got {size!r}")
    return numpy.array([direction_strides(d, height, width) for d in directions], dtype=numpy.int32)
