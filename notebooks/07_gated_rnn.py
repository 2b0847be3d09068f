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
# # 07 · The gated RNN of eq. 3–4: derivation, the slips of eq. 4, stability, and propagation
#
# This is the layer the paper is about. A gate $g$, computed by the CNN for every pixel and
# channel, decides how much of the previous pixel's state flows into the next one: near 1 inside
# a region, near 0 on its boundary. This notebook derives the backward pass from scratch, shows
# that the printed eq. 4 has four slips and proves the corrected form with finite differences,
# explains the stability rule of section 3.2, and finally watches labels spread inside regions and
# stop at edges.
#
# The same derivation, in reference form, is the docs page `docs/derivations/gated-rnn.md`.
#
# **Lab.** You write the forward and backward pass of one direction.

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from minirnng import backend, labs
from minirnng.gradcheck import check_layer, numerical_gradient, relative_error
from minirnng.layers import FourWayGatedRNN, GatedSpatialRNN, constrain_recurrent_weight
from minirnng.propagation import demonstrate_propagation

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The forward pass (eq. 3)
#
# One scan line (a row, for `left_to_right`), positions $j = 0, \dots, T-1$, $C$ channels. Inputs
# $x_j \in \mathbb{R}^C$ (the label scores, the "X" half of `deconv6`) and gates
# $g_j \in (0, 1)^C$ (the sigmoid of the "G" half); parameters $W \in \mathbb{R}^{C \times C}$,
# $b \in \mathbb{R}^C$:
#
# $$
# h_j = x_j + g_j \odot \left(W h_{j-1} + b\right), \qquad h_{-1} = 0 . \tag{3}
# $$
#
# $\odot$ is elementwise (the gate acts channel by channel), $W h_{j-1}$ mixes channels, and the
# activation is the identity. Call the gated message $p_j = W h_{j-1} + b \in \mathbb{R}^C$, so
# $h_j = x_j + g_j \odot p_j$; at $j = 0$ the message is just $b$. On a map, $x$, $g$, $h$ are
# $(N, C, H, W)$ and each row of each image is a line.
#
# With $W = I$ and $b = 0$ (minirnng's initialisation) eq. 3 is a gated running sum,
# $h_j = x_j + g_j \odot h_{j-1}$: a score is carried along while the gate is open and cut where
# it closes.
#
# ## 2. The backward pass, derived
#
# Let $\xi_j = \partial L / \partial h_j$ arrive from above (not counting the recurrence), and let
# $\delta_j = dL/dh_j$ be the *total* gradient. $h_j$ influences $L$ directly and through
# $h_{j+1} = x_{j+1} + g_{j+1} \odot (W h_j + b)$, whose Jacobian with respect to $h_j$ is
# $\operatorname{diag}(g_{j+1})\, W$. Its transpose is $W^\top \operatorname{diag}(g_{j+1})$, so
#
# $$
# \delta_j = \xi_j + W^{\top}\left(g_{j+1} \odot \delta_{j+1}\right), \qquad \delta_{T-1} = \xi_{T-1} .
# $$
#
# Name the gradient that reaches the message, $u_j = \partial L / \partial p_j = g_j \odot \delta_j$;
# then $\delta_j = \xi_j + W^\top u_{j+1}$, and, since $x_j$ and $g_j$ enter only $h_j$ (with
# Jacobians $I$ and $\operatorname{diag}(p_j)$), and $W$, $b$ enter every $p_j$:
#
# $$
# \frac{\partial L}{\partial x_j} = \delta_j, \quad
# \frac{\partial L}{\partial g_j} = \delta_j \odot \left(W h_{j-1} + b\right), \quad
# \frac{\partial L}{\partial W} = \sum_{\text{lines}} \sum_j u_j\, h_{j-1}^{\top}, \quad
# \frac{\partial L}{\partial b} = \sum_{\text{lines}} \sum_j u_j .
# $$
#
# Shapes: $\delta_j, u_j, \partial L/\partial x_j, \partial L/\partial g_j \in \mathbb{R}^C$;
# $\partial L/\partial W$ is $C \times C$ (row $c$ = output channel, column $d$ = input channel);
# $\partial L/\partial b \in \mathbb{R}^C$. These are the equations of the docstring of
# `minirnng.layers.recurrent.gated_scan_backward` (with $t$ for $j$).
#
# ## 3. The printed eq. 4 and its slips
#
# The paper prints, with $\varepsilon_i = \partial L/\partial g_i$,
#
# $$
# \delta_i = \xi_i + g_i \cdot \omega\, \delta_{i+1}, \qquad
# \varepsilon_i = \delta_i \cdot \left(\omega_h h_{i+1} + b\right). \tag{4, as printed}
# $$
#
# Against the derivation: (1) the gate must be $g_{i+1}$, the gate that scaled the connection
# $i \to i+1$ on the way forward, and (2) it must act *before* the channel mixing; (3) the matrix
# must be $W^\top$; (4) $\varepsilon_i$ needs $h_{i-1}$, the state flowing *into* $i$. Each of the
# first three is invisible in a special case ($C = 1$, a symmetric $W$, a constant gate), and the
# fourth wherever the state does not vary along the line, so the proof uses three channels, a random
# non-symmetric $W$ and gates drawn independently at every pixel.
# `minirnng.labs.gated_backward_variant` computes the backward pass with each choice switchable;
# finite differences of the real layer decide:

