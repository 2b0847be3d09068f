"""The command line: --help everywhere, and gradcheck's verdict."""

import os
import subprocess
import sys

import numpy
import pytest

from minirnng import cli


def subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    for name in [None] + subcommands():
        with pytest.raises(SystemExit) as stop:
            cli.main(["--help"] if name is None else [name, "--help"])
        assert stop.value.code == 0
        assert "usage: minirnng" in capsys.readouterr().out


def test_gradcheck_passes_and_prints_a_table(capsys):
    assert cli.main(["gradcheck", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "Conv2d" in out and "SoftmaxCrossEntropy" in out and "all gradients agree" in out


@pytest.mark.parametrize("seed", [0, 2, 3, 31])
def test_gradcheck_checks_every_direction_of_the_four_way_layers(seed, capsys):
    """At seeds 0 and 2 one direction of a four-way layer used to win no output of the merge: its rows read
    0.00e+00 against zero gradients on both sides, a check of nothing that printed "ok"; at seed 31 the plain
    RNN model's recurrence did (and, once such rows failed as ZERO, failed a correct network)."""
    assert cli.main(["gradcheck", "--seed", str(seed)]) == 0
    out = capsys.readouterr().out
    four_way = [line for line in out.splitlines() if "_to_" in line and "rel. error" in line]
    assert len(four_way) >= 16 and not [line for line in four_way if "0.00e+00" in line]  # the models add theirs


def test_gradcheck_fails_with_an_impossible_tolerance(capsys):
    assert cli.main(["gradcheck", "--tolerance", "0"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "minirnng", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "minirnng" in result.stdout


def test_eval_writes_json_and_the_confusion_matrix(tmp_path, capsys):
    import json

    from minirnng.models import RNNG

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "4",
                     "--json", str(tmp_path / "scores.json"), "--confusion", str(tmp_path / "confusion.png")]) == 0
    record = json.loads((tmp_path / "scores.json").read_text())
    assert set(record["f_measure"]) == {"background", "skin", "hair"} and record["ms_per_image"] > 0
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert "accuracy" in capsys.readouterr().out
    assert not record["mirror"] and not record["crf"]
    assert (record["images"], record["size"], record["root"]) == (4, 4, None)  # which images were scored
    # run again, it replaces its own record and figure, as PDF and SVG too; an empty file is no one's work
    (tmp_path / "empty.json").write_bytes(b"")
    for figure in ("confusion.png", "confusion.pdf", "confusion.svg", "confusion.pdf"):
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "4",
                         "--json", str(tmp_path / "empty.json"), "--confusion", str(tmp_path / figure)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "4",
                     "--json", str(tmp_path / "refined.json"), "--mirror", "--crf"]) == 0
    assert "with test-time mirroring and the dense CRF" in capsys.readouterr().out
    refined = json.loads((tmp_path / "refined.json").read_text())
    assert refined["mirror"] and refined["crf"] and refined["pixels"] == record["pixels"]


