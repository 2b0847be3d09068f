"""Atomic file writing: a file is either the old one or the complete new one, never half written.

Everything minirnng writes (checkpoints, logs, figures, label maps, JSON results) goes through
:func:`replacing`: the content is written to a temporary file in the target's folder, flushed to
disk, given the permissions of the file it replaces (the usual ones for a new file), and renamed
over the target in one step. A crash or Ctrl-C
at any moment leaves the previous file untouched.

Because the target is replaced rather than written into, a target that is a symbolic link is
replaced by a file (the link's own target is left as it was), and a read-only target is replaced
all the same (renaming needs only the folder to be writable): outputs are files that minirnng
owns, not places it writes through.
"""

import contextlib
import errno
import json
import os
import secrets
import stat


def _create_temporary(folder, prefix, suffix):
    """Create a new, empty file in ``folder`` whose name is unused; return its path.

    Made with the mode 0666, which the OS reduces by the umask (and a folder's default ACL), as it
    does for any new file: the usual permissions without reading the umask, whose only reader,
    ``os.umask``, sets it for the whole process for a moment (a race with other threads' files).
    """
    for _ in range(100):
        temporary = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return temporary
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused temporary name in {folder!r} after 100 tries")


@contextlib.contextmanager
def replacing(path, suffix=None):
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    suffix : the temporary file's extension (some writers choose the format from it); by default
    the extension of ``path``. The folder of ``path`` is created if needed.
    """
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(base)[1] if suffix is None else suffix
    with _naming(path):
        os.makedirs(folder, exist_ok=True)
        # a short prefix: a name near the file system's limit (255 bytes) must still fit with the suffixes
        temporary = _create_temporary(folder, f".{base[:32]}.", f".tmp{suffix[:16]}")
    try:
        # a full disk, say, while the file is written: which file it was (an error about another
        # file, a font Matplotlib cannot find, keeps its own name)
        with _naming(path, about=(None, temporary)):
            yield temporary
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())
            _keep_permissions(path, temporary)
            os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _keep_permissions(path, temporary):
    """Give ``temporary`` the permission bits of the file ``path`` it is about to replace: a
    checkpoint made private (0600) stays private when a later epoch rewrites it. A symbolic link
    is replaced by a file, not written through, so its target's bits are not copied."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(existing.st_mode):
        os.chmod(temporary, stat.S_IMODE(existing.st_mode))


@contextlib.contextmanager
def _naming(path, about=None):
    """An OSError of the file system re-raised naming ``path``, the file the user asked for,
    instead of the hidden temporary file (the same class: ``PermissionError`` stays one). With
    ``about``, only an error whose ``filename`` is one of those (None: it names no file)."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        if (about is not None and error.filename not in about) or reason.startswith("cannot write "):
            raise  # about another file, or named already by a write nested in this one
        try:
            renamed = (type(error)(f"cannot write {path!r}: {error}") if error.errno is None
                       else type(error)(error.errno, f"cannot write {path!r}: {error.strerror}"))
        except TypeError:  # a subclass built otherwise: as it is
            raise error from None
        raise renamed from None


def write_json(path, record):
    """Write ``record`` as indented JSON to ``path`` atomically (results of eval and reproduce).
    A NaN or an infinity is an error, not the bare ``NaN`` token that other JSON readers refuse:
    an undefined score is None (``null``)."""
    with replacing(path) as temporary:
        with open(temporary, "w") as stream:
            try:
                json.dump(record, stream, indent=1, allow_nan=False)
            except ValueError as error:
                raise ValueError(f"cannot write {os.fspath(path)!r}: {error} (a score is NaN or infinite)") from None
    return os.fspath(path)


def check_can_create(path, what):
    """A clear error now, before any work, where ``path`` could not be created later: a file part-way
    along it (where a folder must be), or a nearest existing folder that cannot be written into.
    Missing folders are fine: :func:`replacing` and ``os.makedirs`` create them."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:  # a missing drive ends at its root
        folder = os.path.dirname(folder)
    if os.path.islink(folder) and not os.path.exists(folder):
        raise NotADirectoryError(f"{what} {os.fspath(path)!r} cannot be written: {folder!r} is a symbolic link "
                                 "to nothing")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{what} {os.fspath(path)!r} cannot be written: {folder!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {os.fspath(path)!r} cannot be written: the folder {folder!r} is not writable")
