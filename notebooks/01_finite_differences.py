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
# # 01 · Finite differences: the oracle every backward pass is tested against
#
# minirnng has no autograd: every layer's backward pass is written by hand. What makes that safe
# is a check that needs no calculus at all: perturb an input a little, watch the loss move, and
# compare with what the backward pass claims. This notebook builds that check
# (`minirnng.gradcheck`) from the ground up: one-sided against centred differences, how the error
# depends on the step in float32 and float64, the relative error that decides pass or fail, the
# kinks where the check is meaningless, and how to check a vector-Jacobian product, which is
# what a backward pass computes.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend
from minirnng.gradcheck import check, check_layer, numerical_gradient, relative_error
from minirnng.layers import ReLU, Sigmoid

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. One-sided and centred differences
#
# For a smooth scalar function $f$ of one variable, Taylor's theorem gives
#
# $$
# f(u + \epsilon) = f(u) + \epsilon f'(u) + \tfrac{\epsilon^2}{2} f''(u) + \tfrac{\epsilon^3}{6} f'''(u) + O(\epsilon^4).
# $$
#
# The **one-sided** (forward) difference keeps the second-order term as its error,
#
# $$
# \frac{f(u + \epsilon) - f(u)}{\epsilon} = f'(u) + \tfrac{\epsilon}{2} f''(u) + O(\epsilon^2),
# $$
#
# while in the **centred** difference the even terms cancel:
#
# $$
# \frac{f(u + \epsilon) - f(u - \epsilon)}{2\epsilon} = f'(u) + \tfrac{\epsilon^2}{6} f'''(u) + O(\epsilon^4).
# $$
#
# Truncation error $O(\epsilon)$ against $O(\epsilon^2)$, for one more evaluation of $f$ per entry
# (the centred difference needs two, where the one-sided one can share $f(u)$ among all entries).
#
# ## 2. The error against the step, in float32 and float64
#
# Truncation is half the story. The computer evaluates $f$ with a relative rounding error of about
# the machine epsilon $u_{\text{mach}}$ ($1.1 \times 10^{-16}$ in float64, $6 \times 10^{-8}$ in float32),
# and dividing the difference by $\epsilon$ magnifies it: the rounding error of a difference quotient
# is about $u_{\text{mach}} |f| / \epsilon$. The total error is therefore roughly
#
# $$
# \underbrace{\tfrac{\epsilon}{2}|f''|}_{\text{one-sided}} + \frac{u_{\text{mach}}|f|}{\epsilon}
# \quad\text{and}\quad
# \underbrace{\tfrac{\epsilon^2}{6}|f'''|}_{\text{centred}} + \frac{u_{\text{mach}}|f|}{\epsilon},
# $$
#
# smallest at $\epsilon \approx \sqrt{u_{\text{mach}}}$ (one-sided) and $\epsilon \approx u_{\text{mach}}^{1/3}$ (centred):
# $10^{-8}$ and $5 \times 10^{-6}$ in float64, $2 \times 10^{-4}$ and $4 \times 10^{-3}$ in float32. The
# best reachable errors are about $10^{-8}$ and $10^{-11}$ in float64, but only $10^{-4}$ and
# $10^{-5}$ in float32. Let us measure it for $f(u) = e^{\sin u}$ at $u = 1$:

# %%
def f(u):
    return np.exp(np.sin(u))


def exact_derivative(u):
    return np.cos(u) * np.exp(np.sin(u))


steps = np.logspace(-12, -1, 45)
errors = {}
for dtype in (np.float32, np.float64):
    u = dtype(1.0)
    for kind in ("one-sided", "centred"):
        values = []
        for step in steps:
            eps = dtype(step)
            if kind == "one-sided":
                estimate = (f(u + eps) - f(u)) / eps
            else:
                estimate = (f(u + eps) - f(u - eps)) / (dtype(2) * eps)
            values.append(abs(float(estimate) - exact_derivative(1.0)) / abs(exact_derivative(1.0)))
        errors[(np.dtype(dtype).name, kind)] = np.maximum(values, 1e-17)

figure, axis = plt.subplots(figsize=(6.5, 4.2))
styles = {"one-sided": "--", "centred": "-"}
colours = {"float32": "tab:orange", "float64": "tab:blue"}
for (dtype, kind), values in errors.items():
    axis.loglog(steps, values, styles[kind], color=colours[dtype], label=f"{kind}, {dtype}")
axis.axvline(1e-6, color="grey", linewidth=0.8)
axis.text(1.3e-6, 0.03, "minirnng's eps = 1e-6", fontsize=8, color="grey", transform=axis.get_xaxis_transform())
axis.set_xlabel("step $\\epsilon$")
axis.set_ylabel("relative error of the derivative")
axis.set_title("$f(u) = e^{\\sin u}$ at $u = 1$")
axis.legend(fontsize=8)
plt.show()

