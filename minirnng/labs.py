"""The checks students call from the course labs in ``notebooks/labs/``, and the grader.

A lab asks for a pair of functions per layer, with one convention throughout::

    forward(inputs..., hyper-parameters...) -> (output, cache)
    backward(grad_output, cache)            -> gradient(s)

and a lab cell calls the check for that pair, e.g. ``labs.check_conv2d_backward(conv2d_forward,
conv2d_backward)``. A check runs the student's functions on small float64 problems and compares

1. the output and every gradient with minirnng's own layers (the reference), entry by entry, by
   the relative error of :func:`minirnng.gradcheck.relative_error` (tolerance ``1e-7``; a correct
   float64 answer is near ``1e-15``);
2. the gradients with centred finite differences of the student's *own* forward (tolerance
   ``1e-6``; near ``1e-10`` when right), so that a wrong backward is caught even where the reference
   would not say why.

When something is wrong the check raises :class:`LabCheckError` with a message that says which
output or gradient is wrong, its relative error, how many entries are off and where the worst
ones are, and, when it recognises the mistake, a hint: each check knows the usual slips of its
layer (a transposed ``W``, the gate of the wrong step, a forgotten ``1/N``, the padding, ...) and
computes what each of them would give; if the student's answer matches one, the message names it.
A function that still raises ``NotImplementedError`` gets a one-line message, not a traceback.

Instructors grade a filled-in lab with ``python -m minirnng.labs grade <notebook.ipynb | .py> ...``
(see ``docs/instructors.md``): it runs the notebook's code cells, then every check of that lab,
and prints a score.
"""

import ast
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import re
import sys
import traceback
import warnings

import numpy

from . import backend
from .gradcheck import numerical_gradient, relative_error, sample_indices
from .layers import Conv2d, MaxPool2d, ReLU
from .layers.recurrent import GatedSpatialRNN, SpatialRNN, constrain_recurrent_weight
from .losses import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy

#: An answer passes when its relative error against the reference is at most this.
REFERENCE_TOLERANCE = 1e-7
#: A gradient passes when its relative error against finite differences is at most this.
FINITE_DIFFERENCE_TOLERANCE = 1e-6
#: A wrong answer "is" a known mistake when it matches that mistake's result this closely.
MISTAKE_MATCH = 1e-6
#: Entries checked by finite differences per array (each costs two calls of the forward).
FINITE_DIFFERENCE_ENTRIES = 30


class LabCheckError(AssertionError):
    """A lab check failed; the message says what is wrong and where to look."""

    def _render_traceback_(self):
        """What IPython (Jupyter) shows for this error: the message, without the frames of this module,
        which say nothing to a student. When the student's own code raised, its traceback comes first
        (from the student's function on), as Python prints a chained exception, to show the line."""
        lines = []
        cause = self.__cause__  # None for `raise ... from None` (not implemented yet, ...)
        if cause is not None:
            frames = cause.__traceback__
            if frames is not None and frames.tb_next is not None:
                frames = frames.tb_next  # the first frame is _call's `function(*args)`
            lines += "".join(traceback.format_exception(type(cause), cause, frames)).rstrip("\n").splitlines()
            lines += ["", "The above exception was the direct cause of the following exception:", ""]
        return lines + [f"{type(self).__name__}: {self}"]


class LabCannotRun(LabCheckError):
    """A check cannot run on this machine (lab 08 without a C++ compiler for the CUDA emulator):
    not the student's mistake, so the grader reports the check as not graded rather than failed."""


# ==============================================================================================
# Calling the student's code


def _name(function):
    return getattr(function, "__name__", repr(function))


def _call(function, *args, on="the check's input"):
    """``function(*args)``, turning NotImplementedError and other exceptions into clear messages."""
    name = _name(function)
    with warnings.catch_warnings(record=True) as caught, numpy.errstate(all="warn"):
        warnings.simplefilter("always")
        try:
            result = function(*args)
        except NotImplementedError as error:
            # the function that raised it: a helper of the student's that is still a stub, called by
            # the one checked (not a library function that raises it for its own reasons)
            innermost = error.__traceback__
            while innermost.tb_next is not None:
                innermost = innermost.tb_next
            stub = innermost.tb_frame.f_code.co_name
            students = getattr(function, "__globals__", {})
            called = f" (called by {name})" if stub != name and callable(students.get(stub)) else ""
            stub = stub if called else name
            raise LabCheckError(
                f"{stub} is not implemented yet{called}. Replace `raise NotImplementedError` in {stub} with "
                f"your code, run that cell again, then run this check.") from None
        except LabCheckError:
            raise
        except Exception as error:
            if _cannot_run_here(error):
                raise  # _on_kernels turns it into LabCannotRun: the machine's fault, not the student's
            raise LabCheckError(f"{name} raised {type(error).__name__} on {on}: {error}\n"
                                "(the traceback above shows the line)") from error
    _last_warnings[:] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return result


#: The RuntimeWarnings (overflow, invalid value, ...) of the last call of the student's code.
_last_warnings = []


def _cannot_run_here(error):
    """Whether ``error`` says that the CUDA emulator cannot run on this machine (no C++ compiler)."""
    from .cuda.emulator import EmulatorError
    return isinstance(error, EmulatorError)


def _copies(*arrays):
    return tuple(array.copy() for array in arrays)


def _call_forward(report, forward, inputs, *options, on="the check's input"):
    """``forward(*inputs.values(), *options)``, called on copies of the arrays of ``inputs`` (name ->
    array). If the forward changed one of them in place, ``report`` says so: the caller (the layer
    before) still needs its array, and finite differences perturb the inputs the forward reads, so
    a forward that overwrites them would make a right backward look wrong."""
    given = {name: array.copy() for name, array in inputs.items()}
    result = _call(forward, *given.values(), *options, on=on)
    changed = [f"`{name}`" for name in inputs
               if not numpy.array_equal(backend.to_numpy(given[name]), backend.to_numpy(inputs[name]))]
    if changed:
        inputs_text, them = (f"input {changed[0]}", "it") if len(changed) == 1 else \
            (f"inputs {', '.join(changed)}", "them")
        report.result_once(f"the inputs of {_name(forward)}",
                           f"your forward changed its {inputs_text} in place; the caller still needs {them}. "
                           "Work on a copy (`x = x.copy()`) or write the result into a new array.")
    return result


def _call_backward(report, backward, upstream, *rest, on="the check's input"):
    """``backward(upstream, *rest)``, called on a copy of the upstream gradient. If the backward
    changed it in place, ``report`` says so: in a network the same gradient may feed another
    branch (the four scans of the gated layer share one), and a check of it would see it changed."""
    given = upstream.copy()
    result = _call(backward, given, *rest, on=on)
    if not numpy.array_equal(backend.to_numpy(given), backend.to_numpy(upstream)):
        report.result_once(f"the upstream gradient of {_name(backward)}",
                           "your backward changed its upstream gradient in place; the layer above may "
                           "still need it. Write the result into a new array (`dx = dy.copy()`, "
                           "`numpy.zeros_like(dy)`) instead of changing `dy`.")
    return result