def test_eval_scores_table2s_multi_face_pictures_as_reproduce_does(tmp_path, capsys):
    import json

    from minirnng.data.catalog import load_split
    from minirnng.models import RNNG
    from minirnng.train import evaluate

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz", input_size=(64, 64))
    command = ["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "2"]
    assert cli.main(command + ["--multi-face", "--json", str(tmp_path / "m.json")]) == 0
    assert "on synthetic multi-face test (2 images)" in capsys.readouterr().out
    pictures = load_split("synthetic", "test", None, 3, 64, size=2, multi_face=True)
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["multi_face"] and record["accuracy"] == evaluate(model, pictures)["accuracy"]
    assert cli.main(command[:-4] + ["--data", "lfw-pl", "--root", str(tmp_path), "--multi-face"]) == 1
    assert "--multi-face scores on synthetic multi-face pictures" in capsys.readouterr().err


def test_eval_bootstrap_and_compare_write_intervals_and_paired_differences(tmp_path, capsys):
    import json

    from minirnng.models import RNNG

    for seed in (0, 1):
        model = RNNG(n_classes=3, rng=seed)
        model.classes = ["background", "skin", "hair"]
        model.save(tmp_path / f"model{seed}.npz", input_size=(32, 32))
    command = ["eval", "--checkpoint", str(tmp_path / "model0.npz"), "--data", "synthetic", "--size", "6"]
    assert cli.main(command + ["--bootstrap", "300", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "95% intervals over 300 resamplings of the 6 images" in out and "F-hair" in out
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["bootstrap"]["replicates"] == 300 and "per_image_confusion" not in record
    interval = record["bootstrap"]["accuracy"]
    assert interval["low"] <= record["accuracy"] == interval["estimate"] <= interval["high"]

    # --compare alone resamples 2000 times; a checkpoint against itself differs by nothing
    assert cli.main(command + ["--compare", str(tmp_path / "model0.npz"), "--json", str(tmp_path / "self.json")]) == 0
    itself = json.loads((tmp_path / "self.json").read_text())
    assert itself["bootstrap"]["replicates"] == 2000
    assert itself["compare"]["paired"]["accuracy"]["difference"] == 0.0
    # ...and ties in every resampling, rather than being "ahead in 0%" of them
    assert itself["compare"]["paired"]["accuracy"]["tied"] == 1.0
    assert "ahead in 0% and tied in 100% of resamplings" in capsys.readouterr().out
    assert cli.main(command + ["--compare", str(tmp_path / "model1.npz"), "--json", str(tmp_path / "c.json")]) == 0
    assert "compared with" in capsys.readouterr().out
    compared = json.loads((tmp_path / "c.json").read_text())["compare"]
    assert compared["ms_per_image"] > 0  # each model's time, as for the checkpoint scored first
    assert compared["paired"]["accuracy"]["difference"] == pytest.approx(
        record["accuracy"] - compared["accuracy"], abs=1e-12)

    # a checkpoint that cannot be scored on the same images is refused before any evaluation
    other = RNNG(n_classes=3, rng=2)
    other.classes = ["background", "skin", "hair"]
    other.save(tmp_path / "at48.npz", input_size=(48, 48))
    assert cli.main(command + ["--compare", str(tmp_path / "at48.npz")]) == 1
    assert "trained at 48x48" in capsys.readouterr().err
    eleven = RNNG(n_classes=11, rng=0)
    eleven.save(tmp_path / "eleven.npz", input_size=(32, 32))
    assert cli.main(command + ["--compare", str(tmp_path / "eleven.npz")]) == 1
    assert "has 11 classes" in capsys.readouterr().err
    assert cli.main(command + ["--compare", str(tmp_path / "missing.npz")]) == 1
    assert "missing.npz" in capsys.readouterr().err


def test_eval_refuses_to_resample_fewer_than_two_images_before_evaluating(tmp_path, capsys, monkeypatch):
    from minirnng import train
    from minirnng.data import catalog
    from minirnng.models import RNNG

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz", input_size=(32, 32))

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the images were evaluated before the resampling was refused")

    monkeypatch.setattr(train, "evaluate", no_evaluation)
    command = ["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic"]
    assert cli.main(command + ["--size", "1", "--bootstrap"]) == 1
    assert "--bootstrap resamples the images and needs at least 2; --size is 1" in capsys.readouterr().err
    assert cli.main(command + ["--size", "1", "--compare", str(tmp_path / "model.npz")]) == 1
    assert "--compare resamples the images and needs at least 2" in capsys.readouterr().err
    # a split with fewer images than --size asks for is found out once it is open, still before evaluating
    load_split = catalog.load_split
    monkeypatch.setattr(catalog, "load_split", lambda *args, **kwargs: load_split(*args, **{**kwargs, "size": 1}))
    assert cli.main(command + ["--size", "5", "--bootstrap", "100"]) == 1
    assert "needs at least 2; synthetic test has 1" in capsys.readouterr().err


def test_eval_runs_at_the_checkpoints_input_size_and_checks_its_outputs_first(tmp_path, capsys, monkeypatch):
    import json

    from minirnng.data import catalog
    from minirnng.models import RNNG, load_model

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz", input_size=(48, 48))
    command = ["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "2"]
    assert cli.main(command + ["--json", str(tmp_path / "at48.json")]) == 0
    assert json.loads((tmp_path / "at48.json").read_text())["input_size"] == 48
    assert cli.main(command + ["--input-size", "32", "--json", str(tmp_path / "at32.json")]) == 0
    assert json.loads((tmp_path / "at32.json").read_text())["input_size"] == 32
    capsys.readouterr()

    def never(*args, **kwargs):
        raise AssertionError("the data was loaded before the output paths were checked")

    monkeypatch.setattr(catalog, "load_split", never)
    assert cli.main(command + ["--confusion", str(tmp_path / "confusion.txt"), "--json", str(tmp_path / "r.json")]) == 1
    assert "Matplotlib cannot write .txt files" in capsys.readouterr().err
    assert cli.main(command + ["--confusion", str(tmp_path / "same.png"), "--json", str(tmp_path / "same.png")]) == 2
    assert "--json and --confusion name the same file" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a folder")
    assert cli.main(command + ["--json", str(tmp_path / "a-file" / "r.json")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(command + ["--json", str(tmp_path)]) == 1
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    saved = (tmp_path / "model.npz").read_bytes()
    model.save(tmp_path / "other.npz", input_size=(48, 48))
    for extra in (["--json", str(tmp_path / "model.npz")],
                  ["--compare", str(tmp_path / "other.npz"), "--json", str(tmp_path / "other.npz")]):
        assert cli.main(command + extra) == 1
        assert "is the input" in capsys.readouterr().err
    # neither the checkpoint being scored nor the one compared with is ever replaced
    assert (tmp_path / "model.npz").read_bytes() == saved and load_model(tmp_path / "other.npz")
    assert cli.main(command + ["--classes", "11"]) == 1
    assert "parses 3 classes, not the 11 that --classes asks for" in capsys.readouterr().err


def test_predict_with_options_is_the_crf_on_the_mirrored_logits(rng):
    from minirnng.mirroring import mirrored_logits
    from minirnng.models import CNNCRF, RNNG, DenseCRF

    model = RNNG(n_classes=3, rng=0)
    images = rng.uniform(-0.5, 0.5, (2, 3, 32, 32)).astype(numpy.float32)
    assert cli.predict_with_options(model, None) is None
    labels = cli.predict_with_options(model, None, mirror=True, crf=True)(images)
    expected = DenseCRF().refine(mirrored_logits(model, images), images).argmax(axis=1)
    numpy.testing.assert_array_equal(labels, expected)
    numpy.testing.assert_array_equal(cli.predict_with_options(model, None, mirror=True)(images),
                                     mirrored_logits(model, images).argmax(axis=1))
    # a CNN-CRF keeps its own CRF under mirroring, as its predict does without
    cnn_crf = CNNCRF(rng=0, crf=DenseCRF(iterations=1, bilateral_weight=20.0))
    numpy.testing.assert_array_equal(cli.predict_with_options(cnn_crf, None, mirror=True)(images),
                                     cnn_crf.crf.refine(mirrored_logits(cnn_crf, images), images).argmax(axis=1))


def test_train_on_synthetic_faces_with_another_hidden_size_and_batch_norm(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", "synthetic", "--train-size", "8", "--validation-size", "4",
                     "--epochs", "1", "--batch-size", "4", "--hidden", "4", "--out", str(out), "--quiet",
                     "--workers", "2", "--recurrent-lr-scale", "0.5", "--stability-rule", "project",
                     "--augment", "mirror", "--dice-weight", "0.5", "--batch-norm"]) == 0
    assert "2 worker processes share each batch" in capsys.readouterr().out
    from minirnng.models.checkpoint import read_checkpoint
    header, params, _ = read_checkpoint(out / "last.npz")
    assert header["training"]["config"]["recurrent_lr_scale"] == 0.5
    assert header["training"]["config"]["stability_rule"] == "project"
    assert header["training"]["config"]["augment"] == "mirror"
    assert header["training"]["config"]["dice_weight"] == 0.5
    assert header["training"]["config"]["batch_norm"] and header["config"]["batch_norm"]
    assert 0 < header["training"]["history"][0]["train_dice"] < 1
    assert all(numpy.abs(value).sum(axis=1).max() <= 1 + 1e-6 for name, value in params.items() if name.endswith(".W"))
    from minirnng.models import load_model
    model = load_model(out / "best.npz")
    assert not model.batch_norm  # folded into the convolutions: the plain network
    assert model.params()["rnn.left_to_right.W"].shape == (4, 4)
    assert model.params()["deconv6.weight"].shape == (32, 8, 4, 4)
    assert model.predict(numpy.zeros((1, 3, 32, 32), numpy.float32)).shape == (1, 32, 32)


def test_bad_input_is_one_line_on_stderr_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINIRNNG_TRACEBACK", raising=False)
    assert cli.main(["parse", str(tmp_path / "missing.jpg"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"minirnng parse: error: image {str(tmp_path / 'missing.jpg')!r} does not exist; skipped",
                                "minirnng parse: 1 of 1 images could not be read or their outputs written"]
    (tmp_path / "garbage.npz").write_bytes(b"not a checkpoint")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "garbage.npz"), "--data", "synthetic", "--size", "2"]) == 1
    assert "minirnng eval: error: checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--data", "lfw-pl", "--root", str(tmp_path), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minirnng train: error: LFWPL: folder") and "Traceback" not in err


def test_a_worker_process_that_died_says_where_training_can_continue(tmp_path, capsys, monkeypatch):
    import argparse
    monkeypatch.delenv("MINIRNNG_TRACEBACK", raising=False)
    arguments = argparse.Namespace(command="train", out=str(tmp_path))
    died = ChildProcessError("ProcessParallel: worker process minirnng-shard-1 (pid 7) stopped unexpectedly "
                             "(killed by signal 9 (SIGKILL))")
    (tmp_path / "last.npz").write_bytes(b"a run's checkpoint")
    assert cli.report_error(arguments, died) == 1
    err = capsys.readouterr().err
    assert "killed by signal 9 (SIGKILL)" in err and "continue with the same command and --resume" in err
    # other errors of the input get no such hint
    assert cli.report_error(arguments, ValueError("lr must be a finite number")) == 1
    assert "--resume" not in capsys.readouterr().err


def test_minirnng_traceback_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIRNNG_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["eval", "--checkpoint", str(tmp_path / "missing.npz"), "--data", "synthetic", "--size", "2"])
    # parse still goes on with the other images: the traceback is added, nothing else changes
    cli.write_png(tmp_path / "face.png", numpy.full((40, 30, 3), 120, numpy.uint8))
    assert cli.main(["parse", str(tmp_path / "missing.jpg"), str(tmp_path / "face.png"), "--no-detect",
                     "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err and "does not exist; skipped" in err
    assert (tmp_path / "out" / "face_labels.png").exists()


def test_an_interrupted_training_run_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from minirnng import train

    epochs_finished = []

    def interrupt(self, resume=False):
        if epochs_finished:  # an epoch ended before the stop: its checkpoint is there
            os.makedirs(self.out_dir, exist_ok=True)
            open(self.last_path, "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "run", interrupt)
    command = ["train", "--data", "synthetic", "--train-size", "4", "--validation-size", "2", "--quiet", "--out"]
    # stopped before its first epoch ended: there is no last.npz, and --resume would only fail
    assert cli.main(command + [str(tmp_path / "early")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no epoch finished; run the same command again (without --resume)" in err
    assert "every finished epoch" not in err
    # stopped after an epoch: last.npz is there to continue from
    epochs_finished.append(1)
    out = tmp_path / "run"
    assert cli.main(command + [str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; every finished epoch is saved in {out}: continue with the same command and --resume" in err
    assert cli.main(["reproduce", "table1", "--budget", "small", "--out", str(tmp_path / "tables"), "--quiet"]) == 130
    assert "the same command again continues where it stopped" in capsys.readouterr().err


def test_train_refuses_a_number_of_workers_below_one(tmp_path, capsys):
    for value in ("0", "two"):
        with pytest.raises(SystemExit):
            cli.main(["train", "--data", "synthetic", "--workers", value, "--out", str(tmp_path)])
        assert "--workers" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_train_refuses_before_loading_any_data(tmp_path, capsys, monkeypatch):
    import minirnng.data.catalog as catalog

    def never(*args, **kwargs):
        raise AssertionError("the data was loaded before the checks")

    monkeypatch.setattr(catalog, "load_split", never)
    assert cli.main(["train", "--data", "synthetic", "--epochs", "0", "--out", str(tmp_path / "a")]) == 1
    assert "--epochs and --batch-size must be positive" in capsys.readouterr().err
    assert cli.main(["train", "--data", "synthetic", "--resume", "--out", str(tmp_path / "b")]) == 1
    assert "there is no run in" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "last.npz").write_bytes(b"a run's checkpoint")
    assert cli.main(["train", "--data", "synthetic", "--out", str(tmp_path / "c")]) == 1
    assert "last.npz exists: pass resume=True (--resume)" in capsys.readouterr().err
    assert (tmp_path / "c" / "last.npz").read_bytes() == b"a run's checkpoint"
    # a folder holding another run's best weights, log or curves (or a figure of the user's), without its last.npz
    for name in ("best.npz", "log.csv", "curves.png"):
        folder = tmp_path / f"other-{name}"
        folder.mkdir()
        (folder / name).write_bytes(b"someone's file")
        assert cli.main(["train", "--data", "synthetic", "--out", str(folder)]) == 1
        assert f"{name} exists, from an earlier run" in capsys.readouterr().err
        assert (folder / name).read_bytes() == b"someone's file"
    for arguments, message in ((["--seed", "-1"], "--seed: must be at least 0"),
                               (["--input-size", "10"], "--input-size: must be a multiple of 4")):
        with pytest.raises(SystemExit) as stop:  # argparse's own refusal, exit status 2
            cli.main(["train", "--data", "synthetic", "--out", str(tmp_path / "e")] + arguments)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    for arguments, message in ((["--hidden", "0"], "hidden must be an integer of at least 1"),
                               (["--momentum", "-1"], "momentum must be at least 0 and below 1"),
                               (["--warmup", "2"], "warmup must be at least 0 and below 1"),
                               (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
                               (["--boundary-ratio", "-1"], "--boundary-ratio must be >= 0"),
                               (["--loss-weights", "0", "0", "0"], "every term of the objective has weight 0")):
        assert cli.main(["train", "--data", "synthetic", "--out", str(tmp_path / "e")] + arguments) == 1
        assert message in capsys.readouterr().err, arguments
    # --init: a checkpoint that is not there, is corrupt, or holds another network
    from minirnng.models import CNNS, RNNG
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 cut short")
    RNNG(n_classes=4, rng=0).save(tmp_path / "four.npz")
    CNNS(n_classes=3, rng=0).save(tmp_path / "cnn-s.npz")
    RNNG(n_classes=3, rng=0, batch_norm=True).save(tmp_path / "normalised.npz")
    for name, message in (("missing.npz", "does not exist"), ("truncated.npz", "corrupt or truncated"),
                          ("four.npz", "shape"), ("cnn-s.npz", "holds a 'cnn-s' model, not 'rnng'"),
                          ("normalised.npz", "with batch normalisation and this run trains one without")):
        assert cli.main(["train", "--data", "synthetic", "--init", str(tmp_path / name),
                         "--out", str(tmp_path / "f")]) == 1
        assert message in capsys.readouterr().err, name
    assert not (tmp_path / "f").exists()


def test_resume_with_another_configuration_is_refused_before_loading_any_data(tmp_path, capsys, monkeypatch):
    import minirnng.data.catalog as catalog

    command = ["train", "--data", "synthetic", "--epochs", "1", "--train-size", "4", "--validation-size", "2",
               "--input-size", "32", "--workers", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert cli.main(command) == 0

    def never(*args, **kwargs):
        raise AssertionError("the data was loaded before the saved configuration was compared")

    monkeypatch.setattr(catalog, "load_split", never)
    capsys.readouterr()
    assert cli.main(command + ["--resume", "--lr", "1e-3"]) == 1
    assert "configuration differs" in capsys.readouterr().err


def test_a_run_stopped_in_its_first_epoch_may_start_again_over_its_best_npz(tmp_path):
    from minirnng.data.catalog import load_split
    from minirnng.train import TrainConfig, Trainer

    data = [load_split("synthetic", split, n_classes=3, size=4, input_size=32) for split in ("train", "validation")]
    config = TrainConfig(epochs=1, batch_size=4)
    Trainer(config, *data, tmp_path / "run", progress=False, log=lambda line: None, workers=1).run()
    for name in ("last.npz", "log.csv", "curves.png"):  # killed after best.npz, before the rest
        os.remove(tmp_path / "run" / name)
    Trainer(config, *data, tmp_path / "run", progress=False, log=lambda line: None, workers=1).run()
    other = TrainConfig(epochs=1, batch_size=4, lr=1e-3)
    for name in ("last.npz", "log.csv", "curves.png"):
        os.remove(tmp_path / "run" / name)
    with pytest.raises(FileExistsError, match="best.npz exists, from an earlier run"):
        Trainer(other, *data, tmp_path / "run", progress=False, log=lambda line: None, workers=1).run()


def test_parse_goes_on_past_a_bad_image_and_never_overwrites_its_own_outputs(tmp_path, capsys, rng):
    from PIL import Image

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=numpy.uint8)).save(tmp_path / folder / "face.png")
    Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=numpy.uint8)).save(tmp_path / "a" / "Face.jpg")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    images = [str(tmp_path / "a" / "face.png"), str(tmp_path / "broken.png"), str(tmp_path / "b" / "face.png"),
              str(tmp_path / "a" / "Face.jpg")]
    out = tmp_path / "out"
    assert cli.main(["parse", *images, "--out", str(out), "--no-detect"]) == 1
    captured = capsys.readouterr()
    assert "broken.png is not an image Pillow can identify" in captured.err and "1 of 4 images could not be read" in captured.err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["Face-3_labels.png", "Face-3_overlay.png", "face-2_labels.png", "face-2_overlay.png",
                       "face_labels.png", "face_overlay.png"]
    assert Image.open(out / "Face-3_labels.png").size == (50, 20)


def test_parse_refuses_outputs_that_would_replace_one_of_its_input_images(tmp_path, capsys, rng):
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=numpy.uint8)).save(tmp_path / "a.jpg")
    assert cli.main(["parse", str(tmp_path / "a.jpg"), "--out", str(tmp_path), "--no-detect"]) == 0
    (tmp_path / "a_overlay.png").unlink()
    saved = (tmp_path / "a_labels.png").read_bytes()  # a's labels, which a second parse of a would replace
    images = [str(tmp_path / "a.jpg"), str(tmp_path / "a_labels.png")]
    assert cli.main(["parse", *images, "--out", str(tmp_path), "--no-detect"]) == 2
    assert "would replace the input image" in capsys.readouterr().err
    assert (tmp_path / "a_labels.png").read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jpg", "a_labels.png"]
    # a picture of the user's that only has the name of an output is not replaced either: a's
    # outputs take another name, as they would with it not among the inputs, and nothing is refused
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=numpy.uint8)).save(tmp_path / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=numpy.uint8)).save(tmp_path / "b_labels.png")
    mine = (tmp_path / "b_labels.png").read_bytes()
    assert cli.main(["parse", str(tmp_path / "b_labels.png"), str(tmp_path / "b.jpg"), "--out", str(tmp_path),
                     "--no-detect"]) == 0
    assert (tmp_path / "b_labels.png").read_bytes() == mine and (tmp_path / "b-2_labels.png").exists()
    assert "b_labels.png exists and is not this image's earlier output" in capsys.readouterr().out
    assert cli.output_replacing_an_input(images, str(tmp_path / "elsewhere"), figure=True) is None
    assert cli.output_replacing_an_input([str(tmp_path / "x_figure.png"), str(tmp_path / "x.png")],
                                         str(tmp_path), figure=True) == (str(tmp_path / "x_figure.png"),
                                                                         str(tmp_path / "x_figure.png"))


def test_parse_parses_an_image_named_twice_once(tmp_path, capsys, rng):
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=numpy.uint8)).save(tmp_path / "a.jpg")
    image = str(tmp_path / "a.jpg")
    out = tmp_path / "out"
    assert cli.main(["parse", image, str(tmp_path / "." / "a.jpg"), image, "--out", str(out), "--no-detect"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("is named more than once; parsed once") == 2 and "not this image's" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.png", "a_overlay.png"]


def test_parse_keeps_a_file_of_the_users_and_another_images_outputs_and_replaces_only_its_own(tmp_path, capsys, rng):
    from PIL import Image

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=numpy.uint8)).save(tmp_path / folder / "face.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "me_labels.png").write_bytes(b"my hand-drawn labels")
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=numpy.uint8)).save(tmp_path / "me.png")

    def parse(image):
        assert cli.main(["parse", str(image), "--out", str(out), "--no-detect"]) == 0
        return capsys.readouterr().out

    assert f"note: {out / 'me_labels.png'} exists and is not this image's earlier output" in parse(tmp_path / "me.png")
    assert (out / "me_labels.png").read_bytes() == b"my hand-drawn labels" and (out / "me-2_labels.png").is_file()
    parse(tmp_path / "a" / "face.png")
    first = (out / "face_labels.png").read_bytes()
    parse(tmp_path / "b" / "face.png")  # another image of the same name, in a later call
    assert (out / "face_labels.png").read_bytes() == first and (out / "face-2_labels.png").is_file()
    parse(tmp_path / "a" / "face.png")  # the same image again: its own outputs are replaced
    from minirnng.viz import output_role
    assert str(tmp_path) not in output_role(out / "face_labels.png")  # a digest, not the path
    assert sorted(p.name for p in out.iterdir()) == ["face-2_labels.png", "face-2_overlay.png", "face_labels.png",
                                                    "face_overlay.png", "me-2_labels.png", "me-2_overlay.png",
                                                    "me_labels.png"]


