"""Ctrl-C, SIGTERM and SIGHUP that stop a command every time, and never half-way through a cleanup.

Python turns Ctrl-C into a ``KeyboardInterrupt`` raised wherever the main thread happens to be,
and the command line makes SIGTERM (``kill``, ``timeout``) do the same. Two moments lose it:

- **inside a callback that Python runs for itself**, such as a weak reference's finaliser: the
  exception is printed as "Exception ignored in ..." and dropped, and the command carries on as if
  it had never been asked to stop;
- **inside a library call that wraps whatever it catches**: an ``import`` building an ``enum``
  turns it into a ``RuntimeError``, which the command line would report as a crash.

A third moment loses more than the signal: between creating a resource and recording it (a block
of shared memory, a temporary file), an interrupt leaves it to be found, or leaked, at exit.

So the handler that :func:`handling_signals` installs first *records* the request, then raises
``KeyboardInterrupt`` unless a :func:`deferred` block is running, in which case the block raises
it as it ends. Long loops call :func:`raise_if_requested` at their safe points (the training loop,
once a batch) to stop after a dropped interrupt (whose "Exception ignored" report is then left
out), and the command line treats any error raised while a stop is pending as the stop. Outside :func:`handling_signals` (minirnng used as a library)
nothing changes: :func:`deferred` and :func:`raise_if_requested` do nothing, since no request can
be recorded.
"""

import contextlib
import signal
import sys
import threading

#: The signals that stop a command: Ctrl-C, ``kill``'s default, and where there is one the hang-up
#: of a closed terminal or a dropped ssh session (sent to the whole process group: without a handler
#: it would kill the workers and the resource tracker with this process, and leave their shared
#: memory in /dev/shm until the machine restarts). Under ``nohup`` SIGHUP is ignored and stays so.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class _State:
    requested = False  # a stop signal has arrived since handling_signals began
    deferring = 0  # how many deferred() blocks are running (they nest)
    held = False  # a signal arrived inside them: the outermost raises it as it ends


_state = _State()


def requested():
    """Whether a stop signal has arrived (inside :func:`handling_signals`)."""
    return _state.requested


def raise_if_requested():
    """Raise ``KeyboardInterrupt`` if a stop signal has arrived; call it where stopping is safe."""
    if _state.requested:
        raise KeyboardInterrupt


def request_stop(signal_number=None, frame=None):
    """The signal handler: record the request, and raise now unless a :func:`deferred` block runs."""
    _state.requested = True
    if _state.deferring:
        _state.held = True
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """A block that a stop signal does not cut in two: an interrupt arriving inside it is raised
    as it ends. For the few lines that create a resource and record where it is, or release it.
    (Only a signal that arrived inside the block is raised: cleanup that runs because of an
    earlier interrupt is not cut short by it again.)"""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if not _state.deferring and _state.held:
        _state.held = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_held():
    """A block that the stop signals wait outside of, even where :func:`handling_signals` is not in
    force (a library call from a notebook or a script, where Ctrl-C raises KeyboardInterrupt at
    once): a stop that arrives inside is recorded, and delivered again, to the handler that was
    there before, as the block ends. For the one call that creates a resource the operating system
    keeps after the process (a shared-memory block) and the line that records it. (Blocking the
    signal would not do: a process-wide signal goes to any thread that does not block it, and a
    notebook's kernel has several.) Signal handlers belong to the main thread: elsewhere the block
    changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived, previous = [], {}

    def record(number, frame):
        arrived.append(number)

    try:
        for number in STOP_SIGNALS:
            # a signal that is ignored, or whose handler Python did not install, is left as it is
            if signal.getsignal(number) not in (signal.SIG_IGN, None):
                previous[number] = signal.signal(number, record)
        yield
    finally:
        # Every handler goes back, even when a Ctrl-C reaches one already restored while the next
        # is (signal.signal runs the handlers of pending signals first): a handler left recording
        # would swallow every later stop of the program.
        interrupt = None
        for number, handler in previous.items():
            while signal.getsignal(number) is not handler:
                try:
                    signal.signal(number, handler)
                except KeyboardInterrupt as error:
                    interrupt = error
        if interrupt is not None:
            raise interrupt
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


@contextlib.contextmanager
def _hangup_ignored():
    """A block whose child processes ignore SIGHUP (held for this process meanwhile). For
    multiprocessing's resource tracker, which ignores SIGINT and SIGTERM itself but not a hang-up:
    a closed terminal's SIGHUP to the group would kill it, and a new one, started when this process
    frees its shared memory, would not know the blocks and print a traceback for each."""
    hangup = getattr(signal, "SIGHUP", None)
    # a handler installed outside Python (getsignal gives None) could not be put back: left alone
    if hangup is None or not hasattr(signal, "pthread_sigmask") or signal.getsignal(hangup) is None:
        yield
        return
    previous = None
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, (hangup,))
        previous = signal.signal(hangup, signal.SIG_IGN)
        yield
    finally:
        if previous is not None:
            signal.signal(hangup, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (hangup,))


@contextlib.contextmanager
def ignored_by_children():
    """Start child processes inside this block: they ignore :data:`STOP_SIGNALS` from their first
    instruction (an ignored signal stays ignored across ``exec``), so that Ctrl-C and a ``kill`` of
    the whole group stop them only through this process, which closes them; and a stop that reaches
    this process meanwhile is held (blocked, on systems that can block a signal) and arrives as the
    block ends, instead of being ignored with them. Signal handlers belong to the main thread:
    elsewhere the block changes nothing.

    The hold covers the main thread only: a stop that the system hands to another thread of this
    process (tqdm's monitor, OpenBLAS's threads) while the block runs is ignored, and lost. Only a
    disposition of "ignore" survives ``exec`` into the child, so no handler can record it instead;
    keep the block to the start of the child and nothing more (:class:`minirnng.processes.WorkerProcess`
    sends its model afterwards, so its block lasts about as long as fork and exec)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    can_block = hasattr(signal, "pthread_sigmask")  # not on Windows
    if can_block:
        # Starting the first child with spawn starts multiprocessing's resource tracker, which
        # blocks and then unblocks the stop signals itself: inside this block, where they are
        # ignored, that would discard a stop held until now. Started here first, it does not.
        from multiprocessing import resource_tracker
        with _hangup_ignored():
            resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if can_block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def handling_signals():
    """Install :func:`request_stop` for :data:`STOP_SIGNALS` (those not ignored) for the duration of
    the block, then put the previous handlers back (the command line's :func:`minirnng.cli.main` runs inside other
    programs too, such as the tests). Signal handlers belong to the main thread: elsewhere the block
    changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a signal that the caller ignores stays ignored: a shell starts a background job (`&`) with
    # SIGINT ignored, so that Ctrl-C in the terminal does not reach it
    previous = {number: signal.signal(number, request_stop) for number in STOP_SIGNALS
                if signal.getsignal(number) is not signal.SIG_IGN}
    previous_hook = sys.unraisablehook

    def report_unraisable(unraisable):
        # a stop dropped inside a finaliser is recorded and raised at the next check: no
        # "Exception ignored in ..." traceback before the command's one-line message
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _state.requested):
            previous_hook(unraisable)

    sys.unraisablehook = report_unraisable
    _state.requested = _state.held = False
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        sys.unraisablehook = previous_hook
        _state.requested = _state.held = False
