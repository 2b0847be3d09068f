"""Ctrl-C and SIGTERM stop a command every time: dropped or wrapped interrupts, and the few lines
that create or free a resource (minirnng.interruption)."""

import contextlib
import multiprocessing
import os
import signal
import time
import weakref

import numpy
import pytest

from minirnng import cli, interruption, processes, train
from minirnng.models import RNNG


def dropped_stop():
    """A stop signal that arrives inside a finaliser: Python drops the KeyboardInterrupt raised
    there (and reports it as "Exception ignored in ...")."""
    class Resource:
        pass

    resource = Resource()
    weakref.finalize(resource, interruption.request_stop)
    del resource  # the finaliser runs here


def test_the_handler_records_the_stop_raises_it_and_is_removed_afterwards():
    before = {number: signal.getsignal(number) for number in interruption.STOP_SIGNALS}
    with interruption.handling_signals():
        assert not interruption.requested()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        assert interruption.requested()
        with pytest.raises(KeyboardInterrupt):
            interruption.raise_if_requested()
    assert not interruption.requested()
    assert {number: signal.getsignal(number) for number in interruption.STOP_SIGNALS} == before
    interruption.raise_if_requested()  # outside the block nothing is pending

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        with interruption.handling_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is interruption.request_stop
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_deferred_block_finishes_before_the_stop_is_raised():
    finished = []
    with interruption.handling_signals():
        with pytest.raises(KeyboardInterrupt):
            with interruption.deferred():
                with interruption.deferred():  # nested: the outermost block raises
                    signal.raise_signal(signal.SIGTERM)
                    finished.append("inner")
                finished.append("outer")
        assert finished == ["inner", "outer"]
        # cleanup that runs because of an earlier stop is not cut short by it again
        with interruption.deferred():
            finished.append("cleanup")
        assert finished[-1] == "cleanup"


def test_a_command_whose_interrupt_python_dropped_still_ends_as_interrupted(tmp_path, capsys, monkeypatch):
    def stop_dropped(self, resume=False):
        dropped_stop()

    monkeypatch.setattr(train.Trainer, "run", stop_dropped)
    arguments = ["train", "--data", "synthetic", "--train-size", "4", "--validation-size", "2",
                 "--out", str(tmp_path / "run"), "--quiet"]
    assert cli.main(arguments) == 130
    err = capsys.readouterr().err
    assert "interrupted; no epoch finished" in err and "Exception ignored" not in err

    def stop_wrapped(self, resume=False):
        # an import building an enum reports an interrupt as "Error calling __set_name__"
        try:
            interruption.request_stop()
        except KeyboardInterrupt as stop:
            raise RuntimeError("Error calling __set_name__") from stop

    monkeypatch.setattr(train.Trainer, "run", stop_wrapped)
    assert cli.main(arguments) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and "RuntimeError" not in err

    def bug(self, resume=False):
        raise RuntimeError("a bug, not a stop")

    monkeypatch.setattr(train.Trainer, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(arguments)  # the pending stop of the last command is gone


def test_training_stops_at_the_next_batch_after_a_dropped_interrupt(tiny_data, tmp_path):
    trainer = train.Trainer(train.TrainConfig(epochs=2, batch_size=4), *tiny_data, tmp_path, progress=False,
                            log=lambda line: None, workers=1)
    steps = []
    step = trainer.optimizer.step

    def step_then_drop_a_stop():
        step()
        steps.append(len(steps))
        if len(steps) == 1:
            dropped_stop()

    trainer.optimizer.step = step_then_drop_a_stop
    with interruption.handling_signals():
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    assert steps == [0]  # 12 images in batches of 4: two more steps had there been no check


@pytest.mark.parametrize("where", ["command line", "notebook"])
def test_a_stop_while_shared_memory_is_created_leaves_it_recorded_and_freed(where, monkeypatch, request):
    # Under the command line the stop is recorded (handling_signals) and held by deferred(); in a
    # notebook or a script Ctrl-C raises KeyboardInterrupt at once, and signals_held keeps it out
    # until the block is recorded. Created and not recorded, a block would outlive the program.
    from multiprocessing import shared_memory

    create = shared_memory.SharedMemory

    def created_as_a_stop_arrives(*args, **kwargs):
        if where == "command line":
            interruption.request_stop()
        else:
            os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt, unless held
        return create(*args, **kwargs)

    monkeypatch.setattr(processes.shared_memory, "SharedMemory", created_as_a_stop_arrives)
    # Python's own handler, as in a notebook, even where this process was started with SIGINT
    # ignored (a shell's background job: "pytest &")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    block = processes.SharedArrays()
    with interruption.handling_signals() if where == "command line" else contextlib.nullcontext():
        with pytest.raises(KeyboardInterrupt):
            block.write({"x": [1.0, 2.0]})
        assert block.block is not None
        name = block.block.name
        block.close()
    monkeypatch.setattr(processes.shared_memory, "SharedMemory", create)
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)  # unlinked: nothing left for the resource tracker


