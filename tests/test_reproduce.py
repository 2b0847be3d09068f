"""`minirnng reproduce table1|table2` end to end on a tiny synthetic budget."""

import json
import os

import numpy
import pytest

from minirnng import reproduce
from minirnng.models.checkpoint import read_checkpoint


@pytest.fixture
def tiny_budgets(monkeypatch):
    monkeypatch.setitem(reproduce.BUDGETS["table1"], "small", {"epochs": 1, "synthetic": (8, 4, 4)})
    monkeypatch.setitem(reproduce.BUDGETS["table1"], "full", {"epochs": 2, "synthetic": (8, 4, 4)})
    monkeypatch.setitem(reproduce.BUDGETS["table2"], "small", {"epochs": 1, "synthetic": (4, 2, 2)})


def test_table1_trains_every_model_and_writes_json(tiny_budgets, tmp_path):
    lines = []
    results = reproduce.reproduce("table1", json_path=str(tmp_path / "t1.json"), out_dir=str(tmp_path / "runs"),
                                  progress=False, log=lines.append)
    assert set(results) == set(reproduce.PAPER_TABLE1) | {"_meta"}
    for name in reproduce.PAPER_TABLE1:
        assert set(results[name]["f_measure"]) == {"background", "skin", "hair"}
        assert 0 <= results[name]["accuracy"] <= 1 and results[name]["ms_per_image"] > 0
    assert results["_meta"]["evaluated_on"] == "test"
    assert json.loads((tmp_path / "t1.json").read_text())["RNN-G"]["accuracy"] == results["RNN-G"]["accuracy"]
    table = next(line for line in lines if line.startswith("table1 on synthetic"))
    assert "RNN-G" in table and "95.46" in table  # the paper's numbers printed beside ours
    # RNN-G's lead over each model, paired on the same test images
    for name in ("CNN-S", "CNN-Deep", "CNN-CRF", "RNN"):
        lead = results[name]["rnng_lead"]
        assert lead["difference"] == pytest.approx(results["RNN-G"]["accuracy"] - results[name]["accuracy"], abs=1e-12)
        assert lead["low"] <= lead["high"] and 0 <= lead["a_ahead"] <= 1
    assert "rnng_lead" not in results["RNN-G"]
    assert any(line.startswith("RNN-G minus CNN-S:") for line in lines)


def test_table2_runs_on_synthetic_multi_face_images(tiny_budgets, tmp_path):
    results = reproduce.reproduce("table2", out_dir=str(tmp_path / "runs"), progress=False, log=lambda line: None)
    assert set(results) == set(reproduce.PAPER_TABLE2) | {"_meta"}
    assert results["_meta"]["input_size"] == 256
    assert results["RNN-G"]["accuracy"] is not None


def test_the_detector_row_searches_the_full_size_pictures_and_leaves_undetected_faces_background(monkeypatch):
    from minirnng import detect
    from minirnng.data.catalog import load_split, open_dataset

    test_set = load_split("synthetic", "test", n_classes=3, input_size=256, size=2, multi_face=True)
    originals = open_dataset("synthetic", "test", n_classes=3, size=2, multi_face=True)
    searched = []

    def no_face(picture):
        searched.append(picture.shape)
        return numpy.zeros((0, 4), int)

    monkeypatch.setattr(detect, "detector_available", lambda: True)
    monkeypatch.setattr(detect, "detect_faces", no_face)
    result = reproduce._detector_and_single_face_parser(test_set, originals, lambda line: None)
    assert searched == [(512, 512, 3)] * 2 and result["faces_detected"] == 0
    background_share = (test_set.labels == 0).mean()
    assert result["accuracy"] == pytest.approx(background_share)  # nothing found: every pixel background


def test_the_detector_rows_time_leaves_out_the_scoring(monkeypatch):
    import types

    from minirnng import detect
    from minirnng.data.catalog import load_split, open_dataset

    test_set = load_split("synthetic", "test", n_classes=3, input_size=256, size=2, multi_face=True)
    originals = open_dataset("synthetic", "test", n_classes=3, size=2, multi_face=True)
    events = []
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or float(len(events)))
    resize = reproduce.resize_labels
    monkeypatch.setattr(reproduce, "time", clock)
    monkeypatch.setattr(reproduce, "resize_labels", lambda *args: events.append("score") or resize(*args))
    monkeypatch.setattr(detect, "detector_available", lambda: True)
    monkeypatch.setattr(detect, "detect_faces", lambda picture: numpy.zeros((0, 4), int))
    result = reproduce._detector_and_single_face_parser(test_set, originals, lambda line: None)
    # the clock starts and stops before any image is scored
    assert events == ["clock", "clock", "score", "score"]
    assert result["accuracy"] == pytest.approx((test_set.labels == 0).mean())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown table"):
        reproduce.reproduce("table9")
    with pytest.raises(ValueError, match="out_dir is an empty name"):
        reproduce.reproduce("table1", out_dir="")
    with pytest.raises(ValueError, match="unknown budget"):
        reproduce.reproduce("table1", budget="huge")
    with pytest.raises(ValueError, match="synthetic multi-face images only"):
        reproduce.reproduce("table2", data="/some/folder")


