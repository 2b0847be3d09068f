# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · From NumPy to CUDA: the scan kernel line by line
#
# The paper's speed (300 faces a second, section 5.3) comes from a GPU. minirnng's GPU path is a
# handful of raw CUDA kernels in `minirnng/kernels/*.cu`, launched through CuPy, and the same
# sources run on a laptop through the **CUDA emulator**, which compiles them for the CPU with the
# system C++ compiler (`docs/kernels.md` describes both). This notebook reads the gated scan,
# the kernel of eq. 3, line by line, lays out its threads, and runs it: on the emulator always,
# and on a GPU when there is one.
#
# **Lab.** You write the Python side of a GPU layer: the geometry of the four directions and the
# launches of the forward and backward kernels.

# %%
import os
import re
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend, labs
from minirnng.cuda import THREADS_PER_BLOCK, blocks_for, get_kernel, scan_geometry
from minirnng.cuda.directions import DIRECTIONS
from minirnng.cuda.sources import read_source
from minirnng.gradcheck import relative_error
from minirnng.layers import GatedSpatialRNN, constrain_recurrent_weight

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

# The emulator caches compiled kernels on disk; keep this notebook's cache in a temporary folder.
cache = tempfile.TemporaryDirectory()
os.environ["MINIRNNG_CACHE_DIR"] = cache.name
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. What has to run in parallel
#
# Eq. 3, $h_t = x_t + g_t \odot (W h_{t-1} + b)$, is sequential along a line: step $t$ needs step
# $t-1$. The parallelism is *across* lines: every row of every image, for the horizontal
# directions, or every column, for the vertical ones, is an independent sequence; and the four
# directions are independent of one another. For RNN-G at batch 16 that is
# $16 \times 64 = 1024$ lines per direction, 4096 in all, each 64 steps long.
#
# Within a step the $C$ channels are not independent: channel $c$ of $h_t$ needs *all* channels of
# $h_{t-1}$ (that is what $W h_{t-1}$ does). One thread per (line, channel) would need a barrier at
# every step; the kernel instead gives **one thread a whole line** and loops over the channels,
# $C^2 = 64$ multiply-adds per step for $C = 8$, which is small next to the latency of the step's
# memory reads. The reasons are spelled out in the comment at the top of the source.
#
# ## 2. The kernel, line by line

# %%
source = read_source("gated_scan")
line_helper = re.search(r'struct ScanLine \{.*?\n};\n\n__device__.*?\n}\n', source, re.S).group(0)
forward_kernel = re.search(r'extern "C" __global__ void gated_scan_forward\(.*?\n}\n', source, re.S).group(0)
print(line_helper)
print(forward_kernel)

# %% [markdown]
# First a helper that all four scan kernels (forward and backward, eq. 3 and eq. 1) share: which
# line this thread scans. Then the forward kernel. Reading them from the top:
#
# - **The signature.** `x`, `g`: the inputs $(N, C, H, W)$, shared by all directions; `weight`
#   $(D, C, C)$ and `bias` $(D, C)$: one $W_d$, $b_d$ per direction; `geometry`: an int32 array
#   $(D, 5)$ that describes each direction (section 3); `h`: the output $(D, N, C, H, W)$, one map
#   per direction. `scalar_t` is `float` or `double`: every source is compiled twice, with
#   `-Dscalar_t=float` and `-Dscalar_t=double`. `__restrict__` promises the compiler that the
#   arrays do not overlap.
# - **`find_scan_line`** (the helper, a `__device__` function the kernels call):
#   `d = blockIdx.y`, the grid's second dimension, picks the direction, so one launch runs all $D$
#   directions. Then `thread = blockIdx.x * blockDim.x + threadIdx.x` (in 64 bits) and the bounds
#   check: the grid is rounded up to whole blocks of 256 threads, so the last threads of the last
#   block have no line, and the kernel returns before touching memory when the helper says
#   `false`. Thread number `thread` takes image `n = thread / lines` and line `thread % lines`
#   (neighbouring threads take neighbouring lines), and the five geometry numbers of direction `d`
#   give the line's length, its step and its first pixel.
# - **Pointers to this direction's slices**: `W`, `b` of direction `d`; `x_image` and `g_image`
#   point at `x[n]` and `g[n]`, `h_image` at `h[d, n]`.
# - **The walk.** `q` is the pixel's index in a channel plane ($q = y W + x$); it starts at the
#   line's first pixel (`line.first`) and advances by `step` each iteration.
# - **One step**: for each output channel `c`, the message $a = b_c + \sum_k W_{ck}\, h_{t-1,k}$
#   (only for $t > 0$: $h_{-1} = 0$), then $h_{t,c} = x_{t,c} + g_{t,c}\, a$. A null `g` means
#   $g = 1$, which turns the same kernel into eq. 1 with the identity activation.
# - **Two ways to hold $h_{t-1}$.** For more than 16 channels (`C > REGISTER_CHANNELS`) the thread
#   reads $h_{t-1}$ back from the output at `q - step`, the pixel it has just written. For up to 16
#   (RNN-G has 8) it keeps $h_{t-1}$ in the array `state`: its loops run to the compile-time bound
#   16, fully unrolled, with `c < C` as a predicate, so every index is a constant and the compiler
#   puts the arrays in registers. It also loads step $t+1$'s `x` and `g` (`x_next`, `g_next`)
#   before it computes step $t$, so that their memory latency overlaps the arithmetic. On an H200
#   this took the four-way forward at batch 1 from 337 to 212 µs (`docs/benchmarks.md`). Both
#   paths add in the same order and give the same bits.
#
# ## 3. Four directions as five numbers
#
# Number the pixels of a channel plane $q = yW + x$. Every direction walks its lines the same way,
#
# $$
# q(l, t) = \text{first} + l \cdot \text{line\_stride} + t \cdot \text{step\_stride},
# \qquad 0 \le l < \text{lines}, \quad 0 \le t < \text{length},
# $$
#
# so the kernel has no code per direction; Python passes one row of five integers per direction
# (`minirnng.cuda.scan_geometry`). For a 4×6 image:

