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
# # 00 · A tour of minirnng
#
# minirnng implements the face parser of Liu, Shi, Liang and Yang, *Face Parsing via Recurrent
# Propagation* (BMVC 2017): a shallow CNN that predicts coarse labels and a gate map, and a
# spatially variant recurrent network that spreads the labels across the face, stopped by the
# gate at the boundaries. Every layer is written by hand, forward and backward, in NumPy and in
# CUDA, with no autograd.
#
# This notebook parses a face in three lines, then opens the network and shows every stage in
# one picture. The notebooks after it derive each piece:
#
# | notebook | what it derives |
# | --- | --- |
# | 01 | finite differences: the check behind every backward pass |
# | 02, 03 | convolution and transposed convolution |
# | 04, 05 | max pooling and ReLU; the losses |
# | 06, 07 | the spatial RNN (eq. 1–2) and the gated RNN (eq. 3–4) |
# | 08 | the same layer as a CUDA kernel |
# | 09 | training RNN-G, and the paper's Table 1 in miniature |
# | 10 | two-stage parsing of the eleven HELEN classes |

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cbook

from minirnng import backend
from minirnng.data.pipeline import normalize, resize_image
from minirnng.gradcheck import check_model
from minirnng.models import RNNG
from minirnng.parser import read_image
from minirnng.viz import GATE_COLOURMAP, colorize, overlay

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

image = read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))   # uint8 (H, W, 3)
print("image:", image.shape, image.dtype)

# %% [markdown]
# ## 1. Parse a face in three lines
#
# `FaceParser.pretrained()` loads the RNN-G that ships with minirnng, trained on LFW-PL for three
# classes (background, skin, hair). `parse` resizes any RGB image to the network's 128×128 input,
# runs it, resizes the class scores back to the image's size and takes the arg-max.

# %%
from minirnng.parser import FaceParser
parser = FaceParser.pretrained()
labels = parser.parse(image)

# %%
figure, axes = plt.subplots(1, 3, figsize=(12, 4.6))
axes[0].imshow(image)
axes[0].set_title("input")
axes[1].imshow(colorize(labels, parser.classes))
axes[1].set_title("labels: " + ", ".join(parser.classes))
axes[2].imshow(overlay(image, labels, parser.classes))
axes[2].set_title("overlay")
for axis in axes:
    axis.set_axis_off()
plt.show()
print(parser)

# %% [markdown]
# ## 2. The whole pipeline in one picture
#
# Inside the parser is `minirnng.models.RNNG`. For a $3 \times 128 \times 128$ input (the
# architecture spec):
#
# | layer | what | output |
# | --- | --- | --- |
# | `conv1`, `pool2` | 5×5 conv 3→16 + ReLU, 2×2 max pool | 16 × 64 × 64 |
# | `conv3`, `pool4` | 3×3 conv 16→32 + ReLU, 2×2 max pool | 32 × 32 × 32 |
# | `conv5` | 3×3 conv 32→32 + ReLU | 32 × 32 × 32 |
# | `deconv6` | 4×4 transposed conv, stride 2, 32→16 | 16 × 64 × 64 |
# | split | $X$ = the first 8 channels, $G = \sigma$(the last 8) | 8 + 8 × 64 × 64 |
# | `rnn` | four-way gated RNN on $(X, G)$, eq. 3 | 8 × 64 × 64 |
# | `conv8`, `deconv9` | 1×1 conv 8→3, 4×4 transposed conv | logits 3 × 128 × 128 |
# | `coarse`, `edge` | 1×1 convs on $X$ and on $G$ (training only) | 3 × 64 × 64, 1 × 64 × 64 |
#
# The model's `forward` returns `logits`, `coarse` and `edge`. To see the stages in between we
# walk the same layers one by one; the last line checks that the walk gives exactly the model's
# own logits.

# %%
model = parser.model
hidden = model.hidden
batch = normalize(resize_image(image, parser.input_size)[None])              # float32 (1, 3, 128, 128)
layers = model.layers
a = batch
for name in model.trunk:                                                     # conv1, pool2, relu1, ... deconv6
    a = layers[name].forward(a)
