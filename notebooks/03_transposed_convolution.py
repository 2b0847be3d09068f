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
# # 03 · Transposed convolution and upsampling
#
# RNN-G works at half resolution in its middle (the recurrence runs on 64×64 for a 128×128 face)
# and must give labels at full resolution. Two transposed convolutions, `deconv6` (32→16 channels,
# 32×32 → 64×64) and `deconv9` (K→K, 64×64 → 128×128), do the upsampling, both with a 4×4 kernel,
# stride 2 and padding 1. This notebook defines the layer, derives its gradients from notebook 02
# (they are the convolution's, in the other order), and shows what it does to images: bilinear
# upsampling as a special case, and the checkerboard when kernel and stride do not fit.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend
from minirnng.data.pipeline import preload
from minirnng.data.synthetic import SyntheticFaces
from minirnng.gradcheck import check_layer, relative_error
from minirnng.layers import Conv2d, ConvTranspose2d
from minirnng.layers import naive

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Definition: every input pixel paints a kernel
#
# Input $x$ of shape $(N, C, H, W)$, weight $w$ of shape $(C, O, k, k)$ (PyTorch's layout: **in**
# channels first), bias $b$ of shape $(O,)$, stride $s$, padding $p$. Each input pixel
# $x_{n,c,u,v}$ adds the $O \times k \times k$ block $x_{n,c,u,v}\, w_{c}$ onto a padded output grid
# at $(u s, v s)$, overlapping contributions add, and $p$ rows and columns are cropped from each
# side:
#
# $$
# y^{\text{pad}}_{n,o,\,u s + i,\,v s + j} \mathrel{+}= x_{n,c,u,v}\; w_{c,o,i,j}, \qquad
# y = b + y^{\text{pad}}\text{ cropped by } p, \qquad
# y \in \mathbb{R}^{N \times O \times H_o \times W_o},\;\; H_o = (H - 1)s - 2p + k .
# $$
#
# (This is the naive twin `minirnng.layers.naive.ConvTranspose2d`, loop by loop.) In matrix form,
# with $w_2 = w$ reshaped to $(C, O k^2)$: $w_2^\top x_n$ is, for every input pixel, the
# $O k^2$ values it paints: exactly the *columns* of notebook 02; `col2im` adds them onto the
# output grid. So
#
# $$
# y = \operatorname{col2im}\!\left(w_2^{\top} x\right) + b ,
# $$
#
# the input-gradient computation of a convolution, used as a forward pass. For RNN-G's
# $k = 4$, $s = 2$, $p = 1$: $H_o = 2(H - 1) - 2 + 4 = 2H$, an exact doubling.

# %%
fast = ConvTranspose2d(3, 2, 4, stride=2, padding=1, rng=0, dtype=np.float64)
slow = naive.ConvTranspose2d(3, 2, 4, stride=2, padding=1, rng=0, dtype=np.float64)
x = rng.standard_normal((2, 3, 5, 4))
print("output shape", fast.forward(x).shape, " fast vs naive:", relative_error(fast.forward(x), slow.forward(x)))

# %% [markdown]
# ## 2. The gradients: the convolution's, in the other order
#
# $y = \operatorname{col2im}(w_2^\top x) + b$ is linear in $x$, $w_2$ and $b$, and `col2im` is the
# adjoint of `im2col` (notebook 02). With $\bar y = \partial L/\partial y$ of shape $(N, O, H_o, W_o)$:
#
# $$
# \frac{\partial L}{\partial x_n} = w_2\, \operatorname{im2col}(\bar y)_n \quad (C \times HW), \qquad
# \frac{\partial L}{\partial w_2} = \sum_n x_n\, \operatorname{im2col}(\bar y)_n^{\top} \quad (C \times O k^2), \qquad
# \frac{\partial L}{\partial b_o} = \sum_{n,y,x} \bar y_{n,o,y,x} ,
# $$
#
# where $x_n$ is image $n$ as a $C \times HW$ matrix and `im2col` uses the layer's own $k$, $s$,
# $p$. The input gradient $w_2\,\operatorname{im2col}(\bar y)$ is an ordinary **convolution** of
# $\bar y$: a `Conv2d` from $O$ to $C$ channels whose weight, in Conv2d's $(\text{out}, \text{in}, k, k)$
# layout, is $(C, O, k, k)$: the transposed convolution's weight array, unchanged. Notebook 02
# found the mirror image: a convolution's input gradient is a transposed convolution. The two
# layers are adjoint linear maps:
#
# $$
# \langle \operatorname{ConvT}_w(x),\, z \rangle = \langle x,\, \operatorname{Conv}_w(z) \rangle
# \quad\text{for all } x \in \mathbb{R}^{N \times C \times H \times W},\; z \in \mathbb{R}^{N \times O \times H_o \times W_o}.
# $$

# %%
up = ConvTranspose2d(3, 2, 4, stride=2, padding=1, bias=False, rng=1, dtype=np.float64)
down = Conv2d(2, 3, 4, stride=2, padding=1, bias=False, dtype=np.float64)
down.params["weight"][...] = up.params["weight"]               # (3, 2, 4, 4): the same array
x = rng.standard_normal((2, 3, 5, 4))
z = rng.standard_normal(up.output_shape(x.shape))
print(f"<ConvT(x), z> = {np.vdot(up.forward(x), z):.12f}")
print(f"<x, Conv(z)>  = {np.vdot(x, down.forward(z)):.12f}")
print("ConvTranspose2d.backward(z) vs Conv2d(z):", relative_error(up.backward(z), down.forward(z)))

