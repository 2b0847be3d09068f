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
# # 04 · Max pooling and ReLU: routing gradients, ties and kinks
#
# Two of RNN-G's layers have no parameters and hardly any arithmetic: `MaxPool2d` (`pool2`,
# `pool4`) and `ReLU` (after `conv1`, `conv3`, `conv5`). Their backward passes do not multiply
# by a Jacobian so much as *route* the gradient: each output gradient goes, whole, to the one input
# that produced the output. This notebook derives both, and looks hard at the two places where
# routing is ambiguous: ties (two inputs share the maximum) and kinks (ReLU at exactly 0).
#
# **Lab.** You write `relu_forward` / `relu_backward` and `maxpool2d_forward` /
# `maxpool2d_backward`; `minirnng.labs` checks them.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend, labs
from minirnng.gradcheck import check_layer, relative_error
from minirnng.layers import MaxPool2d, ReLU

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. ReLU
#
# Elementwise on an array of any shape (here $(N, C, H, W)$):
#
# $$
# y = \max(x, 0), \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y} \odot [x > 0].
# $$
#
# The Jacobian is diagonal with entries 1 (where $x > 0$) and 0 (where $x < 0$), so the backward
# pass lets the gradient through where the input was positive and stops it elsewhere. The cache
# is just the boolean mask $[x > 0]$ (see `minirnng.layers.activations`).
#
# **The kink.** At $x = 0$ the function has no derivative: the slope is 0 on the left and 1 on
# the right. Any value in $[0, 1]$ is a valid *subgradient*; minirnng, like PyTorch, picks 0 (the
# mask is $x > 0$, strictly). A centred finite difference straddles the kink and sees the average
# of the two slopes:

# %%
relu = ReLU()
x = np.array([[[[-1.0, 0.0, 1.0]]]])
relu.forward(x)
print("analytic dy/dx at -1, 0, 1:", relu.backward(np.ones_like(x)).ravel())
eps = 1e-6
print("centred difference at  0  :", (relu.forward(x + eps) - relu.forward(x - eps)).ravel()[1] / (2 * eps))

# %% [markdown]
# Neither is wrong: the function is simply not differentiable there. This is why gradient checks
# keep inputs away from kinks (minirnng's tests draw values at least $0.05$ from 0) and why a
# check that fails *only at a few entries that sit on a kink* is not a bug. In training, inputs of
# exactly 0 are rare (measure zero) and the choice of subgradient does not matter.
#
# ### Lab: ReLU
#
# Return `(y, cache)` from the forward and `dx` from the backward. Use slope 0 at $x = 0$.

# %%
def relu_forward(x):
    """x of any shape -> y = max(x, 0) of the same shape, cache."""
    ### BEGIN SOLUTION
    mask = x > 0
    y = np.where(mask, x, 0.0)
    cache = mask
    ### END SOLUTION
    return y, cache


def relu_backward(dy, cache):
    """dy of the shape of x, the cache of relu_forward -> dx."""
    ### BEGIN SOLUTION
    dx = dy * cache
    ### END SOLUTION
    return dx


# %%
labs.check_relu(relu_forward, relu_backward)

# %% [markdown]
# ## 2. Max pooling
#
# A $k \times k$ window with stride $s$ and no padding (PyTorch's `MaxPool2d`, floor mode):
#
# $$
# y_{n,c,y',x'} = \max_{0 \le i, j < k} x_{n,c,\,y' s + i,\,x' s + j},
# \qquad x \in \mathbb{R}^{N \times C \times H \times W}, \quad
# y \in \mathbb{R}^{N \times C \times H_o \times W_o}, \quad H_o = \left\lfloor \frac{H - k}{s} \right\rfloor + 1 .
# $$
#
# Inside one window the maximum is locally a *selection*: if entry $(i^*, j^*)$ is strictly the
# largest, small changes of the inputs do not change which one wins, so $y = x_{i^*, j^*}$ and
#
# $$
# \frac{\partial y_{n,c,y',x'}}{\partial x_{n,c,u,v}} = \big[(u, v) = (y' s + i^*,\; x' s + j^*)\big],
# \qquad
# \frac{\partial L}{\partial x_{n,c,u,v}} = \sum_{\text{windows } (y', x') \text{ won by } (u, v)}
# \frac{\partial L}{\partial y_{n,c,y',x'}} .
# $$
#
# The forward pass records the winner of each window (minirnng stores the offset $i^* k + j^*$
# in a small integer array); the backward pass sends each output gradient to its window's winner.
# The sum matters when windows overlap ($s < k$): one input can win several windows and then
# receives all their gradients. With RNN-G's $k = s = 2$ the windows tile the image and each input
# receives at most one gradient.
#
# A picture of the routing, on one $6 \times 6$ channel with $2 \times 2$ windows: the input, the
# output, and where an all-ones upstream gradient lands.

