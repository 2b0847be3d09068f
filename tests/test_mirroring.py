"""Test-time mirroring: equivariance, the class permutation, and its use by eval and parse."""

import json
import re

import numpy
import pytest
from PIL import Image

from minirnng import cli
from minirnng.data.classes import HELEN_CLASSES, LFW_CLASSES, mirror_permutation
from minirnng.mirroring import mirrored_logits, mirrored_predict
from minirnng.models import RNNG
from minirnng.parser import FaceParser


@pytest.mark.parametrize("classes", [LFW_CLASSES, HELEN_CLASSES], ids=["lfw", "helen"])
def test_mirrored_logits_are_mirror_equivariant(classes, rng):
    # z(flip(x)) = P flip(z(x)): mirroring the input mirrors the scores and swaps left and right
    model = RNNG(n_classes=len(classes), rng=1, dtype=numpy.float64)
    model.randomize_recurrence(2)  # the four directions differ, so the model itself is not symmetric
    model.classes = list(classes)
    images = rng.standard_normal((2, 3, 16, 12))
    scores = mirrored_logits(model, images)
    flipped = mirrored_logits(model, images[..., ::-1].copy())
    permutation = mirror_permutation(classes)
    numpy.testing.assert_allclose(flipped, scores[:, permutation, :, ::-1], rtol=1e-12, atol=1e-12)
    # ...which the model alone is not
    plain = model.infer(images)
    assert numpy.abs(model.infer(images[..., ::-1].copy()) - plain[:, permutation, :, ::-1]).max() > 1e-3


def test_mirrored_logits_are_the_mean_of_the_two_passes(rng):
    model = RNNG(n_classes=len(HELEN_CLASSES), rng=3)
    model.classes = list(HELEN_CLASSES)
    images = rng.standard_normal((1, 3, 8, 8)).astype(numpy.float32)
    direct = model.infer(images)
    mirrored = model.infer(images[..., ::-1].copy())[..., ::-1]
    left, right = HELEN_CLASSES.index("left eye"), HELEN_CLASSES.index("right eye")
    scores = mirrored_logits(model, images)
    assert scores.dtype == numpy.float32
    numpy.testing.assert_allclose(scores[:, left], (direct[:, left] + mirrored[:, right]) / 2, rtol=1e-6)
    numpy.testing.assert_allclose(scores[:, 0], (direct[:, 0] + mirrored[:, 0]) / 2, rtol=1e-6)
    labels = mirrored_predict(model)(images)
    numpy.testing.assert_array_equal(labels, scores.argmax(axis=1))


def test_class_names_that_do_not_fit_the_model_are_refused(rng):
    model = RNNG(n_classes=3, rng=0)
    with pytest.raises(ValueError, match="11 class names for a model with 3 classes"):
        mirrored_logits(model, rng.standard_normal((1, 3, 8, 8)).astype(numpy.float32), HELEN_CLASSES)


def test_eval_and_parse_take_mirror(tmp_path, capsys, rng):
    model = RNNG(n_classes=3, rng=0)
    model.classes = list(LFW_CLASSES)
    model.save(tmp_path / "model.npz")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "4",
                     "--mirror", "--json", str(tmp_path / "scores.json")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["mirror"] is True
    assert "with test-time mirroring" in capsys.readouterr().out

    image = rng.integers(0, 256, (60, 80, 3), dtype=numpy.uint8)
    Image.fromarray(image).save(tmp_path / "face.png")
    assert cli.main(["parse", str(tmp_path / "face.png"), "--mirror", "--no-detect", "--out", str(tmp_path)]) == 0
    written = numpy.asarray(Image.open(tmp_path / "face_labels.png"))
    numpy.testing.assert_array_equal(written, FaceParser.pretrained(mirror=True).parse(image))
    assert cli.main(["parse", str(tmp_path / "face.png"), "--mirror", "--classes", "11", "--checkpoint",
                     str(tmp_path / "model.npz"), "--out", str(tmp_path)]) == 2
    assert "parses 3 classes (background, skin, hair), not the 11" in capsys.readouterr().err


def test_the_mirroring_parser_agrees_mostly_with_the_plain_one():
    from minirnng.data.synthetic import SyntheticFaces

    image, _ = SyntheticFaces(1, size=128, seed=4)[0]
    plain, mirroring = FaceParser.pretrained(), FaceParser.pretrained(mirror=True)
    assert "mirror=True" in repr(mirroring) and "mirror" not in repr(plain)
    assert 0 < (plain.parse(image) != mirroring.parse(image)).mean() < 0.1