X = np.ascontiguousarray(a[:, :hidden])                                      # label features
G = layers["gate"].forward(np.ascontiguousarray(a[:, hidden:]))              # gates in (0, 1)
H = layers["rnn"].forward(X, G)                                              # after the recurrence
after_rnn = layers["conv8"].forward(H)                                       # (1, 3, 64, 64)
logits = layers["deconv9"].forward(after_rnn)                                # (1, 3, 128, 128)
coarse = layers["coarse"].forward(X)                                         # (1, 3, 64, 64)
outputs = model.forward(batch)
print("walk vs model.forward, largest difference of the logits:", float(np.abs(logits - outputs["logits"]).max()))

# %%
def as_colours(features):
    """An (8, h, w) feature map shown as RGB: its three principal components, scaled to [0, 1]."""
    flat = features.reshape(len(features), -1).T.astype(np.float64)
    flat -= flat.mean(axis=0)
    _, _, directions = np.linalg.svd(flat, full_matrices=False)
    projected = flat @ directions[:3].T
    projected = (projected - projected.min(axis=0)) / np.ptp(projected, axis=0)
    return projected.reshape(*features.shape[1:], 3)


panels = [
    ("input\n128 x 128", resize_image(image, parser.input_size), None),
    ("coarse map\narg-max of coarse(X), 64 x 64", colorize(coarse[0].argmax(axis=0), parser.classes), None),
    ("gate map (0 = stopped)\nmean of G over its 8 channels", G[0].mean(axis=0), GATE_COLOURMAP),
    ("RNN output H\n8 channels as 3 colours (PCA)", as_colours(H[0]), None),
    ("labels\narg-max of the logits, 128 x 128", colorize(logits[0].argmax(axis=0), parser.classes), None),
]
figure, axes = plt.subplots(1, 5, figsize=(17, 4))
for axis, (title, picture, colours) in zip(axes, panels):
    if colours:
        axis.imshow(picture, cmap=colours, vmin=0, vmax=1)
    else:
        axis.imshow(picture)
    axis.set_title(title, fontsize=10)
    axis.set_axis_off()
plt.show()

# %% [markdown]
# Read it left to right. The shallow CNN alone gives the coarse map: right in the large, ragged
# at the details, because each of its outputs sees only a small neighbourhood. The gate is darker
# (more closed) along outlines and lighter (open) inside regions. The recurrence carries the
# features along rows and columns through the open gates, so that, in $H$, regions become flat
# patches of one colour whose edges follow the gate; `conv8` and the transposed convolution
# `deconv9` turn them into class scores at full size.
#
# ## 3. Every gradient is checked
#
# None of this was trained with autograd. Each layer's backward pass is derived by hand
# (notebooks 02–07) and checked against finite differences, and so is the whole network: here,
# a small float64 RNN-G on a 12×8 input, a random sample of entries of every parameter.
# **What to expect:** relative errors of a few times $10^{-9}$, far below the tolerance of
# $10^{-6}$ (notebook 01 explains why).

# %%
small = RNNG(n_classes=3, rng=0, dtype=np.float64)
small.randomize_recurrence(1)
report = check_model(small, np.random.default_rng(2).standard_normal((1, 3, 12, 8)), max_entries=4, rng=3)
print(f"{len(report.rows)} arrays checked, largest relative error {report.max_error:.1e}")
assert report.max_error < 1e-6

# %% [markdown]
# ## Summary
#
# - `FaceParser.pretrained().parse(image)` labels background, skin and hair at the image's own size.
# - Inside, a shallow CNN produces label features $X$ and gates $G$; the four-way gated RNN
#   propagates $X$ where $G$ is open; two small heads supervise $X$ and $G$ during training.
# - Every backward pass, down to the whole network's, agrees with finite differences.
#
# ## Exercises
#
# 1. Parse a photograph of your own (`minirnng.parser.read_image(path)`). Where does the parser fail,
#    and is it the coarse map or the propagation that goes wrong?
# 2. `parser.scores(image)` gives the class probabilities at full size. Show the probability of
#    "hair" as an image: where is the network unsure?
# 3. Replace $G$ by a constant 0.5 before the `rnn` layer in the walk of section 2, and compare the
#    labels. What does the gate contribute?
