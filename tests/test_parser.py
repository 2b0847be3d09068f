"""The parser behind `minirnng parse` and `minirnng demo`: any image size, errors, files written."""

import os

import numpy
import pytest
from PIL import Image
from matplotlib import cbook

from minirnng import backend, cli
from minirnng.detect import crop_square, detector_available, lfw_frame
from minirnng.parser import FaceParser, read_image


@pytest.fixture(scope="module")
def parser():
    return FaceParser.pretrained()


def test_pretrained_parser_parses_any_size(parser, rng):
    assert parser.classes == ("background", "skin", "hair")
    for shape in [(37, 53, 3), (128, 128, 3), (300, 200, 3)]:
        labels = parser.parse(rng.integers(0, 256, shape, dtype=numpy.uint8))
        assert labels.shape == shape[:2] and labels.dtype == numpy.uint8 and labels.max() < 3
    scores = parser.scores(rng.integers(0, 256, (40, 60, 3), dtype=numpy.uint8))
    numpy.testing.assert_allclose(scores.sum(axis=0), 1, rtol=1e-5)
    grey = parser.parse(rng.integers(0, 256, (50, 50), dtype=numpy.uint8))  # greyscale is accepted
    assert grey.shape == (50, 50)


def test_the_crf_option_refines_the_scores_on_the_input_grid(parser, rng):
    from minirnng.models import CNNCRF, DenseCRF

    image = rng.integers(0, 256, (90, 70, 3), dtype=numpy.uint8)
    refined = FaceParser(parser.model, crf=True)
    assert isinstance(refined.crf, DenseCRF) and "crf=DenseCRF(" in repr(refined)
    scores = refined.scores(image)
    numpy.testing.assert_allclose(scores.sum(axis=0), 1, rtol=1e-5)
    # what the option means: the CRF's marginals at 128 x 128, then resized to the image
    batch = refined.model_input([image])
    from minirnng.parser import resize_scores
    expected = resize_scores(DenseCRF().refine(parser.model.infer(batch), batch)[0], 90, 70)
    numpy.testing.assert_allclose(scores, expected / expected.sum(axis=0), rtol=1e-5, atol=1e-6)
    assert not numpy.allclose(scores, parser.scores(image), atol=1e-3)
    with pytest.raises(TypeError, match="crf must be True, False or a DenseCRF"):
        FaceParser(parser.model, crf="yes")
    # a CNN-CRF's parser runs its own CRF, as its predict does
    cnn_crf = CNNCRF(rng=0, crf=DenseCRF(iterations=2))
    assert FaceParser(cnn_crf).crf is cnn_crf.crf


