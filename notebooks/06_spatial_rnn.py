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
# # 06 · The spatial RNN of eq. 1–2: back-propagation through one row, then four directions
#
# Before the gate, the plain recurrence. The paper's "RNN" baseline (Table 1) treats every row of
# a feature map as a sequence and runs a recurrent network along it, in four directions. This
# notebook derives back-propagation through time for one row, finds the one slip of the printed
# eq. 2, and then assembles the four directions and their max merge, as
# `minirnng.layers.recurrent.SpatialRNN` and `FourWaySpatialRNN` do.
#
# **Lab.** You write the forward and backward pass of one direction.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend, labs
from minirnng.gradcheck import check_layer, numerical_gradient, relative_error
from minirnng.layers import DIRECTIONS, FourWaySpatialRNN, SpatialRNN, constrain_recurrent_weight

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. One row
#
# Take one row of one image, positions $t = 0, \dots, T-1$ (for `left_to_right`, $T$ is the image
# width), each holding a vector of $C$ channels: $x_t \in \mathbb{R}^C$. The layer has a weight
# $W \in \mathbb{R}^{C \times C}$ and a bias $b \in \mathbb{R}^C$ shared by all positions, rows and
# images. Eq. 1 without $\omega_x$ (removed, as the paper does):
#
# $$
# a_t = x_t + W h_{t-1} + b, \qquad h_t = \tanh(a_t), \qquad h_{-1} = 0, \tag{1}
# $$
#
# with $a_t, h_t \in \mathbb{R}^C$. On a whole map, $x$ and $h$ are $(N, C, H, W)$ and every row of
# every image is such a sequence.
#
# ## 2. Back-propagation through time along the row
#
# Let $\xi_t = \partial L / \partial h_t$ be the gradient that arrives from the layers *above*
# (not counting the path through the recurrence), shape $(C,)$. The state $h_t$ influences the loss
# directly ($\xi_t$) and through $a_{t+1} = x_{t+1} + W h_t + b$, whose Jacobian with respect to
# $h_t$ is $W$. Writing $\delta_t = \partial L / \partial a_t$ (the paper's $\delta$),
#
# $$
# \frac{\partial L}{\partial h_t} = \xi_t + W^{\top} \delta_{t+1},
# \qquad
# \delta_t = \tanh'(a_t) \odot \frac{\partial L}{\partial h_t}
#          = \left(1 - h_t^{2}\right) \odot \left(\xi_t + W^{\top} \delta_{t+1}\right),
# \qquad \delta_T = 0 ,
# $$
#
# computed from the end of the row back to its start. The rest follows from $a_t$:
#
# $$
# \frac{\partial L}{\partial x_t} = \delta_t, \qquad
# \frac{\partial L}{\partial W} = \sum_{\text{rows}} \sum_t \delta_t\, h_{t-1}^{\top} \;\; (C \times C), \qquad
# \frac{\partial L}{\partial b} = \sum_{\text{rows}} \sum_t \delta_t \;\; (C).
# $$
#
# The paper prints eq. 2 as $\delta_i = \theta'(a_i) \cdot (\xi_i + \omega_h \delta_{i+1})$: the
# structure is right, but back-propagating through $v \mapsto W v$ multiplies by $W^\top$, not $W$.
# With one channel, or a symmetric $W$, the two agree, which is how such a slip survives. With
# three channels and a random $W$, finite differences decide. (`minirnng.labs.plain_backward_variant`
# computes the recursion with either matrix; it is what the lab check uses to recognise the slip.)

