"""What every minirnng model shares: named layers, parameter dicts, input checks, predict, save/load.

A model is a set of named layers wired by its own ``forward`` and ``backward``:

``params()`` / ``grads()``
    Dicts from ``"<layer>.<parameter>"`` (``conv1.weight``, ``rnn.left_to_right.W``, ...) to the
    layers' live arrays: PyTorch's ``state_dict`` names and layouts.
``forward(images) -> dict``
    Named outputs; stage-1 models give ``logits`` (N, K, H, W), ``coarse`` (N, K, H/2, W/2) and
    ``edge`` (N, 1, H/2, W/2).
``backward(grads) -> dimages``
    ``grads`` has the keys of ``forward``'s dict (a missing key is a zero gradient); fills
    ``grads()`` (accumulating, like the layers) and returns the gradient of the images.
``infer(images) -> logits``
    ``forward(images)["logits"]`` for inference only (nothing kept for ``backward``); models
    override it where they can skip work, with the same numbers.
``predict(images) -> labels``
    Integer labels (N, H, W), the arg-max of ``infer``'s logits.
"""

import numpy

from .. import backend
from ..layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU
from ..layers.base import check_dtype, check_positive_int
from ..subnormals import flush_subnormals


def infer_chain(layers, order, a):
    """Run the named ``layers`` in ``order`` on activations ``a`` for inference only: the same
    numbers as their ``forward`` calls, with work, copies and launches saved where the layers
    around allow. Nothing is kept for a backward pass.

    A convolution followed by a ReLU applies it as it writes its output (:meth:`Conv2d.infer`):
    on the NumPy path while copying the output out of its columns' grid, on the kernel path in
    the direct kernel, saving the ReLU's launch. On the kernel path a ReLU that comes after a max
    pooling is fused the same way into the convolution before the pooling (pooling commutes with
    the ReLU: ``max(relu(a), relu(b)) = relu(max(a, b))``); on the NumPy path it stays after
    the pooling, in place on a quarter of the pixels, and the convolution may hand the pooling a
    strided view of its grid instead of a copy. Poolings skip recording each window's winner on
    the NumPy path (:meth:`MaxPool2d.pooled`, 2.4x faster).
    """
    on_kernels = backend.uses_kernels(a)
    relu_done = False  # the next ReLU was applied by the convolution before it
    for position, name in enumerate(order):
        layer = layers[name]
        if isinstance(layer, Conv2d):
            following = position + 1
            while on_kernels and following < len(order) and isinstance(layers[order[following]], MaxPool2d):
                following += 1
            relu_done = following < len(order) and isinstance(layers[order[following]], ReLU)
            a = layer.infer(a, relu=relu_done)
        elif isinstance(layer, MaxPool2d):
            a = layer.pooled(a)
        elif isinstance(layer, BatchNorm2d):
            a = layer.infer(a)  # by the running statistics
        elif isinstance(layer, ReLU):
            if not relu_done:
                # on the NumPy path, in place: a is the fresh output of the layer before
                if on_kernels:
                    a = layer.forward(a)
                    layer.clear_cache()
                else:
                    numpy.maximum(a, 0, out=a)
            relu_done = False
        else:
            a = layer.forward(a)
            layer.clear_cache()
    return a


