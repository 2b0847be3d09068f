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
# # 10 · Two-stage parsing of the fine classes
#
# RNN-G parses the main regions (background, skin, hair) well, but a single network does poorly
# on the small facial components: the paper's Table 3 has "1-stage" F-measures of 63 for the eyes
# and 54 for the brows. Section 4 of the paper splits the problem: stage 1 finds the main regions
# and where the components are; stage 2 cuts a crop around each component, placed by five key
# points, and parses it with a small network of its own; the crops' labels are pasted back over
# stage 1's result to give HELEN's 11 classes. This notebook takes the pieces
# (`minirnng.models.stage2`, `minirnng.models.crops`, `minirnng.models.keypoints`) one at a time,
# checks a component network's gradients, trains the three networks in miniature, and composes a
# result.

# %%
import os

# One BLAS thread, as the `minirnng` command uses: these small matrix products gain little from more,
# and on a busy machine idle BLAS threads spin and slow everything down. (Set before NumPy loads.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import matplotlib.pyplot as plt
import numpy as np

from minirnng import backend
from minirnng.data.classes import HELEN_CLASSES
from minirnng.data.pipeline import denormalize, normalize, preload
from minirnng.data.synthetic import SyntheticFaces
from minirnng.gradcheck import check_model
from minirnng.metrics import confusion_matrix, table3_scores
from minirnng.models.crops import CROPS, CropGeometry, crop_bilinear, crop_nearest, helen_to_crop
from minirnng.models.keypoints import FaceShape
from minirnng.models.stage2 import MouthNet, TwoStageParser
from minirnng.models import RNNG
from minirnng.train_stage2 import PAPER_TABLE3, ComponentTrainConfig, train_components, training_keypoints
from minirnng.viz import colorize

backend.select("numpy")  # this notebook computes on NumPy arrays, on a machine with a GPU too

rng = np.random.default_rng(0)
train_set = preload(SyntheticFaces(160, size=128, n_classes=11, seed=0), size=(128, 128))
validation_set = preload(SyntheticFaces(24, size=128, n_classes=11, seed=1), size=(128, 128))

# %% [markdown]
# ## 1. Why two stages
#
# Count the pixels. At 128×128, the components are tiny next to background, skin and hair, so a
# loss averaged over all pixels hardly sees them, and the network's resolution (its gate and
# recurrence run at 64×64) leaves an eye a handful of pixels wide.

# %%
frequency = np.bincount(train_set.labels.ravel(), minlength=11) / train_set.labels.size
for name, share in sorted(zip(HELEN_CLASSES, frequency), key=lambda pair: -pair[1]):
    print(f"{name:12s} {100 * share:6.2f} % of the pixels")
print("\nthe paper's Table 3 (F-measure, %):")
print(f"{'':9s}" + "".join(f"{column:>9s}" for column in PAPER_TABLE3["1-stage"]))
for row, values in PAPER_TABLE3.items():
    print(f"{row:9s}" + "".join(f"{value:9.1f}" for value in values.values()))

# %% [markdown]
# Inside a crop around an eye, by contrast, the eye and the brow are a large fraction of the
# pixels, and the crop can be cut from the image at a finer resolution than stage 1 works at.
#
# ## 2. Key points and crops
#
# Five key points place the crops: the two eye centres, the nose tip and the two mouth corners.
# The paper takes them from a landmark detector; minirnng reads them off an 11-class label map
# (`minirnng.models.keypoints.keypoints_from_labels`): off the ground truth in training, off stage
# 1's prediction at test time, so that a bare image is enough.
#
# Each crop is an affine map $M \in \mathbb{R}^{2 \times 3}$ from the crop's pixel grid
# ($h \times w$) to image coordinates, $(x, y)^\top = M\,(j, i, 1)^\top$ for crop pixel (row $i$,
# column $j$). $M$ is built in a frame fixed by the key points: its origin is the component's own
# point (an eye centre, the nose tip, the middle of the mouth corners), its $x$ axis runs along
# the line through the eyes, its unit is the distance between the eyes, and the right eye's frame
# is mirrored so that one network serves both eyes. In that frame every crop is a fixed box,
# calibrated on training labels so that it holds the component plus a 20 % margin
# (`minirnng.models.crops.CropGeometry.fit`).
#
# | crop | network | input $h \times w$ | classes |
# | --- | --- | --- | --- |
# | left eye, right eye (mirrored) | `EyeBrowNet` | 64 × 64 | other, brow, eye |
# | nose | `NoseNet` | 64 × 64 | other, nose |
# | mouth | `MouthNet` | 32 × 64 | other, upper lip, inner mouth, lower lip |