# %%
N, C, H, T = 2, 3, 2, 6
layer = GatedSpatialRNN(C, "left_to_right", dtype=np.float64)
W, b = layer.params["W"], layer.params["b"]
W[...] = constrain_recurrent_weight(rng.standard_normal((C, C)))
b[...] = 0.5 * rng.standard_normal(C)
x, g = rng.standard_normal((N, C, H, T)), rng.uniform(0.05, 0.95, (N, C, H, T))
xi = rng.standard_normal((N, C, H, T))                                  # L = sum(xi * h)
h = layer.forward(x, g)


def loss():
    return float((layer.forward(x, g) * xi).sum())


numeric_dx = numerical_gradient(loss, x, range(x.size)).reshape(x.shape)
numeric_dg = numerical_gradient(loss, g, range(g.size)).reshape(g.shape)

choices = [
    ("printed eq. 4", dict(next_gate=False, transpose=False, previous_state=False, gate_before_mixing=False)),
    ("only g_{j+1} fixed", dict(transpose=False, previous_state=False, gate_before_mixing=False)),
    ("only W^T fixed", dict(next_gate=False, previous_state=False, gate_before_mixing=False)),
    ("only h_{j-1} fixed", dict(next_gate=False, transpose=False, gate_before_mixing=False)),
    ("all but h_{j-1}", dict(previous_state=False)),
    ("gate after mixing", dict(gate_before_mixing=False)),
    ("corrected", dict()),
]
print(f"{'variant':20s} {'error of dL/dx':>15s} {'error of dL/dg':>15s}")
for name, options in choices:
    dx, dg, _, _ = labs.gated_backward_variant(xi, h, g, W, b, **options)
    print(f"{name:20s} {relative_error(dx, numeric_dx):15.1e} {relative_error(dg, numeric_dg):15.1e}")

# %% [markdown]
# Only the fully corrected form agrees with the finite differences in both columns (about
# $10^{-10}$). A slip in the recursion for $\delta$ (the gate's index or place, $W$ for $W^\top$)
# spoils both gradients, by about $10^{-1}$; the state in $\varepsilon$ enters $\partial L/\partial g$
# only, so "all but $h_{j-1}$" gets $\partial L/\partial x$ right and $\partial L/\partial g$
# wrong by about $0.5$. The corrected eq. 4:
#
# $$
# \delta_i = \xi_i + \omega_h^{\top}\left(g_{i+1} \odot \delta_{i+1}\right), \qquad
# \varepsilon_i = \delta_i \odot \left(\omega_h h_{i-1} + b\right), \qquad
# \frac{\partial L}{\partial x_i} = \delta_i .
# $$
#
# ### Lab: one direction, left to right
#
# Write eq. 3 and its backward pass along the **last** axis of $(N, C, H, T)$ arrays. Return
# `(dx, dg, dW, db)`. The check recognises each slip of the printed eq. 4 and tells you which one
# you made.

# %%
def gated_rnn_forward(x, g, W, b):
    """x, g (N, C, H, T), W (C, C), b (C,) -> h (N, C, H, T) by eq. 3 along the last axis, cache."""
    ### BEGIN SOLUTION
    h = np.zeros_like(x)
    previous = np.zeros(x.shape[:-1])                                     # h_{-1} = 0, (N, C, H)
    for j in range(x.shape[-1]):
        message = np.einsum("cd,ndy->ncy", W, previous) + b[None, :, None]
        h[..., j] = x[..., j] + g[..., j] * message
        previous = h[..., j]
    cache = (h, g, W, b)
    ### END SOLUTION
    return h, cache


