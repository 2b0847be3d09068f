"""The layer protocol every minirnng layer follows, and the input checks they share.

A layer is an object with

``forward(*inputs) -> output``
    Computes the output and keeps in ``self.cache`` only what ``backward`` needs.
``backward(grad_output) -> grad_input`` (a tuple when the layer has several inputs)
    Uses the cache of the last ``forward``; *adds* the parameter gradients into ``grads``
    (as PyTorch accumulates into ``.grad``; call :meth:`Layer.zero_grad` between steps).
    The cache stays until the next ``forward``, so ``backward`` may run again on the same pass:
    it returns the same input gradient and adds the parameter gradients once more (as a second
    ``backward(retain_graph=True)`` in PyTorch).
    It never modifies ``grad_output``. The cache may hold the forward's inputs and its output
    themselves, not copies (as CS231n's layers do, and on either path): an array passed to or
    returned by ``forward`` must not be changed before ``backward``, or the gradients change too.
    The models copy their images before the first layer keeps them.
``clear_cache()``
    Drops the cache; the models call it after an inference pass, which no backward may follow.
``params`` and ``grads``
    Dicts from parameter names to the live arrays: ``layer.params["weight"][...] = w``
    changes the layer, and an optimizer updates them in place.

Each concrete layer implements ``forward_cpu`` / ``backward_cpu`` (vectorized NumPy) and,
where the GPU path exists, ``forward_gpu`` / ``backward_gpu`` (raw CUDA kernels launched on
CuPy or on the CUDA emulator). ``forward`` and ``backward`` validate and dispatch, Chainer-style,
with :func:`minirnng.backend.uses_kernels`.
"""

import numpy

from .. import backend
from ..cuda.launch import contiguous

SUPPORTED_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


#: Where a NumPy pass sweeps an array several times (pooling: once per window offset), it runs on
#: chunks of the batch of about this many bytes, so that every sweep after the first reads from
#: the cache instead of main memory (1 MB: the L2 cache of one core of the benchmark machine).
#: Measured on RNN-G's pool2 (16 x 16 x 128 x 128 float32): forward 8 -> 4 ms, backward 5 -> 3.3 ms.
CHUNK_BYTES = 1 << 20


def batch_chunks(batch_size, bytes_per_image, chunk_bytes=None):
    """Slices that cut a batch of ``batch_size`` images into chunks of about ``chunk_bytes``
    (:data:`CHUNK_BYTES` by default), at least one image each; one chunk if ``bytes_per_image`` is 0."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    step = max(1, chunk_bytes // bytes_per_image if bytes_per_image else batch_size)
    return [slice(start, min(start + step, batch_size)) for start in range(0, max(batch_size, 1), step)]


def check_dtype(dtype, owner):
    """Return ``dtype`` as a :class:`numpy.dtype` if it is float32 or float64, else raise ``TypeError``."""
    try:
        dtype = numpy.dtype(dtype)
    except TypeError:
        raise TypeError(f"{owner}: dtype {dtype!r} is not a NumPy dtype; use numpy.float32 or numpy.float64") from None
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{owner}: unsupported dtype {dtype}; use numpy.float32 or numpy.float64")
    return dtype


def check_positive_int(value, owner, what, minimum=1):
    """``value`` as an int if it is an integer >= minimum, else a clear ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)):
        raise TypeError(f"{owner}: {what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {what} must be >= {minimum}, got {value}")
    return int(value)


def check_number(value, owner, what):
    """``value`` as a float if it is a real number (a Python or NumPy number, a 0-d array, a
    ``Fraction`` or a ``Decimal``; not text, a bool or None), else a ``TypeError`` naming
    ``owner`` and ``what``; whether its value fits is the caller's check."""
    if value is None or isinstance(value, (str, bytes, bool, numpy.bool_, complex, numpy.complexfloating)) or (
            isinstance(value, numpy.ndarray) and (value.ndim or value.dtype.kind not in "iuf")):
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}") from None


def random_generator(rng, owner):
    """``numpy.random.default_rng(rng)`` (None, a non-negative integer seed, a SeedSequence or a
    Generator, which is returned as it is), with an error that names ``owner``'s ``rng``."""
    try:
        return numpy.random.default_rng(rng)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{owner}: rng must be None, a non-negative integer seed or a numpy Generator, "
                          f"got {rng!r}") from None


