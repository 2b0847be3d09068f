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
    assert make.strip_solutions(source) == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError\n    return y")
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
    def backward(dh, cache):
        h, W = cache
        return labs.plain_backward_variant(dh, h, W, transpose=False)

    message = failure(labs.check_spatial_rnn_backward, plain_forward, backward)  # plain_forward: below
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


def window_offsets(dy, k, s):
    """(i, j, rows, columns) for each offset of a k x k window with stride s: the slices of the
    input that offset (i, j) of every window reads, for pooled outputs like ``dy``."""
    for i in range(k):
        for j in range(k):
            yield i, j, slice(i, i + s * (dy.shape[2] - 1) + 1, s), slice(j, j + s * (dy.shape[3] - 1) + 1, s)


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
        for i, j, rows, columns in window_offsets(dy, k, s):
            dx[:, :, rows, columns] += numpy.where(winner == i * k + j, dy, 0)
        return dx

    assert "not the last" in failure(labs.check_maxpool2d_backward, forward, backward)


def test_maxpool_backward_by_the_mask_x_equals_max_is_named():
    pooling = lab_namespace(NOTEBOOKS / "04_pooling_and_relu.py")

    def forward(x, k, s):
        y, _ = pooling["maxpool2d_forward"](x, k, s)
        return y, (x, y, k, s)

    def backward(dy, cache):  # every entry equal to its window's maximum takes the whole gradient
        x, y, k, s = cache
        dx = numpy.zeros_like(x)
        for _, _, rows, columns in window_offsets(dy, k, s):
            dx[:, :, rows, columns] += numpy.where(x[:, :, rows, columns] == y, dy, 0)
        return dx

    assert "a mask x == max gives it to every tied entry" in failure(labs.check_maxpool2d_backward, forward, backward)


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


# -- regressions: the checks blame the right thing -----------------------------------------------

