"""Test environment (set before JAX is imported anywhere), the two tiers, and xdist defaults.

Tiers: `python -m pytest -q` runs the default tier; `-m slow` runs the slow tier alone (the tests
marked `@pytest.mark.slow`: fault injection, a resumed CLI rerun, notebooks, the GPU script,
multi-process, real data, the costliest model sizes) and `--runslow` runs both.
"""
import fcntl
import json
import os
import subprocess
import sys
import types

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The tests' models are tiny, so compiling is much of what the suite spends. Without LLVM's
# expensive passes it compiles faster and the programs still run fused (measured side by side,
# loaded machine: train_test + models_test 300 -> 234 user-s, search_evaluate_test +
# discover_attention_test 215 -> 205). Turning most optimizations off
# (JAX_DISABLE_MOST_OPTIMIZATIONS) was tried and rejected: compile-bound files got ~40 % cheaper,
# but unfused programs ran the training tests up to 5x slower: the whole default tier took 2,568
# CPU-s against 1,080-1,260 in earlier runs.
if "--xla_llvm_disable_expensive_passes" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_llvm_disable_expensive_passes=true"
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
os.environ["JAX_DEBUG_KEY_REUSE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tensorflow_datasets")
if os.path.isdir(_SHARED):
    os.environ.setdefault("TFDS_DATA_DIR", _SHARED)
# Resolved once, against the folder pytest was started from: notebooks' kernels and CLI children
# run in other folders and inherit the environment, so a relative `TFDS_DATA_DIR=../shared/...`
# (the README's test command) would name another folder there.
if os.environ.get("TFDS_DATA_DIR"):
    os.environ["TFDS_DATA_DIR"] = os.path.abspath(os.environ["TFDS_DATA_DIR"])

# The Ctrl-C tests send SIGINT to CLI subprocesses. A suite started with SIGINT ignored (under
# `nohup`, or `cmd &` from a script) passes that on to every child, and `jaxprune.main` rightly
# leaves an ignored SIGINT alone; restore the default here so those children can be interrupted.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow tier (tests marked @pytest.mark.slow)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """One xdist worker per CPU, each test file on one worker (module fixtures, such as a trained
    smoke run, are built once), unless `-n`/`--dist` are given; `-p no:xdist` runs serially.
    (Set here rather than in pyproject's addopts, where `-n` breaks `-p no:xdist`.)"""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput") \
            or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if config.option.numprocesses is None and not config.getoption("collectonly"):
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            config.option.dist = "loadfile"


def pytest_configure(config):
    """The default tier compiles at LLVM optimization level 1 (XLA's default is 2): its tests
    are compile-bound (XLA compilation was 631 of 1,027 test-seconds in one profiled run), and
    interleaved runs of four compile-heavy files took 67.3 / 68.2 s at the default level against
    48.5 / 47.4 s at level 1 (level 0: 42.0 / 40.6 s, but level 0 ran training loops several
    times slower, see above). The slow tier keeps XLA's default: it reproduces committed
    accuracies of real-data runs. Set here, before any test runs JAX; children inherit it."""
    if _runs_slow_tier(config) or "--xla_backend_optimization_level" in os.environ["XLA_FLAGS"]:
        return
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"


def _runs_slow_tier(config) -> bool:
    return config.getoption("--runslow") or "slow" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config, items):
    if _runs_slow_tier(config):
        return  # the -m expression chooses
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = "configs/quickstart.py:smoke"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One CLI run of `configs/quickstart.py:smoke` (every method), stdout and stderr redirected
    to a file, shared by the tests that read a finished run: made once per session, also across
    xdist workers (the first worker to ask makes it under a file lock, the others wait and read
    it). Read it only; a test that runs the pipeline on it again works on a copy (`copy_run`).

    Returns a namespace: config, workdir, log (the run's output), rows (its results.json)."""
    from jaxprune import pipeline

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    folder = root / "smoke_run"
    workdir, log, status = folder / "work", folder / "run.log", folder / "returncode"
    with open(root / "smoke_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not status.exists():
            folder.mkdir(exist_ok=True)
            with open(log, "wb") as out:
                done = subprocess.run(
                    [sys.executable, "-m", "jaxprune.main", f"--config={SMOKE_CONFIG}",
                     f"--workdir={workdir}"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                    stdout=out, stderr=out, timeout=900)
            status.write_text(str(done.returncode))
    text = log.read_text()
    assert status.read_text() == "0", text[-3000:]
    with open(workdir / "results.json") as f:
        rows = json.load(f)
    return types.SimpleNamespace(config=pipeline.load_config(SMOKE_CONFIG), workdir=str(workdir),
                                 log=text, rows=rows)


@pytest.fixture
def copy_run(smoke_run, tmp_path):
    """A private copy of the shared smoke run's workdir, for tests that run the pipeline on it."""
    import shutil

    workdir = str(tmp_path / "run_copy")
    shutil.copytree(smoke_run.workdir, workdir, ignore=shutil.ignore_patterns("*.lock"))
    return workdir