def gated_rnn_backward(dh, cache):
    """dh (N, C, H, T) = xi, the cache -> dx, dg (N, C, H, T), dW (C, C), db (C,)."""
    ### BEGIN SOLUTION
    h, g, W, b = cache
    steps = dh.shape[-1]
    delta = np.zeros_like(dh)
    carried = np.zeros(dh.shape[:-1])                                     # W^T u_{j+1}
    for j in reversed(range(steps)):
        delta[..., j] = dh[..., j] + carried
        carried = np.einsum("cd,ncy->ndy", W, g[..., j] * delta[..., j])  # W^T (g_j * delta_j)
    u = g * delta
    previous = np.concatenate([np.zeros(h.shape[:-1] + (1,)), h[..., :-1]], axis=-1)   # h_{j-1}
    message = np.einsum("cd,ndyt->ncyt", W, previous) + b[None, :, None, None]
    dx = delta
    dg = delta * message
    dW = np.einsum("ncyt,ndyt->cd", u, previous)
    db = u.sum(axis=(0, 2, 3))
    ### END SOLUTION
    return dx, dg, dW, db


# %%
labs.check_gated_rnn_forward(gated_rnn_forward)

# %%
labs.check_gated_rnn_backward(gated_rnn_forward, gated_rnn_backward)

# %% [markdown]
# ## 4. Four directions, and the layer's own check
#
# `FourWayGatedRNN` runs eq. 3 in the four directions with their own $W_d$, $b_d$, all on the same
# $x$ and $g$, and merges by the elementwise maximum (notebook 06 for the merge and its backward).
# Its gradient check, with distinct random weights so that no two directions tie: **expect**
# relative errors around $10^{-10}$ (eq. 3 is linear in $x$, bilinear in $(g, h)$, so the centred
# difference is nearly exact).

# %%
four = FourWayGatedRNN(3, dtype=np.float64)
for name, value in four.params.items():
    value[...] = constrain_recurrent_weight(rng.standard_normal(value.shape)) if name.endswith("W") \
        else rng.standard_normal(value.shape)
report = check_layer(four, rng.standard_normal((2, 3, 5, 4)), rng.uniform(0.05, 0.95, (2, 3, 5, 4)), rng=1)
print(report)
assert report.max_error < 1e-7

# %% [markdown]
# ## 5. The stability rule
#
# Eq. 3 is linear in the state. Unrolled,
# $h_j = \sum_{k \le j} \big(\operatorname{diag}(g_j) W\big) \cdots \big(\operatorname{diag}(g_{k+1}) W\big)
# (x_k + g_k \odot b)$ (the factors ordered from $m = j$ down to $k + 1$; none for $k = j$), so
# an input travels to pixel $j$ multiplied by $j - k$ factors $\operatorname{diag}(g_m) W$. If those
# factors can expand a vector, the state grows exponentially along the row, and so does the
# gradient, which flows back through the transposed factors. Section 3.2 keeps "$|g|$ and the norm
# of $\omega_h$ within one". minirnng makes that precise: the sigmoid keeps $0 < g < 1$, and after
# every optimizer step `constrain_recurrent_weight` rescales each $W$ so that its largest absolute
# row sum is at most 1:
#
# $$
# \lVert W \rVert_\infty = \max_c \sum_d |W_{cd}| \le 1
# \quad\Longrightarrow\quad
# \lVert \operatorname{diag}(g) W v \rVert_\infty \le \max_c g_c \, \lVert v \rVert_\infty ,
# $$
#
# so each step is a contraction in the max norm and
# $\lVert h_j \rVert_\infty \le (\max_k \lVert x_k \rVert_\infty + \gamma \lVert b \rVert_\infty) / (1 - \gamma)$
# for gates at most $\gamma < 1$, whatever the row length. (The max norm is the right one for an
# elementwise gate; and $\lVert A^\top \rVert_1 = \lVert A \rVert_\infty$ bounds the backward pass
# the same way.)
#
# The experiment: $C = 8$, a positive $W$ with row sums well above 1, gates in $[0.8, 0.99]$ (an open
# region), rows of growing width; then the same $W$ after the rule.

