"""Pictures: palettes, colour-coded labels, overlays and sample grids."""

import numpy
import pytest
from PIL import Image

from minirnng.data import HELEN_CLASSES, LFW_CLASSES, SyntheticFaces
from minirnng.viz import HELEN_PALETTE, LFW_PALETTE, colorize, overlay, save_sample_grid


def test_palettes_are_distinct_and_shared_between_class_lists():
    assert len({tuple(colour) for colour in HELEN_PALETTE}) == len(HELEN_CLASSES)
    for name, colour in zip(LFW_CLASSES, LFW_PALETTE):
        numpy.testing.assert_array_equal(colour, HELEN_PALETTE[HELEN_CLASSES.index(name)])


def test_colorize_and_overlay():
    labels = numpy.array([[0, 1], [2, 10]])
    colours = colorize(labels, HELEN_CLASSES)
    assert colours.shape == (2, 2, 3) and colours.dtype == numpy.uint8
    numpy.testing.assert_array_equal(colours[1, 1], HELEN_PALETTE[10])
    with pytest.raises(ValueError, match="only 3 classes"):
        colorize(labels, LFW_CLASSES)
    image = numpy.full((2, 2, 3), 100, dtype=numpy.uint8)
    blended = overlay(image, labels, HELEN_CLASSES, opacity=1.0)
    numpy.testing.assert_array_equal(blended[0, 0], image[0, 0])  # background is left as it is
    numpy.testing.assert_array_equal(blended[1, 1], HELEN_PALETTE[10])


def test_save_sample_grid_writes_a_png_and_keeps_existing_files(tmp_path):
    path = tmp_path / "grid.png"
    save_sample_grid(SyntheticFaces(3, size=64), path, n=3)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 200
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_sample_grid(SyntheticFaces(3, size=64), path, n=2)
    save_sample_grid(SyntheticFaces(3, size=64, n_classes=3), path, n=2, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind
