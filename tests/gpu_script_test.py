"""The prepared GPU script, dry-run on the CPU with the smoke config: it runs the pipeline, packs
the workdir into at most 8 files under 16 MiB, and prints a timing line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.dirname(REPO), "shared",
                                                    "tensorflow_datasets"))


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "cifar10")),
                    reason="CIFAR-10 TFDS copy not found (set TFDS_DATA_DIR)")
def test_run_script_packs_a_smoke_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, TFDS_DATA_DIR=DATA, WORKDIR=str(tmp_path / "work"), PORTABLE="",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", "experiments/gpu/run.sh", str(out), "configs/cifar10.py:smoke",
                           "--config.data.source=tfds"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[timing] run:" in proc.stdout
    files = sorted(os.listdir(out))
    assert {"results.json", "results.md", "dense_params.npz", "workdir.tar.gz", "log.txt"} <= set(files)
    assert len(files) <= 8
    assert all(os.path.getsize(out / f) < 16 * 2 ** 20 for f in files)
    rows = json.load(open(out / "results.json"))
    assert [r["method"] for r in rows][:2] == ["unpruned", "threshold"]
    with np.load(out / "dense_params.npz") as z:
        assert any(k.startswith("params/") for k in z.files)
        assert all(np.all(np.isfinite(z[k])) for k in z.files)