def conv_forward(kernel=lambda weight: weight, pad_mode="constant"):
    """A conv2d_forward built on im2col, with the kernel transformed and the padding mode switchable."""
    from minirnng.layers.im2col import im2col

    def forward(x, weight, bias, stride=1, padding=0):
        o, _, k, _ = weight.shape
        x = numpy.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), mode=pad_mode)
        n, _, height, width = x.shape
        size = ((height - k) // stride + 1, (width - k) // stride + 1)
        y = kernel(weight).reshape(o, -1) @ im2col(x, k, stride, 0) + bias[:, None]
        return y.reshape(n, o, *size), None
    return forward


def test_the_padding_hint_needs_an_output_with_an_interior():
    # an output of width 4 has no entry 2 away from its border: every entry is "near the border"
    assert not labs.only_near_border(2)(numpy.ones((2, 4, 5, 4), dtype=bool))
    assert labs.only_near_border(1)(numpy.pad(numpy.zeros((1, 1, 2, 2), dtype=bool), ((0, 0), (0, 0), (1, 1), (1, 1)),
                                              constant_values=True))
    transposed = failure(labs.check_conv2d_forward, conv_forward(kernel=lambda w: w.transpose(0, 1, 3, 2)))
    assert "you transposed the kernel" in transposed and "check the padding" not in transposed
    # padding with the edge values instead of zeros: only the outputs next to the border are wrong
    assert "check the padding" in failure(labs.check_conv2d_forward, conv_forward(pad_mode="edge"))


def plain_forward(x, W, b):
    h = numpy.zeros_like(x)
    previous = numpy.zeros(x.shape[:-1])
    for t in range(x.shape[-1]):
        h[..., t] = numpy.tanh(x[..., t] + numpy.einsum("cd,ndy->ncy", W, previous) + b[None, :, None])
        previous = h[..., t]
    return h, (h, W)


def plain_backward(dh, cache):
    h, W = cache
    return labs.plain_backward_variant(dh, h, W)


def test_float32_and_integer_answers_are_told_to_use_float64():
    def forward_float32(x, W, b):
        h, cache = plain_forward(x.astype(numpy.float32), W.astype(numpy.float32), b.astype(numpy.float32))
        return h, cache

    message = failure(labs.check_spatial_rnn_forward, forward_float32)
    assert "h has dtype float32, expected float64" in message and "compute in float64" in message

    def forward_cast_back(x, W, b):  # computes in float32, returns float64: passes the comparison at 1e-7
        h, cache = forward_float32(x, W, b)
        return h.astype(numpy.float64), cache

    message = failure(labs.check_spatial_rnn_backward, forward_cast_back, plain_backward)
    assert "only float32 precision" in message and "not the derivative" not in message

    def backward_integer(dh, cache):
        dx, dW, db = plain_backward(dh, cache)
        return dx.astype(int), dW, db

    message = failure(labs.check_spatial_rnn_backward, plain_forward, backward_integer)
    assert "dx has dtype int64, expected float64" in message and "integer array" in message


def test_a_forward_that_changes_its_input_is_told_so():
    def relu_forward(x):
        mask = x > 0
        x[~mask] = 0  # right values, but the caller's x is gone
        return x, mask

    def relu_backward(dy, mask):
        return dy * mask

    message = failure(labs.check_relu, relu_forward, relu_backward)
    assert "changed its input `x` in place" in message and "not the derivative" not in message

    def softmax_forward(logits, target):
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - numpy.log(numpy.exp(logits).sum(axis=1, keepdims=True))
        return float(-numpy.take_along_axis(log_p, target[:, None], axis=1).mean()), (numpy.exp(log_p), target)

    def softmax_backward(dloss, cache):
        p, target = cache
        onehot = numpy.arange(p.shape[1])[None, :, None, None] == target[:, None]
        return dloss * (p - onehot) / (p.size / p.shape[1])

    message = failure(labs.check_softmax_cross_entropy, softmax_forward, softmax_backward)
    assert "changed its input `logits` in place" in message and "not the derivative" not in message
    assert message.count("problem(s)") == 1 and "1 problem(s)" in message  # said once, and nothing else is wrong


def test_jupyter_shows_the_message_and_the_students_traceback_not_the_checks():
    def conv2d_forward(x, weight, bias, stride=1, padding=0):
        raise NotImplementedError

    with pytest.raises(labs.LabCheckError) as caught:
        labs.check_conv2d_forward(conv2d_forward)
    assert caught.value._render_traceback_() == [f"LabCheckError: {caught.value}"]

    def conv2d_forward(x, weight, bias, stride=1, padding=0):  # noqa: F811 -- the student's second try
        return weight @ x, None

    with pytest.raises(labs.LabCheckError) as caught:
        labs.check_conv2d_forward(conv2d_forward)
    lines = caught.value._render_traceback_()
    assert lines[-1] == f"LabCheckError: {caught.value}"
    shown = "\n".join(lines)
    assert "return weight @ x, None" in shown and "ValueError" in shown and labs.__file__ not in shown


def lab_namespace(path):
    """The functions of a lab notebook, defined as the grader defines them."""
    namespace = {"__name__": "__lab__"}
    for number, source in enumerate(labs.code_cells(path)):
        exec(labs.without_check_calls(source, f"<cell {number}>"), namespace)
    return namespace


def lab_08_with(tmp_path, old, new):
    source = (NOTEBOOKS / "08_numpy_to_cuda.py").read_text(encoding="utf-8")
    assert old in source
    (tmp_path / "08_numpy_to_cuda.py").write_text(source.replace(old, new), encoding="utf-8")
    return lab_namespace(tmp_path / "08_numpy_to_cuda.py")


def test_lab_08_grid_hint_only_for_a_grid_too_small(tmp_path):
    every_image = numpy.ones((3, 2, 2, 2), dtype=bool)
    last_images = numpy.zeros((3, 2, 2, 2), dtype=bool)
    last_images[2, 0, 0, 0] = last_images[1, 1] = True  # empty() memory can leave right values among them
    assert not labs.unscanned_images(every_image) and labs.unscanned_images(last_images)

    full = lab_namespace(NOTEBOOKS / "08_numpy_to_cuda.py")
    forward, backward = full["gated_scan_forward_gpu"], full["gated_scan_backward_gpu"]

    def opposite(x, g, W, b, direction):
        other = {"left_to_right": "right_to_left", "right_to_left": "left_to_right",
                 "top_to_bottom": "bottom_to_top", "bottom_to_top": "top_to_bottom"}[direction]
        return forward(x, g, W, b, other)

    message = failure(labs.check_gated_scan_forward_gpu, opposite)
    assert "scan: check the geometry row" in message and "does the grid cover" not in message

    def gradients_in_another_order(dh, cache):
        dx, dg, dW, db = backward(dh, cache)
        return dg, dx, dW, db

    message = failure(labs.check_gated_scan_backward_gpu, forward, gradients_in_another_order)
    assert "return (dx, dg, dW, db) in that order" in message and "grid" not in message

    # one block for any batch: every direction's batch of 70 images gets the hint, left_to_right too
    one_block = lab_08_with(tmp_path, "blocks_for(n * row[0])", "blocks_for(row[0])")
    message = failure(labs.check_gated_scan_forward_gpu, one_block["gated_scan_forward_gpu"])
    blocks = [block for block in message.split("\n\n") if block.startswith("h, ") and "70 images" in block]
    assert len(blocks) == 4 and all("Hint: " in block for block in blocks), message
    # a grid sized by the map's height, not its lines: enough for nearly square maps, not for long ones
    by_height = lab_08_with(tmp_path, "kernel((blocks_for(n * row[0]), 1)", "kernel((blocks_for(n * height), 1)")
    message = failure(labs.check_gated_scan_forward_gpu, by_height["gated_scan_forward_gpu"])
    assert "FAIL  h, top_to_bottom, 64 images of 4x64" in message and "FAIL  h, left" not in message
    assert "nor N * height or N * width" in message, message


def test_a_wrong_forward_stops_before_its_backward_runs():
    def softmax_forward(logits, target):  # returns (cache, loss)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))
        return (numpy.exp(log_p), target), float(-numpy.take_along_axis(log_p, target[:, None], axis=1).mean())

    def softmax_backward(dloss, cache):
        p, target = cache
        return p

    message = failure(labs.check_softmax_cross_entropy, softmax_forward, softmax_backward)
    assert "loss, logits of size ~3: loss is a tuple" in message and "raised" not in message

    def relu_forward(x):  # returns (cache, y)
        return x > 0, numpy.maximum(x, 0)

    message = failure(labs.check_relu, relu_forward, lambda dy, cache: dy * cache)
    assert "y has dtype bool" in message and "multiplied dy by the output" not in message
    assert "skip  dx" in message


def test_lab_08_without_a_compiler_is_not_graded_rather_than_failed(monkeypatch, capsys):
    from minirnng.cuda import reload_kernels

    monkeypatch.setenv("CXX", "no-such-compiler++")
    reload_kernels()  # forget the kernels this process has already compiled
    try:
        points, total, rows = labs.grade(NOTEBOOKS / "08_numpy_to_cuda.py")
        assert labs.main(["grade", str(NOTEBOOKS / "08_numpy_to_cuda.py")]) == labs.EXIT_INCOMPLETE
    finally:
        monkeypatch.undo()
        reload_kernels()
    assert (points, total) == (1, 1), rows
    for check, earned, _, message in rows[1:]:
        assert earned is None and message.startswith("not graded: ") and "C++ compiler" in message, (check, message)
        assert "MINIRNNG_BACKEND" not in message  # the checks always use the emulator
    assert "not graded" in capsys.readouterr().out


def test_more_slips_are_named():
    # the gradients in another order: by their shapes, or by their values where the shapes agree
    def conv_backward(dy, cache):
        x, weight, stride, padding = cache
        layer = labs._reference_conv(x, weight, numpy.zeros(weight.shape[0]), stride, padding)[0]
        layer.zero_grad()
        dx = layer.backward(dy)
        return layer.grads["weight"], dx, layer.grads["bias"]

    def conv_forward_keeping(x, weight, bias, stride=1, padding=0):
        return conv_forward()(x, weight, bias, stride, padding)[0], (x, weight, stride, padding)

    message = failure(labs.check_conv2d_backward, conv_forward_keeping, conv_backward)
    assert "the shapes of (dweight, dx, dbias): return (dx, dweight, dbias) in that order" in message
    assert "crop the padding" not in message and "is W transposed" not in message

    def gated_backward(dh, cache):
        h, g, W, b = cache
        dx, dg, dW, db = labs.gated_backward_variant(dh, h, g, W, b)
        return dx, dW, dg, db

    assert "return (dx, dg, dW, db) in that order" in failure(labs.check_gated_rnn_backward, gated_forward,
                                                              gated_backward)

    # the plain RNN without its bias at the first step
    def plain_forward_no_first_bias(x, W, b):
        return plain_forward(x - numpy.where(numpy.arange(x.shape[-1]) == 0, 1.0, 0.0) * b[None, :, None, None],
                             W, b)

    assert "h_0 = tanh(x_0 + b)" in failure(labs.check_spatial_rnn_forward, plain_forward_no_first_bias)

    # a masked sigmoid backward that divides by the masked count but keeps the unmasked pixels
    def sigmoid_forward(logits, target, mask):
        per_pixel = numpy.maximum(logits, 0) - logits * target + numpy.log1p(numpy.exp(-numpy.abs(logits)))
        p = numpy.exp(-numpy.logaddexp(0, -logits))
        return float(per_pixel[mask].mean()), (p, target, mask.sum())

    def sigmoid_backward(dloss, cache):
        p, target, count = cache
        return dloss * (p - target) / count

    assert "kept the pixels outside the mask" in failure(labs.check_sigmoid_cross_entropy, sigmoid_forward,
                                                         sigmoid_backward)


def test_small_messages_read_well(tmp_path, capsys):
    def softmax_forward(logits, target):  # twice the loss
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))
        return 2 * float(-numpy.take_along_axis(log_p, target[:, None], axis=1).mean()), None

    message = failure(labs.check_softmax_cross_entropy, softmax_forward, lambda dloss, cache: None)
    assert "loss is wrong: yours" in message and "Worst: []" not in message

    def gated_forward_swapped(x, g, W, b):
        h, cache = gated_forward(x, g, W, b)
        return cache, h

    assert "h: h:" not in failure(labs.check_gated_rnn_forward, gated_forward_swapped)

    broken = tmp_path / "07_gated_rnn.ipynb"
    broken.write_text('{"nbformat": 4}', encoding="utf-8")
    assert labs.main(["grade", str(broken)]) == 1
    assert f"{broken} is not a notebook" in capsys.readouterr().out