# %%
train_points = training_keypoints(train_set)                 # (N, 5, 2), read off the label maps
validation_points = training_keypoints(validation_set)
geometry = CropGeometry.fit(train_set.labels, train_points)
shape = FaceShape.fit(train_points, train_set.labels)

face = 0
images = normalize(validation_set.images[face:face + 1])     # float32 (1, 3, 128, 128)
matrices = geometry.matrices(validation_points[face:face + 1])
figure, axes = plt.subplots(2, 5, figsize=(14, 5.6))
axes[0, 0].imshow(validation_set.images[face])
axes[0, 0].scatter(*validation_points[face].T, c="red", s=12)
for crop, (network, size, mirrored, _) in CROPS.items():
    corners = np.array([[0, 0, 1], [size[1] - 1, 0, 1], [size[1] - 1, size[0] - 1, 1], [0, size[0] - 1, 1], [0, 0, 1]])
    outline = corners @ matrices[crop][0].T
    axes[0, 0].plot(outline[:, 0], outline[:, 1], linewidth=1)
axes[0, 0].set_title("key points and crop boxes")
axes[1, 0].imshow(colorize(validation_set.labels[face], HELEN_CLASSES))
axes[1, 0].set_title("labels (11 classes)")
for column, (crop, (network, size, mirrored, _)) in enumerate(CROPS.items(), start=1):
    picture = denormalize(crop_bilinear(images, matrices[crop], size))[0]
    labels = helen_to_crop(crop)[crop_nearest(validation_set.labels[face:face + 1], matrices[crop], size)][0]
    axes[0, column].imshow(picture)
    axes[0, column].set_title(f"{crop} crop {size[0]}x{size[1]}" + (" (mirrored)" if mirrored else ""), fontsize=9)
    axes[1, column].imshow(labels, cmap="viridis", vmin=0, vmax=3)
    axes[1, column].set_title(f"its labels ({network} classes)", fontsize=9)
for axis in axes.flat:
    axis.set_axis_off()
plt.show()

# %% [markdown]
# ## 3. The component networks, and their gradient check
#
# Each component network is five convolutions, two max poolings and two transposed
# convolutions, no recurrence (the paper: "the segmentation task in the second stage is easier").
# For an $h \times w$ crop and width $c$ (8 by default): `conv1` 3→$c$ at $h \times w$, `pool2`,
# `conv3` $c$→$2c$, `pool4`, `conv5` and `conv6` $2c$→$2c$ at $h/4 \times w/4$, `deconv7` $2c$→$c$
# back to $h/2 \times w/2$, `conv8` 1×1, `deconv9` $c$→$K$ to logits $(N, K, h, w)$. Every layer is
# one of notebooks 02–04, so the network's backward pass is the chain of theirs, and it is
# checked like everything else. **What to expect:** relative errors of a few times $10^{-9}$ at most
# in float64.

# %%
mouth = MouthNet(rng=0, dtype=np.float64)
crop_input = rng.standard_normal((1, 3, 32, 64))
print({name: value.shape for name, value in mouth.forward(crop_input).items()})
report = check_model(mouth, crop_input, max_entries=4, rng=1)
print(f"MouthNet: {len(report.rows)} arrays checked, largest relative error {report.max_error:.1e}")
assert report.max_error < 1e-6

# %% [markdown]
# ## 4. Training the three networks, in miniature
#
# `minirnng.train_stage2.train_components` trains the three networks together: each step takes a
# batch of faces, jitters their key points a little (so the networks learn to tolerate stage 1's
# imprecise points), cuts the four crops, and takes one Adam step per network on a class-weighted
# softmax cross-entropy. Here: 160 synthetic faces, twenty short epochs, about half a minute of CPU,
# on one worker, so that every machine prints the same numbers (with a worker per core each batch's
# gradient is summed in another order, and twenty epochs on 160 faces carry that rounding to a
# visibly different result: up to 3 points of a crop's F-measure).

# %%
networks, history = train_components(train_set, train_points, geometry,
                                     ComponentTrainConfig(epochs=20, batch_size=16, lr=6e-3),
                                     validation_set, validation_points, progress=False, log=lambda message: None,
                                     workers=1)
