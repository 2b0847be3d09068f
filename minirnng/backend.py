"""Where arrays live and which code path a layer takes.

minirnng runs the same layers on three backends:

``numpy``
    Arrays are :class:`numpy.ndarray`; every layer runs its vectorized NumPy path
    (``forward_cpu`` / ``backward_cpu``). Always available.
``cupy``
    Arrays are :class:`cupy.ndarray` on a CUDA GPU; every layer runs its raw CUDA
    kernels (``forward_gpu`` / ``backward_gpu``). Needs CuPy, a usable GPU and NVRTC.
``cuda-emulator``
    Arrays are NumPy arrays, but every layer runs its *GPU* code path: the same Python
    launch code and the same kernel sources, compiled for the CPU by the system C++
    compiler (see :mod:`minirnng.cuda.emulator`). For testing kernels without a GPU.

The choice is made once and cached: ``MINIRNNG_BACKEND=numpy|cupy|cuda-emulator`` forces it,
otherwise CuPy is used when it is usable and NumPy when it is not. :func:`select` changes it for
the rest of the process (the notebooks, which compute on NumPy arrays, begin with
``select("numpy")``); :func:`use` switches inside a block (tests and notebooks compare the paths
inside one process).

Importing this module never imports CuPy; CuPy is imported only when it is asked about.
"""

import contextlib
import functools
import os

import numpy

BACKENDS = ("numpy", "cupy", "cuda-emulator")
ENVIRONMENT_VARIABLE = "MINIRNNG_BACKEND"