# -- the grader against what students' notebooks do ------------------------------------------------

def test_each_notebook_is_graded_in_its_own_process(tmp_path, monkeypatch, capsys):
    """One notebook's code cannot stop the batch (sys.exit, os._exit), loop for ever, or change the
    grades of the others (a check replaced, NumPy patched, the working folder changed)."""
    solution = (NOTEBOOKS / "04_pooling_and_relu.py").read_text(encoding="utf-8")
    unfilled = NOTEBOOKS / "labs" / "04_pooling_and_relu.ipynb"
    notebooks = {"exits": "import sys\nsys.exit(0)\n", "ends": "import os\nos._exit(3)\n",
                 "patches": "import os, numpy\nfrom minirnng import labs as grader\nos.chdir('/')\n"
                            "grader.check_relu = grader.check_maxpool2d_forward = lambda *a: None\n"
                            "numpy.max = lambda *a, **k: 0.0\n",
                 "loops": "while True:\n    pass\n"}
    (tmp_path / "submissions").mkdir()
    for name, code in notebooks.items():
        (tmp_path / "submissions" / f"04_pooling_and_relu-{name}.py").write_text(f"{solution}\n# %%\n{code}",
                                                                                  encoding="utf-8")
    paths = [str(tmp_path / "submissions" / f"04_pooling_and_relu-{name}.py") for name in notebooks]
    monkeypatch.chdir(tmp_path)
    assert labs.main(["grade", *paths[:3], str(unfilled), "--csv", "grades.csv"]) == 1
    out = capsys.readouterr().out
    assert f"{paths[0]} (lab 04_pooling_and_relu)\n  note: code cell" in out and "SystemExit" in out
    assert f"{paths[1]}: not graded: its code ended the grader's process (exit status 3" in out
    scores = [line.strip() for line in out.splitlines() if line.strip().startswith("score:")]
    assert scores == ["score: 4/4", "score: 4/4", "score: 0/4"], out  # exits, patches (solved), unfilled
    assert (tmp_path / "grades.csv").is_file()  # where the grader was started, whatever a notebook did
    assert labs.main(["grade", paths[3], "--timeout", "3"]) == 1
    assert f"{paths[3]}: not graded: it ran for more than 3 s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        labs.main(["grade", paths[0], "--timeout", "0"])