def test_a_model_without_class_names_is_mirrored_with_the_class_list_of_its_outputs(rng):
    # an unnamed 11-class model is HELEN's: its left and right eyes and brows swap, not average together
    model = RNNG(n_classes=len(HELEN_CLASSES), rng=5, dtype=numpy.float64)
    model.randomize_recurrence(2)
    assert model.classes is None
    images = rng.standard_normal((1, 3, 12, 12))
    numpy.testing.assert_array_equal(mirrored_logits(model, images), mirrored_logits(model, images, HELEN_CLASSES))
    numpy.testing.assert_array_equal(mirrored_predict(model)(images),
                                     mirrored_logits(model, images, HELEN_CLASSES).argmax(axis=1))
    # for any other number of outputs, which ones are left and right would be a guess
    with pytest.raises(ValueError, match="no class names and 5 outputs"):
        mirrored_logits(RNNG(n_classes=5, rng=0), images.astype(numpy.float32))
    five = RNNG(n_classes=5, rng=0)
    five.classes = ["background", "a", "b", "c", "d"]
    assert mirrored_logits(five, images.astype(numpy.float32)).shape == (1, 5, 12, 12)


def test_mirrored_predict_keeps_a_cnn_crfs_own_crf(rng):
    from minirnng.models import CNNCRF, DenseCRF

    model = CNNCRF(rng=0, crf=DenseCRF(iterations=1, bilateral_weight=20.0))
    images = rng.uniform(-0.5, 0.5, (2, 3, 32, 32)).astype(numpy.float32)
    logits = mirrored_logits(model, images)
    refined = model.crf.refine(logits, images).argmax(axis=1)
    assert (refined != logits.argmax(axis=1)).any()  # the CRF changes something, so the check can fail
    numpy.testing.assert_array_equal(mirrored_predict(model)(images), refined)
    # ...as eval --mirror does, which uses it
    numpy.testing.assert_array_equal(cli.predict_with_options(model, LFW_CLASSES, mirror=True)(images), refined)
    # another refinement in its place
    numpy.testing.assert_array_equal(mirrored_predict(model, refine=lambda scores, _: -scores)(images),
                                     (-logits).argmax(axis=1))


def test_a_mirroring_parser_refuses_a_model_without_class_names_at_once():
    # not at its first image, after the output folder was made
    with pytest.raises(ValueError, match="mirror=True needs the model's class names.*5 outputs"):
        FaceParser(RNNG(n_classes=5, rng=0), mirror=True)
    assert FaceParser(RNNG(n_classes=5, rng=0)).mirror is False
    named = RNNG(n_classes=3, rng=0)
    named.classes = ["background", "skin"]  # one name short
    with pytest.raises(ValueError, match="FaceParser: the model has 3 outputs and 2 class names"):
        FaceParser(named)


def test_class_names_pair_left_and_right_whatever_their_spelling():
    names = ["background", "Left Eye", "right_eye", "left-brow", "Right Brow", "left ear", "right ear"]
    numpy.testing.assert_array_equal(mirror_permutation(names), [0, 2, 1, 4, 3, 6, 5])
    numpy.testing.assert_array_equal(mirror_permutation(HELEN_CLASSES), [0, 1, 3, 2, 5, 4, 6, 7, 8, 9, 10])
    with pytest.raises(ValueError, match="class 'Left Eye' has no right partner"):
        mirror_permutation(["background", "Left Eye", "skin"])
    # a side run into the word would be read as no side, and a left eye averaged with a right one
    for name in ("leftEye", "eye(right)"):
        with pytest.raises(ValueError, match=f"cannot tell the side of class '{re.escape(name)}'"):
            mirror_permutation(["background", name, "skin"])


def test_a_model_with_an_empty_list_of_class_names_is_mirrored_as_an_unnamed_one(rng):
    model = RNNG(n_classes=len(HELEN_CLASSES), rng=5, dtype=numpy.float64)
    model.randomize_recurrence(2)
    images = rng.standard_normal((1, 3, 12, 12))
    model.classes = []
    numpy.testing.assert_array_equal(mirrored_logits(model, images), mirrored_logits(model, images, HELEN_CLASSES))
    with pytest.raises(ValueError, match="0 class names for a model with 11 classes"):
        mirrored_logits(model, images, classes=[])
