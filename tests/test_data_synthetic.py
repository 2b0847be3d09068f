"""SyntheticFaces: the embedded data set."""

import numpy
import pytest

from minirnng.data import HELEN_CLASSES, HELEN_TO_LFW, LFW_CLASSES, SyntheticFaces

EYE, NOSE = HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("nose")


@pytest.fixture(scope="module")
def faces():
    """40 single-face samples, 11 classes, and the same 40 with 3 classes."""
    eleven, three = SyntheticFaces(40, seed=3), SyntheticFaces(40, n_classes=3, seed=3)
    return [eleven[i] for i in range(40)], [three[i] for i in range(40)], eleven


def test_samples_follow_the_dataset_protocol(faces):
    samples, _, dataset = faces
    assert len(dataset) == 40 and dataset.classes == HELEN_CLASSES
    assert len(dataset.names) == 40 and len(set(dataset.names)) == 40
    for image, labels in samples[:5]:
        assert image.shape == (128, 128, 3) and image.dtype == numpy.uint8
        assert labels.shape == (128, 128) and labels.dtype == numpy.uint8
        assert labels.max() < len(HELEN_CLASSES)


def test_deterministic_per_seed_and_index():
    first, again, other = SyntheticFaces(5, seed=7), SyntheticFaces(9, seed=7), SyntheticFaces(5, seed=8)
    for index in (0, 4):
        numpy.testing.assert_array_equal(first[index][0], again[index][0])
        numpy.testing.assert_array_equal(first[index][1], again[index][1])
        numpy.testing.assert_array_equal(first.keypoints(index), again.keypoints(index))
        assert not numpy.array_equal(first[index][0], other[index][0])
    assert not numpy.array_equal(first[0][1], first[1][1])


def test_every_class_occurs(faces):
    samples, _, _ = faces
    present = set()
    for _, labels in samples:
        present.update(numpy.unique(labels).tolist())
    assert present == set(range(len(HELEN_CLASSES)))


def test_three_classes_merge_the_facial_parts(faces):
    eleven, three, _ = faces
    for (image11, labels11), (image3, labels3) in zip(eleven, three):
        numpy.testing.assert_array_equal(image11, image3)  # the same picture, labelled coarser
        assert labels3.max() < len(LFW_CLASSES)
        drawn = labels11 != 0
        numpy.testing.assert_array_equal(labels3[drawn], HELEN_TO_LFW[labels11[drawn]])
        # What HELEN calls background is background in LFW-PL too, except the neck and the ears
        # (LFW-PL's skin).
        assert set(numpy.unique(labels3[~drawn]).tolist()) <= {0, 1}


def test_an_open_mouth_parts_the_lips_and_keeps_both():
    faces = SyntheticFaces(60, size=128, n_classes=11, seed=11)
    upper, lower = HELEN_CLASSES.index("upper lip"), HELEN_CLASSES.index("lower lip")
    inner = HELEN_CLASSES.index("inner mouth")
    open_mouths = without_upper_lip = 0
    for index in range(len(faces)):
        labels = faces[index][1]
        if (labels == inner).any() and (labels == lower).any():  # an open mouth, not hidden
            open_mouths += 1
            without_upper_lip += not (labels == upper).any()
    assert open_mouths >= 20 and without_upper_lip == 0


def test_keypoints_sit_on_their_parts(faces):
    samples, _, dataset = faces
    on_part, mouth_distances = 0, []
    for index, (_, labels) in enumerate(samples):
        points = dataset.keypoints(index)
        assert points.shape == (5, 2) and points.dtype == numpy.float64
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]  # "left" is the image's left
        column, row = numpy.rint(points[:3]).astype(int).T
        on_part += int(labels[row[0], column[0]] == EYE) + int(labels[row[1], column[1]] == EYE + 1) \
            + int(labels[row[2], column[2]] == NOSE)
        lips = numpy.argwhere(numpy.isin(labels, [7, 8, 9]))[:, ::-1]
        if len(lips):
            mouth_distances += [numpy.hypot(*(lips - corner).T).min() for corner in points[3:]]
    assert on_part >= 0.85 * 3 * len(samples)   # occluders may hide a few
    assert numpy.median(mouth_distances) <= 1.0


def test_colour_alone_does_not_separate_the_classes(faces):
    """A per-colour lookup table fitted on 20 images labels 20 others barely better than
    "everything is background": shape and context are needed."""
    _, three, _ = faces

    def colour_bins(image):
        quantised = image // 32
        return (quantised[..., 0].astype(int) * 8 + quantised[..., 1]) * 8 + quantised[..., 2]

    counts = numpy.zeros((512, 3))
    for image, labels in three[:20]:
        numpy.add.at(counts, (colour_bins(image).ravel(), labels.ravel()), 1)
    lookup = counts.argmax(axis=1)
    correct = sum(int((lookup[colour_bins(image)] == labels).sum()) for image, labels in three[20:])
    background = sum(int((labels == 0).sum()) for _, labels in three[20:])
    total = 20 * 128 * 128
    assert correct / total < background / total + 0.12


def test_multi_face_images():
    dataset = SyntheticFaces(3, multi_face=True, n_classes=3, seed=1)
    for index in range(3):
        image, labels = dataset[index]
        assert image.shape == (512, 512, 3) and labels.shape == (512, 512)
        points = dataset.keypoints(index)
        assert points.ndim == 3 and points.shape[1:] == (5, 2) and 2 <= len(points) <= 6
        assert (labels == LFW_CLASSES.index("hair")).any() and (labels == LFW_CLASSES.index("skin")).any()


def test_other_sizes():
    image, labels = SyntheticFaces(1, size=64)[0]
    assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
    assert SyntheticFaces(1, size=100)[0][0].shape == (100, 100, 3)  # not a multiple of 8: JPEG blocks skip the border


@pytest.mark.parametrize("size", [130, 127, 0, 16, "128"])
def test_size_must_be_a_multiple_of_4(size):
    with pytest.raises(ValueError, match="multiple of 4"):
        SyntheticFaces(4, size=size)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_classes must be 11"):
        SyntheticFaces(4, n_classes=5)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        SyntheticFaces(0)
    with pytest.raises(ValueError, match=r"seed must be an integer in 0 \.\. 2\*\*32 - 1"):
        SyntheticFaces(4, seed=-1)
    with pytest.raises(IndexError, match="index -1 is out of range"):
        SyntheticFaces(4)[-1]
    with pytest.raises(IndexError, match="index 4 is out of range"):
        SyntheticFaces(4).keypoints(4)


def test_a_seed_beyond_32_bits_is_refused_rather_than_repeating_another_seeds_faces():
    with pytest.raises(ValueError, match=r"seed must be an integer in 0 \.\. 2\*\*32 - 1, got 4294967296"):
        SyntheticFaces(2, size=64, seed=2 ** 32)
    SyntheticFaces(2, size=64, seed=2 ** 32 - 1)
