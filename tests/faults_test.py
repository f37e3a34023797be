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
import time

import pytest

from jaxprune import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
# Tiny: digits smoke sizes, one hand-set method and one search of 3 rounds (so the search has
# checkpoints in the middle), a compile cache shared by all the restarts.
OVERRIDES = ["--config.prune.methods=threshold", "--config.search.methods=random",
             "--config.search.rounds=3", "--config.train.checkpoint_every=1", "--quiet"]
COMPARED = ("method", "accuracy", "params", "macs", "sparsity", "test_loss")


def command(workdir, cache):
    return [sys.executable, "-m", "jaxprune.main", "--config=configs/quickstart.py:smoke",
            f"--workdir={workdir}", f"--config.train.compile_cache_dir={cache}", *OVERRIDES]


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


def steps(folder):
    """Finished checkpoint steps in `folder` (not the temporary folders of unfinished saves)."""
    return {n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.isdigit()}


def restorable_models(workdir):
    """Methods with a finished saved model; each must restore (checksums verified)."""
    out = set()
    models = os.path.join(workdir, "models")
    for method in sorted(os.listdir(models) if os.path.isdir(models) else []):
        if steps(os.path.join(models, method)):
            pipeline.restore_model(workdir, method)  # raises if the model was lost or damaged
            out.add(method)
    return out


def run_to_end(workdir, cache):
    r = subprocess.run(command(workdir, cache), cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def run_and_stop(workdir, cache, sig, when, timeout=900):
    """Starts the CLI and sends `sig` as soon as `when()` is true; returns (returncode, stderr)."""
    proc = subprocess.Popen(command(workdir, cache), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if bool(when() if callable(when) else when):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


class NewFile:
    """True once a finished step appears in `workdir/path` (a folder of steps), or `workdir/path`
    appears (a file), that was not there when it was made."""

    def __init__(self, workdir, path):
        self.path = os.path.join(workdir, path)
        self.before = self._now()

    def _now(self):
        if self.path.endswith(".json"):
            return {self.path} if os.path.exists(self.path) else set()
        return steps(self.path)

    def __bool__(self):
        return bool(self._now() - self.before)


def after(seconds, condition):
    """`condition`, then `seconds` more."""
    state = {}

    def when():
        if "t" not in state and condition():
            state["t"] = time.time()
        return "t" in state and time.time() - state["t"] >= seconds
    return when


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
    new = lambda pattern: lambda: NewFile(workdir, pattern)  # noqa: E731
    points = [  # (signal, the next new file that triggers it), in the order the pipeline writes
        (K, new("checkpoints/dense")),  # dense, after its first step
        (I, new("checkpoints/dense")),  # dense, resumed, one step later
        (K, new("models/unpruned")),  # the dense model just saved
        (I, new("checkpoints/finetune_threshold")),  # hand-set fine-tune
        (K, new("models/threshold")),  # compacted and saved
        (I, new("checkpoints/search_random")),  # search, after a round
        (K, new("search_random.json")),  # search finished
        (K, new("checkpoints/finetune_random")),  # searched winner's fine-tune
        (K, new("models/random")),  # the last model saved, report not yet written
    ]
    log = []
    rows_before, models_before = [], set()
    for sig, make_when in points:
        rc, err = run_and_stop(workdir, cache, sig, make_when())
        log.append((signal.Signals(sig).name, rc))
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
        start = os.path.getmtime(os.path.join(workdir, "run_info.json"))
        rc, err = run_and_stop(workdir, cache, sig, after(
            rng.uniform(0.0, 3.0),
            lambda: os.path.getmtime(os.path.join(workdir, "run_info.json")) > start))
        log.append((signal.Signals(sig).name, rc))
        if sig == I and rc != 0:
            assert rc == 130 and "rerun the same command to resume" in err, err[-3000:]
        assert_tables_equal(table(workdir), ref_rows)
        assert restorable_models(workdir) == {"unpruned", "threshold", "random"}, log
    assert sum(rc in (-signal.SIGKILL, 130) for _, rc in log) >= 10, log

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