def _pair(result, name, what="(output, cache)"):
    """Unpack a forward's ``(output, cache)``, or say clearly that it returned something else."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise LabCheckError(f"{name} must return a pair {what}; it returned {_describe(result)}. "
                            "End it with `return output, cache`.")
    return result


def _parts(result, name, count, names):
    if count == 1:
        return (result,)
    if not isinstance(result, (tuple, list)) or len(result) != count:
        raise LabCheckError(f"{name} must return a tuple of {count} arrays ({', '.join(names)}); "
                            f"it returned {_describe(result)}")
    return tuple(result)


def _describe(value):
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}: (" + ", ".join(_describe(v) for v in value) + ")"
    if value is None:
        return "None"
    if hasattr(value, "shape"):
        return f"an array of shape {tuple(value.shape)}"
    return type(value).__name__


# ==============================================================================================
# Comparing one answer with the reference


@dataclasses.dataclass
class Quantity:
    """How to talk about one output or gradient: its name, the names of its axes, and which
    generic diagnoses make sense for it."""
    name: str
    axes: tuple = ()
    transposable: bool = False   # a weight whose first two axes could be swapped by mistake
    shape_hint: str = ""         # what to say when the shape is wrong


def _index_text(index, axes):
    if axes and len(axes) == len(index):
        return "[" + ", ".join(f"{a}={i}" for a, i in zip(axes, index)) + "]"
    return "[" + ", ".join(str(i) for i in index) + "]"


def _constant_factor(got, expected):
    """``c`` if ``got`` is ``c * expected`` for one constant c (not 1), else None."""
    scale = numpy.abs(expected).max(initial=0.0)
    if scale == 0:
        return None
    used = numpy.abs(expected) > 1e-3 * scale
    ratios = got[used] / expected[used]
    factor = float(numpy.median(ratios))
    if not numpy.isfinite(factor) or abs(factor) < 1e-12 or abs(factor - 1) < 1e-6:
        return None
    if relative_error(got, factor * expected) <= MISTAKE_MATCH:
        return factor
    return None


def _known_mistake(got, mistakes, expected=None):
    """The hint of the first known mistake that ``got`` matches, or ''. A mistake that gives the
    right answer on this input (sharing a tie where there is none) is no hint: it is skipped."""
    for candidate, message in mistakes:
        candidate = numpy.asarray(candidate, dtype=numpy.float64)
        if candidate.shape != got.shape or relative_error(got, candidate) > MISTAKE_MATCH:
            continue
        if expected is not None and relative_error(candidate, expected) <= MISTAKE_MATCH:
            continue
        return message
    return ""


def _diagnose(quantity, got, expected, mistakes):
    """The hint for a wrong answer: a known mistake it matches, else a generic pattern, else ''."""
    known = _known_mistake(got, mistakes, expected)
    if known:
        return known
    scale = float(numpy.abs(expected).max(initial=0.0))
    if numpy.abs(got).max(initial=0.0) <= 1e-12 * max(scale, 1e-300):
        return ("it is all zeros: is the array filled in, or did you return the one you allocated "
                "before filling it?")
    if relative_error(got, -expected) <= MISTAKE_MATCH:
        return "it has the wrong sign everywhere."
    # any two numbers are a constant multiple of each other: for a loss the factor says nothing
    factor = _constant_factor(got, expected) if got.ndim else None
    if factor is not None:
        return (f"it is {factor:.6g} times the right answer everywhere: a missing or extra constant "
                "(a 1/N of a mean, or the upstream gradient)?")
    if quantity.transposable and got.ndim >= 2 and got.shape[0] == got.shape[1]:
        if relative_error(got, numpy.swapaxes(expected, 0, 1)) <= MISTAKE_MATCH:
            return f"it is the right answer with its first two axes swapped: is {quantity.name} transposed?"
    return ""


def compare(quantity, got, expected, mistakes=(), patterns=(), tolerance=REFERENCE_TOLERANCE):
    """None if ``got`` matches ``expected``; else a message that says what is wrong and where.

    quantity : a :class:`Quantity`; got : the student's array; expected : the reference.
    mistakes : ``(array, hint)`` pairs, what a known slip would give and what to say if it matches.
    patterns : ``(predicate, hint)`` pairs; ``predicate(wrong)`` gets the boolean map of the wrong
        entries and says whether it shows a telling pattern (only the border, only the first step...).
    """
    expected = numpy.asarray(backend.to_numpy(expected), dtype=numpy.float64)
    # a Python float is a float64; a NumPy or CuPy value says its dtype
    dtype = numpy.dtype(getattr(got, "dtype", numpy.float64))
    if isinstance(got, (int, float)) or getattr(got, "ndim", None) == 0:
        got = numpy.asarray(float(got))
    if not hasattr(got, "shape"):
        return f"{quantity.name} is {_describe(got)}, not an array of shape {expected.shape}."
    got = numpy.asarray(backend.to_numpy(got), dtype=numpy.float64)
    if got.shape != expected.shape:
        hint = quantity.shape_hint or ""
        for candidate, message in mistakes:
            if numpy.shape(candidate) == got.shape and relative_error(got, numpy.asarray(candidate)) <= MISTAKE_MATCH:
                hint = message
                break
        return (f"{quantity.name} has shape {got.shape}, expected {expected.shape}."
                + (f" Hint: {hint}" if hint else ""))
    if dtype != numpy.float64:  # a known slip (a boolean mask returned as dx) says more than the dtype
        hint = _known_mistake(got, mistakes, expected) or _dtype_hint(dtype)
        return f"{quantity.name} has dtype {dtype}, expected float64.\nHint: {hint}"
    bad = ~numpy.isfinite(got)
    if bad.any():
        warned = f" NumPy warned: {'; '.join(sorted(set(_last_warnings)))}." if _last_warnings else ""
        if got.ndim == 0:
            where = f"{quantity.name} is {float(got)} (NaN or infinite)."
        else:
            first = _index_text(numpy.unravel_index(int(numpy.flatnonzero(bad)[0]), got.shape), quantity.axes)
            where = f"{quantity.name} has {int(bad.sum())} entries that are NaN or infinite (the first at {first})."
        if any("log" in text or "underflow" in text for text in _last_warnings):
            hint = ("a probability that underflowed to 0 went into log(): take logs before exponentials, "
                    "log softmax(z)_k = z_k - logsumexp(z), and log(1 + e^-|z|) for the sigmoid.")
        else:
            hint = ("with large inputs, exp() overflows: rewrite the formula so that every exponent is <= 0 "
                    "(subtract the largest logit; use log(1 + e^-|z|)).")
        return f"{where}{warned} Hint: {hint}"
    error = relative_error(got, expected)
    if error <= tolerance:
        return None
    if got.ndim == 0:  # a loss: one number, no entries to list
        lines = [f"{quantity.name} is wrong: yours {float(got):.6g}, expected {float(expected):.6g} "
                 f"(relative error {error:.2e}, should be below {tolerance:.0e})."]
        hint = _diagnose(quantity, got, expected, mistakes)
        return "\n".join(lines + ([f"Hint: {hint}"] if hint else []))
    difference = numpy.abs(got - expected)
    scale = float(numpy.max(numpy.abs(got) + numpy.abs(expected)))
    wrong = difference > tolerance * max(scale, 1e-300)
    worst = numpy.argsort(difference, axis=None)[::-1][:3]
    entries = "; ".join(
        f"{_index_text(numpy.unravel_index(int(i), got.shape), quantity.axes)}: yours {got.flat[i]:.6g}, "
        f"expected {expected.flat[i]:.6g}" for i in worst if wrong.flat[i])
    lines = [f"{quantity.name} is wrong: relative error {error:.2e} (should be below {tolerance:.0e}); "
             f"{int(wrong.sum())} of {got.size} entries differ. Worst: {entries}."]
    hint = _diagnose(quantity, got, expected, mistakes)
    if not hint:
        for predicate, message in patterns:
            if wrong.any() and predicate(wrong):
                hint = message
                break
    if hint:
        lines.append(f"Hint: {hint}")
    return "\n".join(lines)


def _dtype_hint(dtype):
    if dtype.kind == "b":
        return "an array of booleans holds only True and False: is it a mask? Return float64 values."
    if dtype.kind in "iu":
        return ("an integer array cannot hold the answer's fractions: every value written into it is rounded. "
                "Allocate float arrays (numpy.zeros(shape) is float64).")
    return ("compute in float64 and do not cast: float32 keeps about 7 digits, and the checks compare to "
            f"{REFERENCE_TOLERANCE:.0e} and take finite differences of your forward.")


def gradient_order_problem(function_name, parts, references, names):
    """The message for a backward that returns the right gradients (or arrays of their shapes) in
    another order than ``names``; None if it does not."""
    shapes = [tuple(getattr(part, "shape", ())) for part in parts]
    wanted = [tuple(reference.shape) for reference in references]
    if shapes != wanted and sorted(shapes) == sorted(wanted):
        # name each array by the gradient(s) of its shape ("dx/dg" where two have the same shape)
        seen = ["/".join(name for name, shape in zip(names, wanted) if shape == got) for got in shapes]
        return (f"{function_name} returns arrays with the shapes of ({', '.join(seen)}): "
                f"return ({', '.join(names)}) in that order.")
    if shapes == wanted:  # the same shapes, but values that belong elsewhere (dg where dx belongs)
        def close(part, reference):
            return relative_error(numpy.asarray(backend.to_numpy(part), dtype=numpy.float64),
                                  reference) <= MISTAKE_MATCH

        # only where some other order of the parts gives every reference: one wrong gradient that
        # happens to equal another (dg = delta, which is dx when the gate is 1) is its own mistake
        for order in itertools.permutations(range(len(parts))):
            if (list(order) != list(range(len(parts))) and all(shapes[k] == wanted[i] for i, k in enumerate(order))
                    and all(close(parts[k], references[i]) for i, k in enumerate(order))):
                return (f"{function_name} returns the right gradients in another order: "
                        f"return ({', '.join(names)}) in that order.")
    return None


# -- patterns of wrong entries -----------------------------------------------------------------

def only_near_border(margin, axes=(-2, -1)):
    """A predicate: every wrong entry lies within ``margin`` of the border of the two spatial axes."""
    def predicate(wrong):
        inner = numpy.ones(wrong.shape, dtype=bool)
        for axis in axes:
            size = wrong.shape[axis]
            keep = numpy.zeros(size, dtype=bool)
            keep[margin:size - margin] = True
            shape = [1] * wrong.ndim
            shape[axis] = size
            inner &= keep.reshape(shape)
        # an output too small to have an interior has nothing but border: that says nothing
        return bool(inner.any()) and not (wrong & inner).any()
    return predicate


def unscanned_images(wrong):
    """A predicate for a grid too small for the batch: the first image is entirely right and the
    last one is not. (Not "whole images wrong": an output allocated with empty() can hold right
    values left in recycled memory, and a mistake that spoils every image is not the grid's.)"""
    wrong_image = wrong.reshape(wrong.shape[0], -1).any(axis=1)
    return bool(not wrong_image[0] and wrong_image[-1])


def only_at(position, axis=-1):
    """A predicate: every wrong entry is at ``position`` (e.g. 0 or -1) along ``axis``."""
    def predicate(wrong):
        elsewhere = numpy.delete(wrong, position % wrong.shape[axis], axis=axis)
        return not elsewhere.any()
    return predicate


# ==============================================================================================
# Finite differences of the student's own forward


def finite_difference_errors(run_forward, arrays, analytic, upstream, rng, max_entries=FINITE_DIFFERENCE_ENTRIES):
    """Relative errors of ``analytic[name]`` against centred differences of ``sum(upstream * output)``.

    run_forward : () -> output, reading the float64 arrays of ``arrays`` (perturbed in place);
    upstream : the array (or scalar) the output is weighted with; analytic : name -> gradient.
    Returns name -> (relative error, entries checked), or a message (a str) when the forward does
    not compute in float64: its finite differences would then be noise, and blame a right backward.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = run_forward()
    problem = _precision_problem(output)
    if problem:
        return problem

    def objective():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = numpy.asarray(backend.to_numpy(run_forward()), dtype=numpy.float64)
        return float(numpy.sum(upstream * output))

    errors = {}
    for name, array in arrays.items():
        if getattr(analytic[name], "shape", None) != array.shape:
            continue  # not an array of the right shape: the comparison with the reference has said so
        gradient = numpy.asarray(backend.to_numpy(analytic[name]), dtype=numpy.float64)
        indices = sample_indices(array.size, max_entries, rng)
        numeric = numerical_gradient(objective, array, indices)
        errors[name] = (relative_error(gradient.reshape(-1)[indices], numeric), len(indices))
    return errors


def _precision_problem(output):
    """Why the output of a forward is not good enough for finite differences, or ''."""
    dtype = numpy.dtype(getattr(output, "dtype", numpy.float64))  # a Python float is a float64
    if dtype != numpy.float64:
        return f"your forward returns {dtype}, not float64.\nHint: {_dtype_hint(dtype)}"
    values = numpy.asarray(backend.to_numpy(output), dtype=numpy.float64)
    # float64 values that all fit in a float32: computed in float32, then cast (random inputs never do this)
    if values.any() and numpy.array_equal(values, values.astype(numpy.float32)):
        return ("your forward returns float64 arrays with only float32 precision: somewhere it computes in "
                f"float32.\nHint: {_dtype_hint(numpy.dtype(numpy.float32))}")
    return ""


# ==============================================================================================
# Reporting


class Report:
    """Collects the results of one check; ``finish()`` prints them and raises if anything failed."""

    def __init__(self, title):
        self.title = title
        self.lines = []
        self.failures = []

    def result(self, label, message, error=None):
        if message is None:
            detail = f" (relative error {error:.1e})" if error is not None else ""
            self.lines.append(f"  ok    {label}{detail}")
        else:
            self.failures.append(f"{label}: {message}")
            self.lines.append(f"  FAIL  {label}")

    def result_once(self, label, message):
        """``result``, unless this failure is already reported (a slip that shows in every case)."""
        if f"{label}: {message}" not in self.failures:
            self.result(label, message)

    def skip(self, label, why):
        """A comparison not made (a backward not run on a wrong forward's cache): a line, not a failure."""
        self.lines.append(f"  skip  {label}: {why}")

    def compare(self, label, quantity, got, expected, **options):
        message = compare(quantity, got, expected, **options)
        error = None
        if message is None:
            error = relative_error(numpy.asarray(backend.to_numpy(got), dtype=numpy.float64), expected)
        self.result(label, message, error)
        return message is None

    def finite_differences(self, label, errors, names=None):
        if isinstance(errors, str):  # the forward is not fit for finite differences; say why
            self.result(f"{label}: finite differences", errors)
            return
        for name, (error, count) in errors.items():
            shown = names.get(name, name) if names else name
            if error <= FINITE_DIFFERENCE_TOLERANCE:
                self.result(f"{label}: {shown} against finite differences ({count} entries)", None, error)
            else:
                self.result(f"{label}: {shown} against finite differences ({count} entries)",
                            f"relative error {error:.2e} (should be below {FINITE_DIFFERENCE_TOLERANCE:.0e}): "
                            "your backward is not the derivative of your forward.")

    def finish(self):
        text = "\n".join([self.title] + self.lines)
        if self.failures:
            seen, shown = set(), []
            for failure in self.failures:  # say each hint once: the same slip shows in several arrays
                lines = []
                for line in failure.splitlines():
                    if line.startswith("Hint: ") and line in seen:
                        line = "Hint: the same as above."
                    seen.add(line)
                    lines.append(line)
                shown.append("\n".join(lines))
            details = "\n\n".join(shown)
            raise LabCheckError(f"{text}\n\n{len(self.failures)} problem(s):\n\n{details}")
        print(text)
        print("All checks passed.")
        return None


# ==============================================================================================
# Problems shared by several checks


def _spaced(rng, shape, spacing=0.01, away_from_zero=0.0):
    """Values all ``spacing`` apart (no ties, no kink within a finite-difference step), shuffled."""
    count = int(numpy.prod(shape))
    values = rng.permutation((numpy.arange(count) - count / 2 + 0.5) * spacing).reshape(shape)
    return values + numpy.sign(values) * away_from_zero


def _recurrent_weight(rng, channels):
    """A random, non-symmetric W obeying the stability rule (so a W / W.T slip shows)."""
    return constrain_recurrent_weight(rng.standard_normal((channels, channels)))


# ==============================================================================================
# Lab 02: convolution


CONV_CASES = (  # (N, C, O, H, W, k, stride, padding)
    (2, 3, 3, 6, 6, 3, 1, 1),
    (2, 2, 4, 7, 5, 3, 2, 2),
    (1, 2, 3, 5, 6, 1, 1, 0),
    (1, 2, 2, 8, 6, 3, 2, 1),  # (H + 2p - k) / s = 3.5 and 2.5: the last row and column of windows do not fit
)


def _conv_problem(case, rng):
    n, c, o, height, width, k, stride, padding = case
    x = rng.standard_normal((n, c, height, width))
    weight = rng.standard_normal((o, c, k, k))
    bias = rng.standard_normal(o)
    return x, weight, bias, stride, padding


def references_on_the_host(check):
    """Run a lab check with minirnng's layers, its references, on the NumPy path, whatever the
    backend in force (a GPU machine's CuPy, say): the labs' problems are NumPy arrays, and the
    student's functions are NumPy code. A check of kernels runs them on the emulator itself."""
    @functools.wraps(check)
    def on_the_host(*arguments, **keywords):
        with backend.use("numpy"):
            return check(*arguments, **keywords)
    return on_the_host


def _reference_conv(x, weight, bias, stride, padding):
    o, c, k, _ = weight.shape
    layer = Conv2d(c, o, k, stride=stride, padding=padding, dtype=numpy.float64)
    layer.params["weight"][...] = weight
    layer.params["bias"][...] = bias
    return layer, layer.forward(x)


def _conv_case_text(case):
    n, c, o, height, width, k, stride, padding = case
    return f"x ({n}, {c}, {height}, {width}), weight ({o}, {c}, {k}, {k}), stride {stride}, padding {padding}"


@references_on_the_host
def check_conv2d_forward(conv2d_forward):
    """Check ``conv2d_forward(x, weight, bias, stride, padding) -> (y, cache)`` (a cross-correlation)."""
    rng = numpy.random.default_rng(20)
    report = Report(f"check_conv2d_forward({_name(conv2d_forward)})")
    for case in CONV_CASES:
        x, weight, bias, stride, padding = _conv_problem(case, rng)
        _, expected = _reference_conv(x, weight, bias, stride, padding)
        y, _ = _pair(_call_forward(report, conv2d_forward, {"x": x, "weight": weight, "bias": bias}, stride, padding,
                                   on=_conv_case_text(case)), _name(conv2d_forward))
        mistakes = [
            (_reference_conv(x, weight[:, :, ::-1, ::-1], bias, stride, padding)[1],
             "you flipped the kernel. Deep learning's 'convolution' is a cross-correlation: "
             "y[o, oy, ox] = sum w[o, c, i, j] x[c, oy*s + i, ox*s + j], no flip."),
            (_reference_conv(x, weight.transpose(0, 1, 3, 2), bias, stride, padding)[1],
             "you transposed the kernel (i <-> j): w[o, c, i, j] multiplies x[c, oy*s + i, ox*s + j], "
             "i down the rows and j along the columns."),
            (_reference_conv(x, weight, numpy.zeros_like(bias), stride, padding)[1],
             "the bias is missing: add b[o] to every pixel of output channel o."),
        ]
        shape_hint = (f"the output is (N, O, Ho, Wo) with Ho = (H + 2p - k) // s + 1 = "
                      f"{expected.shape[2]} here: check the padding and the stride.")
        report.compare(f"y for {_conv_case_text(case)}", Quantity("y", ("n", "o", "y", "x"), shape_hint=shape_hint),
                       y, expected, mistakes=mistakes,
                       patterns=[(only_near_border(max(padding, 1)), "only entries near the border are wrong: "
                                  "check the padding (zeros on every side, p of them).")])
    return report.finish()


@references_on_the_host
def check_conv2d_backward(conv2d_forward, conv2d_backward):
    """Check ``conv2d_backward(dy, cache) -> (dx, dweight, dbias)`` against the reference and
    finite differences of ``conv2d_forward``."""
    rng = numpy.random.default_rng(21)
    report = Report(f"check_conv2d_backward({_name(conv2d_forward)}, {_name(conv2d_backward)})")
    for case in CONV_CASES:
        x, weight, bias, stride, padding = _conv_problem(case, rng)
        layer, y_reference = _reference_conv(x, weight, bias, stride, padding)
        dy = rng.standard_normal(y_reference.shape)
        layer.zero_grad()
        dx_reference = layer.backward(dy)
        dw_reference, db_reference = layer.grads["weight"].copy(), layer.grads["bias"].copy()

        x_in, w_in, b_in = x.copy(), weight.copy(), bias.copy()
        y, cache = _pair(_call_forward(report, conv2d_forward, {"x": x_in, "weight": w_in, "bias": b_in},
                                       stride, padding, on=_conv_case_text(case)), _name(conv2d_forward))
        if compare(Quantity("y"), y, y_reference) is not None:
            report.result(f"forward for {_conv_case_text(case)}",
                          "your forward is wrong; make check_conv2d_forward pass first.")
            continue
        grads = _parts(_call_backward(report, conv2d_backward, dy, cache, on=_conv_case_text(case)),
                       _name(conv2d_backward), 3, ("dx", "dweight", "dbias"))
        order = gradient_order_problem(_name(conv2d_backward), grads, (dx_reference, dw_reference, db_reference),
                                       ("dx", "dweight", "dbias"))
        if order:
            report.result_once("the order of the gradients", order)
            continue
        dx, dw, db = grads
        o, c, k, _ = weight.shape
        n = x.shape[0]
        padded_shape = (n, c, x.shape[2] + 2 * padding, x.shape[3] + 2 * padding)
        dx_mistakes = []
        if stride == 1 and 2 * padding == k - 1:
            # the input gradient computed as a correlation of dy with W (channels swapped) but not flipped
            unflipped = Conv2d(o, c, k, padding=padding, bias=False, dtype=numpy.float64)
            unflipped.params["weight"][...] = weight.transpose(1, 0, 2, 3)
            dx_mistakes.append((unflipped.forward(dy),
                                "the input gradient is a transposed convolution: correlate dy with the kernel "
                                "rotated by 180 degrees (or scatter through col2im), not with W as it is."))
        report.compare(f"dx for {_conv_case_text(case)}",
                       Quantity("dx", ("n", "c", "y", "x"),
                                shape_hint=(f"dx has the shape of x {x.shape}. If you computed the gradient of the "
                                            f"padded input {padded_shape}, crop the padding off.")),
                       dx, dx_reference, mistakes=dx_mistakes,
                       patterns=[(only_near_border(max(padding, 1)), "only entries near the border are wrong: "
                                  "check how the padding is removed from the gradient.")])
        report.compare(f"dweight for {_conv_case_text(case)}",
                       Quantity("dweight", ("o", "c", "i", "j"), transposable=True,
                                shape_hint=f"dweight has the shape of the weight (O, C, k, k) = {weight.shape}: "
                                           "is W transposed?"),
                       dw, dw_reference,
                       mistakes=[(dw_reference[:, :, ::-1, ::-1], "dweight is rotated by 180 degrees: "
                                  "dW[o, c, i, j] = sum dy[o, oy, ox] x[c, oy*s + i, ox*s + j], no flip."),
                                 (dw_reference.transpose(1, 0, 2, 3) if o == c else numpy.zeros(0),
                                  "is W transposed? dweight[o, c] pairs output channel o with input channel c.")])
        report.compare(f"dbias for {_conv_case_text(case)}",
                       Quantity("dbias", ("o",), shape_hint=f"dbias has shape (O,) = {bias.shape}: sum dy over "
                                                            "the images and all pixels."),
                       db, db_reference,
                       mistakes=[(dy.sum(axis=(2, 3)), "sum dy over the images too, not only over the pixels.")])
        if case is CONV_CASES[0]:
            errors = finite_difference_errors(  # on copies: a forward that changes its input is reported above
                lambda: _call(conv2d_forward, *_copies(x_in, w_in, b_in), stride, padding)[0],
                {"x": x_in, "weight": w_in, "bias": b_in}, {"x": dx, "weight": dw, "bias": db}, dy, rng)
            report.finite_differences("first case", errors,
                                      {"x": "dx", "weight": "dweight", "bias": "dbias"})
    return report.finish()


# ==============================================================================================
# Lab 04: max pooling and ReLU


def _reference_pool(x, kernel_size, stride):
    layer = MaxPool2d(kernel_size, stride)
    return layer, layer.forward(x)


def _pool_by_rule(x, dy, kernel_size, stride, rule):
    """What a slipped max-pool backward gives: ``rule`` is "share" (split among tied maxima),
    "every" (each tied maximum gets all of it: the mask ``x == max``) or "last" (the last maximum
    wins)."""
    dx = numpy.zeros_like(x)
    n, c, out_height, out_width = dy.shape
    for image, channel, oy, ox in numpy.ndindex(n, c, out_height, out_width):
        window = x[image, channel, oy * stride:oy * stride + kernel_size, ox * stride:ox * stride + kernel_size]
        winners = numpy.argwhere(window == window.max())
        if rule in ("share", "every"):
            for i, j in winners:
                dx[image, channel, oy * stride + i, ox * stride + j] += (
                    dy[image, channel, oy, ox] / (len(winners) if rule == "share" else 1))
            continue
        i, j = winners[-1]
        dx[image, channel, oy * stride + i, ox * stride + j] += dy[image, channel, oy, ox]
    return dx


POOL_CASES = (  # (shape, kernel_size, stride, ties)
    ((2, 2, 6, 8), 2, 2, False),
    ((1, 2, 7, 9), 3, 2, False),
    ((2, 2, 6, 6), 2, 2, True),
    ((1, 2, 7, 9), 2, 2, False),  # floor mode: the last row and column fit no window and are dropped
)


def _pool_problem(case, rng):
    shape, kernel_size, stride, ties = case
    if ties:  # a few integer levels: most windows hold a tie for the maximum
        x = rng.integers(0, 3, size=shape).astype(numpy.float64)
    else:
        x = _spaced(rng, shape)
    return x, kernel_size, stride


def _pool_case_text(case):
    shape, kernel_size, stride, ties = case
    return f"x {shape}, kernel {kernel_size}, stride {stride}" + (", with ties" if ties else "")


@references_on_the_host
def check_maxpool2d_forward(maxpool2d_forward):
    """Check ``maxpool2d_forward(x, kernel_size, stride) -> (y, cache)``."""
    rng = numpy.random.default_rng(40)
    report = Report(f"check_maxpool2d_forward({_name(maxpool2d_forward)})")
    for case in POOL_CASES:
        x, kernel_size, stride = _pool_problem(case, rng)
        _, expected = _reference_pool(x, kernel_size, stride)
        y, _ = _pair(_call_forward(report, maxpool2d_forward, {"x": x}, kernel_size, stride,
                                   on=_pool_case_text(case)), _name(maxpool2d_forward))
        report.compare(f"y for {_pool_case_text(case)}",
                       Quantity("y", ("n", "c", "y", "x"),
                                shape_hint=f"Ho = (H - k) // s + 1 = {expected.shape[2]} here (no padding, "
                                           "windows that do not fit are dropped)."),
                       y, expected)
    return report.finish()


@references_on_the_host
def check_maxpool2d_backward(maxpool2d_forward, maxpool2d_backward):
    """Check ``maxpool2d_backward(dy, cache) -> dx``: routing, ties (the first maximum in row-major
    order takes the whole gradient), overlapping windows, and finite differences."""
    rng = numpy.random.default_rng(41)
    report = Report(f"check_maxpool2d_backward({_name(maxpool2d_forward)}, {_name(maxpool2d_backward)})")
    for case in POOL_CASES:
        x, kernel_size, stride = _pool_problem(case, rng)
        layer, y_reference = _reference_pool(x, kernel_size, stride)
        dy = rng.standard_normal(y_reference.shape)
        dx_reference = layer.backward(dy)
        x_in = x.copy()
        y, cache = _pair(_call_forward(report, maxpool2d_forward, {"x": x_in}, kernel_size, stride,
                                       on=_pool_case_text(case)), _name(maxpool2d_forward))
        if compare(Quantity("y"), y, y_reference) is not None:
            report.result(f"forward for {_pool_case_text(case)}",
                          "your forward is wrong; make check_maxpool2d_forward pass first.")
            continue
        dx = _call_backward(report, maxpool2d_backward, dy, cache, on=_pool_case_text(case))
        mistakes = [
            (_pool_by_rule(x, dy, kernel_size, stride, "share"),
             "on a tie the whole gradient goes to the first maximum in row-major order (as numpy.argmax "
             "and PyTorch choose); it is not shared among the tied entries."),
            (_pool_by_rule(x, dy, kernel_size, stride, "every"),
             "on a tie only the first maximum in row-major order takes the gradient: a mask x == max "
             "gives it to every tied entry, so the window's gradient is counted several times."),
            (_pool_by_rule(x, dy, kernel_size, stride, "last"),
             "on a tie the gradient goes to the *first* maximum in row-major order, not the last: "
             "replace only when strictly larger (>), not when larger or equal (>=)."),
        ]
        wins = layer.backward(numpy.ones_like(dy))  # how many windows each input wins
        report.compare(f"dx for {_pool_case_text(case)}",
                       Quantity("dx", ("n", "c", "y", "x"), shape_hint=f"dx has the shape of x {x.shape}."),
                       dx, dx_reference, mistakes=mistakes,
                       patterns=[(lambda wrong, wins=wins: not (wrong & (wins < 2)).any(),
                                  "only inputs that win two or more overlapping windows are wrong: such an input "
                                  "receives the gradient of every window it wins. Add (+=), do not assign (=).")])
        if not case[3]:
            errors = finite_difference_errors(
                lambda: _call(maxpool2d_forward, x_in.copy(), kernel_size, stride)[0], {"x": x_in}, {"x": dx}, dy, rng)
            report.finite_differences(_pool_case_text(case), errors, {"x": "dx"})
    return report.finish()


RELU_SHAPE = (2, 3, 4, 5)


@references_on_the_host
def check_relu(relu_forward, relu_backward):
    """Check ``relu_forward(x) -> (y, cache)`` and ``relu_backward(dy, cache) -> dx`` (slope 0 at 0)."""
    rng = numpy.random.default_rng(42)
    report = Report(f"check_relu({_name(relu_forward)}, {_name(relu_backward)})")
    x = _spaced(rng, RELU_SHAPE, spacing=0.05, away_from_zero=0.05)
    x.flat[rng.choice(x.size, 6, replace=False)] = 0.0  # the kink itself
    layer = ReLU()
    y_reference = layer.forward(x)
    dy = rng.standard_normal(x.shape)
    dx_reference = layer.backward(dy)
    y, cache = _pair(_call_forward(report, relu_forward, {"x": x}), _name(relu_forward))
    if not report.compare("y", Quantity("y", ("n", "c", "y", "x")), y, y_reference):
        report.skip("dx", f"{_name(relu_backward)} is not run on the cache of a wrong forward; fix y first.")
        return report.finish()
    dx = _call_backward(report, relu_backward, dy, cache)
    report.compare("dx", Quantity("dx", ("n", "c", "y", "x"), shape_hint=f"dx has the shape of x {x.shape}."),
                   dx, dx_reference, mistakes=[
                       (dy * (x >= 0), "at x = 0 exactly, ReLU has a kink; minirnng (like PyTorch) gives it slope 0: "
                                       "use the mask x > 0, not x >= 0."),
                       (dy * y_reference, "you multiplied dy by the output y; the derivative is the mask [x > 0]."),
                       ((x > 0).astype(float), "dx is the mask alone: multiply it by the upstream gradient dy."),
                   ])
    smooth = _spaced(rng, RELU_SHAPE, spacing=0.05, away_from_zero=0.05)
    _, smooth_cache = _pair(_call_forward(report, relu_forward, {"x": smooth}), _name(relu_forward))
    smooth_dx = _call_backward(report, relu_backward, dy, smooth_cache)
    errors = finite_difference_errors(lambda: _call(relu_forward, smooth.copy())[0], {"x": smooth}, {"x": smooth_dx},
                                      dy, rng)
    report.finite_differences("away from the kink", errors, {"x": "dx"})
    return report.finish()


# ==============================================================================================
# Lab 05: softmax and sigmoid cross-entropy


def _softmax_problem(rng, scale=3.0):
    logits = scale * rng.standard_normal((2, 4, 3, 5))
    target = rng.integers(0, 4, size=(2, 3, 5))
    return logits, target


@references_on_the_host
def check_softmax_cross_entropy(forward, backward):
    """Check ``forward(logits, target) -> (loss, cache)`` (the mean over pixels of -log softmax at
    the target) and ``backward(dloss, cache) -> dlogits``, including logits of size 1e4."""
    rng = numpy.random.default_rng(50)
    report = Report(f"check_softmax_cross_entropy({_name(forward)}, {_name(backward)})")
    dloss = 0.7
    for label, scale in (("logits of size ~3", 3.0), ("logits of size ~1e4", 1e4)):
        logits, target = _softmax_problem(rng, scale)
        reference = SoftmaxCrossEntropy()
        loss_reference = reference.forward(logits, target)
        dlogits_reference = reference.backward(dloss)
        loss, cache = _pair(_call_forward(report, forward, {"logits": logits, "target": target}, on=label),
                            _name(forward), "(loss, cache)")
        loss_right = report.compare(f"loss, {label}", Quantity("loss"), loss, loss_reference, mistakes=[
            (loss_reference * target.size, "the loss is the *mean* over the pixels, not the sum."),
            (loss_reference * target.shape[0],
             "the loss is one mean over all N*H*W pixels, not the sum of each image's mean."),
            (loss_reference * target[0].size,
             "divide by all N*H*W pixels, not by the number of images N only.")])
        if not loss_right:
            report.skip(f"dlogits, {label}", f"{_name(backward)} is not run on the cache of a wrong forward; "
                                             "fix the loss first.")
            continue
        dlogits = _call(backward, dloss, cache, on=label)
        n, k, height, width = logits.shape
        onehot = numpy.arange(k)[None, :, None, None] == target[:, None]
        shifted = numpy.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        pixels = n * height * width
        report.compare(f"dlogits, {label}", Quantity("dlogits", ("n", "k", "y", "x"),
                                                     shape_hint=f"dlogits has the shape of the logits {logits.shape}."),
                       dlogits, dlogits_reference, mistakes=[
                           (dlogits_reference / dloss, "multiply by dloss, the upstream gradient (0.7 here)."),
                           (probabilities * dloss / pixels, "subtract 1 at the target class: dL/dz = p - onehot(t)."),
                           (dloss * (probabilities - onehot),
                            "divide by the number of pixels N*H*W: the loss is a mean."),
                       ])
        if scale == 3.0:
            logits_in = logits.copy()
            errors = finite_difference_errors(lambda: _call(forward, logits_in.copy(), target.copy())[0] * dloss,
                                              {"logits": logits_in}, {"logits": dlogits}, 1.0, rng)
            report.finite_differences(label, errors, {"logits": "dlogits"})
    return report.finish()


@references_on_the_host
def check_sigmoid_cross_entropy(forward, backward):
    """Check ``forward(logits, target, mask) -> (loss, cache)`` (the mean over the masked pixels of
    the binary cross-entropy of sigmoid(logits)) and ``backward(dloss, cache) -> dlogits``."""
    rng = numpy.random.default_rng(51)
    report = Report(f"check_sigmoid_cross_entropy({_name(forward)}, {_name(backward)})")
    dloss = 1.3
    shape = (2, 1, 4, 6)
    for label, scale in (("logits of size ~3", 3.0), ("logits of size ~1e4", 1e4)):
        logits = scale * rng.standard_normal(shape)
        target = (rng.random(shape) < 0.4).astype(numpy.float64)
        mask = rng.random(shape) < 0.6
        reference = SigmoidBinaryCrossEntropy()
        loss_reference = reference.forward(logits, target, mask)
        dlogits_reference = reference.backward(dloss)
        unmasked = SigmoidBinaryCrossEntropy()
        unmasked_loss = unmasked.forward(logits, target)
        unmasked_grad = unmasked.backward(dloss)
        loss, cache = _pair(_call_forward(report, forward, {"logits": logits, "target": target, "mask": mask},
                                          on=label), _name(forward), "(loss, cache)")
        loss_right = report.compare(f"loss, {label}", Quantity("loss"), loss, loss_reference, mistakes=[
            (unmasked_loss, "the mask is ignored: only pixels where mask is True count."),
            (loss_reference * mask.sum() / mask.size, "divide by the number of pixels the mask selects, "
                                                      "not by all pixels."),
            (loss_reference * mask.sum(), "the loss is the *mean* over the masked pixels, not the sum.")])
        if not loss_right:
            report.skip(f"dlogits, {label}", f"{_name(backward)} is not run on the cache of a wrong forward; "
                                             "fix the loss first.")
            continue
        dlogits = _call(backward, dloss, cache, on=label)
        report.compare(f"dlogits, {label}", Quantity("dlogits", ("n", "c", "y", "x"),
                                                     shape_hint=f"dlogits has the shape of the logits {shape}."),
                       dlogits, dlogits_reference, mistakes=[
                           (unmasked_grad, "the mask is ignored in the gradient: it is 0 where mask is False."),
                           (unmasked_grad * mask.size / mask.sum(),
                            "the gradient is 0 where mask is False: you divided by the masked count, but kept "
                            "the pixels outside the mask, which are not in the loss."),
                           (dlogits_reference * mask.sum() / mask.size, "divide by the number of masked pixels."),
                           (dlogits_reference / dloss, "multiply by dloss, the upstream gradient (1.3 here)."),
                       ])
        if scale == 3.0:
            logits_in = logits.copy()
            errors = finite_difference_errors(lambda: _call(forward, *_copies(logits_in, target, mask))[0] * dloss,
                                              {"logits": logits_in}, {"logits": dlogits}, 1.0, rng)
            report.finite_differences(label, errors, {"logits": "dlogits"})
    return report.finish()


# ==============================================================================================
# Lab 06 and 07: the spatial recurrences, left to right along the last axis


def _mix(matrix, v):
    """``matrix @ v`` over the channel axis of v (N, C, H)."""
    return numpy.einsum("cd,ndy->ncy", matrix, v)


def plain_backward_variant(dh, h, W, transpose=True, slope_on_carried=True, return_delta=True):
    """Back-propagation through eq. 1 with tanh (left to right), with the usual slips switchable.

    ``transpose=False`` uses W where W^T belongs (the printed eq. 2); ``slope_on_carried=False``
    applies tanh' to xi_t only; ``return_delta=False`` returns dL/dh instead of dL/da as dx.
    Returns ``(dx, dW, db)``.
    """
    M = W.T if transpose else W
    steps = dh.shape[-1]
    delta = numpy.zeros_like(dh)
    total = numpy.zeros_like(dh)
    carried = numpy.zeros(dh.shape[:-1])
    for t in reversed(range(steps)):
        slope = 1 - h[..., t] ** 2
        total[..., t] = dh[..., t] + carried
        delta[..., t] = slope * total[..., t] if slope_on_carried else slope * dh[..., t] + carried
        carried = _mix(M, delta[..., t])
    previous = numpy.concatenate([numpy.zeros(h.shape[:-1] + (1,)), h[..., :-1]], axis=-1)
    dW = numpy.einsum("ncyt,ndyt->cd", delta, previous)
    db = delta.sum(axis=(0, 2, 3))
    return (delta if return_delta else total), dW, db


def gated_backward_variant(dh, h, g, W, b, next_gate=True, transpose=True, previous_state=True,
                           gate_before_mixing=True):
    """Back-propagation through eq. 3 (left to right), with the slips of the printed eq. 4 switchable.

    Correct: ``delta_j = xi_j + W^T (g_{j+1} * delta_{j+1})``, ``dg_j = delta_j * (W h_{j-1} + b)``.
    Returns ``(dx, dg, dW, db)``.
    """
    M = W.T if transpose else W
    steps = dh.shape[-1]
    zeros = numpy.zeros(dh.shape[:-1])

    def column(a, j):
        return a[..., j] if 0 <= j < steps else zeros

    delta = numpy.zeros_like(dh)
    dg = numpy.zeros_like(dh)
    for j in reversed(range(steps)):
        gate = column(g, j + 1) if next_gate else column(g, j)
        if gate_before_mixing:
            carried = _mix(M, gate * column(delta, j + 1))
        else:
            carried = gate * _mix(M, column(delta, j + 1))
        delta[..., j] = dh[..., j] + carried
        state = column(h, j - 1) if previous_state else column(h, j + 1)
        dg[..., j] = delta[..., j] * (_mix(W, state) + b[None, :, None])
    u = g * delta
    previous = numpy.concatenate([numpy.zeros(h.shape[:-1] + (1,)), h[..., :-1]], axis=-1)
    dW = numpy.einsum("ncyt,ndyt->cd", u, previous)
    db = u.sum(axis=(0, 2, 3))
    return delta, dg, dW, db


def _gated_forward_variant(x, g, W, b, gate_on_bias=True, bias_at_start=True, convex=False):
    h = numpy.zeros_like(x)
    previous = numpy.zeros(x.shape[:-1])
    for j in range(x.shape[-1]):
        message = _mix(W, previous)
        if j > 0 or bias_at_start:
            message = message + (b[None, :, None] if gate_on_bias else 0)
        h[..., j] = (1 - g[..., j]) * x[..., j] if convex else x[..., j]
        h[..., j] += g[..., j] * message
        if not gate_on_bias and (j > 0 or bias_at_start):
            h[..., j] += b[None, :, None]
        previous = h[..., j]
    return h


RNN_SHAPE = (2, 3, 2, 6)  # N, C, H (rows: independent sequences), T (columns: the scan)


def _plain_problem(rng):
    x = rng.standard_normal(RNN_SHAPE)
    W = _recurrent_weight(rng, RNN_SHAPE[1])
    b = 0.5 * rng.standard_normal(RNN_SHAPE[1])
    return x, W, b


BACKWARDS_SCAN_HINT = ("the scan runs left to right along the last axis: step 0 first, each step "
                       "reading the one before it (t - 1), not the one after.")


def _reference_plain(x, W, b, direction="left_to_right"):
    layer = SpatialRNN(x.shape[1], direction, activation="tanh", dtype=numpy.float64)
    layer.params["W"][...] = W
    layer.params["b"][...] = b
    return layer, layer.forward(x)


@references_on_the_host
def check_spatial_rnn_forward(spatial_rnn_forward):
    """Check ``spatial_rnn_forward(x, W, b) -> (h, cache)``: eq. 1 with tanh, left to right along
    the last axis, ``h_{-1} = 0``; x (N, C, H, T), W (C, C), b (C,)."""
    rng = numpy.random.default_rng(60)
    report = Report(f"check_spatial_rnn_forward({_name(spatial_rnn_forward)})")
    x, W, b = _plain_problem(rng)
    _, expected = _reference_plain(x, W, b)
    identity = SpatialRNN(x.shape[1], "left_to_right", activation="identity", dtype=numpy.float64)
    identity.params["W"][...], identity.params["b"][...] = W, b
    transposed = _reference_plain(x, W.T, b)[1]
    no_bias_at_start = numpy.zeros_like(x)  # eq. 1, but without b at the first step
    for t in range(x.shape[-1]):
        previous = no_bias_at_start[..., t - 1] if t > 0 else numpy.zeros(x.shape[:-1])
        bias = b[None, :, None] if t > 0 else 0.0
        no_bias_at_start[..., t] = numpy.tanh(x[..., t] + _mix(W, previous) + bias)
    h, _ = _pair(_call_forward(report, spatial_rnn_forward, {"x": x, "W": W, "b": b}), _name(spatial_rnn_forward))
    report.compare("h", Quantity("h", ("n", "c", "y", "t"), shape_hint=f"h has the shape of x {x.shape}."),
                   h, expected, mistakes=[
                       (identity.forward(x), "the tanh is missing: h_t = tanh(x_t + W h_{t-1} + b)."),
                       (transposed, "is W transposed? (W h)[c] = sum_d W[c, d] h[d]."),
                       (no_bias_at_start, "at the first step h_{-1} = 0, but the bias is still there: "
                                          "h_0 = tanh(x_0 + b)."),
                       (_reference_plain(x, W, b, "right_to_left")[1], BACKWARDS_SCAN_HINT),
                   ], patterns=[(only_at(0), "only the first step is wrong: there h_{-1} = 0, so "
                                              "h_0 = tanh(x_0 + b).")])
    return report.finish()


@references_on_the_host
def check_spatial_rnn_backward(spatial_rnn_forward, spatial_rnn_backward):
    """Check ``spatial_rnn_backward(dh, cache) -> (dx, dW, db)`` (eq. 2, corrected)."""
    rng = numpy.random.default_rng(61)
    report = Report(f"check_spatial_rnn_backward({_name(spatial_rnn_forward)}, {_name(spatial_rnn_backward)})")
    x, W, b = _plain_problem(rng)
    layer, h_reference = _reference_plain(x, W, b)
    dh = rng.standard_normal(x.shape)
    layer.zero_grad()
    dx_reference = layer.backward(dh)
    dW_reference, db_reference = layer.grads["W"].copy(), layer.grads["b"].copy()
    x_in, W_in, b_in = x.copy(), W.copy(), b.copy()
    h, cache = _pair(_call_forward(report, spatial_rnn_forward, {"x": x_in, "W": W_in, "b": b_in}),
                     _name(spatial_rnn_forward))
    if compare(Quantity("h"), h, h_reference) is not None:
        report.result("forward", "your forward is wrong; make check_spatial_rnn_forward pass first.")
        return report.finish()
    grads = _parts(_call_backward(report, spatial_rnn_backward, dh, cache), _name(spatial_rnn_backward), 3,
                   ("dx", "dW", "db"))
    order = gradient_order_problem(_name(spatial_rnn_backward), grads, (dx_reference, dW_reference, db_reference),
                                   ("dx", "dW", "db"))
    if order:
        report.result("the order of the gradients", order)
        return report.finish()
    dx, dW, db = grads
    printed = plain_backward_variant(dh, h_reference, W, transpose=False)
    outside = plain_backward_variant(dh, h_reference, W, slope_on_carried=False)
    before_tanh = plain_backward_variant(dh, h_reference, W, return_delta=False)
    transpose_hint = ("is W transposed? Back-propagating through W h_{t-1} multiplies by W^T: "
                      "delta_t = (1 - h_t^2) * (xi_t + W^T delta_{t+1}). (The printed eq. 2 has W.)")
    slope_hint = ("the tanh derivative (1 - h_t^2) multiplies the whole sum xi_t + W^T delta_{t+1}, "
                  "the gradient from above *and* the one from the next step.")
    report.compare("dx", Quantity("dx", ("n", "c", "y", "t")), dx, dx_reference, mistakes=[
        (printed[0], transpose_hint), (outside[0], slope_hint),
        (before_tanh[0], "dx is dL/da_t, after the tanh derivative: multiply dL/dh_t by (1 - h_t^2)."),
        (dh, "dx must include what flows back from the later steps, not only dh."),
        (dh * (1 - h_reference ** 2), "dx must include what flows back from the later steps: "
                                      "delta_t = (1 - h_t^2) * (xi_t + W^T delta_{t+1}), not (1 - h_t^2) * xi_t.")])
    report.compare("dW", Quantity("dW", ("c", "d"), transposable=True), dW, dW_reference, mistakes=[
        (printed[1], transpose_hint), (outside[1], slope_hint), (dW_reference.T,
         "dW is transposed: dL/dW = sum_t delta_t h_{t-1}^T, row c (output channel) by column d (input channel)."),
        (before_tanh[1], slope_hint)])
    report.compare("db", Quantity("db", ("c",), shape_hint="db has shape (C,): sum over images, rows and steps."),
                   db, db_reference, mistakes=[(printed[2], transpose_hint), (outside[2], slope_hint)])
    errors = finite_difference_errors(lambda: _call(spatial_rnn_forward, *_copies(x_in, W_in, b_in))[0],
                                      {"x": x_in, "W": W_in, "b": b_in}, {"x": dx, "W": dW, "b": db}, dh, rng)
    report.finite_differences("your forward", errors, {"x": "dx", "W": "dW", "b": "db"})
    return report.finish()


def _gated_problem(rng):
    x = rng.standard_normal(RNN_SHAPE)
    g = rng.uniform(0.05, 0.95, RNN_SHAPE)  # different at every pixel: a g_j / g_{j+1} slip shows
    W = _recurrent_weight(rng, RNN_SHAPE[1])
    b = 0.5 * rng.standard_normal(RNN_SHAPE[1])
    return x, g, W, b


def _reference_gated(x, g, W, b, direction="left_to_right"):
    layer = GatedSpatialRNN(x.shape[1], direction, dtype=numpy.float64)
    layer.params["W"][...] = W
    layer.params["b"][...] = b
    return layer, layer.forward(x, g)


@references_on_the_host
def check_gated_rnn_forward(gated_rnn_forward):
    """Check ``gated_rnn_forward(x, g, W, b) -> (h, cache)``: eq. 3, left to right along the last
    axis, ``h_j = x_j + g_j * (W h_{j-1} + b)``, ``h_{-1} = 0``."""
    rng = numpy.random.default_rng(70)
    report = Report(f"check_gated_rnn_forward({_name(gated_rnn_forward)})")
    x, g, W, b = _gated_problem(rng)
    _, expected = _reference_gated(x, g, W, b)
    h, _ = _pair(_call_forward(report, gated_rnn_forward, {"x": x, "g": g, "W": W, "b": b}),
                 _name(gated_rnn_forward))
    report.compare("h", Quantity("h", ("n", "c", "y", "j"), shape_hint=f"h has the shape of x {x.shape}."),
                   h, expected, mistakes=[
                       (_gated_forward_variant(x, g, W, b, gate_on_bias=False),
                        "the gate multiplies the whole message, bias included: g_j * (W h_{j-1} + b)."),
                       (_gated_forward_variant(x, g, W, b, bias_at_start=False),
                        "at the first pixel h_{-1} = 0, but the message W h_{-1} + b is still b: h_0 = x_0 + g_0 * b."),
                       (_gated_forward_variant(x, g, W, b, convex=True),
                        "that is the convex variant (1 - g) x + g (W h + b) of the authors' Caffe layer; "
                        "minirnng implements eq. 3 as printed: h_j = x_j + g_j * (W h_{j-1} + b)."),
                       (_reference_gated(x, g, W.T, b)[1], "is W transposed? (W h)[c] = sum_d W[c, d] h[d]."),
                       (_reference_gated(x, g, W, b, "right_to_left")[1], BACKWARDS_SCAN_HINT),
                   ], patterns=[(only_at(0), "only the first pixel of each row is wrong: h_0 = x_0 + g_0 * b.")])
    return report.finish()


@references_on_the_host
def check_gated_rnn_backward(gated_rnn_forward, gated_rnn_backward):
    """Check ``gated_rnn_backward(dh, cache) -> (dx, dg, dW, db)`` against the reference, the
    slips of the printed eq. 4, and finite differences."""
    rng = numpy.random.default_rng(71)
    report = Report(f"check_gated_rnn_backward({_name(gated_rnn_forward)}, {_name(gated_rnn_backward)})")
    x, g, W, b = _gated_problem(rng)
    layer, h_reference = _reference_gated(x, g, W, b)
    dh = rng.standard_normal(x.shape)
    layer.zero_grad()
    dx_reference, dg_reference = layer.backward(dh)
    dW_reference, db_reference = layer.grads["W"].copy(), layer.grads["b"].copy()
    x_in, g_in, W_in, b_in = x.copy(), g.copy(), W.copy(), b.copy()
    h, cache = _pair(_call_forward(report, gated_rnn_forward, {"x": x_in, "g": g_in, "W": W_in, "b": b_in}),
                     _name(gated_rnn_forward))
    if compare(Quantity("h"), h, h_reference) is not None:
        report.result("forward", "your forward is wrong; make check_gated_rnn_forward pass first.")
        return report.finish()
    grads = _parts(_call_backward(report, gated_rnn_backward, dh, cache), _name(gated_rnn_backward), 4,
                   ("dx", "dg", "dW", "db"))
    order = gradient_order_problem(_name(gated_rnn_backward), grads,
                                   (dx_reference, dg_reference, dW_reference, db_reference), ("dx", "dg", "dW", "db"))
    if order:
        report.result("the order of the gradients", order)
        return report.finish()
    dx, dg, dW, db = grads

    slips = {
        "printed": (dict(next_gate=False, transpose=False, previous_state=False, gate_before_mixing=False),
                    "this is eq. 4 as printed, with all its slips; the corrected equation has the gate of the "
                    "next step g_{j+1}, W^T, the gate before the mixing, and the previous state h_{j-1} in dL/dg."),
        "gate": (dict(next_gate=False),
                 "did you forget the gate of the next step? The message from j+1 back to j is scaled by "
                 "g_{j+1} (the gate that scaled it on the way forward), not g_j."),
        "transpose": (dict(transpose=False),
                      "is W transposed? Back-propagating through W h_{j-1} multiplies by W^T: "
                      "delta_j = xi_j + W^T (g_{j+1} * delta_{j+1})."),
        "order": (dict(gate_before_mixing=False),
                  "the gate acts before the channel mixing: W^T (g_{j+1} * delta_{j+1}), not "
                  "g_{j+1} * (W^T delta_{j+1}) (an elementwise scaling does not commute with W^T)."),
        "state": (dict(previous_state=False),
                  "dL/dg_j = delta_j * (W h_{j-1} + b): the state that flows *into* pixel j, h_{j-1}, not h_{j+1}."),
    }
    variants = {key: (gated_backward_variant(dh, h_reference, g, W, b, **options), hint)
                for key, (options, hint) in slips.items()}

    def mistakes(position):
        return [(result[position], hint) for result, hint in variants.values()]

    report.compare("dx", Quantity("dx", ("n", "c", "y", "j")), dx, dx_reference,
                   mistakes=mistakes(0) + [(dh, "dx must include what flows back from the later pixels: "
                                                "delta_j = xi_j + W^T (g_{j+1} * delta_{j+1}), not xi_j alone.")])
    report.compare("dg", Quantity("dg", ("n", "c", "y", "j")), dg, dg_reference, mistakes=mistakes(1),
                   patterns=[(only_at(0), "only the first pixel of each row is wrong: there the message is "
                                          "W h_{-1} + b = b, so dL/dg_0 = delta_0 * b.")])
    report.compare("dW", Quantity("dW", ("c", "d"), transposable=True), dW, dW_reference,
                   mistakes=mistakes(2) + [(dW_reference.T, "dW is transposed: dL/dW = sum_j u_j h_{j-1}^T with "
                                                           "u_j = g_j * delta_j.")])
    report.compare("db", Quantity("db", ("c",), shape_hint="db has shape (C,): sum over images, rows and pixels."),
                   db, db_reference, mistakes=mistakes(3) + [
                       (dx.sum(axis=(0, 2, 3)) if getattr(dx, "shape", None) == x.shape else numpy.zeros(0),
                        "the bias is inside the gate: dL/db = sum_j g_j * delta_j, not sum_j delta_j.")])
    errors = finite_difference_errors(lambda: _call(gated_rnn_forward, *_copies(x_in, g_in, W_in, b_in))[0],
                                      {"x": x_in, "g": g_in, "W": W_in, "b": b_in},
                                      {"x": dx, "g": dg, "W": dW, "b": db}, dh, rng)
    report.finite_differences("your forward", errors, {"x": "dx", "g": "dg", "W": "dW", "b": "db"})
    return report.finish()


# ==============================================================================================
# Lab 08: the gated scan on the GPU path (the CUDA emulator without a GPU)


SCAN_SHAPE = (2, 3, 4, 5)  # N, C, H, W
#: batches whose N * lines is above one block of 256 threads in every direction: an undersized grid
#: leaves whole images unscanned here, where SCAN_SHAPE's 10 lines fit any grid. The first has
#: nearly square maps; the two long ones make a grid sized by the wrong side (N * H for the
#: vertical scans, N * W for the horizontal ones, N * length) too small by 16 times.
MANY_LINES_SHAPES = ((70, 2, 5, 4), (64, 2, 4, 64), (64, 2, 64, 4))


def _many_lines(shape):
    return f"{shape[0]} images of {shape[2]}x{shape[3]}"


def _strides(direction, height, width):
    from .cuda.directions import direction_strides
    return direction_strides(direction, height, width)


@references_on_the_host
def check_direction_strides(direction_strides):
    """Check ``direction_strides(direction, height, width) -> (lines, length, line_stride,
    step_stride, first)``, the five numbers that turn each direction into the same walk."""
    from .cuda.directions import DIRECTIONS
    report = Report(f"check_direction_strides({_name(direction_strides)})")
    fields = ("lines", "length", "line_stride", "step_stride", "first")
    for direction in DIRECTIONS:
        for height, width in ((3, 5), (4, 4)):
            expected = _strides(direction, height, width)
            got = _call(direction_strides, direction, height, width, on=f"{direction!r}, {height}x{width}")
            if not isinstance(got, (tuple, list)) or len(got) != 5:
                report.result(f"{direction}, {height}x{width}",
                              f"return five integers {fields}; got {_describe(got)}")
                continue
            # the kernel takes them as int: a float (even 2.0) or None is a slip to name, not to round
            not_integers = [f"{name} is {value!r}, not an integer" for name, value in zip(fields, got)
                            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer))]
            if not_integers:
                report.result(f"{direction}, {height}x{width}", "; ".join(not_integers) + ".")
                continue
            wrong = [f"{name} is {int(value)}, expected {want}" for name, value, want in zip(fields, got, expected)
                     if int(value) != want]
            hint = ""
            if wrong and direction in ("right_to_left", "bottom_to_top"):
                hint = (" Hint: a reverse scan starts at the last pixel of the first line and steps backwards "
                        "(a negative step_stride).")
            report.result(f"{direction}, {height}x{width}", ("; ".join(wrong) + "." + hint) if wrong else None)
    return report.finish()


