"""The dataset loaders, on tiny fixtures written in each dataset's official on-disk layout."""

import os
import re

import numpy
import pytest
from PIL import Image

from minirnng.data import (CelebAMaskHQ, Helen, HELEN_CLASSES, LFW_CLASSES, LFWPL, MalformedDataError,
                           MissingDataError)
from minirnng.data.datasets import LFW_LABEL_COLOURS

RNG = numpy.random.default_rng(0)


def smooth_image(height, width, seed=0):
    """A smooth uint8 (H, W, 3) picture that JPEG keeps close to the original."""
    y, x = numpy.mgrid[0:height, 0:width]
    phase = seed * 0.7
    channels = [128 + 100 * numpy.sin(x / 7.0 + phase), 128 + 100 * numpy.cos(y / 9.0 + phase), 60 + x + y]
    return numpy.clip(numpy.stack(channels, axis=-1), 0, 255).astype(numpy.uint8)


def block_labels(height, width, n_classes, seed=0):
    """uint8 (H, W) labels made of 4x4-pixel blocks, every class present."""
    rng = numpy.random.default_rng(seed)
    blocks = rng.integers(0, n_classes, (-(-height // 4), -(-width // 4)))
    blocks.flat[:n_classes] = numpy.arange(n_classes)
    return numpy.repeat(numpy.repeat(blocks, 4, axis=0), 4, axis=1)[:height, :width].astype(numpy.uint8)


def save(array, path, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **options)


def truncate(path):
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------
# LFW-PL

LFW_SAMPLES = (("Aaron_Peirsol", 1, "1"), ("Aaron_Peirsol", 2, "0002"), ("Zoe_Ball", 17, "17"))


@pytest.fixture
def lfw_root(tmp_path):
    """An LFW-PL folder: three 20x24 samples in train, one in validation, no test list."""
    for number, (person, image_number, _) in enumerate(LFW_SAMPLES):
        stem = f"{person}_{image_number:04d}"
        save(smooth_image(20, 24, number), str(tmp_path / "lfw_funneled" / person / f"{stem}.jpg"), quality=95)
        colours = numpy.array(LFW_LABEL_COLOURS, dtype=numpy.uint8)[block_labels(20, 24, 3, number)]
        save(colours, str(tmp_path / "parts_lfw_funneled_gt_images" / f"{stem}.ppm"))
    (tmp_path / "parts_train.txt").write_text("".join(f"{p} {n}\n" for p, _, n in LFW_SAMPLES))
    (tmp_path / "parts_validation.txt").write_text("Zoe_Ball 17\n\n")
    return tmp_path


def test_lfw_reads_the_official_layout(lfw_root):
    assert open(lfw_root / "parts_lfw_funneled_gt_images" / "Aaron_Peirsol_0001.ppm", "rb").read(2) == b"P6"
    dataset = LFWPL(lfw_root, "train")
    assert len(dataset) == 3
    assert dataset.classes == LFW_CLASSES == ("background", "skin", "hair")
    assert dataset.names == ("Aaron_Peirsol_0001", "Aaron_Peirsol_0002", "Zoe_Ball_0017")
    for number in range(3):
        image, labels = dataset[number]
        assert image.shape == (20, 24, 3) and image.dtype == numpy.uint8
        assert labels.shape == (20, 24) and labels.dtype == numpy.uint8
        numpy.testing.assert_array_equal(labels, block_labels(20, 24, 3, number))
        assert numpy.abs(image.astype(int) - smooth_image(20, 24, number)).mean() < 6  # JPEG is lossy
    assert len(LFWPL(lfw_root, "validation")) == 1


def test_lfw_colours_decode_to_the_documented_classes(lfw_root):
    colours = numpy.zeros((20, 24, 3), dtype=numpy.uint8)
    colours[:, :8] = (255, 0, 0)   # red: hair
    colours[:, 8:16] = (0, 255, 0)  # green: skin
    colours[:, 16:] = (0, 0, 255)  # blue: background
    save(colours, str(lfw_root / "parts_lfw_funneled_gt_images" / "Zoe_Ball_0017.ppm"))
    _, labels = LFWPL(lfw_root, "validation")[0]
    assert (labels[:, :8] == LFW_CLASSES.index("hair")).all()
    assert (labels[:, 8:16] == LFW_CLASSES.index("skin")).all()
    assert (labels[:, 16:] == LFW_CLASSES.index("background")).all()


def test_lfw_missing_test_list_is_named(lfw_root):
    with pytest.raises(MissingDataError, match="parts_test.txt"):
        LFWPL(lfw_root, "test")


def test_lfw_missing_folder_shows_the_expected_layout(tmp_path):
    with pytest.raises(MissingDataError, match=r"(?s)does not exist.*lfw_funneled/<Name>/<Name>_NNNN\.jpg"):
        LFWPL(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="parts_lfw_funneled_gt_images"):
        (tmp_path / "lfw_funneled").mkdir()
        LFWPL(tmp_path, "train")


def test_a_root_that_is_a_file_and_missing_lines_are_counted_by_line(lfw_root, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MissingDataError, match="a-file is a file, not a folder"):
        LFWPL(tmp_path / "a-file", "train")
    (lfw_root / "parts_train.txt").write_text("Nobody_Here 3\nNobody_Else 1\n")  # each names 2 missing files
    with pytest.raises(MissingDataError, match=r"\(and 1 more line of it name missing files\)"):
        LFWPL(lfw_root, "train")


def test_decode_colour_labels_checks_its_arrays():
    from minirnng.data.datasets import decode_colour_labels

    rgb = numpy.zeros((2, 2, 3), numpy.uint8)
    assert decode_colour_labels(rgb, [(0, 0, 0), (255, 0, 0)]).tolist() == [[0, 0], [0, 0]]
    for colours in (numpy.zeros((2, 2, 4), numpy.uint8), numpy.zeros((2, 2), numpy.uint8),
                    numpy.zeros((2, 2, 3), numpy.int64)):
        with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) RGB"):
            decode_colour_labels(colours, [(0, 0, 0)])
    with pytest.raises(ValueError, match=r"one RGB colour \(0-255\) per class"):
        decode_colour_labels(rgb, [])


def test_lfw_unknown_split(lfw_root):
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        LFWPL(lfw_root, "valid")


def test_lfw_split_line_that_names_no_file(lfw_root):
    (lfw_root / "parts_train.txt").write_text("Aaron_Peirsol 1\nNobody_Here 3\n")
    with pytest.raises(MissingDataError, match=r"line 2 \('Nobody_Here 3'\).*Nobody_Here_0003\.jpg"):
        LFWPL(lfw_root, "train")


def test_lfw_malformed_split_line(lfw_root):
    (lfw_root / "parts_train.txt").write_text("Aaron_Peirsol 1\nAaron_Peirsol\n")
    with pytest.raises(MalformedDataError, match=r"parts_train\.txt line 2 is 'Aaron_Peirsol'"):
        LFWPL(lfw_root, "train")


def test_lfw_split_lists_as_editors_save_them(lfw_root):
    """A byte-order mark is dropped; Latin-1, Unicode digits and repeated lines are named errors."""
    train = lfw_root / "parts_train.txt"
    lines = "".join(f"{p} {n}\n" for p, _, n in LFW_SAMPLES)
    train.write_bytes(b"\xef\xbb\xbf" + lines.replace("\n", "\r\n").encode())
    assert len(LFWPL(lfw_root, "train")) == len(LFW_SAMPLES)
    train.write_bytes(lines.encode() + "Jos\u00e9_Dirceu 1\n".encode("latin-1"))
    with pytest.raises(MalformedDataError, match=rf"parts_train\.txt line {len(LFW_SAMPLES) + 1} is not UTF-8"):
        LFWPL(lfw_root, "train")
    train.write_text("Aaron_Peirsol \u00b2\n", encoding="utf-8")
    with pytest.raises(MalformedDataError, match="line 1 is 'Aaron_Peirsol \u00b2'; expected a person's name"):
        LFWPL(lfw_root, "train")
    first = lines.splitlines()[0]
    train.write_text(lines + first + "\n")
    with pytest.raises(MalformedDataError, match=rf"names {first.split()[0]}_\d{{4}} twice, on lines 1 and "
                                                 rf"{len(LFW_SAMPLES) + 1}"):
        LFWPL(lfw_root, "train")


def test_lfw_truncated_image(lfw_root):
    truncate(lfw_root / "lfw_funneled" / "Zoe_Ball" / "Zoe_Ball_0017.jpg")
    dataset = LFWPL(lfw_root, "validation")
    with pytest.raises(MalformedDataError, match=r"Zoe_Ball_0017\.jpg is truncated"):
        dataset[0]


def test_lfw_truncated_label(lfw_root):
    truncate(lfw_root / "parts_lfw_funneled_gt_images" / "Zoe_Ball_0017.ppm")
    with pytest.raises(MalformedDataError, match=r"Zoe_Ball_0017\.ppm is truncated"):
        LFWPL(lfw_root, "validation")[0]


def test_lfw_label_of_the_wrong_size(lfw_root):
    blue = numpy.zeros((20, 23, 3), dtype=numpy.uint8) + numpy.uint8([0, 0, 255])
    save(blue, str(lfw_root / "parts_lfw_funneled_gt_images" / "Zoe_Ball_0017.ppm"))
    with pytest.raises(MalformedDataError, match=r"Zoe_Ball_0017\.ppm is 23x20 .* is 24x20"):
        LFWPL(lfw_root, "validation")[0]


def test_lfw_unknown_label_colour_is_reported_with_its_count(lfw_root):
    colours = numpy.zeros((20, 24, 3), dtype=numpy.uint8) + numpy.uint8([0, 0, 255])
    colours[:3, :5] = (250, 3, 3)
    save(colours, str(lfw_root / "parts_lfw_funneled_gt_images" / "Zoe_Ball_0017.ppm"))
    with pytest.raises(MalformedDataError, match=r"Zoe_Ball_0017\.ppm: 15 of 480 pixels .*\(250, 3, 3\) \(15 pixels\)"):
        LFWPL(lfw_root, "validation")[0]


def test_lfw_grey_label_file_is_rejected(lfw_root):
    save(numpy.zeros((20, 24), dtype=numpy.uint8), str(lfw_root / "parts_lfw_funneled_gt_images" / "Zoe_Ball_0017.ppm"))
    with pytest.raises(MalformedDataError, match="mode 'L'"):
        LFWPL(lfw_root, "validation")[0]


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_out_of_range_indices(lfw_root, index):
    with pytest.raises(IndexError, match=rf"index {index} is out of range: valid indices are 0 \.\. 2"):
        LFWPL(lfw_root, "train")[index]


def test_iteration_stops_at_the_end(lfw_root):
    assert len(list(LFWPL(lfw_root, "train"))) == 3


# ---------------------------------------------------------------------------------------------
# HELEN

HELEN_IDS = ("100032540_1", "10405146_1")


def write_helen(root, maps_for):
    for number, stem in enumerate(HELEN_IDS):
        save(smooth_image(16, 12, number), str(root / "images" / f"{stem}.jpg"), quality=95)
        for class_index, probability in enumerate(maps_for(number)):
            save(probability, helen_label_path(root, number, class_index))
    (root / "exemplars.txt").write_text("".join(f"{k + 1} , {stem}\n" for k, stem in enumerate(HELEN_IDS)))
    (root / "tuning.txt").write_text(f"1 , {HELEN_IDS[1]}\n")
    (root / "testing.txt").write_text(f"1 , {HELEN_IDS[0]}\n")


def helen_label_path(root, sample, class_index):
    stem = HELEN_IDS[sample]
    return str(root / "labels" / stem / f"{stem}_lbl{class_index:02d}.png")


def helen_maps(labels):
    """11 grey probability maps whose arg-max is ``labels``, with some noise below the winner."""
    maps = RNG.integers(0, 100, (len(HELEN_CLASSES),) + labels.shape).astype(numpy.uint8)
    numpy.put_along_axis(maps, labels[None].astype(numpy.intp), 200, axis=0)
    return list(maps)


@pytest.fixture
def helen_root(tmp_path):
    write_helen(tmp_path, lambda number: helen_maps(block_labels(16, 12, 11, number)))
    return tmp_path


def test_helen_reads_the_official_layout(helen_root):
    dataset = Helen(helen_root, "train")
    assert dataset.classes == HELEN_CLASSES and dataset.names == HELEN_IDS
    for number in range(2):
        image, labels = dataset[number]
        assert image.shape == (16, 12, 3) and image.dtype == numpy.uint8 and labels.dtype == numpy.uint8
        numpy.testing.assert_array_equal(labels, block_labels(16, 12, 11, number))
    assert Helen(helen_root, "validation").names == (HELEN_IDS[1],)
    assert Helen(helen_root, "test").names == (HELEN_IDS[0],)


def test_helen_ties_and_empty_pixels_go_to_the_earlier_class(tmp_path):
    def maps(_):
        probabilities = [numpy.zeros((16, 12), dtype=numpy.uint8) for _ in HELEN_CLASSES]
        probabilities[3][:, :6] = 90
        probabilities[7][:, :6] = 90  # a tie with class 3
        return probabilities
    write_helen(tmp_path, maps)
    _, labels = Helen(tmp_path, "train")[0]
    assert (labels[:, :6] == 3).all() and (labels[:, 6:] == 0).all()


def test_helen_missing_label_map(helen_root):
    os.remove(helen_label_path(helen_root, 0, 7))
    with pytest.raises(MissingDataError, match=r"_lbl07\.png of class 'upper lip' does not exist"):
        Helen(helen_root, "train")[0]


def test_helen_labels_that_are_a_file_not_a_folder_are_named(helen_root):
    import shutil
    folder = os.path.dirname(helen_label_path(helen_root, 0, 0))
    shutil.rmtree(folder)
    with open(folder, "w") as stray:
        stray.write("not the folder of label maps")
    with pytest.raises(MissingDataError, match=rf"names {re.escape(folder)}, which is a file, not a folder"):
        Helen(helen_root, "train")


def test_helen_label_map_of_the_wrong_size(helen_root):
    save(numpy.zeros((16, 13), dtype=numpy.uint8), helen_label_path(helen_root, 1, 2))
    with pytest.raises(MalformedDataError, match=r"_lbl02\.png is 13x16 .* is 12x16"):
        Helen(helen_root, "train")[1]


def test_helen_colour_label_map_is_rejected(helen_root):
    save(numpy.zeros((16, 12, 3), dtype=numpy.uint8), helen_label_path(helen_root, 1, 2))
    with pytest.raises(MalformedDataError, match="mode 'RGB'"):
        Helen(helen_root, "train")[1]


def test_helen_split_errors(helen_root):
    (helen_root / "tuning.txt").write_text("1 , 999_1\n")
    with pytest.raises(MissingDataError, match=r"tuning\.txt line 1 .*999_1\.jpg"):
        Helen(helen_root, "validation")
    (helen_root / "tuning.txt").write_text("1 100032540_1\n")
    with pytest.raises(MalformedDataError, match=r"tuning\.txt line 1 is '1 100032540_1'"):
        Helen(helen_root, "validation")
    os.remove(helen_root / "testing.txt")
    with pytest.raises(MissingDataError, match=r"(?s)testing\.txt does not exist.*labels/<id>/<id>_lbl00\.png"):
        Helen(helen_root, "test")


# ---------------------------------------------------------------------------------------------
# CelebAMask-HQ


@pytest.fixture
def celeba_root(tmp_path):
    """Images 0 and 2001 at 32x32 with 16x16 masks, in mask folders 0 and 1."""
    for k in (0, 2001):
        save(smooth_image(32, 32, k), str(tmp_path / "CelebA-HQ-img" / f"{k}.jpg"), quality=95)
        folder = tmp_path / "CelebAMask-HQ-mask-anno" / str(k // 2000)
        masks = {"skin": (slice(2, 14), slice(2, 14)), "l_eye": (slice(5, 7), slice(4, 6)),
                 "hair": (slice(0, 4), slice(0, 16)), "neck": (slice(12, 16), slice(5, 11)),
                 "hat": (slice(0, 2), slice(0, 16))}
        for part, window in masks.items():
            mask = numpy.zeros((16, 16), dtype=numpy.uint8)
            mask[window] = 255
            save(mask, str(folder / f"{k:05d}_{part}.png"))
    return tmp_path


def test_celebamask_maps_parts_to_helen_classes(celeba_root):
    dataset = CelebAMaskHQ(celeba_root)
    assert dataset.names == ("0", "2001") and dataset.classes == HELEN_CLASSES
    image, labels = dataset[1]
    assert image.shape == (16, 16, 3) and labels.shape == (16, 16)  # the image is brought to the masks' size
    assert labels[6, 5] == HELEN_CLASSES.index("left eye")
    assert labels[8, 8] == HELEN_CLASSES.index("skin")
    assert (labels[0:4, 0:16] == HELEN_CLASSES.index("hair")).all()  # hair covers skin; the hat is not painted
    assert labels[15, 7] == HELEN_CLASSES.index("background")        # neck alone: background
    assert labels[13, 7] == HELEN_CLASSES.index("skin")              # neck over skin: still skin


def test_celebamask_errors(celeba_root):
    (celeba_root / "CelebAMask-HQ-mask-anno" / "0" / "00000_whiskers.png").write_bytes(b"")
    with pytest.raises(MalformedDataError, match="00000_whiskers.png does not name a known part"):
        CelebAMaskHQ(celeba_root)
    os.remove(celeba_root / "CelebAMask-HQ-mask-anno" / "0" / "00000_whiskers.png")
    save(smooth_image(32, 32), str(celeba_root / "CelebA-HQ-img" / "5.jpg"))
    with pytest.raises(MissingDataError, match=r"5\.jpg has no mask file .*00005_<part>\.png"):
        CelebAMaskHQ(celeba_root)
    with pytest.raises(MissingDataError, match=r"CelebA-HQ-img/<k>\.jpg"):
        CelebAMaskHQ(celeba_root / "elsewhere")
    os.remove(celeba_root / "CelebA-HQ-img" / "5.jpg")
    (celeba_root / "CelebA-HQ-img" / "._0.jpg").write_bytes(b"a Mac's metadata")  # hidden: not a picture
    assert CelebAMaskHQ(celeba_root).names == ("0", "2001")
    save(smooth_image(32, 32), str(celeba_root / "CelebA-HQ-img" / "7.png"))  # left out silently before
    with pytest.raises(MalformedDataError, match=r"7\.png is not named '<k>\.jpg'"):
        CelebAMaskHQ(celeba_root)


def test_celebamask_index_keeps_the_files_it_found_and_names_misplaced_masks(celeba_root):
    images, masks = celeba_root / "CelebA-HQ-img", celeba_root / "CelebAMask-HQ-mask-anno"
    os.rename(images / "2001.jpg", images / "02001.JPG")  # another spelling of image 2001
    os.rename(masks / "1" / "02001_hair.png", masks / "1" / "02001_hair.PNG")
    dataset = CelebAMaskHQ(celeba_root)
    assert dataset.names == ("0", "2001")
    assert (dataset[1][1][0:4, 0:16] == HELEN_CLASSES.index("hair")).all()  # the .PNG mask was read
    save(smooth_image(32, 32), str(images / "2001.jpg"))
    with pytest.raises(MalformedDataError, match="two files of image 2001, 02001.JPG and 2001.jpg"):
        CelebAMaskHQ(celeba_root)
    os.remove(images / "2001.jpg")
    os.rename(masks / "1" / "02001_skin.png", masks / "0" / "02001_skin.png")
    with pytest.raises(MalformedDataError, match=r"02001_skin\.png is in folder 0, but the masks of image 2001 "
                                                 r"belong in folder 1"):
        CelebAMaskHQ(celeba_root)


def test_an_empty_celebamask_split_is_an_error(celeba_root):
    from minirnng.data.catalog import open_dataset

    assert len(open_dataset("celebamask", "train", celeba_root)) == 2
    with pytest.raises(MalformedDataError, match=r"CelebAMaskHQ has 2 images, none of them numbered 28000 \.\. 28999"):
        open_dataset("celebamask", "validation", celeba_root)


def test_celebamask_splits_go_by_image_number_so_a_missing_image_moves_no_other(celeba_root, monkeypatch):
    from minirnng.data import catalog

    # scaled down: images 0-1999 train, 2000-2999 validation
    monkeypatch.setitem(catalog.CELEBAMASK_SPLITS, "train", (0, 2000))
    monkeypatch.setitem(catalog.CELEBAMASK_SPLITS, "validation", (2000, 3000))
    assert catalog.open_dataset("celebamask", "train", celeba_root).names == ("0",)
    assert catalog.open_dataset("celebamask", "validation", celeba_root).names == ("2001",)
    os.remove(celeba_root / "CelebA-HQ-img" / "0.jpg")  # its masks stay
    with pytest.raises(MalformedDataError, match="none of them numbered 0 .. 1999"):
        catalog.open_dataset("celebamask", "train", celeba_root)
    validation = catalog.open_dataset("celebamask", "validation", celeba_root)
    assert validation.names == ("2001",) and validation[0][0].shape == (16, 16, 3)


def test_a_size_takes_the_first_images_of_a_real_split_and_a_root_needs_a_dataset(celeba_root):
    from minirnng.data.catalog import open_dataset

    assert open_dataset("celebamask", "train", celeba_root, size=1).names == ("0",)
    with pytest.raises(ValueError, match="the train split has 2 images; a size of 3 asks for more"):
        open_dataset("celebamask", "train", celeba_root, size=3)
    for size in (0, -3, 1.5, True):  # none of them an empty split whose class shares are NaN
        with pytest.raises(ValueError, match="the train split's size must be a whole number of images, at least 1"):
            open_dataset("celebamask", "train", celeba_root, size=size)
    with pytest.raises(ValueError, match="given for the synthetic faces.*--data"):
        open_dataset("synthetic", "train", celeba_root)


def test_celebamask_truncated_mask(celeba_root):
    truncate(celeba_root / "CelebAMask-HQ-mask-anno" / "0" / "00000_hair.png")
    with pytest.raises(MalformedDataError, match=r"00000_hair\.png .*truncated"):
        CelebAMaskHQ(celeba_root)[0]
