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
    # a NaN row would draw as the blank of a class with no true pixel; negative counts as percentages
    for bad in (numpy.full((3, 3), numpy.nan), -numpy.eye(3)):
        with pytest.raises(ValueError, match="confusion_figure: a confusion matrix holds counts"):
            confusion_figure(bad, LFW_CLASSES)
    # the shape the caller gave, not the one left once the channels are averaged
    with pytest.raises(ValueError, match=r"gate map must be \(2, C, h, w\) .* got shape \(3, 5, 4, 4\)"):
        pipeline_figure(images, None, None, numpy.full((3, 5, 4, 4), 0.5), maps, LFW_CLASSES)
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


def test_training_curves_show_a_single_epoch_and_tell_the_f_lines_apart():
    from matplotlib.colors import to_rgb

    from minirnng.viz import training_curves_figure

    def history(epochs):
        return [{"epoch": epoch, "train_loss": 1.0 / epoch, "train_logits": 0.5 / epoch, "val_accuracy": 0.8,
                 **{f"val_F_{name}": 0.5 for name in HELEN_CLASSES}} for epoch in range(1, epochs + 1)]

    one = training_curves_figure(history(1))
    lines = [line for axis in one.axes for line in axis.get_lines()]
    assert len(lines) == 2 + 1 + len(HELEN_CLASSES)
    # one point per line: a line without a marker would draw nothing at all
    assert all(line.get_marker() not in (None, "", "None", " ") and line.get_markersize() > 0 for line in lines)
    assert [tick for tick in one.axes[0].get_xticks()] == [1]

    right = training_curves_figure(history(11)).axes[1]
    colours = {line.get_label(): to_rgb(line.get_color()) for line in right.get_lines()}
    assert len(set(colours.values())) == len(colours) == 1 + len(HELEN_CLASSES)  # 11 F lines and the accuracy
    assert colours["F hair"] == tuple(HELEN_PALETTE[HELEN_CLASSES.index("hair")] / 255.0)
    assert colours["pixel accuracy"] == (0.0, 0.0, 0.0)
    assert {line.get_label(): line.get_linestyle() for line in right.get_lines()}["F background"] == "--"
    assert all(float(tick).is_integer() for tick in right.xaxis.get_major_locator().tick_values(0.7, 11.3))
    # the legends are beside the axes, not over the curves
    for axis in training_curves_figure(history(11)).axes:
        anchor = axis.get_legend().get_bbox_to_anchor().transformed(axis.transAxes.inverted())
        assert anchor.x0 >= 1.0


def test_sample_grid_titles_keep_the_end_of_long_names():
    from minirnng.viz import _short

    assert _short("synthetic_single_s0_000017") == "\N{HORIZONTAL ELLIPSIS}" + "ynthetic_single_s0_000017"[-23:]
    assert _short("synthetic_single_s0_000017").endswith("000017") and len(_short("x" * 40)) == 24
    assert _short("short name") == "short name"


def test_pipeline_gate_map_has_a_labelled_colour_bar_and_says_it_is_a_channel_mean():
    from minirnng.viz import GATE_COLOURMAP, GATE_LABEL, pipeline_figure

    images = numpy.zeros((2, 8, 8, 3), numpy.uint8)
    maps = numpy.zeros((2, 8, 8), numpy.int64)
    gates = numpy.random.default_rng(0).random((2, 8, 4, 4))
    figure = pipeline_figure(images, maps, maps[:, :4, :4], gates, maps, LFW_CLASSES)
    titles = [axis.get_title() for axis in figure.axes]
    assert "gate map\n(mean of 8 channels)" in titles
    gate_axis = figure.axes[titles.index("gate map\n(mean of 8 channels)")]
    shown = gate_axis.get_images()[0]
    numpy.testing.assert_allclose(shown.get_array(), gates[0].mean(axis=0))
    assert shown.get_cmap().name == GATE_COLOURMAP == "viridis" and shown.get_clim() == (0, 1)
    bars = [axis for axis in figure.axes if axis.get_xlabel() == GATE_LABEL == "gate (0 = stopped)"]
    assert len(bars) == 1
    # a map already reduced over the channels draws as it is
    figure = pipeline_figure(images, None, None, gates.mean(axis=1), maps, LFW_CLASSES)
    assert [axis.get_title() for axis in figure.axes][:3] == ["input", "gate map", "result"]
    with pytest.raises(ValueError, match=r"gate map must be \(2, C, h, w\) or \(2, h, w\), one map per image"):
        pipeline_figure(images, None, None, gates[:1], maps, LFW_CLASSES)


def test_confusion_colour_bar_is_in_percent():
    from minirnng.viz import confusion_figure

    figure = confusion_figure(numpy.eye(3) * 10 + 1, LFW_CLASSES)
    bar = figure.axes[1]
    assert bar.get_ylabel() == "share of the true class (%)"
    assert bar.yaxis.get_major_formatter()(0.5, 0) == "50%"


def test_a_class_with_no_true_pixel_has_a_blank_row_not_zeros():
    from minirnng.viz import confusion_figure

    confusion = numpy.array([[8, 2, 0], [0, 0, 0], [1, 0, 3]])  # no pixel is truly skin
    texts = [text.get_text() for text in confusion_figure(confusion, LFW_CLASSES).axes[0].texts]
    assert texts == ["80", "20", "0", "–", "–", "–", "25", "0", "75"]


def test_propagation_figure_goes_through_the_atomic_writer_into_a_new_folder(tmp_path):
    from minirnng.propagation import demonstrate_propagation

    path = tmp_path / "no such dir" / "p.png"
    demonstrate_propagation(path=path)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"cannot write \.txt files"):
        demonstrate_propagation(path=tmp_path / "p.txt")


@pytest.mark.parametrize("arguments, message", [({"per_row": 0}, "per_row must be a whole number of at least 1"),
                                                ({"n": 2.5}, "n must be a whole number of at least 1"),
                                                ({"start": -1}, "start must be a whole number of at least 0")])
def test_save_sample_grid_names_a_bad_count(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=f"^save_sample_grid: {message}"):
        save_sample_grid(SyntheticFaces(3, size=64), tmp_path / "grid.png", **arguments)


def test_save_sample_grid_and_overlay_name_a_bad_path_or_opacity(tmp_path):
    with pytest.raises(ValueError, match=r"save_sample_grid: path .*grid.txt'?: Matplotlib cannot write .txt files"):
        save_sample_grid(SyntheticFaces(3, size=64), tmp_path / "grid.txt", n=2)
    image = numpy.zeros((8, 8, 3), numpy.uint8)
    with pytest.raises(ValueError, match=r"overlay: opacity must be a number in \[0, 1\], got '0.5'"):
        overlay(image, numpy.zeros((8, 8), int), LFW_CLASSES, opacity="0.5")


def test_overlay_leaves_the_class_named_background_alone_wherever_it_is():
    image = numpy.full((1, 2, 3), 100, numpy.uint8)
    labels = numpy.array([[0, 2]])
    first = overlay(image, labels, LFW_CLASSES, opacity=1.0)  # background first
    assert (first[0, 0] == 100).all() and not (first[0, 1] == 100).all()
    last = overlay(image, labels, ("skin", "hair", "background"), opacity=1.0)
    assert not (last[0, 0] == 100).all() and (last[0, 1] == 100).all()
