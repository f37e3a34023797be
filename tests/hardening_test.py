"""Issue 20 beyond model I/O: checkpoint errors stay one line and name only good steps, config
errors name the real cause, workdirs of older versions continue (or say the flag that does).

Fast: checkpoints of a few small arrays, fingerprints without steps, config parsing in a child
process that stops before JAX is imported.
"""
import glob
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from checkpoint_test import _flip_bytes_in_arrays  # tests/ is on sys.path under pytest
from jaxprune import checkpoint as ckpt_lib
from jaxprune import config_checks, errors, pipeline
from jaxprune import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT = {"model": "lenet5", "dataset": "digits"}


def _state(value):
    return {"w": jnp.full((4, 3), float(value)), "b": jnp.arange(3.0) * value}


# ----------------------------------------------------------------------------------------------
# Checkpoints: fallback hints name good steps only; library messages stay out of the line


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fallback_hint_never_names_a_step_that_failed(tmp_path):
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, fingerprint=FINGERPRINT) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step))
    _flip_bytes_in_arrays(tmp_path / "3")
    _flip_bytes_in_arrays(tmp_path / "2")
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, fingerprint=FINGERPRINT, fallback=True)
    state, _ = ckpt.restore(like=_state(0))  # 3 and 2 fail their checksums, 1 is good
    assert ckpt.last_restored_step == 1 and float(state["w"][0, 0]) == 1.0
    _flip_bytes_in_arrays(tmp_path / "1")
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, fingerprint=FINGERPRINT, fallback=True)
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as info:
        ckpt.restore(like=_state(0))
    text = str(info.value)
    assert "Step 3" not in text and "There is no other step to fall back to" in text, text
    assert "Steps [1, 2] failed too" in text
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_deleted_array_file_gives_one_short_line(tmp_path):
    with ckpt_lib.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
        ckpt.save(1, _state(1))
    for path in glob.glob(str(tmp_path / "1" / "state" / "**" / "d" / "*"), recursive=True):
        os.remove(path)
    ckpt = ckpt_lib.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as info:
        ckpt.restore(like=_state(0))
    text = str(info.value)
    assert "\n" not in text and len(text) < 700, len(text)  # not a 2,000-character spec
    ckpt.close()


def test_short_keeps_the_start_and_the_cause_of_a_library_message():
    message = ('DATA_LOSS: Error opening "zarr" driver: ' + "Error reading x: " * 40
               + "CRC-32C checksum verification failed [tensorstore_spec='" + "{}" * 900
               + "']\nTraceback ...")
    text = errors.short(ValueError(message))
    assert text.startswith("ValueError: DATA_LOSS: Error opening") and len(text) <= 300
    assert text.endswith("CRC-32C checksum verification failed") and "\n" not in text
    indexed = errors.short(ValueError("DATA_LOSS: checksum failed [tensorstore_spec[1]='{}']"))
    assert indexed == "ValueError: DATA_LOSS: checksum failed"


# ----------------------------------------------------------------------------------------------
# Workdirs of older versions


def _workdir_with(tmp_path, phase, fingerprint):
    folder = tmp_path / "work" / "checkpoints" / phase
    folder.mkdir(parents=True)
    (folder / ckpt_lib.FINGERPRINT_FILE).write_text(json.dumps(fingerprint))
    return str(tmp_path / "work")


CAMPAIGN = os.path.join(REPO, "experiments", "2026-12-03_resnet20_cpu", "workdir")


@pytest.mark.skipif(not os.path.isdir(os.path.join(CAMPAIGN, "checkpoints")),
                    reason="the ResNet-20 campaign's snapshot is not in this checkout")
def test_the_resnet20_campaign_of_9723022_stays_resumable():
    """The committed snapshot of the converged ResNet-20 campaign (started at commit 9723022):
    today's config must match every phase's fingerprint, key for key (read only)."""
    config = pipeline.load_config("cifar10:resnet20_cpu")
    assert pipeline.check_workdir(config, CAMPAIGN) == {}


def test_a_key_older_versions_lacked_continues_with_the_flag(tmp_path):
    config = pipeline.load_config("quickstart:smoke")
    settings = config_checks.phase_settings(config, "dense")
    workdir = _workdir_with(tmp_path, "dense", settings)
    assert pipeline.check_workdir(config, workdir) == {}
    config.train.newer_key = 3  # a key a later version added
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as info:
        pipeline.check_workdir(config, workdir)
    text = str(info.value)
    assert "--continue_older" in text and "`train.newer_key` (now 3)" in text, text
    assert pipeline.check_workdir(config, workdir, continue_older=True) == {
        "dense": {"train.newer_key": 3}}
    assert not workdir_lib.continued_before(workdir)
    pipeline.write_run_info(config, workdir, {"dense": {"train.newer_key": 3}})
    info = json.load(open(os.path.join(workdir, "run_info.json")))
    assert info["continued_older"] == {"dense": {"train.newer_key": 3}}
    assert workdir_lib.continued_before(workdir)  # the same command resumes it without the flag