def test_magics_in_a_cell_do_not_hide_its_functions(tmp_path):
    source = (NOTEBOOKS / "04_pooling_and_relu.py").read_text(encoding="utf-8")
    source = source.replace("def relu_forward(x):", "%time warm_up = 1\n\n\ndef relu_forward(x):", 1)
    source = source.replace("def maxpool2d_backward(dy, cache):",
                            "!echo shell\n\n\ndef maxpool2d_backward(dy, cache):", 1)
    (tmp_path / "04_pooling_and_relu.py").write_text(source + "\n# %%\n%%time\nassert warm_up == 1\n", encoding="utf-8")
    points, total, rows = labs.grade(tmp_path / "04_pooling_and_relu.py")
    assert points == total, rows


def test_a_backward_that_changes_its_upstream_gradient_is_told_so():
    def relu_forward(x):
        return numpy.maximum(x, 0.0), x > 0

    def relu_backward_in_place(dy, cache):
        dy[~cache] = 0.0
        return dy

    message = failure(labs.check_relu, relu_forward, relu_backward_in_place)
    assert "changed its upstream gradient in place" in message


def test_a_right_answer_in_float32_gets_the_dtype_hint_not_a_mistakes():
    namespace = {}
    for cell in labs.code_cells(str(NOTEBOOKS / "04_pooling_and_relu.py")):
        if cell.lstrip().startswith(("import", "def")):  # the imports and the solutions, not the plots
            exec(labs.without_check_calls(cell, "04"), namespace)

    def backward32(dy, cache):
        return namespace["maxpool2d_backward"](dy, cache).astype(numpy.float32)

    message = failure(labs.check_maxpool2d_backward, namespace["maxpool2d_forward"], backward32)
    assert "dtype float32" in message and "tie" not in labs.failure_summary(message), labs.failure_summary(message)