def test_reproduce_refuses_a_json_name_over_a_file_it_did_not_write_before_any_training(tmp_path, capsys):
    checkpoint = tmp_path / "victim.npz"
    checkpoint.write_bytes(b"weights")
    assert cli.main(["reproduce", "table1", "--json", str(checkpoint), "--out", str(tmp_path / "runs")]) == 1
    assert "--json" in capsys.readouterr().err and checkpoint.read_bytes() == b"weights"
    assert not (tmp_path / "runs").exists()


def test_output_stems():
    assert cli.output_stems(["a/x.jpg", "b/x.png", "x-2.jpg", "c/X.jpg", "y.jpg"]) == ["x", "x-2", "x-2-2", "X-3", "y"]


def test_a_closed_pipe_ends_the_command_quietly():
    """``minirnng gradcheck | head -1``: no error message and no traceback once the reader has gone."""
    process = subprocess.Popen([sys.executable, "-m", "minirnng", "gradcheck"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("minirnng")
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait() == 141 and stderr == ""


def test_sigterm_ends_a_command_as_ctrl_c_does_and_memory_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import signal

    from minirnng import train

    def terminated(self, resume=False):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train", "--data", "synthetic", "--train-size", "4", "--validation-size", "2",
                     "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert "interrupted; no epoch finished" in capsys.readouterr().err  # stopped before any epoch ended
    assert signal.getsignal(signal.SIGTERM) is before  # restored for whoever called main

    def out_of_memory(self, resume=False):
        raise MemoryError

    monkeypatch.setattr(train.Trainer, "run", out_of_memory)
    assert cli.main(["train", "--data", "synthetic", "--train-size", "4", "--validation-size", "2",
                     "--out", str(tmp_path / "run2"), "--quiet"]) == 1
    assert "error: out of memory; use smaller batches" in capsys.readouterr().err


def test_gradcheck_options_are_checked_by_argparse(capsys):
    for option, value in (("--tolerance", "-1"), ("--tolerance", "nan"), ("--seed", "-1")):
        with pytest.raises(SystemExit) as exit_status:
            cli.main(["gradcheck", option, value])
        assert exit_status.value.code == 2 and option in capsys.readouterr().err


def test_long_output_names_fit_with_the_temporary_suffix(tmp_path):
    from minirnng.atomic import write_json

    path = tmp_path / ("r" * 245 + ".json")  # 250 bytes: room for no temporary suffix of its own
    write_json(path, {"ok": True})
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_json_results_hold_no_nan_token(tmp_path):
    from minirnng.atomic import write_json
    from minirnng.metrics import summarize

    summary = summarize(numpy.zeros((3, 3), int), ["background", "skin", "hair"])  # no pixel counted
    assert summary["accuracy"] is None and set(summary["f_measure"].values()) == {None}
    write_json(tmp_path / "empty.json", summary)
    with pytest.raises(ValueError, match=r"cannot write '.*nan\.json': .*NaN or infinite"):
        write_json(tmp_path / "nan.json", {"accuracy": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json"]  # nothing half written


def test_outputs_that_cannot_be_written_name_the_file_not_a_temporary_one(tmp_path, capsys, monkeypatch):
    from minirnng import reproduce
    from minirnng.atomic import write_json

    (tmp_path / "taken.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write '.*taken\.json': Is a directory"):
        write_json(str(tmp_path / "taken.json"), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json"]

    def never(*args, **kwargs):
        raise AssertionError("reproduce trained before its --json path was checked")

    monkeypatch.setattr(reproduce, "reproduce", never)
    assert cli.main(["reproduce", "table1", "--json", str(tmp_path / "taken.json")]) == 1
    assert "is a folder; give a file name" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "a-file")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--data", "synthetic"]) == 1
    assert "is a folder; give the .npz file" in capsys.readouterr().err



def test_parse_names_the_figure_after_the_overlay(tmp_path, capsys, rng):
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=numpy.uint8)).save(tmp_path / "face.png")
    assert cli.main(["parse", str(tmp_path / "face.png"), "--out", str(tmp_path / "out"), "--no-detect",
                     "--figure"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = next(k for k, line in enumerate(lines) if line.startswith(str(tmp_path / "face.png") + ": 20x24"))
    assert [line.split(":")[0] for line in lines[first + 1:first + 4]] == ["  labels", "  overlay", "  figure"]
    assert lines[first + 3] == f"  figure:  {tmp_path / 'out' / 'face_figure.png'}"
    assert os.path.isfile(tmp_path / "out" / "face_figure.png")


def test_parse_takes_any_file_name_and_goes_on_past_an_output_it_cannot_write(tmp_path, capsys, rng):
    from PIL import Image

    dollars, long_name, last = tmp_path / "cost_$5_and_$6.png", tmp_path / ("f" * 246 + ".png"), tmp_path / "last.png"
    for path in (dollars, long_name, last):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=numpy.uint8)).save(path)
    out = tmp_path / "out"
    # the figure's title is the file name, not a mathtext formula; "<246 f>_labels.png" is longer
    # than a file name may be, which skips that image and not the ones after it
    assert cli.main(["parse", str(dollars), str(long_name), str(last), "--out", str(out), "--no-detect",
                     "--figure"]) == 1
    captured = capsys.readouterr()
    assert f"{long_name} skipped" in captured.err and "1 of 3 images could not be read or their outputs" in captured.err
    assert (out / "cost_$5_and_$6_figure.png").is_file() and (out / "last_figure.png").is_file()
    assert cli.main(["parse", str(last), "--out", "", "--no-detect"]) == 1
    assert "the output folder is an empty name" in capsys.readouterr().err


def test_eval_refuses_a_json_name_over_a_file_of_another_kind_too_few_resamplings_and_11_classes_on_lfw_pl(
        tmp_path, capsys, monkeypatch):
    from minirnng import train
    from minirnng.models import RNNG

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz", input_size=(32, 32))
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated before the checks"))
    command = ["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic"]
    (tmp_path / "last.npz").write_bytes(b"a run's resume state")
    assert cli.main(command + ["--json", str(tmp_path / "last.npz")]) == 1
    assert "exists and is not a record that eval --json wrote" in capsys.readouterr().err
    assert (tmp_path / "last.npz").read_bytes() == b"a run's resume state"
    # nor a .json of the user's, nor a picture, as --confusion
    from PIL import Image

    (tmp_path / "mine.json").write_text('{"mine": 1}')
    Image.fromarray(numpy.zeros((4, 4, 3), numpy.uint8)).save(tmp_path / "holiday.png")
    for option, path in (("--json", "mine.json"), ("--confusion", "holiday.png")):
        before = (tmp_path / path).read_bytes()
        assert cli.main(command + [option, str(tmp_path / path)]) == 1
        assert f"{option} '{tmp_path / path}' exists and is not" in capsys.readouterr().err
        assert (tmp_path / path).read_bytes() == before
    assert cli.main(command + ["--json", ""]) == 1
    assert "an output file name is empty" in capsys.readouterr().err
    assert cli.main(command + ["--bootstrap", "2"]) == 1
    assert "a 95% interval needs at least 100 resamplings" in capsys.readouterr().err
    eleven = RNNG(n_classes=11, rng=0)
    eleven.save(tmp_path / "eleven.npz", input_size=(32, 32))
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "eleven.npz"), "--data", "lfw-pl",
                     "--root", str(tmp_path)]) == 1
    assert "parses 11 classes and LFW-PL's labels have 3" in capsys.readouterr().err


