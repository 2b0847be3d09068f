"""Optimizers and learning-rate schedules, on a model's ``params()`` / ``grads()`` dicts.

Both optimizers update the live parameter arrays in place, so the model sees the new values
without any copying:

SGD with momentum (PyTorch's form)::

    g = grad + weight_decay * p          (weight decay as an L2 term, not on the biases)
    v = momentum * v + g
    p = p - lr * (g + momentum * v  if nesterov else  v)

Adam (Kingma and Ba 2015, PyTorch's form)::

    g = grad + weight_decay * p
    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) g^2
    p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

AdamW (Loshchilov and Hutter 2019, PyTorch's form): Adam on the plain gradient, and the weight
decay applied to the weights directly instead of through the gradient::

    p = p - lr * weight_decay * p        (first, not on the biases)
    then Adam's update with g = grad

The two differ because Adam divides the gradient by its running scale: with the L2 term a weight
whose gradient is large is hardly decayed at all, with AdamW every weight shrinks by the same
fraction ``lr * weight_decay`` a step. So AdamW's ``weight_decay`` is on another scale than the
L2 term's (PyTorch's default is 1e-2).

Weight decay applies to every parameter but the biases (``*.bias``, ``*.b``, :func:`decays`): the
convolution weights, and also the recurrent ``W`` and the batch-norm scales (``bnK.weight``), which
some recipes exempt; the shipped parser's run decayed both, so the recipe keeps them decayed.
``lr_scales`` multiplies the learning rate of named parameters (training uses it for the recurrent
weights, ``TrainConfig.recurrent_lr_scale``).
After every update the parameter's subnormal entries are set to zero
(:mod:`minirnng.subnormals` says why: weight decay makes them, and they slow inference down).
Optimizer state round-trips through ``state_arrays()`` / ``load_state_arrays()`` so training can
resume exactly where it stopped.
"""

import math
import numbers

import numpy

from . import backend
from .subnormals import flush_subnormals


def checked_number(value, owner, what, low=None, high=None, low_open=False, high_open=False):
    """``value`` as a float if it is a finite real number within [low, high] (an end excluded where
    ``low_open`` / ``high_open``); a clear error naming ``what`` otherwise."""
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {what} must be a finite number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}")
        raise ValueError(f"{owner}: {what} must be in {interval}, got {value}")
    return value


def decays(name):
    """Whether weight decay applies to the parameter called ``name``: every name but the biases'
    (``*.bias``, ``*.b``), so the recurrent ``W`` and the batch-norm scales ``bnK.weight`` are decayed."""
    return not (name.endswith(".bias") or name.endswith(".b"))


