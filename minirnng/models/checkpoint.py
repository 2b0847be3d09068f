"""Checkpoints: a model's named parameters and a JSON header in one ``.npz`` file.

Layout of the file (a NumPy ``.npz``, read with ``allow_pickle=False``):

``__header__``
    uint8 bytes of a JSON object: ``format``, ``format_version``, ``architecture`` (e.g. ``"rnng"``),
    ``config`` (the constructor arguments; a CNN-CRF's holds its CRF's settings as ``crf``, a dict,
    and loads with the CRF's defaults where a checkpoint written before they were stored has none),
    ``classes`` (names), ``input_size`` ([H, W]),
    ``minirnng_version``, and whatever metadata the writer adds (training state, scores).
``<layer>.<parameter>``
    One array per parameter, named and shaped as PyTorch's ``state_dict`` of the same network
    (``conv1.weight`` (16, 3, 5, 5), ``deconv6.weight`` (32, 16, 4, 4), ``rnn.left_to_right.W``, ...).
``extra/<name>``
    Optional arrays the writer adds, e.g. the optimizer's moments for ``--resume``.

So the parameters load into an equivalent PyTorch module with
``module.load_state_dict({k: torch.from_numpy(v) for k, v in load_arrays(path).items()})``.

Files are written atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the target, so a crash never leaves a half-written checkpoint where a good one was.
"""

import inspect
import json
import os
import math
import tokenize
import zipfile
import zlib

import numpy

from .. import __version__, backend
from ..atomic import replacing
from ..layers.base import check_dtype

FORMAT = "minirnng-checkpoint"
FORMAT_VERSION = 1
HEADER_KEY = "__header__"
#: the header's own fields, which save_model's metadata may not replace
HEADER_FIELDS = ("format", "format_version", "architecture", "config", "classes", "input_size", "minirnng_version")
EXTRA_PREFIX = "extra/"
#: the architectures of :mod:`.stage2`'s checkpoints (the two-stage parser and its component
#: networks), which :func:`load_model` does not build but names: by name only, as stage2.py
#: imports this module (tests/test_models.py checks that the list matches stage2's registry)
STAGE2_ARCHITECTURES = ("two-stage", "eye-brow-net", "nose-net", "mouth-net")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and the problem."""


def write_npz_atomically(path, arrays):
    """Write ``arrays`` (name -> array) to ``path`` as .npz, atomically (:mod:`minirnng.atomic`)."""
    with replacing(path) as temporary:
        with open(temporary, "wb") as stream:  # a file object: numpy.savez would append ".npz" to a name
            numpy.savez(stream, **arrays)
    return os.fspath(path)


def save_model(model, path, input_size=(128, 128), extra_arrays=None, **metadata):
    """Save ``model`` to ``path``: parameters, a JSON header with ``metadata``, and ``extra_arrays``.

    What :func:`read_checkpoint` would refuse is refused here, before anything is written, so that
    a file that loads is never replaced by one that does not: parameters that are not real
    floating point or hold NaN or infinity, an extra array of Python objects, class names that do
    not match the model's outputs or are not strings, an input size that is not two positive whole
    numbers, metadata that JSON cannot store or that would replace the header's own fields
    (``classes``, ``config``, ...). NumPy scalars in the metadata (a ``numpy.float32`` accuracy) are
    stored as the Python numbers they are.
    """
    where = f"{os.fspath(path)!r} was not written"
    taken = sorted(set(metadata) & set(HEADER_FIELDS))
    if taken:
        raise ValueError(f"save_model: metadata {taken} would replace the checkpoint's own header field(s) "
                         f"(set model.classes, or pass input_size); {where}")
    if isinstance(input_size, (str, bytes)) or len(input_size) != 2 or not all(
            isinstance(s, (int, numpy.integer)) and not isinstance(s, (bool, numpy.bool_)) for s in input_size):
        raise ValueError(f"save_model: input_size must be (height, width) in whole pixels, got {input_size!r}; {where}")
    classes = list(model.classes) if model.classes is not None else None
    n_classes = getattr(model, "n_classes", None)
    if classes is not None and n_classes is not None and len(classes) != n_classes:
        raise ValueError(f"save_model: the model has {n_classes} outputs but {len(classes)} class names "
                         f"{classes}; set model.classes to one name per output; {os.fspath(path)!r} was not written")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.architecture,
        "config": model.config(),
        "classes": classes,
        "input_size": [int(s) for s in input_size],
        "minirnng_version": __version__,
    }
    problem = header_problem(header)
    if problem:
        raise ValueError(f"save_model: the checkpoint {problem}; {where}")
    header.update(metadata)
    arrays = {name: backend.to_numpy(value) for name, value in model.params().items()}
    for name, value in arrays.items():
        problem = unusable_parameter(value)
        if problem:
            raise ValueError(f"save_model: parameter {name} {problem}; {os.fspath(path)!r} was not written")
    for name, value in (extra_arrays or {}).items():
        value = backend.to_numpy(value)
        if value.dtype.hasobject:
            raise TypeError(f"save_model: extra array {name!r} holds Python objects, which a checkpoint "
                            f"(read without pickle) cannot store; {os.fspath(path)!r} was not written")
        arrays[EXTRA_PREFIX + name] = value
    try:
        # NaN and infinities are no JSON (other readers refuse Python's bare NaN): an undefined score is null
        text = json.dumps(_undefined_as_none(header), default=_json_number, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"save_model: the checkpoint's header cannot be stored as JSON ({error}); "
                        f"{os.fspath(path)!r} was not written") from None
    arrays[HEADER_KEY] = numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)
    return write_npz_atomically(path, arrays)


def _undefined_as_none(value):
    """``value`` with every float that is NaN or infinite (a score of a class that never occurs)
    replaced by None, through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {key: _undefined_as_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_undefined_as_none(item) for item in value]
    if isinstance(value, (float, numpy.floating)) and not math.isfinite(value):
        return None
    return value


