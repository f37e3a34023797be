"""What a run leaves behind (the shared CLI smoke run, `smoke_run` in tests/conftest.py): saved
models that run on their own (`load_predictor`), logs that read well when redirected, a rerun that
resumes and `--quiet`, TensorBoard hparams/table/plots, configs loaded by name."""
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
from tables import assert_table_shows  # tests/ is on sys.path under pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def test_redirected_log_has_plain_lines_and_no_bars(smoke_run):
    text = smoke_run.log  # the shared CLI run's stdout and stderr, redirected to a file
    assert "\r" not in text  # tqdm redraws with carriage returns
    assert "[dense] epoch 1/1" in text and "[timing] random" in text
    assert_table_shows(text, smoke_run.rows)  # the printed table is the saved one


def test_rerun_resumes_redoes_nothing_and_quiet_prints_nothing(smoke_run, copy_run):
    """The same command again on a finished workdir (a copy of the shared run), with `--quiet`:
    every phase is restored (no checkpoint step added), the table is the same, nothing printed."""
    checkpoints = os.path.join(copy_run, "checkpoints")
    before = {d: sorted(os.listdir(os.path.join(checkpoints, d))) for d in os.listdir(checkpoints)}
    quiet = subprocess.run([sys.executable, "-m", "jaxprune.main", "--config=configs/quickstart.py:smoke",
                            f"--workdir={copy_run}", "--quiet"], cwd=REPO, env=ENV,
                           capture_output=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr.decode()
    assert quiet.stdout.decode() == "" and quiet.stderr.decode() == ""
    assert {d: sorted(os.listdir(os.path.join(checkpoints, d))) for d in before} == before
    again = json.load(open(os.path.join(copy_run, "results.json")))
    assert [r["method"] for r in again] == [r["method"] for r in smoke_run.rows]
    for a, b in zip(smoke_run.rows, again):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6), a["method"]
        assert a["macs"] == b["macs"] and a["params"] == b["params"], a["method"]


def test_saved_model_carries_what_it_needs(smoke_run):
    workdir = smoke_run.workdir
    rows = {r["method"]: r for r in json.load(open(os.path.join(workdir, "results.json")))}
    for method in ("unpruned", "threshold", "random"):
        info = json.load(open(os.path.join(workdir, "models", method, modelio.MODEL_INFO)))
        assert info["method"] == method and info["row"] == rows[method]
        assert info["input_shape"] == [8, 8, 1] and info["num_classes"] == 10
        assert len(info["mean"]) == len(info["std"]) == 1 and info["std"][0] > 0
        assert info["spec"]["name"] == "lenet5" and info["config"]["model"]["name"] == "lenet5"
        assert info["spec"]["widths"] == [[k, v] for k, v in info["spec"]["widths"]]


def test_predictor_equals_the_evaluation(smoke_run):
    workdir = smoke_run.workdir
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


def test_tensorboard_has_hparams_table_and_plots(smoke_run):
    workdir = smoke_run.workdir
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


@pytest.mark.slow
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