# %%
pool = MaxPool2d(2)
x = rng.permutation(36).reshape(1, 1, 6, 6).astype(np.float64)
y = pool.forward(x)
dx = pool.backward(np.ones_like(y))

figure, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for axis, array, title in zip(axes, (x, y, dx), ("input x (6x6)", "output y = max over 2x2", "dL/dx for dL/dy = 1")):
    axis.imshow(array[0, 0], cmap="viridis")
    for (row, column), value in np.ndenumerate(array[0, 0]):
        axis.text(column, row, f"{value:.0f}", ha="center", va="center", color="white", fontsize=9)
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
for line in (1.5, 3.5):
    axes[0].axhline(line, color="white")
    axes[0].axvline(line, color="white")
    axes[2].axhline(line, color="white")
    axes[2].axvline(line, color="white")
plt.show()

# %% [markdown]
# ### Ties
#
# When two entries of a window share the maximum, the max is a kink again: raising either one
# raises the output, lowering either one does not lower it. minirnng routes the whole gradient to
# the **first** maximum in row-major window order (as `numpy.argmax` and PyTorch's CPU kernel do),
# so the result is deterministic. Ties are common where a ReLU runs before the pooling: a window
# that is all zeros is then a four-way tie. (RNN-G pools first and applies the ReLU after, see
# exercise 3.)

# %%
tied = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
pool = MaxPool2d(2)
pool.forward(tied)
print("dL/dx for a tie between (0, 1) and (1, 0):\n", pool.backward(np.ones((1, 1, 1, 1)))[0, 0])

# %% [markdown]
# A gradient check with ties fails, for the same reason as at ReLU's kink: perturbing one of the
# tied entries upwards moves the output, downwards does not, and the centred difference reports
# the average, $\tfrac12$. Here is the check on integer-valued inputs (many ties) and on inputs
# spread $0.01$ apart (no ties):

# %%
with_ties = rng.integers(0, 3, size=(1, 2, 6, 6)).astype(np.float64)
print(check_layer(MaxPool2d(2), with_ties, title="with ties").format())
without_ties = rng.permutation(72).reshape(1, 2, 6, 6) * 0.01
print(check_layer(MaxPool2d(2), without_ties, title="without ties").format())

# %% [markdown]
# **What to expect.** Without ties or kinks, max pooling and ReLU are piecewise *linear*, so the
# centred difference is exact up to rounding: relative errors of $10^{-10}$ or below in float64.
# With ties, errors of order 1 at the tied entries, which say nothing about the code.
#
# ### Lab: max pooling
#
# Write `maxpool2d_forward(x, kernel_size, stride)` and `maxpool2d_backward(dy, cache)`. A loop
# over the $k^2$ window offsets (not over pixels) is fast enough. On a tie the *first* maximum in
# row-major order takes the whole gradient; overlapping windows must add their gradients.

# %%
def maxpool2d_forward(x, kernel_size, stride):
    """x (N, C, H, W) -> y (N, C, Ho, Wo) with Ho = (H - k) // s + 1, cache."""
    ### BEGIN SOLUTION
    k, s = kernel_size, stride
    n, c, height, width = x.shape
    out_height, out_width = (height - k) // s + 1, (width - k) // s + 1
    y = np.full((n, c, out_height, out_width), -np.inf)
    winner = np.zeros((n, c, out_height, out_width), dtype=np.int64)   # offset i*k + j of the maximum
    for i in range(k):
        for j in range(k):
            candidate = x[:, :, i:i + s * (out_height - 1) + 1:s, j:j + s * (out_width - 1) + 1:s]
            larger = candidate > y                    # strictly: an earlier offset keeps a tie
            y = np.where(larger, candidate, y)
            winner = np.where(larger, i * k + j, winner)
    cache = (x.shape, winner, k, s)
    ### END SOLUTION
    return y, cache


