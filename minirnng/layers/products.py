"""The NumPy path's matrix products in column blocks, for OpenBLAS's unpacked small-product kernels.

Every convolution of the NumPy path comes down to products ``a @ b`` of a narrow matrix ``a`` (a
layer's weights, O x C*k*k, 16 to 288 rows) and a wide one ``b`` (one image's columns, C*k*k x P,
up to P = 16,384 pixels). OpenBLAS's general product first copies ("packs") parts of both operands
into the layout its inner kernel reads fastest. That pays for large, square products, whose every
element is used many times; here each element of ``b`` is used only O times, and the packing costs
about as much as the multiply-adds. For products of at most about a million multiply-adds
(:data:`SMALL_PRODUCT_MULTIPLY_ADDS`), OpenBLAS's AVX-512 cores (:data:`CORES_WITH_SMALL_KERNELS`:
what it picks on Intel's Skylake-SP and later and on AMD's Zen 4 and later) take single-precision
kernels that read the operands where they lie instead.

:func:`matmul_blocks` computes ``numpy.matmul(a, b, out=out)`` as a batch of such small products:
``b`` and ``out`` seen as column blocks of ``block`` pixels, (m, P // block, K, block), views
into the same memory, so that NumPy's batched ``matmul`` passes each block to OpenBLAS with the
row stride of the whole. Nothing is copied, and the result is the same product up to rounding
(each output element is still one dot product of length K, summed in another order by the
other kernel). Which products pay was measured in place, on RNN-G's layers on half a batch (8
images: one worker's share of a training step), whole and in blocks in turns in one process, on
the 2-core AMD EPYC of docs/benchmarks.md (SkylakeX kernels, one BLAS thread, as each worker of
training runs, medians of 31, two runs):

====================================================  ============  ===========
RNN-G's layer, 8 images                               whole         in blocks
====================================================  ============  ===========
conv1 forward (16 x 76 by 76 x 16384, blocks of 512)  9.6, 10.6 ms  6.8, 8.1 ms
conv3 forward (32 x 145 by 145 x 4224, 128)           5.3, 5.3 ms   4.9, 5.0 ms
conv5 forward (32 x 289 by 289 x 1088, 64)            2.7, 2.6 ms   2.4, 2.2 ms
deconv6 forward (256 x 32 by 32 x 1024, 64)           4.6, 5.6 ms   4.2, 5.6 ms
deconv6 backward (dx: 32 x 256 by 256 x 1024, 64)     7.2, 8.0 ms   6.3, 7.3 ms
conv3 backward (dx: 144 x 32 by 32 x 4224, 128)       12.2 ms       12.6 ms
conv5 backward (dx: 288 x 32 by 32 x 1088, 64)        6.8 ms        7.5 ms
====================================================  ============  ===========

So the layers (:mod:`minirnng.layers.conv`) run their forward products and ConvTranspose2d's
input gradient in blocks, and Conv2d's input gradient whole; the weight gradients, whose long
inner dimension blocks would cut into partial sums, measured no faster in any split tried. A
whole training step of RNN-G on two worker processes: 3.7% and 4.7% faster (medians of 40
steps in turns).

With OpenBLAS's AVX2 cores (``OPENBLAS_CORETYPE=Haswell`` on the same machine) the same blocks
take 5-10% longer than the whole product, and in float64 up to a third longer on either: there,
and with any other BLAS, :func:`matmul_blocks` runs the product whole. The choice is made once,
when this module is imported, and kept in :data:`BLOCKS_PAY` (tests set it to run both ways on
any machine); the environment variable ``MINIRNNG_PRODUCT_BLOCKS=on|off`` overrides it, for
measuring both ways (``benchmarks/layers.py`` measures both ways in one process by setting
:data:`BLOCKS_PAY`).
"""

import ctypes
import glob
import os
import warnings

import numpy

#: OpenBLAS's cores whose single-precision products of at most :data:`SMALL_PRODUCT_MULTIPLY_ADDS`
#: skip the packing (``openblas_get_corename()``, lower case).
CORES_WITH_SMALL_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})

#: The largest product, M * K * block multiply-adds, that OpenBLAS hands to those kernels: measured,
#: 16 x 76 x 512 (0.62 million) and 32 x 145 x 192 (0.89 million) ran unpacked, 16 x 76 x 1024
#: (1.2 million) and 32 x 289 x 136 (1.3 million) packed, as fast as the whole product.
SMALL_PRODUCT_MULTIPLY_ADDS = 10 ** 6

#: Narrower blocks than this cost more in NumPy's per-block overhead than they save.
MIN_BLOCK = 32


def openblas_call(function):
    """The string that NumPy's OpenBLAS returns from ``openblas_<function>()`` (``"get_corename"``,
    ``"get_config"``), or None where NumPy's BLAS is not an OpenBLAS that has it, or anything
    goes wrong in finding out (nothing here may stop minirnng from loading).

    Looks beside NumPy first (the ``numpy.libs`` folder of its wheels), then in the libraries this
    process has loaded (Linux's ``/proc/self/maps``: a NumPy built against the system's OpenBLAS,
    :func:`loaded_openblas_paths`), under the names OpenBLAS's builds give the function
    (``openblas_``, ``scipy_openblas_``, with or without the ``64_`` of the builds with 64-bit
    integers).
    """
    try:
        candidates = sorted(glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs",
                                                   "*openblas*")))
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                candidates += loaded_openblas_paths(maps)
        except OSError:
            pass
        for path in dict.fromkeys(candidates):
            try:
                library = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", ""):
                    found = getattr(library, f"{prefix}_{function}{suffix}", None)
                    if found is not None:
                        found.restype = ctypes.c_char_p
                        value = found()
                        return value.decode(errors="replace") if value else None
    except Exception:  # noqa: BLE001 - an unknown BLAS: the products run whole, as with any other
        return None
    return None


