"""The prepared GPU script, dry-run on the CPU with the smoke config: it runs the pipeline, packs
the workdir into at most 8 files under 16 MiB, and prints a timing line."""
import json
import os
import re
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from tables import assert_table_shows  # tests/ is on sys.path under pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("TFDS_DATA_DIR", "")  # tests/conftest.py sets it to ../shared/... when there


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "cifar10")),
                    reason="CIFAR-10 TFDS copy not found (set TFDS_DATA_DIR)")
def test_run_script_packs_a_smoke_run(tmp_path):
    from jaxprune import modelio, pipeline

    out, workdir = tmp_path / "out", str(tmp_path / "work")
    env = dict(os.environ, WORKDIR=workdir, PORTABLE="", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "experiments/gpu/run.sh", str(out), "configs/cifar10.py:smoke",
                           "--config.data.source=tfds"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\[timing\] run: \d+ s, exit status 0", proc.stdout), proc.stdout[-3000:]
    assert (out / "log.txt").read_text().splitlines()[-1] in proc.stdout  # the log is the output
    files = sorted(os.listdir(out))
    assert {"results.json", "results.md", "dense_params.npz", "workdir.tar.gz", "log.txt"} <= set(files)
    assert len(files) <= 8
    assert all(os.path.getsize(out / f) < 16 * 2 ** 20 for f in files)
    rows = json.load(open(out / "results.json"))
    assert [r["method"] for r in rows][:2] == ["unpruned", "threshold"]
    assert rows == json.load(open(os.path.join(workdir, "results.json")))  # the run's table
    assert_table_shows((out / "results.md").read_text(), rows)
    model, params, batch_stats = pipeline.restore_model(workdir, "unpruned")
    packed = modelio.load_dense_params(str(out / "dense_params.npz"), model)
    for got, want in zip(jax.tree.leaves(packed), jax.tree.leaves((params, batch_stats))):
        np.testing.assert_array_equal(got, want)  # the dense model, bit for bit
    with tarfile.open(out / "workdir.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"results.json", "run_info.json", "metrics.jsonl", "search_pareto.png"} <= names
    assert not any(n.startswith(("checkpoints", "models")) for n in names)


@pytest.mark.slow
def test_run_script_runs_a_benchmark_from_saved_dense_params(tmp_path):
    """`run.sh OUT benchmarks/search_quality.py ...` (the GPU search study) on the quick start,
    starting from a dense model saved by `modelio.save_dense_params` (pack.py's format)."""
    from jaxprune import errors, modelio, pipeline

    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"))
    ctx = pipeline.make_context(config, str(tmp_path / "dense"), progress=False)
    state, row = pipeline.dense_phase(ctx)
    npz = str(tmp_path / "dense_params.npz")
    modelio.save_dense_params(npz, state.params, state.batch_stats)
    params, batch_stats = modelio.load_dense_params(npz, ctx.model)
    np.testing.assert_array_equal(params["conv1"]["kernel"], state.params["conv1"]["kernel"])
    with pytest.raises(errors.ConfigError, match="do not match"):
        modelio.load_dense_params(npz, ctx.model._replace(params={"conv1": params["conv1"]}))
    with pytest.raises(errors.NotFoundError, match="no such file"):
        modelio.load_dense_params(str(tmp_path / "missing.npz"), ctx.model)

    out = tmp_path / "out"
    env = dict(os.environ, WORKDIR=str(tmp_path / "work"), PORTABLE="", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "experiments/gpu/run.sh", str(out), "benchmarks/search_quality.py",
         "--config", "configs/quickstart.py", "--dense_params", npz, "--seeds", "0,1",
         "--methods", "random,evolution", "--rounds", "1", "--candidates", "4", "--finetune",
         "--set", "search.val_examples=200", "--quiet", "--resamples", "200",
         "--out", str(out / "search_quality.json"), "--plot", str(out / "search_quality.png")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[timing] run:" in proc.stdout and "Paired differences against random" in proc.stdout
    study = json.load(open(out / "search_quality.json"))["quickstart"]
    assert study["dense_params"] == npz and study["complete"]
    assert study["dense_test_accuracy"] == pytest.approx(row["accuracy"])  # the saved model
    assert sorted({(r["method"], r["seed"]) for r in study["runs"]}) == [
        ("evolution", 0), ("evolution", 1), ("random", 0), ("random", 1)]
    assert all(0.0 <= r["finetuned"]["test_accuracy"] <= 1.0 for r in study["runs"])
    assert (out / "search_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(os.listdir(out)) <= 8
