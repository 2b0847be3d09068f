"""The kernel sources in ``minirnng/kernels/*.cu`` and the signatures of their kernels.

Both ways of running a kernel need to know its parameters: the launcher checks every argument
against them before a launch (so that a Python ``int`` or a ``float64`` array never reaches a
kernel that expects an ``int`` or a ``float*``), and the emulator writes a C++ launch loop and a
ctypes prototype from them. Rather than repeating each signature in Python, they are read from the
source itself: every kernel is declared as::

    extern "C" __global__ void name(const scalar_t* __restrict__ x, scalar_t* y, int n)

with one C type per parameter, drawn from :data:`C_TYPES`, or ``scalar_t``: the floating type
of the variant being compiled (``-Dscalar_t=float`` or ``-Dscalar_t=double``). Comments inside a
parameter list are allowed. A pointer parameter may be passed ``None`` (a null pointer) only when
the kernel compares a pointer of that name with ``nullptr`` (in its own body, or in a ``__device__``
helper it calls that receives it under the same name), i.e. when that kernel is written to handle it.
"""

import functools
import pathlib
import re
from typing import NamedTuple

import numpy

KERNEL_DIRECTORY = pathlib.Path(__file__).resolve().parent.parent / "kernels"

#: The C types a parameter may have (besides ``scalar_t``) and the NumPy dtype each one matches.
C_TYPES = {
    "float": numpy.dtype(numpy.float32),
    "double": numpy.dtype(numpy.float64),
    "int": numpy.dtype(numpy.int32),
    "long long": numpy.dtype(numpy.int64),
    "signed char": numpy.dtype(numpy.int8),
    "unsigned char": numpy.dtype(numpy.uint8),
}
#: Scalars (passed by value) are limited to these, as CuPy's examples recommend: 4-byte ints and floats.
SCALAR_TYPES = ("int", "float", "double", "scalar_t")
#: The value of ``scalar_t`` for each supported dtype: the ``-D`` define both compilers get.
SCALAR_T = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double"}


class Parameter(NamedTuple):
    """One kernel parameter: ``const scalar_t* __restrict__ x`` is
    ``Parameter(name="x", ctype="scalar_t", pointer=True, const=True, nullable=False)``."""
    name: str
    ctype: str
    pointer: bool
    const: bool
    nullable: bool
    declaration: str  # the text as written in the source, reused by the emulator's launcher

    def dtype(self, scalar_dtype):
        """The NumPy dtype this parameter holds when ``scalar_t`` is ``scalar_dtype``."""
        return numpy.dtype(scalar_dtype) if self.ctype == "scalar_t" else C_TYPES[self.ctype]


class Kernel(NamedTuple):
    name: str
    parameters: tuple


# (the "C" of extern "C" is blanked with the other string literals before this is matched)
_KERNEL_DECLARATION = re.compile(r'extern\s+"\s*"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{')
_GLOBAL = re.compile(r"\b__global__\b")
# comments, and string and character literals, whose text may hold anything ("}", "//", "nullptr")
_COMMENT_OR_LITERAL = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.DOTALL)


def _blanked(code):
    """``code`` with comments and the text of literals replaced by spaces (their quotes kept), so that
    what is matched below is code; every position stays where it was."""
    def blank(match):
        text = match.group(0)
        if text[0] in "\"'":
            return text[0] + " " * (len(text) - 2) + text[-1]
        return " " * len(text)
    return _COMMENT_OR_LITERAL.sub(blank, code)


_CONDITIONAL = re.compile(r"[ \t]*#[ \t]*(if|ifdef|ifndef|elif|else|endif)\b(.*)")


def _literal_condition(text):
    """True or False for an ``#if``/``#elif`` condition that is the literal 1 or 0 (in parentheses
    or not), None for any other condition, which only the preprocessor can decide."""
    match = re.fullmatch(r"\s*\(?\s*([01])\s*\)?\s*", text)
    return None if match is None else match.group(1) == "1"


