"""Gradient checking by centred finite differences: the oracle every backward is tested against.

For a function ``y = f(u, v, ...)`` with a hand-written backward, pick a random upstream gradient
``r`` (the same shape as ``y``; random so that errors cannot cancel out as they can with all ones)
and the scalar ``L = sum(r * y)``. The backward, given ``r``, must return ``dL/du``. Centred
differences estimate each entry independently:

    dL/du[i]  ~  (L(u + eps e_i) - L(u - eps e_i)) / (2 eps),      error O(eps^2)

and the two are compared by the relative error

    max_i |a_i - n_i|  /  max(max_i (|a_i| + |n_i|), tiny)

which is near 1e-10 for a correct float64 backward, far above the tolerance for a wrong one (1/3
for a factor of 2, 1 for a sign error; an error ``m`` in one entry scores ``m`` over the largest
``|a_i| + |n_i|``), and needs no tolerance per array. Checks run in float64: in float32 the
rounding error of ``L`` divided by ``eps`` swamps the truncation error (see notebook 01).

A check perturbs each entry twice, so large arrays are checked in *sparse mode*: ``max_entries``
entries drawn at random per array.

A check that compares nothing fails rather than passes. ``backward`` must return one gradient per
input, none of them None, each of its array's shape (else :func:`check` raises). A row whose
analytic and numeric gradients are both exactly zero on every checked entry is marked ``ZERO`` and
fails: it would pass whatever the backward did (a direction of a four-way merge that wins no
output, say). Where a zero gradient is the right answer (a convolution's bias before a batch
normalisation), the caller names the array in ``expect_zero``; its row then measures
``max_i (|a_i| + |n_i|)`` against the largest of the other rows, so rounding noise passes and a
gradient that is not zero fails. A report with no rows fails too.
"""

import math
import numbers
from dataclasses import dataclass, field

import numpy

from . import backend

TINY = 1e-30
DEFAULT_TOLERANCE = 1e-6


def relative_error(analytic, numeric):
    """``max|a - n| / max(max(|a| + |n|), tiny)`` of two arrays of the same shape (a float)."""
    analytic = numpy.asarray(backend.to_numpy(analytic), dtype=numpy.float64)
    numeric = numpy.asarray(backend.to_numpy(numeric), dtype=numpy.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"relative_error: shapes differ, {analytic.shape} and {numeric.shape}")
    if analytic.size == 0:
        return 0.0
    scale = float(numpy.max(numpy.abs(analytic) + numpy.abs(numeric)))
    return float(numpy.max(numpy.abs(analytic - numeric))) / max(scale, TINY)


@dataclass
class GradcheckRow:
    """One compared array: its name, relative error, and how many of its entries were perturbed.

    ``zero``: analytic and numeric gradients were both exactly zero on every checked entry (the row
    compared nothing). ``expected_zero``: the caller declared the gradient zero (``expect_zero``);
    ``error`` is then the row's largest ``|a_i| + |n_i|`` over that of the other rows.
    """
    name: str
    error: float
    checked: int
    total: int
    zero: bool = False
    expected_zero: bool = False

    @property
    def vacuous(self):
        """Both sides zero where a non-zero gradient was expected: a check of nothing."""
        return self.zero and not self.expected_zero

    def passed(self, tolerance=DEFAULT_TOLERANCE):
        return not self.vacuous and not math.isnan(self.error) and self.error <= tolerance

    def verdict(self, tolerance=DEFAULT_TOLERANCE):
        if self.vacuous:
            return "ZERO"
        if not self.passed(tolerance):
            return "FAIL"
        return "ok (zero expected)" if self.expected_zero else "ok"


@dataclass
class GradcheckReport:
    """The table of one check: a row per input and parameter."""
    title: str
    rows: list = field(default_factory=list)

    @property
    def max_error(self):
        """The largest relative error; infinite when any is NaN (a NaN gradient fails the check,
        whereas ``max`` would skip a NaN that is not first), when a row is vacuous (both sides zero,
        not declared), and when there are no rows: a check that compared nothing has not passed."""
        if not self.rows or any(row.vacuous or math.isnan(row.error) for row in self.rows):
            return math.inf
        return max(row.error for row in self.rows)

    def passed(self, tolerance=DEFAULT_TOLERANCE):
        return bool(self.rows) and all(row.passed(tolerance) for row in self.rows)

    def format(self, tolerance=DEFAULT_TOLERANCE):
        lines = [self.title]
        for row in self.rows:
            lines.append(f"  {row.name:<28} rel. error {row.error:9.2e}   "
                         f"{row.checked:>6}/{row.total:<7} entries  {row.verdict(tolerance)}")
        if not self.rows:
            lines.append("  FAIL: no gradient was compared")
        if any(row.vacuous for row in self.rows):
            lines.append("  ZERO: analytic and numeric gradients are both 0 on every checked entry: "
                         "the row compares nothing and fails")
        return "\n".join(lines)

    def __str__(self):
        return self.format()