# %%
N, C, H, T = 2, 3, 2, 6
layer = SpatialRNN(C, "left_to_right", activation="tanh", dtype=np.float64)
W = layer.params["W"]
W[...] = constrain_recurrent_weight(rng.standard_normal((C, C)))     # not symmetric
layer.params["b"][...] = 0.5 * rng.standard_normal(C)
x = rng.standard_normal((N, C, H, T))
xi = rng.standard_normal((N, C, H, T))                               # L = sum(xi * h)
h = layer.forward(x)
numeric = numerical_gradient(lambda: float((layer.forward(x) * xi).sum()), x, range(x.size)).reshape(x.shape)
for name, transpose in (("printed eq. 2 (W)", False), ("corrected (W^T)", True)):
    dx, _, _ = labs.plain_backward_variant(xi, h, W, transpose=transpose)
    print(f"{name:18s}: relative error of dL/dx against finite differences {relative_error(dx, numeric):.1e}")

# %% [markdown]
# ### Lab: one direction, left to right
#
# Write eq. 1 and its backward pass for `left_to_right` along the **last** axis of an
# $(N, C, H, T)$ array, with the tanh. Vectorise over the images and rows: the loop runs over the
# $T$ steps only, and each step is one `np.einsum` (or a matrix product) over the channels.

# %%
def spatial_rnn_forward(x, W, b):
    """x (N, C, H, T), W (C, C), b (C,) -> h (N, C, H, T), eq. 1 with tanh along the last axis, cache."""
    ### BEGIN SOLUTION
    h = np.zeros_like(x)
    previous = np.zeros(x.shape[:-1])                                    # h_{-1} = 0, (N, C, H)
    for t in range(x.shape[-1]):
        a = x[..., t] + np.einsum("cd,ndy->ncy", W, previous) + b[None, :, None]
        h[..., t] = np.tanh(a)
        previous = h[..., t]
    cache = (h, W)
    ### END SOLUTION
    return h, cache


def spatial_rnn_backward(dh, cache):
    """dh (N, C, H, T) = xi, the cache -> dx (N, C, H, T), dW (C, C), db (C,)."""
    ### BEGIN SOLUTION
    h, W = cache
    delta = np.zeros_like(dh)
    carried = np.zeros(dh.shape[:-1])                                    # W^T delta_{t+1}
    for t in reversed(range(dh.shape[-1])):
        delta[..., t] = (1 - h[..., t] ** 2) * (dh[..., t] + carried)
        carried = np.einsum("cd,ncy->ndy", W, delta[..., t])              # (W^T delta)[d] = sum_c W[c, d] delta[c]
    previous = np.concatenate([np.zeros(h.shape[:-1] + (1,)), h[..., :-1]], axis=-1)   # h_{t-1}
    dx = delta
    dW = np.einsum("ncyt,ndyt->cd", delta, previous)
    db = delta.sum(axis=(0, 2, 3))
    ### END SOLUTION
    return dx, dW, db


# %%
labs.check_spatial_rnn_forward(spatial_rnn_forward)

# %%
labs.check_spatial_rnn_backward(spatial_rnn_forward, spatial_rnn_backward)

# %% [markdown]
# ## 3. Four directions
#
# A row scanned left to right carries information rightwards only. The paper runs the same
# recurrence in four directions, `left_to_right`, `right_to_left`, `top_to_bottom` and
# `bottom_to_top`, each with its own $W_d$ and $b_d$, all fed the same $x$, and merges the four
# hidden maps by the elementwise maximum (its "node-wise max pooling"):
#
# $$
# h = \max_{d} h^{(d)}, \qquad
# \frac{\partial L}{\partial h^{(d)}} = \frac{\partial L}{\partial h} \odot [d \text{ wins}], \qquad
# \frac{\partial L}{\partial x} = \sum_d \frac{\partial L}{\partial x}^{(d)} ,
# $$
#
# where on a tie the first direction in that order wins (notebook 04's rule, for the same reason).
# In minirnng every direction is the *same* scan: the array is transposed and/or flipped so that
# the scan runs along one axis (`minirnng.layers.recurrent.to_scan_layout`), scanned, and put
# back. So the backward pass you wrote covers all four.
#
# What does one pass reach? Put a single nonzero input in the middle of an otherwise empty map
# and look at each direction's output (with the initial weights, $W = I$, $b = 0$, so the tanh
# keeps passing a fading copy along): each direction spreads the impulse along one half-line,
# and the merge keeps the largest.

