"""Data parallelism in worker processes: :class:`DataParallel` without the interpreter lock.

:class:`minirnng.parallel.DataParallel` shares each batch among threads; NumPy releases Python's
interpreter lock inside its products and sweeps, but not in the Python between them, so two
threads lose time waiting for each other (docs/benchmarks.md: two half-batch passes side by side
take 22% longer than one alone, most of it in the recurrence's many small operations). Worker
*processes* have an interpreter each. :class:`ProcessParallel` is :class:`DataParallel` with
shards 1, 2, ... run in processes instead of threads (shard 0 still runs on the model, in the
calling thread), and the same results to the last bit: each process holds a replica of the model
and runs the same :func:`minirnng.parallel.shard_pass`.

What crosses between the processes, and how:

- **Arrays go through shared memory** (:class:`SharedArrays`): the parameters and the shard's
  images (or its output gradients) one way, the outputs (or the shard's parameter gradients and
  image gradient) the other; for a training step (``objective_step``) the shard's images and its
  part of the batch's targets one way, its parameter gradients and the values of its terms the
  other (with the soft Dice term: its logits back after the first round, their gradient out in
  the second, ``objective_finish``). Each direction has a block of shared memory owned by its writer,
  which grows when a larger batch needs it; a pass copies each array once on each side (a few MB
  at batch 16: a fraction of a millisecond).
- **Commands go through a pipe**: a method name and where each array lies in the block (for a
  training step also the objective, without its caches, and the batch's counts), and back ``"ok"``
  or the exception that the shard raised, which is raised in the caller.
- **A worker keeps what the backward pass needs** (the forward's caches) in its own replica, as a
  worker thread does.

Each worker runs its products on one OpenBLAS thread (``OPENBLAS_NUM_THREADS=1`` is set for the
workers as they start) and keeps freed memory for reuse (:func:`minirnng.train.keep_freed_memory`).
They are started with ``spawn`` (a fresh interpreter: safe with threads in the parent, and on
every OS), which takes about half a second each, once. :meth:`ProcessParallel.close` (or leaving a
``with`` block, or the end of the program) stops them and frees their shared memory.
"""

import contextlib
import multiprocessing
import os
import signal
import sys
import traceback
import weakref
from multiprocessing import shared_memory

import numpy

from . import backend, interruption
from .parallel import DataParallel, checked_replica, shard_pass

#: Every array in a block starts at a multiple of this many bytes (a cache line).
ALIGNMENT = 64
#: Environment variables that keep each worker's BLAS to one thread (its core is its own).
ONE_BLAS_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