def _dead_branches_blanked(code):
    """``code`` (comments already blanked) with the lines the preprocessor drops for certain
    replaced by spaces: those under ``#if 0``, and after ``#else`` or ``#elif`` once a branch was
    ``#if 1``, nested or not. A branch whose condition is anything else (``#ifdef``, a macro) is kept
    as if taken. So a kernel an author turns off with ``#if 0`` is not read as a kernel."""
    lines = code.split("\n")
    stack = []  # per open #if: (the enclosing code is live, a branch was certainly taken, this one may be)
    live = True
    for number, line in enumerate(lines):
        directive = _CONDITIONAL.fullmatch(line)
        keyword, rest = directive.groups() if directive else (None, "")
        if keyword in ("if", "ifdef", "ifndef"):
            condition = _literal_condition(rest) if keyword == "if" else None
            stack.append((live, condition is True, condition is not False))
            live = live and condition is not False
        elif keyword in ("elif", "else") and stack:
            outer, taken, _ = stack[-1]
            condition = _literal_condition(rest) if keyword == "elif" else True
            this_one = not taken and condition is not False
            stack[-1] = (outer, taken or (this_one and condition is True), this_one)
            live = outer and this_one
        elif keyword == "endif" and stack:
            live = stack.pop()[0]
        elif not live:
            lines[number] = " " * len(line)
    return "\n".join(lines)


def source_path(source_name):
    """Path of ``minirnng/kernels/<source_name>.cu``; a clear error listing the sources if it is absent."""
    path = KERNEL_DIRECTORY / f"{source_name}.cu"
    if not path.is_file():
        raise ValueError(f"there is no kernel source {source_name!r} in {KERNEL_DIRECTORY}; "
                         f"the sources are: {', '.join(source_names())}")
    return path


def source_names():
    """The names of all kernel sources, e.g. ``['activation', 'bias', ...]``."""
    return sorted(path.stem for path in KERNEL_DIRECTORY.glob("*.cu"))


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([\w.]+\.cuh)"[ \t]*$', re.MULTILINE)


@functools.lru_cache(maxsize=None)
def read_source(source_name):
    """The text of a kernel source, its headers pasted in (read once per process).

    A line ``#include "name.cuh"`` is replaced by ``minirnng/kernels/name.cuh`` itself, framed by
    ``#line`` directives so that compiler messages still name the right file and line. Pasting,
    rather than passing an include path to the compilers, keeps each source one self-contained
    text: CuPy's and the emulator's caches are keyed by that text, so editing a header recompiles
    every source that includes it. Headers may not include headers.
    """
    path = source_path(source_name)
    text = path.read_text()

    def paste(match):
        header = KERNEL_DIRECTORY / match.group(1)
        if not header.is_file():
            raise ValueError(f"{path.name} includes {match.group(1)!r}, which is not in {KERNEL_DIRECTORY}")
        header_text = header.read_text()
        if _INCLUDE.search(header_text):
            raise ValueError(f"{header.name} includes another header; minirnng's headers must be self-contained")
        next_line = text.count("\n", 0, match.end()) + 2
        return f"{line_directive(1, header)}\n{header_text}\n{line_directive(next_line, path)}"
    return _INCLUDE.sub(paste, text)


def line_directive(line, path):
    """``#line LINE "PATH"``, so that a compiler's messages name the .cu file: the path written with
    forward slashes and ``\\`` and ``"`` escaped, since it is a C string literal (a Windows path's
    ``\\U`` would start a universal character name)."""
    literal = pathlib.PurePath(path).as_posix().replace("\\", "\\\\").replace('"', '\\"')
    return f'#line {int(line)} "{literal}"'


_DEVICE_FUNCTION = re.compile(r"__device__[^;{()]*?\b(\w+)\s*\(([^)]*)\)\s*\{")


def _body(code, opening):
    """The text from the brace at ``opening`` to its matching closing brace (comments already blanked)."""
    depth = 0
    for position in range(opening, len(code)):
        depth += {"{": 1, "}": -1}.get(code[position], 0)
        if depth == 0:
            return code[opening:position + 1]
    raise ValueError("a kernel source has an unmatched '{'")


def _call_arguments(code, opening):
    """The argument texts of a call whose ``(`` is at ``opening``, split at its top-level commas."""
    depth, start, arguments = 0, opening + 1, []
    for position in range(opening, len(code)):
        character = code[position]
        if character in "([{":
            depth += 1
        elif character in ")]}":
            depth -= 1
            if depth == 0:
                arguments.append(code[start:position])
                return arguments
        elif character == "," and depth == 1:
            arguments.append(code[start:position])
            start = position + 1
    return arguments


