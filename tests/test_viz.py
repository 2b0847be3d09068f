"""Pictures: palettes, colour-coded labels, overlays and sample grids."""

import numpy
import pytest
from PIL import Image

from minirnng.data import HELEN_CLASSES, LFW_CLASSES, SyntheticFaces
from minirnng.viz import HELEN_PALETTE, LFW_PALETTE, colorize, overlay, palette, save_sample_grid


def test_palettes_are_distinct_and_shared_between_class_lists():
    assert len({tuple(colour) for colour in HELEN_PALETTE}) == len(HELEN_CLASSES)
    for name, colour in zip(LFW_CLASSES, LFW_PALETTE):
        numpy.testing.assert_array_equal(colour, HELEN_PALETTE[HELEN_CLASSES.index(name)])


def test_other_class_lists_get_a_palette_that_keeps_known_names_colours():
    colours = palette(["background", "face", "hair", "glasses"])
    assert colours.shape == (4, 3) and colours.dtype == numpy.uint8
    assert colours[0].tolist() == [0, 0, 0] and colours[2].tolist() == LFW_PALETTE[2].tolist()
    assert len({tuple(c) for c in colours}) == 4
    assert palette([f"class {k}" for k in range(12)]).shape == (12, 3)


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


def test_figures_name_input_they_would_draw_wrongly():
    from minirnng.viz import confusion_figure, pipeline_figure, training_curves_figure

    images = numpy.zeros((2, 8, 8, 3), numpy.uint8)
    maps = numpy.zeros((2, 8, 8), numpy.int64)
    gates = numpy.full((2, 4, 4), 0.5)
    pipeline_figure(images, maps, maps[:, :4, :4], gates, maps, LFW_CLASSES)  # draws
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, H, W, 3\)"):
        pipeline_figure(images.astype(numpy.float64), maps, None, None, maps, LFW_CLASSES)
    with pytest.raises(ValueError, match=r"the result must be \(2, H, W\), one map per image"):
        pipeline_figure(images, maps, None, None, maps[:1], LFW_CLASSES)
    with pytest.raises(ValueError, match="gate map holds NaN"):
        pipeline_figure(images, None, None, numpy.full((2, 4, 4), numpy.nan), maps, LFW_CLASSES)
    with pytest.raises(ValueError, match=r"gate map must hold values in \[0, 1\], got 0.5 .. 2"):
        pipeline_figure(images, None, None, numpy.where(gates > 0, gates, 0) + numpy.eye(4) * 1.5, maps,
                        LFW_CLASSES)
    with pytest.raises(ValueError, match=r"a matrix of 3 classes is 3x3, got shape \(11, 11\)"):
        confusion_figure(numpy.ones((11, 11)), LFW_CLASSES)
    for history in ([], [{"epoch": 1, "eyes": 0.3}]):
        with pytest.raises(ValueError, match="needs a stage-1 Trainer's history"):
            training_curves_figure(history)


def test_training_curves_draw_every_loss_term_the_run_used():
    from minirnng.viz import training_curves_figure

    def history(terms):
        rows = []
        for epoch in range(1, 4):
            row = {"epoch": epoch, "val_accuracy": 0.8 + 0.01 * epoch, "val_F_hair": 0.5}
            row.update({f"train_{name}": 1.0 / (epoch + k) for k, name in enumerate(terms)})
            rows.append(row)
        return rows

    spec_terms = ("loss", "logits", "coarse", "edge")
    labels = lambda figure: [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels(training_curves_figure(history(spec_terms))) == ["total", "logits CE", "coarse CE", "edge BCE"]
    assert labels(training_curves_figure(history(spec_terms + ("dice", "affinity"))))[-2:] == [
        "soft Dice", "colour affinity"]