def test_the_full_budget_trains_every_model_with_the_shipped_recipe_in_its_own_folder(tiny_budgets, tmp_path):
    runs = tmp_path / "runs"
    quiet = dict(out_dir=str(runs), progress=False, log=lambda line: None)
    reproduce.reproduce("table1", budget="small", **quiet)
    # the same --out again with another budget and seed: its own runs, not a resume of the first ones
    results = reproduce.reproduce("table1", budget="full", seed=3, **quiet)
    assert sorted(os.listdir(runs)) == ["table1-synthetic-full-seed3", "table1-synthetic-small-seed0"]
    assert results["_meta"]["recipe"] == {**reproduce.RECIPES["full"], "epochs": 2, "seed": 3, "background_ratio": 0}
    for architecture in ("cnn-s", "cnn-deep", "rnn", "rnng"):
        header, _, _ = read_checkpoint(str(runs / "table1-synthetic-full-seed3" / architecture / "best.npz"))
        config = header["train_config"]
        assert config["model"] == architecture and config["epochs"] == 2 and config["seed"] == 3
        assert (config["lr"], config["weight_decay"], config["augment"], config["stability_rule"]) == \
            (5e-3, 1e-4, "mirror", "project")
        header, _, _ = read_checkpoint(str(runs / "table1-synthetic-small-seed0" / architecture / "best.npz"))
        assert (header["train_config"]["stability_rule"], header["train_config"]["lr"]) == ("rescale", 3e-3)
    with pytest.raises(ValueError, match="unknown budget 'full'"):
        reproduce.reproduce("table2", budget="full", **quiet)


def test_the_command_line_passes_the_seed_and_refuses_one_for_table3(tiny_budgets, tmp_path, capsys):
    from minirnng import cli

    assert cli.main(["reproduce", "table1", "--seed", "2", "--out", str(tmp_path), "--quiet",
                     "--json", str(tmp_path / "t1.json")]) == 0
    assert json.loads((tmp_path / "t1.json").read_text())["_meta"]["recipe"]["seed"] == 2
    assert cli.main(["reproduce", "table3", "--seed", "2", "--out", str(tmp_path)]) == 1
    assert "--seed applies to table1 and table2" in capsys.readouterr().err


def test_a_folder_of_another_recipe_is_refused_in_reproduces_own_words(tiny_budgets, tmp_path, monkeypatch):
    """train's advice ("only --epochs may change") names options reproduce does not have."""
    monkeypatch.setitem(reproduce.BUDGETS["table1"], "small", {"epochs": 1, "synthetic": (4, 2, 2)})
    monkeypatch.setattr(reproduce, "TABLE1_MODELS", {"RNN-G": "rnng"})
    reproduce.reproduce("table1", out_dir=str(tmp_path / "runs"), progress=False, log=lambda line: None)
    monkeypatch.setitem(reproduce.RECIPES, "small", {"lr": 1e-3})  # what a later version might change
    with pytest.raises(ValueError, match=r"holds a run of RNN-G that this command cannot continue .*lr.*; delete "
                                         r"that folder, or give reproduce another --out") as refused:
        reproduce.reproduce("table1", out_dir=str(tmp_path / "runs"), progress=False, log=lambda line: None)
    assert "only --epochs may change" not in str(refused.value).split("(", 1)[0]


def test_the_test_split_falls_back_to_validation_only_where_its_list_is_absent(tmp_path, monkeypatch):
    from minirnng.data.datasets import MissingDataError

    loaded = []

    def load(data, split, sizes, input_size, multi_face):
        loaded.append(split)
        if split == "test":  # a listed image that is not there
            raise MissingDataError("LFWPL: parts_test.txt line 32 ('Nobody_Here 0001') names a missing file")
        return "the validation split"

    monkeypatch.setattr(reproduce, "_load", load)
    messages = []
    assert reproduce._test_split(str(tmp_path), None, 128, False, messages.append) == ("validation",
                                                                                      "the validation split")
    assert loaded == ["validation"] and "parts_test.txt does not exist); scoring on validation" in messages[0]
    # a broken test split is an error: scoring on the split that chose the models instead would pass unnoticed
    (tmp_path / "parts_test.txt").write_text("Nobody_Here 1\n")
    with pytest.raises(MissingDataError, match="Nobody_Here"):
        reproduce._test_split(str(tmp_path), None, 128, False, messages.append)
    assert len(messages) == 1


def test_the_command_line_refuses_an_output_folder_it_could_not_use_before_any_work(tmp_path, capsys):
    from minirnng import cli

    assert cli.main(["reproduce", "table1", "--out", ""]) == 1
    assert "--out is an empty name" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    for table in ("table1", "table3"):
        assert cli.main(["reproduce", table, "--out", str(tmp_path / "afile")]) == 1
        assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
