"""Test-time mirroring: equivariance, the class permutation, and its use by eval and parse."""

import json

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
