"""The input pipeline: resizing, letterboxing, normalisation, batches and augmentation.

Alignment tests paint an image whose colours encode its labels, transform both, and require the
colours to show the transformed labels wherever interpolation cannot have mixed two labels.
"""

import numpy
import pytest

from minirnng.data import (Augmentation, HELEN_CLASSES, INPUT_RANGE, KEYPOINT_MIRROR_ORDER, LFW_CLASSES,
                           Letterbox, PreloadedDataset, SyntheticFaces, affine_matrix, batches,
                           denormalize, letterbox, make_batch, mirror_permutation, normalize, preload,
                           resize, stack_samples, warp, warp_keypoints)

# Far-apart colours, one per HELEN class.
CODE_COLOURS = numpy.array([(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                            (255, 0, 255), (0, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128)], dtype=numpy.uint8)


def coded_sample(height, width, n_classes, seed=0, block=6):
    """Labels made of ``block``-pixel squares and the image that shows them in CODE_COLOURS."""
    rng = numpy.random.default_rng(seed)
    blocks = rng.integers(0, n_classes, (-(-height // block), -(-width // block)))
    labels = numpy.repeat(numpy.repeat(blocks, block, 0), block, 1)[:height, :width].astype(numpy.uint8)
    return CODE_COLOURS[labels], labels


def decode(image, n_classes):
    """The class whose code colour is nearest to each pixel: int ``(H, W)``."""
    distance = ((image[..., None, :].astype(int) - CODE_COLOURS[None, None, :n_classes].astype(int)) ** 2).sum(-1)
    return distance.argmin(-1)


def near_boundary(labels, radius=1):
    """bool ``(H, W)``: pixels within ``radius`` of a pixel with another label."""
    near = numpy.zeros(labels.shape, dtype=bool)
    padded = numpy.pad(labels, radius, mode="edge")
    height, width = labels.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near |= padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width] != labels
    return near


def assert_aligned(image, labels, n_classes, radius=1):
    """Colours decode to the labels except within ``radius`` pixels of a label boundary, where
    bilinear interpolation mixes colours (``radius``: one source pixel, in output pixels)."""
    decoded = decode(image, n_classes)
    mismatch = (decoded != labels) & ~near_boundary(labels, radius)
    assert not mismatch.any(), f"{mismatch.sum()} pixels disagree away from boundaries"


# ---------------------------------------------------------------------------------------------
# Resize and letterbox


@pytest.mark.parametrize("size", [(128, 128), (50, 70), (300, 260)])
def test_resize_keeps_labels_on_their_pixels(size):
    image, labels = coded_sample(96, 80, 11)
    resized_image, resized_labels = resize(image, labels, size)
    assert resized_image.shape == size + (3,) and resized_image.dtype == numpy.uint8
    assert resized_labels.shape == size and resized_labels.dtype == numpy.uint8
    upscale = max(size[0] / 96, size[1] / 80)
    assert_aligned(resized_image, resized_labels, 11, radius=max(1, int(numpy.ceil(upscale))))


def test_resize_rejects_mismatched_shapes():
    image, labels = coded_sample(20, 30, 3)
    with pytest.raises(ValueError, match="labels are 30x20 but the image is 20x30"):
        resize(image, labels.T, 16)
    with pytest.raises(ValueError, match=r"image must be uint8 \(H, W, 3\) RGB, got float64"):
        resize(image.astype(float), labels, 16)


@pytest.mark.parametrize("shape", [(300, 200), (97, 301), (512, 512), (256, 128)])
def test_letterbox_pads_to_the_canvas_and_back(shape):
    image, labels = coded_sample(*shape, 11, block=9)
    padded_image, padded_labels, box = letterbox(image, labels)
    assert padded_image.shape == (512, 512, 3) and padded_labels.shape == (512, 512)
    assert max(box.scaled) == 512
    assert abs(box.scaled[0] / box.scaled[1] - shape[0] / shape[1]) < 0.02
    outside = numpy.ones((512, 512), dtype=bool)
    outside[box.window] = False
    assert (padded_image[outside] == 0).all() and (padded_labels[outside] == 0).all()
    assert_aligned(padded_image[box.window], padded_labels[box.window], 11,
                   radius=max(1, int(numpy.ceil(512 / max(shape)))))

    restored = box.restore_labels(padded_labels.astype(numpy.int64))
    assert restored.shape == shape and restored.dtype == numpy.int64
    if 512 % max(shape) == 0:  # an integer scale: nearest there and back is exact
        numpy.testing.assert_array_equal(restored, labels)
    else:
        assert (restored == labels).mean() > 0.97
        assert ((restored != labels) & ~near_boundary(labels)).sum() == 0


def test_letterbox_maps_points_both_ways():
    box = Letterbox.fit(200, 300)
    assert box.scaled == (341, 512) and box.offset == (85, 0)
    points = numpy.array([[0.0, 0.0], [299.0, 199.0], [150.2, 17.5]])
    numpy.testing.assert_allclose(box.from_canvas(box.to_canvas(points)), points, atol=1e-9)
    # A single marked pixel lands where to_canvas says (within the resampling's half pixel).
    labels = numpy.zeros((200, 300), dtype=numpy.uint8)
    labels[120:124, 60:64] = 1
    padded = box.pad_labels(labels)
    centre = numpy.argwhere(padded == 1).mean(axis=0)[::-1]
    numpy.testing.assert_allclose(centre, box.to_canvas([61.5, 121.5]), atol=0.6)


def test_letterbox_restores_scores():
    box = Letterbox.fit(100, 60)
    scores = numpy.random.default_rng(0).random((3, 512, 512)).astype(numpy.float32)
    restored = box.restore_scores(scores)
    assert restored.shape == (3, 100, 60) and restored.dtype == numpy.float32
    with pytest.raises(ValueError, match=r"scores must be \(C, 512, 512\)"):
        box.restore_scores(scores[:, :100])
    with pytest.raises(ValueError, match="fitted to 100x60"):
        box.pad_labels(numpy.zeros((60, 100), dtype=numpy.uint8))


# ---------------------------------------------------------------------------------------------
# Normalisation, batches, preloading


def test_normalize_range_shape_and_inverse():
    images = numpy.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=numpy.uint8)
    images[0, 0, 0] = (0, 128, 255)
    inputs = normalize(images)
    assert inputs.shape == (2, 3, 5, 7) and inputs.dtype == numpy.float32
    assert inputs[0, 0, 0, 0] == INPUT_RANGE[0] and inputs[0, 2, 0, 0] == INPUT_RANGE[1]
    numpy.testing.assert_allclose(inputs[1, 1], images[1, ..., 1] / 255.0 + INPUT_RANGE[0], rtol=0, atol=1e-7)
    numpy.testing.assert_array_equal(denormalize(inputs), images)
    assert normalize(images[0]).shape == (3, 5, 7) and denormalize(inputs[0]).shape == (5, 7, 3)
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, H, W, 3\)"):
        normalize(images.astype(numpy.float32))


def test_make_batch_and_stack_samples():
    samples = [coded_sample(8, 6, 3, seed) for seed in range(4)]
    images, labels = stack_samples(samples)
    assert images.shape == (4, 8, 6, 3) and labels.shape == (4, 8, 6) and labels.dtype == numpy.uint8
    inputs, targets = make_batch(images, labels)
    assert inputs.shape == (4, 3, 8, 6) and inputs.dtype == numpy.float32
    assert targets.shape == (4, 8, 6) and targets.dtype == numpy.int64
    with pytest.raises(ValueError, match="sample 1 is"):
        stack_samples([samples[0], coded_sample(9, 6, 3)])


def test_preload_and_batches_cover_the_dataset_reproducibly():
    dataset = SyntheticFaces(10, size=64, n_classes=3)
    loaded = preload(dataset, size=32)
    assert isinstance(loaded, PreloadedDataset) and len(loaded) == 10
    assert loaded.images.shape == (10, 32, 32, 3) and loaded.labels.shape == (10, 32, 32)
    assert loaded.classes == LFW_CLASSES and loaded.names == dataset.names
    assert not loaded.images.flags.writeable
    first = list(batches(loaded, 4, rng=5, augmentation=Augmentation()))
    again = list(batches(loaded, 4, rng=5, augmentation=Augmentation()))
    assert [len(inputs) for inputs, _ in first] == [4, 4, 2]
    for (inputs, targets), (inputs_again, targets_again) in zip(first, again):
        assert inputs.dtype == numpy.float32 and targets.dtype == numpy.int64
        numpy.testing.assert_array_equal(inputs, inputs_again)
        numpy.testing.assert_array_equal(targets, targets_again)
    in_order = numpy.concatenate([targets for _, targets in batches(loaded, 3, shuffle=False)])
    numpy.testing.assert_array_equal(in_order, loaded.labels)
    assert len(list(batches(loaded, 4, rng=0, drop_last=True))) == 2


def test_labels_beyond_uint8_are_refused_not_wrapped():
    image = numpy.zeros((8, 8, 3), numpy.uint8)
    for value in (300, -1):
        labels = numpy.full((8, 8), value, numpy.int64)
        with pytest.raises(ValueError, match=f"labels range over {value} .. {value}; expected class indices"):
            stack_samples([(image, labels)])
        with pytest.raises(ValueError, match="labels range over"):
            resize(image, labels, (8, 8))  # the target size: nothing resampled, still checked


@pytest.mark.parametrize("size", [None, 2.5, "32", (32,), (32, 0)])
def test_preload_names_a_bad_size(size):
    with pytest.raises(ValueError, match="preload: size must be a positive int or a"):
        preload(SyntheticFaces(1, size=32), size=size)


def test_preload_letterbox():
    loaded = preload(SyntheticFaces(2, size=64), size=96, fit="letterbox")
    assert loaded.images.shape == (2, 96, 96, 3)
    with pytest.raises(ValueError, match="fit must be"):
        preload(SyntheticFaces(2, size=64), fit="crop")


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_a_singular_warp_is_named():
    image, labels = numpy.zeros((8, 8, 3), numpy.uint8), numpy.zeros((8, 8), numpy.uint8)
    flat = numpy.diag([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="warp: the affine matrix .* is singular"):
        warp(image[None], labels[None], flat[None], HELEN_CLASSES)


def test_identity_warp_changes_nothing():
    image, labels = coded_sample(40, 30, 11)
    images, label_maps = warp(image[None], labels[None], numpy.eye(3)[None], HELEN_CLASSES)
    numpy.testing.assert_array_equal(images[0], image)
    numpy.testing.assert_array_equal(label_maps[0], labels)


def test_warp_rounds_to_the_nearest_grey_level(rng):
    """A quarter-turn copies pixels exactly, and half-pixel shifts average neighbours without darkening: Pillow's
    bilinear on uint8 pictures rounds down, half a grey level on average."""
    image = rng.integers(0, 256, (32, 32, 3), dtype=numpy.uint8)
    labels = numpy.zeros((32, 32), numpy.uint8)
    quarter_turn = numpy.array([[0.0, -1.0, 31.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    images, _ = warp(image[None], labels[None], quarter_turn[None], LFW_CLASSES)
    numpy.testing.assert_array_equal(images[0], numpy.rot90(image, k=-1))
    half_pixel = numpy.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    images, _ = warp(image[None], labels[None], half_pixel[None], LFW_CLASSES)
    exact = (image[:, 1:].astype(float) + image[:, :-1]) / 2                 # output column j + 1 reads j + 0.5
    assert numpy.abs(images[0, :, 1:-1].astype(float) - exact[:, :-1]).max() <= 0.5
    assert abs((images[0, :, 1:-1].astype(float) - exact[:, :-1]).mean()) < 0.1


@pytest.mark.parametrize("classes", [HELEN_CLASSES, LFW_CLASSES])
def test_mirroring_flips_pixels_and_swaps_left_and_right(classes):
    image, labels = coded_sample(40, 30, len(classes))
    mirror = affine_matrix(0.0, 1.0, (0.0, 0.0), numpy.array([14.5, 19.5]), mirrored=True, width=30)
    images, label_maps = warp(image[None], labels[None], mirror[None], classes)
    numpy.testing.assert_array_equal(images[0], image[:, ::-1])
    permutation = mirror_permutation(classes)
    numpy.testing.assert_array_equal(label_maps[0], permutation[labels[:, ::-1]])
    if classes == HELEN_CLASSES:
        left_eye, right_eye = classes.index("left eye"), classes.index("right eye")
        assert permutation[left_eye] == right_eye and permutation[right_eye] == left_eye
        assert permutation[classes.index("left brow")] == classes.index("right brow")
    else:
        numpy.testing.assert_array_equal(permutation, numpy.arange(3))


@pytest.mark.parametrize("classes", [HELEN_CLASSES, LFW_CLASSES])
def test_random_augmentation_keeps_labels_on_their_pixels(classes):
    """Where the four source pixels around an output pixel's source position share one label,
    bilinear interpolation gives exactly that label's colour and nearest sampling that label:
    both must be found there (through the left/right swap for mirrored samples)."""
    n_classes, size = len(classes), 64
    samples = [coded_sample(size, size, n_classes, seed) for seed in range(8)]
    images = numpy.stack([image for image, _ in samples])
    labels = numpy.stack([labels for _, labels in samples])
    augmentation = Augmentation(max_rotation=25.0, scale_range=(0.8, 1.2), max_shift=0.1, mirror_probability=0.5)
    matrices = augmentation.sample(8, size, size, numpy.random.default_rng(1))
    warped_images, warped_labels = warp(images, labels, matrices, classes)
    mirrored = numpy.linalg.det(matrices[:, :2, :2]) < 0
    assert mirrored.any() and not mirrored.all()
    permutation = mirror_permutation(classes)
    rows, columns = numpy.mgrid[0:size, 0:size]
    for k in range(8):
        source = numpy.linalg.inv(matrices[k]) @ numpy.stack([columns.ravel(), rows.ravel(), numpy.ones(size * size)])
        x0, y0 = numpy.floor(source[0]).astype(int), numpy.floor(source[1]).astype(int)
        inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < size) & (y0 + 1 < size)
        x0, y0 = x0[inside], y0[inside]
        corners = numpy.stack([labels[k][y0 + dy, x0 + dx] for dy in (0, 1) for dx in (0, 1)])
        uniform = (corners == corners[0]).all(axis=0)
        assert uniform.mean() > 0.6
        source_label = corners[0][uniform]
        out_rows, out_columns = rows.ravel()[inside][uniform], columns.ravel()[inside][uniform]
        expected_label = permutation[source_label] if mirrored[k] else source_label
        numpy.testing.assert_array_equal(warped_labels[k][out_rows, out_columns], expected_label)
        colour_error = warped_images[k][out_rows, out_columns].astype(int) - CODE_COLOURS[source_label]
        assert numpy.abs(colour_error).max() <= 1


def test_augmentation_is_seeded():
    image, labels = coded_sample(32, 32, 11)
    images, label_maps = numpy.stack([image] * 4), numpy.stack([labels] * 4)
    augmentation = Augmentation()
    first = augmentation(images, label_maps, HELEN_CLASSES, numpy.random.default_rng(3))
    again = augmentation(images, label_maps, HELEN_CLASSES, 3)
    other = augmentation(images, label_maps, HELEN_CLASSES, 4)
    numpy.testing.assert_array_equal(first[0], again[0])
    numpy.testing.assert_array_equal(first[1], again[1])
    assert not numpy.array_equal(first[0], other[0])


def test_keypoints_move_with_their_pixels():
    size = 64
    points = numpy.array([[[20.0, 25.0], [44.0, 25.0], [32.0, 36.0], [24.0, 46.0], [40.0, 46.0]]])
    matrix = affine_matrix(numpy.deg2rad(20.0), 1.1, (3.0, -2.0), numpy.array([31.5, 31.5]), mirrored=True, width=size)
    moved = warp_keypoints(points, matrix[None])
    for number in range(5):
        image = numpy.zeros((1, size, size, 3), dtype=numpy.uint8)
        labels = numpy.zeros((1, size, size), dtype=numpy.uint8)
        column, row = points[0, number].astype(int)
        image[0, row - 1:row + 2, column - 1:column + 2] = 255
        warped, _ = warp(image, labels, matrix[None], LFW_CLASSES)
        weights = warped[0, ..., 0].astype(float)
        centre = (numpy.argwhere(weights > 0) * weights[weights > 0][:, None]).sum(0) / weights.sum()
        # The mirrored list is reordered: the point of ``number`` is now at its mirror position.
        new_position = moved[0, KEYPOINT_MIRROR_ORDER.index(number)]
        numpy.testing.assert_allclose(centre[::-1], new_position, atol=0.5)
    assert moved[0, 0, 0] < moved[0, 1, 0]  # still left eye first, on the image's left


def test_warp_checks_its_arguments():
    image, labels = coded_sample(8, 8, 3)
    with pytest.raises(ValueError, match=r"matrices must be \(1, 3, 3\)"):
        warp(image[None], labels[None], numpy.eye(3), LFW_CLASSES)
    with pytest.raises(ValueError, match=r"labels must be integer \(1, 8, 8\)"):
        warp(image[None], labels, numpy.eye(3)[None], LFW_CLASSES)


def test_a_preloaded_label_that_is_no_class_is_named():
    from minirnng.data.pipeline import PreloadedDataset

    labels = numpy.zeros((2, 4, 4), numpy.uint8)
    labels[1, 2, 3] = 5
    with pytest.raises(ValueError, match=r"the labels of 'b' hold class 5, but there are 3 classes \(background, "
                                         r"skin, hair\)"):
        PreloadedDataset(numpy.zeros((2, 4, 4, 3), numpy.uint8), labels, ("background", "skin", "hair"), ["a", "b"])


def test_warp_keeps_a_label_beyond_the_classes_whether_or_not_it_mirrors():
    image = numpy.zeros((1, 8, 8, 3), numpy.uint8)
    labels = numpy.full((1, 8, 8), 255, numpy.uint8)  # an ignore label
    labels[0, :, :4] = HELEN_CLASSES.index("left eye")
    mirror = numpy.diag([-1.0, 1.0, 1.0])
    mirror[0, 2] = 7
    _, kept = warp(image, labels, numpy.eye(3)[None], HELEN_CLASSES)
    numpy.testing.assert_array_equal(kept, labels)
    _, mirrored = warp(image, labels, mirror[None], HELEN_CLASSES)
    assert set(numpy.unique(mirrored[0, :, :4])) == {255}
    assert set(numpy.unique(mirrored[0, :, 4:])) == {HELEN_CLASSES.index("right eye")}


@pytest.mark.parametrize("label_dtype", [numpy.uint8, numpy.int64])
def test_whole_pixel_moves_copy_exactly_what_pillow_resamples(label_dtype, monkeypatch, rng):
    """The identity and the mirror skip Pillow (a copy or a flip): the same images and labels to the
    bit as its resampling gives, ``--augment mirror`` draws nothing else, and a label beyond 0..255
    is refused in the same words either way."""
    from minirnng.data import pipeline

    images = rng.integers(0, 256, (6, 12, 20, 3), dtype=numpy.uint8)
    labels = rng.integers(0, len(HELEN_CLASSES), (6, 12, 20)).astype(label_dtype)
    labels[0, 0, :3] = 255  # an ignore label
    matrices = Augmentation(max_rotation=0.0, scale_range=(1.0, 1.0), max_shift=0.0).sample(6, 12, 20, rng=3)
    assert all(pipeline.moves_whole_pixels(matrix, 20) for matrix in matrices)
    assert 0 < pipeline.is_mirroring(matrices).sum() < 6
    assert not pipeline.moves_whole_pixels(affine_matrix(0.01, 1.0, (0.0, 0.0), numpy.array([9.5, 5.5])), 20)
    copied = warp(images, labels, matrices, HELEN_CLASSES)
    wrong = labels.astype(numpy.int64)
    wrong[2, 3, 4] = 300
    with pytest.raises(ValueError, match=r"warp: labels range over 0 \.\. 300"):
        warp(images, wrong, matrices, HELEN_CLASSES)
    monkeypatch.setattr(pipeline, "moves_whole_pixels", lambda matrix, width: False)
    resampled = warp(images, labels, matrices, HELEN_CLASSES)
    for got, want in zip(copied, resampled):
        assert got.dtype == want.dtype
        numpy.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"warp: labels range over 0 \.\. 300"):
        warp(images, wrong, matrices, HELEN_CLASSES)


def test_the_catalog_is_part_of_the_data_package_and_load_split_takes_one_size():
    from minirnng import data
    from minirnng.data import catalog

    assert data.load_split is catalog.load_split and data.open_dataset is catalog.open_dataset
    with pytest.raises(TypeError, match=r"load_split: input_size must be one integer.*\(64, 32\)"):
        data.load_split("synthetic", "train", n_classes=3, input_size=(64, 32), size=2)
    assert data.load_split("synthetic", "train", n_classes=3, input_size=(32, 32), size=2).images.shape[1:3] == (32, 32)
