"""Conv2d and ConvTranspose2d: finite differences, naive against fast, bad input."""

import os

import numpy
import pytest

from minirnng.gradcheck import check_layer
from minirnng.layers import Conv2d, ConvTranspose2d, naive

# (in, out, kernel, stride, padding, height, width): odd sizes, strides that leave a remainder.
CONFIGS = [
    (1, 1, 1, 1, 0, 3, 4),
    (3, 4, 3, 1, 1, 7, 6),
    (2, 3, 5, 2, 2, 9, 8),
    (4, 2, 4, 2, 1, 6, 7),
    (3, 5, 3, 3, 0, 10, 11),
    (2, 2, 2, 1, 3, 6, 7),  # padding beyond the kernel: the transposed convolution's output is 1 x 2
]


@pytest.mark.parametrize("layer_class", [Conv2d, ConvTranspose2d])
@pytest.mark.parametrize("config", CONFIGS)
def test_finite_differences(layer_class, config, rng):
    c_in, c_out, k, s, p, height, width = config
    layer = layer_class(c_in, c_out, k, stride=s, padding=p, rng=rng, dtype=numpy.float64)
    x = rng.standard_normal((2, c_in, height, width))
    report = check_layer(layer, x, rng=rng)
    assert report.max_error < 1e-7, str(report)
    assert {row.name for row in report.rows} == {"x", "weight", "bias"}


@pytest.mark.parametrize("dtype, tolerance", [(numpy.float32, 1e-5), (numpy.float64, 1e-12)])
@pytest.mark.parametrize("layer_name", ["Conv2d", "ConvTranspose2d"])
@pytest.mark.parametrize("config", CONFIGS)
def test_fast_matches_naive(layer_name, config, dtype, tolerance, rng):
    c_in, c_out, k, s, p, height, width = config
    fast = getattr(__import__("minirnng.layers", fromlist=[layer_name]), layer_name)(
        c_in, c_out, k, stride=s, padding=p, rng=1, dtype=dtype)
    slow = getattr(naive, layer_name)(c_in, c_out, k, stride=s, padding=p, rng=1, dtype=dtype)
    # a non-contiguous input: every other column of a wider array
    x = rng.standard_normal((3, c_in, height, 2 * width)).astype(dtype)[:, :, :, ::2]
    assert not x.flags.c_contiguous
    y_fast, y_slow = fast.forward(x), slow.forward(x)
    assert y_fast.dtype == dtype and y_fast.shape == y_slow.shape
    scale = numpy.abs(y_slow).max()
    numpy.testing.assert_allclose(y_fast, y_slow, atol=tolerance * scale, rtol=0)
    dy = rng.standard_normal(y_fast.shape).astype(dtype)
    dy_before = dy.copy()
    dx_fast, dx_slow = fast.backward(dy), slow.backward(dy)
    numpy.testing.assert_array_equal(dy, dy_before)  # backward never modifies its input gradient
    assert dx_fast.dtype == dtype and dx_fast.shape == x.shape
    for got, want in [(dx_fast, dx_slow), (fast.grads["weight"], slow.grads["weight"]),
                      (fast.grads["bias"], slow.grads["bias"])]:
        numpy.testing.assert_allclose(got, want, atol=tolerance * numpy.abs(want).max(), rtol=0)


# (in, out, kernel, stride, padding, height, width): the flat grid with and without a wider grid
# than the output, and rows too wide for it (the classic unfolding)
CHUNKED_CONFIGS = [(3, 4, 3, 1, 1, 7, 6), (2, 3, 5, 2, 2, 9, 8), (4, 2, 4, 2, 1, 6, 7), (2, 3, 3, 1, 1, 3, 71)]


def cut_into_uneven_chunks(monkeypatch, image_shape, k, s, p, dtype, batch_size=5):
    """Make the NumPy path cut a batch of ``image_shape`` images (the images it unfolds) into
    chunks of 2, 2 and 1, as a real batch is cut into many; the tests' own batches fit in one."""
    from minirnng.layers import conv
    from minirnng.layers.im2col import ImageColumns

    monkeypatch.setattr(conv, "COLUMN_CHUNK_BYTES", 2 * ImageColumns.bytes_per_image(image_shape, k, s, p, dtype))
    chunks = conv.column_chunks(image_shape, k, s, p, dtype, batch_size)[0]
    assert [chunk.stop - chunk.start for chunk in chunks] == [2, 2, 1]