# %%
height, width = 4, 6
geometry = scan_geometry(DIRECTIONS, height, width)
print(f"{'direction':15s} lines length line_stride step_stride first")
for direction, row in zip(DIRECTIONS, geometry):
    print(f"{direction:15s} " + " ".join(f"{value:>6d}" for value in row))

# %% [markdown]
# A picture of the same walk: in each direction's panel, the colour is the thread (line $l$) that
# computes a pixel and the number is the step $t$ at which it does.

# %%
figure, axes = plt.subplots(1, 4, figsize=(14, 2.8))
for axis, direction, (lines, length, line_stride, step_stride, first) in zip(axes, DIRECTIONS, geometry):
    thread = np.zeros((height, width), dtype=int)
    step = np.zeros((height, width), dtype=int)
    for l in range(lines):
        for t in range(length):
            q = first + l * line_stride + t * step_stride
            thread[q // width, q % width], step[q // width, q % width] = l, t
    axis.imshow(thread, cmap="tab10", vmin=0, vmax=9)
    for (row, column), value in np.ndenumerate(step):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=9)
    axis.set_title(direction)
    axis.set_xticks([])
    axis.set_yticks([])
plt.show()

# %% [markdown]
# **Memory access.** In the vertical directions neighbouring threads take neighbouring *columns*,
# so at each step a warp of 32 threads reads 32 consecutive addresses: one coalesced transaction.
# In the horizontal directions the threads of a warp read addresses $W$ apart, but each cache line
# fetched then serves the next steps of the same thread.
#
# ## 4. Launching it: the thread layout
#
# The launch is `grid = (blocks_for(N * max(H, W)), D)`, `block = (256,)`: enough blocks in $x$
# to give every line of the longest direction a thread, one row of blocks per direction. For RNN-G
# at batch 1 (a 64×64 map) that is one block per direction, of which 64 threads work; at batch 16,
# four blocks per direction. Scalars must be NumPy scalars of the exact C type (`numpy.int32` for
# `int`): the launcher refuses a Python `int`, which CuPy would pass as 8 bytes where the kernel
# reads 4.
#
# On the emulator the launch runs the threads one after another in compiled C++; NumPy arrays go
# there, CuPy arrays to the GPU. Let us run all four directions in one launch and compare each
# with minirnng's NumPy layer:

# %%
N, C, H, W = 2, 3, 5, 7
x = rng.standard_normal((N, C, H, W))
g = rng.uniform(0.05, 0.95, (N, C, H, W))
weight = np.stack([constrain_recurrent_weight(rng.standard_normal((C, C))) for _ in DIRECTIONS])   # (D, C, C)
bias = 0.5 * rng.standard_normal((len(DIRECTIONS), C))                                             # (D, C)
D = len(DIRECTIONS)
h = np.empty((D, N, C, H, W))
i32 = np.int32
with backend.use("cuda-emulator"):
    kernel = get_kernel("gated_scan", "gated_scan_forward", np.float64)
    kernel((blocks_for(N * max(H, W)), D), (THREADS_PER_BLOCK,),
           (x, g, weight, bias, scan_geometry(DIRECTIONS, H, W), h, i32(D), i32(N), i32(C), i32(H * W)))