class Model:
    """Base class; subclasses fill ``self.layers`` (name -> layer) in their constructor."""

    #: the name checkpoints record; subclasses override
    architecture = None
    #: the outputs ``forward`` returns
    output_names = ("logits",)
    #: whether the layers' caches hold the last ``forward``'s values: set by ``forward``, cleared
    #: by ``infer`` (and ``predict``), which run some of the same layers and overwrite them
    forward_cached = False

    def __init__(self, n_classes, dtype=numpy.float32):
        self.n_classes = check_positive_int(n_classes, type(self).__name__, "n_classes", minimum=2)
        self.dtype = check_dtype(dtype, type(self).__name__)
        self.layers = {}
        self.classes = None  # class names, set by whoever trains or loads the model

    # -- parameters -------------------------------------------------------------------------
    def params(self):
        return {f"{layer_name}.{name}": value
                for layer_name, layer in self.layers.items() for name, value in layer.params.items()}

    def on_device(self, array):
        """``array`` on the device of this model's parameters (:func:`~minirnng.backend.to_device_of`):
        where its inputs and labels must be, whatever the backend in force."""
        return backend.to_device_of(array, next(iter(self.params().values())))

    def grads(self):
        return {f"{layer_name}.{name}": value
                for layer_name, layer in self.layers.items() for name, value in layer.grads.items()}

    def zero_grad(self):
        for layer in self.layers.values():
            layer.zero_grad()

    def replica(self):
        """A new model of the same architecture and settings, with layers (and caches) of its own
        and parameters to be copied in (:class:`minirnng.parallel.DataParallel` runs one per
        worker thread). Models with settings that ``config()`` leaves out extend it. The copy's
        parameters are on the model's device, not necessarily the current backend's."""
        with backend.use(backend.matching(next(iter(self.params().values())))):
            copy = type(self)(**self.config(), rng=0, dtype=self.dtype)
        copy.classes = self.classes
        return copy

    def parameter_count(self):
        return int(sum(value.size for value in self.params().values()))

    def config(self):
        """The constructor arguments that rebuild this architecture (stored in checkpoints)."""
        return {"n_classes": self.n_classes}

    def constrain(self, rule="rescale"):
        """Re-impose parameter constraints after an optimizer step (the recurrent models override;
        ``rule`` names one of ``minirnng.layers.recurrent.STABILITY_RULES``)."""

    def recurrent_weight_names(self):
        """The names in ``params()`` of the recurrent weights that :meth:`constrain` keeps in bounds (none here)."""
        return []

    # -- input checks -------------------------------------------------------------------------
    def check_images(self, images):
        """Validate ``images`` (N, 3, H, W) with H, W multiples of 4; a copy in the model's dtype.

        Always a copy: the first layer keeps its input for ``backward``, and a caller that refills
        its batch buffer between ``forward`` and ``backward`` must not change the gradients."""
        owner = type(self).__name__
        if not (isinstance(images, numpy.ndarray) or backend.is_cupy_array(images)):
            raise TypeError(f"{owner}: images must be an array (N, 3, H, W), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{owner}: images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"{owner}: a batch of 0 images, shape {tuple(images.shape)}; give at least one")
        height, width = images.shape[2:]
        if height % 4 or width % 4 or height == 0 or width == 0:
            raise ValueError(f"{owner}: image height and width must be positive multiples of 4, got {height}x{width}; "
                             "resize or pad the images (minirnng.data.pipeline does both)")
        if images.dtype.kind != "f":
            raise TypeError(f"{owner}: images must be floating point (normalised), got dtype {images.dtype}; "
                            "use minirnng.data.pipeline.normalize on uint8 images")
        reference = next(iter(self.params().values()))
        if backend.is_cupy_array(images) != backend.is_cupy_array(reference):
            raise ValueError(f"{owner}: images are on the wrong device for this model's parameters; "
                             "move them with model.on_device(images)")
        return images.astype(self.dtype, copy=True)

    def check_forward_cached(self):
        """For ``backward``: a clear error instead of gradients of the wrong pass."""
        if not self.forward_cached:
            raise RuntimeError(f"{type(self).__name__}.backward: there is no forward pass to differentiate; "
                               "call forward first, with no infer or predict in between (they overwrite what "
                               "forward kept for backward)")

    def upstream(self, grads, name, shape):
        """``grads[name]`` checked against the ``shape`` of the output it belongs to, or None when absent."""
        owner = f"{type(self).__name__}.backward"
        if not isinstance(grads, dict):
            raise TypeError(f"{owner}: the gradients are a dict from output name to array, got {type(grads).__name__}")
        unknown = sorted(set(grads) - set(self.output_names))
        if unknown:
            raise ValueError(f"{type(self).__name__}.backward: unknown output names {unknown}; "
                             f"the outputs are {list(self.output_names)}")
        grad = grads.get(name)
        if grad is None:
            return None
        if not (isinstance(grad, numpy.ndarray) or backend.is_cupy_array(grad)):
            raise TypeError(f"{owner}: the gradient of {name!r} must be an array, got {type(grad).__name__}")
        if grad.dtype not in (numpy.float32, numpy.float64):  # an integer or complex one would be cast
            raise TypeError(f"{owner}: the gradient of {name!r} must be float32 or float64, got {grad.dtype}")
        if tuple(grad.shape) != tuple(shape):
            raise ValueError(f"{type(self).__name__}.backward: gradient of {name!r} must have shape "
                             f"{tuple(shape)}, got {tuple(grad.shape)}")
        return grad.astype(self.dtype, copy=False)

    # -- inference ----------------------------------------------------------------------------
    def infer(self, images):
        """The logits (N, K, H, W) for inference only; no ``backward`` may follow."""
        logits = self.forward(images)["logits"]
        self.clear_caches()
        return logits

    def clear_caches(self):
        """After an inference pass: drop every layer's cache (no ``backward`` may follow, and the
        activations they hold would otherwise stay in memory until the next pass)."""
        self.forward_cached = False
        for layer in self.layers.values():
            layer.clear_cache()
        if getattr(self, "intermediates", None):
            self.intermediates = {}  # the maps of the last forward, for figures: those of another pass now

    def predict(self, images):
        """Integer labels (N, H, W) (int64): the arg-max over classes of the logits."""
        return self.infer(images).argmax(axis=1)

    def __call__(self, images):
        return self.forward(images)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path, **metadata):
        """Write the parameters and a JSON header to ``path`` (.npz), atomically; see :mod:`.checkpoint`."""
        from .checkpoint import save_model
        return save_model(self, path, **metadata)

    @classmethod
    def load(cls, path, dtype=numpy.float32):
        """The model saved at ``path`` (a clear error if it holds another architecture)."""
        from .checkpoint import load_model
        return load_model(path, dtype=dtype, expect=cls.architecture)

    def load_params(self, arrays, source="parameters"):
        """Copy named arrays into the live parameters, every one checked first (all or nothing).
        Subnormal values become zero (:mod:`minirnng.subnormals`: they would slow every pass down)."""
        own = self.params()
        for name, value in self.checked_params(arrays, source).items():
            own[name][...] = value
            flush_subnormals(own[name])

    def checked_params(self, arrays, source="parameters"):
        """``arrays`` checked against the parameters (names, real-number dtypes, shapes) and cast to
        their dtype and device, ready to copy; a clear error naming ``source`` otherwise (a finite
        value that the cast would make infinite too). Nothing is copied here, so that a loader can
        check several models before it changes any."""
        own = self.params()
        missing = sorted(set(own) - set(arrays))
        unexpected = sorted(set(arrays) - set(own))
        if missing or unexpected:
            held = "the parameters" if source == "parameters" else f"the parameters of {source}"
            raise ValueError(f"{held} do not fit {type(self).__name__}: missing {missing or 'nothing'}, "
                             f"unexpected {unexpected or 'nothing'}")
        xp = backend.get_array_module(next(iter(own.values())))
        converted = {}
        for name, value in arrays.items():
            if not (isinstance(value, numpy.ndarray) or backend.is_cupy_array(value)):
                raise TypeError(f"{source}: {name} is a {type(value).__name__}, not an array")
            if value.dtype.kind not in "fiu":  # a cast would drop imaginary parts or fail on strings
                raise TypeError(f"{source}: {name} has dtype {value.dtype}, not real numbers")
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, "
                                 f"{type(self).__name__} expects {tuple(own[name].shape)}")
            with numpy.errstate(over="ignore"):  # an overflow is named just below
                converted[name] = xp.asarray(value, dtype=own[name].dtype)
            if value.dtype.kind == "f" and value.dtype.itemsize > converted[name].dtype.itemsize:
                # float64 weights beyond float32's range would load as infinities: finite values
                # that the cast made infinite are named (NaN or infinity given stay what they were)
                source_xp = backend.get_array_module(value)
                finite = source_xp.isfinite(value)
                overflowed = int(finite.sum()) - int(xp.isfinite(converted[name]).sum())
                if overflowed:
                    largest = float(source_xp.abs(value[finite]).max())
                    raise ValueError(f"{source}: {name} holds {overflowed} value(s) beyond the range of "
                                     f"{converted[name].dtype} (largest magnitude {largest:.3g}), "
                                     "which would load as infinity")
        return converted

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"
