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
``predict(images) -> labels``
    Integer labels (N, H, W), the arg-max of the logits.
"""

import numpy

from .. import backend
from ..layers.base import check_dtype


class Model:
    """Base class; subclasses fill ``self.layers`` (name -> layer) in their constructor."""

    #: the name checkpoints record; subclasses override
    architecture = None
    #: the outputs ``forward`` returns
    output_names = ("logits",)

    def __init__(self, n_classes, dtype=numpy.float32):
        self.n_classes = int(n_classes)
        if self.n_classes < 2:
            raise ValueError(f"{type(self).__name__}: n_classes must be at least 2, got {n_classes}")
        self.dtype = check_dtype(dtype, type(self).__name__)
        self.layers = {}
        self.classes = None  # class names, set by whoever trains or loads the model

    # -- parameters -------------------------------------------------------------------------
    def params(self):
        return {f"{layer_name}.{name}": value
                for layer_name, layer in self.layers.items() for name, value in layer.params.items()}

    def grads(self):
        return {f"{layer_name}.{name}": value
                for layer_name, layer in self.layers.items() for name, value in layer.grads.items()}

    def zero_grad(self):
        for layer in self.layers.values():
            layer.zero_grad()

    def parameter_count(self):
        return int(sum(value.size for value in self.params().values()))

    def config(self):
        """The constructor arguments that rebuild this architecture (stored in checkpoints)."""
        return {"n_classes": self.n_classes}

    def constrain(self):
        """Re-impose parameter constraints after an optimizer step (the recurrent models override)."""

    # -- input checks -------------------------------------------------------------------------
    def check_images(self, images):
        """Validate ``images`` (N, 3, H, W) with H, W multiples of 4; cast floats to the model's dtype."""
        owner = type(self).__name__
        if not (isinstance(images, numpy.ndarray) or backend.is_cupy_array(images)):
            raise TypeError(f"{owner}: images must be an array (N, 3, H, W), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{owner}: images must have shape (N, 3, H, W), got {tuple(images.shape)}")
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
                             "move them with minirnng.backend.to_device")
        return images.astype(self.dtype, copy=False)

    def upstream(self, grads, name, shape):
        """``grads[name]`` checked against the ``shape`` of the output it belongs to, or None when absent."""
        unknown = sorted(set(grads) - set(self.output_names))
        if unknown:
            raise ValueError(f"{type(self).__name__}.backward: unknown output names {unknown}; "
                             f"the outputs are {list(self.output_names)}")
        grad = grads.get(name)
        if grad is None:
            return None
        if tuple(grad.shape) != tuple(shape):
            raise ValueError(f"{type(self).__name__}.backward: gradient of {name!r} must have shape "
                             f"{tuple(shape)}, got {tuple(grad.shape)}")
        return grad.astype(self.dtype, copy=False)

    # -- inference ----------------------------------------------------------------------------
    def predict(self, images):
        """Integer labels (N, H, W) (int64): the arg-max over classes of the logits."""
        return self.forward(images)["logits"].argmax(axis=1)

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
        """Copy named arrays into the live parameters, checking names and shapes first (all or nothing)."""
        own = self.params()
        missing = sorted(set(own) - set(arrays))
        unexpected = sorted(set(arrays) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source} do not fit {type(self).__name__}: missing {missing or 'nothing'}, "
                             f"unexpected {unexpected or 'nothing'}")
        for name, value in arrays.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, "
                                 f"{type(self).__name__} expects {tuple(own[name].shape)}")
        xp = backend.get_array_module(next(iter(own.values())))
        for name, value in arrays.items():
            own[name][...] = xp.asarray(value, dtype=own[name].dtype)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"