for d, direction in enumerate(DIRECTIONS):
    layer = GatedSpatialRNN(C, direction, dtype=np.float64)
    layer.params["W"][...], layer.params["b"][...] = weight[d], bias[d]
    print(f"{direction:15s} kernel vs NumPy layer: relative error {relative_error(h[d], layer.forward(x, g)):.1e}")

# %% [markdown]
# **What to expect:** 0 or a few ulps ($10^{-16}$) in float64: the same arithmetic in a slightly
# different order. In float32 expect about $10^{-7}$.
#
# ## 5. The backward kernel
#
# `gated_scan_backward` walks each line from its last step to its first with the recursion of
# notebook 07, $\delta_t = \xi_t + W^\top (g_{t+1} \odot \delta_{t+1})$, writes $\partial L/\partial x$ and
# $\partial L/\partial g$ per direction, and, for the parameter gradients, $e_t = g_t \odot \delta_t$
# (the $u_t$ of notebook 07 and of `gated_scan_backward`; not the paper's $\varepsilon$, which is
# $\partial L/\partial g$) and $h_{t-1}$ in a channel-major layout $(D, C, N, H, W)$. Then each
# $\partial L/\partial W_d$ is one matrix product, $e_d\, h_{\text{prev},d}^\top$ with both viewed as $C \times NHW$ matrices,
# and $\partial L/\partial b_d$ a sum: no atomics, and the same bits on every run.
#
# ### Lab: the Python side of a GPU layer
#
# Write `direction_strides` (the five numbers of section 3, without calling `scan_geometry`),
# then `gated_scan_forward_gpu` and `gated_scan_backward_gpu`, which launch the kernels for one
# direction ($D = 1$) exactly as a layer's `forward_gpu` would. Use the arrays' own module
# (`xp = backend.get_array_module(x)`) so that the same code runs on NumPy (emulator) and CuPy
# (GPU) arrays. The signatures are in `docs/kernels.md`; the launcher's error messages tell you
# when an argument has the wrong type or layout.

# %%
def direction_strides(direction, height, width):
    """-> (lines, length, line_stride, step_stride, first) of one direction on a height x width plane."""
    ### BEGIN SOLUTION
    horizontal = direction in ("left_to_right", "right_to_left")
    lines, length = (height, width) if horizontal else (width, height)
    line_stride, step_stride = (width, 1) if horizontal else (1, width)
    first = 0
    if direction in ("right_to_left", "bottom_to_top"):           # start at the far end, walk back
        first = (length - 1) * step_stride
        step_stride = -step_stride
    ### END SOLUTION
    return lines, length, line_stride, step_stride, first


def gated_scan_forward_gpu(x, g, W, b, direction):
    """x, g (N, C, H, W), W (C, C), b (C,) -> h (N, C, H, W) by one launch of gated_scan_forward, cache."""
    ### BEGIN SOLUTION
    xp = backend.get_array_module(x)
    n, c, height, width = x.shape
    row = direction_strides(direction, height, width)
    geometry = xp.asarray(np.array([row], dtype=np.int32))                      # (1, 5)
    h = xp.empty((1, n, c, height, width), dtype=x.dtype)                       # (D = 1, N, C, H, W)
    kernel = get_kernel("gated_scan", "gated_scan_forward", x.dtype)
    kernel((blocks_for(n * row[0]), 1), (THREADS_PER_BLOCK,),
           (x, g, W.reshape(1, c, c), b.reshape(1, c), geometry, h,
            np.int32(1), np.int32(n), np.int32(c), np.int32(height * width)))
    cache = (h, g, W, b, geometry, row[0])
    h = h[0]
    ### END SOLUTION
    return h, cache


def gated_scan_backward_gpu(dh, cache):
    """dh (N, C, H, W), the cache -> dx, dg (N, C, H, W), dW (C, C), db (C,)."""
    ### BEGIN SOLUTION
    h, g, W, b, geometry, lines = cache
    xp = backend.get_array_module(dh)
    n, c, height, width = dh.shape
    dx = xp.empty((1, n, c, height, width), dtype=dh.dtype)
    dg = xp.empty_like(dx)
    e = xp.empty((1, c, n, height, width), dtype=dh.dtype)                      # channel-major
    h_prev = xp.empty_like(e)
    kernel = get_kernel("gated_scan", "gated_scan_backward", dh.dtype)
    kernel((blocks_for(n * lines), 1), (THREADS_PER_BLOCK,),
           (xp.ascontiguousarray(dh).reshape(1, n, c, height, width), g, h, W.reshape(1, c, c), b.reshape(1, c),
            geometry, dx, dg, e, h_prev, np.int32(1), np.int32(n), np.int32(c), np.int32(height * width)))
    pixels = n * height * width
    dW = e.reshape(c, pixels) @ h_prev.reshape(c, pixels).T
    db = e.reshape(c, pixels).sum(axis=1)
    dx, dg = dx[0], dg[0]
    ### END SOLUTION
    return dx, dg, dW, db


