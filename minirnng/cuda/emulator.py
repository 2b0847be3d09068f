"""The CUDA emulator: minirnng's kernels, compiled for the CPU, run on NumPy arrays.

A kernel source in ``minirnng/kernels/*.cu`` is plain CUDA C++. To run it without a GPU, this
module compiles it with the system C++ compiler (``g++``, or whatever ``$CXX`` names) into a shared
library, with three additions:

1. the shim header ``emulator_shim.h`` is force-included (``-include``): it turns ``__global__`` and
   ``__device__`` into nothing, declares ``threadIdx``/``blockIdx``/``blockDim``/``gridDim`` as
   globals, and provides ``dim3``, the math functions, ``atomicAdd`` and ``printf``;
2. ``-Dscalar_t=float`` or ``-Dscalar_t=double`` picks the variant, exactly as for the GPU;
3. after the source comes a small ``extern "C"`` launcher per kernel, generated here from the
   kernel's signature (read by :mod:`minirnng.cuda.sources`)::

       extern "C" void minirnng_launch_relu_forward(unsigned grid_x, ..., unsigned block_z,
                                                    const scalar_t* x, scalar_t* y, int n) {
           gridDim = dim3(grid_x, grid_y, grid_z);  blockDim = dim3(block_x, block_y, block_z);
           for every block (z, y, x) and every thread (z, y, x) in it:
               blockIdx = ...;  threadIdx = ...;  relu_forward(x, y, n);
           fflush(stdout);
       }

Python calls the launcher through :mod:`ctypes` with the grid, the block, and the kernel's own
arguments: a pointer to each array's data, and each scalar as the C type the kernel declares
(``int`` -> int32, ``float`` -> float32, ``double`` -> float64): what CuPy passes to the GPU. The
loop over threads runs in C++, so a launch over a million elements takes milliseconds, not minutes.

The compiled library is cached on disk, under ``$MINIRNNG_CACHE_DIR/emulator`` (default
``~/.cache/minirnng/emulator``), named by a hash of everything that goes into it: the source, the
shim, the launchers, the compiler and its options. Editing a kernel therefore recompiles it on the
next run, and nothing else does. A process reads each source once: to use an edit in a process
that has already launched the kernel (a Jupyter session), call
:func:`minirnng.cuda.reload_kernels` first. Two processes compiling the same library at once (pytest -n 2)
each write their own temporary file and rename it into place, which is atomic: both end up loading
a complete library.

Normally you do not call this module yourself: :func:`minirnng.cuda.launch.get_kernel` returns a
kernel that runs here when it is given NumPy arrays (it checks the arguments first).

Seeing a kernel run: printf on a laptop
---------------------------------------
``printf`` works inside a kernel, here as on a GPU. To watch the gated scan step along a line:

1. In ``minirnng/kernels/gated_scan.cu``, in ``gated_scan_forward``, just after the line that
   writes ``h_image[c * HW + q]``, add::

       if (n == 0 && line.index == 0 && c == 0) printf("t=%d q=%d h=%f\\n", t, q, (double)h_image[q]);

   (``(double)`` because printf's ``%f`` expects a double; in the float variant a float would be
   promoted anyway, but being explicit works in both.)
2. Run any code that launches it on the emulator, for example::

       import numpy as np
       from minirnng import backend
       from minirnng.cuda import get_kernel, blocks_for, scan_geometry
       x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
       g = np.full_like(x, 0.5); W = np.eye(2, dtype=np.float32)[None]; b = np.zeros((1, 2), np.float32)
       h = np.empty((1,) + x.shape, np.float32)
       kernel = get_kernel("gated_scan", "gated_scan_forward", np.float32)
       with backend.use("cuda-emulator"):
           kernel((blocks_for(1 * 4), 1), (256,), (x, g, W, b, scan_geometry(["left_to_right"], 3, 4), h,
                  np.int32(1), np.int32(1), np.int32(2), np.int32(12)))

   The source changed, so the emulator recompiles it (about a second) and the lines appear, in
   thread order, when the kernel ends. (In a process that launched the kernel before the edit,
   call ``minirnng.cuda.reload_kernels()`` first.) In Jupyter they appear in the notebook (ipykernel forwards
   the process's own standard output).
3. Remove the printf when done: it is compiled into the GPU kernel too.

Thread order
------------
A GPU runs the threads of a launch in no order it promises, and the emulator one after another: by
default the first block's first thread first, as above. A kernel whose result depends on that
order (a thread that reads what another writes in the same launch) is wrong on a GPU, yet could
pass here. ``MINIRNNG_EMULATOR_ORDER=reverse`` (or :func:`thread_order` in code) runs the blocks,
and the threads in each, last first: every kernel must give the same bits either way, and the tests
run the kernels both ways.

If the kernel writes outside an array, the emulator may crash the Python process (a segmentation
fault) where a GPU would report an illegal address. ``python -X faulthandler`` prints where; for a
debugger, set ``MINIRNNG_EMULATOR_CXXFLAGS="-O0 -g"`` and run Python under ``gdb``.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import numpy

from ..backend import BackendError
from . import sources

SHIM_PATH = pathlib.Path(__file__).resolve().parent / "emulator_shim.h"
# -ffp-contract=off: g++ fuses a * b + c wherever the target has FMA (aarch64, -march=native), which
# would make the emulator's last bits depend on the machine; the docs promise two roundings
_BASE_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off")


class EmulatorError(BackendError):
    """The emulator cannot compile or load a kernel; the message says why and how to fix it (a
    BackendError: the command line reports it in one line, as it does a missing GPU)."""


ORDERS = ("forward", "reverse")


def _order_from_environment():
    order = os.environ.get("MINIRNNG_EMULATOR_ORDER", "forward")
    if order not in ORDERS:
        raise EmulatorError(f"MINIRNNG_EMULATOR_ORDER must be one of {', '.join(ORDERS)}, got {order!r}")
    return order


_order = None  # the order of the threads of a launch; None: not read from the environment yet


@contextlib.contextmanager
def thread_order(order):
    """Run the emulated launches inside the block in ``order``: ``"forward"`` (the default) or
    ``"reverse"`` (see "Thread order" above)."""
    global _order
    if order not in ORDERS:
        raise ValueError(f"thread_order: the order must be one of {', '.join(ORDERS)}, got {order!r}")
    saved, _order = _order, order
    try:
        yield
    finally:
        _order = saved


def current_thread_order():
    """``"forward"`` or ``"reverse"``: :func:`thread_order`'s, else ``$MINIRNNG_EMULATOR_ORDER``'s."""
    global _order
    if _order is None:
        _order = _order_from_environment()
    return _order


def cache_directory():
    """Where compiled kernels are kept: ``$MINIRNNG_CACHE_DIR/emulator``, else
    ``$XDG_CACHE_HOME/minirnng/emulator``, else ``~/.cache/minirnng/emulator``."""
    root = os.environ.get("MINIRNNG_CACHE_DIR")
    if not root:
        root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "minirnng"
    return pathlib.Path(root) / "emulator"


def compiler():
    """The C++ compiler: ``$CXX`` if set, else the first of g++, clang++, c++ on the PATH."""
    requested = os.environ.get("CXX")
    candidates = [requested] if requested else ["g++", "clang++", "c++"]
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    raise EmulatorError(
        f"the CUDA emulator needs a C++ compiler, and {' / '.join(candidates)} "
        f"{'is' if requested else 'are'} not on the PATH. Install one (Debian/Ubuntu: apt-get install g++; "
        "Fedora: dnf install gcc-c++; macOS: xcode-select --install) or set CXX to its path. "
        "Or run without the emulator: MINIRNNG_BACKEND=numpy.")


@functools.lru_cache(maxsize=None)
def _compiler_identity(path):
    """The compiler's first line of ``--version``, so that a compiler upgrade means a new cache key."""
    result = subprocess.run([path, "--version"], capture_output=True, text=True)
    return result.stdout.splitlines()[0] if result.stdout else path


