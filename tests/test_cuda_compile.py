"""Every kernel source compiles with NVRTC, for Turing (compute_75) and Hopper (compute_90), in both
variants. Runs without a GPU: NVRTC is a library (the nvidia-cuda-nvrtc-cu12 wheel of the dev extra),
driven here through cupy.cuda.nvrtc directly, because CuPy's own compile helpers ask the driver which GPU
there is. Where NVRTC cannot be loaded only the compile test skips; reading the signatures needs no CUDA.
"""

import numpy
import pytest

from minirnng.cuda import sources

try:
    from cupy.cuda import nvrtc
    nvrtc.getVersion()
    NVRTC_MISSING = None
except Exception as error:  # ImportError, or the NVRTC library failing to load
    NVRTC_MISSING = (f"CuPy's NVRTC bindings cannot be loaded ({type(error).__name__}: {error}); "
                     "install the dev extra (cupy-cuda12x and nvidia-cuda-nvrtc-cu12)")


@pytest.mark.skipif(NVRTC_MISSING is not None, reason=str(NVRTC_MISSING))
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("architecture", ["compute_75", "compute_90"])
@pytest.mark.parametrize("source_name", sources.source_names())
def test_source_compiles_without_warnings(source_name, architecture, dtype):
    options = [f"--gpu-architecture={architecture}", f"-Dscalar_t={sources.SCALAR_T[numpy.dtype(dtype)]}"]
    program = nvrtc.createProgram(sources.read_source(source_name), f"{source_name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{source_name}.cu does not compile ({' '.join(options)}): {error}\n"
                        f"{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program).strip()
        assert not log, f"{source_name}.cu compiles with warnings ({' '.join(options)}):\n{log}"
    finally:
        nvrtc.destroyProgram(program)


@pytest.mark.skipif(NVRTC_MISSING is not None, reason=str(NVRTC_MISSING))
def test_sources_compile_from_a_checkout_whose_path_needs_escaping(tmp_path, monkeypatch):
    """The pasted headers' #line directives hold the checkout's path in a C string literal: a
    Windows path's backslashes (``\\Users`` reads as a universal character name) and a quote
    must be escaped, or NVRTC rejects every source that includes a header."""
    import shutil
    awkward = tmp_path / 'C:\\Users\\me "quoted"' / "kernels"
    shutil.copytree(sources.KERNEL_DIRECTORY, awkward)
    monkeypatch.setattr(sources, "KERNEL_DIRECTORY", awkward)
    sources.read_source.cache_clear()
    try:
        with_headers = [name for name in sources.source_names() if "#line" in sources.read_source(name)]
        assert with_headers, "no source includes a header: this test checks nothing"
        for source_name in with_headers:
            program = nvrtc.createProgram(sources.read_source(source_name), f"{source_name}.cu", [], [])
            try:
                nvrtc.compileProgram(program, ["--gpu-architecture=compute_75", "-Dscalar_t=float"])
                assert not nvrtc.getProgramLog(program).strip(), source_name
            except nvrtc.NVRTCError as error:
                pytest.fail(f"{source_name}.cu does not compile from {awkward}: {error}\n"
                            f"{nvrtc.getProgramLog(program)}")
            finally:
                nvrtc.destroyProgram(program)
    finally:
        sources.read_source.cache_clear()


@pytest.mark.parametrize("source_name", sources.source_names())
def test_every_source_declares_readable_kernels(source_name):
    """The launcher and the emulator read each kernel's parameters from the source (see sources.py)."""
    kernels = sources.kernels(source_name)
    assert kernels, f"{source_name}.cu declares no extern \"C\" __global__ kernel"
    for kernel in kernels.values():
        assert kernel.parameters, kernel.name
        assert any(p.pointer and not p.const for p in kernel.parameters), f"{kernel.name} writes nothing"
