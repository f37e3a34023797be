"""What a run leaves behind: saved models that run on their own (`load_predictor`), logs that
read well when redirected, `--quiet`, TensorBoard hparams/table/plots, configs loaded by name."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from jaxprune import data, modelio, pipeline, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
METHODS = ["--config.prune.methods=threshold", "--config.search.methods=random"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI smoke run with stdout and stderr redirected to a file, then a `--quiet` rerun."""
    workdir = str(tmp_path_factory.mktemp("outputs") / "work")
    command = [sys.executable, "-m", "jaxprune.main", "--config=configs/quickstart.py:smoke",
               f"--workdir={workdir}", *METHODS]
    log_path = os.path.join(os.path.dirname(workdir), "run.log")
    with open(log_path, "wb") as log:
        done = subprocess.run(command, cwd=REPO, env=ENV, stdout=log, stderr=log, timeout=600)
    with open(log_path, "rb") as f:
        log = f.read()
    assert done.returncode == 0, log.decode()[-3000:]
    quiet = subprocess.run(command + ["--quiet"], cwd=REPO, env=ENV, capture_output=True,
                           timeout=600)
    return workdir, log, quiet


def test_redirected_log_has_plain_lines_and_no_bars(cli_run):
    _, log, _ = cli_run
    text = log.decode()
    assert "\r" not in text  # tqdm redraws with carriage returns
    assert "[dense] epoch 1/1" in text and "[timing] random" in text
    assert "test acc (%)" in text  # the table


def test_quiet_prints_nothing(cli_run):
    _, _, quiet = cli_run
    assert quiet.returncode == 0, quiet.stderr.decode()
    assert quiet.stdout.decode() == "" and quiet.stderr.decode() == ""


def test_saved_model_carries_what_it_needs(cli_run):
    workdir, _, _ = cli_run
    rows = {r["method"]: r for r in json.load(open(os.path.join(workdir, "results.json")))}
    for method in ("unpruned", "threshold", "random"):
        info = json.load(open(os.path.join(workdir, "models", method, modelio.MODEL_INFO)))
        assert info["method"] == method and info["row"] == rows[method]
        assert info["input_shape"] == [8, 8, 1] and info["num_classes"] == 10
        assert len(info["mean"]) == len(info["std"]) == 1 and info["std"][0] > 0
        assert info["spec"]["name"] == "lenet5" and info["config"]["model"]["name"] == "lenet5"
        assert info["spec"]["widths"] == [[k, v] for k, v in info["spec"]["widths"]]


def test_predictor_equals_the_evaluation(cli_run):
    workdir, _, _ = cli_run
    rows = {r["method"]: r for r in json.load(open(os.path.join(workdir, "results.json")))}
    config = pipeline.load_config("quickstart:smoke")
    ds = data.load(config.data)
    for method in ("unpruned", "random"):
        predict = pipeline.load_predictor(workdir, method, batch_size=8)  # 32 images: 4 batches
        logits = predict(ds.test_images)
        assert logits.shape == (ds.test_images.shape[0], 10) and logits.dtype == np.float32
        accuracy = float(np.mean(np.argmax(logits, -1) == ds.test_labels))
        assert accuracy == pytest.approx(rows[method]["accuracy"], abs=1e-6)
        loss = float(np.mean(train.cross_entropy(logits, ds.test_labels)))
        assert loss == pytest.approx(rows[method]["test_loss"], abs=1e-5)
        np.testing.assert_allclose(predict(ds.test_images[3]), logits[3], rtol=1e-5, atol=1e-5)
        model, params, batch_stats = pipeline.restore_model(workdir, method)  # old callers
        assert model.spec == predict.model.spec
        evaluate = train.make_eval_fn(model.apply, mean=ds.mean, std=ds.std, batch_size=16)
        assert evaluate(params, batch_stats, ds.test_images, ds.test_labels)["accuracy"] == \
            pytest.approx(accuracy, abs=1e-6)
    with pytest.raises(ValueError, match="the model takes"):
        predict(np.zeros((2, 9, 9, 1), np.uint8))


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing, CRCs not checked)."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        raw = f.read()
    at, out = 0, []
    while at + 12 <= len(raw):
        (length,) = struct.unpack("<Q", raw[at:at + 8])
        event = event_pb2.Event()
        event.ParseFromString(raw[at + 12:at + 12 + length])
        out.append(event)
        at += 12 + length + 4
    return out


def test_tensorboard_has_hparams_table_and_plots(cli_run):
    workdir, _, _ = cli_run
    plugins, tags, blob = set(), set(), b""
    for path in glob.glob(os.path.join(workdir, "tensorboard", "**", "events.*"), recursive=True):
        for event in _events(path):
            for value in event.summary.value:
                plugins.add(value.metadata.plugin_data.plugin_name)
                tags.add(value.tag)
                blob += value.metadata.plugin_data.content
    assert "hparams" in plugins
    assert b"train.epochs" in blob and b"prune.sparsity" in blob  # the flattened config
    assert b"hparam/accuracy/random" in blob
    assert any(t.startswith("results") for t in tags)  # the table as text
    assert {"search_pareto", "keep_ratios"} <= tags  # the plots as images


def test_configs_load_by_name_and_variant():
    assert pipeline.load_config("quickstart").train.epochs == 30
    assert pipeline.load_config("quickstart:smoke").train.epochs == 1
    assert pipeline.load_config("cifar10", "smoke").data.name == "cifar10"
    assert pipeline.load_config("configs/cifar10.py:smoke").data.name == "cifar10"
    with pytest.raises(pipeline.errors.NotFoundError, match="give a name"):
        pipeline.load_config("no_such_config")


def test_installed_package_loads_configs_by_name(tmp_path):
    """`pip install .` (not editable) ships configs/ as jaxprune/configs/."""
    source, target = tmp_path / "src", tmp_path / "site"  # a copy: no build/ left in the tree
    for name in ("jaxprune", "configs"):
        shutil.copytree(os.path.join(REPO, name), source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"cifar10.py", "quickstart.py"} <= set(os.listdir(target / "jaxprune" / "configs"))
    code = ("import jaxprune, jaxprune.pipeline as p; assert jaxprune.__file__.startswith(%r); "
            "print(p.load_config('quickstart').data.name, p.load_config('cifar10:smoke').model.name)"
            % str(target))
    env = dict(ENV, PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["digits", "resnet20"]
