"""Compile each kernel once, check every launch's arguments, and launch on the GPU or on the emulator.

A layer's GPU path does, for example::

    from minirnng.cuda import get_kernel, blocks_for, THREADS_PER_BLOCK

    relu = get_kernel("activation", "relu_forward", x.dtype)
    y = xp.empty_like(x)
    relu((blocks_for(x.size),), (THREADS_PER_BLOCK,), (x, y, numpy.int32(x.size)))

exactly as with ``cupy.RawKernel``. Where the kernel runs is decided by the arrays it is given:

* CuPy arrays: on the GPU, through a ``cupy.RawModule`` compiled from ``kernels/<source>.cu`` by
  NVRTC with ``-Dscalar_t=float`` or ``-Dscalar_t=double``, once per (source, dtype) and process
  (CuPy keeps the compiled binary on disk as well, so later processes skip NVRTC);
* NumPy arrays: on the CPU, through :mod:`minirnng.cuda.emulator`, which compiles the *same*
  source with the system C++ compiler. The grid, the block, the index arithmetic and the argument
  types are those of the GPU launch, which is what makes the emulator a test of the GPU code.

Before either, the arguments are checked against the kernel's signature (read from the source by
:mod:`minirnng.cuda.sources`), because a kernel cannot check them itself: a wrong argument is not an
error there but garbage, or a crash. The checks:

* as many arguments as the kernel has parameters;
* an array for each pointer parameter (``None`` only where the kernel tests for ``nullptr``), of
  the dtype the parameter declares (``scalar_t`` is the variant's dtype), C-contiguous (the
  kernel indexes the raw buffer; a strided view would be misread), and writable if the kernel
  writes it;
* for each scalar parameter, exactly ``numpy.int32`` (``int``), ``numpy.float32`` (``float``) or
  ``numpy.float64`` (``double``): a Python ``int`` would reach the GPU as 8 bytes where the kernel
  reads 4;
* not CuPy and NumPy arrays in one launch, and not NumPy arrays while the backend is ``cupy``.

Which GPU a CuPy array lives on is not checked: the kernel runs on CuPy's current device, so on a
machine with several GPUs launch it under ``with cupy.cuda.Device(k):`` of its arrays' device.
"""

import functools
import math

import numpy

from .. import backend
from . import emulator, sources

#: The block size every 1-D launch of minirnng uses: a multiple of the warp size (32) that keeps
#: enough warps per multiprocessor on every GPU since 2012.
THREADS_PER_BLOCK = 256
#: Kernels index with int: arrays are limited to 2**31 - 1 elements.
MAX_ELEMENTS = 2**31 - 1

_SCALAR_NUMPY_TYPES = {"int": numpy.int32, "float": numpy.float32, "double": numpy.float64}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message has the kernel's name and the compiler log."""


#: Array types seen so far, and whether each is a CuPy array: a dict lookup is cheaper than
#: :func:`minirnng.backend.is_cupy_array`'s string test, and there are only a few such types.
_ARRAY_TYPES = {numpy.ndarray: False}


def _on_gpu(value, parameter, kernel):
    """Whether an argument for a pointer parameter is a CuPy array (True) or a NumPy array (False);
    anything else is refused with a message naming the parameter."""
    on_gpu = _ARRAY_TYPES.get(type(value))
    if on_gpu is None:
        if value is None:
            kernel._reject(parameter, TypeError, "must be an array; None (a null pointer) is accepted only "
                                                 "where the kernel tests for nullptr")
        if not (isinstance(value, numpy.ndarray) or backend.is_cupy_array(value)):
            kernel._reject(parameter, TypeError, f"must be a NumPy or CuPy array, got {type(value).__name__}")
        on_gpu = _ARRAY_TYPES[type(value)] = backend.is_cupy_array(value)
    return on_gpu