def test_a_ctrl_c_while_the_handlers_go_back_leaves_none_of_them_recording(monkeypatch):
    swap = signal.signal
    restoring = []

    def interrupted_once_while_restoring(number, handler):
        # signal.signal runs the handlers of pending signals before it swaps: a Ctrl-C that reached
        # the restored SIGINT handler raises here, while SIGTERM's is still the block's
        if number == signal.SIGTERM and getattr(handler, "__name__", None) != "record" and not restoring:
            restoring.append(number)
            raise KeyboardInterrupt
        return swap(number, handler)

    before = {number: signal.getsignal(number) for number in interruption.STOP_SIGNALS}
    monkeypatch.setattr(signal, "signal", interrupted_once_while_restoring)
    with pytest.raises(KeyboardInterrupt):
        with interruption.signals_held():
            pass
    monkeypatch.setattr(signal, "signal", swap)
    assert restoring == [signal.SIGTERM]
    assert {number: signal.getsignal(number) for number in interruption.STOP_SIGNALS} == before


def test_workers_ignore_stop_signals_and_one_sent_while_they_start_is_not_lost(monkeypatch):
    model = RNNG(rng=numpy.random.default_rng(0))
    images = numpy.random.default_rng(1).uniform(-0.5, 0.5, (2, 3, 16, 16))
    with interruption.handling_signals():
        network = processes.ProcessParallel(model, 2)
        worker = network.replicas[1].process
        for number in interruption.STOP_SIGNALS:
            os.kill(worker.pid, number)
        time.sleep(0.5)
        assert worker.is_alive()  # it stops when the parent closes it, not on its own
        numpy.testing.assert_allclose(network.forward(images)["logits"], model.forward(images)["logits"],
                                      rtol=1e-5, atol=1e-6)
        network.close()
        assert not worker.is_alive()

        hidden = processes.main_script_hidden

        @contextlib.contextmanager
        def stopped_while_starting():
            signal.raise_signal(signal.SIGTERM)  # held until the worker has started
            with hidden():
                yield

        def shards():  # other tests' workers that the garbage collector has not closed yet may still run
            return {child.pid for child in multiprocessing.active_children() if child.name.startswith("minirnng-shard")}
        before = shards()
        monkeypatch.setattr(processes, "main_script_hidden", stopped_while_starting)
        with pytest.raises(KeyboardInterrupt):
            processes.ProcessParallel(model, 2)
        assert interruption.requested()
        assert not shards() - before


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="stop signals cannot be held here")
def test_a_stop_held_while_the_first_child_starts_survives_the_resource_tracker_starting():
    """In a fresh interpreter, whose multiprocessing resource tracker is not running yet: starting
    it (as spawn's first start does) blocks and unblocks the stop signals itself, which must not
    discard a stop that ignored_by_children holds."""
    import subprocess
    import sys

    script = """
import os, signal
from multiprocessing import resource_tracker
from minirnng import interruption
with interruption.handling_signals():
    try:
        with interruption.ignored_by_children():
            os.kill(os.getpid(), signal.SIGTERM)    # held until the block ends
            resource_tracker.ensure_running()       # what the first spawn does
    except KeyboardInterrupt:
        print("stopped")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "stopped", (result.stdout, result.stderr)



@pytest.mark.skipif(not hasattr(signal, "SIGHUP") or not os.path.isdir("/dev/shm"), reason="no hang-up signal here")
def test_a_closed_terminal_stops_training_as_ctrl_c_does_and_frees_the_workers_shared_memory(tmp_path):
    """A hang-up goes to the whole process group: the workers and multiprocessing's resource
    tracker ignore it, and the command frees their shared memory and ends as interrupted."""
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "minirnng", "train", "--data", "synthetic", "--epochs", "20",
               "--train-size", "64", "--validation-size", "8", "--workers", "2", "--out", str(out), "--quiet"]
    before = set(os.listdir("/dev/shm"))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    waited = time.monotonic()
    while not (out / "last.npz").exists() and process.poll() is None and time.monotonic() - waited < 120:
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1]  # still training: the hang-up is what stops it
    os.killpg(process.pid, signal.SIGHUP)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    time.sleep(1)
    assert _session_members(process.pid) == []  # no worker outlived the run
    # other tests' workers may create and free blocks of their own meanwhile: a block of this run's
    # is one that is new, still there a second later, and mapped by no process
    leaked = None
    for _ in range(2):
        left = {name for name in set(os.listdir("/dev/shm")) - before
                if name.startswith("psm_") and not _mapped(name) and os.path.exists(f"/dev/shm/{name}")}
        leaked = left if leaked is None else leaked & left
        time.sleep(1)
    assert not leaked, leaked


def _proc_entries():
    return [entry for entry in os.listdir("/proc") if entry.isdigit()]


def _mapped(name):
    """Whether a process of this machine maps the shared-memory block ``name``."""
    for pid in _proc_entries():
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as lines:
                if any(f"/dev/shm/{name}" in line for line in lines):
                    return True
        except OSError:
            continue
    return False


def _session_members(session):
    """The processes of the session ``session`` that are still running (zombies aside)."""
    members = []
    for pid in _proc_entries():
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(pid))
    return members