def test_direction_strides_must_be_integers():
    def strides_with_none(direction, height, width):
        return (height, width, width, 1, None)

    def strides_as_floats(direction, height, width):
        return tuple(float(value) + 0.5 for value in labs._strides(direction, height, width))

    assert "first is None, not an integer" in failure(labs.check_direction_strides, strides_with_none)
    assert "not an integer" in failure(labs.check_direction_strides, strides_as_floats)


def test_checks_name_the_real_mistake_not_a_near_miss(tmp_path):
    pooling = lab_namespace(NOTEBOOKS / "04_pooling_and_relu.py")
    losses = lab_namespace(NOTEBOOKS / "05_losses.py")
    gated = lab_namespace(NOTEBOOKS / "07_gated_rnn.py")
    softmax_forward, softmax_backward = losses["softmax_cross_entropy_forward"], losses["softmax_cross_entropy_backward"]

    # dg = delta (the message factor forgotten) equals dx here: a wrong dg, not gradients in another order
    def dg_without_the_message(dh, cache):
        dx, _, dW, db = gated["gated_rnn_backward"](dh, cache)
        return dx, dx.copy(), dW, db

    message = failure(labs.check_gated_rnn_backward, gated["gated_rnn_forward"], dg_without_the_message)
    assert "another order" not in message and "dg is wrong" in message, message

    # any two losses are a multiple of each other: no "missing constant" for a wrong target
    def target_off_by_one(logits, target):
        return softmax_forward(logits, (target + 1) % logits.shape[1])

    message = failure(labs.check_softmax_cross_entropy, target_off_by_one, softmax_backward)
    assert "times the right answer" not in message, message

    # the largest logit subtracted, then log(p) of a p that underflowed: not an overflow of exp()
    def log_of_the_probability(logits, target):
        shifted = logits - logits.max(axis=1, keepdims=True)
        p = numpy.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        return float(numpy.mean(-numpy.log(numpy.take_along_axis(p, target[:, None], axis=1)))), (p, target)

    message = failure(labs.check_softmax_cross_entropy, log_of_the_probability, softmax_backward)
    assert "underflowed to 0 went into log()" in message and "exp() overflows" not in message, message

    # a backward that returns a pair, as the forward does: named, not a traceback from the check
    def pooling_pair(dy, cache):
        return pooling["maxpool2d_backward"](dy, cache), None

    message = failure(labs.check_maxpool2d_backward, pooling["maxpool2d_forward"], pooling_pair)
    assert "dx is a tuple" in message, message

    # the launches written and a helper still a stub: the helper is what to fill in
    scan = lab_namespace(NOTEBOOKS / "08_numpy_to_cuda.py")

    def direction_strides(direction, height, width):
        raise NotImplementedError

    scan["direction_strides"] = direction_strides
    message = failure(labs.check_gated_scan_forward_gpu, scan["gated_scan_forward_gpu"])
    assert "direction_strides is not implemented yet (called by gated_scan_forward_gpu)" in message, message