class BackendError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and how to fix it."""


@functools.lru_cache(maxsize=None)
def cupy_status():
    """Return ``(usable, reason)``: whether CuPy can run kernels here and, if not, why.

    Usable means: ``import cupy`` works, ``cupy.is_available()`` sees a GPU, the NVRTC runtime
    compiler can be loaded (our kernels are compiled at run time), and so can cuBLAS (the matrix
    products of the convolutions' and the recurrence's weight gradients). Cached.
    """
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA install raising anything
        return False, (f"CuPy cannot be imported ({type(error).__name__}: {error}); "
                       "install the GPU extra from a checkout: pip install -e '.[gpu]'")
    try:
        if not cupy.is_available():
            return False, "CuPy is installed but sees no usable CUDA GPU (cupy.is_available() is False)"
    except Exception as error:
        return False, f"CuPy could not query the GPU ({type(error).__name__}: {error})"
    def load_nvrtc():
        from cupy.cuda import nvrtc
        nvrtc.getVersion()  # the bindings import without the library; a call loads it

    def load_cublas():
        # a handle, as the first matrix product asks for one: CuPy finds the library however it was
        # installed (a CUDA toolkit, or the [ctk] wheels, which only its own loader knows where to find)
        cupy.cuda.device.get_cublas_handle()

    for library, load in (("the NVRTC runtime compiler", load_nvrtc), ("cuBLAS", load_cublas)):
        try:
            load()
        except Exception as error:
            return False, (f"{library} cannot be loaded ({type(error).__name__}: {error}); install the CUDA "
                           f"libraries with CuPy 14 or later: pip install -U '{_cupy_distribution()}[ctk]>=14'")
    return True, "CuPy, a GPU, NVRTC and cuBLAS are usable"


def _cupy_distribution():
    """The name of the installed CuPy wheel (``cupy-cuda12x``, ``cupy-cuda13x``, ...), whose ``[ctk]``
    extra brings the CUDA libraries of its CUDA version; ``cupy-cuda12x`` if none is found."""
    from importlib import metadata
    for distribution in metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if name.startswith("cupy-cuda"):
            return name
    return "cupy-cuda12x"


@functools.lru_cache(maxsize=None)
def default_backend():
    """The backend chosen for this process: ``$MINIRNNG_BACKEND`` if set, else cupy if usable, else numpy."""
    requested = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if requested:
        return _validated(requested, source=f"{ENVIRONMENT_VARIABLE}={requested!r}")
    usable, _ = cupy_status()
    return "cupy" if usable else "numpy"


def _validated(name, source):
    if name not in BACKENDS:
        raise BackendError(f"{source}: unknown backend; expected one of {', '.join(BACKENDS)}")
    if name == "cupy":
        usable, reason = cupy_status()
        if not usable:
            raise BackendError(f"{source} asks for the GPU, but {reason}. "
                               f"Use {ENVIRONMENT_VARIABLE}=numpy (or cuda-emulator to test kernels on the CPU).")
    return name


_override_stack = []  # the blocks of use() as (name, token), the latest opened last
_selected = None  # select()'s choice; None: the default


def current():
    """Name of the backend in force: the innermost :func:`use`, else :func:`select`'s choice, else
    :func:`default_backend`."""
    if _override_stack:
        return _override_stack[-1][0]
    return _selected or default_backend()


def select(name):
    """Make ``name`` the backend for the rest of this process, as ``MINIRNNG_BACKEND`` would have;
    ``select(None)`` goes back to the default. For a notebook's first cell: a notebook that computes
    on NumPy arrays says ``select("numpy")`` and runs the same on a machine with a GPU. :func:`use`
    still switches inside a block. Returns the backend now in force."""
    global _selected
    _selected = None if name is None else _validated(name, source=f"backend.select({name!r})")
    return current()


@contextlib.contextmanager
def use(name):
    """Run a block on another backend, e.g. ``with backend.use("cuda-emulator"): layer.forward(x)``.

    The choice holds for the whole process, not one thread: the worker threads of
    :class:`minirnng.parallel.DataParallel` compute on the backend of the block that started them.
    Blocks that end out of order (two threads' blocks that overlap, a generator suspended inside
    one) each take away their own choice, not the latest one."""
    entry = (_validated(name, source=f"backend.use({name!r})"), object())
    _override_stack.append(entry)
    try:
        yield name
    finally:
        for position in range(len(_override_stack) - 1, -1, -1):
            if _override_stack[position] is entry:
                del _override_stack[position]
                break


def describe():
    """Where the current backend computes, in words for a log line: ``"CPU (NumPy)"``,
    ``"GPU (NVIDIA H200, CuPy 14.2.0)"`` or ``"CPU (the CUDA emulator)"``."""
    name = current()
    if name == "numpy":
        return "CPU (NumPy)"
    if name == "cuda-emulator":
        return "CPU (the CUDA emulator)"
    import cupy
    try:
        card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        card = card.decode() if isinstance(card, bytes) else str(card)
    except Exception:  # the name is decoration; never fail a run over it
        card = f"device {cupy.cuda.Device().id}"
    return f"GPU ({card}, CuPy {cupy.__version__})"


_IS_CUPY_TYPE = {}  # type -> whether it comes from the cupy package (asked for every array of every layer call)


def is_cupy_array(array):
    """True for a :class:`cupy.ndarray`, decided without importing CuPy."""
    kind = type(array)
    known = _IS_CUPY_TYPE.get(kind)
    if known is None:
        known = _IS_CUPY_TYPE[kind] = kind.__module__.split(".")[0] == "cupy"
    return known


def get_array_module(*arrays):
    """The array module of the arguments: ``cupy`` if any is a CuPy array, else ``numpy`` (the ``xp`` idiom)."""
    for array in arrays:
        if is_cupy_array(array):
            import cupy
            return cupy
    return numpy


def to_numpy(array):
    """A NumPy copy (from the GPU) or view (already on the host) of ``array``."""
    if is_cupy_array(array):
        return array.get()
    return numpy.asarray(array)


def to_device(array, dtype=None):
    """``array`` on the current backend's device (a CuPy array on ``cupy``, NumPy otherwise)."""
    if current() == "cupy":
        import cupy
        return cupy.asarray(array, dtype=dtype)
    return numpy.asarray(to_numpy(array), dtype=dtype)


def to_device_of(array, like):
    """``array`` where ``like`` lives: on ``like``'s GPU for a CuPy ``like``, else as a NumPy array
    (the host's, which the emulator's kernels use too). A model's inputs go where its parameters
    are, which need not be the backend in force: a model built in a ``use("cupy")`` block and used
    after it, say."""
    if is_cupy_array(like):
        import cupy
        with like.device:
            return cupy.asarray(array)
    return to_numpy(array)


def matching(array):
    """The backend whose new arrays live where ``array`` lives: ``cupy`` for a CuPy array; for a
    NumPy array the current backend, or ``numpy`` where that is ``cupy``. A copy of a model built
    under ``use(matching(parameter))`` has its parameters on the model's device, whatever the
    backend in force (a model built on the host on a machine whose default is the GPU, say)."""
    if is_cupy_array(array):
        return "cupy"
    name = current()
    return "numpy" if name == "cupy" else name


def uses_kernels(array):
    """Whether a layer given ``array`` takes the kernel (GPU) path rather than the NumPy path.

    CuPy arrays always do. NumPy arrays do when the current backend is ``cuda-emulator``.
    """
    return is_cupy_array(array) or current() == "cuda-emulator"