def sample_indices(size, max_entries, rng):
    """Flat indices to perturb: all of them, or ``max_entries`` drawn without replacement."""
    if max_entries is None or size <= max_entries:
        return numpy.arange(size)
    return numpy.sort(rng.choice(size, size=max_entries, replace=False))


def numerical_gradient(objective, array, indices, eps=1e-6):
    """Centred differences of the scalar ``objective()`` with respect to ``array.flat[indices]``.

    ``array`` is perturbed in place and restored; it must be a float64 array that ``objective``
    reads (NumPy, or CuPy for checks on the GPU). Returns a float64 vector of ``len(indices)`` values.
    """
    if not array.flags.c_contiguous:
        raise ValueError("numerical_gradient: the array must be C-contiguous so it can be perturbed in place")
    flat = array.reshape(-1)
    estimates = numpy.empty(len(indices), dtype=numpy.float64)
    for position, index in enumerate(indices):
        index = int(index)
        original = float(flat[index])
        flat[index] = original + eps
        plus = objective()
        flat[index] = original - eps
        minus = objective()
        flat[index] = original
        estimates[position] = (plus - minus) / (2 * eps)
    return estimates


def _as_outputs(output):
    """A dict view of a layer's or model's output: arrays by name."""
    if isinstance(output, dict):
        return output
    if isinstance(output, tuple):
        return {f"output{k}": value for k, value in enumerate(output)}
    return {"output": output}


def _restore_structure(output, upstream):
    if isinstance(output, dict):
        return upstream
    if isinstance(output, tuple):
        return tuple(upstream[f"output{k}"] for k in range(len(output)))
    return upstream["output"]


def check(title, forward, backward, inputs, params=None, grads=None, rng=0, eps=1e-6,
          max_entries=None, zero_grad=None, expect_zero=()):
    """Compare a hand-written backward with centred finite differences.

    Parameters
    ----------
    forward : callable ``forward(*inputs) -> array | tuple | dict | float``.
    backward : callable ``backward(upstream) -> grad | tuple of grads``; ``upstream`` has the
        structure of the output (a float for a scalar output).
    inputs : dict name -> float64 array, in the order ``forward`` takes them. Arrays named in
        ``params`` are perturbed in place too.
    params, grads : dicts name -> live float64 arrays, as a layer's ``params`` / ``grads``. A
        parameter without a gradient (batch normalisation's running statistics, which are
        measured, not trained) is not checked.
    rng : seed or Generator for the upstream gradient and the sampled entries.
    max_entries : check at most this many entries of each array (sparse mode); None checks all.
    zero_grad : called before ``backward`` so that accumulated gradients start from zero.
    expect_zero : names of inputs or parameters whose gradient is known to be zero. Any other row
        whose two sides are both exactly zero fails (``ZERO``).

    Raises ValueError if ``backward`` returns None, a number of gradients other than the number
    of inputs, or None for one of them (an input without a gradient would go unchecked), or if a
    gradient's shape is not its array's.
    """
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"gradcheck: eps must be a positive step, got {eps!r}")
    if max_entries is not None and (isinstance(max_entries, (bool, numpy.bool_)) or
                                    not (isinstance(max_entries, (int, numpy.integer)) and max_entries >= 1)):
        raise ValueError(f"gradcheck: max_entries must be None (every entry) or at least 1, got {max_entries!r}")
    rng = numpy.random.default_rng(rng)
    grads = grads or {}
    params = {name: value for name, value in (params or {}).items() if name in grads}
    expect_zero = {expect_zero} if isinstance(expect_zero, str) else set(expect_zero)
    unknown = sorted(expect_zero - set(inputs) - set(params))
    if unknown:
        raise ValueError(f"gradcheck: expect_zero names {unknown}, which are neither inputs nor parameters with "
                         f"a gradient ({sorted(set(inputs) | set(params))})")
    arrays = list(inputs.values())
    for name, array in list(inputs.items()) + list(params.items()):
        if array.dtype != numpy.float64:
            raise TypeError(f"gradcheck: {name} has dtype {array.dtype}; finite differences need float64")

    output = forward(*arrays)
    xp = backend.get_array_module(*arrays)
    if numpy.isscalar(output):
        # a number (a loss); a 0-d array is an array output like any other, with an array upstream
        upstream = float(rng.uniform(0.5, 1.5)) * rng.choice([-1.0, 1.0])

        def objective():
            return float(forward(*arrays)) * upstream
    else:
        outputs = _as_outputs(output)
        upstream_by_name = {name: xp.asarray(rng.standard_normal(value.shape)) for name, value in outputs.items()}
        upstream = _restore_structure(output, upstream_by_name)

        def objective():
            current = _as_outputs(forward(*arrays))
            return sum(float((current[name] * upstream_by_name[name]).sum()) for name in upstream_by_name)

    forward(*arrays)  # refresh the cache for backward
    if zero_grad is not None:
        zero_grad()
    # backward gets its own copy: one that changed it in place would change the finite differences'
    # upstream too, and agree with them; compared afterwards, so that such a backward fails
    given = upstream if isinstance(upstream, float) else _restore_structure(
        output, {name: value.copy() for name, value in upstream_by_name.items()})
    input_grads = backward(given)
    if not isinstance(upstream, float):
        given_by_name = _as_outputs(given)
        changed = [name for name, value in upstream_by_name.items() if not bool((given_by_name[name] == value).all())]
        if changed:
            raise ValueError(f"gradcheck: backward changed its upstream gradient in place ({', '.join(changed)}); "
                             "it must leave grad_output as it was")
    if input_grads is None:
        raise ValueError(f"gradcheck: backward returned None; it must return the gradient of each input "
                         f"({', '.join(inputs)})")
    if not isinstance(input_grads, (tuple, list)):
        input_grads = (input_grads,)
    if len(input_grads) != len(inputs):
        raise ValueError(f"gradcheck: backward returned {len(input_grads)} gradients for {len(inputs)} inputs "
                         f"({', '.join(inputs)})")
    missing = [name for name, grad in zip(inputs, input_grads) if grad is None]
    if missing:
        raise ValueError(f"gradcheck: backward returned None for the gradient of {', '.join(missing)}")
    analytic = {name: backend.to_numpy(grad).copy() for name, grad in zip(inputs, input_grads)}
    for name in params:
        analytic[name] = backend.to_numpy(grads[name]).copy()

    targets = dict(inputs)
    targets.update(params)
    for name, array in targets.items():
        if tuple(analytic[name].shape) != tuple(array.shape):
            raise ValueError(f"gradcheck: the gradient of {name} has shape {tuple(analytic[name].shape)}, "
                             f"{name} has {tuple(array.shape)}")
    compared = {}
    for name, array in targets.items():
        indices = sample_indices(array.size, max_entries, rng)
        numeric = numerical_gradient(objective, array, indices, eps)
        picked = numpy.asarray(analytic[name], dtype=numpy.float64).reshape(-1)[indices]
        compared[name] = picked, numeric, len(indices)
    # the scale an expected-zero row is measured against: the largest |a| + |n| of the other rows
    scale = max((float(numpy.max(numpy.abs(a) + numpy.abs(n), initial=0.0))
                 for name, (a, n, _) in compared.items() if name not in expect_zero), default=0.0)
    report = GradcheckReport(title)
    for name, (picked, numeric, checked) in compared.items():
        zero = not (numpy.any(picked) or numpy.any(numeric))
        if name in expect_zero:
            error = float(numpy.max(numpy.abs(picked) + numpy.abs(numeric), initial=0.0)) / max(scale, TINY)
        else:
            error = relative_error(picked, numeric)
        report.rows.append(GradcheckRow(name, error, checked, targets[name].size, zero=zero,
                                        expected_zero=name in expect_zero))
    return report


