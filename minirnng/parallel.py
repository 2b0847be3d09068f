"""Data parallelism on the CPU: the images of one batch shared out among worker threads.

A model's forward and backward pass treat the images of a batch independently; only the loss
(which averages over the whole batch) and the parameter gradients (sums over its images) bring
them together. :class:`DataParallel` uses that, as PyTorch's ``DataParallel`` does on several
GPUs, to keep several CPU cores busy with one model:

1. **replicate**: ``workers - 1`` copies of the model are built once (``model.replica()``);
   before every pass the model's current parameters are copied into them (RNN-G has about 24,000:
   microseconds);
2. **scatter**: the batch of ``N`` images is cut into ``S = min(workers, N)`` consecutive shards;
   shard ``s`` runs through replica ``s`` (replica 0 is the model itself) in a thread of its own;
3. **gather**: the shards' outputs are concatenated along the batch axis, so the loss is computed
   on the whole batch exactly as without parallelism, and its gradients are cut the same way;
4. **reduce**: each replica's backward pass fills its own parameter gradients, and the model's
   gradients receive their sum, ``dL/dw = sum over shards s of dL/dw|_s``.

Why threads help although Python has one interpreter lock: the work of a pass is in NumPy's
matrix products (OpenBLAS) and elementwise loops, which release the lock while they run, so two
threads' products and sweeps proceed on two cores at once; only the Python between them is
serialised. Each worker should run its products on one core: the command line sets
``OPENBLAS_NUM_THREADS=1`` before NumPy loads (an OpenBLAS thread per worker and core would
oversubscribe the cores). Measured on the 2-core benchmark machine, quiet (docs/benchmarks.md):
an RNN-G training step at batch 16 takes about 100 ms in one thread and 61 ms with two workers.

The result is the serial pass's up to rounding: the shards' gradient sums are added in another
order (each worker sums over its own images first). A run with the same seed and the same
number of workers gives the same bits every time; another number of workers changes the last
bits of the gradients, and over many steps a training run drifts from the serial one as a run
with another BLAS would.

Only the NumPy path is shared out: on the kernel path (CuPy, or the CUDA emulator) a pass is
already one stream of launches on one device, and :class:`DataParallel` runs it unsplit.
"""

import concurrent.futures
import os

import numpy

from . import backend
from .layers.base import check_positive_int


def available_cores():
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: The most worker threads training uses by default. The Python between NumPy's calls holds the
#: interpreter lock: two half-batch passes side by side take 22% longer than one alone, most of it
#: lost in the recurrence's many small operations (docs/benchmarks.md), and with many threads on a
#: batch of 16 each would run a shard of one or two images and mostly wait for the lock. Measured
#: on 2 cores only: more workers may pay on larger machines (``--workers``).
MAX_DEFAULT_WORKERS = 4


def default_workers():
    """The number of worker threads training uses unless told: one per core, at most
    :data:`MAX_DEFAULT_WORKERS`."""
    return min(available_cores(), MAX_DEFAULT_WORKERS)


def shard_slices(batch_size, shards):
    """``shards`` consecutive slices that cut ``range(batch_size)`` into parts whose sizes differ
    by at most one, larger ones first: ``shard_slices(5, 2) == [slice(0, 3), slice(3, 5)]``."""
    size, extra = divmod(batch_size, shards)
    slices, start = [], 0
    for index in range(shards):
        stop = start + size + (index < extra)
        slices.append(slice(start, stop))
        start = stop
    return slices


