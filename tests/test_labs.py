"""The course labs: the student versions are up to date, the full notebooks' solutions pass every
check, an unchanged student version fails every check with a helpful message, and the checks
recognise the usual mistakes."""

import importlib.util
import pathlib

import numpy
import pytest

from minirnng import labs

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(autouse=True)
def emulator_cache_in_tmp(tmp_path, monkeypatch):
    """Lab 08 compiles kernels for the CUDA emulator: keep them out of the home folder."""
    monkeypatch.setenv("MINIRNNG_CACHE_DIR", str(tmp_path / "cache"))


def make_labs():
    pytest.importorskip("jupytext", reason="jupytext is not installed (pip install -e '.[notebooks]')")
    spec = importlib.util.spec_from_file_location("make_labs", NOTEBOOKS / "labs" / "make_labs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lab", list(labs.LABS))
def test_student_version_is_up_to_date(lab):
    reasons = make_labs().out_of_date(lab)
    assert not reasons, "\n".join(reasons) + "\nrun: python notebooks/labs/make_labs.py"


@pytest.mark.parametrize("lab", list(labs.LABS))
def test_full_notebook_passes_every_check(lab, capsys):
    points, total, rows = labs.grade(NOTEBOOKS / f"{lab}.py")
    assert points == total, capsys.readouterr().out


@pytest.mark.parametrize("lab", list(labs.LABS))
def test_student_version_fails_helpfully(lab, capsys):
    """Unchanged, every check fails, and says which function is not implemented yet."""
    points, total, rows = labs.grade(NOTEBOOKS / "labs" / f"{lab}.ipynb")
    assert points == 0, capsys.readouterr().out
    for check, _, _, message in rows:
        assert "is not implemented yet" in message, (check, message)


def test_not_implemented_is_one_clear_message():
    def conv2d_forward(x, weight, bias, stride=1, padding=0):
        raise NotImplementedError

    with pytest.raises(labs.LabCheckError) as caught:
        labs.check_conv2d_forward(conv2d_forward)
    assert "conv2d_forward is not implemented yet" in str(caught.value)
    assert caught.value.__suppress_context__, "the NotImplementedError traceback should not be chained"


def test_student_version_replaces_solutions():
    make = make_labs()
    source = "def f(x):\n    ### BEGIN SOLUTION\n    y = 2 * x\n    ### END SOLUTION\n    return y\n"
    assert make.strip_solutions(source) == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError\n    return y"
    with pytest.raises(ValueError, match="without"):
        make.strip_solutions("    ### BEGIN SOLUTION\n    y = 1\n")


# -- the checks recognise the usual mistakes ----------------------------------------------------

def failure(check, *functions):
    with pytest.raises(labs.LabCheckError) as caught:
        check(*functions)
    return str(caught.value)


def gated_forward(x, g, W, b):
    h = numpy.zeros_like(x)
    previous = numpy.zeros(x.shape[:-1])
    for j in range(x.shape[-1]):
        h[..., j] = x[..., j] + g[..., j] * (numpy.einsum("cd,ndy->ncy", W, previous) + b[None, :, None])
        previous = h[..., j]
    return h, (h, g, W, b)


@pytest.mark.parametrize("slip, hint", [
    ({"next_gate": False}, "gate of the next step"),
    ({"transpose": False}, "is W transposed?"),
    ({"previous_state": False}, "h_{j-1}, not h_{j+1}"),
    ({"gate_before_mixing": False}, "before the channel mixing"),
    ({"next_gate": False, "transpose": False, "previous_state": False, "gate_before_mixing": False},
     "eq. 4 as printed"),
])
def test_gated_backward_slips_are_named(slip, hint):
    def backward(dh, cache):
        h, g, W, b = cache
        return labs.gated_backward_variant(dh, h, g, W, b, **slip)

    message = failure(labs.check_gated_rnn_backward, gated_forward, backward)
    assert hint in message
    assert "relative error" in message and "Worst:" in message


def test_gated_backward_variant_is_right_by_default():
    def backward(dh, cache):
        h, g, W, b = cache
        return labs.gated_backward_variant(dh, h, g, W, b)

    labs.check_gated_rnn_backward(gated_forward, backward)


def test_plain_backward_with_w_instead_of_transpose():
    def forward(x, W, b):
        h = numpy.zeros_like(x)
        previous = numpy.zeros(x.shape[:-1])
        for t in range(x.shape[-1]):
            h[..., t] = numpy.tanh(x[..., t] + numpy.einsum("cd,ndy->ncy", W, previous) + b[None, :, None])
            previous = h[..., t]
        return h, (h, W)

    def backward(dh, cache):
        h, W = cache
        return labs.plain_backward_variant(dh, h, W, transpose=False)

    message = failure(labs.check_spatial_rnn_backward, forward, backward)
    assert "is W transposed?" in message
    # the grade sheet's one line names the slip, not the last finite-difference row
    assert labs.failure_summary(message).startswith("Hint: is W transposed?")


def test_softmax_without_log_sum_exp_is_told_to_subtract_the_maximum():
    def forward(logits, target):
        with numpy.errstate(all="ignore"):
            p = numpy.exp(logits) / numpy.exp(logits).sum(axis=1, keepdims=True)
            loss = float(numpy.mean(-numpy.log(numpy.take_along_axis(p, target[:, None], axis=1))))
        return loss, (p, target)

    def backward(dloss, cache):
        p, target = cache
        onehot = numpy.arange(p.shape[1])[None, :, None, None] == target[:, None]
        return dloss * (p - onehot) / (p.size / p.shape[1])

    message = failure(labs.check_softmax_cross_entropy, forward, backward)
    assert "NaN or infinite" in message and "subtract the largest logit" in message