def test_a_neutral_key_continues_by_itself_and_names_its_value_otherwise(tmp_path, monkeypatch):
    monkeypatch.setitem(config_checks.NEUTRAL, "train.newer_key", 0)
    config = pipeline.load_config("quickstart:smoke")
    workdir = _workdir_with(tmp_path, "dense", config_checks.phase_settings(config, "dense"))
    config.train.newer_key = 0  # what versions before the key did
    assert pipeline.check_workdir(config, workdir) == {}
    config.train.newer_key = 2
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"add --config.train.newer_key=0 to continue them"):
        pipeline.check_workdir(config, workdir)


def test_checkpointer_matches_a_recipe_field_the_old_fingerprint_lacks(tmp_path):
    with ckpt_lib.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
        ckpt.save(1, _state(1))
    newer = dict(FINGERPRINT, steps_per_call=8)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="--continue_older"):
        ckpt_lib.Checkpointer(tmp_path, fingerprint=newer)
    ckpt_lib.Checkpointer(tmp_path, fingerprint=newer, before={"steps_per_call": 8}).close()
    ckpt_lib.Checkpointer(tmp_path, fingerprint=newer, continue_older=True).close()


# ----------------------------------------------------------------------------------------------
# Config errors name the real cause (the CLI's flag parsing; no JAX is imported)


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "jaxprune.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return done.returncode, done.stderr.strip()


@pytest.mark.slow
def test_config_errors_name_the_real_cause(tmp_path):
    none = tmp_path / "none.py"
    none.write_text("def get_config(arg=None):\n    return None\n")
    workdir = f"--workdir={tmp_path / 'w'}"
    cases = {
        ("--config=configs/quickstart.py", "--config.trian.epochs=3"):
            "--config.trian.epochs: the config has no key trian.epochs; did you mean "
            "--config.train.epochs?",
        ("--config=configs/quickstart.py", "--config.train.epohcs=3"):
            "did you mean --config.train.epochs?",
        (f"--config={none}",): "get_config() returned None",
    }
    for args, needle in cases.items():
        status, err = _cli(*args, workdir)
        assert status == 2 and err.count("\n") == 0 and err.startswith("jaxprune: error: "), err
        assert needle in err and "fails to load" not in err, err
    assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------------------------
# The CLI's log: libraries' records and tracebacks to workdir/jaxprune.log, not the terminal


def test_library_records_go_to_the_log_file_only(tmp_path):
    import logging
    import threading

    from jaxprune import main

    root = logging.getLogger()
    terminal = logging.StreamHandler()
    shown = []
    terminal.emit = lambda record: shown.append(record.getMessage() + str(record.exc_info))
    before, hook = list(root.handlers), sys.excepthook
    root.handlers = [terminal]
    try:
        main._route_logs(str(tmp_path))
        try:
            raise ValueError("RESOURCE_EXHAUSTED: " + "spec " * 500)
        except ValueError:
            orbax = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/future.py", 1,
                                      "save failed", None, sys.exc_info())
            ours = logging.LogRecord("root", logging.WARNING, main.__file__, 1,
                                     "Restored step 1", None, sys.exc_info())
        root.handle(orbax)
        root.handle(ours)
        errors.details.info("Restoring step 2 failed:")
        thread = threading.Thread(target=lambda: sys.excepthook(RuntimeError, RuntimeError(
            "Event loop is closed"), None))
        thread.start()
        thread.join()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, sys.excepthook = before, hook
        errors.details.setLevel(logging.NOTSET)
    assert shown == ["Restored step 1None"]  # ours, one line, no traceback
    log = open(tmp_path / main.LOG_FILE).read()
    assert "save failed" in log and "RESOURCE_EXHAUSTED" in log and "Traceback" in log
    assert "Restoring step 2 failed" in log and "Event loop is closed" in log


def test_load_config_says_get_config_returned_none(tmp_path):
    path = tmp_path / "none.py"
    path.write_text("def get_config(arg=None):\n    return None\n")
    with pytest.raises(errors.ConfigError, match="get_config\\(\\) returned NoneType"):
        pipeline.load_config(str(path))