def _null_tested(name, body, helpers, seen=()):
    """Whether ``body`` tests ``name`` against nullptr, itself or in a ``__device__`` helper that it
    passes ``name`` to (followed by position: the helper's parameter there may have another name,
    and a helper's own parameter of the same name may be another array)."""
    if re.search(rf"\b{name}\s*[!=]=\s*nullptr\b", body):
        return True
    for helper, (helper_parameters, helper_body) in helpers.items():
        if helper in seen:
            continue
        for call in re.finditer(rf"\b{helper}\s*\(", body):
            for position, argument in enumerate(_call_arguments(body, call.end() - 1)):
                if (argument.strip() == name and position < len(helper_parameters)
                        and _null_tested(helper_parameters[position], helper_body, helpers, seen + (helper,))):
                    return True
    return False


def _parameter_names(parameter_list):
    return [re.fullmatch(r"(.*?)(\w+)", " ".join(text.split())).group(2) if text.strip() else ""
            for text in parameter_list.split(",")]


@functools.lru_cache(maxsize=None)
def kernels(source_name):
    """``{kernel name: Kernel}`` for every ``extern "C" __global__`` kernel of a source."""
    code = _dead_branches_blanked(_blanked(read_source(source_name)))
    helpers = {match.group(1): (_parameter_names(match.group(2)), _body(code, match.end() - 1))
               for match in _DEVICE_FUNCTION.finditer(code)}
    found = {}
    for match in _KERNEL_DECLARATION.finditer(code):
        name, parameter_list = match.groups()
        # Only this kernel's own code says whether it handles a null pointer: another kernel of
        # the same source may test a parameter of the same name that this one reads unconditionally.
        body = _body(code, match.end() - 1)
        texts = [] if parameter_list.strip() in ("", "void") else parameter_list.split(",")
        found[name] = Kernel(name, tuple(_parse_parameter(text, name, source_name, body, helpers) for text in texts))
    # a __global__ that a ';' ends before any '{' is a declaration (a prototype), not a kernel body
    declared = sum(1 for match in _GLOBAL.finditer(code)
                   if re.match(r"[^;{]*\{", code[match.end():]) is not None)
    if declared != len(found):
        raise ValueError(f"{source_name}.cu declares {declared} __global__ kernel(s), of which {len(found)} "
                         f"({', '.join(found) or 'none'}) are written as minirnng reads them: "
                         'extern "C" __global__ void name(parameters) {, each on its own (no extern "C" { } block, '
                         "no __launch_bounds__)")
    return found


def _parse_parameter(text, kernel_name, source_name, body, helpers):
    declaration = " ".join(text.split())
    match = re.fullmatch(r"(.*?)(\w+)", declaration)
    if not match or not match.group(1).strip():
        raise ValueError(f"{source_name}.cu, kernel {kernel_name}: cannot read the parameter {declaration!r}")
    type_text, name = match.group(1), match.group(2)
    if type_text.count("*") > 1:
        raise ValueError(f"{source_name}.cu, kernel {kernel_name}: parameter {name!r} ({declaration}) is a "
                         "pointer to pointers, which no array argument can be; pass one flat array")
    pointer = "*" in type_text
    words = type_text.replace("*", " ").split()
    # the data is read-only only where const comes before the * ("scalar_t* const out" is a
    # constant pointer to data the kernel writes)
    const = "const" in type_text.split("*")[0].split()
    ctype = " ".join(word for word in words if word not in ("const", "__restrict__"))
    allowed = ("scalar_t", *C_TYPES) if pointer else SCALAR_TYPES
    if ctype not in allowed:
        raise ValueError(f"{source_name}.cu, kernel {kernel_name}: parameter {name!r} has type "
                         f"{type_text.strip()!r}; use one of {', '.join(allowed)}"
                         f"{' (pointers)' if pointer else ' (scalars)'}")
    nullable = pointer and _null_tested(name, body, helpers)
    return Parameter(name, ctype, pointer, const, nullable, declaration)