def test_eval_writes_its_files_even_when_the_reader_leaves_early(tmp_path, capsys, monkeypatch):
    import json

    from minirnng.models import RNNG

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz", input_size=(32, 32))
    import builtins
    import io
    import sys

    printed, real_print = [], builtins.print

    def closed_pipe(*args, **kwargs):
        # the terminal's reader has gone: printing there fails; into a buffer it works
        if kwargs.get("file") is None and not isinstance(sys.stdout, io.StringIO):
            printed.append(args)
            raise BrokenPipeError
        real_print(*args, **kwargs)
    arguments = cli.build_parser().parse_args(["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data",
                                               "synthetic", "--size", "2", "--json", str(tmp_path / "scores.json")])
    monkeypatch.setattr("builtins.print", closed_pipe)
    with pytest.raises(BrokenPipeError):  # main turns it into exit status 141
        arguments.handler(arguments)
    monkeypatch.undo()
    assert printed
    assert json.loads((tmp_path / "scores.json").read_text())["split"] == "test"


def test_train_checks_its_output_path_and_options_before_the_data(tmp_path, capsys, monkeypatch):
    import minirnng.data.catalog as catalog

    monkeypatch.setattr(catalog, "load_split", lambda *args, **kwargs: pytest.fail("the data was loaded first"))
    (tmp_path / "afile").write_text("x")
    for out, message in ((str(tmp_path / "afile" / "sub"), "is a file, not a folder"),
                         ("", "the output folder is an empty name")):
        assert cli.main(["train", "--data", "synthetic", "--out", out]) == 1
        assert message in capsys.readouterr().err
    assert cli.main(["train", "--data", "synthetic", "--augment", "mirror", "--no-augment",
                     "--out", str(tmp_path / "a")]) == 2
    assert "--no-augment and --augment mirror contradict each other" in capsys.readouterr().err
    assert cli.main(["train", "--data", "synthetic", "--loss-weights", "1", "nan", "1",
                     "--out", str(tmp_path / "a")]) == 1
    assert "--loss-weights[1] must be a finite number" in capsys.readouterr().err