class DataParallel:
    """``model`` run on shards of each batch by ``workers`` threads (see the module docstring).

    Training uses it as it would use the model::

        network = DataParallel(model, workers=2)
        model.zero_grad()
        outputs = network.forward(images)                  # the model's dict, whole batch
        total, parts, grads = objective(outputs, labels, rng)
        network.backward(grads, input_gradient=False)      # fills model.grads()
        optimizer.step()                                   # on model.params()
        model.constrain()

    model : a stage-1 model (``forward``/``backward``/``infer``/``predict``, ``replica()``);
        its parameters are the ones trained and its gradients the ones filled.
    workers : threads, at least 1; 1 runs everything on the model itself, unsplit.

    ``forward(images)``, ``backward(grads, input_gradient=True)``, ``infer(images)`` and
    ``predict(images)`` take and return what the model's methods do, for the whole batch.
    ``params()``, ``grads()``, ``zero_grad()`` and ``constrain()`` are the model's.
    """

    def __init__(self, model, workers=2):
        self.model = model
        self.workers = check_positive_int(workers, "DataParallel", "workers")
        self.replicas = [model]
        self._pool = None
        self._shards = None  # the slices of the last forward pass, None when it ran unsplit
        on_device = backend.is_cupy_array(next(iter(model.params().values())))
        for _ in range(0 if on_device else self.workers - 1):  # a model on the GPU always runs unsplit
            replica = model.replica()
            if replica.params().keys() != model.params().keys() or any(
                    value.shape != model.params()[name].shape for name, value in replica.params().items()):
                raise TypeError(f"DataParallel: {type(model).__name__}.replica() does not rebuild the model's "
                                "parameters; its config() must give every constructor argument that shapes them")
            self.replicas.append(replica)

    # -- what is the model's ---------------------------------------------------------------
    def params(self):
        return self.model.params()

    def grads(self):
        return self.model.grads()

    def zero_grad(self):
        self.model.zero_grad()

    def constrain(self):
        self.model.constrain()

    @property
    def classes(self):
        return self.model.classes

    # -- passes ----------------------------------------------------------------------------
    def forward(self, images):
        """images (N, 3, H, W) -> the model's dict of outputs for all N images."""
        shards = self._plan(images)
        self._shards = shards
        if shards is None:
            return self.model.forward(images)
        outputs = self._run(shards, lambda replica, part: replica.forward(images[part]))
        return {name: numpy.concatenate([output[name] for output in outputs]) for name in outputs[0]}

    def backward(self, grads, input_gradient=True):
        """The model's ``backward`` for the last ``forward``: fills ``model.grads()`` (adding, as
        the model does) and returns the images' gradient (N, 3, H, W), or None without
        ``input_gradient``."""
        shards = self._shards
        if shards is None:
            return self.model.backward(grads, input_gradient=input_gradient)
        for name, grad in grads.items():
            if getattr(grad, "ndim", 0) < 1 or grad.shape[0] != shards[-1].stop:
                raise ValueError(f"DataParallel.backward: the gradient of {name!r} must have the batch's "
                                 f"{shards[-1].stop} images on axis 0, got shape {tuple(getattr(grad, 'shape', ()))}")
        for replica in self.replicas[1:len(shards)]:
            replica.zero_grad()
        dimages = self._run(shards, lambda replica, part: replica.backward(
            {name: grad[part] for name, grad in grads.items()}, input_gradient=input_gradient))
        totals = self.model.grads()
        for replica in self.replicas[1:len(shards)]:
            for name, grad in replica.grads().items():
                totals[name] += grad
        return numpy.concatenate(dimages) if input_gradient else None

    def infer(self, images):
        """The model's logits (N, K, H, W) for inference only."""
        return self._gather(images, "infer")

    def predict(self, images):
        """The model's labels (N, H, W)."""
        return self._gather(images, "predict")

    __call__ = forward

    def close(self):
        """Stop the worker threads (they are started again by the next pass)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __repr__(self):
        return f"DataParallel({self.model!r}, workers={self.workers})"

    # -- the machinery ---------------------------------------------------------------------
    def _plan(self, images):
        """The shards of ``images``, or None where the pass runs unsplit on the model."""
        if len(self.replicas) == 1 or backend.uses_kernels(images) or not isinstance(images, numpy.ndarray):
            return None
        if images.ndim < 1 or images.shape[0] < 2:
            return None  # the model's own checks report a malformed batch
        shards = shard_slices(images.shape[0], min(self.workers, images.shape[0]))
        own = self.model.params()
        for replica in self.replicas[1:len(shards)]:
            for name, value in replica.params().items():
                value[...] = own[name]
        return shards

    def _gather(self, images, method):
        shards = self._plan(images)
        if shards is None:
            return getattr(self.model, method)(images)
        return numpy.concatenate(self._run(shards, lambda replica, part: getattr(replica, method)(images[part])))

    def _run(self, shards, work):
        """``work(replica_s, shard_s)`` for every shard, shard 0 in this thread and the others in
        the pool; the results in shard order. An exception in any of them is raised here, after
        all have finished (no thread is left running on a replica)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(len(self.replicas) - 1,
                                                               thread_name_prefix="minirnng-shard")
        futures = [self._pool.submit(work, self.replicas[index], shard) for index, shard in enumerate(shards[1:], 1)]
        try:
            first = work(self.replicas[0], shards[0])
        finally:
            concurrent.futures.wait(futures)
        return [first] + [future.result() for future in futures]
