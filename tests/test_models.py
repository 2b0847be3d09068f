"""Stage-1 models: shapes, whole-model finite differences, predict, input checks, checkpoints, the CRF."""

import json
import os
import re
import zipfile

import numpy
import pytest

from conftest import KINK_MARGIN, kink_margins
from minirnng.gradcheck import check_model
from minirnng.models import (ARCHITECTURES, CNNCRF, CNNS, RNNG, CheckpointError, CNNDeep, DenseCRF, PlainRNN,
                             load_arrays, load_model)
from minirnng.models.stage2 import EyeBrowNet, load_stage2_model

MODELS = [RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF]


@pytest.mark.parametrize("model_class", MODELS)
def test_output_shapes_and_parameter_names(model_class, rng):
    model = model_class(n_classes=4, rng=0)
    outputs = model.forward(rng.standard_normal((2, 3, 24, 16)).astype(numpy.float32))
    assert outputs["logits"].shape == (2, 4, 24, 16)
    assert outputs["coarse"].shape == (2, 4, 12, 8)
    assert outputs["edge"].shape == (2, 1, 12, 8)
    assert all(value.dtype == numpy.float32 for value in outputs.values())
    names = set(model.params())
    assert {"conv1.weight", "deconv6.bias", "conv8.weight", "deconv9.weight", "coarse.bias", "edge.weight"} <= names
    assert model.params()["deconv6.weight"].shape == (32, 16, 4, 4)
    if model_class is RNNG:
        assert {f"rnn.{d}.{p}" for d in ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
                for p in "Wb"} <= names
    assert set(model.grads()) == names


@pytest.mark.parametrize("model_class", [RNNG, CNNS, CNNDeep, PlainRNN])
def test_whole_model_finite_differences(model_class, rng):
    model = model_class(n_classes=3, rng=1, dtype=numpy.float64)
    model.randomize_recurrence(rng)
    images = rng.standard_normal((2, 3, 12, 8))
    with kink_margins() as margins:
        model.forward(images)
    assert min(margins.values()) > KINK_MARGIN, margins  # no ReLU, pooling window or merge near a kink
    report = check_model(model, images, rng=rng, max_entries=12)
    assert len(report.rows) == 1 + len(model.params())
    assert report.max_error < 1e-6, str(report)


def test_backward_with_missing_outputs_and_without_the_image_gradient(rng):
    model = RNNG(rng=0, dtype=numpy.float64)
    images = rng.standard_normal((1, 3, 8, 8))
    outputs = model.forward(images)
    dedge = rng.standard_normal(outputs["edge"].shape)
    model.zero_grad()
    dimages = model.backward({"edge": dedge})
    assert dimages.shape == images.shape
    assert not model.grads()["conv8.weight"].any()  # the logits head got no gradient
    assert model.grads()["edge.weight"].any() and model.grads()["conv1.weight"].any()
    before = model.grads()["conv1.weight"].copy()
    model.zero_grad()
    assert model.backward({"edge": dedge}, input_gradient=False) is None
    numpy.testing.assert_allclose(model.grads()["conv1.weight"], before)
    with pytest.raises(ValueError, match="unknown output names"):
        model.backward({"segmentation": dedge})
    with pytest.raises(ValueError, match="gradient of 'edge' must have shape"):
        model.backward({"edge": dedge[:, :, :2]})


def test_predict_returns_labels(rng):
    model = RNNG(n_classes=3, rng=0)
    labels = model.predict(rng.standard_normal((3, 3, 16, 16)).astype(numpy.float32))
    assert labels.shape == (3, 16, 16) and labels.dtype.kind == "i"
    assert labels.min() >= 0 and labels.max() < 3


@pytest.mark.parametrize("shape", [(3, 3, 24, 16), (2, 3, 128, 128)])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("model_class", [RNNG, CNNS, CNNDeep, PlainRNN])
def test_infer_gives_exactly_the_logits_of_forward(model_class, dtype, shape, rng):
    # infer fuses ReLUs into the convolutions, pools without recording winners and skips the
    # coarse and edge heads: the same numbers, bit for bit, on the grid of small and of wide rows
    model = model_class(n_classes=4, rng=2, dtype=dtype)
    model.randomize_recurrence(3)
    images = rng.standard_normal(shape).astype(dtype)
    logits = model.forward(images)["logits"]
    numpy.testing.assert_array_equal(model.infer(images), logits)
    numpy.testing.assert_array_equal(model.predict(images), logits.argmax(axis=1))


def test_constrain_applies_the_stability_rule():
    model = RNNG(rng=0)
    model.params()["rnn.top_to_bottom.W"][...] = 3.0
    model.constrain()
    assert numpy.abs(model.params()["rnn.top_to_bottom.W"]).sum(axis=1).max() == pytest.approx(1.0)


def test_gate_bias_opens_the_gate_at_the_start():
    model = RNNG(rng=0, gate_bias=3.0)
    assert (model.params()["deconv6.bias"][8:] == 3.0).all()