class SharedArrays:
    """A block of shared memory that one process writes arrays into and another reads them from.

    ``message = block.write({"name": array, ...})`` copies the arrays in (growing the block if they
    do not fit) and returns a small picklable description; the reader passes it to
    :func:`read_shared`. The writer owns the block: :meth:`close` frees it.
    """

    def __init__(self):
        self.block = None

    def write(self, arrays):
        layout, size = [], 0
        for name, array in arrays.items():
            array = numpy.asarray(array)
            layout.append((name, array.shape, array.dtype.str, size))
            size += -(-array.nbytes // ALIGNMENT) * ALIGNMENT
        if self.block is None or self.block.size < size:
            self._grow(size)
        for (name, shape, dtype, offset), array in zip(layout, arrays.values()):
            numpy.ndarray(shape, dtype, buffer=self.block.buf, offset=offset)[...] = array
        return self.block.name, layout

    def _grow(self, size):
        # A new block with room to spare, so that a few larger batches do not each need one; the
        # old block is freed once its readers let go of it (unlinking only removes its name).
        self.close()
        # a block created but not recorded would never be freed, not even when the program ends
        with interruption.deferred(), interruption.signals_held():
            self.block = shared_memory.SharedMemory(create=True, size=max(2 * size, 1 << 20))

    def close(self):
        with interruption.deferred():
            if self.block is not None:
                self.block.close()
                try:
                    self.block.unlink()
                except FileNotFoundError:
                    pass
                self.block = None


class SharedArraysReader:
    """The reading end of a :class:`SharedArrays`: attaches to the writer's current block."""

    def __init__(self):
        self.blocks = {}  # name -> SharedMemory; earlier blocks stay attached until close

    def read(self, message):
        """The arrays of a :meth:`SharedArrays.write`, as views into the block (copy what must
        outlive the next message: the writer reuses the block)."""
        name, layout = message
        if name not in self.blocks:
            # The writer grew its block. The old one stays mapped until close: a view into it that a
            # caller still holds would crash the process if it were unmapped now, and blocks double
            # in size, so the ones kept add up to less than the newest.
            with interruption.deferred(), interruption.signals_held():
                self.blocks[name] = shared_memory.SharedMemory(name=name)
        buffer = self.blocks[name].buf
        return {key: numpy.ndarray(shape, dtype, buffer=buffer, offset=offset)
                for key, shape, dtype, offset in layout}

    def close(self, unlink=False):
        """Let go of the blocks; ``unlink``: free them as well (their writer died before it could)."""
        for block in self.blocks.values():
            try:
                block.close()
            except BufferError:  # a view is still alive somewhere; the OS frees it at exit
                pass
            if unlink:
                try:
                    block.unlink()
                except FileNotFoundError:
                    pass
        self.blocks = {}


def serve(connection, backend_name):
    """A worker process's loop: receive the model, then a command at a time; run the shard on the
    replica, reply.

    The replica is rebuilt from the received copy (``model.replica()``): unpickling copies the
    arrays that the four-way layers share as views apart, and a rebuilt model has them shared again.
    ``backend_name`` is the parent's backend for the model (:func:`minirnng.backend.matching`): the
    worker computes as the parent does, not by its own default (CuPy on a machine with a GPU,
    where the parent may have chosen NumPy).
    """
    from .train import keep_freed_memory

    try:
        model = connection.recv()
    except (EOFError, KeyboardInterrupt):
        return  # the parent stopped before it had sent the model: nothing to serve
    if model is None:
        return  # the parent closed this worker instead (a stop while it was starting)
    backend.select(backend_name)
    keep_freed_memory()
    replica = model.replica()
    inbox, outbox = SharedArraysReader(), SharedArrays()
    try:
        while True:
            command = connection.recv()
            if command is None:
                break
            method, message, options, errors = command
            try:
                arrays = inbox.read(message)
                params = {name[len("param:"):]: value for name, value in arrays.items() if name.startswith("param:")}
                if method in ("backward", "objective_finish"):
                    inputs = {"grads": {name[len("grad:"):]: value for name, value in arrays.items()
                                        if name.startswith("grad:")}}
                else:
                    # the forward keeps its input for the backward: a copy, since the block is reused
                    inputs = {"images": arrays["images"].copy()}
                    if method == "objective_step":  # read during this command only: views will do
                        inputs["batch"] = {name[len("batch:"):]: value for name, value in arrays.items()
                                           if name.startswith("batch:")}
                result, grads = shard_pass(replica, method, inputs, options, params or None, errors)
                del arrays, inputs
                connection.send(("ok", outbox.write(flatten_result(result, grads))))
            except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
                connection.send(("error", picklable(error)))
    except (EOFError, KeyboardInterrupt):
        pass  # the parent has gone (or is being interrupted): nothing left to serve
    finally:
        inbox.close()
        outbox.close()


def flatten_result(result, grads):
    """A shard's ``(result, grads)`` as one flat dict of arrays for :class:`SharedArrays`."""
    arrays = {}
    if isinstance(result, dict):
        arrays.update((f"output:{name}", value) for name, value in result.items())
    elif result is not None:
        arrays["result"] = result
    if grads is not None:
        arrays.update((f"grad:{name}", value) for name, value in grads.items())
    return arrays


def unflatten_result(arrays):
    """The inverse of :func:`flatten_result`, with every array copied out of the shared block."""
    outputs = {name[len("output:"):]: value.copy() for name, value in arrays.items() if name.startswith("output:")}
    grads = {name[len("grad:"):]: value.copy() for name, value in arrays.items() if name.startswith("grad:")}
    result = outputs or (arrays["result"].copy() if "result" in arrays else None)
    return result, (grads or None)


def picklable(error):
    """``error`` itself if it survives pickling, else a RuntimeError with its traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle
        return RuntimeError("".join(traceback.format_exception(error)))


@contextlib.contextmanager
def main_script_hidden():
    """Start processes without the main script: ``spawn`` runs the script of ``__main__`` again in
    each new process (as ``__mp_main__``) so that functions defined there can be found, and a script
    that trains at its top level, without an ``if __name__ == "__main__":`` guard, would train again
    in every worker. A worker needs only minirnng (:func:`serve` and the model's classes), so the
    main module's ``__file__`` and ``__spec__``, from which ``spawn`` finds the script, are hidden
    while the process starts."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class WorkerProcess:
    """One worker process with its replica, its pipe and the shared block that feeds it."""

    def __init__(self, model, index):
        # True from a command's sending until its reply is read: a pass cut short in between (Ctrl-C
        # in a notebook) leaves the reply in the pipe, where it would answer the next command
        self.reply_owed = False
        # True once collect() has reported the worker gone: the next pass from images gets a fresh one
        self.failed = False
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.outbox, self.inbox = SharedArrays(), SharedArraysReader()
        backend_name = backend.matching(next(iter(model.params().values())))
        self.process = context.Process(target=serve, args=(child, backend_name),
                                       name=f"minirnng-shard-{index}", daemon=True)
        saved = {name: os.environ.get(name) for name in ONE_BLAS_THREAD}
        os.environ.update(ONE_BLAS_THREAD)  # inherited by the worker as it starts, before NumPy loads
        # Ctrl-C (and `kill` of the whole group) reaches every process of the group; a worker
        # ignores both and stops when the parent, which handles them, closes the pipe, freeing its
        # shared memory. Otherwise a worker interrupted while starting prints a traceback after the
        # parent's one-line message, and one killed leaves its shared memory to the tracker.
        try:
            with interruption.ignored_by_children(), main_script_hidden():
                self.process.start()
        except BaseException:
            if self.process.pid is not None:  # started, and a stop held meanwhile arrived
                child.close()
                self.close()
            raise
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        child.close()
        # The model goes through the pipe once the worker runs, not as its argument: spawn writes its
        # arguments to the child inside the block above, and a write larger than the pipe's buffer
        # waits there for the child's interpreter to start (half a second), a time in which a stop
        # that reaches another thread of this process would be ignored and lost. With small
        # arguments the block lasts about as long as fork and exec.
        try:
            self.connection.send(model)
        except OSError:
            pass  # the worker has gone already: the first pass's collect() says so
        except BaseException:
            self.process.kill()  # a stop while sending: the worker may hold half a model
            self.close()
            raise

    def submit(self, method, inputs, options, params, errors=None):
        arrays = {f"param:{name}": value for name, value in (params or {}).items()}
        if method in ("backward", "objective_finish"):
            arrays.update((f"grad:{name}", value) for name, value in inputs["grads"].items())
        else:
            arrays["images"] = inputs["images"]
            arrays.update((f"batch:{name}", value) for name, value in inputs.get("batch", {}).items())
        try:
            self.connection.send((method, self.outbox.write(arrays), options, errors))
            self.sent = self.reply_owed = True
        except OSError:  # a broken pipe: the worker has gone; collect() says so
            self.sent = False

    def collect(self):
        """The shard's ``(result, grads)``, or the exception it raised (returned, not raised)."""
        try:
            if not self.sent:
                raise EOFError
            status, payload = self.connection.recv()
            self.reply_owed = False
        except (EOFError, OSError):
            self.process.join(timeout=1)
            self.failed, self.reply_owed = True, False  # no reply can come any more
            return ChildProcessError(f"ProcessParallel: worker process {self.process.name} (pid {self.process.pid}) "
                                     f"stopped unexpectedly ({describe_exit(self.process.exitcode)})")
        if status == "error":
            return payload
        return unflatten_result(self.inbox.read(payload))

    def close(self):
        try:
            self.connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            # it ignores SIGTERM, as it ignores Ctrl-C (__init__): a shard that does not finish
            # within the wait is stopped by SIGKILL, or Ctrl-C could never end the program
            self.process.kill()
            self.process.join()
        self.connection.close()
        # a worker that was killed, or crashed, did not free the blocks it wrote its replies in: those
        # read here are freed now (one it made for a reply never sent, the resource tracker frees at exit)
        self.inbox.close(unlink=self.process.exitcode != 0)
        self.outbox.close()


class ProcessParallel(DataParallel):
    """:class:`~minirnng.parallel.DataParallel` with worker processes instead of threads.

    ``ProcessParallel(model, workers)`` starts ``workers - 1`` processes (none for a model on the
    GPU, or for ``workers=1``), each with a replica of the model; shard 0 runs on the model itself
    in the calling thread. The interface and the results are :class:`DataParallel`'s, bit for bit
    where the threads' products run on one OpenBLAS thread each (as under the command line).
    Use it in a ``with`` block, or call :meth:`close`, to stop the processes; the end of the
    program also stops them.
    """

    def _start_replicas(self, count):
        template = checked_replica(self.model, type(self).__name__)
        workers = []
        try:
            for index in range(1, count + 1):
                workers.append(WorkerProcess(template, index))
        except BaseException:
            for worker in workers:
                worker.close()
            raise
        # the finalizer's own list, which _submit keeps up to date when it replaces a worker
        self._workers = list(workers)
        self._finalizer = weakref.finalize(self, close_workers, self._workers)
        return workers

    def _submit(self, index, method, inputs, options, params, errors):
        worker = self.replicas[index]
        # An interrupted pass left a reply in the pipe: a fresh worker instead of a wrong answer.
        # A worker that died is replaced only once a pass has said so (a death between two passes
        # is found by sending to it), and not for a backward (or an objective_finish), whose forward it
        # alone held: a fresh worker would answer "no forward pass" instead of the death that is the cause.
        if worker.reply_owed or (worker.failed and method not in ("backward", "objective_finish")):
            worker.close()
            worker = WorkerProcess(checked_replica(self.model, type(self).__name__), index)
            self.replicas[index] = self._workers[index - 1] = worker
        worker.submit(method, inputs, options, params, errors)
        return worker

    def _collect(self, worker):
        return worker.collect()

    def close(self):
        """Stop the worker processes and free their shared memory; the instance cannot run split
        passes afterwards (it runs them unsplit on the model)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self.replicas = [self.model]


def describe_exit(exitcode):
    """A worker process's exit code in words: ``killed by signal 9 (SIGKILL)``, ``exit code 1``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-exitcode} ({name})"
    return f"exit code {exitcode}"


def close_workers(workers):
    # all of them, even when a second Ctrl-C comes while the first worker is stopping
    with interruption.deferred():
        for worker in workers:
            worker.close()