@pytest.mark.parametrize("dtype, tolerance", [(numpy.float32, 1e-5), (numpy.float64, 1e-12)])
@pytest.mark.parametrize("layer_name", ["Conv2d", "ConvTranspose2d"])
@pytest.mark.parametrize("config", CHUNKED_CONFIGS)
def test_fast_matches_naive_on_a_batch_cut_into_uneven_chunks(layer_name, config, dtype, tolerance, monkeypatch, rng):
    """Forward (and Conv2d's infer, with and without ReLU), dx, dW and db of a batch of 5 that the
    NumPy path convolves in chunks of 2, 2 and 1: every image, the short last chunk included."""
    c_in, c_out, k, s, p, height, width = config
    fast = getattr(__import__("minirnng.layers", fromlist=[layer_name]), layer_name)(
        c_in, c_out, k, stride=s, padding=p, rng=1, dtype=dtype)
    slow = getattr(naive, layer_name)(c_in, c_out, k, stride=s, padding=p, rng=1, dtype=dtype)
    x = rng.standard_normal((5, c_in, height, width)).astype(dtype)
    unfolded = (c_in, height, width) if layer_name == "Conv2d" else fast.output_shape(x.shape)[1:]
    cut_into_uneven_chunks(monkeypatch, unfolded, k, s, p, dtype)
    y_slow = slow.forward(x)
    scale = numpy.abs(y_slow).max()
    numpy.testing.assert_allclose(fast.forward(x), y_slow, atol=tolerance * scale, rtol=0)
    if layer_name == "Conv2d":  # the inference paths: a strided view of the grid, and a fused ReLU
        numpy.testing.assert_allclose(fast.infer(x), y_slow, atol=tolerance * scale, rtol=0)
        numpy.testing.assert_allclose(fast.infer(x, relu=True), numpy.maximum(y_slow, 0), atol=tolerance * scale,
                                      rtol=0)
        fast.forward(x)
    dy = rng.standard_normal(y_slow.shape).astype(dtype)
    for got, want in [(fast.backward(dy), slow.backward(dy)), (fast.grads["weight"], slow.grads["weight"]),
                      (fast.grads["bias"], slow.grads["bias"])]:
        numpy.testing.assert_allclose(got, want, atol=tolerance * numpy.abs(want).max(), rtol=0)
        for image in range(len(x)) if got.shape == x.shape else ():  # no image's gradient left out
            assert numpy.abs(got[image]).max() > 0


def test_output_size_formulas():
    x = numpy.zeros((1, 2, 13, 10), dtype=numpy.float32)
    assert Conv2d(2, 3, 3, stride=2, padding=1).forward(x).shape == (1, 3, 7, 5)
    assert ConvTranspose2d(2, 3, 4, stride=2, padding=1).forward(x).shape == (1, 3, 26, 20)


def test_params_are_live_and_grads_accumulate(rng):
    layer = Conv2d(2, 3, 3, padding=1, rng=0, dtype=numpy.float64)
    x = rng.standard_normal((1, 2, 5, 5))
    layer.params["weight"][...] = 0
    layer.params["bias"][...] = 2.0
    numpy.testing.assert_array_equal(layer.forward(x), 2.0)
    dy = rng.standard_normal((1, 3, 5, 5))
    layer.backward(dy)
    once = layer.grads["weight"].copy()
    layer.backward(dy)
    numpy.testing.assert_allclose(layer.grads["weight"], 2 * once)
    layer.zero_grad()
    assert not layer.grads["weight"].any() and not layer.grads["bias"].any()


def test_rng_seed_and_generator_agree():
    a = Conv2d(3, 4, 3, rng=7).params["weight"]
    b = Conv2d(3, 4, 3, rng=numpy.random.default_rng(7)).params["weight"]
    numpy.testing.assert_array_equal(a, b)
    assert a.dtype == numpy.float32