def maxpool2d_backward(dy, cache):
    """dy (N, C, Ho, Wo), the cache of maxpool2d_forward -> dx (N, C, H, W)."""
    ### BEGIN SOLUTION
    x_shape, winner, k, s = cache
    out_height, out_width = dy.shape[2:]
    dx = np.zeros(x_shape)
    for i in range(k):
        for j in range(k):
            rows = slice(i, i + s * (out_height - 1) + 1, s)
            columns = slice(j, j + s * (out_width - 1) + 1, s)
            dx[:, :, rows, columns] += np.where(winner == i * k + j, dy, 0.0)
    ### END SOLUTION
    return dx


# %%
labs.check_maxpool2d_forward(maxpool2d_forward)

# %%
labs.check_maxpool2d_backward(maxpool2d_forward, maxpool2d_backward)

# %% [markdown]
# ## 3. Why the network does not mind
#
# Both layers are piecewise linear; their gradients are exact almost everywhere, and the kinks
# form a set of measure zero that training crosses without noticing. The one practical effect is
# on **checks**: always draw test inputs that are tie-free and kink-free (minirnng's tests and
# `minirnng gradcheck` draw values on a shuffled ladder $0.01$ apart, shifted away from 0), and
# suspect a tie or kink first when a check fails at only a handful of entries.
#
# A last comparison: minirnng's fast layers against their naive twins (`minirnng.layers.naive`,
# loops that read like the equations), on data with many ties: the routing rule is the same.

# %%
from minirnng.layers import naive

x = rng.integers(0, 3, size=(2, 3, 7, 9)).astype(np.float64)
fast, slow = MaxPool2d(3, 2), naive.MaxPool2d(3, 2)
dy = rng.standard_normal(fast.output_shape(x.shape))
fast.forward(x)
slow.forward(x)
print("fast vs naive max pooling backward, with ties and overlapping windows:",
      relative_error(fast.backward(dy), slow.backward(dy)))

# %% [markdown]
# ## Summary
#
# - ReLU passes the gradient where $x > 0$ and stops it elsewhere; at $x = 0$ minirnng uses slope 0.
# - Max pooling routes each output gradient to its window's winner; overlapping windows add; on a
#   tie the first maximum in row-major order wins.
# - Both are piecewise linear: finite differences are exact away from ties and kinks and meaningless
#   on them. Check with tie-free, kink-free inputs.
#
# ## Exercises
#
# 1. Average pooling: derive its backward pass ($\partial L/\partial x$ spreads
#    $\partial L/\partial y / k^2$ over the window) and write it with the same loop over offsets.
#    Why does its gradient check never suffer from ties?
# 2. Change the tie rule of your lab solution to "share the gradient equally among the tied
#    maxima". Run `labs.check_maxpool2d_backward`: which message do you get? Is the shared rule a
#    valid subgradient?
# 3. If a ReLU ran on `conv1`'s output before `pool2`, what fraction of `pool2`'s windows would be
#    all-zero ties for a randomly initialised RNN-G on a synthetic face (`minirnng.models.RNNG`,
#    `minirnng.data.synthetic.SyntheticFaces`)? Where would their gradient go? RNN-G pools first
#    (`RNNG.trunk`): does that order change the network's output or its gradients, and which ties
#    does it leave (a positive maximum can tie too, on a face's flat patches)?
# 4. On the NumPy path the winner index is stored as the smallest unsigned integer type that holds
#    $k^2$ values (`minirnng.layers.pool.smallest_index_dtype`; the kernels store one byte, int8).
#    How much memory does that save for `pool2` on a batch of 16 images of 128×128, compared with
#    int64 indices?