def loaded_openblas_paths(maps_lines):
    """The OpenBLAS libraries among the lines of ``/proc/self/maps`` (``address perms offset dev
    inode path``; a path may hold spaces) that may be NumPy's: absolute paths, not in another
    wheel's ``*.libs`` folder. SciPy's wheels bring an OpenBLAS of their own, and OpenCV's (the
    ``detect`` extra) one whose version 0.3.15 runs "Zen" kernels on the benchmark machine where
    NumPy's runs "SkylakeX"."""
    paths = []
    for line in maps_lines:
        fields = line.rstrip("\n").split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if ("openblas" in os.path.basename(path).lower() and os.path.isabs(path)
                and not any(folder.endswith(".libs") for folder in path.split("/")[:-1])):
            paths.append(path)
    return paths


def openblas_core():
    """The kernels NumPy's OpenBLAS runs on this CPU (e.g. ``"SkylakeX"``, ``"Haswell"``; they
    follow ``OPENBLAS_CORETYPE`` where it is set), or None where that cannot be read."""
    return openblas_call("get_corename")


def blocks_pay(setting=None):
    """Whether single-precision products pay to be cut into blocks here: ``setting`` ``"on"`` or
    ``"off"`` decides; ``""`` or ``"auto"``, OpenBLAS's core does (:data:`CORES_WITH_SMALL_KERNELS`).
    Anything else is a ValueError naming it. ``setting=None`` reads the environment's
    ``MINIRNNG_PRODUCT_BLOCKS``, where a value it cannot read is warned about and taken as auto."""
    if setting is None:
        raw = os.environ.get(PRODUCT_BLOCKS_VARIABLE, "")
        try:
            return blocks_pay(raw)
        except ValueError as error:
            warnings.warn(f"{error}; deciding by OpenBLAS's kernels instead", stacklevel=2)
            return blocks_pay("auto")
    choice = setting.strip().lower()
    if choice in ("on", "off"):
        return choice == "on"
    if choice not in ("", "auto"):
        raise ValueError(f"{PRODUCT_BLOCKS_VARIABLE}={setting!r} is not on, off or auto")
    return (openblas_core() or "").lower() in CORES_WITH_SMALL_KERNELS


#: The environment variable that overrides the choice of :func:`blocks_pay` (on, off or auto), for
#: measuring both ways; worker processes inherit it.
PRODUCT_BLOCKS_VARIABLE = "MINIRNNG_PRODUCT_BLOCKS"

#: Whether :func:`matmul_blocks` cuts single-precision products into blocks in this process. Set
#: at import from :func:`blocks_pay`; a worker process makes its own choice the same way (setting
#: this attribute in the parent does not reach it; the environment variable does).
BLOCKS_PAY = blocks_pay()


def block_width(rows, depth, columns, dtype):
    """The columns per block of :func:`matmul_blocks` for ``(rows x depth) @ (depth x columns)``,
    or None to run the product whole: the largest power of two with ``rows * depth * block`` at
    most :data:`SMALL_PRODUCT_MULTIPLY_ADDS`, if that is at least :data:`MIN_BLOCK` and less than
    ``columns``; None where blocks do not pay (:data:`BLOCKS_PAY`, float32 only)."""
    if not BLOCKS_PAY or numpy.dtype(dtype) != numpy.float32:
        return None
    widest = SMALL_PRODUCT_MULTIPLY_ADDS // max(rows * depth, 1)
    if widest < MIN_BLOCK:
        return None
    block = 1 << (widest.bit_length() - 1)
    return block if block < columns else None


def column_blocks(matrices, count, block, writeable=False):
    """(..., R, count * block) -> the view (..., count, R, block) of its column blocks (no copy)."""
    if matrices.shape[-1] != count * block:
        raise ValueError(f"column_blocks: {matrices.shape[-1]} columns are not {count} blocks of {block}")
    *leading, rows, _ = matrices.shape
    *leading_strides, row_stride, column_stride = matrices.strides
    blocks = numpy.lib.stride_tricks.as_strided(
        matrices, shape=(*leading, rows, count, block),
        strides=(*leading_strides, row_stride, block * column_stride, column_stride), writeable=writeable)
    return blocks.swapaxes(-2, -3)


def matmul_blocks(a, b, out=None):
    """``numpy.matmul(a, b, out=out)`` for a (M, K), b (m, K, P), out (m, M, P) or None; returns the product.

    ``b`` and ``out`` may be views (the layers pass slices of their buffers). Where
    :func:`block_width` gives a block, the first ``P // block * block`` columns run as
    ``P // block`` products of ``block`` columns each (views, no copy) and the rest as one more.
    """
    rows, depth = a.shape
    columns = b.shape[-1]
    block = block_width(rows, depth, columns, numpy.result_type(a, b))
    if block is None or b.ndim < 2 or (out is not None and out.shape != b.shape[:-2] + (rows, columns)):
        return numpy.matmul(a, b, out=out)  # whole; and NumPy's own error for shapes that do not fit
    if out is None:
        out = numpy.empty(b.shape[:-2] + (rows, columns), dtype=numpy.result_type(a, b))
    count = columns // block
    whole = count * block
    numpy.matmul(a, column_blocks(b[..., :whole], count, block),
                 out=column_blocks(out[..., :whole], count, block, writeable=True))
    if whole < columns:
        numpy.matmul(a, b[..., whole:], out=out[..., whole:])
    return out
