"""Notebooks in colab/: Colab-ready (install cell, GPU runtime, no outputs committed) and run top
to bottom offline in smoke mode (`JAXPRUNE_SMOKE=1`, the workdir in the test's tmp dir)."""
import glob
import json
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
TFDS = os.environ.get("TFDS_DATA_DIR", "")


def test_the_notebooks_are_there():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "cifar10_search.ipynb", "restore_finetune_export.ipynb",
            "prune_your_own_model.ipynb"} <= names


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
    assert 'pip install -q "jaxprune[data] @ git+{REPO_URL}"' in first
    assert 'find_spec("jaxprune") is None' in first  # skipped where it is installed
    assert 'os.environ.get("JAXPRUNE_SMOKE") == "1"' in first
    assert sum("REPO_URL" in c for c in code) == 1  # set once
    assert all("sys.path" not in c for c in code)  # the package is imported, not copied or patched


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if "cifar10" in os.path.basename(path) and not os.path.isdir(os.path.join(TFDS, "cifar10")):
        pytest.skip("needs the local TFDS CIFAR-10 copy ($TFDS_DATA_DIR/cifar10)")
    monkeypatch.setenv("JAXPRUNE_SMOKE", "1")
    monkeypatch.setenv("JAXPRUNE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    if any("display(Image" in c.source for c in nb.cells if c.cell_type == "code"):
        assert "image/png" in outputs  # the pipeline's plots, inline