# %%
labs.check_direction_strides(direction_strides)

# %%
labs.check_gated_scan_forward_gpu(gated_scan_forward_gpu)

# %%
labs.check_gated_scan_backward_gpu(gated_scan_forward_gpu, gated_scan_backward_gpu)

# %% [markdown]
# ## 6. On a GPU
#
# The same functions, given CuPy arrays, launch on the GPU (the kernel is compiled by NVRTC at
# its first launch and cached). This cell runs only where CuPy, a GPU and NVRTC are usable
# (`minirnng.backend.cupy_status()`); elsewhere it says why not. **What to expect:** GPU against
# emulator, a relative error of $10^{-15}$ or below in float64.

# %%
usable, reason = backend.cupy_status()
if usable:
    import cupy

    direction = "top_to_bottom"
    dh = np.random.default_rng(8).standard_normal(x.shape)  # a random upstream gradient, not ones
    with backend.use("cuda-emulator"):
        h_cpu, cache_cpu = gated_scan_forward_gpu(x, g, weight[2], bias[2], direction)
        grads_cpu = gated_scan_backward_gpu(dh, cache_cpu)
    with backend.use("cupy"):
        h_gpu, cache_gpu = gated_scan_forward_gpu(*(cupy.asarray(a) for a in (x, g, weight[2], bias[2])), direction)
        grads_gpu = gated_scan_backward_gpu(cupy.asarray(dh), cache_gpu)
        print("on the", backend.describe())
    print("h, GPU vs emulator:", relative_error(cupy.asnumpy(h_gpu), h_cpu))
    for name, on_gpu, on_cpu in zip(("dx", "dg", "dW", "db"), grads_gpu, grads_cpu):
        print(f"{name}, GPU vs emulator:", relative_error(cupy.asnumpy(on_gpu), on_cpu))
else:
    print("No GPU run here:", reason)

# %% [markdown]
# ## 7. Seeing a kernel think: printf
#
# `printf` works inside a kernel, on the GPU and on the emulator (where the lines come out in
# thread order). `docs/kernels.md`, section "Watching a kernel run", shows how to add one line to
# `gated_scan_forward` and watch $h$ step along the first row; the emulator recompiles the edited
# source by itself (in this notebook, whose process has already launched the kernel, after
# `minirnng.cuda.reload_kernels()`). Remember to delete the line afterwards: it is compiled into
# the GPU kernel too.
#
# ## Summary
#
# - The scan is sequential along a line and parallel across lines and directions: one thread per
#   (direction, image, line), the channels in a loop, $h_{t-1}$ in registers (up to 16 channels).
# - Five integers per direction turn the four scans into one walk; `blockIdx.y` picks the direction.
# - The backward kernel writes $e_t$ and $h_{t-1}$ channel-major, so $\partial L/\partial W$ is one
#   batched matrix product afterwards: no atomics, deterministic results.
# - The emulator runs the very same source on the CPU: the launch code and the index arithmetic are
#   tested on any laptop.
#
# ## Exercises
#
# 1. Count the bytes a thread reads and writes per step of the forward kernel for $C = 8$ in float32.
#    At 2 TB/s of memory bandwidth, how long should one direction of RNN-G take at batch 16? Time it
#    on a GPU with `cupy.cuda.Event` and compare.
# 2. The register path needs a compile-time bound on $C$. What would `REGISTER_CHANNELS = 64` cost
#    (count the registers a thread needs in float64), and what happens when a thread needs more
#    registers than the GPU gives it? Where is the line between the two paths worth drawing?
# 3. Launch the forward kernel with a grid one block too small for a batch of 2000 images. Which
#    pixels of `h` are wrong? The lab's check runs small problems, where one block too few is no
#    block at all (which the launcher refuses): how would it describe a grid kept at one block?
# 4. Pass `g=None` to `gated_scan_forward` (and `dg=None` to the backward): show that the result is
#    `SpatialRNN(..., activation="identity")` of eq. 1.
