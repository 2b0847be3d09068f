"""DataParallel and ProcessParallel: worker threads or processes that share each batch give the
serial model's numbers."""

import os
import signal
import threading

import numpy
import pytest

from minirnng import backend
from minirnng.models import ARCHITECTURES, RNNG
from minirnng.parallel import MAX_DEFAULT_WORKERS, DataParallel, available_cores, default_workers, shard_slices
from minirnng.processes import ProcessParallel, SharedArrays, SharedArraysReader
from minirnng.train import TrainConfig, Trainer, evaluate


def twin_models(architecture="rnng", seed=0):
    """A float64 model with distinct recurrent weights and an independent copy of it."""
    cls = ARCHITECTURES[architecture]
    model = cls(3, rng=seed, dtype=numpy.float64)
    if hasattr(model, "randomize_recurrence"):
        model.randomize_recurrence(1)
    reference = cls(3, rng=seed + 1, dtype=numpy.float64)
    reference.load_params(model.params())
    return model, reference


def random_like(outputs, rng):
    return {name: rng.standard_normal(value.shape) for name, value in outputs.items()}


def test_shard_slices_cover_the_batch_in_order_with_sizes_one_apart():
    assert shard_slices(5, 2) == [slice(0, 3), slice(3, 5)]
    assert shard_slices(16, 2) == [slice(0, 8), slice(8, 16)]
    for batch in range(1, 12):
        for shards in range(1, batch + 1):
            slices = shard_slices(batch, shards)
            sizes = [s.stop - s.start for s in slices]
            assert slices[0].start == 0 and slices[-1].stop == batch and min(sizes) >= 1
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
    assert available_cores() >= 1 and default_workers() == min(available_cores(), MAX_DEFAULT_WORKERS)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch, workers", [(5, 3), (2, 4), (4, 2)])
def test_forward_backward_and_predict_equal_the_serial_model(architecture, batch, workers, rng):
    model, reference = twin_models(architecture)
    network = DataParallel(model, workers)
    images = rng.uniform(-0.5, 0.5, (batch, 3, 16, 16))
    outputs, expected = network.forward(images), reference.forward(images)
    assert outputs.keys() == expected.keys()
    for name in expected:
        numpy.testing.assert_allclose(outputs[name], expected[name], rtol=1e-12, atol=1e-13, err_msg=name)
    upstream = random_like(expected, rng)  # a random upstream gradient, not ones
    # gradients accumulate, as the model's own backward does: start both from the same non-zero state
    for grads in (model.grads(), reference.grads()):
        for name, grad in grads.items():
            grad[...] = numpy.arange(grad.size).reshape(grad.shape) * 1e-3
    dimages, expected_dimages = network.backward(upstream), reference.backward(upstream)
    numpy.testing.assert_allclose(dimages, expected_dimages, rtol=1e-11, atol=1e-13)
    for name, grad in reference.grads().items():
        numpy.testing.assert_allclose(model.grads()[name], grad, rtol=1e-10, atol=1e-12, err_msg=name)
    numpy.testing.assert_allclose(network.infer(images), reference.infer(images), rtol=1e-12, atol=1e-13)
    numpy.testing.assert_array_equal(network.predict(images), reference.predict(images))


def test_training_without_the_input_gradient_and_after_an_update(rng):
    model, reference = twin_models()
    network = DataParallel(model, 2)
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    for step in range(2):
        upstream = random_like(reference.forward(images), rng)
        network.forward(images)
        model.zero_grad(), reference.zero_grad()
        assert network.backward(upstream, input_gradient=False) is None
        reference.backward(upstream, input_gradient=False)
        for name, grad in reference.grads().items():
            numpy.testing.assert_allclose(model.grads()[name], grad, rtol=1e-10, atol=1e-12, err_msg=name)
        # an optimizer step on the model's parameters: the next pass's replicas must see it
        for params in (model.params(), reference.params()):
            for name, value in params.items():
                value -= 0.1 * reference.grads()[name]
        model.constrain(), reference.constrain()


