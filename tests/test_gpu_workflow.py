"""What a user runs, on the GPU: training and resuming, every stage-1 model, the command line,
the paper's tables, stage 2 and the notebooks.

test_cuda_gpu.py checks each kernel, layer, loss and model against the NumPy path; these tests run
the workflows around them with CuPy as the backend (the command line in a child process with
``MINIRNNG_BACKEND=cupy``, as a user with a GPU gets it by default) and check that what comes out
(checkpoints, scores, label images) is what the host gives.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy
import pytest

from minirnng import backend, cli
from minirnng.train import TrainConfig, Trainer

pytestmark = pytest.mark.gpu

STAGE1_MODELS = ["rnng", "cnn-s", "cnn-deep", "rnn", "cnn-crf"]
NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("[0-9]*.py"))


def run_on_the_gpu(*arguments, script=None, cwd=None):
    """``python -m minirnng ARGUMENTS`` (or ``python SCRIPT ARGUMENTS``) with CuPy as the backend;
    fails the test with its stderr."""
    root = str(pathlib.Path(__file__).parent.parent)  # minirnng from this checkout, installed or not
    search_path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, MINIRNNG_BACKEND="cupy", MPLBACKEND="Agg", PYTHONPATH=search_path)
    command = [sys.executable, *([str(script)] if script else ["-m", "minirnng"]), *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(command[1:])}:\n{result.stderr[-3000:]}"
    return result.stdout


def run_on_the_host(*arguments):
    assert cli.main([str(argument) for argument in arguments]) == 0


def read_labels(path):
    from PIL import Image
    return numpy.asarray(Image.open(path))


def quiet(line):
    pass


class Interrupt(Exception):
    pass


def test_training_on_the_gpu_resumes_exactly_and_follows_the_host(tiny_data, tmp_path):
    import cupy

    from minirnng.models import load_model

    config = TrainConfig(epochs=3, batch_size=4, seed=7)

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupt  # killed right after the epoch's checkpoint was written

    with backend.use("cupy"):
        straight = Trainer(config, *tiny_data, tmp_path / "straight", progress=False, log=quiet, workers=2)
        straight.run()
        with pytest.raises(Interrupt):
            Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=stop_after_first_epoch).run()
        resumed = Trainer(config, *tiny_data, tmp_path / "resumed", progress=False, log=quiet)
        resumed.run(resume=True)
    with backend.use("numpy"):
        host = Trainer(config, *tiny_data, tmp_path / "host", progress=False, log=quiet)
        host.run()
        saved = load_model(tmp_path / "straight" / "last.npz")

    for name, value in straight.model.params().items():
        assert isinstance(value, cupy.ndarray), name
        numpy.testing.assert_allclose(backend.to_numpy(resumed.model.params()[name]), backend.to_numpy(value),
                                      rtol=1e-5, atol=1e-6, err_msg=f"resumed run, {name}")
        numpy.testing.assert_array_equal(saved.params()[name], backend.to_numpy(value), err_msg=f"checkpoint, {name}")
    # Nine Adam steps in float32 on two devices: the losses agree to float32 rounding, amplified a little.
    numpy.testing.assert_allclose([row["train_loss"] for row in straight.history],
                                  [row["train_loss"] for row in host.history], rtol=1e-3)
    assert len(resumed.history) == 3 and (tmp_path / "resumed" / "curves.png").exists()
    # the GPU runs every batch whole, whatever --workers says: the shard count it records is 1
    from minirnng.models.checkpoint import read_checkpoint
    training = read_checkpoint(tmp_path / "straight" / "last.npz")[0]["training"]
    assert training["workers"] == 2 and training["shards"] == 1


@pytest.mark.parametrize("model", STAGE1_MODELS)
def test_every_stage1_model_trains_and_evaluates_on_the_gpu(model, tmp_path):
    out = tmp_path / "run"
    run_on_the_gpu("train", "--model", model, "--data", "synthetic", "--train-size", 8, "--validation-size", 4,
                   "--input-size", 32, "--epochs", 1, "--batch-size", 4, "--out", out, "--quiet")
    checkpoint = out / "best.npz"
    run_on_the_gpu("eval", "--checkpoint", checkpoint, "--data", "synthetic", "--size", 4,
                   "--json", tmp_path / "gpu.json")
    run_on_the_host("eval", "--checkpoint", checkpoint, "--data", "synthetic", "--size", 4,
                    "--json", tmp_path / "host.json")
    on_gpu, on_host = (json.loads((tmp_path / name).read_text()) for name in ("gpu.json", "host.json"))
    # The same weights on both: a pixel may flip only where two scores tie to float32 rounding.
    assert on_gpu["accuracy"] == pytest.approx(on_host["accuracy"], abs=2e-3)


def test_gradcheck_checks_the_gpu_path_where_cupy_is_the_backend():
    out = run_on_the_gpu("gradcheck")
    assert "float64 on the GPU" in out and "all gradients agree with finite differences" in out


def test_the_helpers_that_take_numpy_arrays_compute_on_the_host_where_cupy_is_the_backend():
    from minirnng import labs
    from minirnng.layers import naive
    from minirnng.propagation import edge_gates, propagate_labels, random_seeds, synthetic_image

    image, regions = synthetic_image()
    with backend.use("numpy"):
        expected = propagate_labels(random_seeds(regions), edge_gates(image))[0]
    with backend.use("cupy"):
        labels = propagate_labels(random_seeds(regions), edge_gates(image))[0]
        # a lab's references (minirnng's layers) run on the host too: a correct answer passes
        report = labs.check_gated_rnn_forward(
            lambda x, g, W, b: (naive.gated_recurrence(x, g, W, b, "left_to_right"), None))
    assert isinstance(labels, numpy.ndarray) and (labels == expected).all()
    assert report is None  # finish() returns None when every check passed, and raises otherwise


def test_a_model_on_the_gpu_takes_its_inputs_there_whatever_the_backend_in_force(tiny_data):
    from minirnng.data.pipeline import normalize
    from minirnng.models import RNNG
    from minirnng.models.crf import DenseCRF
    from minirnng.parser import FaceParser
    from minirnng.train import evaluate

    validation = tiny_data[1]
    with backend.use("cupy"):
        model = RNNG(3, rng=0)
    model.classes = list(validation.classes)
    host = RNNG(3, rng=0)
    host.load_params({name: backend.to_numpy(value) for name, value in model.params().items()})
    host.classes = model.classes
    with backend.use("numpy"):  # the model stays on the GPU, and its inputs follow it there
        assert evaluate(model, validation)["accuracy"] == pytest.approx(evaluate(host, validation)["accuracy"],
                                                                         abs=2e-3)
        parser = FaceParser(model, input_size=(32, 32))
        assert parser.run(list(validation.images[:2]))["logits"].shape == (2, 3, 32, 32)
        assert parser.parse(validation.images[0]).shape == validation.images[0].shape[:2]
        images = model.on_device(normalize(validation.images[:2]))
        assert backend.is_cupy_array(images)
        assert backend.is_cupy_array(DenseCRF().refine(model.infer(images), images))  # on the logits' device


def test_mirrored_eval_of_the_shipped_parser_on_the_gpu_gives_the_hosts_scores(tmp_path):
    from minirnng.parser import PRETRAINED_WEIGHTS

    for side, run in (("gpu", run_on_the_gpu), ("host", run_on_the_host)):
        run("eval", "--checkpoint", PRETRAINED_WEIGHTS, "--data", "synthetic", "--size", 4, "--mirror",
            "--json", tmp_path / f"{side}.json")
    on_gpu, on_host = (json.loads((tmp_path / f"{side}.json").read_text()) for side in ("gpu", "host"))
    assert on_gpu["mirror"] and on_gpu["accuracy"] == pytest.approx(on_host["accuracy"], abs=2e-3)


@pytest.mark.parametrize("table", ["table1", "table2"])
def test_the_papers_tables_run_on_the_gpu(table, tmp_path, monkeypatch):
    from minirnng import reproduce

    monkeypatch.setitem(reproduce.BUDGETS["table1"], "small", {"epochs": 1, "synthetic": (8, 4, 4)})
    monkeypatch.setitem(reproduce.BUDGETS["table2"], "small", {"epochs": 1, "synthetic": (4, 2, 2)})
    with backend.use("cupy"):
        results = reproduce.reproduce(table, json_path=str(tmp_path / "table.json"), out_dir=str(tmp_path / "runs"),
                                      progress=False, log=quiet)
    written = json.loads((tmp_path / "table.json").read_text())
    for name in (reproduce.PAPER_TABLE1 if table == "table1" else reproduce.PAPER_TABLE2):
        accuracy = results[name]["accuracy"]
        assert accuracy is None or 0 <= accuracy <= 1, name
        assert written[name]["accuracy"] == accuracy


def test_parse_on_the_gpu_gives_the_hosts_labels(tmp_path):
    from PIL import Image

    from minirnng.data.synthetic import SyntheticFaces

    image, _ = SyntheticFaces(1, size=160, seed=5)[0]
    Image.fromarray(image).save(tmp_path / "face.png")
    for options in ([], ["--mirror"]):
        run_on_the_gpu("parse", tmp_path / "face.png", "--no-detect", "--out", tmp_path / "gpu", *options)
        run_on_the_host("parse", tmp_path / "face.png", "--no-detect", "--out", tmp_path / "host", *options)
        on_gpu, on_host = (read_labels(tmp_path / side / "face_labels.png") for side in ("gpu", "host"))
        assert on_gpu.shape == on_host.shape == image.shape[:2]
        assert (on_gpu == on_host).mean() > 0.999, options


def test_the_demo_runs_on_the_gpu(tmp_path):
    output = run_on_the_gpu("demo", "--out", tmp_path, "--train-size", 32, "--test-size", 8, "--epochs", 1,
                            "--quiet")
    assert "synthetic faces for 1 epoch on the GPU (" in output and "ms on the GPU (" in output
    written = [path for path in tmp_path.iterdir() if path.suffix in (".png", ".npz")]
    assert len(written) >= 3, sorted(path.name for path in tmp_path.iterdir())


def test_stage2_trains_on_the_gpu_and_its_parser_matches_the_host(tmp_path, monkeypatch):
    from minirnng import train_stage2
    from minirnng.data.synthetic import SyntheticFaces
    from minirnng.models.stage2 import TwoStageParser

    monkeypatch.setitem(train_stage2.BUDGETS, "tiny", {"synthetic": (16, 8, 8), "stage1_epochs": 1,
                                                       "component_epochs": 1})
    with backend.use("cupy"):
        results = train_stage2.reproduce_table3("synthetic", "tiny", out_dir=str(tmp_path / "run"),
                                                progress=False, log=quiet)
    assert results["_meta"]["backend"] == "cupy"
    checkpoint = results["_meta"]["checkpoint"]
    image, _ = SyntheticFaces(1, size=128, n_classes=11, seed=3)[0]
    with backend.use("numpy"):
        expected = TwoStageParser.load(checkpoint).parse(image)
    with backend.use("cupy"):
        labels = TwoStageParser.load(checkpoint).parse(image)
    assert isinstance(labels, numpy.ndarray) and labels.shape == expected.shape
    assert (labels == expected).mean() > 0.999

    from PIL import Image
    Image.fromarray(image).save(tmp_path / "face.png")
    arguments = ("parse", tmp_path / "face.png", "--classes", 11, "--checkpoint", checkpoint, "--no-detect")
    run_on_the_gpu(*arguments, "--out", tmp_path / "gpu")
    run_on_the_host(*arguments, "--out", tmp_path / "host")
    on_gpu, on_host = (read_labels(tmp_path / side / "face_labels.png") for side in ("gpu", "host"))
    assert on_gpu.shape == image.shape[:2] and (on_gpu == on_host).mean() > 0.999


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_each_notebook_runs_top_to_bottom_with_cupy_as_the_default(notebook, tmp_path):
    """A notebook opened on a GPU machine computes on CuPy unless it says otherwise. Run here as the
    plain script of its py:percent twin (nbmake runs the notebooks themselves, on NumPy, in CI).
    ``display`` is IPython's, which need not be installed where the tests run: the runner drops
    its import and stands in for it."""
    runner = tmp_path / "run_notebook.py"
    runner.write_text("import sys\n"
                      "path = sys.argv[1]\n"
                      "source = open(path).read().replace('from IPython.display import display\\n', '')\n"
                      "namespace = {'__name__': '__main__', '__file__': path,\n"
                      "             'display': lambda *objects, **options: None}\n"
                      "exec(compile(source, path, 'exec'), namespace)\n")
    run_on_the_gpu(notebook, script=runner, cwd=notebook.parent)
