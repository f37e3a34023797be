"""Notebooks in colab/: Colab-ready (install cell, GPU runtime, no outputs committed) and run top
to bottom offline in smoke mode (`JAXPRUNE_SMOKE=1`, the workdir in the test's tmp dir)."""
import glob
import json
import os
import re

import nbformat
import pytest

from jaxprune import pipeline, report
from tables import assert_table_shows  # tests/ is on sys.path under pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
TFDS = os.environ.get("TFDS_DATA_DIR", "")


def test_the_notebooks_are_there():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "cifar10_search.ipynb", "restore_finetune_export.ipynb",
            "prune_your_own_model.ipynb", "sst2_prune.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_colab_ready(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), "commit without outputs"
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"]
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    first = code[0]
    assert 'REPO_URL = "https://github.com/jaxprune/jaxprune"' in first
    assert re.search(r'pip install -q "jaxprune\[data(,text)?\] @ git\+\{REPO_URL\}"', first)
    assert 'find_spec("jaxprune") is None' in first  # skipped where it is installed
    assert 'os.environ.get("JAXPRUNE_SMOKE") == "1"' in first
    assert sum("REPO_URL" in c for c in code) == 1  # set once
    assert all("sys.path" not in c for c in code)  # the package is imported, not copied or patched


def _printed(nb) -> list:
    """The text each code cell printed (stdout streams), in order."""
    return ["".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
            for c in nb.cells if c.cell_type == "code"]


def _check_quickstart(out, workdir):
    rows = report.read_results(workdir)
    assert [r["method"] for r in rows] == ["unpruned", "threshold", "evolution"]
    assert_table_shows("\n".join(out), rows)
    assert f"test accuracy {rows[-1]['accuracy']:.4f}" in out[-1]  # the saved model's predictor


def _check_cifar10_search(out, workdir):
    rows = report.read_results(workdir)
    assert rows[0]["method"] == "unpruned" and len(rows) > 2
    assert_table_shows("\n".join(out), rows)
    config = pipeline.load_config("cifar10", "smoke")
    methods = [m for m in config.search.methods.split(",") if m]
    assert methods
    for method in methods:
        with open(os.path.join(workdir, f"search_{method}.json")) as f:
            log = json.load(f)
        assert (f"{method}: {config.search.rounds * config.search.candidates} candidates, best "
                f"proxy accuracy {log['best_accuracy']:.3f}") in out[-1]


def _check_restore_finetune_export(out, workdir):
    rows = report.read_results(workdir)
    assert [r["method"] for r in rows] == ["unpruned", "threshold"]
    assert_table_shows("\n".join(out), rows)
    assert f"reported test accuracy: {rows[-1]['accuracy']}" in "\n".join(out)
    assert f"test accuracy {rows[-1]['accuracy']:.4f}" in "\n".join(out)
    assert "threshold_finetuned.jax_exported" in out[-1] and "exported logits: [" in out[-1]


def _check_prune_your_own_model(out, workdir):
    text = "\n".join(out)
    dense, small = (int(n.replace(",", "")) for n in re.search(r"params ([\d,]+) -> ([\d,]+)", text).groups())
    assert small < dense
    macs = int(re.search(r": (\d+)% of the MACs", text).group(1))
    assert macs <= 50  # the Pruner's budget (sparsity=0.5)
    accuracy = float(re.search(r"test accuracy after fine-tuning ([\d.]+)", text).group(1))
    assert 0.0 <= accuracy <= 1.0


def _check_sst2_prune(out, workdir):
    rows = report.read_results(workdir)
    assert [r["method"] for r in rows] == ["unpruned", "threshold", "sensitivity", "reinforce",
                                           "gan", "evolution", "random", "uniform"]
    assert_table_shows("\n".join(out), rows)
    text = "\n".join(out)
    for row in rows[1:]:
        widths = dict(pipeline.restore_model(workdir, row["method"])[0].spec.widths)
        heads = [widths[f"block{i}.heads"] for i in range(widths["layers"])]
        assert f"{row['method']}: heads per block {heads} of {widths['heads']}" in text
        assert sum(heads) < widths["heads"] * widths["layers"]  # heads were cut out
        assert row["macs"] <= 0.5 * rows[0]["macs"]
    assert len(re.findall(r": P\(positive\) [\d.]+ ", out[-1])) == 3, out[-1]


CHECKS = {"quickstart.ipynb": _check_quickstart, "cifar10_search.ipynb": _check_cifar10_search,
          "restore_finetune_export.ipynb": _check_restore_finetune_export,
          "prune_your_own_model.ipynb": _check_prune_your_own_model,
          "sst2_prune.ipynb": _check_sst2_prune}


def test_every_notebook_has_its_output_checks():
    assert set(CHECKS) == {os.path.basename(p) for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if "cifar10" in os.path.basename(path) and not os.path.isdir(os.path.join(TFDS, "cifar10")):
        pytest.skip("needs the local TFDS CIFAR-10 copy ($TFDS_DATA_DIR/cifar10)")
    if "sst2" in os.path.basename(path) and not os.path.isdir(os.path.join(TFDS, "glue", "sst2")):
        pytest.skip("needs the local TFDS SST-2 copy ($TFDS_DATA_DIR/glue/sst2)")
    workdir = str(tmp_path / "work")
    monkeypatch.setenv("JAXPRUNE_SMOKE", "1")
    monkeypatch.setenv("JAXPRUNE_WORKDIR", workdir)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    if any("display(Image" in c.source for c in nb.cells if c.cell_type == "code"):
        assert outputs.count("image/png") == 2  # the pipeline's two plots, inline
    CHECKS[os.path.basename(path)](_printed(nb), workdir)
