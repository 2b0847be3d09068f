"""The command line: --help everywhere, and gradcheck's verdict."""

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


def test_train_on_synthetic_faces_with_another_hidden_size(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", "synthetic", "--train-size", "8", "--validation-size", "4",
                     "--epochs", "1", "--batch-size", "4", "--hidden", "4", "--out", str(out), "--quiet"]) == 0
    from minirnng.models import load_model
    model = load_model(out / "best.npz")
    assert model.params()["rnn.left_to_right.W"].shape == (4, 4)
    assert model.params()["deconv6.weight"].shape == (32, 8, 4, 4)
    assert model.predict(numpy.zeros((1, 3, 32, 32), numpy.float32)).shape == (1, 32, 32)
