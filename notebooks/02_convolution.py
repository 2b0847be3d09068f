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
# # 02 · Convolution: correlation, im2col, and the three gradients
#
# RNN-G has six convolutions (three in its trunk, 5×5 and 3×3; three 1×1) and two transposed convolutions.
# This notebook derives the forward and backward pass of `minirnng.layers.Conv2d` from its
# definition, shows how one matrix
# product (im2col) computes it, and explains why the gradient with respect to the input is a
# *transposed* convolution, the layer of notebook 03.
#
# **Lab.** The cells marked *lab* ask you to write `conv2d_forward` and `conv2d_backward`
# yourself; `minirnng.labs` checks them against minirnng and against finite differences.
#
# Conventions (the architecture spec): arrays are NCHW, the weight is `(O, C, k, k)` as in
# PyTorch, and gradient checks run in float64.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend, labs
from minirnng.data.synthetic import SyntheticFaces
from minirnng.gradcheck import check_layer, relative_error
from minirnng.layers import Conv2d, ConvTranspose2d
from minirnng.layers import naive
from minirnng.layers.im2col import col2im, im2col

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The forward pass is a cross-correlation
#
# Take a batch $x$ of shape $(N, C, H, W)$, a weight $w$ of shape $(O, C, k, k)$ and a bias $b$ of
# shape $(O,)$. With zero padding $p$ (the padded input $x^{\text{pad}}$ has shape
# $(N, C, H + 2p, W + 2p)$) and stride $s$, the output $y$ of shape $(N, O, H_o, W_o)$ is
#
# $$
# y_{n,o,y',x'} = b_o + \sum_{c=0}^{C-1} \sum_{i=0}^{k-1} \sum_{j=0}^{k-1}
#     w_{o,c,i,j}\; x^{\text{pad}}_{n,\,c,\,y' s + i,\,x' s + j},
# \qquad H_o = \left\lfloor \frac{H + 2p - k}{s} \right\rfloor + 1 ,
# $$
#
# and likewise $W_o$. There is no flip of the kernel: what deep learning calls a convolution is
# a *cross-correlation*. (A true convolution would read $w_{o,c,k-1-i,k-1-j}$; the two differ by a
# rotation of the kernel by 180°, which a learned kernel does not care about.)
#
# This is the formula of the docstring of `minirnng.layers.conv`, and the naive twin
# `minirnng.layers.naive.Conv2d` computes it with four loops, one output entry at a time. The fast
# layer must agree with it:

# %%
fast = Conv2d(3, 4, 3, stride=2, padding=1, rng=0, dtype=np.float64)
slow = naive.Conv2d(3, 4, 3, stride=2, padding=1, rng=0, dtype=np.float64)  # same seed: same weights
x = rng.standard_normal((2, 3, 7, 6))
y_fast, y_slow = fast.forward(x), slow.forward(x)
print("output shape", y_fast.shape, "  relative difference", relative_error(y_fast, y_slow))

# %% [markdown]
# A picture helps to see what a 3×3 correlation does. Applied to a (synthetic) face with the
# weights of two finite-difference kernels, it responds to vertical and horizontal edges, the
# kind of low-level feature `conv1` learns first.

# %%
image, labels = SyntheticFaces(1, size=128, seed=3)[0]
grey = image.astype(np.float64).mean(axis=2)[None, None] / 255.0        # (1, 1, 128, 128)
edges = Conv2d(1, 2, 3, padding=1, dtype=np.float64)
edges.params["weight"][0, 0] = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]     # responds to d/dx
edges.params["weight"][1, 0] = edges.params["weight"][0, 0].T          # responds to d/dy
edges.params["bias"][...] = 0
response = edges.forward(grey)                                           # (1, 2, 128, 128)

figure, axes = plt.subplots(1, 3, figsize=(10, 3.4))
axes[0].imshow(image)
axes[0].set_title("input")
for k, title in enumerate(["channel 0: vertical edges", "channel 1: horizontal edges"]):
    axes[k + 1].imshow(response[0, k], cmap="RdBu", vmin=-1.5, vmax=1.5)
    axes[k + 1].set_title(title)