@contextlib.contextmanager
def _on_kernels():
    """Run the student's launches on the CUDA emulator (or on the GPU for CuPy arrays). Where the
    emulator cannot run (no C++ compiler), raise LabCannotRun: the grader does not count the check."""
    try:
        with backend.use("cuda-emulator"), _unwritten_memory_is_marked():
            yield
    except Exception as error:
        if not _cannot_run_here(error):
            raise
        # the check always uses the emulator, so the error's advice to choose another backend does not apply
        reason = re.sub(r"\s*Or run without the emulator:[^\n]*", "", str(error))
        raise LabCannotRun(f"cannot run the kernels here: {reason}") from None


#: What ``numpy.empty`` returns in a float array during a lab 08 check: finite (NaN would read as
#: an overflow, and the checks would hint at that instead), and no value a scan computes.
UNWRITTEN = -1e30


@contextlib.contextmanager
def _unwritten_memory_is_marked():
    """``numpy.empty`` and ``empty_like`` return float arrays filled with :data:`UNWRITTEN` inside the block.

    A launch whose grid is too small leaves the outputs of the threads it never started as
    ``empty()`` returned them: on a GPU, garbage; on the CPU, whatever the memory held, which can be
    the right answer freed a moment before (then the check would see nothing wrong). Marked, every
    element the kernel never wrote reads as wrong, every time.
    """
    empty, empty_like = numpy.empty, numpy.empty_like

    def marked(array):
        if array.dtype.kind == "f":
            array.fill(UNWRITTEN)
        return array

    numpy.empty = lambda *args, **kwargs: marked(empty(*args, **kwargs))
    numpy.empty_like = lambda *args, **kwargs: marked(empty_like(*args, **kwargs))
    try:
        yield
    finally:
        numpy.empty, numpy.empty_like = empty, empty_like