def test_the_shards_run_in_worker_threads_and_one_worker_runs_the_model_itself(rng):
    model, _ = twin_models()
    network = DataParallel(model, 3)
    seen = []
    for replica in network.replicas:
        original = replica.forward

        def recording(images, original=original):
            seen.append((threading.current_thread().name, images.shape[0]))
            return original(images)
        replica.forward = recording
    network.forward(rng.uniform(-0.5, 0.5, (7, 3, 16, 16)))
    assert sorted(size for _, size in seen) == [2, 2, 3]
    # the first shard in the calling thread, the others in the pool's (a pool thread that is
    # already free may take the third shard too)
    assert [name for name, size in seen if size == 3] == [threading.current_thread().name]
    assert sum(name.startswith("minirnng-shard") for name, _ in seen) == 2
    network.close()

    single = DataParallel(model, 1)
    assert single.replicas == [model]
    images = rng.uniform(-0.5, 0.5, (3, 3, 16, 16))
    numpy.testing.assert_array_equal(single.forward(images)["logits"], model.forward(images)["logits"])


def test_the_kernel_path_runs_unsplit(rng):
    model, reference = twin_models()
    network = DataParallel(model, 2)
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 16))
    with backend.use("cuda-emulator"):
        outputs = network.forward(images)
        assert network._shards is None
        expected = reference.forward(images)
    numpy.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-12, atol=1e-13)


def test_bad_arguments_are_clear_errors(rng):
    model, _ = twin_models()
    for workers in (0, -2):
        with pytest.raises(ValueError, match="workers must be >= 1"):
            DataParallel(model, workers)
    for workers in (1.5, True, "2"):
        with pytest.raises(TypeError, match="workers must be an integer"):
            DataParallel(model, workers)
    network = DataParallel(model, 2)
    outputs = network.forward(rng.uniform(-0.5, 0.5, (4, 3, 16, 16)))
    upstream = random_like(outputs, rng)
    upstream["coarse"] = upstream["coarse"][:3]
    with pytest.raises(ValueError, match="gradient of 'coarse' must have the batch's 4 images"):
        network.backward(upstream)
    # an error in a worker thread reaches the caller, as the model's own message
    with pytest.raises(ValueError, match="multiples of 4"):
        network.forward(rng.uniform(-0.5, 0.5, (4, 3, 18, 16)))


def quiet(line):
    pass


# -- worker processes ----------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["rnng", "rnn", "cnn-crf"])
def test_processes_give_the_threads_bits(architecture, rng):
    model, reference = twin_models(architecture)
    model.classes = reference.classes = ["background", "skin", "hair"]
    images = rng.uniform(-0.5, 0.5, (5, 3, 16, 16))
    with ProcessParallel(model, 3) as processes:
        threads = DataParallel(reference, 3)
        assert len(processes.replicas) == 3
        for step in range(2):  # the second pass sees the parameters changed in between
            outputs, expected = processes.forward(images), threads.forward(images)
            for name in expected:
                numpy.testing.assert_array_equal(outputs[name], expected[name], err_msg=name)
            upstream = random_like(expected, rng)
            numpy.testing.assert_array_equal(processes.backward(upstream), threads.backward(upstream))
            assert processes.backward.__self__ is processes
            for name, grad in reference.grads().items():
                numpy.testing.assert_array_equal(model.grads()[name], grad, err_msg=name)
            for net in (model, reference):
                for name, value in net.params().items():
                    value -= 0.01 * net.grads()[name]
        numpy.testing.assert_array_equal(processes.predict(images), threads.predict(images))
        numpy.testing.assert_array_equal(processes.infer(images), threads.infer(images))
        with pytest.raises(RuntimeError, match="no forward pass to differentiate"):
            processes.backward(upstream)  # infer overwrote what the forward kept
        processes.forward(images)
        assert processes.backward(upstream, input_gradient=False) is None