@pytest.mark.parametrize("layer_class", [Conv2d, ConvTranspose2d])
def test_bad_input_names_the_layer(layer_class):
    layer = layer_class(3, 4, 3)
    with pytest.raises(ValueError, match=rf"{layer_class.__name__}.*4 dimensions.*\(3, 8, 8\)"):
        layer.forward(numpy.zeros((3, 8, 8), dtype=numpy.float32))
    with pytest.raises(ValueError, match=rf"{layer_class.__name__}.*3 channels.*\(1, 2, 8, 8\)"):
        layer.forward(numpy.zeros((1, 2, 8, 8), dtype=numpy.float32))
    with pytest.raises(TypeError, match=rf"{layer_class.__name__}.*float64.*float32"):
        layer.forward(numpy.zeros((1, 3, 8, 8)))
    with pytest.raises(TypeError, match=rf"{layer_class.__name__}.*int64"):
        layer.forward(numpy.zeros((1, 3, 8, 8), dtype=numpy.int64))
    with pytest.raises(TypeError, match=rf"{layer_class.__name__}.*list"):
        layer.forward([[1.0]])
    layer.forward(numpy.zeros((1, 3, 8, 8), dtype=numpy.float32))
    with pytest.raises(ValueError, match=rf"{layer_class.__name__}.*grad_output.*shape"):
        layer.backward(numpy.zeros((1, 4, 3, 3), dtype=numpy.float32))