def _scan_problem(rng, shape=SCAN_SHAPE):
    x = rng.standard_normal(shape)
    g = rng.uniform(0.05, 0.95, shape)
    W = _recurrent_weight(rng, shape[1])
    b = 0.5 * rng.standard_normal(shape[1])
    return x, g, W, b


def _reference_scan(x, g, W, b, direction):
    layer = GatedSpatialRNN(x.shape[1], direction, dtype=numpy.float64)
    layer.params["W"][...] = W
    layer.params["b"][...] = b
    return layer, layer.forward(x, g)


@references_on_the_host
def check_gated_scan_forward_gpu(forward):
    """Check ``forward(x, g, W, b, direction) -> (h, cache)``, a launch of the ``gated_scan_forward``
    kernel, in all four directions, on the CUDA emulator."""
    from .cuda.directions import DIRECTIONS
    rng = numpy.random.default_rng(80)
    report = Report(f"check_gated_scan_forward_gpu({_name(forward)})")
    x, g, W, b = _scan_problem(rng)
    outputs = {direction: _reference_scan(x, g, W, b, direction)[1] for direction in DIRECTIONS}
    for direction in DIRECTIONS:
        with _on_kernels():
            h, _ = _pair(_call_forward(report, forward, {"x": x, "g": g, "W": W, "b": b}, direction,
                                       on=repr(direction)), _name(forward))
        mistakes = [(outputs[other], f"your result is the {other} scan: check the geometry row "
                                     "(first, line_stride, step_stride) you pass for this direction.")
                    for other in DIRECTIONS if other != direction]
        mistakes.append((_reference_scan(x, g, W.T, b, direction)[1],
                         "is W transposed? The kernel reads W[c * C + k] as row c, column k."))
        report.compare(f"h, {direction}", Quantity("h", ("n", "c", "y", "x"),
                                                    shape_hint=f"h has the shape of x {x.shape} (drop the direction "
                                                               "axis D = 1 the kernel writes)."),
                       h, outputs[direction], mistakes=mistakes,
                       patterns=[(unscanned_images, "the last image is wrong and the first right: does the grid "
                                                    "cover N * lines threads (blocks_for(N * lines))?")])
    for shape in MANY_LINES_SHAPES:
        many = _scan_problem(rng, shape)
        for direction in DIRECTIONS:
            with _on_kernels():
                h, _ = _pair(_call(forward, *(array.copy() for array in many), direction,
                                   on=f"{direction!r}, {_many_lines(shape)}"), _name(forward))
            report.compare(f"h, {direction}, {_many_lines(shape)}", Quantity("h", ("n", "c", "y", "x")),
                           h, _reference_scan(*many, direction)[1],
                           patterns=[(unscanned_images, "the last images are wrong in a batch of more than 256 "
                                                        "lines, the first right: does the grid cover N * lines "
                                                        "threads (blocks_for(N * lines)), not one block, nor "
                                                        "N * height or N * width?")])
    return report.finish()