def launcher_source(source_name):
    """The C++ text appended to a kernel source: one ``extern "C"`` launch loop per kernel."""
    pieces = []
    for kernel in sources.kernels(source_name).values():
        declarations = ", ".join(parameter.declaration for parameter in kernel.parameters)
        names = ", ".join(parameter.name for parameter in kernel.parameters)
        pieces.append(f"""
extern "C" void minirnng_launch_{kernel.name}(
        int reverse,
        unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
        unsigned int block_x, unsigned int block_y, unsigned int block_z,
        {declarations}) {{
    gridDim = dim3(grid_x, grid_y, grid_z);
    blockDim = dim3(block_x, block_y, block_z);
    for (unsigned int bz = 0; bz < grid_z; ++bz)
    for (unsigned int by = 0; by < grid_y; ++by)
    for (unsigned int bx = 0; bx < grid_x; ++bx) {{
        blockIdx = reverse ? dim3(grid_x - 1 - bx, grid_y - 1 - by, grid_z - 1 - bz) : dim3(bx, by, bz);
        for (unsigned int tz = 0; tz < block_z; ++tz)
        for (unsigned int ty = 0; ty < block_y; ++ty)
        for (unsigned int tx = 0; tx < block_x; ++tx) {{
            threadIdx = reverse ? dim3(block_x - 1 - tx, block_y - 1 - ty, block_z - 1 - tz) : dim3(tx, ty, tz);
            {kernel.name}({names});
        }}
    }}
    fflush(stdout);  // like a GPU's printf buffer, flushed when the kernel is done
}}
""")
    return "".join(pieces)


