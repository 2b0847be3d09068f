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
# # 05 · Softmax and sigmoid cross-entropy: the gradient, log-sum-exp, imbalance, 1:5 sampling
#
# RNN-G is trained with three losses (the architecture spec): a softmax cross-entropy on the
# logits at full resolution, another on the coarse map at half resolution, and a sigmoid binary
# cross-entropy on the edge map, which teaches the gate where the semantic boundaries are. This
# notebook derives both losses and their gradients, shows how to compute them without overflow,
# and looks at the two ways the paper deals with unbalanced pixels: class weights and the 1:5
# sampling of boundary pixels.
#
# **Lab.** You write both losses, forward and backward; `minirnng.labs` checks them, including
# with logits of size $10^4$.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend, labs
from minirnng.data.pipeline import preload
from minirnng.data.synthetic import SyntheticFaces
from minirnng.gradcheck import check_loss, relative_error
from minirnng.losses import (SigmoidBinaryCrossEntropy, SoftDice, SoftmaxCrossEntropy, boundary_sample_mask,
                             boundary_target)
from minirnng.objective import class_balance_weights

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Softmax cross-entropy and its gradient
#
# For one pixel with logits $z \in \mathbb{R}^K$ and target class $t$,
#
# $$
# p = \operatorname{softmax}(z), \quad p_k = \frac{e^{z_k}}{\sum_{m} e^{z_m}}, \qquad
# \ell(z, t) = -\log p_t = \log \sum_m e^{z_m} - z_t .
# $$
#
# The derivative of the second form is immediate:
# $\partial \ell / \partial z_k = e^{z_k} / \sum_m e^{z_m} - [k = t] = p_k - [k = t]$, i.e.
#
# $$
# \frac{\partial \ell}{\partial z} = p - \operatorname{onehot}(t) \qquad (K,) .
# $$
#
# The layer works on logits of shape $(N, K, H, W)$ and targets of shape $(N, H, W)$, and averages
# over the set $U$ of pixels it uses (all of them, unless a mask or an ignore index removes some),
# with an optional weight $w_i = \text{class\_weights}[t_i]$ per pixel:
#
# $$
# L = \frac{\sum_{i \in U} w_i\, \ell(z_i, t_i)}{\sum_{i \in U} w_i}, \qquad
# \frac{\partial L}{\partial z_i} = \frac{w_i\,\big(p_i - \operatorname{onehot}(t_i)\big)}{\sum_{i \in U} w_i}
# \quad (0 \text{ outside } U),
# $$
#
# PyTorch's weighted mean, as in the docstring of `minirnng.losses`. Without weights the
# denominator is simply the number of pixels used, $|U|$ ($NHW$ when nothing is masked or ignored).
#
# ### Log-sum-exp
#
# The first form, $-\log p_t$ with $p$ from $e^{z}$, overflows as soon as a logit passes about 709
# in float64 (88 in float32). The second form does not, once the largest logit $z^* = \max_m z_m$
# is subtracted: $\log \sum_m e^{z_m} = z^* + \log \sum_m e^{z_m - z^*}$, where every exponent is
# $\le 0$ and the largest term of the sum is exactly 1.

# %%
z = np.array([1000.0, 998.0, -5.0])
with np.errstate(over="ignore", invalid="ignore"):
    naive_p = np.exp(z) / np.exp(z).sum()
shifted = z - z.max()
log_sum_exp = z.max() + np.log(np.exp(shifted).sum())
print("naive softmax:   ", naive_p)
print("-log p_0 (naive):", -np.log(naive_p[0]))
print("-log p_0 (lse):  ", log_sum_exp - z[0])

# %% [markdown]
# ### Lab: softmax cross-entropy
#
# Write the forward pass (the unweighted mean over all $NHW$ pixels, computed with log-sum-exp)
# and the backward pass, which gets the upstream gradient `dloss` (a float: the weight of this
# loss in the total) and returns $\text{dloss} \cdot \partial L / \partial z$.

# %%
def softmax_cross_entropy_forward(logits, target):
    """logits (N, K, H, W) float, target (N, H, W) int in [0, K) -> loss (a float), cache."""
    ### BEGIN SOLUTION
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum_exp = np.log(np.exp(shifted).sum(axis=1))                        # (N, H, W)
    picked = np.take_along_axis(shifted, target[:, None], axis=1)[:, 0]      # z_t - z*
    loss = float(np.mean(log_sum_exp - picked))
    probabilities = np.exp(shifted - log_sum_exp[:, None])
    cache = (probabilities, target)
    ### END SOLUTION
    return loss, cache