def test_too_small_input_and_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"Conv2d.*2x2.*too small.*5x5"):
        Conv2d(1, 1, 5).forward(numpy.zeros((1, 1, 2, 2), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"ConvTranspose2d.*gives no output"):
        ConvTranspose2d(1, 1, 1, padding=2).forward(numpy.zeros((1, 1, 2, 2), dtype=numpy.float32))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        Conv2d(1, 1, 0)
    with pytest.raises(TypeError, match="stride must be an integer"):
        Conv2d(1, 1, 3, stride=1.5)
    with pytest.raises(TypeError, match="unsupported dtype int32"):
        Conv2d(1, 1, 3, dtype=numpy.int32)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        Conv2d(1, 1, 3).backward(numpy.zeros((1, 1, 1, 1), dtype=numpy.float32))


@pytest.mark.parametrize("layer_name", ["Conv2d", "ConvTranspose2d"])
def test_wide_rows_take_the_same_path_as_the_naive_loops(layer_name, rng):
    """Rows wider than the column layout's flat-grid limit (64 pixels) use the classic unfolding."""
    from minirnng.layers.im2col import FLAT_GRID_MAX_WIDTH

    width = FLAT_GRID_MAX_WIDTH + 7
    fast = getattr(__import__("minirnng.layers", fromlist=[layer_name]), layer_name)(
        2, 3, 3, padding=1, rng=1, dtype=numpy.float64)
    slow = getattr(naive, layer_name)(2, 3, 3, padding=1, rng=1, dtype=numpy.float64)
    x = rng.standard_normal((1, 2, 3, width))
    numpy.testing.assert_allclose(fast.forward(x), slow.forward(x), rtol=0, atol=1e-12)
    dy = rng.standard_normal(fast.output_shape_seen)
    numpy.testing.assert_allclose(fast.backward(dy), slow.backward(dy), rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(fast.grads["weight"], slow.grads["weight"], rtol=0, atol=1e-11)


def test_empty_batches_and_impossible_dtype_hints_are_named():
    from minirnng.layers import MaxPool2d

    for layer in (Conv2d(3, 4, 3, rng=0), ConvTranspose2d(3, 4, 2, stride=2, rng=0), MaxPool2d(2)):
        with pytest.raises(ValueError, match=r"input x is empty, shape \(0, 3, 8, 8\)"):
            layer.forward(numpy.zeros((0, 3, 8, 8), numpy.float32))
    with pytest.raises(TypeError, match="works in float32; cast the input to float32$"):
        Conv2d(3, 4, 3, rng=0).forward(numpy.zeros((1, 3, 8, 8), numpy.int32))
    with pytest.raises(TypeError, match="build the layer with dtype=numpy.float64"):
        Conv2d(3, 4, 3, rng=0).forward(numpy.zeros((1, 3, 8, 8)))


# -- the products in column blocks (minirnng.layers.products) ----------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(numpy.float32, 1e-5), (numpy.float64, 1e-12)])
@pytest.mark.parametrize("layer_name", ["Conv2d", "ConvTranspose2d"])
@pytest.mark.parametrize("config", CONFIGS + CHUNKED_CONFIGS[-1:])
def test_fast_matches_naive_with_every_product_in_column_blocks(layer_name, config, dtype, tolerance, monkeypatch,
                                                                rng):
    """Forward, dx, dW and db with the products that the layers run through ``matmul_blocks`` (the
    forward passes', ConvTranspose2d's input gradient) cut into blocks of 3 columns and a remainder,
    on any machine, as OpenBLAS's AVX-512 cores have them cut (blocks of 64-512 there)."""
    from minirnng.layers import products

    widths = []
    monkeypatch.setattr(products, "block_width",
                        lambda rows, depth, columns, dtype: widths.append(columns) or (3 if columns > 3 else None))
    c_in, c_out, k, s, p, height, width = config
    fast = getattr(__import__("minirnng.layers", fromlist=[layer_name]), layer_name)(
        c_in, c_out, k, stride=s, padding=p, rng=1, dtype=dtype)
    slow = getattr(naive, layer_name)(c_in, c_out, k, stride=s, padding=p, rng=1, dtype=dtype)
    x = rng.standard_normal((3, c_in, height, width)).astype(dtype)
    y_slow = slow.forward(x)
    numpy.testing.assert_allclose(fast.forward(x), y_slow, atol=tolerance * numpy.abs(y_slow).max(), rtol=0)
    dy = rng.standard_normal(y_slow.shape).astype(dtype)
    for got, want in [(fast.backward(dy), slow.backward(dy)), (fast.grads["weight"], slow.grads["weight"]),
                      (fast.grads["bias"], slow.grads["bias"])]:
        numpy.testing.assert_allclose(got, want, atol=tolerance * numpy.abs(want).max(), rtol=0)
    assert any(columns > 3 for columns in widths)  # some product ran in blocks


def test_matmul_blocks_is_matmul_on_views_with_a_remainder(monkeypatch, rng):
    from minirnng.layers import products

    monkeypatch.setattr(products, "BLOCKS_PAY", True)
    monkeypatch.setattr(products, "SMALL_PRODUCT_MULTIPLY_ADDS", 5 * 7 * 40)  # blocks of 32 columns
    a = rng.standard_normal((7, 5)).astype(numpy.float32)
    buffer = rng.standard_normal((3, 5, 120)).astype(numpy.float32)
    b = buffer[:2, :, 10:110]  # a view, 100 columns: three blocks of 32 and a remainder of 4
    assert products.block_width(7, 5, 100, numpy.float32) == 32
    out_buffer = numpy.full((2, 7, 130), numpy.nan, dtype=numpy.float32)
    out = out_buffer[:, :, 20:120]
    want = numpy.matmul(a.astype(numpy.float64), b)
    assert products.matmul_blocks(a, b, out=out) is out
    numpy.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * numpy.abs(want).max())
    assert numpy.isnan(out_buffer[:, :, :20]).all() and numpy.isnan(out_buffer[:, :, 120:]).all()
    numpy.testing.assert_allclose(products.matmul_blocks(a.T.copy().T, b), want, rtol=0,
                                  atol=1e-5 * numpy.abs(want).max())  # a transposed view, no out


def test_block_width_where_blocks_pay_and_where_not(monkeypatch):
    from minirnng.layers import products

    monkeypatch.setattr(products, "BLOCKS_PAY", True)
    assert products.block_width(16, 76, 16384, numpy.float32) == 512  # conv1: 16 * 76 * 512 <= 10**6
    assert products.block_width(32, 145, 4224, numpy.float32) == 128  # conv3
    assert products.block_width(16, 76, 16384, numpy.float64) is None  # float64: no gain measured
    assert products.block_width(16, 76, 400, numpy.float32) is None  # one block would be the whole product
    assert products.block_width(1000, 1000, 10 ** 5, numpy.float32) is None  # too large for blocks of 32
    monkeypatch.setattr(products, "BLOCKS_PAY", False)
    assert products.block_width(16, 76, 16384, numpy.float32) is None


def test_openblas_core_is_numpys_whatever_else_is_loaded():
    """The kernels of NumPy's OpenBLAS, also where another wheel's OpenBLAS is loaded with other
    kernels (here SciPy's, told ``OPENBLAS_CORETYPE=Haswell``; in the full test run OpenCV's, whose
    OpenBLAS 0.3.15 said "Zen" where NumPy's says "SkylakeX")."""
    import subprocess
    import sys

    from minirnng.layers import products

    core = products.openblas_core()
    assert core is None or (isinstance(core, str) and core)
    script = "from minirnng.layers import products; print(products.openblas_core(), products.BLOCKS_PAY)"
    environment = {**os.environ, "MINIRNNG_PRODUCT_BLOCKS": "auto"}
    alone, after_scipy = (subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True,
                                         check=True, env=environment).stdout
                          for prelude in ("", "import numpy, os; os.environ['OPENBLAS_CORETYPE'] = 'Haswell'; "
                                              "import scipy.linalg; "))
    expected_blocks = (core or "").lower() in products.CORES_WITH_SMALL_KERNELS
    assert alone == after_scipy == f"{core} {expected_blocks}\n"