def test_processes_report_errors_and_stop_cleanly(rng):
    model, _ = twin_models()
    network = ProcessParallel(model, 2)
    worker = network.replicas[1]
    # an error in the worker process reaches the caller, as the model's own message, and the
    # workers keep serving
    with pytest.raises(ValueError, match="multiples of 4"):
        network.forward(rng.uniform(-0.5, 0.5, (4, 3, 18, 16)))
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    network.forward(images)
    blocks = [worker.outbox.block.name]
    network.close()
    assert not worker.process.is_alive() and network.replicas == [model]
    for name in blocks:  # the shared memory is freed
        with pytest.raises(FileNotFoundError):
            SharedArraysReader().read((name, []))
    # after close, passes run unsplit on the model
    numpy.testing.assert_array_equal(network.forward(images)["logits"], model.forward(images)["logits"])

    # a worker that dies is a clear error, not a hang, and the blocks it wrote are freed
    network = ProcessParallel(model, 2)
    upstream = {"logits": rng.standard_normal(network.forward(images)["logits"].shape)}
    worker = network.replicas[1]
    written = list(worker.inbox.blocks)
    worker.process.kill()
    worker.process.join()
    death = r"worker process minirnng-shard-1 .* stopped unexpectedly \(killed by signal 9 \(SIGKILL\)\)"
    with pytest.raises(ChildProcessError, match=death):
        network.forward(images)
    # a backward of that pass names the death too: a fresh worker would hold no forward pass
    with pytest.raises(ChildProcessError, match=death):
        network.backward(upstream)
    # the next pass from images gets a fresh worker, whether the last one died between two passes
    # (as here, idle: it was never sent the failed pass's command) or during one
    numpy.testing.assert_array_equal(network.forward(images)["logits"], model.forward(images)["logits"])
    assert network.replicas[1] is not worker and network.replicas[1].process.is_alive()
    network.close()
    for name in written:
        with pytest.raises(FileNotFoundError):
            SharedArraysReader().read((name, []))


def test_a_worker_that_does_not_stop_is_killed_by_close():
    # it ignores SIGTERM as it ignores Ctrl-C; a stopped process is one that does not finish its shard
    model, _ = twin_models()
    network = ProcessParallel(model, 2)
    worker = network.replicas[1]
    os.kill(worker.process.pid, signal.SIGSTOP)
    closing = threading.Thread(target=network.close, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive() and not worker.process.is_alive()


class InterruptedOnce:
    """A worker's end of the pipe whose first wait for a reply is cut short by Ctrl-C, as in a
    notebook: the reply stays in the pipe."""

    def __init__(self, connection):
        self.connection, self.interrupted = connection, False

    def recv(self):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return self.connection.recv()

    def __getattr__(self, name):
        return getattr(self.connection, name)


def test_a_pass_interrupted_while_it_waits_for_a_worker_leaves_no_reply_behind(rng):
    model, _ = twin_models()
    network = ProcessParallel(model, 3)
    try:
        first, second = (rng.uniform(-0.5, 0.5, (6, 3, 16, 16)) for _ in range(2))
        waited_for, never_collected = network.replicas[1:]
        waited_for.connection = InterruptedOnce(waited_for.connection)
        with pytest.raises(KeyboardInterrupt):
            network.predict(first)
        # both workers' replies to the first pass are still in their pipes: answered by them, this
        # pass would return the first batch's labels (or fail on their layout) for the second one's
        numpy.testing.assert_array_equal(network.forward(second)["logits"], model.forward(second)["logits"])
        assert network.replicas[1] is not waited_for and network.replicas[2] is not never_collected
        assert not waited_for.process.is_alive() and not never_collected.process.is_alive()
    finally:
        network.close()


def test_shared_arrays_grow_and_keep_dtypes_and_shapes(rng):
    writer, reader = SharedArrays(), SharedArraysReader()
    small = {"a": numpy.arange(6, dtype=numpy.int8).reshape(2, 3), "b": rng.standard_normal((3, 1))}
    read = reader.read(writer.write(small))
    for name, value in small.items():
        assert read[name].dtype == value.dtype
        numpy.testing.assert_array_equal(read[name], value)
    first = writer.block.name
    large = {"c": rng.standard_normal((1 << 19,)).astype(numpy.float32), "d": numpy.zeros(0)}  # 2 MB
    read = reader.read(writer.write(large))
    assert writer.block.name != first  # grown into a new block
    numpy.testing.assert_array_equal(read["c"], large["c"])
    assert read["d"].shape == (0,)
    del read
    reader.close()
    writer.close()


def test_trainer_refuses_an_unknown_kind_of_worker(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="parallel must be one of processes, threads, got 'fibres'"):
        Trainer(TrainConfig(epochs=1, batch_size=4), *tiny_data, tmp_path, parallel="fibres")


def test_training_with_workers_follows_the_serial_run_and_resumes_with_its_workers(tiny_data, tmp_path):
    config = TrainConfig(epochs=2, batch_size=4, seed=3)
    serial = Trainer(config, *tiny_data, tmp_path / "serial", progress=False, log=quiet, workers=1)
    serial.run()
    shared = Trainer(config, *tiny_data, tmp_path / "shared", progress=False, log=quiet, workers=2)
    shared.run()
    assert shared.network.workers == 2 and len(shared.network.replicas) == 2
    assert isinstance(shared.network, ProcessParallel)
    # threads instead of processes: the same run (the same bits where OpenBLAS runs one thread, as
    # under the command line; here the threads' products may use several, which round differently)
    threads = Trainer(config, *tiny_data, tmp_path / "threads", progress=False, log=quiet, workers=2,
                      parallel="threads")
    threads.run()
    assert type(threads.network) is DataParallel
    for ours, theirs in zip(threads.history, shared.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)
    # the same run up to the rounding of the gradient sums (which Adam's normalisation amplifies
    # where a gradient is near zero, so the weights themselves drift apart faster than the losses)
    for ours, theirs in zip(shared.history, serial.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    assert evaluate(shared.network, tiny_data[1])["accuracy"] == evaluate(shared.model, tiny_data[1])["accuracy"]

    # killed after its first epoch and resumed without saying how many workers: it continues with
    # the run's own number, exactly as if it had never stopped
    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt

    interrupted = Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=stop_after_first_epoch,
                          workers=2)
    with pytest.raises(Interrupt):
        interrupted.run()
    resumed = Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=quiet)
    resumed.run(resume=True)
    assert resumed.network.workers == 2
    for name, value in shared.model.params().items():
        numpy.testing.assert_array_equal(resumed.model.params()[name], value, err_msg=name)

    # resumed with another number: allowed, and said
    lines = []
    again = Trainer(TrainConfig(epochs=3, batch_size=4, seed=3), *tiny_data, tmp_path / "shared", progress=False,
                    log=lines.append, workers=1)
    again.run(resume=True)
    assert any("cut each batch into 2 shard(s) and continues with 1" in line for line in lines)