def softmax_cross_entropy_backward(dloss, cache):
    """dloss (a float), the cache -> dlogits (N, K, H, W) = dloss * dL/dlogits."""
    ### BEGIN SOLUTION
    probabilities, target = cache
    n, k, height, width = probabilities.shape
    onehot = np.arange(k)[None, :, None, None] == target[:, None]
    dlogits = dloss * (probabilities - onehot) / (n * height * width)
    ### END SOLUTION
    return dlogits


# %%
labs.check_softmax_cross_entropy(softmax_cross_entropy_forward, softmax_cross_entropy_backward)

# %% [markdown]
# ## 2. Sigmoid binary cross-entropy
#
# The edge head outputs one logit $z$ per pixel, shape $(N, 1, H/2, W/2)$; its target is
# $t \in \{0, 1\}$ (0 on a boundary, 1 elsewhere). With $\sigma(z) = 1 / (1 + e^{-z})$,
#
# $$
# \ell(z, t) = -t \log \sigma(z) - (1 - t) \log\big(1 - \sigma(z)\big)
#           = \max(z, 0) - z t + \log\left(1 + e^{-|z|}\right),
# \qquad \frac{\partial \ell}{\partial z} = \sigma(z) - t .
# $$
#
# The second form follows from $\log \sigma(z) = -\log(1 + e^{-z})$ and
# $\log(1 - \sigma(z)) = -z - \log(1 + e^{-z})$, then $\log(1 + e^{-z}) = \max(-z, 0) + \log(1 + e^{-|z|})$;
# no exponent in it is ever positive. The derivative is the same clean "prediction minus target"
# as for the softmax (the sigmoid is the softmax of $(0, z)$). Over the pixels selected by a
# boolean mask $M$ (the 1:5 sampling of section 4),
#
# $$
# L = \frac{1}{|M|} \sum_{i \in M} \ell(z_i, t_i), \qquad
# \frac{\partial L}{\partial z_i} = \frac{[i \in M]\,\big(\sigma(z_i) - t_i\big)}{|M|} .
# $$
#
# ### Lab: sigmoid binary cross-entropy with a mask

# %%
def sigmoid_cross_entropy_forward(logits, target, mask):
    """logits (N, 1, H, W), target (N, 1, H, W) in {0, 1}, mask bool (N, 1, H, W) -> loss, cache."""
    ### BEGIN SOLUTION
    used = mask.astype(np.float64)
    count = used.sum()
    per_pixel = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    loss = float((per_pixel * used).sum() / count)
    decay = np.exp(-np.abs(logits))                                   # sigmoid from e^-|z| only
    probability = np.where(logits >= 0, 1 / (1 + decay), decay / (1 + decay))
    cache = (probability, target, used, count)
    ### END SOLUTION
    return loss, cache


def sigmoid_cross_entropy_backward(dloss, cache):
    """dloss (a float), the cache -> dlogits (N, 1, H, W)."""
    ### BEGIN SOLUTION
    probability, target, used, count = cache
    dlogits = dloss * (probability - target) * used / count
    ### END SOLUTION
    return dlogits


# %%
labs.check_sigmoid_cross_entropy(sigmoid_cross_entropy_forward, sigmoid_cross_entropy_backward)

# %% [markdown]
# ## 3. The check for minirnng's own losses
#
# `minirnng.gradcheck.check_loss` multiplies the loss by a random scalar upstream gradient and
# compares the backward with centred differences. **What to expect:** around $10^{-8}$ to
# $10^{-9}$ in float64, a little above the layers' figures: a loss is a mean over the pixels, so each
# gradient entry is about $1/NHW$ of the loss, and the rounding error of the differences of the loss
# is relatively larger (the truncation error of the centred difference, $O(\epsilon^2)$ with
# $\epsilon = 10^{-6}$, is far below it).

# %%
logits = 3 * rng.standard_normal((2, 4, 5, 6))
target = rng.integers(0, 4, size=(2, 5, 6))
print(check_loss(SoftmaxCrossEntropy(class_weights=[0.5, 1.0, 2.0, 1.5]), logits, target,
                 title="SoftmaxCrossEntropy, class weights").format())