def test_the_environment_turns_blocks_on_and_off_and_a_bad_value_is_named():
    import subprocess
    import sys

    from minirnng.layers import products

    assert products.blocks_pay("auto") == products.blocks_pay("")
    with pytest.raises(ValueError, match="MINIRNNG_PRODUCT_BLOCKS='Yes' is not on, off or auto"):
        products.blocks_pay("Yes")
    script = "from minirnng.layers import products; print(products.BLOCKS_PAY)"
    for value, expected in [("on", "True"), (" OFF ", "False"), ("Yes", str(products.blocks_pay("auto")))]:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "MINIRNNG_PRODUCT_BLOCKS": value})
        assert run.stdout == expected + "\n"
        # a value it cannot read is named in a warning and taken as auto, not a failure to load
        assert ("MINIRNNG_PRODUCT_BLOCKS='Yes' is not on, off or auto" in run.stderr) == (value == "Yes")


def test_only_numpys_openblas_is_read_among_the_loaded_libraries():
    from minirnng.layers import products

    lines = ["7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0\n",
             "7f10-7f20 r-xp 0 08:01 2 /venv/site-packages/opencv_python_headless.libs/libopenblasp-r0.so\n",
             "7f20-7f30 r-xp 0 08:01 3 /venv/site-packages/scipy.libs/libscipy_openblas-6cdc.so\n",
             "7f30-7f40 r-xp 0 08:01 4 /home/a user/conda/lib/libopenblas.so\n",
             "7f40-7f50 rw-p 0 00:00 0 [heap]\n", "7f50-7f60 r-xp 0 08:01 5 /opt/openblas-notes/libm.so\n"]
    assert products.loaded_openblas_paths(lines) == ["/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
                                                     "/home/a user/conda/lib/libopenblas.so"]


def test_an_out_of_the_wrong_shape_gets_numpys_error_not_a_write_beside_it(monkeypatch, rng):
    from minirnng.layers import products

    monkeypatch.setattr(products, "block_width", lambda rows, depth, columns, dtype: 4)
    a, b = rng.standard_normal((3, 2)).astype(numpy.float32), rng.standard_normal((1, 2, 20)).astype(numpy.float32)
    buffer = numpy.zeros((1, 3, 24), dtype=numpy.float32)
    for out in (buffer[:, :, :16], buffer):  # narrower and wider than the product
        with pytest.raises(ValueError, match="mismatch"):
            products.matmul_blocks(a, b, out=out)
    assert not buffer.any()