def _json_number(value):
    """``json.dumps``'s fallback: NumPy scalars as Python numbers; anything else is refused."""
    if isinstance(value, (numpy.integer, numpy.floating, numpy.bool_)):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def unusable_parameter(value):
    """Why the parameter array ``value`` cannot be stored or loaded, or None where it can: every
    writer of a checkpoint stores real floats (integers in a file mean something else made it),
    and a NaN or an infinity makes the weights unusable."""
    if value.dtype.kind != "f":
        return f"has dtype {value.dtype}, not real floating point"
    finite = numpy.isfinite(value)
    if not finite.all():
        return (f"holds {value.size - int(finite.sum())} NaN or infinite value(s) of {value.size}; "
                "the weights are unusable")
    return None


def read_checkpoint(path):
    """Read ``path`` -> ``(header dict, parameter arrays dict, extra arrays dict)``, all checked.

    Every reader of a checkpoint file goes through here (:func:`load_model`, the two-stage loader,
    ``--resume``, :func:`load_arrays` for PyTorch), so the header's fields that loaders use and the
    parameters themselves are checked here once: a hand-edited or foreign file is a one-line
    :class:`CheckpointError` naming the file, not a traceback from deep inside a constructor, and
    NaN, complex or integer weights never load silently (NaN weights would parse every image as
    background). The checks read each parameter once; next to reading the file they cost nothing.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder; give the .npz file (a run's folder holds "
                              "best.npz and last.npz)")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    # numpy.load decides by the first bytes too: a .npy file would come back as a bare array, and
    # anything else would be offered to pickle
    if magic != b"PK\x03\x04":
        what = "empty" if not magic else "a single .npy array" if magic == b"\x93NUM" else "not a .npz archive"
        raise CheckpointError(f"checkpoint {path!r} is not a minirnng checkpoint: the file is {what} "
                              "(a checkpoint is a .npz written by save or train)")
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    # zipfile and zlib fail in their own ways on damaged bytes (a compression method that does not
    # exist, a deflate stream that does not decode): each is the file's fault, none a bug
    # A damaged .npy header can fail NumPy's parser of it (TokenError, SyntaxError, RecursionError),
    # and one that claims a size beyond memory fails the allocation (MemoryError): the file's fault too
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
            NotImplementedError, RuntimeError, MemoryError, SyntaxError, tokenize.TokenError) as error:
        if "allow_pickle=False" in str(error):
            raise CheckpointError(f"checkpoint {path!r} holds Python objects (a pickled array), which minirnng "
                                  "never writes and does not load (allow_pickle=False): not a minirnng "
                                  "checkpoint, or one altered") from None
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated ({type(error).__name__}: {error})") from None
    # numpy.load hands back the raw bytes of a member that is not a .npy file instead of failing
    for name, value in arrays.items():
        if not isinstance(value, numpy.ndarray):
            raise CheckpointError(f"checkpoint {path!r} is corrupt: its entry {name!r} is not a .npy array")
    if HEADER_KEY not in arrays:
        raise CheckpointError(f"checkpoint {path!r} has no {HEADER_KEY} entry: not a minirnng checkpoint")
    header = arrays.pop(HEADER_KEY)
    if header.dtype != numpy.uint8:
        raise CheckpointError(f"checkpoint {path!r} has an unreadable header (an array of {header.dtype}, "
                              "not the uint8 bytes of a JSON object)")
    try:
        header = json.loads(header.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"checkpoint {path!r} has an unreadable header ({type(error).__name__}: "
                              f"{error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path!r} has a header that is a JSON {type(header).__name__}, "
                              "not an object: not a minirnng checkpoint")
    problem = header_problem(header)
    if problem:
        raise CheckpointError(f"checkpoint {path!r} {problem}")
    extra = {name[len(EXTRA_PREFIX):]: value for name, value in arrays.items() if name.startswith(EXTRA_PREFIX)}
    params = {name: value for name, value in arrays.items() if not name.startswith(EXTRA_PREFIX)}
    for name, value in params.items():
        problem = unusable_parameter(value)  # stricter than load_params, which takes any real numbers
        if problem:
            raise CheckpointError(f"checkpoint {path!r}: parameter {name} {problem}")
    return header, params, extra


def header_problem(header):
    """What is wrong with a checkpoint's header (a dict), as the end of a sentence about the file
    ("has classes ... in its header, not a list of names"), or None: the fields that loaders use.
    :func:`read_checkpoint` refuses such a file, and :func:`save_model` refuses to write one."""
    if header.get("format") != FORMAT:
        return f"is not a minirnng checkpoint (format {header.get('format')!r})"
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        return f"has format version {version!r}, not an integer"
    if version > FORMAT_VERSION:
        return (f"has format version {version}, newer than this minirnng ({__version__}) reads "
                f"({FORMAT_VERSION}); upgrade minirnng")
    if not isinstance(header.get("architecture"), str):
        return f"has architecture {header.get('architecture')!r} in its header, not a name such as 'rnng'"
    if not isinstance(header.get("config", {}), dict):
        return f"has a config that is a JSON {type(header['config']).__name__}, not an object of constructor arguments"
    size = header.get("input_size", [128, 128])
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return f"has input size {size!r} in its header, not [height, width] in pixels"
    classes = header.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return f"has classes {classes!r} in its header, not a list of names"
    return None


def load_arrays(path):
    """Only the named parameter arrays of a checkpoint (e.g. for PyTorch's ``load_state_dict``), in
    the machine's byte order (``torch.from_numpy`` refuses any other; a file written on a
    big-endian machine holds big-endian arrays)."""
    return {name: value.astype(value.dtype.newbyteorder("="), copy=False)
            for name, value in read_checkpoint(path)[1].items()}


def load_model(path, dtype=numpy.float32, expect=None):
    """Rebuild the model a checkpoint describes and load its parameters.

    expect : optional architecture name the caller needs (``"rnng"``, ...); a different one is an error.
    Returns the model; its header is in ``model.checkpoint_header``.
    """
    from . import ARCHITECTURES

    dtype = check_dtype(dtype, "load_model")  # the caller's argument, not the file's fault
    header, params, _ = read_checkpoint(path)
    architecture = header.get("architecture")
    if architecture in STAGE2_ARCHITECTURES:
        how = ("TwoStageParser.load or load_stage2_model (`minirnng parse --classes 11 --checkpoint` reads it)"
               if architecture == "two-stage" else "load_stage2_model or the component network's own load")
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds a {architecture!r} model of stage 2, "
                              f"which load_model does not build: load it with {how}")
    if expect is not None and architecture != expect:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds a {architecture!r} model, not {expect!r}")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: unknown architecture {architecture!r}; "
                              f"known: {', '.join(sorted(ARCHITECTURES))}")
    model = build_from_config(ARCHITECTURES[architecture], header.get("config", {}), dtype,
                              f"checkpoint {os.fspath(path)!r}", header.get("minirnng_version"))
    try:
        model.load_params(params, source=f"checkpoint {os.fspath(path)!r}")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    classes = header.get("classes")
    if classes is not None and len(classes) != getattr(model, "n_classes", len(classes)):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} names {len(classes)} classes {classes} for a "
                              f"network with {model.n_classes} outputs")
    model.classes = classes
    model.checkpoint_header = header
    return model


def build_from_config(model_class, config, dtype, where, written_by=None):
    """A fresh ``model_class(**config)`` for a loader, or a :class:`CheckpointError` about ``where``
    (the checkpoint, as messages name it).

    The config's keys are checked against the constructor's arguments first, so a checkpoint of
    another minirnng version (a setting added or renamed since) names the key it does not know
    instead of a ``TypeError`` about ``__init__``; ``rng`` and ``dtype`` are the loader's, never a
    checkpoint's. A value the constructor refuses (a string for ``n_classes``) is an error about
    the file too. written_by : the minirnng version in the header, for the message.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: a {model_class.architecture!r} network's config is a JSON "
                              f"{type(config).__name__}, not an object of constructor arguments")
    accepted = set(inspect.signature(model_class).parameters) - {"rng", "dtype"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        written = f"; the file was written by minirnng {written_by}" if written_by else ""
        raise CheckpointError(f"{where}: unknown config key(s) {unknown} for a {model_class.architecture!r} "
                              f"model (minirnng {__version__} knows {sorted(accepted)}{written})")
    try:
        return model_class(**config, dtype=dtype)
    except (TypeError, ValueError, OverflowError, MemoryError) as error:
        # MemoryError: sizes beyond any machine ("hidden": 1000000000), named rather than bare
        problem = f"{type(error).__name__}: {error}" if isinstance(error, MemoryError) else error
        raise CheckpointError(f"{where}: its config {config} does not build a {model_class.architecture!r} "
                              f"model ({problem})") from None