class Optimizer:
    """Common bookkeeping: the parameter and gradient dicts, the learning rate, the step count."""

    BUFFERS = ()  # the kinds of state kept per parameter, as the prefixes of state's keys ("m/conv1.weight")

    def __init__(self, params, grads, lr, weight_decay=0.0, lr_scales=None):
        if set(params) != set(grads):
            raise ValueError("optimizer: params and grads must have the same names")
        for name, value in params.items():
            if tuple(value.shape) != tuple(grads[name].shape):
                raise ValueError(f"optimizer: the gradient of {name!r} has shape {tuple(grads[name].shape)}, "
                                 f"the parameter {tuple(value.shape)}")
        owner = type(self).__name__
        lr = checked_number(lr, owner, "the learning rate", low=0, low_open=True)
        weight_decay = checked_number(weight_decay, owner, "weight_decay", low=0)
        self.lr_scales = {name: float(scale) for name, scale in (lr_scales or {}).items()}
        for name, scale in self.lr_scales.items():
            if name not in params:
                raise ValueError(f"optimizer: lr_scales names {name!r}, which is not a parameter")
            if not scale > 0:
                raise ValueError(f"optimizer: the lr scale of {name!r} must be positive, got {scale}")
        self.params, self.grads = params, grads
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.steps = 0
        self.state = {}  # name of a buffer -> array, e.g. "m/conv1.weight"

    def buffer(self, kind, name):
        key = f"{kind}/{name}"
        if key not in self.state:
            self.state[key] = backend.get_array_module(self.params[name]).zeros_like(self.params[name])
        return self.state[key]

    def decayed_gradient(self, name):
        grad = self.grads[name]
        if self.weight_decay and decays(name):
            return grad + self.weight_decay * self.params[name]
        return grad

    def step(self):
        self.steps += 1
        for name in self.params:
            self.update(name, self.lr * self.lr_scales.get(name, 1.0))
            flush_subnormals(self.params[name])

    def state_arrays(self):
        """The optimizer's state as name -> array (plus the step count), for a checkpoint."""
        arrays = dict(self.state)
        arrays["steps"] = numpy.array(self.steps, dtype=numpy.int64)
        return arrays

    def kept_buffers(self):
        """The kinds of :attr:`BUFFERS` that every step updates for every parameter."""
        return self.BUFFERS

    def load_state_arrays(self, arrays):
        """Restore a :meth:`state_arrays`. After a first step, every buffer of every parameter must be
        there and finite: a state with some missing would go on from zeros, quietly unlike the run
        that wrote it."""
        arrays = dict(arrays)
        if "steps" not in arrays:
            raise ValueError("optimizer state without its step count ('steps'): not a state of this optimizer")
        steps = arrays.pop("steps")
        if steps.shape != () or steps.dtype.kind not in "iu" or int(steps) < 0:
            raise ValueError(f"optimizer state's step count must be a non-negative integer, got {steps!r}")
        for key, value in arrays.items():
            kind, _, name = key.partition("/")
            if self.BUFFERS and kind not in self.BUFFERS:  # (an optimizer written elsewhere may declare none)
                raise ValueError(f"optimizer state {key!r} is not one of {type(self).__name__}'s buffers "
                                 f"({', '.join(self.BUFFERS)})")
            if name not in self.params or tuple(value.shape) != tuple(self.params[name].shape):
                raise ValueError(f"optimizer state {key!r} does not fit the model's parameters")
            if value.dtype.kind != "f" or not bool(backend.get_array_module(value).isfinite(value).all()):
                raise ValueError(f"optimizer state {key!r} holds NaN, infinite or non-float values")
        missing = [f"{kind}/{name}" for kind in self.kept_buffers() for name in self.params
                   if f"{kind}/{name}" not in arrays]
        if int(steps) > 0 and missing:
            raise ValueError(f"optimizer state after {int(steps)} steps lacks {len(missing)} of its buffers "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        self.steps = int(steps)
        for key, value in arrays.items():
            kind, _, name = key.partition("/")
            self.buffer(kind, name)[...] = backend.get_array_module(self.params[name]).asarray(value)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (and optional Nesterov momentum)."""

    BUFFERS = ("v",)  # the velocity

    def kept_buffers(self):
        return self.BUFFERS if self.momentum else ()

    def __init__(self, params, grads, lr, momentum=0.9, weight_decay=0.0, nesterov=False, lr_scales=None):
        super().__init__(params, grads, lr, weight_decay, lr_scales)
        self.momentum = checked_number(momentum, "SGD", "momentum", low=0, high=1, high_open=True)
        self.nesterov = bool(nesterov)

    def update(self, name, lr):
        grad = self.decayed_gradient(name)
        if not self.momentum:
            self.params[name] -= lr * grad
            return
        velocity = self.buffer("v", name)
        velocity *= self.momentum
        velocity += grad
        direction = grad + self.momentum * velocity if self.nesterov else velocity
        self.params[name] -= lr * direction


class Adam(Optimizer):
    """Adam with bias correction."""

    BUFFERS = ("m", "v")  # the moving averages of the gradient and of its square

    def __init__(self, params, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lr_scales=None):
        super().__init__(params, grads, lr, weight_decay, lr_scales)
        owner = type(self).__name__
        try:
            pair = tuple(betas)
        except TypeError:
            pair = ()
        if len(pair) != 2:
            raise ValueError(f"{owner}: betas must be two numbers, got {betas!r}")
        self.beta1, self.beta2 = (checked_number(beta, owner, f"betas[{index}]", low=0, high=1, high_open=True)
                                  for index, beta in enumerate(pair))
        # eps keeps the step finite where a gradient has always been 0 (v = 0 there)
        self.eps = checked_number(eps, owner, "eps", low=0, low_open=True)

    def update(self, name, lr):
        grad = self.decayed_gradient(name)
        m, v = self.buffer("m", name), self.buffer("v", name)
        m *= self.beta1
        m += (1 - self.beta1) * grad
        v *= self.beta2
        v += (1 - self.beta2) * grad * grad
        step_size = lr * math.sqrt(1 - self.beta2 ** self.steps) / (1 - self.beta1 ** self.steps)
        # eps scaled as in PyTorch: added to sqrt(v / (1 - b2^t)), not to sqrt(v)
        self.params[name] -= step_size * m / (backend.get_array_module(v).sqrt(v) +
                                              self.eps * math.sqrt(1 - self.beta2 ** self.steps))


class AdamW(Adam):
    """Adam with decoupled weight decay: each weight shrinks by ``lr * weight_decay`` a step."""

    def decayed_gradient(self, name):
        return self.grads[name]

    def update(self, name, lr):
        if self.weight_decay and decays(name):
            self.params[name] *= 1 - lr * self.weight_decay
        super().update(name, lr)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
SCHEDULES = ("constant", "cosine", "step")


def learning_rate(schedule, base_lr, progress, warmup=0.0, final_fraction=0.01):
    """The learning rate at ``progress`` in [0, 1] of the run.

    constant : ``base_lr``.
    cosine   : from ``base_lr`` down along half a cosine towards ``final_fraction * base_lr``, which it
               reaches at progress 1, just after a run's last step.
    step     : ``base_lr``, divided by 10 at 60% and again at 85% of the run.
    A linear warm-up over the first ``warmup`` fraction of the run applies to all three: the rate
    is multiplied by ``(progress + 1e-3) / (warmup + 1e-3)``, which rises in a straight line to
    exactly 1 where the warm-up ends (the 1e-3 keeps the first step from being zero).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    progress = float(progress)  # a NumPy scalar's comparisons are numpy.bool_, whose + is "or", not a count
    if not progress >= 0:  # NaN too; past 1 the cosine stays at its end
        raise ValueError(f"learning_rate: progress must be a fraction of the run, at least 0, got {progress}")
    if schedule == "constant":
        rate = base_lr
    elif schedule == "cosine":
        rate = base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    else:
        rate = base_lr * (0.1 ** ((progress >= 0.6) + (progress >= 0.85)))
    if warmup > 0 and progress < warmup:
        rate *= (progress + 1e-3) / (warmup + 1e-3)
    return rate