def test_a_new_run_uses_one_worker_per_core_by_default(tiny_data, tmp_path):
    trainer = Trainer(TrainConfig(epochs=1, batch_size=4), *tiny_data, tmp_path, progress=False, log=quiet)
    assert trainer.network.workers == default_workers()
    assert isinstance(trainer.model, RNNG)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [DataParallel, ProcessParallel])
def test_a_model_on_the_gpu_runs_unsplit(kind, rng):
    with backend.use("cupy"):
        model = RNNG(3, rng=0)
        network = kind(model, 4)  # no thread or process is started for it
        assert network.replicas == [model]
        images = backend.to_device(rng.uniform(-0.5, 0.5, (3, 3, 16, 16)).astype(numpy.float32))
        logits = network.forward(images)["logits"]
        numpy.testing.assert_array_equal(backend.to_numpy(logits), backend.to_numpy(model.forward(images)["logits"]))
        upstream = {"logits": backend.to_device(rng.standard_normal(logits.shape).astype(numpy.float32))}
        model.zero_grad()
        assert network.backward(upstream).shape == images.shape


def test_worker_processes_compute_on_the_parents_backend_not_their_default(monkeypatch, rng):
    """A worker process starts with the environment's default backend; it must take the parent's
    instead (on a machine with a GPU the default is CuPy while the parent may compute on NumPy)."""
    model, reference = twin_models()
    monkeypatch.setenv(backend.ENVIRONMENT_VARIABLE, "cuda-emulator")  # what a started worker would default to
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    with backend.use("numpy"), ProcessParallel(model, 2) as processes:
        outputs = processes.forward(images)
        assert processes._shards is not None
    expected = DataParallel(reference, 2).forward(images)  # threads, on NumPy: the same bits
    for name in expected:
        numpy.testing.assert_array_equal(outputs[name], expected[name], err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [DataParallel, ProcessParallel])