@references_on_the_host
def check_gated_scan_backward_gpu(forward, backward):
    """Check ``backward(dh, cache) -> (dx, dg, dW, db)``, a launch of ``gated_scan_backward`` plus
    the product and the sum that finish dW and db, against the reference and finite differences."""
    from .cuda.directions import DIRECTIONS
    rng = numpy.random.default_rng(81)
    report = Report(f"check_gated_scan_backward_gpu({_name(forward)}, {_name(backward)})")
    x, g, W, b = _scan_problem(rng)
    for number, direction in enumerate(DIRECTIONS):
        layer, h_reference = _reference_scan(x, g, W, b, direction)
        dh = rng.standard_normal(x.shape)
        layer.zero_grad()
        dx_reference, dg_reference = layer.backward(dh)
        dW_reference, db_reference = layer.grads["W"].copy(), layer.grads["b"].copy()
        x_in, g_in, W_in, b_in = x.copy(), g.copy(), W.copy(), b.copy()
        with _on_kernels():
            h, cache = _pair(_call_forward(report, forward, {"x": x_in, "g": g_in, "W": W_in, "b": b_in}, direction,
                                           on=repr(direction)), _name(forward))
            if compare(Quantity("h"), h, h_reference) is not None:
                report.result(f"forward, {direction}",
                              "your forward is wrong; make check_gated_scan_forward_gpu pass first.")
                continue
            grads = _parts(_call_backward(report, backward, dh, cache, on=repr(direction)), _name(backward), 4,
                           ("dx", "dg", "dW", "db"))
        order = gradient_order_problem(_name(backward), grads,
                                       (dx_reference, dg_reference, dW_reference, db_reference),
                                       ("dx", "dg", "dW", "db"))
        if order:
            report.result_once("the order of the gradients", order)
            continue
        dx, dg, dW, db = grads
        report.compare(f"dx, {direction}", Quantity("dx", ("n", "c", "y", "x")), dx, dx_reference)
        report.compare(f"dg, {direction}", Quantity("dg", ("n", "c", "y", "x")), dg, dg_reference)
        report.compare(f"dW, {direction}", Quantity("dW", ("c", "d"), transposable=True,
                                                    shape_hint="dW has shape (C, C): drop the direction axis."),
                       dW, dW_reference, mistakes=[(dW_reference.T, "dW = e @ h_prev^T, not h_prev @ e^T: "
                                                                     "is it transposed?")])
        report.compare(f"db, {direction}", Quantity("db", ("c",), shape_hint="db has shape (C,)."),
                       db, db_reference)
        if number == 0:
            def run(x_in=x_in, g_in=g_in, W_in=W_in, b_in=b_in, direction=direction):
                with _on_kernels():
                    return _call(forward, *_copies(x_in, g_in, W_in, b_in), direction)[0]
            errors = finite_difference_errors(run, {"x": x_in, "g": g_in, "W": W_in, "b": b_in},
                                              {"x": dx, "g": dg, "W": dW, "b": db}, dh, rng, max_entries=12)
            report.finite_differences(f"{direction}, your forward", errors,
                                      {"x": "dx", "g": "dg", "W": "dW", "b": "db"})
    if report.failures:  # what is wrong in the small problem is wrong here too: say it once
        return report.finish()
    for shape in MANY_LINES_SHAPES:
        many = _scan_problem(rng, shape)
        for direction in DIRECTIONS:
            layer, h_reference = _reference_scan(*many, direction)
            dh = rng.standard_normal(shape)
            layer.zero_grad()
            dx_reference, _ = layer.backward(dh)
            with _on_kernels():
                h, cache = _pair(_call(forward, *(array.copy() for array in many), direction, on=repr(direction)),
                                 _name(forward))
                if compare(Quantity("h"), h, h_reference) is not None:
                    report.result(f"forward, {direction}, {_many_lines(shape)}",
                                  "your forward is wrong; make check_gated_scan_forward_gpu pass first.")
                    continue
                dx = _parts(_call_backward(report, backward, dh, cache, on=repr(direction)), _name(backward), 4,
                            ("dx", "dg", "dW", "db"))[0]
            report.compare(f"dx, {direction}, {_many_lines(shape)}", Quantity("dx", ("n", "c", "y", "x")),
                           dx, dx_reference,
                           patterns=[(unscanned_images, "the last images are wrong in a batch of more than 256 "
                                                        "lines, the first right: does the backward's grid cover "
                                                        "N * lines threads (blocks_for(N * lines)), not one block, "
                                                        "nor N * height or N * width?")])
    return report.finish()