last = history[-1]
for key, value in last.items():
    if key.startswith("val_F_"):
        print(f"validation F-measure on the crops, {key[6:]:18s} {value:5.1f} %")

# %% [markdown]
# ## 5. Composing the result
#
# `minirnng.models.stage2.TwoStageParser` composes the labels in three steps: every pixel starts
# with stage 1's best class among background, skin and hair; each crop then *claims* the pixels of
# its footprint where its network's arg-max is a part (not "other"), with that class's probability
# as the claim's confidence; where crops overlap, the most confident claim wins.
#
# To see stage 2 on its own, we feed the composition an *oracle* stage 1: the true main regions and
# the key points read off the true labels. (With a trained 11-class RNN-G as stage 1,
# `TwoStageParser.explain` runs the whole chain from a bare image; see the exercises.)

# %%
parser = TwoStageParser(RNNG(n_classes=11, rng=0), networks["eyes"], networks["nose"], networks["mouth"],
                        geometry=geometry, shape=shape)
truth = validation_set.labels.astype(np.int64)
main_classes = [HELEN_CLASSES.index(name) for name in ("background", "skin", "hair")]
oracle_main = np.where(np.isin(truth, main_classes), truth, HELEN_CLASSES.index("skin"))   # parts -> skin
crops = parser.run_crops(normalize(validation_set.images), validation_points)
composed = parser.compose(oracle_main, crops)

scores = table3_scores(confusion_matrix(composed, truth, 11))
print("stage 2 on an oracle stage 1, F-measure (%) on the validation faces:")
print("  " + ", ".join(f"{column} {value:.1f}" for column, value in scores.items()))

figure, axes = plt.subplots(2, 4, figsize=(12, 6.2))
for row, face in enumerate((0, 1)):
    axes[row, 0].imshow(validation_set.images[face])
    axes[row, 1].imshow(colorize(oracle_main[face], HELEN_CLASSES))
    axes[row, 2].imshow(colorize(composed[face], HELEN_CLASSES))
    axes[row, 3].imshow(colorize(truth[face], HELEN_CLASSES))
for axis, title in zip(axes[0], ("input", "stage 1 (oracle): main regions", "stage 2 pasted over it", "truth")):
    axis.set_title(title)
for axis in axes.flat:
    axis.set_axis_off()
plt.show()

# %% [markdown]
# After twenty short epochs on 160 faces the parts are recognisable but rough, and the rare or thin
# ones (the inner mouth first, then the upper lip and the brows) lag behind; the
# full-size training (`minirnng.train_stage2.reproduce_table3`) and its Table 3 are reported in
# the documentation's results page.
#
# ## Summary
#
# - Small components are rare and small at stage 1's resolution; crops around them are balanced
#   and can be cut at a finer resolution.
# - Five key points define a frame per component; a calibrated box in that frame is the crop, an
#   affine map from crop pixels to image pixels, mirrored for the right eye.
# - Three small networks (no recurrence) parse the crops; their backward passes are chains of the
#   layers of notebooks 02–04 and pass the same finite-difference check.
# - The composition keeps stage 1's main regions and pastes the most confident part labels.
#
# ## Exercises
#
# 1. Train an 11-class `RNNG` as stage 1 (`minirnng.train.Trainer` with `TrainConfig(n_classes=11,
#    class_balance=0.5)`) on the same faces, build a new `TwoStageParser` around it (the `parser`
#    above holds an untrained stage 1) with the trained component networks, and run
#    `explain(images)`. Where do the key points read off its prediction go wrong, and how much does
#    stage 2 suffer?
# 2. Replace the confidence rule of the composition by "the last crop pasted wins": copy
#    `TwoStageParser.compose` into a function of your own, drop the comparison with `flat_best`, and
#    compare its labels with the parser's. Which pixels change, with the key points read off stage 1
#    and with key points moved by noise? (Do not reorder
#    `minirnng.models.crops.CROPS` instead: that only changes how exact ties break, and
#    `run_crops` expects the crops of one network next to each other in it.)
# 3. Set `ComponentTrainConfig(jitter=0)` and evaluate the networks on crops cut at slightly wrong
#    key points (add noise to `validation_points`). What does the jitter buy?
# 4. Why is the right eye's crop mirrored rather than given a network of its own? Count the
#    parameters saved and think about what the eye network then learns.