def test_a_model_on_the_host_is_shared_among_workers_on_a_gpu_machine(kind, monkeypatch, rng):
    """Where CuPy is the default (and what a worker process starts with), a model built on the host
    still runs on the host in every worker, as notebook 09 does."""
    with backend.use("numpy"):
        model, reference = twin_models()
    monkeypatch.setenv(backend.ENVIRONMENT_VARIABLE, "cupy")
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    with backend.use("cupy"):
        network = kind(model, 2)
        try:
            assert len(network.replicas) == 2
            if kind is DataParallel:  # the thread's replica, built while CuPy is in force, is on the host too
                assert all(isinstance(value, numpy.ndarray) for value in network.replicas[1].params().values())
            outputs = network.forward(images)
            assert network._shards is not None
            upstream = random_like(outputs, rng)
            network.backward(upstream, input_gradient=False)
        finally:
            network.close()
    with backend.use("numpy"):
        expected = reference.forward(images)
        reference.backward(upstream, input_gradient=False)
    for name in expected:
        numpy.testing.assert_allclose(outputs[name], expected[name], rtol=1e-12, atol=1e-13, err_msg=name)
    for name, grad in reference.grads().items():
        numpy.testing.assert_allclose(model.grads()[name], grad, rtol=1e-10, atol=1e-13, err_msg=name)


def test_replicas_keep_what_config_leaves_out(rng):
    from minirnng.models import CNNCRF, DenseCRF
    model = CNNCRF(3, rng=0, dtype=numpy.float64, crf=DenseCRF(iterations=2, bilateral_weight=9.0))
    model.classes = ["background", "skin", "hair"]
    network = DataParallel(model, 2)
    assert network.replicas[1].crf is model.crf and network.replicas[1].classes == model.classes
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    numpy.testing.assert_array_equal(network.predict(images), model.predict(images))


def test_a_worker_process_gets_its_model_through_its_pipe_not_as_its_start_argument(monkeypatch):
    """spawn writes a process's arguments to it while the parent ignores the stop signals
    (interruption.ignored_by_children): a model there would hold that window open for as long as the
    child's interpreter takes to start, and a stop that reached another thread meanwhile would be lost."""
    import multiprocessing.context

    started_with = []
    start = multiprocessing.context.SpawnProcess.start

    def recording_start(process):
        started_with.append(process._args)  # start() deletes them
        start(process)
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", recording_start)
    model = RNNG(rng=numpy.random.default_rng(0))
    network = ProcessParallel(model, 2)
    try:
        (arguments,) = started_with
        assert not any(isinstance(argument, type(model)) for argument in arguments)
        images = numpy.random.default_rng(1).uniform(-0.5, 0.5, (2, 3, 16, 16))
        numpy.testing.assert_allclose(network.forward(images)["logits"], model.forward(images)["logits"],
                                      rtol=1e-5, atol=1e-6)
    finally:
        network.close()


@pytest.mark.parametrize("kind, workers", [(DataParallel, 2), (DataParallel, 3), (ProcessParallel, 2)])
@pytest.mark.parametrize("objective_options", [{}, {"affinity_weight": 0.5, "class_weights": [1.0, 2.0, 0.5]},
                                               {"dice_weight": 1.0}])