def test_bad_images_are_clear_errors(parser, tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) RGB, got float64"):
        parser.parse(numpy.zeros((8, 8, 3)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="not an image Pillow can identify"):
        read_image(broken)


def test_the_input_size_is_checked_when_the_parser_is_built(parser):
    assert FaceParser(parser.model, input_size=64).input_size == (64, 64)
    for size in ((30, 30), (128,), "128", 0, (128.0, 128)):
        with pytest.raises(ValueError, match="input_size must be \\(height, width\\), positive multiples of 4"):
            FaceParser(parser.model, input_size=size)


def test_a_batch_normalised_model_is_parsed_with_its_running_statistics(rng, tmp_path):
    from minirnng.models import RNNG, CheckpointError

    model = RNNG(batch_norm=True, rng=0)
    model.classes = ["background", "skin", "hair"]
    for name, value in model.params().items():  # statistics far from any one image's
        if name.endswith("running_var"):
            value[...] = 4.0
    parser = FaceParser(model, input_size=32)
    assert not parser.model.batch_norm
    faces = [rng.integers(0, 256, (40, 30, 3), dtype=numpy.uint8) for _ in range(2)]
    batch = parser.model_input(faces)
    numpy.testing.assert_allclose(parser.run(faces)["logits"], backend.to_numpy(model.infer(batch)), atol=1e-4)
    numpy.testing.assert_array_equal(parser.parse(faces[0]), FaceParser(model, input_size=32).parse(faces[0]))
    model.save(tmp_path / "odd.npz", input_size=(30, 32))
    with pytest.raises(CheckpointError, match=r"odd.npz.*input_size must be"):
        FaceParser.load(tmp_path / "odd.npz")


def test_bad_arrays_are_named_before_any_conversion(parser):
    with pytest.raises(ValueError, match=r"got float64 \(6, 5\)"):  # the shape given, not an RGB copy
        parser.parse(numpy.zeros((6, 5)))
    with pytest.raises(ValueError, match=r"image is empty, 0x7 pixels"):
        parser.parse(numpy.zeros((0, 7, 3), numpy.uint8))


def test_read_image_scales_16_bit_grey_and_refuses_float_pixels(tmp_path, rng):
    grey = rng.integers(0, 65536, (6, 5)).astype(numpy.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    image = read_image(tmp_path / "grey16.png")
    assert image.dtype == numpy.uint8 and image.shape == (6, 5, 3)
    numpy.testing.assert_array_equal(image[:, :, 0], numpy.rint(grey / 257).astype(numpy.uint8))
    numpy.testing.assert_array_equal(image[:, :, 0], image[:, :, 2])
    Image.fromarray(rng.random((4, 4)).astype(numpy.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="32-bit floating-point pixels"):
        read_image(tmp_path / "float.tiff")
    Image.fromarray(numpy.array([[0, 89000]], dtype=numpy.int32)).save(tmp_path / "int32.tiff")
    with pytest.raises(ValueError, match="int32.tiff holds 32-bit integer pixels from 0 to 89000, beyond 16 bits"):
        read_image(tmp_path / "int32.tiff")
    # a 32-bit TIFF of 8-bit values is as undefined: read as 16 bits it was parsed as a black picture
    Image.fromarray(numpy.array([[0, 255]], dtype=numpy.int32)).save(tmp_path / "int32-small.tiff")
    with pytest.raises(ValueError, match=r"int32-small.tiff holds 32-bit integer pixels from 0 to 255, whose white"):
        read_image(tmp_path / "int32-small.tiff")
    Image.fromarray(numpy.array([[0, 60000]], dtype=numpy.uint16)).save(tmp_path / "grey16.tiff")
    assert read_image(tmp_path / "grey16.tiff")[0, 1, 0] == 233  # a 16-bit TIFF is still read


def test_read_image_turns_a_photograph_upright_by_its_exif_orientation(tmp_path, rng):
    upright = rng.integers(0, 256, (6, 4, 3), dtype=numpy.uint8)  # 6 high, 4 wide, as a viewer shows it
    # stored as a phone stores it: the sensor's pixels, rotated, with tag 6 ("rotate 90 clockwise to view")
    stored = Image.fromarray(numpy.rot90(upright, k=1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    numpy.testing.assert_array_equal(read_image(tmp_path / "phone.png"), upright)


def test_read_image_names_folders_and_pictures_too_large_to_decode(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        read_image(tmp_path)
    Image.new("RGB", (40, 30)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,200 pixels: more than twice the limit
    with pytest.raises(ValueError, match="large.png is too large to decode"):
        read_image(tmp_path / "large.png")


def test_lfw_frame_and_crop():
    x0, y0, side = lfw_frame((100, 50, 40, 40))
    assert side == 88 and (x0 + side / 2, y0 + side / 2) == (120, 70)
    image = numpy.arange(5 * 5 * 3, dtype=numpy.uint8).reshape(5, 5, 3)
    crop = crop_square(image, -1, -1, 3)
    assert crop.shape == (3, 3, 3) and not crop[0].any() and (crop[1, 1] == image[0, 0]).all()


def test_a_large_image_is_searched_for_faces_at_a_reduced_size():
    pytest.importorskip("cv2")
    from minirnng.detect import detect_faces

    portrait = numpy.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")))
    (box,) = detect_faces(portrait)
    large = numpy.asarray(Image.fromarray(portrait).resize((portrait.shape[1] * 4, portrait.shape[0] * 4)))
    # searched at 600 pixels: the same face, in the large image's pixels
    (found,) = detect_faces(large, max_side=600)
    assert numpy.abs(found - 4 * box).max() <= 4 * 0.1 * box[2]


def test_parse_faces_falls_back_to_the_whole_image(parser, rng, monkeypatch):
    from minirnng import detect

    image = rng.integers(0, 256, (64, 48, 3), dtype=numpy.uint8)
    # without OpenCV (made so here, as a [dev] install has it), and with OpenCV finding no face
    for name, stub in (("detector_available", lambda: False), ("detect_faces", lambda image: numpy.zeros((0, 4), int))):
        with monkeypatch.context() as patch:
            patch.setattr(detect, "detector_available", lambda: True)
            patch.setattr(detect, name, stub)
            labels, boxes = parser.parse_faces(image)
            assert boxes.shape == (0, 4) and labels.dtype == numpy.uint8
            numpy.testing.assert_array_equal(labels, parser.parse(image))
            background, _ = parser.parse_faces(image, undetected="background")
            assert background.shape == (64, 48) and not background.any()


class StubParser:
    """Sure of "skin" (class 1) with certainty 0.6 in a crop of 88 pixels, of "hair" (class 2)
    with 0.8 in any other: which face a pixel's labels came from shows in the labels."""
    classes = ("background", "skin", "hair")

    def scores(self, crop):
        side = crop.shape[0]
        certain, label = (0.6, 1) if side == 88 else (0.8, 2)
        probabilities = numpy.zeros((3, side, side), numpy.float32)
        probabilities[0], probabilities[label] = 1 - certain, certain
        return probabilities

    def parse(self, image):
        return self.scores(image).argmax(axis=0).astype(numpy.uint8)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_overlapping_faces_take_the_labels_of_the_most_certain_face(order, monkeypatch):
    from minirnng import detect
    from minirnng.parser import parse_detected_faces

    # two faces of 40 and 30 pixels: LFW crops of 88 pixels at (60, 20) and 66 at (87, 48)
    boxes = numpy.array([[84, 44, 40, 40], [105, 66, 30, 30]])[list(order)]
    monkeypatch.setattr(detect, "detector_available", lambda: True)
    monkeypatch.setattr(detect, "detect_faces", lambda image: boxes)
    labels, found = parse_detected_faces(StubParser(), numpy.zeros((120, 160, 3), numpy.uint8))
    numpy.testing.assert_array_equal(found, boxes)
    expected = numpy.zeros((120, 160), numpy.uint8)
    expected[20:108, 60:148] = 1
    expected[48:114, 87:153] = 2  # the more certain face wins the overlap, whichever came first
    numpy.testing.assert_array_equal(labels, expected)


def test_face_parser_pastes_overlapping_faces_by_its_own_probabilities(parser, monkeypatch):
    from minirnng import detect

    # Grace Hopper at a quarter of her size (her face is found at (39, 26, 55, 55)) and a second,
    # smaller face box overlapping the first
    image = numpy.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).resize((128, 150)))
    boxes = numpy.array([[39, 26, 55, 55], [55, 40, 40, 40]])
    monkeypatch.setattr(detect, "detector_available", lambda: True)
    monkeypatch.setattr(detect, "detect_faces", lambda image: boxes)
    labels, found = parser.parse_faces(image)
    # written out: each face's labels and certainty (1 - P(background)) on the whole image, zero
    # certainty outside its crop; a pixel takes the labels of the face most certain of it (the
    # first on a tie), and stays background where no face is at all certain
    face_labels, certainty = [], []
    for box in boxes:
        x0, y0, side = lfw_frame(box)
        probabilities = parser.scores(crop_square(image, x0, y0, side))
        whole = numpy.zeros((2, 150 + 2 * side, 128 + 2 * side), numpy.float32)
        whole[0, side + y0:2 * side + y0, side + x0:2 * side + x0] = probabilities.argmax(axis=0)
        whole[1, side + y0:2 * side + y0, side + x0:2 * side + x0] = 1 - probabilities[0]
        face_labels.append(whole[0, side:side + 150, side:side + 128])
        certainty.append(whole[1, side:side + 150, side:side + 128])
    owner = numpy.argmax(certainty, axis=0)
    expected = numpy.where(numpy.max(certainty, axis=0) > 0,
                           numpy.take_along_axis(numpy.array(face_labels), owner[None], axis=0)[0], 0)
    numpy.testing.assert_array_equal(found, boxes)
    numpy.testing.assert_array_equal(labels, expected)
    assert {0, 1} <= set(numpy.unique(owner[labels > 0]))  # both faces own labelled pixels


def test_detect_faces_names_a_bad_image_before_opencv_sees_it():
    from minirnng.detect import detect_faces

    with pytest.raises(ValueError, match=r"^detect_faces: image must be uint8 \(H, W, 3\) RGB, got float64 "
                       r"\(40, 40, 3\)$"):
        detect_faces(numpy.zeros((40, 40, 3)))
    with pytest.raises(ValueError, match=r"^detect_faces: image is empty, 0x40 pixels"):
        detect_faces(numpy.zeros((0, 40, 3), numpy.uint8))
    if detector_available():  # greyscale and RGBA are taken, as the parsers take them
        grey = numpy.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("L"))
        assert detect_faces(grey).shape == (1, 4)
        assert detect_faces(numpy.zeros((40, 40, 4), numpy.uint8)).shape == (0, 4)


def test_face_parser_load_names_a_two_stage_checkpoint(tmp_path):
    from minirnng.models import RNNG, CheckpointError
    from minirnng.models.stage2 import TwoStageParser

    path = TwoStageParser(RNNG(n_classes=11, rng=0), rng=0).save(tmp_path / "two_stage.npz")
    with pytest.raises(CheckpointError, match=r"holds a 'two-stage' model of stage 2, which load_model does not "
                       r"build: load it with TwoStageParser.load"):
        FaceParser.load(path)


def test_parse_draws_a_checkpoint_without_class_names(tmp_path, capsys, rng):
    from minirnng.models import RNNG

    RNNG(rng=0).save(tmp_path / "unnamed.npz", input_size=(32, 32))  # classes None: "class 0", ...
    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=numpy.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    assert cli.main(["parse", *paths, "--checkpoint", str(tmp_path / "unnamed.npz"), "--out", str(tmp_path / "out"),
                     "--no-detect"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"a_overlay.png", "b_overlay.png"}


def test_parse_command_writes_labels_and_overlay(tmp_path, capsys, rng):
    path = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=numpy.uint8)).save(path)
    assert cli.main(["parse", str(path), "--out", str(tmp_path / "out"), "--no-detect"]) == 0
    labels = numpy.asarray(Image.open(tmp_path / "out" / "face_labels.png"))
    assert labels.shape == (60, 80) and labels.max() < 3
    assert numpy.asarray(Image.open(tmp_path / "out" / "face_overlay.png")).shape == (60, 80, 3)
    assert "face_overlay.png" in capsys.readouterr().out
    assert cli.main(["parse", str(path), "--out", str(tmp_path / "refined"), "--no-detect", "--crf", "--mirror"]) == 0
    assert numpy.asarray(Image.open(tmp_path / "refined" / "face_labels.png")).shape == (60, 80)


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--train-size", "16", "--test-size", "8", "--epochs", "1",
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("grace_hopper_parsed.png", "synthetic_pipeline.png", "rnng_synthetic.npz"):
        assert os.path.exists(out / name) and str(out / name) in printed
    assert "pixel accuracy" in printed and "F-hair" in printed and "replacing" not in printed
    # again into the same folder: the files are replaced, and the list says so
    assert cli.main(["demo", "--out", str(out), "--train-size", "16", "--test-size", "8", "--epochs", "1",
                     "--quiet"]) == 0
    assert f"{out / 'rnng_synthetic.npz'}   (replacing an earlier run's)" in capsys.readouterr().out


def test_the_demo_checks_its_settings_first_and_names_no_vanished_folder(tmp_path, capsys, monkeypatch):
    from minirnng import train

    assert cli.main(["demo", "--out", str(tmp_path / "nan"), "--lr", "nan", "--quiet"]) == 1
    assert "--lr must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists()  # refused before step 1 made the folder and wrote a figure

    def diverge(self, resume=False):
        raise FloatingPointError(f"training diverged in epoch 1: ...; try a smaller learning rate (the finished "
                                 f"epochs are in {self.out_dir})")

    monkeypatch.setattr(train.Trainer, "run", diverge)
    assert cli.main(["demo", "--out", str(tmp_path / "big"), "--lr", "1e30", "--train-size", "16",
                     "--test-size", "8", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "diverged at --lr 1e+30; try a smaller --lr" in err and "minirnng-demo-" not in err

    def interrupt(self, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "run", interrupt)
    assert cli.main(["demo", "--out", str(tmp_path / "stopped"), "--train-size", "16", "--quiet"]) == 130
    assert f"interrupted; in {tmp_path / 'stopped'}: grace_hopper_parsed.png" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "a-file" / "sub")]) == 1
    assert "a part of its path is a file, not a folder" in capsys.readouterr().err


def test_parse_with_11_classes_uses_a_two_stage_checkpoint(tmp_path, capsys, rng):
    from minirnng.models import RNNG
    from minirnng.models.stage2 import EyeBrowNet, MouthNet, NoseNet, TwoStageParser

    path = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 256, (70, 60, 3), dtype=numpy.uint8)).save(path)
    assert cli.main(["parse", str(path), "--classes", "11", "--out", str(tmp_path)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    TwoStageParser(RNNG(n_classes=11, rng=0), EyeBrowNet(rng=1), NoseNet(rng=2), MouthNet(rng=3)).save(
        tmp_path / "two_stage.npz")
    assert cli.main(["parse", str(path), "--classes", "11", "--checkpoint", str(tmp_path / "two_stage.npz"),
                     "--out", str(tmp_path / "out"), "--no-detect"]) == 0
    labels = numpy.asarray(Image.open(tmp_path / "out" / "face_labels.png"))
    assert labels.shape == (70, 60) and labels.max() < 11
    # the checkpoint says which parser it holds: --classes may be left out, and the two-stage
    # parser has no stage-1 test-time options
    assert cli.main(["parse", str(path), "--checkpoint", str(tmp_path / "two_stage.npz"),
                     "--out", str(tmp_path / "out2"), "--no-detect"]) == 0
    numpy.testing.assert_array_equal(numpy.asarray(Image.open(tmp_path / "out2" / "face_labels.png")), labels)
    capsys.readouterr()
    assert cli.main(["parse", str(path), "--checkpoint", str(tmp_path / "two_stage.npz"), "--crf",
                     "--out", str(tmp_path / "out3")]) == 2
    assert "--crf works with a stage-1 parser" in capsys.readouterr().err


def test_parse_classes_is_checked_against_the_checkpoint(tmp_path, capsys, rng):
    from minirnng.data.classes import HELEN_CLASSES
    from minirnng.models import RNNG

    path = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=numpy.uint8)).save(path)
    model = RNNG(n_classes=11, rng=0)
    model.classes = list(HELEN_CLASSES)
    model.save(tmp_path / "helen.npz")
    arguments = ["parse", str(path), "--checkpoint", str(tmp_path / "helen.npz"), "--no-detect"]
    assert cli.main(arguments + ["--classes", "3", "--out", str(tmp_path / "a")]) == 2
    assert "parses 11 classes (background, skin, left brow" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a")
    for classes, out in ((["--classes", "11"], "b"), ([], "c")):
        assert cli.main(arguments + classes + ["--out", str(tmp_path / out)]) == 0
        assert numpy.asarray(Image.open(tmp_path / out / "face_labels.png")).max() < 11


