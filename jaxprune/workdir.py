"""The workdir of a run: created and locked (`prepare`), checked against the config before
anything is written (`check_workdir`), the run's record (`write_run_info`), and each phase's
fingerprinted checkpoints (`checkpointer`). Shared by the pipeline and the benchmarks that
resume from a workdir. Nothing in a workdir is ever deleted here.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Optional

import jax

from jaxprune import checkpoint as ckpt_lib
from jaxprune import config_checks
from jaxprune import errors
from jaxprune import report as report_lib


def prepare(workdir: str) -> str:
    """Creates the workdir and takes its lock; a path that cannot be one is a `WorkdirError`."""
    if not str(workdir or "").strip():
        raise errors.WorkdirError("--workdir is empty; give a directory for checkpoints and "
                                  "results, e.g. --workdir=runs/quickstart.")
    workdir = os.fspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise errors.WorkdirError(f"--workdir {workdir} is a file, not a directory; use another "
                                  "path (nothing was changed).")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise errors.WorkdirError(f"--workdir {workdir} cannot be created ({e.strerror or e}); "
                                  "use a path you can write to.") from e
    ckpt_lib.lock_workdir(workdir)
    return workdir


def continued_before(workdir: str) -> bool:
    """Whether an earlier start on `workdir` continued checkpoints of another version."""
    try:
        info = ckpt_lib.load_json(os.path.join(workdir, "run_info.json"))
    except (OSError, ValueError):
        return False
    starts = info.get("starts") if isinstance(info, dict) else None
    return any(isinstance(s, dict) and (s.get("continued_older") or s.get("continue_older"))
               for s in starts or [])


def check_workdir(config, workdir: str, continue_older: bool = False) -> dict:
    """Refuses, before anything is written, a workdir whose checkpoints were made with other
    settings (by the first config key that differs), or whose fingerprint is missing. Only the
    phases of this config's methods count: dropping a method from the list is not a change.

    Checkpoints of another version of jaxprune, which did not record a key this one has: a key
    of `config_checks.NEUTRAL` matches at its neutral value (what versions before it did); any
    other is refused with the flag that continues them (`continue_older`: at the current
    values). Returns {phase: {key: value}} of the keys matched so (for run_info.json)."""
    root = os.path.join(workdir, "checkpoints")
    continued = {}
    if not os.path.isdir(root):
        return continued
    methods = set(config_checks.methods(config.prune.methods)) | set(
        config_checks.methods(config.search.methods))
    for name in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, name)):
            continue
        kind, _, rest = name.partition("_")
        if name != "dense" and rest.split("_")[0] not in methods:
            continue
        assumed = {}
        ckpt_lib.check_fingerprint(os.path.join(root, name),
                                   config_checks.phase_settings(config, name),
                                   keys=config_checks.is_setting, before=config_checks.NEUTRAL,
                                   continue_older=continue_older, assumed=assumed)
        if assumed:
            continued[name] = assumed
    return continued


def write_run_info(config, workdir: str, continued: Optional[dict] = None,
                   continue_older: bool = False) -> None:
    """Writes the resolved config and the package versions into the workdir: `run_info.json`
    holds the latest start and, under `starts`, every start; `config.txt` the latest config.
    `continued`: {phase: {key: value}} of settings that the phase's checkpoints (made by
    another version) did not record and that this start took at these values;
    `continue_older`: this start continues such checkpoints (so will the next ones).
    Called only once the config and the workdir's checkpoints have passed their checks."""
    import importlib.metadata as md
    import socket
    import sys

    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "ml-collections",
                "tensorflow-datasets", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    devices = jax.devices()
    info = {"config": config.to_dict(), "versions": versions,
            "devices": [str(d) for d in devices], "platform": devices[0].platform,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
            "host": socket.gethostname(), "argv": list(sys.argv)}
    if continued:
        info["continued_older"] = continued
    if continue_older:
        info["continue_older"] = True
    path = os.path.join(workdir, "run_info.json")
    try:
        old = ckpt_lib.load_json(path)
    except (OSError, ValueError):
        old = {}
    starts = old.get("starts") if isinstance(old, dict) else None
    if starts is None:  # the format before the history: one start
        starts = [old] if isinstance(old, dict) and old.get("config") else []
    ckpt_lib.save_json(path, dict(info, starts=list(starts) + [info]))
    report_lib.write_text(os.path.join(workdir, "config.txt"), str(config))


def checkpointer(workdir: str, config, phase: str, fingerprint: dict,
                 extra: Optional[dict] = None, continue_older: bool = False):
    """The checkpoints of `phase` in `workdir/checkpoints/<phase>`, fingerprinted with
    `fingerprint` (the model and the data), every config key the phase's result depends on
    (`config_checks.phase_settings`) and `extra`; a damaged newest step falls back to the
    previous good one."""
    fingerprint = {**fingerprint, **config_checks.phase_settings(config, phase), **(extra or {})}
    return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints", phase),
                                 max_to_keep=2, fingerprint=fingerprint, fallback=True,
                                 before=config_checks.NEUTRAL, continue_older=continue_older)
