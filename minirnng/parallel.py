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

Training takes a shorter way, :meth:`DataParallel.objective_step`: the loss is a sum over the
batch's pixels (or pairs of neighbouring pixels) divided by a count over the batch, so each shard
can compute its own share of it, ``L_s = mean over the shard's pixels * (shard's count / batch's
count)``, and its gradient, right after its forward pass, and go on with its backward pass: no
gather of the outputs, no scatter of their gradients, and the loss computed by all the workers at
once instead of by the calling thread while the others wait (a step 5-10% faster on two worker
processes, docs/benchmarks.md). The random draws of the loss (the edge term's 1:5 sample, the
label masks of a background ratio) are made once for the whole batch first, so a seeded run draws
the same pixels with any number of workers. The soft Dice term, a ratio of sums over the whole
batch, cannot be shared out this way: with it, each shard computes the other terms and sends its
logits, the calling thread computes the Dice term on the whole batch's, and each shard finishes
its backward pass with its part of that gradient (two round trips, as forward and backward).

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

:class:`minirnng.processes.ProcessParallel` is the same with worker processes, which do not wait
for each other's interpreter lock: a step of 53 ms instead of 60 on the same two cores, and the
same numbers. Training uses it by default; this module's threads need nothing started and no
shared memory, and serve where that matters (stage 2's four small networks, notebooks).
"""

import concurrent.futures
import os
import weakref

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


def shard_pass(replica, method, inputs, options, params=None, errors=None):
    """One shard's share of a pass on a replica: what a worker thread or process runs.

    params : the model's parameters (a dict), copied into the replica first, or None to keep the
        ones it has (a backward pass uses those of its forward).
    method : ``"forward"``, ``"infer"`` or ``"predict"`` with ``inputs = {"images": ...}``, or
        ``"backward"`` with ``inputs = {"grads": {...}}``, ``options = {"input_gradient": ...}``.
    errors : the caller's ``numpy.geterr()``, applied here: NumPy's error state belongs to each
        thread, so a worker would otherwise warn where the caller asked for quiet (a diverging
        run's overflow, which the trainer reports once), or the reverse.
    method ``"objective_step"``: ``inputs = {"images": ..., "batch": {...}}``, ``options =
        {"objective": ..., "totals": {...}, "gather": bool}``: :func:`objective_shard`; then, after
        one with ``gather``, ``"objective_finish"`` with ``inputs = {"grads": {"logits": ...}}``:
        :func:`objective_finish`.
    Returns ``(result, grads)``: what the model's method returns, and for backward and the
    objective's passes that end with a backward pass the replica's parameter gradients of this
    shard alone (its gradients are zeroed first), else None.
    """
    with numpy.errstate(**(errors or {})):
        if params is not None:
            for name, value in replica.params().items():
                value[...] = params[name]
        if method == "objective_step" and options.get("gather"):
            return objective_shard(replica, inputs, **options), None
        if method in ("backward", "objective_step", "objective_finish"):
            replica.zero_grad()
            if method == "objective_step":
                return objective_shard(replica, inputs, **options), replica.grads()
            if method == "objective_finish":
                return objective_finish(replica, inputs), replica.grads()
            return replica.backward(inputs["grads"], **options), replica.grads()
        return getattr(replica, method)(inputs["images"]), None


#: model -> the gradients of its outputs that a gathering objective_shard left for objective_finish
#: (after a step that failed between the two, they stay until the model's next gathering step
#: replaces them; objective_finish is only ever called right after a round that succeeded)
_UNFINISHED = weakref.WeakKeyDictionary()


def objective_shard(model, inputs, objective, totals, gather=False):
    """One shard's training pass: forward of ``inputs["images"]``, its share of the objective's
    terms (``objective.shard_terms`` with the shard's part of the batch, ``inputs["batch"]``, the
    whole batch's ``totals`` and the terms shards can compute), then backward without the image
    gradient (adding into ``model.grads()``). Returns ``{"part:<term>": float}``.

    With ``gather`` (an objective with terms only the whole batch can compute: the soft Dice term)
    the backward waits: the gradients are kept for :func:`objective_finish`, and the result has the
    shard's ``"logits"`` too, for the caller to compute those terms on the whole batch's.
    """
    outputs = model.forward(inputs["images"])
    batch = {**inputs["batch"], "images": inputs["images"]} if objective.needs_images else inputs["batch"]
    parts, grads = objective.shard_terms(outputs, batch, totals, terms=objective.shard_term_names)
    result = {f"part:{name}": value for name, value in parts.items()}
    if gather:
        _UNFINISHED[model] = grads
        result["logits"] = outputs["logits"]
    else:
        model.backward(grads, input_gradient=False)
    return result


def objective_finish(model, inputs):
    """The rest of a gathering :func:`objective_shard`: the logits' gradient of the whole-batch terms
    (``inputs["grads"]["logits"]``, this shard's part) added to the kept ones, then backward."""
    grads = _UNFINISHED.pop(model, None)
    if grads is None:
        raise RuntimeError("objective_finish: this shard has no objective_step(gather=True) to finish")
    extra = inputs["grads"]["logits"]
    grads["logits"] = extra if "logits" not in grads else grads["logits"] + extra
    model.backward(grads, input_gradient=False)


def shard_count(model, workers):
    """How many shards each batch is split into with ``workers`` workers: ``workers`` for a model
    on the host, 1 for a model on the GPU, which runs every batch whole."""
    return 1 if backend.is_cupy_array(next(iter(model.params().values()))) else workers


class DataParallel:
    """``model`` run on shards of each batch by ``workers`` threads (see the module docstring).

    It runs as the model would::

        network = DataParallel(model, workers=2)
        model.zero_grad()
        outputs = network.forward(images)                  # the model's dict, whole batch
        total, parts, grads = objective(outputs, labels, rng)
        network.backward(grads, input_gradient=False)      # fills model.grads()
        optimizer.step()                                   # on model.params()
        model.constrain()

    and training replaces the three middle lines by one, which lets each shard compute its own
    share of the objective (:meth:`objective_step`)::

        total, parts = network.objective_step(images, labels, objective, rng)

    model : a stage-1 model (``forward``/``backward``/``infer``/``predict``, ``replica()``);
        its parameters are the ones trained and its gradients the ones filled.
    workers : threads, at least 1; 1 runs everything on the model itself, unsplit.

    ``forward(images)``, ``backward(grads, input_gradient=True)``, ``infer(images)`` and
    ``predict(images)`` take and return what the model's methods do, for the whole batch.
    ``params()``, ``grads()``, ``zero_grad()``, ``constrain()`` and ``on_device()`` are the model's.
    :class:`minirnng.processes.ProcessParallel` is the same with worker processes.
    """

    def __init__(self, model, workers=2):
        self.model = model
        self.workers = check_positive_int(workers, type(self).__name__, "workers")
        self.replicas = [model]  # shard s runs on replicas[s]; replicas[0] is the model itself
        self._shards = None  # the slices of the last forward pass, None when it ran unsplit
        self._pool = None  # the worker threads, started by the first split pass
        if shard_count(model, self.workers) > 1:  # a model on the GPU always runs unsplit
            self.replicas += self._start_replicas(self.workers - 1)

    def _start_replicas(self, count):
        """``count`` replicas of the model for the worker threads."""
        return [checked_replica(self.model, type(self).__name__) for _ in range(count)]

    # -- what is the model's ---------------------------------------------------------------
    def on_device(self, array):
        return self.model.on_device(array)

    def params(self):
        return self.model.params()

    def grads(self):
        return self.model.grads()

    def zero_grad(self):
        self.model.zero_grad()

    def constrain(self, rule="rescale"):
        self.model.constrain(rule)

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
        outputs = self._run(shards, "forward", [{"images": images[part]} for part in shards])
        return {name: numpy.concatenate([output[name] for output, _ in outputs]) for name in outputs[0][0]}

    def backward(self, grads, input_gradient=True):
        """The model's ``backward`` for the last ``forward``: fills ``model.grads()`` (adding, as
        the model does) and returns the images' gradient (N, 3, H, W), or None without
        ``input_gradient``."""
        shards = self._shards
        if shards is None:
            return self.model.backward(grads, input_gradient=input_gradient)
        for name, grad in grads.items():
            if getattr(grad, "ndim", 0) < 1 or grad.shape[0] != shards[-1].stop:
                raise ValueError(f"{type(self).__name__}.backward: the gradient of {name!r} must have the batch's "
                                 f"{shards[-1].stop} images on axis 0, got shape {tuple(getattr(grad, 'shape', ()))}")
        results = self._run(shards, "backward", [{"grads": {name: grad[part] for name, grad in grads.items()}}
                                                 for part in shards], input_gradient=input_gradient)
        totals = self.model.grads()  # shard 0 ran on the model and added into these already
        for _, shard_grads in results[1:]:
            for name, grad in shard_grads.items():
                totals[name] += grad
        return numpy.concatenate([dimages for dimages, _ in results]) if input_gradient else None

    def objective_step(self, images, labels, objective, rng):
        """A training step's passes with ``objective`` (a :class:`~minirnng.objective.StageOneObjective`):
        fills ``model.grads()`` (adding, as backward does) and returns ``(total, parts)``, what
        ``objective(outputs, labels, rng, images)`` returns for the whole batch, up to rounding.

        Each shard runs its forward pass, its share of the terms and its backward pass (no image
        gradient) in one go (:func:`objective_shard`): the loss no longer runs in the calling
        thread while the workers wait, and neither the outputs nor their gradients cross between
        the workers (but the logits and their gradient for the soft Dice term, below). The
        batch's random draws (the edge term's sample of pixels, the label masks of a background
        ratio) are made first, here, for the whole batch (``objective.prepare``), as the
        unsplit objective draws them, so that a seeded run draws the same pixels whatever the
        number of workers. Terms only the whole batch can compute (``objective.batch_terms``: the
        soft Dice term) are computed here on the gathered logits, and each shard then finishes its
        backward pass with its part of their gradient (:func:`objective_finish`). Where the pass
        runs unsplit, this is ``forward``, ``objective`` and ``backward`` one after the other. No
        ``backward`` may follow it.
        """
        shards = self._plan(images)
        if shards is None:
            outputs = self.forward(images)
            total, parts, grads = objective(outputs, labels, rng, images)
            self.backward(grads, input_gradient=False)
            return total, parts
        # the batch's counts are summed over every label map: more maps than images would skew them
        self.model.check_images(images[:1])  # malformed images are named as such first (one image copied)
        if getattr(labels, "ndim", 0) == 3 and tuple(labels.shape) != (images.shape[0],) + tuple(images.shape[2:]):
            raise ValueError(f"{type(self).__name__}.objective_step: labels must have shape "
                             f"{(images.shape[0],) + tuple(images.shape[2:])}, one label map per image, "
                             f"got {tuple(labels.shape)}")
        self._shards = None  # each shard has run its own backward
        batch = objective.prepare(labels, rng, images, output_names=self.model.output_names, counts=True)
        totals = {name[len("count:"):]: float(value.sum()) for name, value in batch.items()
                  if name.startswith("count:")}
        # the affinity term's images are the shard's own input: not sent twice (objective_shard)
        inputs = [{"images": images[part],
                   "batch": {name: value[part] for name, value in batch.items() if name != "images"}}
                  for part in shards]
        gather = not objective.shardable
        results = self._run(shards, "objective_step", inputs, objective=objective, totals=totals, gather=gather)
        parts = {}
        for result, _ in results:
            for name, value in (result or {}).items():  # a worker process returns an empty result as None
                if name.startswith("part:"):
                    parts[name[len("part:"):]] = parts.get(name[len("part:"):], 0.0) + float(value)
        if gather:  # the whole batch's terms on the gathered logits, then each shard's backward
            logits = numpy.concatenate([result["logits"] for result, _ in results])
            batch_parts, batch_grads = objective.shard_terms({"logits": logits}, batch, terms=objective.batch_terms)
            parts.update(batch_parts)
            results = self._run(shards, "objective_finish",
                                [{"grads": {"logits": batch_grads["logits"][part]}} for part in shards])
        totals_of_grads = self.model.grads()  # shard 0 ran on the model and added into these already
        for _, shard_grads in results[1:]:
            for name, grad in shard_grads.items():
                totals_of_grads[name] += grad
        parts = {name: parts[name] for name in objective.TERM_ORDER if name in parts}  # the unsplit order
        total = float(sum(objective.weights[name] * value for name, value in parts.items()))
        return total, parts

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

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.model!r}, workers={self.workers})"

    # -- the machinery ---------------------------------------------------------------------
    def _plan(self, images):
        """The shards of ``images``, or None where the pass runs unsplit on the model."""
        if len(self.replicas) == 1 or backend.uses_kernels(images) or not isinstance(images, numpy.ndarray):
            return None
        if images.ndim < 1 or images.shape[0] < 2:
            return None  # the model's own checks report a malformed batch
        return shard_slices(images.shape[0], min(self.workers, images.shape[0]))

    def _gather(self, images, method):
        shards = self._plan(images)
        if shards is None:
            return getattr(self.model, method)(images)
        return numpy.concatenate([result for result, _ in self._run(
            shards, method, [{"images": images[part]} for part in shards])])

    def _run(self, shards, method, inputs, **options):
        """:func:`shard_pass` of every shard, shard 0 on the model in this thread and the others
        on their replicas; ``[(result, grads)]`` in shard order (``grads`` None for shard 0, whose
        gradients are the model's). Passes that start from images first copy the model's
        parameters into the replicas. An exception in any shard is raised here, after all have
        finished (no worker is left running on a replica)."""
        params = None if method in ("backward", "objective_finish") else self.model.params()
        errors = numpy.geterr()
        pending = [self._submit(index, method, inputs[index], self._worker_options(method, options), params, errors)
                   for index in range(1, len(shards))]
        try:
            if method == "backward":
                first = (self.model.backward(inputs[0]["grads"], **options), None)
            elif method == "objective_step":
                first = (objective_shard(self.model, inputs[0], **options), None)
            elif method == "objective_finish":
                first = (objective_finish(self.model, inputs[0]), None)
            else:
                first = (getattr(self.model, method)(inputs[0]["images"]), None)
        finally:
            results = [self._collect(ticket) for ticket in pending]
        for error in (outcome for outcome in results if isinstance(outcome, BaseException)):
            raise error
        return [first] + results

    @staticmethod
    def _worker_options(method, options):
        """A worker's options: for objective_step, an objective of its own, whose losses keep their
        caches apart from the other shards' (the calling thread's shard uses the caller's)."""
        return {**options, "objective": options["objective"].replica()} if method == "objective_step" else options

    def _submit(self, index, method, inputs, options, params, errors):
        """Start shard ``index`` in a worker thread; a ticket for :meth:`_collect`."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(len(self.replicas) - 1,
                                                               thread_name_prefix="minirnng-shard")
        return self._pool.submit(shard_pass, self.replicas[index], method, inputs, options, params, errors)

    def _collect(self, ticket):
        """The ``(result, grads)`` of a submitted shard, or the exception it raised (returned,
        not raised, so that every shard is waited for)."""
        try:
            return ticket.result()
        except Exception as error:  # noqa: BLE001 - re-raised by _run once all shards are done
            return error


def checked_replica(model, owner):
    """``model.replica()``, refused with a clear error where it does not rebuild the parameters."""
    replica = model.replica()
    if replica.params().keys() != model.params().keys() or any(
            value.shape != model.params()[name].shape for name, value in replica.params().items()):
        raise TypeError(f"{owner}: {type(model).__name__}.replica() does not rebuild the model's "
                        "parameters; its config() must give every constructor argument that shapes them")
    return replica
