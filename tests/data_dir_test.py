"""The TFDS data directory is resolved once, against the folder the command started in: the
README's `TFDS_DATA_DIR=../shared/tensorflow_datasets python -m pytest` must find CIFAR-10 in
notebook kernels and CLI children that run in other folders, and in the library after a chdir."""
import os
import subprocess
import sys

from jaxprune import data


def test_relative_data_dir_resolves_against_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join("..", "tfds"))
    assert data._resolve_data_dir(None) == str(tmp_path.parent / "tfds")
    assert data._resolve_data_dir("mine") == str(tmp_path / "mine")  # the config's wins
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data._resolve_data_dir(None) is None  # TFDS's own default


def test_load_reads_the_folder_named_when_it_was_called(tmp_path, monkeypatch):
    seen = []

    def fake_load(name, data_dir, *args):
        seen.append(data_dir)
        raise data.DataNotFoundError("stop here")

    monkeypatch.setattr(data, "_load", fake_load)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", "tfds")
    try:
        data.load({"name": "cifar10", "val_size": 8})
    except data.DataNotFoundError:
        pass
    assert seen == [str(tmp_path / "tfds")]


def test_the_suite_hands_children_an_absolute_data_dir(tmp_path):
    """tests/conftest.py makes $TFDS_DATA_DIR absolute at start; a child in another folder (a
    notebook's kernel, a CLI run) sees the same data. Fails under the README's command if not."""
    here = os.environ.get("TFDS_DATA_DIR")
    if here is None:
        return  # nothing to hand on: the tests that need real data skip
    assert os.path.isabs(here), here
    code = "import os; print(os.path.realpath(os.environ['TFDS_DATA_DIR']))"
    child = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == os.path.realpath(here)