def test_train_notes_options_that_its_model_or_optimizer_does_not_use():
    from minirnng.train import TrainConfig

    assert cli.ignored_options(TrainConfig(model="cnn-s", stability_rule="project", momentum=0.5)) == [
        "--stability-rule has no effect on cnn-s, which has no recurrent weights",
        "--momentum has no effect with --optimizer adam"]
    assert cli.ignored_options(TrainConfig(model="rnng", stability_rule="project", recurrent_lr_scale=0.1)) == []
    assert cli.ignored_options(TrainConfig(model="rnn", optimizer="sgd", momentum=0.5)) == []


def test_eval_replaces_its_own_record_whatever_its_name_and_shows_its_scores_when_writing_fails(
        tmp_path, capsys, monkeypatch):
    from minirnng import atomic
    from minirnng.models import RNNG

    model = RNNG(n_classes=3, rng=0)
    model.classes = ["background", "skin", "hair"]
    model.save(tmp_path / "model.npz", input_size=(32, 32))
    command = ["eval", "--checkpoint", str(tmp_path / "model.npz"), "--data", "synthetic", "--size", "2",
               "--json", str(tmp_path / "scores.txt")]
    assert cli.main(command) == 0
    assert cli.main(command) == 0  # its own record, under a name of the user's choice
    capsys.readouterr()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic, "write_json", full_disk)
    assert cli.main(command) == 1
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "No space left on device" in captured.err