def uniform_fan_in(rng, shape, fan_in):
    """PyTorch's default initialisation: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as float64 on the host."""
    bound = 1.0 / numpy.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def check_array(array, owner, what="input", ndim=None, dtype=None, channels=None, like=None):
    """Validate one array argument and raise a clear error naming ``owner`` if it is wrong.

    ``ndim``: the rank expected; ``dtype``: the dtype expected (float32/float64 are accepted if
    None); ``channels``: the size expected on axis 1; ``like``: an array that must live on the
    same device (NumPy versus CuPy).
    """
    if not (isinstance(array, numpy.ndarray) or backend.is_cupy_array(array)):
        raise TypeError(f"{owner}: {what} must be a NumPy or CuPy array, got {type(array).__name__}")
    if like is not None and backend.is_cupy_array(array) != backend.is_cupy_array(like):
        where = "the GPU (CuPy)" if backend.is_cupy_array(like) else "the host (NumPy)"
        raise ValueError(f"{owner}: {what} is on the wrong device; the layer's parameters are on {where}. "
                         "Move it with minirnng.backend.to_device / to_numpy.")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{owner}: {what} must have {ndim} dimensions, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{owner}: {what} is empty, shape {tuple(array.shape)}; a batch needs at least one "
                         "image of at least one pixel")
    if dtype is not None:
        if array.dtype != dtype:
            if what == "grad_output":  # it must match the forward's output, whatever the layer's own dtype
                raise TypeError(f"{owner}: grad_output has dtype {array.dtype}, but the forward pass's output was "
                                f"{numpy.dtype(dtype)}; cast grad_output to {numpy.dtype(dtype)}")
            remedy = (f"cast the input or build the layer with dtype=numpy.{array.dtype}"
                      if array.dtype in SUPPORTED_DTYPES else f"cast the input to {numpy.dtype(dtype)}")
            raise TypeError(f"{owner}: {what} has dtype {array.dtype}, but the layer works in {numpy.dtype(dtype)}; "
                            f"{remedy}")
    elif array.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{owner}: {what} has unsupported dtype {array.dtype}; use float32 or float64")
    if channels is not None and array.shape[1] != channels:
        raise ValueError(f"{owner}: {what} must have {channels} channels on axis 1, "
                         f"got shape {tuple(array.shape)}")
    return array


def check_same_path(forward_on_kernels, grad_output, owner):
    """Refuse a backward pass on another code path than its forward pass.

    The two paths keep different caches (the NumPy path's ReLU keeps a mask, the kernels' keep
    the output), so mixing them would not fail but silently compute nonsense; this happens when a
    forward runs inside ``backend.use("cuda-emulator")`` and its backward outside, or when
    ``grad_output`` is a NumPy array for a forward that ran on CuPy arrays.
    """
    if backend.uses_kernels(grad_output) != forward_on_kernels:
        ran, asked = ("the kernel (GPU) path", "the NumPy path") if forward_on_kernels else \
                     ("the NumPy path", "the kernel (GPU) path")
        raise ValueError(f"{owner}: the forward pass ran on {ran} but this backward pass would run on {asked} "
                         f"(backend {backend.current()!r}, grad_output a "
                         f"{'CuPy' if backend.is_cupy_array(grad_output) else 'NumPy'} array); run both passes "
                         "under the same backend, with grad_output on the forward's device "
                         "(minirnng.backend.to_device / to_numpy)")


def check_same_shape(array, reference, owner, what, reference_name):
    if tuple(array.shape) != tuple(reference.shape):
        raise ValueError(f"{owner}: {what} must have the shape of {reference_name} {tuple(reference.shape)}, "
                         f"got {tuple(array.shape)}")


def routed_gradient(upstream, mask, out=None):
    """``upstream`` where ``mask`` holds and 0 elsewhere: the gradient of a ReLU or a maximum,
    which passes each upstream value to the input that produced the output and nothing to the rest.

    upstream : float array; mask : bool array of the same shape; out : optional float array of
    that shape (it may be ``upstream`` itself) -> the routed gradient (``out`` when given).

    Computed as ``upstream * mask``, one pass, which is exact for finite values but gives NaN for
    ``inf * 0`` and ``NaN * 0``: where the product holds a NaN (found by one reduction, since only
    a non-finite upstream value makes one), the entries outside the mask are set to 0 afterwards,
    so that the result is the selection that the naive layers and the kernels make.
    """
    with numpy.errstate(invalid="ignore"):  # inf * 0, set right below
        routed = numpy.multiply(upstream, mask, out=out)
    if routed.size and numpy.isnan(routed.max()):
        routed = numpy.asarray(routed)  # the product of 0-d arrays is a scalar; out stays itself
        numpy.copyto(routed, 0, where=~numpy.asarray(mask))
    return routed