# %% [markdown]
# ## 3. The check
#
# **What to expect:** like the convolution, the layer is linear in each argument, so centred
# differences are exact up to rounding: relative errors around $10^{-10}$ in float64.

# %%
report = check_layer(ConvTranspose2d(3, 2, 4, stride=2, padding=1, rng=2, dtype=np.float64),
                     rng.standard_normal((2, 3, 5, 4)), rng=3)
print(report)
assert report.max_error < 1e-8

# %% [markdown]
# ## 4. Upsampling
#
# With one channel in and out and $k = 2s$, a transposed convolution with a *separable triangle*
# kernel is bilinear interpolation. For $s = 2$ the 1-D kernel is $(\tfrac14, \tfrac34, \tfrac34, \tfrac14)$:
# each output pixel lies a quarter or three quarters of the way between two input pixels, and
# receives exactly those two weights from them. FCN-style networks initialise their upsampling
# layers this way; RNN-G starts its two at random, like every layer, and learns them (exercise 2
# tries the bilinear start).
#
# Below, a coarse 16×16 label map of a synthetic face, one channel per class, upsampled twice
# (16 → 32 → 64) in three ways: repeating pixels (nearest neighbour), the bilinear kernel, and a
# random 4×4 kernel. The arg-max over the classes gives the labels.

# %%
faces = preload(SyntheticFaces(1, size=64, n_classes=3, seed=2), size=(64, 64))
coarse = faces.labels[0, 2::4, 2::4]                                  # 16 x 16
scores = (np.arange(3)[:, None, None] == coarse[None]).astype(np.float64)[None]   # (1, 3, 16, 16)

triangle = np.array([0.25, 0.75, 0.75, 0.25])
bilinear = ConvTranspose2d(3, 3, 4, stride=2, padding=1, bias=False, dtype=np.float64)
bilinear.params["weight"][...] = 0
for c in range(3):                                                    # channel c paints only channel c
    bilinear.params["weight"][c, c] = np.outer(triangle, triangle)
random_kernel = ConvTranspose2d(3, 3, 4, stride=2, padding=1, bias=False, rng=4, dtype=np.float64)

results = {
    "nearest (repeat)": scores.repeat(4, axis=2).repeat(4, axis=3),
    "bilinear kernel": bilinear.forward(bilinear.forward(scores)),
    "random 4x4 kernel": random_kernel.forward(random_kernel.forward(scores)),
}
figure, axes = plt.subplots(1, 5, figsize=(14, 3))
axes[0].imshow(faces.images[0])
axes[0].set_title("image (64 x 64)")
axes[1].imshow(coarse, cmap="viridis", vmin=0, vmax=2)
axes[1].set_title("labels at 16 x 16")
for axis, (title, value) in zip(axes[2:], results.items()):
    axis.imshow(value[0].argmax(axis=0), cmap="viridis", vmin=0, vmax=2)
    axis.set_title(title)
for axis in axes:
    axis.set_axis_off()
plt.show()

# %% [markdown]
# Bilinear upsampling of *scores* gives smooth boundaries after the arg-max, where repetition
# gives blocks; a random kernel mixes the classes (it has to be trained).
#
# ### The checkerboard
#
# When $k$ is not a multiple of $s$, the painted blocks overlap unevenly: some output pixels
# receive contributions from more input pixels than their neighbours do. Feed a constant image and
# count: with $k = 4, s = 2$ every interior pixel gets exactly two contributions per axis; with
# $k = 3, s = 2$ they alternate between one and two, a checkerboard that a network must then learn
# to cancel.

# %%
constant = np.ones((1, 1, 8, 8))
figure, axes = plt.subplots(1, 2, figsize=(7, 3.4))
for axis, (k, p) in zip(axes, ((4, 1), (3, 1))):
    layer = ConvTranspose2d(1, 1, k, stride=2, padding=p, bias=False, dtype=np.float64)
    layer.params["weight"][...] = 1.0
    shown = axis.imshow(layer.forward(constant)[0, 0], cmap="magma", vmin=0, vmax=4)
    axis.set_title(f"k = {k}, s = 2: contributions per pixel")
    axis.set_axis_off()
figure.colorbar(shown, ax=axes, fraction=0.03)
plt.show()

# %% [markdown]
# ## Summary
#
# - A transposed convolution paints $x_{n,c,u,v}\, w_c$ at $(us - p, vs - p)$ and adds overlaps:
#   $y = \operatorname{col2im}(w_2^\top x) + b$, output size $(H - 1)s - 2p + k$.
# - Its input gradient is a convolution with the same weight array, and a convolution's input
#   gradient is a transposed convolution: the two are adjoint.
# - With $k = 4$, $s = 2$, $p = 1$ it doubles the resolution exactly; a triangle kernel makes it
#   bilinear interpolation; $k$ not a multiple of $s$ gives a checkerboard.
#
# ## Exercises
#
# 1. Derive the output size $(H - 1)s - 2p + k$ from the painting picture. Show that a `Conv2d`
#    with the same $k$, $s$, $p$ maps it back to exactly $H$; and find the sizes $H'$ for which
#    the round trip the other way, `ConvTranspose2d(Conv2d(x))`, does *not* give back $H'$. What does
#    PyTorch's `output_padding` add?
# 2. Initialise `deconv9` of an `minirnng.models.RNNG` with the bilinear kernel (channel-diagonal)
#    and compare its logits before training with those of the random initialisation.
# 3. Implement "resize, then convolve" (nearest-neighbour repeat followed by a 3×3 `Conv2d`) as an
#    alternative upsampling layer. Write its backward pass from the two layers' backward passes and
#    check it with `minirnng.gradcheck.check`. Does it show a checkerboard on a constant input?