for axis in axes:
    axis.set_axis_off()
plt.show()

# %% [markdown]
# ## 2. im2col: one matrix product instead of six loops
#
# For each output pixel the sum above reads one $C \times k \times k$ patch of the padded input.
# `im2col` copies every patch into a column of a matrix,
#
# $$
# \text{cols}_{n,\; c k^2 + i k + j,\; y' W_o + x'} = x^{\text{pad}}_{n,\,c,\,y' s + i,\,x' s + j},
# \qquad \text{cols} \in \mathbb{R}^{N \times C k^2 \times H_o W_o},
# $$
#
# so that, with the weight reshaped to $w_2 \in \mathbb{R}^{O \times C k^2}$, the correlation is one
# batched matrix product $y_n = w_2\, \text{cols}_n + b\,\mathbf{1}^\top$ with $y_n$ of shape
# $(O, H_o W_o)$. Here is `im2col` on a tiny $1 \times 1 \times 4 \times 4$ image with a 3×3 kernel,
# stride 1 and padding 1: sixteen columns (one per output pixel) of nine entries (one per
# kernel tap). The zeros are the padding.

# %%
tiny = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
print(tiny[0, 0])
print(im2col(tiny, kernel_size=3, stride=1, padding=1)[0].astype(int))

# %% [markdown]
# The price is memory: `cols` holds every input value up to $k^2$ times (9× for a 3×3 kernel,
# 25× for `conv1`'s 5×5). The reward is that the work lands in a matrix product, which NumPy
# (and cuBLAS on the GPU) runs at a large fraction of the machine's peak.
#
# ### Lab: write the forward pass
#
# Write `conv2d_forward` with `im2col` and one matrix product (`@` or `np.matmul` broadcast over
# the batch). Return `y` and a `cache`: whatever your backward will need (at least `cols`, the
# weight and the input's shape). Do not call `minirnng.layers.Conv2d`: that is what the check
# compares you with.

# %%
def conv2d_forward(x, weight, bias, stride=1, padding=0):
    """x (N, C, H, W), weight (O, C, k, k), bias (O,) -> y (N, O, Ho, Wo), cache."""
    ### BEGIN SOLUTION
    n, _, height, width = x.shape
    out_channels, _, k, _ = weight.shape
    out_height = (height + 2 * padding - k) // stride + 1
    out_width = (width + 2 * padding - k) // stride + 1
    cols = im2col(x, k, stride, padding)                               # (N, C*k*k, Ho*Wo)
    y = weight.reshape(out_channels, -1) @ cols + bias[:, None]        # (N, O, Ho*Wo)
    y = y.reshape(n, out_channels, out_height, out_width)
    cache = (x.shape, cols, weight, stride, padding)
    ### END SOLUTION
    return y, cache


# %%
labs.check_conv2d_forward(conv2d_forward)

# %% [markdown]
# ## 3. The backward pass: three gradients
#
# Let $L$ be a scalar loss and $\bar y = \partial L / \partial y$ the upstream gradient, of the
# shape of $y$, $(N, O, H_o, W_o)$; write $\bar y_n$ for image $n$ reshaped to $(O, H_o W_o)$.
# Because $y_n = w_2\,\text{cols}_n + b\,\mathbf{1}^\top$ is linear in each of $w_2$, $b$ and
# $\text{cols}_n$, the three gradients are the three products of matrix calculus:
#
# $$
# \frac{\partial L}{\partial w_2} = \sum_{n} \bar y_n\, \text{cols}_n^{\top} \quad (O \times C k^2),
# \qquad
# \frac{\partial L}{\partial b_o} = \sum_{n, y', x'} \bar y_{n,o,y',x'} \quad (O),
# \qquad
# \frac{\partial L}{\partial\, \text{cols}_n} = w_2^{\top}\, \bar y_n \quad (C k^2 \times H_o W_o).
# $$
#
# The last one is the gradient of the *columns*; an input value that was copied into several
# columns collects the gradient of every copy. That is exactly what `col2im` does: it scatters
# each column back to the patch it came from and **adds** where patches overlap, then drops the
# padding. So
#
# $$
# \frac{\partial L}{\partial x} = \operatorname{col2im}\!\left(w_2^{\top}\, \bar y\right)
# \quad (N, C, H, W).
# $$
#
# `col2im` is the *adjoint* (the transpose) of `im2col` as linear maps:
# $\langle \operatorname{im2col}(x), c\rangle = \langle x, \operatorname{col2im}(c)\rangle$ for every
# $x$ and $c$. That identity is all the backward pass needs; let us check it numerically:

# %%
x = rng.standard_normal((2, 3, 7, 6))
c = rng.standard_normal(im2col(x, 3, 2, 1).shape)
left = np.vdot(im2col(x, 3, 2, 1), c)
right = np.vdot(x, col2im(c, x.shape, 3, 2, 1))
print(f"<im2col(x), c> = {left:.12f}\n<x, col2im(c)> = {right:.12f}")

# %% [markdown]
# ### Why the input gradient is a transposed convolution
#
# Write the input gradient entry by entry. Input pixel $(u, v)$ of channel $c$ (in padded
# coordinates) was read by every output pixel $(y', x')$ with $y' s + i = u$ and $x' s + j = v$
# for some kernel tap $(i, j)$, with weight $w_{o,c,i,j}$:
#
# $$
# \frac{\partial L}{\partial x^{\text{pad}}_{n,c,u,v}} = \sum_{o} \sum_{\substack{y', i:\; y' s + i = u}}
# \sum_{\substack{x', j:\; x' s + j = v}} \bar y_{n,o,y',x'}\; w_{o,c,i,j}.
# $$
#
# Each *output* gradient pixel "paints" the kernel $w_{o,c}$, scaled by $\bar y_{n,o,y',x'}$, onto
# the input grid at $(y' s, x' s)$, and the paintings add up. That is the definition of a
# transposed convolution (notebook 03) from $O$ channels to $C$ channels with the *same* weight
# array: PyTorch's `ConvTranspose2d(O, C, k, stride, padding)` stores its weight as
# $(\text{in}, \text{out}, k, k) = (O, C, k, k)$, the very shape of our $w$. For stride 1 it is
# also an ordinary correlation of $\bar y$ with the kernel rotated by 180° and its two channel
# axes swapped (the sum over $y' = u - i$ runs the kernel backwards).
#
# So we can compute the input gradient with minirnng's `ConvTranspose2d`, given the
# convolution's weight unchanged, and compare it with `Conv2d.backward`:

# %%
conv = Conv2d(3, 5, 3, stride=2, padding=1, rng=1, dtype=np.float64)
x = rng.standard_normal((2, 3, 9, 7))
y = conv.forward(x)
dy = rng.standard_normal(y.shape)
dx = conv.backward(dy)

transposed = ConvTranspose2d(5, 3, 3, stride=2, padding=1, bias=False, dtype=np.float64)
transposed.params["weight"][...] = conv.params["weight"]                 # (5, 3, 3, 3), as it is
print("dx from Conv2d.backward vs ConvTranspose2d(dy):", relative_error(dx, transposed.forward(dy)))

# %% [markdown]
# (The shapes line up here because $(H + 2p - k)$ is divisible by $s$; otherwise the transposed
# convolution's output is a few rows short and `col2im` pads them with zero gradient: those
# input rows were never read.)
#
# ### Lab: write the backward pass
#
# Write `conv2d_backward(dy, cache)` returning `(dx, dweight, dbias)` with the formulas above. The
# check compares each gradient with `Conv2d.backward` and with finite differences of *your*
# forward, and recognises the usual slips: a rotated or transposed `dweight`, a `dbias` not summed
# over the batch, an input gradient that is still padded.