def _library_path(source_name, dtype):
    """Compile ``<source_name>.cu`` for ``dtype`` unless the cache has it; return the library's path."""
    cxx = compiler()
    flags = [*_BASE_FLAGS, *os.environ.get("MINIRNNG_EMULATOR_CXXFLAGS", "").split(),
             f"-Dscalar_t={sources.SCALAR_T[dtype]}"]
    source = sources.read_source(source_name)
    launchers = launcher_source(source_name)
    shim = SHIM_PATH.read_text()
    key = hashlib.sha256("\0".join([_compiler_identity(cxx), cxx, *flags, shim, source, launchers])
                         .encode()).hexdigest()[:20]
    directory = cache_directory()
    library = directory / f"{source_name}-{sources.SCALAR_T[dtype]}-{key}.so"
    if library.exists():
        return library

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EmulatorError(f"cannot create the emulator's cache directory {directory} ({error}); "
                            "set MINIRNNG_CACHE_DIR to a writable directory") from None
    # The #line directive makes the compiler's messages point at the .cu file and its line numbers.
    translation_unit = (f"{sources.line_directive(1, sources.source_path(source_name))}\n{source}\n"
                        f'#line 1 "<launchers generated by minirnng.cuda.emulator>"\n{launchers}')
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        cpp = pathlib.Path(scratch) / f"{source_name}.cpp"
        cpp.write_text(translation_unit)
        built = pathlib.Path(scratch) / library.name
        command = [cxx, *flags, "-include", str(SHIM_PATH), str(cpp), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorError(f"the CUDA emulator could not compile {source_name}.cu for "
                                f"{numpy.dtype(dtype).name}:\n$ {' '.join(command)}\n{result.stderr}")
        os.replace(built, library)  # atomic: another process sees either no library or a whole one
    return library


_CTYPES = {"int": ctypes.c_int32, "float": ctypes.c_float, "double": ctypes.c_double}
_PYTHON = {"int": int, "float": float, "double": float}
_lock = threading.Lock()


class EmulatedKernel:
    """One kernel of a library compiled for the CPU, called like ``cupy.RawKernel``: ``kernel(grid, block, args)``.

    It trusts its arguments (NumPy arrays of the right dtype, C-contiguous; scalars of the right
    type): :class:`minirnng.cuda.launch.Kernel` checks them before calling it.
    """

    def __init__(self, library, kernel, dtype):
        self.name = kernel.name
        self.parameters = kernel.parameters
        self.dtype = numpy.dtype(dtype)
        self._function = getattr(library, f"minirnng_launch_{kernel.name}")
        # Per parameter: None for a pointer, else the C type of the scalar ("scalar_t" resolved).
        self._kinds = [None if p.pointer else (sources.SCALAR_T[self.dtype] if p.ctype == "scalar_t" else p.ctype)
                       for p in kernel.parameters]
        self._function.argtypes = [ctypes.c_int] + [ctypes.c_uint] * 6 + [
            ctypes.c_void_p if kind is None else _CTYPES[kind] for kind in self._kinds]
        self._function.restype = None

    def __call__(self, grid, block, args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        converted = []
        for kind, value in zip(self._kinds, args):
            if kind is None:  # a pointer: the array's data address, or NULL for None
                converted.append(None if value is None else value.ctypes.data)
            else:
                converted.append(_PYTHON[kind](value))
        self._function(int(current_thread_order() == "reverse"), *grid, *block, *converted)

    def __repr__(self):
        return f"<EmulatedKernel {self.name} ({self.dtype.name})>"


@functools.lru_cache(maxsize=None)
def _library(source_name, dtype):
    with _lock:  # one compile per library even when several Python threads ask at once
        return ctypes.CDLL(str(_library_path(source_name, dtype)))


@functools.lru_cache(maxsize=None)
def get_function(source_name, kernel_name, dtype):
    """The emulated kernel ``kernel_name`` of ``<source_name>.cu`` for ``dtype`` (compiled on first use)."""
    dtype = numpy.dtype(dtype)
    return EmulatedKernel(_library(source_name, dtype), sources.kernels(source_name)[kernel_name], dtype)