def test_parse_records_a_digest_of_any_image_name_in_its_outputs(tmp_path):
    # a Latin-1 name (a surrogate escape in Python) cannot be written into a PNG's UTF-8 text: its
    # digest can, and a digest does not carry the user's folders along with the outputs either
    from minirnng.viz import output_role

    name = str(tmp_path / os.fsdecode(b"caf\xe9.png"))
    role = cli.parse_role(name)
    cli.write_png(tmp_path / "labels.png", numpy.zeros((4, 4), numpy.uint8), role)
    assert output_role(tmp_path / "labels.png") == role and "caf" not in role and str(tmp_path) not in role


def test_demo_refuses_to_replace_a_file_of_the_users_before_any_work(tmp_path, capsys, monkeypatch):
    from minirnng import parser

    monkeypatch.setattr(parser.FaceParser, "pretrained", lambda: pytest.fail("the demo started its work"))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "synthetic_pipeline.png").write_bytes(b"my own picture")
    assert cli.main(["demo", "--out", str(out), "--epochs", "1", "--train-size", "8"]) == 1
    assert "is not an earlier demo's output" in capsys.readouterr().err
    assert (out / "synthetic_pipeline.png").read_bytes() == b"my own picture"


def test_demo_tells_its_own_checkpoints_and_figures_from_a_users_of_the_same_kind(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from minirnng.models import RNNG
    from minirnng.viz import save_figure

    ours = RNNG(rng=0).save(str(tmp_path / "ours.npz"), role=cli.DEMO_ROLE)
    earlier = RNNG(rng=0).save(str(tmp_path / "earlier.npz"))  # a plain save, as demos wrote before recording a role
    trained = RNNG(rng=0).save(str(tmp_path / "trained.npz"), epoch=3, train_config={"data": "synthetic"})
    figure = Figure()
    figure.subplots()
    our_figure = save_figure(figure, str(tmp_path / "ours.png"), role=cli.DEMO_ROLE)
    users_figure = save_figure(figure, str(tmp_path / "mine.png"))  # Matplotlib's, not the demo's
    assert [cli.is_demo_output(path) for path in (ours, our_figure)] == [True] * 2
    assert [cli.is_demo_output(path) for path in (earlier, trained, users_figure)] == [False] * 3


def test_a_figure_of_minirnngs_inside_a_users_svg_or_pdf_does_not_make_it_minirnngs(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from minirnng.viz import output_role, save_figure

    figure = Figure()
    figure.subplots()
    ours = save_figure(figure, tmp_path / "ours.svg", role=cli.CONFUSION_ROLE)
    assert output_role(ours) == cli.CONFUSION_ROLE
    poster = tmp_path / "poster.svg"
    inner = (tmp_path / "ours.svg").read_text().split("?>", 1)[-1]
    poster.write_text('<svg xmlns="http://www.w3.org/2000/svg"><metadata>my poster</metadata>' + inner + "</svg>")
    assert output_role(poster) is None
    thesis = tmp_path / "thesis.pdf"
    figure.savefig(thesis, metadata={"Subject": "My thesis"})
    with open(thesis, "ab") as stream:  # another dictionary in the file holds the marker, not its Info
        stream.write(b"\n99 0 obj\n<< /Subject (minirnng eval --confusion) >>\nendobj\n")
    assert output_role(thesis) is None


def test_eval_names_a_checkpoint_whose_input_size_no_network_takes_before_loading_data(tmp_path, capsys):
    from minirnng.models import RNNG

    checkpoint = RNNG(rng=0).save(str(tmp_path / "odd.npz"), input_size=(130, 130))
    assert cli.main(["eval", "--checkpoint", checkpoint, "--data", "lfw-pl", "--root", str(tmp_path / "none")]) == 1
    assert "odd.npz' records an input size of 130x130" in capsys.readouterr().err
