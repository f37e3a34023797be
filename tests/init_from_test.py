"""`train.init_from`: a run prunes a saved model instead of training one, and refuses a saved
model that is not this run's model on this run's data."""
import json
import os

import pytest

from jaxprune import errors, modelio, pipeline

# `smoke_run` (tests/conftest.py): one CLI run of the quick-start smoke config, every method.


def _config(smoke_run, **train):
    config = smoke_run.config.copy_and_resolve_references()
    config.prune.methods, config.search.methods = "threshold", ""
    for key, value in train.items():
        config.train[key] = value
    return config


def test_pruning_a_saved_model_reproduces_the_run_that_trained_it(smoke_run, tmp_path):
    workdir = str(tmp_path / "from_saved")
    rows = pipeline.run(_config(smoke_run, init_from=smoke_run.workdir), workdir, progress=False)
    got = {r["method"]: r for r in rows}
    want = {r["method"]: r for r in smoke_run.rows}
    # The unpruned row is the saved model measured again (its training time is the saved one's),
    # and pruning it gives the original run's threshold model: the same channels, the same test
    # accuracy, without a dense phase here.
    for key in ("accuracy", "params", "macs", "train_seconds"):
        assert got["unpruned"][key] == want["unpruned"][key], key
    assert got["threshold"]["kept_channels"] == want["threshold"]["kept_channels"]
    assert got["threshold"]["accuracy"] == want["threshold"]["accuracy"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "dense"))
    info = json.load(open(os.path.join(workdir, "models", "unpruned", "model.json")))
    assert info["row"]["accuracy"] == want["unpruned"]["accuracy"]


def _npz(smoke_run, tmp_path):
    """The smoke run's unpruned model as a dense-params .npz (what a GPU run's pack writes)."""
    _, params, batch_stats = modelio.restore_model(smoke_run.workdir, "unpruned")
    path = str(tmp_path / "dense_params.npz")
    modelio.save_dense_params(path, params, batch_stats)
    return path


def test_a_dense_params_npz_starts_a_run_too(smoke_run, tmp_path):
    config = _config(smoke_run, init_from=_npz(smoke_run, tmp_path))
    config.prune.methods = ""
    (row,) = pipeline.run(config, str(tmp_path / "from_npz"), progress=False)
    want = next(r for r in smoke_run.rows if r["method"] == "unpruned")
    assert row["accuracy"] == want["accuracy"] and row["macs"] == want["macs"]
    assert row["train_seconds"] == 0.0  # an .npz records no training time


@pytest.mark.parametrize("case", ["other_model", "pruned_model", "missing", "npz_other_model"])
def test_a_saved_model_that_does_not_fit_is_refused_before_anything_runs(smoke_run, tmp_path,
                                                                        case):
    config = _config(smoke_run, init_from=smoke_run.workdir)
    error, match = errors.ConfigError, "train.init_from"
    if case == "other_model":
        config.model.name = "mlp"
    elif case == "pruned_model":
        config.train.init_method = "threshold"  # compacted: narrower than this run's model
    elif case == "missing":
        config.train.init_from = str(tmp_path / "nowhere")
        error, match = errors.NotFoundError, "No saved model 'unpruned'"
    else:
        config.train.init_from = _npz(smoke_run, tmp_path)
        config.model.name = "mlp"
        match = "do not match the configured model"
    workdir = tmp_path / "run"
    with pytest.raises(error, match=match):
        pipeline.run(config, str(workdir), progress=False)
    assert not (workdir / "results.json").exists()
    assert not (workdir / "models").exists()