# %%
C = 8
W_free = rng.uniform(0, 0.35, (C, C))
W_kept = constrain_recurrent_weight(W_free.copy())
widths = [8, 16, 32, 64, 128, 256]
growth = {"no rule": [], "row sums <= 1": []}
for width in widths:
    shape = (1, C, 1, width)
    x_row, g_row = rng.uniform(-1, 1, shape), rng.uniform(0.8, 0.99, shape)
    for name, W_used in (("no rule", W_free), ("row sums <= 1", W_kept)):
        scan = GatedSpatialRNN(C, "left_to_right", dtype=np.float64)
        scan.params["W"][...] = W_used
        growth[name].append(np.abs(scan.forward(x_row, g_row)).max())

figure, axis = plt.subplots(figsize=(5.5, 3.5))
for name, values in growth.items():
    axis.semilogy(widths, values, "o-", label=name)
axis.set_xlabel("row width (pixels)")
axis.set_ylabel("max |h|")
axis.set_title("eq. 3 with and without the stability rule")
axis.legend()
plt.show()
print("largest row sum before:", np.abs(W_free).sum(axis=1).max().round(2),
      " after:", np.abs(W_kept).sum(axis=1).max().round(2))

# %% [markdown]
# ## 6. Watching it work: labels spread inside regions and stop at edges
#
# `minirnng.propagation.demonstrate_propagation` strips the layer of learning: $W = I$, $b = 0$,
# scores $x$ that are one-hot at a few seed pixels (one channel per label), and a gate computed
# from the image itself, near 1 in flat regions and near 0 on edges (the role RNN-G's gate branch
# learns to play). A few passes of the four-way layer, feeding the output back as input, spread
# each seed's label through its region. For contrast, the last panel uses a constant gate: nothing
# stops a label at an edge.

# %%
display(demonstrate_propagation())

# %% [markdown]
# ## Summary
#
# - Eq. 3, $h_j = x_j + g_j \odot (W h_{j-1} + b)$, back-propagates as
#   $\delta_j = \xi_j + W^\top (g_{j+1} \odot \delta_{j+1})$, with $\partial L/\partial x_j = \delta_j$,
#   $\partial L/\partial g_j = \delta_j \odot (W h_{j-1} + b)$, $\partial L/\partial W = \sum u_j h_{j-1}^\top$,
#   $\partial L/\partial b = \sum u_j$, $u_j = g_j \odot \delta_j$.
# - The printed eq. 4 has the wrong gate index, $W$ for $W^\top$, the gate after the mixing, and
#   $h_{i+1}$ for $h_{i-1}$; finite differences with $C > 1$, a non-symmetric $W$ and varying gates
#   tell them apart.
# - Gates in $(0, 1)$ and $\lVert W \rVert_\infty \le 1$ make each step a contraction: long rows
#   cannot blow up.
# - With an image-driven gate, the recurrence fills regions and stops at edges: the whole idea of
#   RNN-G in one picture.
#
# ## Exercises
#
# 1. The authors' Caffe layer defaults to the convex form $h_j = (1 - g_j) \odot x_j + g_j \odot (W h_{j-1} + b)$.
#    Derive its backward pass and check it with `minirnng.gradcheck.check` (write forward and
#    backward as two functions). How do $\partial L/\partial x$ and $\partial L/\partial g$ change?
# 2. In the stability experiment, replace the row-sum rule by dividing $W$ by its largest
#    singular value (the spectral norm). Is the max norm of $h$ still bounded, whatever the
#    sequence's length, for gates at most some $\gamma < 1$? Find a counterexample or a proof. What
#    happens to either rule's bound when the gates may come arbitrarily close to 1?
# 3. Call `demonstrate_propagation(passes=1)` and `passes=8`. Explain what one pass can and cannot
#    reach (notebook 06, section 3), and why the result stops changing after a few passes.
# 4. `demonstrate_propagation(edge_scale=...)`: how small can the gate's edge contrast be before
#    labels leak into the neighbouring region? Relate it to $\prod_m g_m$ along a path that crosses
#    an edge.
# 5. Start from $W = I$ ($C = 8$) and apply 2,000 steps that add Gaussian noise of standard
#    deviation 0.003 to every entry (a stand-in for Adam's steps, which move every entry by about
#    the learning rate), each followed by the stability rule: once with
#    `constrain_recurrent_weight`, once with `project_recurrent_weight`. Plot the mean of the
#    diagonal and the spectral radius against the step. Why does the rescale wear the diagonal
#    down when the projection does not? docs/training.md (runs AK and AL) shows what it did to
#    RNN-G.