# %% [markdown]
# Read the plot from the right: the truncation error falls with slope 1 (one-sided) or 2
# (centred); then, to the left, rounding takes over and the error *rises* with slope $-1$, in
# float32 far sooner than in float64. That is why minirnng checks gradients **in float64 with a
# centred difference and $\epsilon = 10^{-6}$**: near the bottom of the centred float64 curve. In
# float32 the best a centred step gives here is a few times $10^{-6}$, at $\epsilon \approx 5 \times
# 10^{-3}$, and a one-sided step about $3 \times 10^{-4}$; at minirnng's $\epsilon = 10^{-6}$ float32
# is off by several percent. For a loss summed over thousands of pixels the rounding of $f$ is
# larger still.
#
# ## 3. Relative error: one number that means the same everywhere
#
# A gradient with entries of size $10^3$ and one of size $10^{-3}$ cannot share an absolute
# tolerance. `minirnng.gradcheck.relative_error` scales the largest disagreement by the largest
# magnitude of the two arrays,
#
# $$
# \text{rel}(a, n) = \frac{\max_i |a_i - n_i|}{\max_i \big(|a_i| + |n_i|\big)} ,
# $$
#
# which is about $10^{-10}$ for a correct float64 backward, far above the tolerance for a wrong one
# ($1/3$ for a factor of 2, 1 for a sign error), and cannot be fooled by a single entry that
# happens to be near zero (where $|a_i - n_i| / |n_i|$ would explode). Two arrays that are both
# exactly zero score $0 / 0$: such a row compares nothing, and `minirnng.gradcheck` marks it `ZERO`
# and fails it, unless the caller declares that gradient zero (`expect_zero`).
# minirnng passes a check below $10^{-6}$; layers land two to four orders of magnitude below that
# (about $10^{-10}$ to $2 \times 10^{-9}$), losses and whole models near $10^{-8}$.

# %%
analytic = np.array([1000.0, 1e-3, -2.0])
numeric = analytic * (1 + 1e-9) + np.array([0, 1e-9, 0])
print("relative error of an accurate gradient:", relative_error(analytic, numeric))
print("per-entry relative errors:             ", np.abs(analytic - numeric) / np.abs(numeric))
print("relative error of a gradient with one wrong entry:", relative_error(analytic, numeric + [0, 0, 1.0]))

# %% [markdown]
# The price of one scale for the whole array: an error in a small entry is measured against the
# largest one. Here the wrong entry is off by 1 where the largest is 1000, so the relative error
# is "only" $5 \times 10^{-4}$, still more than two orders of magnitude above the tolerance, so the
# check fails as it should. A gradient whose entries span more than about ten orders of magnitude
# would need its small entries checked separately; the layers of RNN-G never come close.

# %% [markdown]
# ## 4. Kinks
#
# The derivation of section 1 assumed $f$ smooth around $u$. A ReLU at 0 or a max with a tie is
# not: the slope jumps inside $[u - \epsilon, u + \epsilon]$ and the centred difference reports an
# average of the two slopes. The analytic backward is right (it picks one subgradient); the check
# is what fails.

# %%
relu = ReLU()
for u in (0.3, 1e-7, 0.0):
    x = np.array([[[[u]]]])
    relu.forward(x)
    analytic = relu.backward(np.ones_like(x)).item()
    numeric = numerical_gradient(lambda: float(relu.forward(x).sum()), x, [0]).item()
    print(f"ReLU at u = {u:<6g}: analytic slope {analytic:.3f}, centred difference {numeric:.3f}")

# %% [markdown]
# The rule that follows: **draw test inputs away from kinks and ties.** minirnng's tests use a
# shuffled ladder of values $0.01$ apart, shifted away from 0 (`tests/conftest.py::tie_free`); the
# next notebooks do the same.
#
# ## 5. Checking a vector-Jacobian product
#
# A layer maps an input $u \in \mathbb{R}^m$ to an output $y = F(u) \in \mathbb{R}^n$ with Jacobian
# $J = \partial y / \partial u \in \mathbb{R}^{n \times m}$. Its backward pass never forms $J$: given
# the upstream gradient $r = \partial L / \partial y \in \mathbb{R}^n$ it returns the
# **vector-Jacobian product** $J^\top r = \partial L / \partial u \in \mathbb{R}^m$. To check a VJP
# with scalar differences, fix a random $r$ and differentiate the scalar
#
# $$
# \ell(u) = \langle r, F(u) \rangle, \qquad \nabla \ell(u) = J^\top r ,
# $$
#
# entry by entry with centred differences: exactly what `minirnng.gradcheck.check` does. The
# upstream $r$ is random (not all ones) so that errors in different output entries cannot cancel.
#
# An example written from scratch, $F(u) = \tanh(A u)$ for a fixed matrix $A$ ($n \times m$),
# whose VJP is $A^\top\big((1 - y^2) \odot r\big)$; first right, then with $A$ where $A^\top$
# belongs:

# %%
A = rng.standard_normal((4, 4))