def check_layer(layer, *inputs, rng=0, eps=1e-6, max_entries=None, title=None, expect_zero=()):
    """Finite-difference check of a layer's ``backward`` for every input and parameter.

    ``inputs`` are float64 arrays; the layer must have been built with ``dtype=numpy.float64``.
    Returns a :class:`GradcheckReport`.
    """
    names = ["x"] if len(inputs) == 1 else [f"input{k}" for k in range(len(inputs))]
    if hasattr(layer, "input_names") and len(layer.input_names) == len(inputs):
        names = list(layer.input_names)
    # the check runs forward twice per entry: a layer that measures as it goes (batch
    # normalisation's running statistics) gets its own values back, and its cache is the
    # unperturbed inputs' again, as after one forward
    kept = {name: value.copy() for name, value in layer.params.items()}
    try:
        report = check(title or repr(layer), layer.forward, layer.backward, dict(zip(names, inputs)),
                       params=layer.params, grads=layer.grads, rng=rng, eps=eps,
                       max_entries=max_entries, zero_grad=layer.zero_grad, expect_zero=expect_zero)
        layer.forward(*inputs)
        return report
    finally:
        for name, value in kept.items():
            layer.params[name][...] = value


def check_loss(loss, logits, target, mask=None, rng=0, eps=1e-6, max_entries=None, title=None):
    """Finite-difference check of a loss: ``dloss/dlogits`` times a random scalar upstream."""
    return check(title or repr(loss), lambda z: loss.forward(z, target, mask), loss.backward,
                 {"logits": logits}, rng=rng, eps=eps, max_entries=max_entries)


def check_model(model, images, rng=0, eps=1e-6, max_entries=12, title=None, expect_zero=()):
    """Finite-difference check of a whole model (the model interface: a dict of outputs) in sparse
    mode: the images and every named parameter, ``max_entries`` entries each. As in
    :func:`check_layer`, what the forward passes measure (batch normalisation's running
    statistics) is put back afterwards: checking a model leaves it as it was."""
    kept = {name: value.copy() for name, value in model.params().items()}
    try:
        return check(title or type(model).__name__, model.forward, model.backward, {"images": images},
                     params=model.params(), grads=model.grads(), rng=rng, eps=eps, max_entries=max_entries,
                     zero_grad=model.zero_grad, expect_zero=expect_zero)
    finally:
        for name, value in model.params().items():
            value[...] = kept[name]
