"""`minirnng reproduce table1|table2` end to end on a tiny synthetic budget."""

import json

import pytest

from minirnng import reproduce


@pytest.fixture
def tiny_budgets(monkeypatch):
    monkeypatch.setitem(reproduce.BUDGETS["table1"], "small", {"epochs": 1, "synthetic": (8, 4, 4)})
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


def test_table2_runs_on_synthetic_multi_face_images(tiny_budgets, tmp_path):
    results = reproduce.reproduce("table2", out_dir=str(tmp_path / "runs"), progress=False, log=lambda line: None)
    assert set(results) == set(reproduce.PAPER_TABLE2) | {"_meta"}
    assert results["_meta"]["input_size"] == 256
    assert results["RNN-G"]["accuracy"] is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown table"):
        reproduce.reproduce("table9")
    with pytest.raises(ValueError, match="unknown budget"):
        reproduce.reproduce("table1", budget="huge")
    with pytest.raises(ValueError, match="synthetic multi-face images only"):
        reproduce.reproduce("table2", data="/some/folder")