def test_objective_step_equals_forward_objective_backward(kind, workers, objective_options, rng):
    """Each shard computing its own terms gives the serial step's total, parts and gradients (to
    rounding), adds into gradients that are already there, and leaves the generator where the
    serial objective leaves it; the soft Dice term, which shards cannot share, is computed on the
    gathered logits between the shards' two rounds. The parts come in the serial objective's order."""
    from minirnng.objective import StageOneObjective

    model, reference = twin_models()
    objective = StageOneObjective(**objective_options)
    images = rng.uniform(-0.5, 0.5, (5, 3, 16, 16))
    labels = numpy.zeros((5, 16, 16), dtype=numpy.int64)
    labels[:, 3:13, 4:12], labels[:4, 2:6, 3:14] = 1, 2
    for grads in (model.grads(), reference.grads()):
        for name, grad in grads.items():
            grad[...] = numpy.arange(grad.size).reshape(grad.shape) * 1e-3
    serial_generator, generator = numpy.random.default_rng(4), numpy.random.default_rng(4)
    expected_total, expected_parts, upstream = objective(reference.forward(images), labels, serial_generator, images)
    reference.backward(upstream, input_gradient=False)
    with kind(model, workers) as network:
        total, parts = network.objective_step(images, labels, objective, generator)
    assert generator.bit_generator.state == serial_generator.bit_generator.state
    assert total == pytest.approx(expected_total, rel=1e-12) and list(parts) == list(expected_parts)
    for name, value in expected_parts.items():
        assert parts[name] == pytest.approx(value, rel=1e-12), name
    for name, grad in reference.grads().items():
        numpy.testing.assert_allclose(model.grads()[name], grad, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("objective_options", [{"affinity_weight": 0.5}, {"affinity_weight": 0.5, "dice_weight": 1.0}])
def test_processes_give_the_threads_bits_in_objective_step(objective_options, rng):
    """Also with the soft Dice term, which the calling thread computes on the gathered logits
    between the shards' two passes."""
    from minirnng.objective import StageOneObjective

    model, reference = twin_models()
    images = rng.uniform(-0.5, 0.5, (5, 3, 16, 16))
    labels = numpy.zeros((5, 16, 16), dtype=numpy.int64)
    labels[:, 3:13, 4:12] = 1
    objective = StageOneObjective(**objective_options)
    with ProcessParallel(model, 3) as processes, DataParallel(reference, 3) as threads:
        for step in range(2):  # the second step sees the parameters changed in between
            model.zero_grad()
            reference.zero_grad()
            result = processes.objective_step(images, labels, objective, numpy.random.default_rng(step))
            assert result == threads.objective_step(images, labels, objective, numpy.random.default_rng(step))
            for name, grad in reference.grads().items():
                numpy.testing.assert_array_equal(model.grads()[name], grad, err_msg=name)
            for net in (model, reference):
                for name, value in net.params().items():
                    value -= 0.01 * net.grads()[name]


@pytest.mark.parametrize("kind", [DataParallel, ProcessParallel])
def test_objective_step_refuses_labels_that_are_not_one_map_per_image_and_has_no_parts_to_lose(kind, rng):
    """More label maps than images would skew the batch's counts, which the shards divide by: a
    clear error, before any work; and a step with no term to compute gives (0.0, {}) on any kind of
    worker (a worker process sends back no parts at all)."""
    from minirnng.objective import StageOneObjective

    model, _ = twin_models()
    images = rng.uniform(-0.5, 0.5, (4, 3, 16, 16))
    labels = numpy.zeros((6, 16, 16), dtype=numpy.int64)
    with kind(model, 2) as network:
        with pytest.raises(ValueError, match=r"objective_step: labels must have shape \(4, 16, 16\), one label map "
                                             r"per image, got \(6, 16, 16\)"):
            network.objective_step(images, labels, StageOneObjective(), numpy.random.default_rng(0))
        with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\)"):  # the model's words
            network.objective_step(images.transpose(0, 2, 3, 1), labels[:4], StageOneObjective(),
                                   numpy.random.default_rng(0))
        nothing = StageOneObjective(weights=(0.0, 0.0, 0.0))
        assert network.objective_step(images, labels[:4], nothing, numpy.random.default_rng(0)) == (0.0, {})


def test_a_gathering_step_is_finished_only_once(rng):
    """objective_finish continues the backward pass that a gathering objective_step left, once."""
    from minirnng.objective import StageOneObjective
    from minirnng.parallel import objective_finish, objective_shard

    model, _ = twin_models()
    objective = StageOneObjective(dice_weight=1.0)
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 16))
    labels = numpy.zeros((2, 16, 16), dtype=numpy.int64)
    labels[:, 4:12, 4:12] = 1
    batch = objective.prepare(labels, numpy.random.default_rng(0), counts=True)
    totals = {name[len("count:"):]: value.sum() for name, value in batch.items() if name.startswith("count:")}
    result = objective_shard(model, {"images": images, "batch": batch}, objective, totals, gather=True)
    assert set(result) == {"part:logits", "part:coarse", "part:edge", "logits"}  # no Dice: the caller's
    assert not any(numpy.abs(grad).any() for grad in model.grads().values())  # backward waits for it
    objective_finish(model, {"grads": {"logits": numpy.ones_like(result["logits"]) * 1e-3}})
    assert any(numpy.abs(grad).any() for grad in model.grads().values())
    with pytest.raises(RuntimeError, match="no objective_step\\(gather=True\\) to finish"):
        objective_finish(model, {"grads": {"logits": numpy.zeros_like(result["logits"])}})