def test_a_scan_run_backwards_and_a_delta_without_the_later_steps_are_named():
    def flipped(forward):  # the scan run from the last step to the first
        def run(x, *rest):
            h, cache = forward(x[..., ::-1], *(a[..., ::-1] if a.shape == x.shape else a for a in rest))
            return h[..., ::-1], cache
        return run

    plain = lab_namespace(NOTEBOOKS / "06_spatial_rnn.py")
    gated = lab_namespace(NOTEBOOKS / "07_gated_rnn.py")
    for check, forward in ((labs.check_spatial_rnn_forward, plain["spatial_rnn_forward"]),
                           (labs.check_gated_rnn_forward, gated["gated_rnn_forward"])):
        assert "the scan runs left to right along the last axis" in failure(check, flipped(forward))

    def only_the_local_gradient(dh, cache):  # delta_t = (1 - h_t^2) * dh_t, nothing from step t + 1
        h, W = cache
        delta = (1 - h ** 2) * dh
        previous = numpy.concatenate([numpy.zeros(h.shape[:-1] + (1,)), h[..., :-1]], axis=-1)
        return delta, numpy.einsum("ncyt,ndyt->cd", delta, previous), delta.sum(axis=(0, 2, 3))

    message = failure(labs.check_spatial_rnn_backward, plain["spatial_rnn_forward"], only_the_local_gradient)
    assert "not (1 - h_t^2) * xi_t" in message, message
