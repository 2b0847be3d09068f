"""Backend choice: NumPy always, CuPy only when usable, MINIRNNG_BACKEND forcing, the xp helpers."""

import os
import subprocess
import sys

import numpy
import pytest

from minirnng import backend


def run_python(code, **environment):
    env = dict(os.environ, **environment)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_numpy_is_always_available():
    assert backend.get_array_module(numpy.zeros(2)) is numpy
    assert backend.to_numpy([1, 2]).tolist() == [1, 2]
    with backend.use("numpy"):
        assert isinstance(backend.to_device([1.0]), numpy.ndarray)
        assert not backend.uses_kernels(numpy.zeros(1))


def test_emulator_backend_takes_the_kernel_path_on_numpy_arrays():
    with backend.use("cuda-emulator"):
        assert backend.current() == "cuda-emulator"
        assert backend.uses_kernels(numpy.zeros(1))
    assert backend.current() == backend.default_backend()


def test_environment_variable_forces_the_choice():
    result = run_python("from minirnng import backend; print(backend.current())", MINIRNNG_BACKEND="numpy")
    assert result.stdout.strip() == "numpy"
    result = run_python("from minirnng import backend; backend.current()", MINIRNNG_BACKEND="tpu")
    assert result.returncode != 0 and "unknown backend" in result.stderr and "cuda-emulator" in result.stderr


def test_asking_for_cupy_where_it_is_unusable_is_a_clear_error():
    if backend.cupy_status()[0]:
        pytest.skip("a GPU is usable here")
    with pytest.raises(backend.BackendError, match="asks for the GPU, but"):
        with backend.use("cupy"):
            pass
    result = run_python("from minirnng import backend; backend.current()", MINIRNNG_BACKEND="cupy")
    assert result.returncode != 0 and "MINIRNNG_BACKEND='cupy' asks for the GPU" in result.stderr


def test_cupy_status_names_a_missing_cuda_library_and_the_wheel_that_brings_it(monkeypatch):
    """A GPU and NVRTC without cuBLAS is not usable: the convolutions' weight gradients need its products."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import device, nvrtc

    def no_cublas():
        raise ImportError('Failure finding "libcublasLt.so.12"')

    monkeypatch.setattr(cupy, "is_available", lambda: True)
    monkeypatch.setattr(nvrtc, "getVersion", lambda: (12, 9))
    monkeypatch.setattr(device, "get_cublas_handle", no_cublas)
    backend.cupy_status.cache_clear()
    try:
        usable, reason = backend.cupy_status()
    finally:
        backend.cupy_status.cache_clear()
    assert not usable
    assert reason.startswith("cuBLAS cannot be loaded") and "libcublasLt" in reason and "[ctk]>=14" in reason


def test_select_sets_the_backend_for_the_rest_of_the_process():
    try:
        assert backend.select("cuda-emulator") == "cuda-emulator" == backend.current()
        with backend.use("numpy"):
            assert backend.current() == "numpy"  # use() still wins inside its block
        assert backend.current() == "cuda-emulator"
        with pytest.raises(backend.BackendError, match=r"backend.select\('tpu'\): unknown backend"):
            backend.select("tpu")
        assert backend.current() == "cuda-emulator"  # a refused choice changes nothing
    finally:
        assert backend.select(None) == backend.default_backend()


def test_describe_names_where_the_backend_computes():
    with backend.use("numpy"):
        assert backend.describe() == "CPU (NumPy)"
    with backend.use("cuda-emulator"):
        assert backend.describe() == "CPU (the CUDA emulator)"


def test_matching_keeps_new_arrays_on_the_host_for_a_host_array():
    host = numpy.zeros(3)
    with backend.use("numpy"):
        assert backend.matching(host) == "numpy"
    with backend.use("cuda-emulator"):
        assert backend.matching(host) == "cuda-emulator"


@pytest.mark.gpu
def test_matching_follows_the_array_not_the_backend_in_force():
    import cupy
    with backend.use("cupy"):
        assert backend.matching(numpy.zeros(3)) == "numpy"
    with backend.use("numpy"):
        assert backend.matching(cupy.zeros(3)) == "cupy"


@pytest.mark.gpu
def test_the_default_is_cupy_where_a_gpu_is_usable():
    environment = {key: value for key, value in os.environ.items() if key != "MINIRNNG_BACKEND"}
    result = subprocess.run([sys.executable, "-c", "from minirnng import backend; print(backend.current())"],
                            capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cupy"
    with backend.use("cupy"):
        assert backend.describe().startswith("GPU (") and "CuPy" in backend.describe()


def test_importing_minirnng_does_not_import_cupy():
    result = run_python("import sys, minirnng, minirnng.layers, minirnng.losses, minirnng.gradcheck; "
                        "print('cupy' in sys.modules)", MINIRNNG_BACKEND="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_blocks_that_end_out_of_order_each_take_away_their_own_choice():
    # a generator suspended inside a block: the caller's block, opened after it, ends first
    def inside_the_emulator():
        with backend.use("cuda-emulator"):
            yield backend.current()

    before = backend.current()
    suspended = inside_the_emulator()
    assert next(suspended) == "cuda-emulator"
    with backend.use("numpy"):
        assert backend.current() == "numpy"
        suspended.close()  # ends the generator's block while the caller's is still open
        assert backend.current() == "numpy"
    assert backend.current() == before