# ==============================================================================================
# The labs and their checks, for the grader


@dataclasses.dataclass(frozen=True)
class Check:
    """One graded check: the function of this module and the names of the student's functions it takes."""
    check: str
    functions: tuple
    points: int = 1


#: lab (the notebook's file name without extension) -> its checks, in the order of the notebook
LABS = {
    "02_convolution": (Check("check_conv2d_forward", ("conv2d_forward",)),
                       Check("check_conv2d_backward", ("conv2d_forward", "conv2d_backward"), 2)),
    "04_pooling_and_relu": (Check("check_relu", ("relu_forward", "relu_backward")),
                            Check("check_maxpool2d_forward", ("maxpool2d_forward",)),
                            Check("check_maxpool2d_backward", ("maxpool2d_forward", "maxpool2d_backward"), 2)),
    "05_losses": (Check("check_softmax_cross_entropy",
                        ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"), 2),
                  Check("check_sigmoid_cross_entropy",
                        ("sigmoid_cross_entropy_forward", "sigmoid_cross_entropy_backward"), 2)),
    "06_spatial_rnn": (Check("check_spatial_rnn_forward", ("spatial_rnn_forward",)),
                       Check("check_spatial_rnn_backward", ("spatial_rnn_forward", "spatial_rnn_backward"), 2)),
    "07_gated_rnn": (Check("check_gated_rnn_forward", ("gated_rnn_forward",)),
                     Check("check_gated_rnn_backward", ("gated_rnn_forward", "gated_rnn_backward"), 3)),
    "08_numpy_to_cuda": (Check("check_direction_strides", ("direction_strides",)),
                         Check("check_gated_scan_forward_gpu", ("gated_scan_forward_gpu",)),
                         Check("check_gated_scan_backward_gpu", ("gated_scan_forward_gpu", "gated_scan_backward_gpu"),
                               2)),
}


def lab_of(path):
    """The lab a notebook belongs to, from its file name (``07_gated_rnn.ipynb`` -> ``07_gated_rnn``);
    a name a download added to (``07_gated_rnn (1).ipynb``, ``07_gated_rnn-ada.ipynb``) still
    starts with its lab's."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    matches = [lab for lab in LABS if stem == lab or (stem.startswith(lab) and not stem[len(lab)].isalnum())]
    if not matches:
        raise ValueError(f"{path}: not a lab notebook; the labs are {', '.join(LABS)}")
    return max(matches, key=len)


def code_cells(path):
    """The code cells of a notebook, ``.ipynb`` (JSON) or ``.py`` (jupytext percent format), as strings."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    if path.endswith(".ipynb"):
        try:
            notebook = json.loads(text)
            return ["".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                    for cell in notebook["cells"] if cell["cell_type"] == "code"]
        except (ValueError, KeyError, TypeError) as error:  # not JSON, or JSON without notebook cells
            raise ValueError(f"{path} is not a notebook ({type(error).__name__}: {error})") from None
    cells, current, kind = [], [], None
    for line in text.splitlines():
        marker = re.match(r"^# %%(.*)$", line)
        if marker:
            if kind == "code":
                cells.append("\n".join(current))
            kind = "markdown" if "[markdown]" in marker.group(1) else "code"
            current = []
        elif kind is not None:
            current.append(line)
    if kind == "code":
        cells.append("\n".join(current))
    return cells


#: a line that calls a check; notebooks/labs/make_labs.py tags such cells "raises-exception"
CHECK_CALL = re.compile(r"\blabs\.check_\w+\s*\(")


#: cell magics whose body is Python that runs in the notebook's namespace (timed, or its output captured)
PYTHON_CELL_MAGICS = ("time", "timeit", "capture", "prun")


def ipython_as_python(source):
    """A cell's source as the Python Jupyter runs: its magics (``%time f(x)``, ``%%timeit``,
    ``!ls``) written as ``get_ipython()`` calls, as IPython itself writes them; the source as it is
    where IPython is not installed."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:
        return source
    return TransformerManager().transform_cell(source)


def without_check_calls(source, filename):
    """A code cell compiled without its statements that call a check (``labs.check_...(...)``):
    the grader calls every check itself, once, and the student's functions defined in the same
    cell must still be defined. IPython's magics are left out as well (the grader runs no shell and
    times nothing), except that the body of a cell magic that runs Python (``%%time``) runs as plain
    Python. A cell that does not parse is compiled as it is, to fail as it is."""
    try:
        statements = _graded_statements(source, filename)
    except SyntaxError:
        return compile(source, filename, "exec")
    return compile(ast.Module(body=statements, type_ignores=[]), filename, "exec")


def _graded_statements(source, filename):
    def method_call(statement, owner_is):
        call = getattr(statement, "value", None) if isinstance(statement, (ast.Expr, ast.Assign)) else None
        function = getattr(call, "func", None)
        if isinstance(call, ast.Call) and isinstance(function, ast.Attribute) and owner_is(function.value):
            return function.attr, call
        return None, None

    def is_labs(node):
        return isinstance(node, ast.Name) and node.id == "labs"

    def is_ipython(node):  # get_ipython()
        return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "get_ipython"

    statements = []
    for statement in ast.parse(ipython_as_python(source), filename).body:
        check, _ = method_call(statement, is_labs)
        if check and check.startswith("check_"):
            continue
        magic, call = method_call(statement, is_ipython)
        if magic is None:
            statements.append(statement)
        elif not all(isinstance(argument, ast.Constant) for argument in call.args):
            continue
        elif magic == "run_cell_magic" and len(call.args) == 3 and call.args[0].value in PYTHON_CELL_MAGICS:
            statements += _graded_statements(call.args[2].value, filename)
        elif magic == "run_line_magic" and len(call.args) == 2 and call.args[0].value == "time":
            statements += _graded_statements(call.args[1].value, filename)  # %time x = f(): x is kept
    return statements


def failure_summary(message):
    """The one line a grade sheet shows for a failed check: its first hint, which names the
    slip, or else its first problem (not the last, which is often a finite-difference row that
    only says the backward does not match)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Hint: ") and line != "Hint: the same as above.":
            return line
    for number, line in enumerate(lines[:-1]):
        if line.endswith("problem(s):"):
            return lines[number + 1]
    return lines[0] if lines else "failed"