@pytest.mark.parametrize("mode", ["P", "CMYK"])
def test_a_pil_picture_in_palette_or_cmyk_mode_is_parsed_as_its_colours(parser, mode):
    rgb = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((96, 120))
    picture = rgb.convert(mode, palette=Image.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    # the picture's own colours, as RGB, are what it shows: its palette indices or CMYK channels are not
    expected = parser.parse(numpy.asarray(picture.convert("RGB")))
    numpy.testing.assert_array_equal(parser.parse(picture), expected)


def test_run_refuses_one_image_for_a_list_and_an_empty_list(parser, rng):
    image = rng.integers(0, 256, (40, 30, 3), dtype=numpy.uint8)
    with pytest.raises(ValueError, match=r"pass a list of images .* got one array of shape \(40, 30, 3\)"):
        parser.run(image)
    with pytest.raises(ValueError, match="the list of images is empty"):
        parser.run([])
    assert parser.run([image])["logits"].shape == (1, 3, 128, 128)
    # an (N, H, W) array is a batch of greyscale pictures, an (N, H, W, 3) one a batch of colour ones
    assert parser.run(image[:, :, 0][None].repeat(2, axis=0))["logits"].shape == (2, 3, 128, 128)
    assert parser.run(image[None])["logits"].shape == (1, 3, 128, 128)


@pytest.mark.parametrize("setting, value", [("max_side", 0), ("max_side", None), ("max_side", -5),
                                            ("min_size", 24.5), ("min_size", -3), ("min_size", True)])
def test_detect_faces_names_a_bad_setting(setting, value):
    from minirnng.detect import detect_faces
    with pytest.raises(ValueError, match=f"^detect_faces: {setting} must be a positive whole number of pixels"):
        detect_faces(numpy.zeros((40, 40, 3), numpy.uint8), **{setting: value})


def test_detect_faces_takes_infinity_for_never_reducing_the_image():
    import math

    from minirnng.detect import detect_faces
    if not detector_available():
        pytest.skip("OpenCV is not installed")
    assert detect_faces(numpy.zeros((40, 40, 3), numpy.uint8), max_side=math.inf).shape == (0, 4)
