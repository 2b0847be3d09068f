"""Stage 2: crops and their inverse, key points, the component networks, the two-stage parser, checkpoints."""

import dataclasses
import json

import numpy
import pytest
from scipy import ndimage

from conftest import KINK_MARGIN, kink_margins
from minirnng.data.classes import HELEN_CLASSES
from minirnng.data.pipeline import PreloadedDataset, normalize, preload
from minirnng.data.synthetic import SyntheticFaces
from minirnng.gradcheck import check_model
from minirnng.models import RNNG, CheckpointError
from minirnng.models.crops import (CROPS, Box, CropGeometry, apply, component_frames, crop_bilinear, crop_nearest,
                                   helen_to_crop, invert, paste_nearest, resize_matrices)
from minirnng.models.keypoints import FaceShape, complete_keypoints, jitter_keypoints, keypoints_from_labels
from minirnng.models.stage2 import (COMPONENT_NETWORKS, MAIN_CLASSES, EyeBrowNet, MouthNet, NoseNet,
                                    TwoStageParser, load_stage2_model)

LEFT_EYE, RIGHT_EYE = HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")
LEFT_BROW, RIGHT_BROW = HELEN_CLASSES.index("left brow"), HELEN_CLASSES.index("right brow")


@pytest.fixture(scope="module")
def faces():
    """40 synthetic 128 x 128 faces: the generator, images uint8 (N, H, W, 3), labels, its key points."""
    generator = SyntheticFaces(40, size=128, n_classes=11, seed=3)
    images, labels = zip(*(generator[i] for i in range(len(generator))))
    keypoints = numpy.stack([generator.keypoints(i) for i in range(len(generator))])
    return generator, numpy.stack(images), numpy.stack(labels), keypoints


def similarity(angle, scale, shift, mirrored=False):
    """A crop-to-image map (1, 2, 3): rotate by ``angle``, shrink by ``scale`` (crop pixels per image
    pixel), mirror the crop's x axis if asked, then shift."""
    cos, sin = numpy.cos(angle) / scale, numpy.sin(angle) / scale
    linear = numpy.array([[cos, -sin], [sin, cos]])
    if mirrored:
        linear[:, 0] *= -1
    return numpy.concatenate([linear, numpy.array(shift, dtype=float)[:, None]], axis=1)[None]


# -- crop and paste ----------------------------------------------------------------------------------

def test_an_integer_crop_is_a_window_and_pasting_puts_it_back(rng):
    images = rng.standard_normal((1, 3, 40, 50))
    labels = rng.integers(0, 11, (1, 40, 50))
    matrix = similarity(0.0, 1.0, (7, 5))                # crop pixel (j, i) -> image (j + 7, i + 5)
    numpy.testing.assert_array_equal(crop_bilinear(images, matrix, (16, 24)), images[:, :, 5:21, 7:31])
    crop = crop_nearest(labels, matrix, (16, 24))
    numpy.testing.assert_array_equal(crop, labels[:, 5:21, 7:31])
    pasted, covered = paste_nearest(crop, matrix, (40, 50), fill=-1)
    expected = numpy.zeros((1, 40, 50), dtype=bool)
    expected[:, 5:21, 7:31] = True
    numpy.testing.assert_array_equal(covered, expected)
    numpy.testing.assert_array_equal(pasted[covered], labels[covered])
    assert (pasted[~covered] == -1).all()


@pytest.mark.parametrize("mirrored", [False, True])
def test_crop_then_paste_is_the_identity_on_the_crops_pixels(rng, mirrored):
    """A rotated (and mirrored) crop 2.4 times finer than the image, as stage 2 cuts them: every
    image pixel it covers comes back with its own label (the module docstring's argument)."""
    labels = rng.integers(0, 11, (1, 60, 60))
    matrix = similarity(0.5, 2.4, (30.3, 28.7), mirrored)
    crop = crop_nearest(labels, matrix, (64, 64))
    pasted, covered = paste_nearest(crop, matrix, (60, 60), fill=-1)
    assert covered.sum() > 0.8 * (64 / 2.4) ** 2         # the crop's area in image pixels, less the rim
    numpy.testing.assert_array_equal(pasted[covered], labels[covered])


def test_crop_then_paste_is_the_identity_for_every_stage2_crop(faces):
    _, _, labels, keypoints = faces
    matrices = CropGeometry().matrices(keypoints[:8])
    for crop, spec in CROPS.items():
        pasted, covered = paste_nearest(crop_nearest(labels[:8], matrices[crop], spec.size), matrices[crop], (128, 128))
        assert covered.sum(axis=(1, 2)).min() > 50, crop
        numpy.testing.assert_array_equal(pasted[covered], labels[:8][covered])


def test_bilinear_crops_match_scipy(rng):
    images = rng.standard_normal((2, 3, 20, 24))
    matrices = numpy.concatenate([similarity(0.3, 1.7, (-2.0, 4.0)), similarity(-1.0, 0.6, (10.5, 9.0), True)])
    crops = crop_bilinear(images, matrices, (16, 12), fill=0.3)
    row, column = numpy.mgrid[0:16, 0:12]
    for n in range(2):
        x = matrices[n, 0, 0] * column + matrices[n, 0, 1] * row + matrices[n, 0, 2]
        y = matrices[n, 1, 0] * column + matrices[n, 1, 1] * row + matrices[n, 1, 2]
        for channel in range(3):
            # scipy's "grid-constant": a point off the image interpolates with the fill value
            expected = ndimage.map_coordinates(images[n, channel], [y, x], order=1, mode="grid-constant", cval=0.3)
            numpy.testing.assert_allclose(crops[n, channel], expected, atol=1e-12)


def test_resize_matrices_resize_with_pixel_centres_aligned(rng):
    source = numpy.arange(64).reshape(1, 8, 8)
    doubled = crop_nearest(source, resize_matrices(1, (8, 8), (16, 16)), (16, 16))
    numpy.testing.assert_array_equal(doubled[0], numpy.repeat(numpy.repeat(source[0], 2, axis=0), 2, axis=1))
    flat = numpy.full((1, 3, 8, 8), 0.25)
    numpy.testing.assert_allclose(crop_bilinear(flat, resize_matrices(1, (8, 8), (12, 20)), (12, 20), fill=None), 0.25)