def forward(u):
    return np.tanh(A @ u)


def backward_right(r):
    y = forward(u)
    return A.T @ ((1 - y ** 2) * r)


def backward_wrong(r):
    y = forward(u)
    return A @ ((1 - y ** 2) * r)


u = rng.standard_normal(4)
print(check("VJP of tanh(A u), right", forward, backward_right, {"u": u}).format())
print(check("VJP of tanh(A u), A for A^T", forward, backward_wrong, {"u": u}).format())

# %% [markdown]
# **What to expect:** about $10^{-10}$ for the right backward pass (smooth function, float64,
# $\epsilon = 10^{-6}$) and order 1 for the wrong one.
#
# ### A cheaper check: one direction at a time
#
# Entry by entry costs two evaluations of $F$ per input entry. For large arrays there is a check
# with two evaluations in all: pick a random *direction* $v \in \mathbb{R}^m$ as well and compare
#
# $$
# \langle J^\top r, v \rangle \quad\text{with}\quad \frac{\ell(u + \epsilon v) - \ell(u - \epsilon v)}{2 \epsilon} .
# $$
#
# A wrong VJP passes it only by accident (with probability zero for random $v$). The CUDA kernel
# tests use it (`tests/cuda_cases.py`); `minirnng.gradcheck` instead checks a random sample of
# entries (its `max_entries`, "sparse mode"), which also says *which* entries are wrong.

# %%
r = rng.standard_normal(4)
v = rng.standard_normal(4)
eps = 1e-6
directional = (np.vdot(r, forward(u + eps * v)) - np.vdot(r, forward(u - eps * v))) / (2 * eps)
for name, backward in (("right", backward_right), ("wrong", backward_wrong)):
    print(f"{name}: <J^T r, v> = {np.vdot(backward(r), v):+.10f},  centred difference {directional:+.10f}")

# %% [markdown]
# ## 6. The same check on a real layer, and what float32 does to it
#
# `check_layer` applies section 5 to a minirnng layer: every input and every parameter, a random
# upstream gradient, centred differences in float64. Run in float32 instead (by hand here, since
# `check` insists on float64), the same correct backward pass looks wrong: section 2's rounding
# error, divided by $\epsilon$, swamps everything.

# %%
print(check_layer(Sigmoid(), rng.standard_normal((2, 3, 4, 5)), title="Sigmoid, float64").format())

x32 = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
sigmoid = Sigmoid()
r32 = rng.standard_normal(x32.shape).astype(np.float32)
sigmoid.forward(x32)
analytic32 = sigmoid.backward(r32)
numeric32 = np.empty(x32.size)
for i in range(x32.size):
    for sign in (+1, -1):
        moved = x32.copy()
        moved.flat[i] += np.float32(sign * 1e-3)
        value = float((sigmoid.forward(moved) * r32).sum())
        numeric32[i] = value if sign > 0 else (numeric32[i] - value) / 2e-3
print(f"Sigmoid, float32, eps = 1e-3: relative error {relative_error(analytic32.ravel(), numeric32):.1e}")

# %% [markdown]
# ## Summary
#
# - Centred differences have truncation error $O(\epsilon^2)$, one-sided $O(\epsilon)$; rounding adds
#   $O(u_{\text{mach}} / \epsilon)$. In float64 with $\epsilon = 10^{-6}$ a correct gradient agrees to
#   about $10^{-10}$; float32 at best to a few times $10^{-6}$ on a scalar function, with a step
#   a thousand times larger, and to percents at $\epsilon = 10^{-6}$.
# - Compare with the relative error $\max|a - n| / \max(|a| + |n|)$: about $10^{-10}$ right, about 1
#   wrong, no per-array tuning.
# - Kinks and ties break the check, not the backward pass: keep test inputs away from them.
# - A backward pass is a vector-Jacobian product; check it through $\langle r, F(u)\rangle$ with a
#   random $r$, entry by entry or along a random direction.
#
# ## Exercises
#
# 1. Add the *complex-step* derivative $\operatorname{Im} f(u + i\epsilon)/\epsilon$ to the plot of
#    section 2. It reaches float64's rounding near $\epsilon = 10^{-8}$; why does it not get worse
#    as $\epsilon$ shrinks further, down to $10^{-12}$ and far beyond, where the centred difference does?
# 2. Richardson extrapolation: combine centred differences with steps $\epsilon$ and $2\epsilon$ to
#    cancel the $\epsilon^2$ term. What is the new optimal step in float64, and the best error?
# 3. For $L = \sum_{i=1}^{M} y_i$ over $M$ pixels of size about 1, the rounding error of $L$ grows
#    like $u_{\text{mach}} M$. With $M = 16 \times 3 \times 128 \times 128$ (a training batch of RNN-G's
#    logits), what is the smallest relative error a float32 gradient check could report?
# 4. Find a wrong backward pass that passes the directional check of section 5 for some $v$, and
#    show that it fails for almost every other $v$.