def test_bad_images_are_clear_errors():
    model = RNNG(rng=0)
    with pytest.raises(ValueError, match=r"multiples of 4, got 10x12"):
        model.forward(numpy.zeros((1, 3, 10, 12), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(1, 1, 8, 8\)"):
        model.forward(numpy.zeros((1, 1, 8, 8), dtype=numpy.float32))
    with pytest.raises(TypeError, match="floating point.*uint8.*normalize"):
        model.forward(numpy.zeros((1, 3, 8, 8), dtype=numpy.uint8))
    assert model.forward(numpy.zeros((1, 3, 8, 8)))["logits"].dtype == numpy.float32  # float64 is cast


@pytest.mark.parametrize("model_class", MODELS)
def test_checkpoint_round_trip(model_class, tmp_path, rng):
    model = model_class(n_classes=3, rng=3, gate_bias=1.5)
    model.classes = ["background", "skin", "hair"]
    path = tmp_path / "model.npz"
    model.save(path, note="test")
    assert os.listdir(tmp_path) == ["model.npz"]  # no temporary file left behind
    loaded = model_class.load(path)
    assert type(loaded) is model_class and loaded.classes == model.classes and loaded.gate_bias == 1.5
    assert loaded.checkpoint_header["note"] == "test"
    images = rng.standard_normal((1, 3, 16, 16)).astype(numpy.float32)
    numpy.testing.assert_array_equal(loaded.forward(images)["logits"], model.forward(images)["logits"])
    arrays = load_arrays(path)
    assert set(arrays) == set(model.params())  # exactly a state_dict: loads into a PyTorch twin by name


def test_checkpoint_errors(tmp_path):
    path = tmp_path / "model.npz"
    RNNG(rng=0).save(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="holds a 'rnng' model, not 'cnn-s'"):
        CNNS.load(path)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(truncated)
    # damaged bytes inside the archive: zipfile and zlib raise errors of their own (an unknown
    # compression method, a deflate stream that does not decode), each still a CheckpointError
    damaged = bytearray(path.read_bytes())
    entry = damaged.index(b"PK\x01\x02")  # the central directory's first record
    damaged[entry + 10:entry + 12] = (99).to_bytes(2, "little")  # its compression method
    (tmp_path / "method.npz").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="method.npz' is corrupt or truncated"):
        load_model(tmp_path / "method.npz")
    with numpy.load(path) as archive:
        numpy.savez_compressed(tmp_path / "compressed.npz", **{name: archive[name] for name in archive.files})
    compressed = (tmp_path / "compressed.npz").read_bytes()
    for position in range(40, len(compressed), max(1, len(compressed) // 300)):
        flipped = bytearray(compressed)
        flipped[position] ^= 0x55
        (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
        try:
            load_model(tmp_path / "flipped.npz")
        except CheckpointError:
            pass  # anything else escapes and fails the test
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.npz' is not a minirnng checkpoint: the file is not a .npz"):
        load_model(garbage)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        load_model(empty)
    bare_array = tmp_path / "array.npz"
    with open(bare_array, "wb") as stream:
        numpy.save(stream, numpy.zeros(3))
    with pytest.raises(CheckpointError, match="the file is a single .npy array"):
        load_model(bare_array)
    plain = tmp_path / "plain.npz"
    numpy.savez(plain, weights=numpy.zeros(3))
    with pytest.raises(CheckpointError, match="not a minirnng checkpoint"):
        load_model(plain)
    model = RNNG(rng=0)
    with pytest.raises(ValueError, match=r"conv1.weight has shape \(2, 2\)"):
        model.load_params({**{k: v for k, v in model.params().items()}, "conv1.weight": numpy.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"missing \['edge.bias'\]"):
        model.load_params({k: v for k, v in model.params().items() if k != "edge.bias"})


def edited_checkpoint(source, target, header=None, raw=None, **arrays):
    """A copy of the checkpoint ``source`` as a hand-edited file: the JSON ``header`` (a function
    of the saved one) and some ``arrays`` replaced, and ``raw`` (name -> bytes) stored as members
    that are not .npy files."""
    with numpy.load(source) as archive:
        members = {name: archive[name] for name in archive.files}
    if header is not None:
        edited = header(json.loads(members["__header__"].tobytes()))
        members["__header__"] = numpy.frombuffer(json.dumps(edited).encode(), dtype=numpy.uint8)
    members.update(arrays)
    for name in raw or {}:
        del members[name]
    numpy.savez(target, **members)
    with zipfile.ZipFile(target, "a") as archive:
        for name, data in (raw or {}).items():
            archive.writestr(name + ".npy", data)
    return target


def with_config(**changes):
    return lambda header: {**header, "config": {**header["config"], **changes}}


MALFORMED = {
    "unknown config key": (dict(header=with_config(foo=1)),
                           r"unknown config key\(s\) \['foo'\] for a 'rnng' model \(minirnng .* knows "
                           r"\['batch_norm', 'gate_bias', 'hidden', 'n_classes'\]; the file was written by minirnng"),
    "config value of the wrong type": (dict(header=with_config(n_classes="three")),
                                       r"its config .* does not build a 'rnng' model \(RNNG: n_classes must be an integer, got 'three'"),
    "config value out of range": (dict(header=with_config(n_classes=1)),
                                  r"does not build a 'rnng' model \(RNNG: n_classes must be >= 2, got 1"),
    "config not an object": (dict(header=lambda header: {**header, "config": [3, 8]}),
                             r"has a config that is a JSON list, not an object"),
    "header a JSON list": (dict(header=lambda header: [header]), r"has a header that is a JSON list, not an object"),
    "string format version": (dict(header=lambda header: {**header, "format_version": "1"}),
                              r"has format version '1', not an integer"),
    "list as architecture": (dict(header=lambda header: {**header, "architecture": ["rnng"]}),
                             r"has architecture \['rnng'\] in its header, not a name"),
    "header not a .npy member": (dict(raw={"__header__": b'{"format": "minirnng-checkpoint"}'}),
                                 r"is corrupt: its entry '__header__' is not a .npy array"),
    "header not bytes": (dict(__header__=numpy.zeros(4)), r"unreadable header \(an array of float64"),
    "weights not a .npy member": (dict(raw={"conv1.weight": b"\x00" * 64}),
                                  r"is corrupt: its entry 'conv1.weight' is not a .npy array"),
    "weights stored as strings": (dict(**{"edge.bias": numpy.array(["0.5"])}),
                                  r"parameter edge.bias has dtype <U3, not real floating point"),
    "integer weights": (dict(**{"edge.bias": numpy.array([1])}), r"parameter edge.bias has dtype int64, not real"),
    "complex weights": (dict(**{"edge.bias": numpy.array([1 + 0j], numpy.complex64)}),
                        r"parameter edge.bias has dtype complex64, not real"),
    "NaN weights": (dict(**{"conv1.weight": numpy.full((16, 3, 5, 5), numpy.nan, numpy.float32)}),
                    r"parameter conv1.weight holds 1200 NaN or infinite value\(s\) of 1200"),
    "infinite weights": (dict(**{"edge.bias": numpy.array([numpy.inf], numpy.float32)}),
                         r"parameter edge.bias holds 1 NaN or infinite value\(s\) of 1"),
    "input size not two numbers": (dict(header=lambda header: {**header, "input_size": 128}),
                                   r"has input size 128 in its header, not \[height, width\]"),
    "classes not names": (dict(header=lambda header: {**header, "classes": "background"}),
                          r"has classes 'background' in its header, not a list of names"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoints_are_one_line_errors_naming_the_file(case, tmp_path):
    # hand-edited or foreign files: a CheckpointError (a ValueError, which the CLI prints as one
    # line) that names the file, never a TypeError or AttributeError from deep inside a loader
    edits, message = MALFORMED[case]
    source = RNNG(rng=0).save(tmp_path / "model.npz")
    bad = edited_checkpoint(source, tmp_path / "bad.npz", **edits)
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*bad\.npz'[ :]") as error:
        load_model(bad)
    assert re.search(message, str(error.value)) and "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["NaN weights", "integer weights", "weights not a .npy member"])
def test_every_reader_of_a_checkpoint_file_checks_the_weights(case, tmp_path):
    edits, message = MALFORMED[case]
    source = RNNG(rng=0).save(tmp_path / "model.npz")
    bad = edited_checkpoint(source, tmp_path / "bad.npz", **edits)
    with pytest.raises(CheckpointError, match=message):
        load_arrays(bad)  # the PyTorch route
    with pytest.raises(CheckpointError, match=message):
        load_stage2_model(bad)
    with pytest.raises(CheckpointError, match=message):
        RNNG.load(bad)
    component = EyeBrowNet(rng=0).save(tmp_path / "eyes.npz")
    bad = edited_checkpoint(component, tmp_path / "bad-eyes.npz", **{"conv1.bias": numpy.full(8, numpy.nan)})
    with pytest.raises(CheckpointError, match=r"bad-eyes\.npz': parameter conv1.bias holds 8 NaN"):
        load_stage2_model(bad)


def test_a_cnn_crf_checkpoint_keeps_its_own_crf(tmp_path):
    model = CNNCRF(rng=0, crf=DenseCRF(iterations=10, bilateral_weight=8.0, max_grid_points=1024))
    loaded = load_model(model.save(tmp_path / "cnn-crf.npz"))
    assert loaded.crf.config() == model.crf.config() and loaded.crf.iterations == 10
    assert loaded.checkpoint_header["config"]["crf"]["bilateral_weight"] == 8.0  # a plain dict in the JSON
    # a checkpoint written before the CRF's settings were stored loads with the defaults
    old = edited_checkpoint(tmp_path / "cnn-crf.npz", tmp_path / "old.npz",
                            header=lambda header: {**header, "config": {k: v for k, v in header["config"].items()
                                                                        if k != "crf"}})
    assert load_model(old).crf.config() == DenseCRF().config()
    # a partial dict: the rest are the defaults
    partial = edited_checkpoint(tmp_path / "cnn-crf.npz", tmp_path / "partial.npz",
                                header=with_config(crf={"iterations": 2}))
    assert load_model(partial).crf.config() == DenseCRF(iterations=2).config()


@pytest.mark.parametrize("crf, message", [
    ({"iterations": 5, "colour": 1}, r"unknown CRF setting\(s\) \['colour'\]; DenseCRF takes \['iterations'"),
    ({"bilateral_rgb": 0}, r"DenseCRF: bilateral_rgb must be finite and > 0, got 0.0"),
    ({"iterations": "5"}, r"DenseCRF: iterations must be an integer, got '5'"),
    ([5], r"crf must be a DenseCRF, a dict of its settings or None, got list"),
])
def test_a_cnn_crf_checkpoint_with_bad_crf_settings_is_named(crf, message, tmp_path):
    path = CNNCRF(rng=0).save(tmp_path / "cnn-crf.npz")
    bad = edited_checkpoint(path, tmp_path / "bad.npz", header=with_config(crf=crf))
    with pytest.raises(CheckpointError, match=r"bad\.npz': its config .* does not build a 'cnn-crf' model \(.*"
                       + message):
        load_model(bad)


def test_a_stage2_checkpoint_given_to_load_model_says_how_to_load_it(tmp_path):
    from minirnng.models import COMPONENT_NETWORKS, TwoStageParser
    from minirnng.models.checkpoint import STAGE2_ARCHITECTURES

    assert sorted(STAGE2_ARCHITECTURES) == sorted([*COMPONENT_NETWORKS, TwoStageParser.architecture])
    two_stage = TwoStageParser(RNNG(n_classes=11, rng=0), rng=0).save(tmp_path / "two_stage.npz")
    for load in (load_model, RNNG.load):
        with pytest.raises(CheckpointError, match=r"two_stage\.npz' holds a 'two-stage' model of stage 2, which "
                           r"load_model does not build: load it with TwoStageParser.load or load_stage2_model "
                           r"\(`minirnng parse --classes 11 --checkpoint` reads it\)"):
            load(two_stage)
    eyes = EyeBrowNet(rng=0).save(tmp_path / "eyes.npz")
    with pytest.raises(CheckpointError, match=r"holds a 'eye-brow-net' model of stage 2, .*load it with "
                       "load_stage2_model"):
        load_model(eyes)
    assert isinstance(load_stage2_model(two_stage), TwoStageParser)  # the loader the message names


def test_float64_weights_beyond_float32_are_named_not_loaded_as_infinity(tmp_path):
    path = RNNG(rng=0, dtype=numpy.float64).save(tmp_path / "model.npz")
    large = edited_checkpoint(path, tmp_path / "large.npz", **{"edge.bias": numpy.array([1e39])})  # inf in float32
    with pytest.raises(CheckpointError, match=r"large\.npz': edge\.bias holds 1 value\(s\) beyond the range of "
                       r"float32 \(largest magnitude 1e\+39\), which would load as infinity"):
        load_model(large)
    bias = numpy.zeros(16)
    bias[:3] = 1e39, -1e300, numpy.nan  # a NaN given is load_params' caller's business, not an overflow
    with pytest.raises(ValueError, match=r"conv1\.bias holds 2 value\(s\) beyond the range of float32 "
                       r"\(largest magnitude 1e\+300\)"):
        RNNG(rng=0).load_params({**RNNG(rng=0).params(), "conv1.bias": bias})
    assert load_model(large, dtype=numpy.float64).params()["edge.bias"][0] == 1e39  # fits float64


def test_a_config_too_large_for_memory_is_named(tmp_path):
    path = RNNG(rng=0).save(tmp_path / "model.npz")
    huge = edited_checkpoint(path, tmp_path / "huge.npz", header=with_config(hidden=1_000_000_000))
    with pytest.raises(CheckpointError, match=r"huge\.npz': its config \{.*'hidden': 1000000000.*\} does not build "
                       r"a 'rnng' model \(MemoryError: "):
        load_model(huge)


def test_weight_checks_leave_good_checkpoints_alone(tmp_path):
    # float64 weights (a model trained in float64) load into a float32 model; a finite float16 too
    model = RNNG(rng=0, dtype=numpy.float64)
    path = model.save(tmp_path / "model.npz")
    numpy.testing.assert_allclose(load_model(path).params()["conv1.weight"], model.params()["conv1.weight"],
                                  rtol=1e-6)
    half = edited_checkpoint(path, tmp_path / "half.npz", **{"edge.bias": numpy.array([65504.0], numpy.float16)})
    assert load_model(half).params()["edge.bias"][0] == 65504.0


def test_saving_over_an_existing_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    RNNG(rng=0).save(path)
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(numpy, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        RNNG(rng=1).save(path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["model.npz"]


def test_an_error_about_another_file_while_writing_keeps_its_own_name(tmp_path):
    from minirnng.atomic import replacing

    with pytest.raises(FileNotFoundError) as raised:
        with replacing(tmp_path / "figure.png"):
            open(tmp_path / "missing-font.ttf")
    assert raised.value.filename == str(tmp_path / "missing-font.ttf") and "cannot write" not in str(raised.value)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_a_checkpoint_is_written_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "best.npz"
    RNNG(rng=0).save(path)
    good = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(numpy, "savez", full)
    with pytest.raises(OSError, match=r"cannot write '.*best.npz': No space left on device") as raised:
        RNNG(rng=1).save(path)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["best.npz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_get_the_umask_s_permissions_without_the_umask_being_changed(tmp_path, monkeypatch):
    # os.umask sets the mask of the whole process while it reads it: another thread's file made in
    # that moment would get mode 0666; the atomic writer leaves the mask to the OS instead
    from minirnng.atomic import replacing

    previous = os.umask(0o027)
    try:
        def umask_called(mask):
            raise AssertionError("os.umask called while writing")

        monkeypatch.setattr(os, "umask", umask_called)
        with replacing(tmp_path / "result.txt") as temporary:
            with open(temporary, "w") as stream:
                stream.write("ok")
        RNNG(rng=0).save(tmp_path / "model.npz")
    finally:
        monkeypatch.undo()
        os.umask(previous)
    for name in ("result.txt", "model.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert sorted(os.listdir(tmp_path)) == ["model.npz", "result.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_rewritten_file_keeps_its_permissions_and_a_replaced_link_does_not_take_its_targets(tmp_path):
    from minirnng.atomic import replacing

    def write(path, text):
        with replacing(path) as temporary:
            with open(temporary, "w") as stream:
                stream.write(text)

    private = tmp_path / "private.txt"
    write(private, "one")
    private.chmod(0o600)  # made private by its owner: a later rewrite must not open it to everyone
    write(private, "two")
    assert private.read_text() == "two" and private.stat().st_mode & 0o777 == 0o600
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("target")
    target.chmod(0o604)
    link.symlink_to(target)
    write(link, "file")
    assert not link.is_symlink() and link.stat().st_mode & 0o777 != 0o604 and target.read_text() == "target"


def test_a_path_through_a_link_to_nothing_is_named_before_any_work(tmp_path):
    from minirnng.atomic import check_can_create

    (tmp_path / "results").symlink_to(tmp_path / "gone")
    with pytest.raises(NotADirectoryError, match=r"'.*results' is a symbolic link to nothing"):
        check_can_create(tmp_path / "results" / "eval.json", "the results")


def test_saving_refuses_what_loading_would_refuse_and_keeps_the_good_file(tmp_path):
    path = tmp_path / "model.npz"
    RNNG(rng=0).save(path)
    good = path.read_bytes()
    broken = RNNG(rng=1)
    broken.params()["conv1.weight"][0, 0, 0, 0] = numpy.nan
    with pytest.raises(ValueError, match=r"parameter conv1\.weight holds 1 NaN.*model\.npz' was not written"):
        broken.save(path)
    wrong_names = RNNG(rng=1)
    wrong_names.classes = ["background", "skin"]
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        wrong_names.save(path)
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        RNNG(rng=1).save(path, note=object())
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["model.npz"]
    # NumPy scalars in the metadata are numbers, not an error
    assert load_model(RNNG(rng=1).save(path, accuracy=numpy.float32(0.5))).checkpoint_header["accuracy"] == 0.5


def test_a_header_naming_too_few_classes_is_refused(tmp_path):
    path = RNNG(rng=0).save(tmp_path / "model.npz")
    with numpy.load(path) as archive:
        arrays = dict(archive)
    header = json.loads(arrays["__header__"].tobytes())
    header["classes"] = ["background", "skin"]
    arrays["__header__"] = numpy.frombuffer(json.dumps(header).encode(), numpy.uint8)
    numpy.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(CheckpointError, match="edited.npz.*names 2 classes.*3 outputs"):
        load_model(tmp_path / "edited.npz")


def test_forward_keeps_its_own_copy_of_the_images(rng):
    model = RNNG(rng=0)
    images = rng.standard_normal((2, 3, 16, 16)).astype(numpy.float32)
    upstream = {"logits": rng.standard_normal((2, 3, 16, 16)).astype(numpy.float32)}
    model.zero_grad()
    model.forward(images.copy())
    model.backward(upstream, input_gradient=False)
    expected = model.grads()["conv1.weight"].copy()
    buffer = images.copy()
    model.zero_grad()
    model.forward(buffer)
    buffer[...] = 0  # the caller refills its batch buffer before backward
    model.backward(upstream, input_gradient=False)
    numpy.testing.assert_array_equal(model.grads()["conv1.weight"], expected)


def test_architectures_registry():
    assert set(ARCHITECTURES) == {"rnng", "cnn-s", "cnn-deep", "rnn", "cnn-crf"}


def test_dense_crf_cleans_noisy_predictions_along_image_edges():
    rng = numpy.random.default_rng(0)
    truth = numpy.zeros((32, 32), dtype=int)
    truth[:, 16:] = 1
    image = numpy.where(truth == 1, 0.4, -0.4)[None].repeat(3, axis=0)
    logits = numpy.stack([truth == 0, truth == 1]).astype(float) * 1.0 + rng.normal(0, 1.2, (2, 32, 32))
    q = DenseCRF().refine(logits[None], image[None])[0]
    numpy.testing.assert_allclose(q.sum(axis=0), 1, rtol=1e-5)
    before = (logits.argmax(axis=0) == truth).mean()
    after = (q.argmax(axis=0) == truth).mean()
    assert after > before + 0.1 and after > 0.97, (before, after)


def naive_dense_crf(crf, logits, image):
    """Mean-field inference written out from the formulas of :mod:`minirnng.models.crf`, in
    float64: every pair of grid points' bilateral weight, the normalised kernel as a matrix, and
    the spatial kernel as a matrix too (SciPy's sampled Gaussian: normalised taps, radius
    round(4 sigma); only the pixels that exist, none a pixel's own), normalised the same way."""
    k, height, width = logits.shape
    stride = int(numpy.ceil(numpy.sqrt(height * width / crf.max_grid_points)))
    while -(-height // stride) * -(-width // stride) > crf.max_grid_points:
        stride += 1
    h, w = -(-height // stride), -(-width // stride)  # the blocks along the borders may be cut short

    def grid_means(array):  # (C, H, W) -> (C, h * w), the means of the stride x stride blocks' pixels
        return numpy.array([[array[c, r * stride:(r + 1) * stride, q * stride:(q + 1) * stride].mean()
                             for r in range(h) for q in range(w)] for c in range(len(array))])

    def normalised(kernel):  # D^-1/2 K D^-1/2, a point with no neighbour hearing nothing
        numpy.fill_diagonal(kernel, 0)
        degree = kernel.sum(axis=1)
        scale = numpy.where(degree > 1e-9, 1 / numpy.sqrt(numpy.maximum(degree, 1e-300)), 0)
        return scale[:, None] * kernel * scale[None, :]

    colours = grid_means(image).T
    features = numpy.array([[r * stride / crf.bilateral_xy, q * stride / crf.bilateral_xy]
                            for r in range(h) for q in range(w)])
    features = numpy.concatenate([features, colours / crf.bilateral_rgb], axis=1)
    bilateral_kernel = normalised(numpy.exp(-0.5 * ((features[:, None] - features[None]) ** 2).sum(axis=2)))
    sigma = crf.spatial_xy
    radius = int(4 * sigma + 0.5)
    taps = numpy.exp(-numpy.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    pixels = [(r, c) for r in range(height) for c in range(width)]
    spatial_kernel = numpy.zeros((len(pixels), len(pixels)))
    for i, (r, c) in enumerate(pixels):
        for j, (r2, c2) in enumerate(pixels):
            if abs(r - r2) <= radius and abs(c - c2) <= radius:
                spatial_kernel[i, j] = taps[r2 - r + radius] * taps[c2 - c + radius]
    spatial_kernel = normalised(spatial_kernel)
    rows, cols = numpy.arange(height), numpy.arange(width)
    z = logits.astype(numpy.float64)
    q = numpy.exp(z - z.max(axis=0)) / numpy.exp(z - z.max(axis=0)).sum(axis=0)
    for _ in range(crf.iterations):
        on_grid = (grid_means(q) @ bilateral_kernel).reshape(k, h, w)
        bilateral = on_grid[:, rows // stride][:, :, cols // stride]
        spatial = (q.reshape(k, -1) @ spatial_kernel).reshape(k, height, width)
        message = crf.bilateral_weight * bilateral + crf.spatial_weight * spatial
        e = numpy.exp(z + message - (z + message).max(axis=0))
        q = e / e.sum(axis=0)
    return q


def test_dense_crf_on_one_pixel_is_the_softmax_and_refuses_a_grid_wider_than_the_image():
    logits = numpy.array([0.2, -0.05, 0.6], numpy.float32).reshape(1, 3, 1, 1)
    q = DenseCRF().refine(logits, numpy.zeros((1, 3, 1, 1), numpy.float32))
    expected = numpy.exp(logits) / numpy.exp(logits).sum()
    numpy.testing.assert_allclose(q, expected, rtol=1e-6)  # no neighbour, no message, not even its own
    with pytest.raises(ValueError, match="1x10000 needs a bilateral grid of 3x3 blocks"):
        DenseCRF().refine(numpy.zeros((1, 3, 1, 10000), numpy.float32), numpy.zeros((1, 3, 1, 10000), numpy.float32))


# the grid of every pixel, and of 3 x 3 blocks (ceil(sqrt(11 * 12 / 30)) = 3)
@pytest.mark.parametrize("max_grid_points", [4096, 30])
def test_dense_crf_matches_the_formulas_written_out(max_grid_points, rng):
    crf = DenseCRF(iterations=3, bilateral_xy=3.0, bilateral_rgb=0.2, max_grid_points=max_grid_points)
    logits = rng.normal(0, 2, (3, 11, 12))
    image = rng.uniform(-0.5, 0.5, (3, 11, 12))
    q = crf.refine(logits[None], image[None])[0]
    numpy.testing.assert_allclose(q, naive_dense_crf(crf, logits, image), rtol=0, atol=2e-5)


@pytest.mark.parametrize("settings, error, message", [
    (dict(bilateral_rgb=0), ValueError, r"bilateral_rgb must be finite and > 0, got 0.0"),
    (dict(bilateral_xy=0), ValueError, r"bilateral_xy must be finite and > 0, got 0.0"),
    (dict(spatial_xy=0.0), ValueError, r"spatial_xy must be finite and > 0, got 0.0"),
    (dict(spatial_xy=-1), ValueError, r"spatial_xy must be finite and > 0, got -1.0"),
    (dict(bilateral_xy=float("inf")), ValueError, r"bilateral_xy must be finite and > 0, got inf"),
    (dict(bilateral_weight=-1), ValueError, r"bilateral_weight must be finite and >= 0, got -1.0"),
    (dict(spatial_weight=float("nan")), ValueError, r"spatial_weight must be finite and >= 0, got nan"),
    (dict(bilateral_xy=1e-18), ValueError, r"bilateral_xy must lie in \[0.001, 10000\], got 1e-18"),
    (dict(spatial_xy=1e12), ValueError, r"spatial_xy must lie in \[0.001, 10000\], got 1e\+12"),
    (dict(bilateral_weight=1e39), ValueError, r"bilateral_weight must be .*got 1e\+39; the largest it takes is 1e\+30"),
    (dict(iterations=-3), ValueError, r"iterations must be >= 0, got -3"),
    (dict(iterations=2.5), TypeError, r"iterations must be an integer, got 2.5"),
    (dict(max_grid_points=0), ValueError, r"max_grid_points must be >= 1, got 0"),
    (dict(bilateral_weight="4"), TypeError, r"bilateral_weight must be a number, got '4'"),
])
def test_dense_crf_refuses_settings_that_give_nan_or_divide_by_zero(settings, error, message):
    with pytest.raises(error, match="^DenseCRF: " + message):
        DenseCRF(**settings)


def test_dense_crf_takes_zero_weights_and_iterations_and_numpy_numbers():
    logits = numpy.random.default_rng(0).normal(0, 1, (1, 3, 8, 8))
    images = numpy.zeros((1, 3, 8, 8))
    softmax = numpy.exp(logits) / numpy.exp(logits).sum(axis=1, keepdims=True)
    for crf in (DenseCRF(iterations=0), DenseCRF(bilateral_weight=0, spatial_weight=0)):
        numpy.testing.assert_allclose(crf.refine(logits, images), softmax, rtol=1e-5)
    crf = DenseCRF(iterations=numpy.int64(2), bilateral_rgb=numpy.float32(0.5))
    assert crf.config()["iterations"] == 2 and type(crf.iterations) is int
    assert DenseCRF(**crf.config()).config() == crf.config() and repr(crf).startswith("DenseCRF(iterations=2, ")


@pytest.mark.parametrize("channels", [1, 4])
def test_dense_crf_names_images_without_three_channels(channels):
    with pytest.raises(ValueError, match=r"images \(N, 3, H, W\) must agree, got \(1, 3, 16, 16\) and "
                       rf"\(1, {channels}, 16, 16\)"):
        DenseCRF().refine(numpy.zeros((1, 3, 16, 16)), numpy.zeros((1, channels, 16, 16)))


def test_cnn_crf_predict_uses_the_crf(rng):
    model = CNNCRF(rng=0)
    images = rng.standard_normal((2, 3, 16, 16)).astype(numpy.float32)
    labels = model.predict(images)
    assert labels.shape == (2, 16, 16)
    # a float16 batch, which every other model takes, is read by the CRF in the model's dtype
    numpy.testing.assert_array_equal(model.predict(images.astype(numpy.float16)),
                                     model.predict(images.astype(numpy.float16).astype(numpy.float32)))


@pytest.mark.parametrize("model_class", [RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF, EyeBrowNet])
def test_infer_keeps_no_layer_cache(model_class, rng):
    """No backward may follow an inference pass, so nothing of its activations is kept (a forward's caches go too)."""
    model = model_class(rng=0)
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 16)).astype(numpy.float32)
    model.forward(images)
    model.infer(images)
    layers = list(model.layers.values())
    layers += [sub for layer in layers for sub in getattr(layer, "direction_layers", {}).values()]
    assert [layer for layer in layers if layer.cache is not None] == []


@pytest.mark.parametrize("model_class", [RNNG, CNNS, EyeBrowNet])
def test_backward_refuses_caches_that_infer_overwrote(model_class, rng):
    """predict between forward and backward would give gradients of the wrong pass, silently."""
    model = model_class(rng=0)
    images = rng.uniform(-0.5, 0.5, (2, 3, 16, 16)).astype(numpy.float32)
    with pytest.raises(RuntimeError, match="no forward pass to differentiate"):
        model.backward({"logits": numpy.zeros((2, 3, 16, 16), numpy.float32)})
    outputs = model.forward(images)
    upstream = {"logits": rng.standard_normal(outputs["logits"].shape).astype(numpy.float32)}
    model.predict(images[::-1].copy())
    with pytest.raises(RuntimeError, match="no infer or predict in between"):
        model.backward(upstream)
    model.forward(images)
    model.zero_grad()
    model.backward(upstream)  # after a fresh forward, as usual


def test_an_empty_batch_is_named():
    with pytest.raises(ValueError, match=r"a batch of 0 images, shape \(0, 3, 16, 16\)"):
        RNNG(rng=0).predict(numpy.zeros((0, 3, 16, 16), numpy.float32))


def test_load_params_is_all_or_nothing():
    model = RNNG(rng=0)
    before = {name: value.copy() for name, value in model.params().items()}
    arrays = {name: numpy.ones_like(value) for name, value in before.items()}
    arrays["edge.bias"] = numpy.array(["0.5"])  # the last array is bad: the others must stay unloaded
    with pytest.raises(TypeError, match="edge.bias has dtype <U3, not real numbers"):
        model.load_params(arrays)
    arrays["edge.bias"] = [0.5]
    with pytest.raises(TypeError, match="edge.bias is a list, not an array"):
        model.load_params(arrays)
    for name, value in model.params().items():
        numpy.testing.assert_array_equal(value, before[name], err_msg=name)


def test_save_refuses_a_header_that_loading_would_refuse_and_keeps_the_good_file(tmp_path):
    path = tmp_path / "best.npz"
    RNNG(rng=0).save(path)
    good = path.read_bytes()
    numbered = RNNG(rng=1)
    numbered.classes = [0, 1, 2]
    attempts = (
        (lambda: RNNG(rng=1).save(path, classes=["a", "b"]), r"metadata \['classes'\] would replace"),
        (lambda: RNNG(rng=1).save(path, config={"n_classes": 5}), r"metadata \['config'\] would replace"),
        (lambda: numbered.save(path), r"has classes \[0, 1, 2\] in its header, not a list of names"),
        (lambda: RNNG(rng=1).save(path, input_size=(127.9, 128)), r"input_size must be \(height, width\) in whole"),
        (lambda: RNNG(rng=1).save(path, input_size=(0, 0)), r"has input size \[0, 0\] in its header"),
    )
    for attempt, message in attempts:
        with pytest.raises(ValueError, match=message):
            attempt()
        assert path.read_bytes() == good


def test_an_undefined_score_in_the_metadata_is_stored_as_null_and_a_pickled_array_is_named(tmp_path):
    from minirnng.models.checkpoint import CheckpointError, read_checkpoint

    path = RNNG(rng=0).save(tmp_path / "best.npz", validation={"f_measure": {"hair": float("nan")},
                                                               "scores": [numpy.float32("inf"), 0.5]})
    assert b"NaN" not in path_bytes(path) and b"Infinity" not in path_bytes(path)
    assert read_checkpoint(path)[0]["validation"] == {"f_measure": {"hair": None}, "scores": [None, 0.5]}
    pickled = tmp_path / "pickled.npz"
    numpy.savez(pickled, weights=numpy.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"pickled.npz' holds Python objects \(a pickled array\)"):
        read_checkpoint(pickled)


def path_bytes(path):
    """The header of the checkpoint at ``path`` as the bytes it is stored in."""
    with numpy.load(path, allow_pickle=False) as archive:
        return archive["__header__"].tobytes()


def test_damage_that_numpys_own_parsers_choke_on_is_a_checkpoint_error(tmp_path):
    import io
    import struct

    source = RNNG(rng=0).save(tmp_path / "model.npz")
    # a member whose .npy header claims 2^40 floats: the allocation fails before any byte is read
    claim = io.BytesIO()
    numpy.lib.format.write_array_header_1_0(claim, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 40,)})
    huge = edited_checkpoint(source, tmp_path / "huge.npz", raw={"conv1.weight": claim.getvalue() + b"\0" * 64})
    # a member whose .npy header, of the length it declares, stops inside its shape's parenthesis
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': ("
    text += b" " * (117 - len(text)) + b"\n"
    cut = edited_checkpoint(source, tmp_path / "cut.npz",
                            raw={"conv1.bias": b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text})
    # a JSON header nested deeper than the parser's recursion allows
    deep = tmp_path / "deep.npz"
    with numpy.load(source) as archive:
        members = {name: archive[name] for name in archive.files}
    members["__header__"] = numpy.frombuffer(b"[" * 100000 + b"]" * 100000, dtype=numpy.uint8)
    numpy.savez(deep, **members)
    for path in (huge, cut, deep):
        with pytest.raises(CheckpointError, match=f"checkpoint '.*{os.path.basename(path)}'"):
            load_model(path)


def test_load_arrays_gives_native_byte_order_and_load_model_names_a_bad_dtype_first(tmp_path):
    source = RNNG(rng=0).save(tmp_path / "model.npz")
    with numpy.load(source) as archive:
        swapped = {name: archive[name].astype(archive[name].dtype.newbyteorder(">"))
                   for name in archive.files if name != "__header__"}
    big_endian = edited_checkpoint(source, tmp_path / "big.npz", **swapped)
    arrays = load_arrays(big_endian)
    assert all(value.dtype.isnative for value in arrays.values())
    numpy.testing.assert_array_equal(arrays["conv1.weight"], load_arrays(source)["conv1.weight"])
    with pytest.raises(TypeError, match="load_model: unsupported dtype float16"):
        load_model(source, dtype=numpy.float16)


def test_dense_crf_hears_the_last_rows_of_an_image_that_its_blocks_do_not_divide():
    # 7 rows in blocks of 4: the last 3 rows, of another colour, used to be cropped from the grid
    # and to take the message of the block above them; as the exact CRF does, they keep their label
    height, width, bright_from = 7, 400, 4
    image = numpy.full((1, 3, height, width), -0.4)
    image[:, :, bright_from:] = 0.4
    logits = numpy.zeros((1, 2, height, width))
    logits[0, 0, :bright_from], logits[0, 1, bright_from:] = 2.0, 0.5
    approximate = DenseCRF(max_grid_points=300).refine(logits, image)[0].argmax(axis=0)
    exact = DenseCRF(max_grid_points=10 ** 6).refine(logits, image)[0].argmax(axis=0)
    assert (exact[bright_from:] == 1).all() and (approximate[bright_from:] == 1).all()


@pytest.mark.parametrize("what", ["logits", "images"])
def test_dense_crf_refuses_nan_that_its_dense_kernel_would_spread_to_every_pixel(what, rng):
    arrays = {"logits": rng.standard_normal((1, 3, 8, 8)), "images": rng.uniform(-0.5, 0.5, (1, 3, 8, 8))}
    arrays[what][0, 0, 2, 3] = numpy.nan
    with pytest.raises(ValueError, match=f"DenseCRF: the {what} hold NaN or infinite values"):
        DenseCRF().refine(arrays["logits"], arrays["images"])