def test_maxpool_tie_going_to_the_last_maximum():
    def forward(x, k, s):
        n, c, height, width = x.shape
        out_height, out_width = (height - k) // s + 1, (width - k) // s + 1
        y = numpy.full((n, c, out_height, out_width), -numpy.inf)
        winner = numpy.zeros(y.shape, dtype=int)
        for i in range(k):
            for j in range(k):
                candidate = x[:, :, i:i + s * (out_height - 1) + 1:s, j:j + s * (out_width - 1) + 1:s]
                larger = candidate >= y  # the slip: >= hands a tie to the later entry
                y, winner = numpy.where(larger, candidate, y), numpy.where(larger, i * k + j, winner)
        return y, (x.shape, winner, k, s)

    def backward(dy, cache):
        shape, winner, k, s = cache
        dx = numpy.zeros(shape)
        for i in range(k):
            for j in range(k):
                rows = slice(i, i + s * (dy.shape[2] - 1) + 1, s)
                columns = slice(j, j + s * (dy.shape[3] - 1) + 1, s)
                dx[:, :, rows, columns] += numpy.where(winner == i * k + j, dy, 0)
        return dx

    assert "not the last" in failure(labs.check_maxpool2d_backward, forward, backward)


def test_maxpool_in_ceil_mode_fails():
    """A window that does not fit is dropped (floor mode); a forward that pads it in is wrong."""
    def forward(x, k, s):
        n, c, height, width = x.shape
        out_height, out_width = -(-(height - k) // s) + 1, -(-(width - k) // s) + 1  # ceil mode
        padded = numpy.full((n, c, (out_height - 1) * s + k, (out_width - 1) * s + k), -numpy.inf)
        padded[:, :, :height, :width] = x
        y = numpy.full((n, c, out_height, out_width), -numpy.inf)
        for i in range(k):
            for j in range(k):
                y = numpy.maximum(y, padded[:, :, i:i + s * (out_height - 1) + 1:s, j:j + s * (out_width - 1) + 1:s])
        return y, None

    assert "windows that do not fit are dropped" in failure(labs.check_maxpool2d_forward, forward)


def test_conv_forward_with_a_flipped_kernel():
    from minirnng.layers.im2col import im2col

    def forward(x, weight, bias, stride=1, padding=0):
        o, _, k, _ = weight.shape
        n, _, height, width = x.shape
        size = ((height + 2 * padding - k) // stride + 1, (width + 2 * padding - k) // stride + 1)
        y = weight[:, :, ::-1, ::-1].reshape(o, -1) @ im2col(x, k, stride, padding) + bias[:, None]
        return y.reshape(n, o, *size), None

    assert "you flipped the kernel" in failure(labs.check_conv2d_forward, forward)


@pytest.mark.parametrize("slip, hint", [
    # one block for every batch: only the first 256 lines are scanned
    (("blocks_for(n * row[0])", "blocks_for(row[0])"), "does the grid cover N * lines threads"),
    (("blocks_for(n * lines)", "blocks_for(lines)"), "does the backward's grid cover N * lines threads"),
    # the reverse scans start off the image: the kernel skips such lines instead of writing elsewhere
    (("first = (length - 1) * step_stride", "first = length - 1"), None),
])
def test_lab_08_slips_fail_their_checks_without_crashing_the_grader(slip, hint, tmp_path):
    source = (NOTEBOOKS / "08_numpy_to_cuda.py").read_text(encoding="utf-8")
    assert slip[0] in source
    (tmp_path / "08_numpy_to_cuda.py").write_text(source.replace(slip[0], slip[1]), encoding="utf-8")
    points, total, rows = labs.grade(tmp_path / "08_numpy_to_cuda.py")
    assert points < total
    if hint:
        assert any(hint in message for _, _, _, message in rows), rows


def test_grader_command_line(capsys):
    assert labs.main(["list"]) == 0
    assert "check_gated_rnn_backward" in capsys.readouterr().out
    assert labs.main(["grade", str(NOTEBOOKS / "labs" / "04_pooling_and_relu.ipynb")]) == 1
    assert "score: 0/" in capsys.readouterr().out


def test_a_check_called_in_the_same_cell_as_the_solution_does_not_hide_it(tmp_path):
    """Only the statements that call a check are skipped, not the cell that holds them."""
    source = (NOTEBOOKS / "04_pooling_and_relu.py").read_text(encoding="utf-8")
    header, *cells = source.split("\n# %%")
    merged = header + "\n# %%\n" + "\n".join(cell.split("\n", 1)[1] for cell in cells
                                                if not cell.lstrip().startswith("[markdown]"))
    assert "labs.check_" in merged
    (tmp_path / "04_pooling_and_relu.py").write_text(merged, encoding="utf-8")
    points, total, rows = labs.grade(tmp_path / "04_pooling_and_relu.py")
    assert points == total, rows


def test_the_grader_knows_a_renamed_download_and_reports_a_stray_file_in_one_line(tmp_path, capsys):
    assert labs.lab_of("submissions/ada/07_gated_rnn (1).ipynb") == "07_gated_rnn"
    assert labs.lab_of("07_gated_rnn-ada.py") == "07_gated_rnn"
    with pytest.raises(ValueError, match="not a lab notebook"):
        labs.lab_of("07_gated_rnnx.ipynb")
    stray = tmp_path / "notes.ipynb"
    stray.write_text("{}", encoding="utf-8")
    assert labs.main(["grade", str(stray), "--csv", str(tmp_path / "grades.csv")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{stray}: not graded: ValueError") and "Traceback" not in out
    assert "not graded" in (tmp_path / "grades.csv").read_text(encoding="utf-8")