def test_bad_crop_arguments_are_clear_errors(rng):
    with pytest.raises(ValueError, match="matrices must be"):
        crop_bilinear(rng.standard_normal((2, 3, 8, 8)), numpy.zeros((1, 2, 3)), (4, 4))
    with pytest.raises(ValueError, match="float"):
        crop_bilinear(numpy.zeros((1, 3, 8, 8), dtype=numpy.uint8), numpy.zeros((1, 2, 3)), (4, 4))
    with pytest.raises(ValueError, match="key points must be"):
        component_frames(numpy.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="finite"):
        component_frames(numpy.full((1, 5, 2), numpy.nan))
    with pytest.raises(ValueError, match="unknown crop"):
        helen_to_crop("ear")


# -- where the crops go -------------------------------------------------------------------------------

def test_the_fitted_boxes_hold_the_parts_with_their_margin(faces):
    _, _, labels, keypoints = faces
    geometry = CropGeometry.fit(labels, keypoints)
    matrices = geometry.matrices(keypoints)
    for crop, spec in CROPS.items():
        owned = helen_to_crop(crop)[labels] > 0
        _, covered = paste_nearest(numpy.zeros((len(labels),) + spec.size), matrices[crop], (128, 128))
        whole = [(owned[n] & ~covered[n]).sum() == 0 for n in range(len(labels)) if owned[n].any()]
        assert numpy.mean(whole) >= 0.9, f"{crop}: part fully inside for {numpy.mean(whole):.0%} of faces"
        box = geometry.boxes[crop]
        assert box.hx / box.hy == pytest.approx(spec.size[1] / spec.size[0])  # aspect kept


def test_the_fitted_geometry_crops_a_mirrored_face_as_the_face_itself(faces):
    """One network parses both eyes, so both get one box, fitted to the needs of both sides; fitted
    on the mirror images of the faces, the eyes' box is the same and the nose's and mouth's are
    mirrored (their frames are not)."""
    from minirnng.data.classes import mirror_permutation

    _, _, labels, keypoints = faces
    geometry = CropGeometry.fit(labels, keypoints)
    assert geometry.boxes["left eye"] == geometry.boxes["right eye"]
    mirrored_labels = mirror_permutation(HELEN_CLASSES)[labels[:, :, ::-1]]
    mirrored_points = keypoints[:, [1, 0, 2, 4, 3]] * [-1, 1] + [labels.shape[2] - 1, 0]
    mirrored = CropGeometry.fit(mirrored_labels, mirrored_points)
    for crop, box in geometry.boxes.items():
        sign = 1 if CROPS[crop].network == "eyes" else -1
        other = mirrored.boxes[crop]
        numpy.testing.assert_allclose([sign * box.cx, box.cy, box.hx, box.hy], [other.cx, other.cy, other.hx, other.hy],
                                      atol=1e-12, err_msg=crop)


def test_the_geometry_round_trips_through_a_dict():
    geometry = CropGeometry({crop: Box(0.1 * k, -0.2, 0.5, 0.5) for k, crop in enumerate(CROPS)})
    assert CropGeometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry
    with pytest.raises(ValueError, match="no box for"):
        CropGeometry({"nose": Box(0, 0, 1, 1)})


def test_the_right_eye_crop_is_mirrored(faces):
    _, _, _, keypoints = faces
    matrices = CropGeometry().matrices(keypoints[:4])
    assert (numpy.linalg.det(matrices["left eye"][:, :, :2]) > 0).all()
    assert (numpy.linalg.det(matrices["right eye"][:, :, :2]) < 0).all()
    # A point beside each eye, away from the other eye (its outer corner), is on the crop's left
    # in both crops: the right crop shows the right eye as a left eye.
    left, right = keypoints[:4, 0], keypoints[:4, 1]
    for crop, outer in (("left eye", left + 0.3 * (left - right)), ("right eye", right + 0.3 * (right - left))):
        in_crop = apply(invert(matrices[crop]), outer[:, None, :])[:, 0]
        assert (in_crop[:, 0] < 32).all() and (in_crop[:, 0] >= 0).all(), (crop, in_crop)


# -- key points ----------------------------------------------------------------------------------------

def test_keypoints_from_labels_land_on_the_generators_own(faces):
    """Within 2 pixels, except where an occluder hides the part (the generator draws one over 35% of
    faces, and then the labels no longer show the part's true extent)."""
    _, _, labels, truth = faces
    points, found = keypoints_from_labels(labels)
    assert found.mean() > 0.95
    error = numpy.linalg.norm(points - truth, axis=2)[found]
    assert numpy.median(error) < 1.0
    assert numpy.mean(error <= 2.0) >= 0.9
    shaped, _ = keypoints_from_labels(labels, FaceShape.fit(truth, labels))
    close = numpy.linalg.norm(shaped - truth, axis=2)
    assert numpy.mean(close <= 2.0) >= 0.9


def test_missing_keypoints_are_filled_in_from_the_face_shape(faces):
    _, _, labels, truth = faces
    shape = FaceShape.fit(truth, labels)
    found = numpy.ones((len(truth), 5), dtype=bool)
    found[:, 2:] = False                                    # only the eyes are known
    filled = complete_keypoints(truth, found, shape, labels)
    numpy.testing.assert_array_equal(filled[:, :2], truth[:, :2])
    eye_distance = numpy.linalg.norm(truth[:, 1] - truth[:, 0], axis=1)
    assert numpy.median(numpy.linalg.norm(filled[:, 2:] - truth[:, 2:], axis=2).max(axis=1) / eye_distance) < 0.3
    nothing = numpy.zeros_like(found)
    guessed = complete_keypoints(truth, nothing, shape, labels)  # placed on the face region
    assert numpy.isfinite(guessed).all()
    assert numpy.median(numpy.linalg.norm(guessed[:, 0] - truth[:, 0], axis=1) / eye_distance) < 1.0
    blank = numpy.zeros((1, 32, 32), dtype=numpy.uint8)
    points, found_blank = keypoints_from_labels(blank, shape)
    assert not found_blank.any() and numpy.isfinite(points).all()