edge_logits = 3 * rng.standard_normal((2, 1, 5, 6))
edge_target = (rng.random((2, 1, 5, 6)) < 0.5).astype(np.float64)
print(check_loss(SigmoidBinaryCrossEntropy(), edge_logits, edge_target, rng.random((2, 1, 5, 6)) < 0.7,
                 title="SigmoidBinaryCrossEntropy, mask").format())

# %% [markdown]
# ## 4. Unbalanced pixels
#
# ### Classes
#
# Faces are mostly skin and background; hair is rarer, and at the HELEN level eyes and brows are
# each under 1 % of the pixels. With an unweighted mean, each class pulls on the parameters in
# proportion to its pixel count, so rare classes are learned last and least. Class weights
# $w_k \propto (\bar f / f_k)^{\gamma}$, with $f_k$ the frequency of class $k$,
# (`minirnng.objective.class_balance_weights`; $\gamma = 0$ is no weighting, $\gamma = 1$ full inverse
# frequency) make every class count more evenly. On 64 synthetic faces with the three LFW-PL
# classes:

# %%
faces = preload(SyntheticFaces(64, size=64, n_classes=3, seed=5), size=(64, 64))
frequency = np.bincount(faces.labels.ravel(), minlength=3) / faces.labels.size
for gamma in (0.0, 0.5, 1.0):
    weights = class_balance_weights(faces.labels, 3, power=gamma)
    share = weights * frequency / (weights * frequency).sum()
    print(f"gamma {gamma}: weights {np.round(weights, 2)}, share of the loss per class {np.round(share, 2)}")
print("pixel frequencies", np.round(frequency, 3), "for", faces.classes)

# %% [markdown]
# ### Classes, another way: soft Dice
#
# Class weights change how much each *pixel* pulls. The soft Dice loss
# (`minirnng.losses.SoftDice`, [derivation](../docs/derivations/losses.md#2b-soft-dice)) asks
# instead for a good F-measure in every *class*: with $p$ the softmax and $y$ the one-hot targets,
# summed over all the pixels of the batch,
#
# $$D_k = \frac{2 \sum_i p_{ik} y_{ik} + s}{\sum_i (p_{ik} + y_{ik}) + s}, \qquad L = 1 - \frac{1}{K} \sum_k D_k ,$$
#
# so a class of a few hundred pixels enters the mean as much as one of ten thousand. It is not
# in the paper; training can add it beside the three losses (`--dice-weight`). Its gradient goes
# through the softmax as $p_k \sum_{j \ne k} p_j (g_k - g_j)$, $g = \partial L / \partial p$,
# which keeps its digits on confident pixels. The same check as above, then how the two losses
# share their pull among the classes of the faces above, for a network that knows nothing yet
# (all logits 0): the cross-entropy's share follows the pixel counts; Dice's is spread more evenly,
# here much as the class weights of $\gamma = 0.5$ spread it. As the network learns, Dice's pull
# moves to the classes whose F-measure is worst.

# %%
logits = 3 * rng.standard_normal((2, 4, 5, 6))
target = rng.integers(0, 4, size=(2, 5, 6))
print(check_loss(SoftDice(), logits, target, rng.random((2, 5, 6)) < 0.7, title="SoftDice, mask").format())

uninformed = np.zeros((len(faces.labels), 3) + faces.labels.shape[1:])
face_labels = faces.labels.astype(np.int64)
for loss in (SoftmaxCrossEntropy(), SoftDice()):
    loss.forward(uninformed, face_labels)
    pull = np.array([np.abs(loss.backward()[:, k][face_labels == k]).sum() for k in range(3)])
    print(f"{type(loss).__name__:>20}: share of the gradient on each class's own pixels {np.round(pull / pull.sum(), 2)}")

# %% [markdown]
# ### Boundaries, and the paper's 1:5 sampling
#
# The gate's target (`minirnng.losses.boundary_target`) is 0 on the pixels that have a
# 4-neighbour with another label and 1 elsewhere, at the gate's half resolution. Boundaries are a
# minority: about one pixel in seven on these small synthetic faces (below), one in eleven at the
# real model's 64 x 64 gate (further below), where the same outlines cover a smaller share.
# Trained on all pixels, the edge head can reach a low loss by predicting "no boundary" almost
# everywhere, and the gate would never learn to close. The paper (section 5.1) balances the loss
# instead: **all** boundary pixels, and five times as many non-boundary pixels drawn at random
# (`minirnng.losses.boundary_sample_mask`),
# so boundaries are a sixth of what the loss sees. Where they are a seventh already, that changes
# little; the thinner the boundaries, the more it matters.