def grade(path, out=None):
    """Run a filled-in lab notebook and every check of its lab; return ``(points, total, rows)``.

    The notebook's code cells run in order in a fresh namespace, without their statements that
    call a check (the grader calls every check itself, once); a cell that raises, or calls
    ``sys.exit``, is reported and skipped. This runs the student's code in this process:
    ``python -m minirnng.labs grade`` runs each notebook in a process of its own instead
    (:func:`grade_isolated`), so that one notebook cannot change another's grades or stop the batch.
    Each row of ``rows`` is ``(check, points earned, points possible, message)``; points earned is
    None for a check this machine cannot run (lab 08 without a C++ compiler), which ``total`` leaves out.
    """
    lab, cell_errors, rows = run_checks(path)
    return print_grades(path, lab, cell_errors, rows, out)


def run_checks(path):
    """``(lab, cell_errors, rows)`` of one notebook: run its cells, then every check of its lab."""
    import matplotlib
    matplotlib.use("Agg")

    lab = lab_of(path)
    namespace = {"__name__": "__lab__"}
    cell_errors = []
    for number, source in enumerate(code_cells(path), start=1):
        try:
            with warnings.catch_warnings(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                warnings.simplefilter("ignore")
                exec(without_check_calls(source, f"<{os.path.basename(path)} code cell {number}>"), namespace)
        except (Exception, SystemExit) as error:  # sys.exit in a cell ends that cell, not the grading
            cell_errors.append(f"code cell {number}: {type(error).__name__}: {error}")
    rows = []
    for check in LABS[lab]:
        missing = [name for name in check.functions if not callable(namespace.get(name))]
        if missing:
            rows.append((check.check, 0, check.points, f"the notebook defines no function {', '.join(missing)}"))
            continue
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                globals()[check.check](*(namespace[name] for name in check.functions))
            rows.append((check.check, check.points, check.points, "passed"))
        except LabCannotRun as error:  # the machine's fault: neither points nor a failure
            rows.append((check.check, None, check.points, f"not graded: {failure_summary(str(error))}"))
        except LabCheckError as error:
            rows.append((check.check, 0, check.points, failure_summary(str(error))))
        except (Exception, SystemExit) as error:  # a bug that escaped the check's own handling
            rows.append((check.check, 0, check.points, f"{type(error).__name__}: {error}"))
    return lab, cell_errors, rows


def print_grades(path, lab, cell_errors, rows, out=None):
    """Print one notebook's grade sheet; return ``(points, total, rows)``."""
    out = sys.stdout if out is None else out
    graded = [row for row in rows if row[1] is not None]
    points = sum(row[1] for row in graded)
    total = sum(row[2] for row in graded)
    print(f"{path} (lab {lab})", file=out)
    for message in cell_errors:
        print(f"  note: {message}", file=out)
    for name, earned, possible, message in rows:
        print(f"  {'-' if earned is None else earned}/{possible}  {name:<32} {message}", file=out)
    not_graded = sum(row[2] for row in rows) - total
    print(f"  score: {points}/{total}" + (f" ({not_graded} more point(s) not graded on this machine)"
                                          if not_graded else ""), file=out)
    return points, total, rows


#: how long one notebook may run, its checks included, under ``python -m minirnng.labs grade``
DEFAULT_TIMEOUT = 600.0


def grade_isolated(path, timeout=DEFAULT_TIMEOUT, out=None):
    """:func:`grade` in a child process: the notebook's code cannot reach the grader or the other
    notebooks (a monkeypatched NumPy, a replaced check, ``os.chdir``, ``os._exit``), and a notebook
    that runs for more than ``timeout`` seconds (an endless loop) is stopped and not graded.
    Returns ``(points, total, rows)``; raises :class:`LabNotGraded` where there is nothing to grade."""
    import subprocess
    import tempfile

    given, path = path, os.path.abspath(path)
    lab_of(path)  # a stray file is named at once, without starting a process
    with tempfile.TemporaryDirectory(prefix="minirnng-grade-") as scratch:
        result_path = os.path.join(scratch, "result.json")
        command = [sys.executable, "-c", "import sys; from minirnng.labs import _grade_in_child; "
                   "_grade_in_child(sys.argv[1], sys.argv[2])", path, result_path]
        try:
            # in the notebook's folder, as Jupyter runs it
            child = subprocess.run(command, cwd=os.path.dirname(path), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabNotGraded(f"it ran for more than {timeout:g} s (an endless loop? --timeout sets the "
                               "limit)") from None
        if not os.path.exists(result_path):
            last = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise LabNotGraded(f"its code ended the grader's process (exit status {child.returncode}: "
                               f"{last[0]}) before the checks ran")
        with open(result_path, encoding="utf-8") as stream:
            result = json.load(stream)
    if "error" in result:
        raise LabNotGraded(result["error"])
    rows = [tuple(row) for row in result["rows"]]
    return print_grades(given, result["lab"], result["cell_errors"], rows, out)


class LabNotGraded(Exception):
    """A notebook the grader could not grade: not a lab, not a notebook, too slow, or its process ended."""


def _grade_in_child(path, result_path):
    """The child of :func:`grade_isolated`: run the checks, write ``{lab, cell_errors, rows}`` or ``{error}``."""
    try:
        lab, cell_errors, rows = run_checks(path)
        result = {"lab": lab, "cell_errors": cell_errors, "rows": rows}
    except Exception as error:  # not a lab or not a notebook: one line in the parent
        result = {"error": f"{type(error).__name__}: {error}"}
    with open(result_path, "w", encoding="utf-8") as stream:
        json.dump(result, stream)


#: the exit status of ``grade`` when some checks could not run here (lab 08 without a C++ compiler)
EXIT_INCOMPLETE = 3


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m minirnng.labs",
                                     description="Grade filled-in minirnng labs, or list the labs and their checks.")
    commands = parser.add_subparsers(dest="command", required=True)
    grading = commands.add_parser("grade", help="run each notebook and every check of its lab; print the scores")
    grading.add_argument("notebooks", nargs="+", help="lab notebooks (.ipynb or jupytext .py), named as the labs")
    grading.add_argument("--csv", help="also write one row per notebook and check to this CSV file")
    grading.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                         help="seconds each notebook may run, its checks included, in its own process "
                              "(default %(default)g)")
    commands.add_parser("list", help="list the labs, their checks and the functions each check takes")
    arguments = parser.parse_args(argv)
    if arguments.command == "list":
        for lab, checks in LABS.items():
            print(lab)
            for check in checks:
                print(f"  {check.check}({', '.join(check.functions)})  {check.points} point(s)")
        return 0
    if not arguments.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {arguments.timeout:g}")
    rows_out, failed, incomplete = [], False, False
    for path in arguments.notebooks:
        try:
            points, total, rows = grade_isolated(path, arguments.timeout)
        except (LabNotGraded, ValueError, OSError) as error:  # not a lab, not a notebook, too slow: one line, a row
            described = str(error) if isinstance(error, LabNotGraded) else f"{type(error).__name__}: {error}"
            print(f"{path}: not graded: {described}")
            rows_out.append((path, "", 0, "", f"not graded: {described}"))
            failed = True
            continue
        failed |= points < total
        incomplete |= any(row[1] is None for row in rows)
        rows_out += [(path, *("" if value is None else value for value in row)) for row in rows]
    if arguments.csv:
        import csv
        with open(arguments.csv, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(("notebook", "check", "points", "possible", "message"))
            writer.writerows(rows_out)
    if incomplete:
        print("Some checks could not run on this machine (see 'not graded'): grade again where they can.")
        return EXIT_INCOMPLETE
    return 1 if failed else 0



if __name__ == "__main__":
    sys.exit(main())