def test_two_eye_regions_in_an_implausible_pair_are_not_taken_for_the_eyes(faces):
    _, _, labels, truth = faces
    shape = FaceShape.fit(truth, labels)
    face = labels[0].copy()
    eyes = numpy.isin(face, [HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")])
    face[eyes] = HELEN_CLASSES.index("skin")
    left_eye = HELEN_CLASSES.index("left eye")
    x, y = numpy.round(truth[0, 0]).astype(int)
    face[y - 2:y + 3, x - 3:x + 4] = left_eye                      # the left eye, 35 pixels
    face[y + 30:y + 33, x - 2:x + 3] = left_eye                    # a blob straight below it, 15 pixels
    points, found = keypoints_from_labels(face[None], shape)
    assert found[0, 0] and not found[0, 1]                          # the larger region alone, not a pair
    assert numpy.linalg.norm(points[0, 0] - truth[0, 0]) < 1.5
    # the filled-in right eye lies across the face, not below the left one
    assert abs(points[0, 1, 1] - truth[0, 1, 1]) < 0.3 * numpy.linalg.norm(truth[0, 1] - truth[0, 0])


def test_with_one_eye_the_face_shape_still_guides_the_mouth_and_nose(faces):
    """A lip blob at eye height, larger than the mouth, is not taken for the mouth when the other eye is missing:
    the mean shape placed on the one eye, sized by the face region, predicts where the mouth is."""
    _, _, labels, truth = faces
    shape = FaceShape.fit(truth, labels)
    points_found, found = keypoints_from_labels(labels)
    unoccluded = [n for n in range(len(labels)) if found[n].all()
                  and numpy.linalg.norm(points_found[n] - truth[n], axis=1).max() < 2.0]
    lower_lip = HELEN_CLASSES.index("lower lip")
    checked = flips_checked = 0
    for n in unoccluded[:6]:
        face = labels[n].copy()
        face[face == RIGHT_EYE] = HELEN_CLASSES.index("skin")         # the right eye is missing
        x, y = numpy.round(truth[n, 1]).astype(int)                   # where it was: a blob of lip
        mouth_pixels = numpy.isin(face, [HELEN_CLASSES.index(name) for name in ("upper lip", "inner mouth",
                                                                                  "lower lip")]).sum()
        side = int(numpy.ceil(numpy.sqrt(mouth_pixels))) + 2
        face[max(y - side // 2, 0):y + side // 2 + 1, x:x + side] = lower_lip
        assert numpy.isin(face, [lower_lip]).sum() > 0
        unguided, _ = keypoints_from_labels(face)
        guided, guided_found = keypoints_from_labels(face[None], shape)
        eye_distance = numpy.linalg.norm(truth[n, 1] - truth[n, 0])
        assert guided_found[0, 0] and not guided_found[0, 1]
        # Without the shape the blob is the largest mouth region; with it, the real mouth is found.
        assert numpy.linalg.norm(unguided[3:] - truth[n, 3:], axis=1).max() > 0.5 * eye_distance
        # (found, or filled in from the eye and nose where the face region misjudges the face's size)
        assert numpy.linalg.norm(guided[0, 3:] - truth[n, 3:], axis=1).max() < 0.25 * eye_distance
        assert guided_found[0, 2]
        # and the missing eye, filled in from the points found, lands near the truth
        assert numpy.linalg.norm(guided[0, 1] - truth[n, 1]) < 0.25 * eye_distance
        checked += 1
        # An eye that stage 1 gives the wrong side: the mouth says which side it is on, where the face
        # region's size predicts the eye distance well enough to find the mouth within the gate.
        face_area = numpy.count_nonzero(~numpy.isin(face, [HELEN_CLASSES.index("background"),
                                                            HELEN_CLASSES.index("hair")]))
        if abs(numpy.sqrt(face_area) / shape.face_size / eye_distance - 1) < 0.2:
            face[face == LEFT_EYE] = RIGHT_EYE
            flipped, flipped_found = keypoints_from_labels(face[None], shape)
            numpy.testing.assert_array_equal(flipped_found, guided_found)
            numpy.testing.assert_allclose(flipped, guided)
            flips_checked += 1
    assert checked >= 4 and flips_checked >= 3


def test_an_eye_on_the_wrong_side_is_moved_even_when_the_face_region_misjudges_the_size(faces):
    """Face 0's region predicts an eye distance of about 12.5 pixels where it is 17: no mouth lies within the gate
    of either placement, and the one nearer by far (the real side's) still decides."""
    _, _, labels, truth = faces
    face = labels[0].copy()
    face[face == RIGHT_EYE] = HELEN_CLASSES.index("skin")
    face[face == LEFT_EYE] = RIGHT_EYE                                 # the left eye, labelled right
    points, found = keypoints_from_labels(face[None], FaceShape())
    assert found[0, 0] and not found[0, 1]
    eye_distance = numpy.linalg.norm(truth[0, 1] - truth[0, 0])
    assert numpy.linalg.norm(points[0, :2] - truth[0, :2], axis=1).max() < 0.25 * eye_distance


def test_key_point_functions_name_bad_input(faces):
    _, _, labels, truth = faces
    shape = FaceShape.fit(truth, labels)
    points, found = keypoints_from_labels(labels[0])                      # one face: (5, 2), (5,)
    with pytest.raises(ValueError, match=r"points must be \(N, 5, 2\) and found \(N, 5\), got \(5, 2\)"):
        complete_keypoints(points, found, shape, labels[:1])
    with pytest.raises(ValueError, match=r"labels must be integer \(N, H, W\) with N = 1, got float64"):
        complete_keypoints(points[None], found[None], shape, labels[:1].astype(float))
    with pytest.raises(ValueError, match=r"labels must be HELEN classes 0..10, got values from \d+ to 255"):
        keypoints_from_labels(numpy.where(labels[0] == 0, 255, labels[0]))


def test_jitter_scales_with_the_face(rng):
    points = numpy.array([[[10.0, 10], [30, 10], [20, 20], [14, 28], [26, 28]]])
    moved = jitter_keypoints(numpy.repeat(points, 2000, axis=0), 0.05, rng)
    assert numpy.std(moved - points) == pytest.approx(0.05 * 20, rel=0.05)


# -- the component networks ----------------------------------------------------------------------------

@pytest.mark.parametrize("network_class", [EyeBrowNet, NoseNet, MouthNet])
def test_component_networks_shapes_and_names(network_class, rng):
    network = network_class(rng=0)
    height, width = network.input_size
    logits = network.forward(rng.standard_normal((2, 3, height, width)).astype(numpy.float32))["logits"]
    assert logits.shape == (2, len(network.component_classes), height, width)
    names = set(network.params())
    assert {"conv1.weight", "conv3.weight", "conv5.weight", "conv6.weight", "conv8.weight",
            "deconv7.weight", "deconv9.bias"} <= names
    assert sum(name.startswith("conv") for name in names) == 10        # five convolutions, weight and bias
    assert sum(name.startswith("deconv") for name in names) == 4       # two transposed convolutions
    assert network.params()["deconv7.weight"].shape == (16, 8, 4, 4)   # PyTorch's (in, out, kh, kw)
    assert network.predict(rng.standard_normal((1, 3, 8, 8)).astype(numpy.float32)).shape == (1, 8, 8)


@pytest.mark.parametrize("network_class, seed", [(EyeBrowNet, 0), (NoseNet, 0), (MouthNet, 0)])
def test_component_networks_finite_differences(network_class, seed):
    rng = numpy.random.default_rng(seed)
    network = network_class(rng=1, dtype=numpy.float64)
    images = rng.standard_normal((2, 3, 8, 12))
    with kink_margins() as margins:
        network.forward(images)
    assert min(margins.values()) > KINK_MARGIN, margins  # no ReLU or pooling window near a kink
    report = check_model(network, images, rng=rng, max_entries=8)
    assert len(report.rows) == 1 + len(network.params())
    assert report.max_error < 1e-6, str(report)


def test_component_network_errors(rng):
    network = NoseNet(rng=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        network.forward(rng.standard_normal((1, 3, 10, 12)).astype(numpy.float32))
    network.forward(rng.standard_normal((1, 3, 8, 8)).astype(numpy.float32))
    with pytest.raises(ValueError, match="needs the gradient of 'logits'"):
        network.backward({})
    with pytest.raises(ValueError, match="width must be"):
        NoseNet(width=0)


# -- the two-stage parser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parser():
    return TwoStageParser(RNNG(n_classes=11, rng=0), rng=0)


def oracle_crops(labels, keypoints, geometry):
    """What perfect component networks would say: logits 10 for the crop's true class, 0 elsewhere."""
    matrices = geometry.matrices(keypoints)
    results = {}
    for crop, spec in CROPS.items():
        truth = helen_to_crop(crop)[crop_nearest(labels, matrices[crop], spec.size)]
        results[crop] = (matrices[crop], 10.0 * numpy.moveaxis(numpy.eye(len(spec.classes) + 1)[truth], -1, 1))
    return results


def test_perfect_component_networks_give_back_the_parts_left_and_right(parser, faces):
    """Mirror in, mirror out: the right eye's crop is parsed mirrored, yet its eye comes back where it
    was, labelled "right eye"; every part pixel the crops cover comes back with its own class."""
    _, _, labels, keypoints = faces
    labels, keypoints = labels[:8].astype(numpy.int64), keypoints[:8]
    main = labels.copy()                                 # stage 1 at its best: the parts are skin
    main[~numpy.isin(labels, MAIN_CLASSES)] = HELEN_CLASSES.index("skin")
    composed = parser.compose(main, oracle_crops(labels, keypoints, parser.geometry))
    for part in (LEFT_EYE, RIGHT_EYE, LEFT_BROW, RIGHT_BROW):
        truth = labels == part
        assert (composed[truth] == part).mean() > 0.97, HELEN_CLASSES[part]
        assert ((composed == part) & ~truth).sum() <= 0.03 * truth.sum(), HELEN_CLASSES[part]
    right_x = numpy.nonzero(composed[0] == RIGHT_EYE)[1].mean()
    left_x = numpy.nonzero(composed[0] == LEFT_EYE)[1].mean()
    assert left_x < right_x


def test_overlapping_claims_go_to_the_most_confident_crop(parser):
    """Two crops over the same pixels: the nose crop's confident claim beats the eye crop's weak one."""
    keypoints = numpy.array([[[50.0, 50.0], [78.0, 50.0], [64.0, 60.0], [54.0, 80.0], [74.0, 80.0]]])
    matrices = parser.geometry.matrices(keypoints)
    results = {}
    for crop, spec in CROPS.items():
        logits = numpy.zeros((1, len(spec.classes) + 1) + spec.size)
        logits[:, 0] = 1.0                                   # "other" everywhere ...
        results[crop] = (matrices[crop], logits)
    results["left eye"][1][:, 2] = 1.5                       # ... but the left eye crop says "eye", weakly
    results["nose"][1][:, 1] = 9.0                           # and the nose crop says "nose", strongly
    composed = parser.compose(numpy.ones((1, 128, 128), dtype=numpy.int64), results)
    _, in_nose = paste_nearest(numpy.zeros((1, 64, 64)), matrices["nose"], (128, 128))
    _, in_eye = paste_nearest(numpy.zeros((1, 64, 64)), matrices["left eye"], (128, 128))
    assert (composed[in_nose] == HELEN_CLASSES.index("nose")).all()
    assert (composed[in_eye & ~in_nose] == LEFT_EYE).all()
    assert (composed[~in_eye & ~in_nose] == 1).all()          # untouched: stage 1's main region


def test_two_stage_parser_end_to_end_shapes_and_classes(parser, faces):
    _, images, _, _ = faces
    inputs = normalize(images[:3])
    result = parser.explain(inputs)
    assert result["labels"].shape == (3, 128, 128) and result["labels"].dtype.kind == "i"
    assert result["labels"].min() >= 0 and result["labels"].max() < 11
    assert result["keypoints"].shape == (3, 5, 2) and numpy.isfinite(result["keypoints"]).all()
    assert set(result["crops"]) == set(CROPS)
    numpy.testing.assert_array_equal(parser.predict(inputs), result["labels"])
    # A bare image of another size: stage 1 sees it resized, the crops come from the image itself.
    big = numpy.repeat(numpy.repeat(images[0], 2, axis=0), 2, axis=1)
    labels = parser.parse(big)
    assert labels.shape == (256, 256) and labels.dtype == numpy.uint8 and labels.max() < 11
    with pytest.raises(ValueError, match="uint8"):
        parser.parse(big.astype(numpy.float32))
    with pytest.raises(ValueError, match="normalised"):
        parser.predict(images[:1])
    with pytest.raises(ValueError, match="11-class"):
        TwoStageParser(RNNG(n_classes=3, rng=0))


# -- checkpoints ---------------------------------------------------------------------------------------

def test_two_stage_checkpoint_round_trip(parser, faces, tmp_path):
    _, images, _, _ = faces
    path = parser.save(tmp_path / "two_stage.npz", note="test")
    loaded = load_stage2_model(path)
    assert isinstance(loaded, TwoStageParser)
    assert loaded.checkpoint_header["note"] == "test"
    assert set(loaded.params()) == set(parser.params())
    assert any(name.startswith("stage1.rnn.") for name in loaded.params())
    assert {"eyes.conv1.weight", "nose.conv1.weight", "mouth.deconv9.bias"} <= set(loaded.params())
    assert loaded.geometry == parser.geometry and loaded.shape == parser.shape
    inputs = normalize(images[:2])
    numpy.testing.assert_array_equal(loaded.predict(inputs), parser.predict(inputs))
    assert isinstance(TwoStageParser.load(path), TwoStageParser)


def test_a_batch_normalised_stage_one_parses_each_image_by_itself(faces):
    _, images, _, _ = faces
    stage1 = RNNG(n_classes=11, batch_norm=True, rng=0)
    for name, value in stage1.params().items():  # running statistics far from any batch's
        if name.endswith("running_mean"):
            value[...] = 0.3
    two_stage = TwoStageParser(stage1, rng=0)
    inputs = normalize(images[:3])
    before = {name: value.copy() for name, value in stage1.params().items()}
    together = two_stage.predict(inputs)
    one_by_one = numpy.concatenate([two_stage.predict(inputs[k:k + 1]) for k in range(3)])
    numpy.testing.assert_array_equal(together, one_by_one)
    assert all(numpy.array_equal(value, before[name]) for name, value in stage1.params().items())


def test_an_image_without_a_face_gets_no_invented_parts(parser, monkeypatch):
    def no_face(images):  # a stage 1 that sees background everywhere
        scores = numpy.zeros((len(images), len(HELEN_CLASSES)) + images.shape[2:], numpy.float32)
        scores[:, 0] = 5.0
        return scores, scores.argmax(axis=1)

    monkeypatch.setattr(parser, "stage_one", no_face)
    monkeypatch.setattr(parser, "compose", lambda main, crops: numpy.full_like(main, HELEN_CLASSES.index("nose")))
    labels = parser.predict(numpy.zeros((2, 3) + parser.stage1_size, numpy.float32))
    assert (labels == 0).all()  # the crops' claims (here: nose everywhere) are dropped


def test_the_two_stage_parser_parses_detected_faces_in_lfw_framing(parser, monkeypatch, rng):
    from minirnng import detect
    from minirnng.parser import parse_detected_faces

    image = rng.integers(0, 256, (120, 160, 3), dtype=numpy.uint8)
    monkeypatch.setattr(detect, "detector_available", lambda: True)
    monkeypatch.setattr(detect, "detect_faces", lambda picture: numpy.array([[60, 40, 20, 20]]))
    seen = []
    def parse(crop):
        seen.append(crop.shape)
        return numpy.full(crop.shape[:2], 4, numpy.uint8)

    monkeypatch.setattr(parser, "parse", parse)
    labels, boxes = parse_detected_faces(parser, image)
    assert boxes.tolist() == [[60, 40, 20, 20]] and seen == [(44, 44, 3)]  # the box widened 2.2 times
    x0, y0, side = detect.lfw_frame(boxes[0])
    assert (labels[y0:y0 + side, x0:x0 + side] == 4).all() and (labels == 4).sum() == side * side
    monkeypatch.setattr(detect, "detect_faces", lambda picture: numpy.zeros((0, 4), int))
    labels, boxes = parse_detected_faces(parser, image)  # no face found: the whole image, as one face
    assert len(boxes) == 0 and seen[-1] == (120, 160, 3) and (labels == 4).all()


def test_component_and_stage1_checkpoints_load_through_the_same_door(tmp_path):
    network = MouthNet(rng=3)
    network.save(tmp_path / "mouth.npz")
    loaded = MouthNet.load(tmp_path / "mouth.npz")
    for name, value in network.params().items():
        numpy.testing.assert_array_equal(loaded.params()[name], value)
    RNNG(n_classes=11, rng=0).save(tmp_path / "rnng.npz")
    assert isinstance(load_stage2_model(tmp_path / "rnng.npz"), RNNG)
    assert set(COMPONENT_NETWORKS) == {"eye-brow-net", "nose-net", "mouth-net"}


def test_checkpoint_errors(parser, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stage2_model(tmp_path / "missing.npz")
    path = parser.save(tmp_path / "two_stage.npz")
    with pytest.raises(CheckpointError, match="not 'nose-net'"):
        NoseNet.load(path)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_stage2_model(truncated)
    # A parameter missing, and a network the header does not know.
    arrays = dict(numpy.load(path))
    header = json.loads(arrays["__header__"].tobytes())
    del arrays["mouth.conv5.weight"]
    numpy.savez(tmp_path / "missing_parameter.npz", **arrays)
    with pytest.raises(CheckpointError, match="mouth.conv5.weight"):
        load_stage2_model(tmp_path / "missing_parameter.npz")
    header["config"]["networks"]["eyes"]["architecture"] = "ear-net"
    arrays = dict(numpy.load(path))
    arrays["__header__"] = numpy.frombuffer(json.dumps(header).encode(), dtype=numpy.uint8)
    numpy.savez(tmp_path / "unknown_network.npz", **arrays)
    with pytest.raises(CheckpointError, match="'ear-net'"):
        load_stage2_model(tmp_path / "unknown_network.npz")
    # arrays the four networks do not have, with or without a network's prefix
    for extra in ("mouth.extra", "stage1"):
        with pytest.raises(ValueError, match=rf"unexpected parameters \['{extra}'\]"):
            parser.load_params({**parser.params(), extra: numpy.zeros(1, numpy.float32)})
    # hand-edited descriptions of the networks: one line naming the file and the network
    for change, message in ((lambda networks: networks.update(eyes=["eye-brow-net"]),
                             r"network 'eyes' is described by a JSON list, not an object"),
                            (lambda networks: networks["nose"].update(config={"width": 8, "depth": 3}),
                             r"edited\.npz', network 'nose': unknown config key\(s\) \['depth'\] for a 'nose-net'")):
        arrays = dict(numpy.load(path))
        edited = json.loads(arrays["__header__"].tobytes())
        change(edited["config"]["networks"])
        arrays["__header__"] = numpy.frombuffer(json.dumps(edited).encode(), dtype=numpy.uint8)
        numpy.savez(tmp_path / "edited.npz", **arrays)
        with pytest.raises(CheckpointError, match=message):
            load_stage2_model(tmp_path / "edited.npz")
    # a hand-edited crop box or stage-1 size is refused when the file loads, not at the first
    # predict (a NaN centre cropped from wrapped indices in silence); the file is named once
    for key, value, message in (("geometry", {"nose": [float("nan"), 0, 0.5, 0.5]}, "'nose' box must have a finite"),
                                ("geometry", {"mouth": [0, 0, 0, 0]}, "positive half sizes"),
                                ("geometry", {"left eye": [0, 0, -0.4, 0.4]}, "positive half sizes"),
                                ("stage1_size", [130, 130], r"multiples of 4, got \[130, 130\]")):
        arrays = dict(numpy.load(path))
        edited = json.loads(arrays["__header__"].tobytes())
        if key == "geometry":
            edited["config"]["geometry"].update(value)
        else:
            edited["config"][key] = value
        arrays["__header__"] = numpy.frombuffer(json.dumps(edited).encode(), dtype=numpy.uint8)
        numpy.savez(tmp_path / "edited.npz", **arrays)
        with pytest.raises(CheckpointError, match=message) as refused:
            load_stage2_model(tmp_path / "edited.npz")
        assert str(refused.value).count("edited.npz") == 1, refused.value
    arrays = dict(numpy.load(path))
    arrays["eyes.conv1.weight"] = arrays["eyes.conv1.weight"][:1]
    numpy.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"conv1.weight has shape \(1, ") as refused:
        load_stage2_model(tmp_path / "edited.npz")
    assert str(refused.value).count("edited.npz") == 1, refused.value
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporary files behind


# -- training ------------------------------------------------------------------------------------------

def test_component_training_runs_and_lowers_the_loss(faces):
    from minirnng.train_stage2 import ComponentTrainConfig, evaluate_components, train_components

    generator, _, _, keypoints = faces
    dataset = preload(generator, size=(128, 128))
    geometry = CropGeometry.fit(dataset.labels, keypoints)
    config = ComponentTrainConfig(epochs=2, batch_size=8, lr=5e-3)
    networks, history = train_components(dataset, keypoints, geometry, config, progress=False, log=lambda *_: None)
    assert set(networks) == {"eyes", "nose", "mouth"} and len(history) == 2
    assert all(history[1][f"train_loss_{name}"] < history[0][f"train_loss_{name}"] for name in networks)
    scores = evaluate_components(networks, dataset, keypoints, geometry)
    assert set(scores) == {"eyes brow", "eyes eye", "nose nose", "mouth upper lip", "mouth inner mouth",
                           "mouth lower lip"}
    # worker threads that share each batch of crops: the same run up to the rounding of the gradient sums
    for workers in (1, 2):
        _, shared = train_components(dataset, keypoints, geometry, config, progress=False, log=lambda *_: None,
                                     workers=workers)
        for ours, theirs in zip(shared, history):
            for name in networks:
                assert ours[f"train_loss_{name}"] == pytest.approx(theirs[f"train_loss_{name}"], rel=1e-4)


def test_component_training_checks_its_key_points_first_and_stops_its_worker_threads(faces, tmp_path):
    import threading

    from minirnng.train_stage2 import ComponentTrainConfig, train_components, train_two_stage
    from minirnng.train import TrainConfig

    generator, _, _, keypoints = faces
    dataset = preload(generator, size=(128, 128))
    geometry = CropGeometry.fit(dataset.labels, keypoints)
    config = ComponentTrainConfig(epochs=1, batch_size=8)
    quiet = {"progress": False, "log": lambda *_: None}
    with pytest.raises(ValueError, match="a validation_set needs its validation_keypoints"):
        train_components(dataset, keypoints, geometry, config, validation_set=dataset, **quiet)
    with pytest.raises(ValueError, match=r"validation_keypoints must be \(%d, 5, 2\).* got \(3, 5, 2\)" % len(dataset)):
        train_components(dataset, keypoints, geometry, config, validation_set=dataset,
                         validation_keypoints=keypoints[:3], **quiet)
    with pytest.raises(ValueError, match=r"keypoints must be \(%d, 5, 2\)" % len(dataset)):
        train_components(dataset, keypoints[:, :4], geometry, config, **quiet)
    before = set(threading.enumerate())
    train_components(dataset, keypoints, geometry, config, workers=2, **quiet)
    assert not [thread for thread in set(threading.enumerate()) - before if thread.name.startswith("minirnng")]
    with pytest.raises(ValueError, match="stage1_config.n_classes must be 11"):
        train_two_stage(dataset, dataset, tmp_path / "run", stage1_config=TrainConfig(model="rnng"), **quiet)
    with pytest.raises(TypeError, match="the validation set must be preloaded"):
        train_two_stage(dataset, None, tmp_path / "run", **quiet)
    assert not (tmp_path / "run").exists()
    # a finished parser is reused only for the same key points: others give other crops
    tiny = {"stage1_config": TrainConfig(model="rnng", n_classes=11, epochs=1, batch_size=8), "component_config": config}
    train_two_stage(dataset, dataset, tmp_path / "done", **tiny, **quiet)
    with pytest.raises(ValueError, match=r"trained otherwise \(saved, now\): \{'landmarks': \(None, '[0-9a-f]{16}'\)"):
        train_two_stage(dataset, dataset, tmp_path / "done", landmarks=(keypoints, keypoints), **tiny, **quiet)
    with pytest.raises(ValueError, match=r"\{'components epochs': \(1, 2\)\}"):
        train_two_stage(dataset, dataset, tmp_path / "done", stage1_config=tiny["stage1_config"],
                        component_config=ComponentTrainConfig(epochs=2, batch_size=8), **quiet)


def test_table3_formatting_and_arguments():
    from minirnng.train_stage2 import PAPER_TABLE3, TABLE3_COLUMNS, format_table3, reproduce_table3

    assert TABLE3_COLUMNS == ("eyes", "brows", "nose", "in mouth", "U-lip", "L-lip", "mouth", "skin", "overall")
    text = format_table3({"1-stage": PAPER_TABLE3["1-stage"], "2-stage": PAPER_TABLE3["2-stage"]}, "title")
    assert "ours 2 - 1" in text and "88.6" in text
    with pytest.raises(ValueError, match="unknown budget"):
        reproduce_table3(budget="huge")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        reproduce_table3(data="/nonexistent/helen")


def test_reproduce_table3_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    from minirnng import train_stage2

    monkeypatch.setitem(train_stage2.BUDGETS, "tiny", {"synthetic": (16, 8, 8), "stage1_epochs": 1,
                                                       "component_epochs": 1})
    json_path = tmp_path / "table3.json"
    results = train_stage2.reproduce_table3("synthetic", "tiny", json_path=str(json_path), out_dir=str(tmp_path / "run"),
                                            progress=False, log=lambda *_: None)
    written = json.loads(json_path.read_text())
    for row in ("1-stage", "2-stage"):
        assert set(written[row]) == set(train_stage2.TABLE3_COLUMNS)
        assert all(value is None or 0 <= value <= 100 for value in written[row].values())
    assert written["_meta"]["budget"] == "tiny" and results["_meta"]["images"]["test"] == 8
    checkpoint = tmp_path / "run" / "table3-synthetic-tiny" / "two_stage.npz"
    assert written["_meta"]["checkpoint"] == str(checkpoint) and isinstance(TwoStageParser.load(checkpoint),
                                                                            TwoStageParser)
    # the same command again reuses the finished run: nothing retrained, the same training time
    lines = []
    again = train_stage2.reproduce_table3("synthetic", "tiny", out_dir=str(tmp_path / "run"), progress=False,
                                          log=lines.append)
    assert any(line.startswith("reusing the two-stage parser") for line in lines)
    assert again["_meta"]["training_minutes"] == results["_meta"]["training_minutes"]
    assert again["2-stage"] == results["2-stage"]
    # ... but never a run on other data: here another input size in the same folder
    with pytest.raises(ValueError, match=r"trained otherwise \(saved, now\): \{'input_size': \(\[128, 128\], "
                                         r"\[64, 64\]\)"):
        train_stage2.reproduce_table3("synthetic", "tiny", out_dir=str(tmp_path / "run"), progress=False,
                                      log=lambda *_: None, input_size=64)


# -- the inference-only fast paths give exactly the training paths' numbers ------------------------

@pytest.mark.parametrize("network_class", [EyeBrowNet, NoseNet, MouthNet])
def test_infer_equals_forward(network_class):
    rng = numpy.random.default_rng(5)
    network = network_class(rng=3)
    height, width = network.input_size
    crops = rng.standard_normal((5, 3, height, width)).astype(numpy.float32)
    numpy.testing.assert_array_equal(network.infer(crops), network.forward(crops)["logits"])


def test_pooled_equals_forward():
    from minirnng.layers import MaxPool2d

    rng = numpy.random.default_rng(6)
    x = numpy.round(rng.standard_normal((3, 4, 9, 10)) * 3).astype(numpy.float32)  # with ties
    for kernel, stride in [(2, 2), (3, 2), (2, 1)]:
        pool = MaxPool2d(kernel, stride)
        numpy.testing.assert_array_equal(pool.pooled(x), pool.forward(x))


def test_crops_from_framed_images_equal_crops_from_the_images():
    from minirnng.models.crops import frame_images

    rng = numpy.random.default_rng(7)
    images = rng.standard_normal((2, 3, 40, 30)).astype(numpy.float32)
    matrices = numpy.array([[[0.5, 0.1, 3.0], [-0.1, 0.6, 2.0]], [[0.7, 0.0, -4.0], [0.0, 0.7, 5.0]]])
    numpy.testing.assert_array_equal(crop_bilinear(frame_images(images), matrices, (16, 24)),
                                     crop_bilinear(images, matrices, (16, 24)))


def test_two_stage_parse_follows_the_single_face_parsers_rules_for_images(parser, rng):
    assert parser.parse(rng.integers(0, 256, (20, 12), dtype=numpy.uint8)).shape == (20, 12)  # grey
    with pytest.raises(ValueError, match=r"TwoStageParser.parse: image is empty, 0x5 pixels"):
        parser.parse(numpy.zeros((0, 5, 3), numpy.uint8))


def test_two_stage_load_params_checks_every_network_before_changing_any(parser):
    before = {name: value.copy() for name, value in parser.params().items()}
    arrays = {name: numpy.zeros_like(value) for name, value in before.items()}
    last = sorted(name for name in arrays if name.startswith("mouth."))[-1]
    arrays[last] = arrays[last].astype(numpy.complex64)
    with pytest.raises(TypeError, match=rf"\(mouth\): {last[len('mouth.'):]} has dtype complex64"):
        parser.load_params(arrays)
    for name, value in parser.params().items():
        numpy.testing.assert_array_equal(value, before[name], err_msg=name)


def test_key_point_tools_refuse_points_that_are_not_finite_and_shapes_that_are_wrong(faces):
    _, _, labels, keypoints = faces
    broken = keypoints.copy()
    broken[3, 2] = numpy.nan
    with pytest.raises(ValueError, match=r"FaceShape.fit: the key points of 1 face\(s\) are not finite \(first: face 3\)"):
        FaceShape.fit(broken)
    with pytest.raises(ValueError, match=r"FaceShape.fit: points must be \(N, 5, 2\)"):
        FaceShape.fit(keypoints[0])
    with pytest.raises(ValueError, match="FaceShape.fit: labels must be integer"):
        FaceShape.fit(keypoints, labels[:3])
    found = numpy.ones(keypoints.shape[:2], bool)
    with pytest.raises(ValueError, match="a key point marked found is not finite"):
        complete_keypoints(broken, found, FaceShape())
    with pytest.raises(ValueError, match=r"labels range over 0 \.\. 300"):
        complete_keypoints(keypoints, found, FaceShape(), numpy.where(labels == 10, 300, labels.astype(numpy.int64)))
    with pytest.raises(ValueError, match=r"jitter_keypoints: points must be \(N, 5, 2\)"):
        jitter_keypoints(keypoints[0], 0.1, numpy.random.default_rng(0))
    numpy.testing.assert_array_equal(jitter_keypoints(keypoints, 0.1, 7),
                                     jitter_keypoints(keypoints, 0.1, numpy.random.default_rng(7)))


@pytest.mark.parametrize("change, message", [({"face_offset": [0.0, 0.4, 1.0]}, "face_offset must be two finite numbers"),
                                             ({"face_size": 0}, "face_size must be a positive number"),
                                             ({"face_size": float("nan")}, "face_size must be a positive number"),
                                             ({"mean": [[float("nan"), 0.0]] * 5}, "mean must be finite")])
def test_a_face_shape_read_back_checks_every_field(change, message):
    values = {**FaceShape().to_dict(), **change}
    with pytest.raises(ValueError, match=f"FaceShape: unreadable .*{message}"):
        FaceShape.from_dict(values)
    assert FaceShape.from_dict(FaceShape().to_dict()) == FaceShape()


def test_stage2_training_refuses_labels_that_name_the_eyes_the_other_way_round(faces):
    from minirnng.train_stage2 import check_side_convention, training_keypoints

    generator, _, labels, keypoints = faces
    check_side_convention(labels)  # the synthetic faces follow minirnng's convention
    swap = numpy.arange(len(HELEN_CLASSES), dtype=numpy.uint8)
    swap[[2, 3, 4, 5]] = [3, 2, 5, 4]
    original = preload(generator, size=(128, 128))
    dataset = PreloadedDataset(original.images, swap[original.labels], original.classes, original.names)
    with pytest.raises(ValueError, match=r"the labels name the eyes the other way round: in (\d+) of \1 faces with both eyes"):
        training_keypoints(dataset)
    with pytest.raises(ValueError, match="the other way round"):
        training_keypoints(dataset, landmarks=keypoints)


def test_component_training_stopped_after_an_epoch_resumes_exactly(faces, tmp_path):
    import dataclasses

    from minirnng.train_stage2 import ComponentTrainConfig, train_components

    generator, _, _, keypoints = faces
    dataset = preload(generator, size=(128, 128))
    geometry = CropGeometry.fit(dataset.labels, keypoints)
    config = ComponentTrainConfig(epochs=2, batch_size=8, lr=5e-3)
    common = {"validation_set": dataset, "validation_keypoints": keypoints, "progress": False, "workers": 1}
    whole, whole_history = train_components(dataset, keypoints, geometry, config, log=lambda *_: None, **common)

    def stop_in_the_second_epoch(line):
        if line.startswith("components epoch 2/2"):  # logged before that epoch's state is written
            raise KeyboardInterrupt

    # a name without ".npz": numpy.savez given the name would have written to "<name>.npz" and left
    # an empty file here
    state = tmp_path / "components.state"
    with pytest.raises(KeyboardInterrupt):
        train_components(dataset, keypoints, geometry, config, log=stop_in_the_second_epoch, state_path=state,
                         **common)
    lines = []
    resumed, history = train_components(dataset, keypoints, geometry, config, log=lines.append, state_path=state,
                                        **common)
    assert any(line.endswith("after epoch 1") for line in lines), lines
    for name in whole:
        for key, value in whole[name].params().items():
            numpy.testing.assert_array_equal(resumed[name].params()[key], value)
    assert [row["train_loss_eyes"] for row in history] == [row["train_loss_eyes"] for row in whole_history]
    with pytest.raises(ValueError, match="holds component training of another config"):
        train_components(dataset, keypoints, geometry, dataclasses.replace(config, lr=1e-3), log=lambda *_: None,
                         state_path=state, **common)


@pytest.mark.parametrize("settings, error, message", [
    (dict(batch_size=2.5), TypeError, "batch_size must be an integer, got 2.5"),
    (dict(warmup=5.0), ValueError, "warmup at least 0 and below 1"),
    (dict(seed=-1), ValueError, "seed at least 0"),
    (dict(lr="1e-3"), TypeError, "lr must be a finite number, got '1e-3'"),
])
def test_component_settings_are_checked_with_their_names(settings, error, message):
    from minirnng.train_stage2 import ComponentTrainConfig

    with pytest.raises(error, match=message):
        ComponentTrainConfig(**settings).check()


def test_key_points_of_no_maps_are_none_and_a_map_of_no_pixels_is_named():
    from minirnng.models.keypoints import keypoints_from_labels

    for shape in ((0, 16, 16), (0, 0, 0)):
        points, found = keypoints_from_labels(numpy.zeros(shape, dtype=numpy.int64))
        assert points.shape == (0, 5, 2) and found.shape == (0, 5)
    with pytest.raises(ValueError, match="keypoints_from_labels: a label map of 0x0 pixels holds no face"):
        keypoints_from_labels(numpy.zeros((2, 0, 0), dtype=numpy.int64))


def test_component_settings_given_as_numpy_numbers_are_stored_as_python_ones():
    from minirnng.train_stage2 import ComponentTrainConfig

    config = ComponentTrainConfig(epochs=numpy.int64(2), lr=numpy.float32(0.5), seed=numpy.int64(3)).check()
    assert json.loads(json.dumps(dataclasses.asdict(config)))["epochs"] == 2
    assert type(config.epochs) is int and type(config.lr) is float