# %%
labels = faces.labels[:2, ::2, ::2].astype(np.int64)           # the gate's resolution: 32 x 32 here
target = boundary_target(labels)                               # (2, 1, 32, 32): 0 on boundaries
mask = boundary_sample_mask(target, ratio=5, rng=0)           # every boundary + 5x as many others
boundary = target == 0
print(f"boundary pixels: {boundary.mean():.1%} of all; of the sampled pixels: "
      f"{(boundary & mask).sum() / mask.sum():.1%} (1 in 6 = {1 / 6:.1%})")

figure, axes = plt.subplots(1, 4, figsize=(12, 3.2))
axes[0].imshow(faces.images[0])
axes[0].set_title("image (64 x 64)")
axes[1].imshow(labels[0], cmap="viridis")
axes[1].set_title("labels at the gate's 32 x 32")
axes[2].imshow(target[0, 0], cmap="gray")
axes[2].set_title("gate target: 0 = boundary")
axes[3].imshow(np.where(mask[0, 0], np.where(boundary[0, 0], 0.0, 1.0), 0.5), cmap="coolwarm")
axes[3].set_title("sampled: boundary (blue), other (red)")
for axis in axes:
    axis.set_axis_off()
plt.show()

# %% [markdown]
# Why 1:5 and not 1:1? The boundary is where the *gate* must close; everywhere else it must stay
# open, and those pixels are the majority of what the recurrence propagates through. Sampling
# keeps both errors visible to the loss without letting either dominate. The draw is random at
# every step (the trainer passes its own seeded generator), so over training every pixel is seen.
#
# How much does the sampling change? It depends on how thin the boundaries are. At the real
# model's resolution (128 × 128 images, a 64 × 64 gate) boundaries are thinner than in the small
# example above; measured on 16 synthetic faces:

# %%
full_size = preload(SyntheticFaces(16, size=128, n_classes=3, seed=6), size=(128, 128))
gate_target = boundary_target(full_size.labels[:, ::2, ::2].astype(np.int64))
fraction = float((gate_target == 0).mean())
print(f"boundary pixels at the 64 x 64 gate: {fraction:.1%} of all pixels")
print(f"their share of an unsampled edge loss: {fraction:.1%}; with 1:5 sampling: {1 / 6:.1%}")

# %% [markdown]
# ## Summary
#
# - Softmax and sigmoid cross-entropy share one gradient: prediction minus target, divided by the
#   (weighted) number of pixels used.
# - Compute $-\log p_t$ as $\operatorname{logsumexp}(z) - z_t$ after subtracting the largest logit,
#   and the binary loss as $\max(z, 0) - z t + \log(1 + e^{-|z|})$: no exponent is ever positive.
# - Rare classes can be up-weighted, or measured per class with a soft Dice term; the rare
#   *boundary* pixels are instead all kept and matched by five times as many random others, so the
#   gate sees both kinds of error.
#
# ## Exercises
#
# 1. Add class weights to your `softmax_cross_entropy_forward` / `backward` (the weighted mean of
#    section 1) and compare with `minirnng.losses.SoftmaxCrossEntropy(class_weights=...)`.
# 2. Show that the gradient of the softmax cross-entropy with respect to $z$ sums to 0 over the
#    classes of each pixel. What does that mean for the bias of the last layer?
# 3. In float32, for which logits does the naive $\log(1 - \sigma(z))$ give $-\infty$? Compare with
#    the stable form.
# 4. Train an edge head alone, once on all pixels and once with the 1:5 mask, and compare what each
#    predicts on the boundary pixels. A 1×1 head on the RGB images cannot work (one pixel's colour
#    does not say where a boundary is), so give it what RNN-G's edge head sees: the gates $G$ (8
#    channels at 64×64) of `FaceParser.pretrained().model` on the 16 faces of `full_size` (run its `trunk`
#    layers, then its `gate` layer on the last 8 channels), a `minirnng.layers.Conv2d` 8→1, 1×1,
#    float64, targets `boundary_target` of the labels at 64×64, a hundred steps of plain gradient
#    descent (rate 1). Which one predicts less than 0.5 on more of the boundary pixels, and why?
# 5. Show that $\partial L / \partial z$ of the soft Dice loss also sums to 0 over the classes of
#    each pixel. Then compute it in float32 both as $p_k (g_k - \sum_j p_j g_j)$ and as
#    `SoftDice` does, for a pixel with logits (20, 0, 0): which keeps the target class's gradient?