class Layer:
    """Base class: parameter bookkeeping, the backward guard, and the CPU/GPU dispatch."""

    #: Set to False where nothing upstream needs the input gradient (a network's first layer while
    #: training): layers that can skip computing it then return None from ``backward``.
    needs_input_grad = True

    def __init__(self, dtype=numpy.float32):
        self.dtype = check_dtype(dtype, type(self).__name__)
        self.params = {}
        self.grads = {}
        self.cache = None

    # -- parameters -------------------------------------------------------------------------
    def add_param(self, name, value):
        """Register a parameter (moved to the current backend's device) and its zero gradient."""
        array = backend.to_device(value, dtype=self.dtype)
        self.params[name] = array
        self.grads[name] = backend.get_array_module(array).zeros_like(array)
        return array

    def zero_grad(self):
        for grad in self.grads.values():
            grad[...] = 0

    def accumulate_grad(self, name, value):
        self.grads[name] += value

    def clear_cache(self):
        """Drop what the last forward kept for backward: after an inference pass, which no backward
        may follow, so that its activations are not held until the next pass."""
        self.cache = None

    # -- calling ----------------------------------------------------------------------------
    def __call__(self, *inputs):
        return self.forward(*inputs)

    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def dispatch(self, stage, *arrays):
        """Call ``<stage>_gpu`` when ``arrays[0]`` takes the kernel path, else ``<stage>_cpu``.

        ``stage`` is ``"forward"`` or ``"backward"``. The kernel path is taken for CuPy arrays
        and, on the ``cuda-emulator`` backend, for NumPy arrays too. The kernels index raw
        buffers, so on that path every array is first made C-contiguous (a copy only where it
        is not): ``*_gpu`` methods may rely on it.
        """
        return self._dispatch(stage, backend.uses_kernels(arrays[0]), arrays)

    def _dispatch(self, stage, on_kernels, arrays):
        if on_kernels:
            arrays = tuple(contiguous(array) for array in arrays)
        implementation = getattr(self, f"{stage}_gpu" if on_kernels else f"{stage}_cpu", None)
        if implementation is None:
            raise NotImplementedError(f"{type(self).__name__} has no {stage}_{'gpu' if on_kernels else 'cpu'} "
                                      "implementation")
        return implementation(*arrays)

    def run_forward(self, *arrays):
        """Dispatch the forward pass, keep its cache, remember the output's shape, return the output."""
        on_kernels = backend.uses_kernels(arrays[0])
        output, self.cache = self._dispatch("forward", on_kernels, arrays)
        self.output_shape_seen = tuple(output.shape)
        self.output_dtype_seen = output.dtype
        self.cache_on_kernels = on_kernels  # the path whose cache this is: backward must take it too
        return output

    def run_backward(self, grad_output):
        """Check ``grad_output`` against the last forward's output, then dispatch the backward pass."""
        owner = type(self).__name__
        if self.cache is None:
            raise RuntimeError(f"{owner}.backward called before forward")
        check_array(grad_output, owner, "grad_output", dtype=self.output_dtype_seen, like=self.reference_array())
        if tuple(grad_output.shape) != self.output_shape_seen:
            raise ValueError(f"{owner}: grad_output must have the output's shape {self.output_shape_seen}, "
                             f"got {tuple(grad_output.shape)}")
        check_same_path(self.cache_on_kernels, grad_output, owner)
        return self._dispatch("backward", self.cache_on_kernels, (grad_output,))

    def reference_array(self):
        """An array that tells where this layer's parameters live (None for parameterless layers)."""
        return next(iter(self.params.values()), None)

    def __repr__(self):
        shapes = ", ".join(f"{name}={tuple(value.shape)}" for name, value in self.params.items())
        return f"{type(self).__name__}({shapes})"