# %%
impulse = np.zeros((1, 1, 15, 15))
impulse[0, 0, 7, 7] = 2.0
four = FourWaySpatialRNN(1, dtype=np.float64)
merged = four.forward(impulse)
outputs = {d: four.direction_layers[d].forward(impulse) for d in DIRECTIONS}

figure, axes = plt.subplots(1, 5, figsize=(14, 3))
for axis, (title, value) in zip(axes, list(outputs.items()) + [("max merge", merged)]):
    axis.imshow(value[0, 0], cmap="magma", vmin=0, vmax=1)
    axis.set_title(title)
    axis.set_axis_off()
plt.show()

# %% [markdown]
# One pass of four one-directional scans reaches the row and the column of a pixel, not the whole
# plane: information travels around a corner only through a second layer (or, in RNN-G, through
# the convolutions before and after). That is the receptive field of the recurrent layer, and a
# reason the paper's gated version still needs the CNN around it.
#
# ## 4. The check for the whole layer
#
# `check_layer` perturbs every entry of $x$ and of the four $W_d$, $b_d$. Random, distinct
# weights per direction avoid exact ties in the merge (identical weights tie at the image's
# corners, where two scans start, and the merge has a kink there). **What to expect:** relative
# errors around $10^{-10}$ in float64; the tanh makes the function curved, so the centred difference
# has a truncation error of order $\epsilon^2 = 10^{-12}$, still far below the tolerance of $10^{-7}$.
# One trap: a direction that wins the merge at no output has zero gradients, zero against zero, a
# check of nothing. `check_layer` reports such a row as `ZERO` and fails it rather than pass it;
# counting each direction's wins first tells us why, and that every direction is really tested.

# %%
four = FourWaySpatialRNN(3, dtype=np.float64)
for name, value in four.params.items():
    # small biases: with biases of size 1 one direction's can stay below another's everywhere
    value[...] = constrain_recurrent_weight(rng.standard_normal(value.shape)) if name.endswith("W") \
        else 0.1 * rng.standard_normal(value.shape)
x = rng.standard_normal((2, 3, 6, 7))
scans = np.stack([four.direction_layers[d].forward(x) for d in DIRECTIONS])
wins = {d: int((scans.argmax(axis=0) == k).sum()) for k, d in enumerate(DIRECTIONS)}
print("outputs won by each direction:", wins)
assert min(wins.values()) > 0, "a direction that wins nowhere would be checked against zero"
report = check_layer(four, x, rng=1)
print(report)
assert report.max_error < 1e-7

# %% [markdown]
# ## Summary
#
# - Eq. 1 along a row is an ordinary RNN; its backward pass runs the row in reverse with
#   $\delta_t = (1 - h_t^2) \odot (\xi_t + W^\top \delta_{t+1})$.
# - The printed eq. 2 has $W$ where $W^\top$ belongs; a non-symmetric $W$ with several channels and
#   finite differences expose it.
# - Four directions are one scan on re-laid-out arrays; the max merge routes each gradient to the
#   winning direction.
#
# ## Exercises
#
# 1. Replace the tanh by the identity (`SpatialRNN(..., activation="identity")`). Show that then
#    $h_t = \sum_{k \le t} W^{t-k} (x_k + b)$, and explain why the paper's stability rule (notebook 07)
#    becomes necessary.
# 2. The gradient with respect to $x_0$ is $\sum_t (\ldots) (W^\top)^t \ldots$: with
#    `SpatialRNN` on a single row of width 64, measure $|\partial L / \partial x_0|$ for
#    $L = h_{63}$ and $W = 0.5 I$, $I$, $1.5 I$. What happens to long-range gradients?
# 3. Implement the *cascade* alternative the paper mentions (each direction fed the previous
#    direction's output) with four `SpatialRNN` layers in a row. What is its receptive field after
#    one pass? Write its backward pass by chaining the four backward passes.