def blocks_for(n, threads=THREADS_PER_BLOCK):
    """The number of blocks of ``threads`` threads that cover ``n`` work items (at least 1).

    The last block is usually partly idle, which is why every kernel checks its bounds.
    """
    return max(1, -(-int(n) // threads))


#: how many times reload_kernels has run: a Kernel kept from before reads its signature again
_generation = 0


def get_kernel(source_name, kernel_name, dtype):
    """The kernel ``kernel_name`` of ``kernels/<source_name>.cu`` in the ``dtype`` variant.

    ``dtype`` is ``numpy.float32`` or ``numpy.float64`` (what ``scalar_t`` becomes). Compilation
    happens at the first launch, for the device that launch runs on.
    """
    if isinstance(dtype, numpy.ndarray) or backend.is_cupy_array(dtype):
        raise TypeError("get_kernel: give the dtype (numpy.float32, numpy.float64, or x.dtype), not an array")
    try:
        dtype = numpy.dtype(dtype)
    except TypeError:
        raise TypeError(f"get_kernel: dtype {dtype!r} is not a NumPy dtype; "
                        "use numpy.float32 or numpy.float64") from None
    if dtype not in sources.SCALAR_T:
        raise TypeError(f"get_kernel: unsupported dtype {dtype}; the kernels exist in float32 and float64")
    return _kernel(source_name, kernel_name, dtype)


@functools.lru_cache(maxsize=None)
def _kernel(source_name, kernel_name, dtype):
    found = sources.kernels(source_name)
    if kernel_name not in found:
        raise ValueError(f"{source_name}.cu has no kernel {kernel_name!r}; it has: {', '.join(found)}")
    return Kernel(source_name, found[kernel_name], dtype)


class Kernel:
    """A checked kernel, called like ``cupy.RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, source_name, kernel, dtype):
        self.generation = _generation
        self.source_name = source_name
        self.name = kernel.name
        self.parameters = kernel.parameters
        self.dtype = dtype
        # Per parameter: the dtype an array must have, or the exact NumPy type a scalar must have.
        self._expected = [p.dtype(dtype) if p.pointer else
                          (dtype.type if p.ctype == "scalar_t" else _SCALAR_NUMPY_TYPES[p.ctype])
                          for p in kernel.parameters]
        # The same, split by kind and prepared once, because the checks run before every launch:
        # (position, parameter, expected dtype, bool accepted too) for arrays, (position, parameter,
        # expected type) for scalars.
        self._array_checks = [(i, p, expected, expected == numpy.uint8)
                              for i, (p, expected) in enumerate(zip(self.parameters, self._expected)) if p.pointer]
        self._scalar_checks = [(i, p, expected)
                               for i, (p, expected) in enumerate(zip(self.parameters, self._expected)) if not p.pointer]

    def __repr__(self):
        parameters = ", ".join(p.declaration for p in self.parameters)
        return f"<Kernel {self.source_name}.cu:{self.name}({parameters}) [{self.dtype.name}]>"

    def __call__(self, grid, block, args):
        if self.generation != _generation:
            # reload_kernels ran since this kernel was looked up (an edited source): its checks must
            # be those of the signature now compiled, or an edited parameter type is written past
            found = sources.kernels(self.source_name)
            if self.name not in found:
                raise ValueError(f"{self.source_name}.cu has no kernel {self.name!r} any more (the source was "
                                 f"reloaded); it has: {', '.join(found)}")
            self.__init__(self.source_name, found[self.name], self.dtype)
        grid = self._dimensions(grid, "grid", limits=(2**31 - 1, 65535, 65535))
        block = self._dimensions(block, "block", limits=(1024, 1024, 64))
        if math.prod(block) > 1024:
            raise ValueError(f"{self._where()}: block {block} has more than 1024 threads")
        args = tuple(args)
        if self._check_arguments(args):
            self._launch_on_gpu(grid, block, args)
        else:
            emulator.get_function(self.source_name, self.name, self.dtype)(grid, block, args)

    def _launch_on_gpu(self, grid, block, args):
        try:
            _gpu_function(self.source_name, self.name, self.dtype)(grid, block, args)
        except Exception as error:
            # NVRTC runs at the first launch of a source's kernel (in get_function or in the call,
            # depending on the CuPy version); its error is made to name the kernel and the source.
            from cupy.cuda.compiler import CompileException
            if not isinstance(error, CompileException):
                raise
            raise KernelCompileError(
                f"kernel {self.name} in {sources.source_path(self.source_name)} does not compile for "
                f"{self.dtype.name} (-Dscalar_t={sources.SCALAR_T[self.dtype]}); NVRTC says:\n"
                f"{error.get_message()}") from None

    # -- checks ------------------------------------------------------------------------------
    def _where(self):
        return f"kernel {self.name} ({self.source_name}.cu, {self.dtype.name})"

    def _dimensions(self, value, what, limits):
        if type(value) is tuple and 1 <= len(value) <= 3:
            # The common case, checked without building anything: a tuple of in-range Python ints.
            for v, limit in zip(value, limits):
                if type(v) is not int or not 1 <= v <= limit:
                    break
            else:
                return value
        if isinstance(value, (int, numpy.integer)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{self._where()}: {what} must be a tuple of 1 to 3 ints, got {value!r}")
        value = tuple(value)
        if not 1 <= len(value) <= 3 or not all(isinstance(v, (int, numpy.integer)) for v in value):
            raise TypeError(f"{self._where()}: {what} must be a tuple of 1 to 3 ints, got {value!r}")
        for v, limit in zip(value, limits):
            if not 1 <= v <= limit:
                raise ValueError(f"{self._where()}: {what} {value} is out of range (each size from 1 to {limit})")
        return tuple(int(v) for v in value)

    def _check_arguments(self, args):
        """Check ``args`` against the signature; return True for a GPU launch, False for the emulator.

        This runs before every launch, so it is written for speed (at batch 1 a network is a few
        dozen launches and the Python around them is what costs): one pass, no temporary objects,
        and the error messages are built only when a check fails.
        """
        if len(args) != len(self.parameters):
            signature = ", ".join(p.declaration for p in self.parameters)
            raise TypeError(f"{self._where()} takes {len(self.parameters)} arguments ({signature}), "
                            f"got {len(args)}")
        for position, parameter, expected in self._scalar_checks:
            value = args[position]
            if type(value) is not expected:
                self._reject(parameter, TypeError,
                             f"must be numpy.{expected.__name__}, got {type(value).__module__}."
                             f"{type(value).__name__} {value!r}; write numpy.{expected.__name__}(...) "
                             "(a Python number does not have the size the kernel reads)")
        gpu_arrays = host_arrays = 0
        for position, parameter, expected, bool_allowed in self._array_checks:
            value = args[position]
            if value is None and parameter.nullable:
                continue
            on_gpu = _on_gpu(value, parameter, self)
            if on_gpu:
                gpu_arrays += 1
            else:
                host_arrays += 1
                if not parameter.const and not value.flags.writeable:
                    self._reject(parameter, ValueError, "is written by the kernel but the array is read-only; "
                                                        "pass a writable copy")
            if value.dtype != expected and not (bool_allowed and value.dtype == numpy.bool_):
                order = "" if value.dtype.isnative else f" in the other byte order ({value.dtype.str})"
                self._reject(parameter, TypeError, f"must have dtype {expected.name}, got {value.dtype.name}"
                                                   f"{order}; convert it with .astype(numpy.{expected.name})")
            if not value.flags.c_contiguous:
                self._reject(parameter, ValueError, "is not C-contiguous (a transposed view or a strided slice?); "
                                                    "the kernel would misread it. Pass xp.ascontiguousarray(...) "
                                                    "of it (xp: numpy or cupy)")
            if value.size > MAX_ELEMENTS:
                self._reject(parameter, ValueError, f"has {value.size} elements; the kernels index with int32, "
                                                    f"up to {MAX_ELEMENTS}")
            # a view that starts inside an element (raw[1:].view(float32)): a GPU faults on it
            if not (value.data.ptr % value.itemsize == 0 if on_gpu else value.flags.aligned):
                self._reject(parameter, ValueError, "is not aligned to its element size (a view that starts "
                                                    "inside an element?); pass a copy")
        if gpu_arrays and host_arrays:
            on_gpu = [p.name for i, p, _, _ in self._array_checks if backend.is_cupy_array(args[i])]
            on_host = [p.name for i, p, _, _ in self._array_checks
                       if args[i] is not None and not backend.is_cupy_array(args[i])]
            raise ValueError(f"{self._where()}: arrays on two devices, {', '.join(on_gpu)} on the GPU (CuPy) and "
                             f"{', '.join(on_host)} on the host (NumPy); move them with "
                             "minirnng.backend.to_device (or cupy.asarray / cupy.asnumpy)")
        if gpu_arrays:
            return True
        if backend.current() == "cupy":
            on_host = [p.name for i, p, _, _ in self._array_checks if args[i] is not None]
            raise ValueError(f"{self._where()}: got NumPy arrays ({', '.join(on_host)}) while the backend is cupy; "
                             "move them to the GPU with minirnng.backend.to_device (or cupy.asarray), "
                             "or run on the CPU under minirnng.backend.use('cuda-emulator')")
        return False

    def _reject(self, parameter, error, problem):
        raise error(f"{self._where()}: argument {parameter.name!r} ({parameter.declaration}) {problem}")


@functools.lru_cache(maxsize=None)
def _gpu_module(source_name, dtype):
    """The ``cupy.RawModule`` of a source and dtype; CuPy compiles it (once per device) when first used."""
    import cupy
    return cupy.RawModule(code=sources.read_source(source_name),
                          options=(f"-Dscalar_t={sources.SCALAR_T[dtype]}",))


@functools.lru_cache(maxsize=None)
def _gpu_function(source_name, kernel_name, dtype):
    """The kernel as a ``cupy.RawKernel`` (which loads its module on each device it is launched on)."""
    return _gpu_module(source_name, dtype).get_function(kernel_name)


def element_count(n):
    """``n`` as the kernels' int32 element count, or the launcher's clear error where it does not fit
    (for the counts computed before a launch checks its arrays)."""
    if n > MAX_ELEMENTS:
        raise ValueError(f"an array of {n} elements is too large for the kernels, which index with int32, "
                         f"up to {MAX_ELEMENTS}")
    return numpy.int32(n)


def reload_kernels():
    """Forget every kernel source read and every kernel compiled in this process, so that the next
    launch reads ``minirnng/kernels`` again and compiles what changed (the compile caches on disk
    are keyed by the source text, so only edited sources are compiled). For editing a kernel
    inside a running process, in Jupyter say; a new process reads the sources afresh anyway.
    Kernels are looked up once per process because a launch must stay cheap: checking the files
    at every launch would cost a system call each."""
    global _generation
    for cached in (sources.read_source, sources.kernels, emulator._library, emulator.get_function,
                   _kernel, _gpu_module, _gpu_function):
        cached.cache_clear()
    _generation += 1


# -- launch helpers the layers share ---------------------------------------------------------------

def launch(source_name, kernel_name, dtype, work_items, args, grid_y=1):
    """Launch a kernel with one thread per work item: ``grid (blocks_for(work_items), grid_y)``,
    block ``(THREADS_PER_BLOCK,)``, on the device of ``args`` (see :class:`Kernel`).

    ``grid_y`` is the second grid dimension, the number of directions for the scan kernels.
    """
    grid = (blocks_for(work_items),) if grid_y == 1 else (blocks_for(work_items), grid_y)
    get_kernel(source_name, kernel_name, dtype)(grid, (THREADS_PER_BLOCK,), args)


def contiguous(array):
    """``array`` itself if it is C-contiguous, else a C-contiguous copy (for arrays a kernel is given
    that come from elsewhere, e.g. a cuBLAS product, which is contiguous in practice: this costs a
    flag test then)."""
    if array.flags.c_contiguous:
        return array
    return backend.get_array_module(array).ascontiguousarray(array)


def channel_sum(x):
    """``out[c] = sum over n, q of x[n, c, q]``: x (N, C, P) C-contiguous -> out (C,), x's dtype.

    The bias gradients, the losses' totals and the recurrent layers' ``db``. Two launches of
    ``reduce.cu`` (a partial sum per channel and chunk, then one sum per channel), accumulated in
    double; ``chunks = min(1024, N*P)`` threads per channel keep a GPU busy.
    """
    xp = backend.get_array_module(x)
    images, channels, pixels = x.shape
    element_count(x.size)  # the launcher's clear error, before any int32 of the sizes overflows
    chunks = min(1024, images * pixels)
    partial = xp.empty((channels, chunks), dtype=x.dtype)
    out = xp.empty((channels,), dtype=x.dtype)
    i32 = numpy.int32
    launch("reduce", "channel_sum_partial", x.dtype, channels * chunks,
           (x, partial, i32(images), i32(channels), i32(pixels), i32(chunks)))
    launch("reduce", "channel_sum_finish", x.dtype, channels, (partial, out, i32(channels), i32(chunks)))
    return out


def sum_first_axis(x):
    """``out = x.sum(axis=0)``: x (D, ...) C-contiguous -> out (...), one launch (the D terms are
    added in order, d = 0, 1, ..., as the NumPy path adds the directions)."""
    xp = backend.get_array_module(x)
    out = xp.empty(x.shape[1:], dtype=x.dtype)
    launch("reduce", "sum_first_axis", x.dtype, out.size, (x, out, numpy.int32(x.shape[0]), element_count(out.size)))
    return out
