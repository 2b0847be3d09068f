"""minirnng's GPU path: raw CUDA kernels, launched on a GPU through CuPy or on the CPU by the emulator.

* ``minirnng/kernels/*.cu``: the kernel sources, one per operation, each compiled in a float32 and
  a float64 variant (``-Dscalar_t=float`` / ``-Dscalar_t=double``). docs/kernels.md describes them.
* :mod:`.launch`: :func:`get_kernel` (compile once, check the arguments, launch where the arrays
  live), :func:`blocks_for` for 1-D grids, and :func:`reload_kernels` after editing a source in a
  running process.
* :mod:`.emulator`: the same sources compiled for the CPU with the system C++ compiler, so the GPU
  code path runs, and is tested, on machines without a GPU (``MINIRNNG_BACKEND=cuda-emulator``).
* :mod:`.directions`: the four scan directions as the strides the recurrent kernels take.
* :mod:`.graph`: :class:`~.graph.CapturedPredict`, a model's ``predict`` recorded into a CUDA
  graph and replayed (batch-1 inference without Python between the kernels).
* :mod:`.sources`: where the sources are and the kernels' signatures, read from them.

Importing this package imports neither CuPy nor a compiler: both are needed only at a launch.
"""

from .directions import DIRECTIONS, scan_geometry
from .launch import THREADS_PER_BLOCK, KernelCompileError, blocks_for, get_kernel, reload_kernels

__all__ = ["DIRECTIONS", "THREADS_PER_BLOCK", "KernelCompileError", "blocks_for", "get_kernel", "reload_kernels",
           "scan_geometry"]