# %%
def conv2d_backward(dy, cache):
    """dy (N, O, Ho, Wo), the cache of conv2d_forward -> dx (N, C, H, W), dweight (O, C, k, k), dbias (O,)."""
    ### BEGIN SOLUTION
    x_shape, cols, weight, stride, padding = cache
    n, out_channels = dy.shape[:2]
    k = weight.shape[2]
    dy_columns = dy.reshape(n, out_channels, -1)                         # (N, O, Ho*Wo)
    dweight = np.einsum("nop,nqp->oq", dy_columns, cols).reshape(weight.shape)
    dbias = dy.sum(axis=(0, 2, 3))
    dcols = weight.reshape(out_channels, -1).T @ dy_columns              # (N, C*k*k, Ho*Wo)
    dx = col2im(dcols, x_shape, k, stride, padding)
    ### END SOLUTION
    return dx, dweight, dbias


# %%
labs.check_conv2d_backward(conv2d_forward, conv2d_backward)

# %% [markdown]
# ## 4. The check every layer passes
#
# minirnng checks every backward the same way (`minirnng.gradcheck`, notebook 01): a random
# upstream gradient $r$, the scalar $L = \sum r \odot y$, and centred differences
# $(L(\theta + \epsilon e_i) - L(\theta - \epsilon e_i)) / 2\epsilon$ for every entry $i$ of every
# input and parameter, compared by the relative error
# $\max_i |a_i - n_i| / \max_i (|a_i| + |n_i|)$.
#
# **What to expect.** In float64 with $\epsilon = 10^{-6}$ a correct backward gives relative
# errors around $10^{-10}$ (a convolution is linear in each argument, so the centred difference
# has no truncation error at all, and what remains is rounding: about
# $10^{-16} \cdot |L| / \epsilon$ relative to the gradient). Anything above $10^{-6}$ is a bug.

# %%
report = check_layer(Conv2d(3, 4, 3, stride=2, padding=1, rng=2, dtype=np.float64),
                     rng.standard_normal((2, 3, 7, 6)), rng=3)
print(report)
assert report.max_error < 1e-8

# %% [markdown]
# ## Summary
#
# - A convolution layer computes a cross-correlation: $y = w_2\,\text{im2col}(x) + b$, one matrix
#   product per image once the patches are unfolded into columns.
# - Its gradients are matrix products too: $\partial L/\partial w_2 = \sum_n \bar y_n
#   \text{cols}_n^\top$, $\partial L/\partial b = $ the sum of $\bar y$ over images and pixels, and
#   $\partial L/\partial x = \operatorname{col2im}(w_2^\top \bar y)$.
# - `col2im` is the adjoint of `im2col`, so the input gradient of a convolution is a transposed
#   convolution with the same weight, and, as notebook 03 shows, the other way round.
#
# ## Exercises
#
# 1. Count the multiply-adds of `conv1` (3→16, 5×5, on 128×128) and of `conv5` (32→32, 3×3, on
#    32×32). Which layer of RNN-G's trunk is the most expensive? Check your answer against the
#    shapes of the `cols` matrices.
# 2. Replace `im2col` by a loop over the $k^2$ kernel offsets that accumulates
#    `weight[:, :, i, j] @ x_shifted` (no `cols` matrix at all). Compare speed and memory with your
#    lab solution for `conv3` (16→32, 3×3, 64×64, batch 16).
# 3. Show with a $1 \times 1 \times 5 \times 5$ example that, for stride 1 and padding $p = (k-1)/2$, the
#    input gradient equals the correlation of $\bar y$ with the kernel rotated by 180° and its two
#    channel axes swapped. Which padding does that correlation need when $p = 0$?
# 4. The finite-difference check of section 4 is exact up to rounding for a convolution. Why? Make
#    $\epsilon$ a thousand times larger and see the error stay small; try the same with
#    `minirnng.layers.Sigmoid` and explain the difference.
