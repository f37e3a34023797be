"""Fault injection: the CLI killed (SIGKILL) or interrupted (SIGINT) at points across every phase,
and on a rerun of a finished workdir, then resumed. After every stop no saved model or table row
is lost; the final table equals the uninterrupted run's. A flipped byte in a finished phase's
checkpoint is caught by its checksum and the previous good step is used."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

from jaxprune import modelio, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
# Tiny: digits smoke sizes, one hand-set method and one search of 3 rounds (so the search has
# checkpoints in the middle), a compile cache shared by all the restarts.
OVERRIDES = ["--config.prune.methods=threshold", "--config.search.methods=random",
             "--config.search.rounds=3", "--config.train.checkpoint_every=1", "--quiet"]
COMPARED = ("method", "accuracy", "params", "macs", "sparsity", "test_loss")


def cli_args(workdir, cache):
    return ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
            f"--config.train.compile_cache_dir={cache}", *OVERRIDES]


def table(workdir):
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: r.get(k) for k in COMPARED} for r in json.load(f)]


def assert_tables_equal(got, want):
    assert [r["method"] for r in got] == [r["method"] for r in want]
    for a, b in zip(got, want):
        for key in COMPARED[1:]:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["method"], key, a[key], b[key])


def restorable_models(workdir):
    """Methods with a finished saved model (its model.json, written once its step is on disk);
    each must restore (every file's sha256 and every array's checksum verified)."""
    out = set()
    models = os.path.join(workdir, "models")
    for method in sorted(os.listdir(models) if os.path.isdir(models) else []):
        if os.path.exists(os.path.join(models, method, modelio.MODEL_INFO)):
            pipeline.restore_model(workdir, method)  # raises if the model was lost or damaged
            out.add(method)
    return out


def run_to_end(workdir, cache):
    r = subprocess.run([sys.executable, "-m", "jaxprune.main", *cli_args(workdir, cache)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def run_and_stop(workdir, cache, sig, path, delay=0.0, timeout=900):
    """Runs the CLI, which sends itself `sig` `delay` seconds after `path` (relative to the
    workdir) changes: a new finished step in a folder of steps, or a file written (fault_child.py);
    returns (returncode, stderr)."""
    child = [sys.executable, os.path.join(REPO, "tests", "fault_child.py"), str(int(sig)),
             os.path.join(workdir, path), repr(float(delay)), "--", *cli_args(workdir, cache)]
    r = subprocess.run(child, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    return r.returncode, r.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cache = str(root / "compile_cache")
    workdir = str(root / "reference")
    run_to_end(workdir, cache)
    rows = table(workdir)
    assert [r["method"] for r in rows] == ["unpruned", "threshold", "random"]
    return root, cache, workdir, rows


@pytest.mark.slow
def test_killed_and_interrupted_anywhere_resumes_to_the_same_table(reference):
    root, cache, ref_dir, ref_rows = reference
    workdir = str(root / "faulty")
    rng = random.Random(0)
    K, I = signal.SIGKILL, signal.SIGINT
    points = [  # (signal, the next new step or file that triggers it), in the order they are made
        (K, "checkpoints/dense"),  # dense, after its first step
        (I, "checkpoints/dense"),  # dense, resumed, one step later
        (K, "models/unpruned"),  # the dense model just saved
        (I, "checkpoints/finetune_threshold"),  # hand-set fine-tune
        (K, "models/threshold"),  # compacted and saved
        (I, "checkpoints/search_random"),  # search, after a round
        (K, "search_random.json"),  # search finished
        (K, "checkpoints/finetune_random"),  # searched winner's fine-tune
        (K, "models/random"),  # the last model saved, report not yet written
    ]
    log = []
    rows_before, models_before = [], set()
    for sig, path in points:
        rc, err = run_and_stop(workdir, cache, sig, path)
        log.append(f"{signal.Signals(sig).name} at {path}: {rc}")
        if sig == I and rc != 0:
            assert rc == 130 and "rerun the same command to resume" in err, err[-3000:]
        elif sig == K:
            assert rc in (0, -signal.SIGKILL), err[-3000:]
        rows = table(workdir)
        # Nothing saved is lost: every table row and every restorable model is still there.
        assert {r["method"] for r in rows} >= {r["method"] for r in rows_before}, log
        models = restorable_models(workdir)
        assert models >= models_before, log
        rows_before, models_before = rows, models
    run_to_end(workdir, cache)
    assert_tables_equal(table(workdir), ref_rows)
    assert restorable_models(workdir) == {"unpruned", "threshold", "random"}

    # A rerun of the finished workdir, interrupted and killed: the table and models stay whole.
    for sig in (I, K):
        rc, err = run_and_stop(workdir, cache, sig, "run_info.json", delay=rng.uniform(0.0, 3.0))
        log.append(f"{signal.Signals(sig).name} in a rerun: {rc}")
        if sig == I and rc != 0:
            assert rc == 130 and "rerun the same command to resume" in err, err[-3000:]
        assert_tables_equal(table(workdir), ref_rows)
        assert restorable_models(workdir) == {"unpruned", "threshold", "random"}, log
    # The signals landed (not after the run had finished): all but perhaps the last model's.
    print("\n".join(log))  # shown when the test fails
    hits = sum(line.endswith((f": {-signal.SIGKILL}", ": 130")) for line in log)
    assert hits >= 10, "\n".join(log)

def _flip_newest_step(folder):
    step = max(int(n) for n in os.listdir(folder) if n.isdigit())
    files = glob.glob(os.path.join(folder, str(step), "state", "**", "d", "*"), recursive=True)
    for path in files:
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x04
        open(path, "wb").write(bytes(data))
    return step


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_byte_in_finished_checkpoints_uses_the_previous_good_step(reference):
    root, cache, ref_dir, ref_rows = reference
    workdir = str(root / "flipped")
    shutil.copytree(ref_dir, workdir)
    for phase in ("dense", "finetune_threshold"):  # their finished (newest) steps
        _flip_newest_step(os.path.join(workdir, "checkpoints", phase))
    bad_model_step = _flip_newest_step(os.path.join(workdir, "models", "threshold"))
    run_to_end(workdir, cache)
    assert_tables_equal(table(workdir), ref_rows)  # no row silently wrong
    restorable_models(workdir)
    kept = glob.glob(os.path.join(workdir, "models", "threshold", f"{bad_model_step}*"))
    assert kept  # the damaged step is kept on disk, not deleted
