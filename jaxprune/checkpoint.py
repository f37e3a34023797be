"""Checkpoints: the only module that imports orbax.

A `Checkpointer` owns one directory of numbered steps. Each step holds two items:
`state` (any pytree of arrays: a train state with params, masks, optimizer state, a controller
state, …) and `meta` (a small JSON dict: phase, epoch, search log, …).

    ckpt = Checkpointer(workdir + "/checkpoints/train", fingerprint={"model": "resnet20", ...})
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(like=state, fallback=True)
    ...
    ckpt.save(step, state, {"epoch": epoch})
    ckpt.wait()

Safety rules, in order of importance:
  * Nothing a user did not ask for is ever deleted. A directory written by a different run
    (its `fingerprint.json` differs) raises `CheckpointMismatchError`; a damaged step raises
    `CorruptCheckpointError` and is left on disk. The only deletions are the ones `max_to_keep`
    implies: the oldest *readable* steps of this run, once a newer save has finished.
  * Saves are asynchronous (orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames when
    done), so a run killed mid-save leaves the previous steps intact; the leftover temporary
    folder is reported and ignored.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

FINGERPRINT_FILE = "fingerprint.json"
_STATE, _META = "state", "meta"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_STEP_DIR = re.compile(r"^\d+$")


class CheckpointError(Exception):
    """Base class of the checkpoint errors a user can act on."""


class CheckpointMismatchError(CheckpointError):
    """The directory holds checkpoints of a different run (model, data, widths, …)."""


class CorruptCheckpointError(CheckpointError):
    """A step directory exists but cannot be read back."""


# ----------------------------------------------------------------------------------------------
# JSON helpers


def _to_json(obj: Any) -> Any:
    """Plain-JSON copy of `obj`: numpy / jax scalars and arrays become Python numbers / lists."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    return obj


def save_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON atomically: a temporary file in the same folder, then `os.replace`.

    A reader never sees a half-written file. numpy / jax numbers and arrays are converted.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_to_json(obj), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # our own temporary file only
        raise


def load_json(path: str) -> Any:
    """Reads a JSON file written by `save_json` (or any JSON file)."""
    with open(os.fspath(path)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Checkpointer


class Checkpointer:
    """Numbered checkpoints of one run in one directory (orbax `CheckpointManager`).

    Args:
      directory: folder of this run's steps; created if missing.
      max_to_keep: how many readable steps to keep (older ones are deleted after a newer save
        has finished). None keeps all.
      fingerprint: JSON-able dict naming what the checkpoints are for (model name, widths,
        dataset, number of classes, …). Written as `fingerprint.json` at the first save; if the
        directory already has one that differs, the constructor raises
        `CheckpointMismatchError`. None skips the check (e.g. for read-only use).
      async_save: write in a background thread (the default); `wait()` blocks until done.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2,
                 fingerprint: Optional[dict] = None, async_save: bool = True):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or int(max_to_keep) < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r}: use a positive int or None (keep all).")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self.fingerprint = None if fingerprint is None else _to_json(dict(fingerprint))
        self.last_restored_step: Optional[int] = None
        self._bad_steps: set[int] = set()
        self._fingerprint_written = False
        if self.fingerprint is not None:
            self._check_fingerprint()
        os.makedirs(self.directory, exist_ok=True)
        leftovers = sorted(n for n in os.listdir(self.directory) if _TMP_MARKER in n)
        if leftovers:
            logging.warning(
                "Checkpoint directory %s has unfinished saves %s (a run was stopped while saving). "
                "They are ignored; remove them yourself once you no longer need them.",
                self.directory, leftovers)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None,  # deletion is done here so that damaged steps are never deleted
                create=True, enable_async_checkpointing=bool(async_save)),
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _META: ocp.JsonCheckpointHandler()})

    # -- fingerprint ---------------------------------------------------------------------------

    def _check_fingerprint(self) -> None:
        path = os.path.join(self.directory, FINGERPRINT_FILE)
        if not os.path.exists(path):
            return
        try:
            stored = load_json(path)
        except (OSError, ValueError) as e:
            raise CheckpointMismatchError(
                f"{path} cannot be read ({e}), so it is unknown which run wrote the checkpoints in "
                f"{self.directory}. Use another --workdir, or fix or delete that directory "
                "yourself; nothing was deleted.") from e
        self._fingerprint_written = True
        if stored == self.fingerprint:
            return
        stored = stored if isinstance(stored, dict) else {"<fingerprint>": stored}
        keys = sorted(set(stored) | set(self.fingerprint))
        old = {k: stored.get(k, "<missing>") for k in keys}
        new = {k: self.fingerprint.get(k, "<missing>") for k in keys}
        diffs = [f"{k}: directory has {old[k]!r}, this run has {new[k]!r}"
                 for k in keys if old[k] != new[k]]
        raise CheckpointMismatchError(
            f"Checkpoint directory {self.directory} belongs to a different run; fields that "
            "differ: " + "; ".join(diffs)
            + f". The directory holds steps {self.all_steps_on_disk()} written for {stored}. "
            "Use another --workdir for this run, or delete that directory yourself if you no "
            "longer need it; nothing was deleted.")

    def _write_fingerprint(self) -> None:
        if self._fingerprint_written or self.fingerprint is None:
            return
        if jax.process_index() == 0:
            save_json(os.path.join(self.directory, FINGERPRINT_FILE), self.fingerprint)
        self._fingerprint_written = True

    # -- listing -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finished steps, ascending (unfinished temporary saves are not steps)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def all_steps_on_disk(self) -> list[int]:
        """Step folders present right now (without asking orbax); used in messages."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory) if _STEP_DIR.match(n))

    def latest_step(self) -> Optional[int]:
        """The newest finished step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def _check_step(self, step: int) -> Optional[str]:
        """Cheap structural check of one step folder; returns what is wrong, or None."""
        root = self._step_dir(step)
        if not os.path.isdir(root):
            tmp = [n for n in os.listdir(self.directory) if n.startswith(f"{step}{_TMP_MARKER}")]
            if tmp:
                return f"the save of step {step} never finished (only {tmp[0]} exists)"
            return "the step folder is missing"
        for item, metadata_file in ((_STATE, "_METADATA"), (_META, "metadata")):
            folder = os.path.join(root, item)
            if not os.path.isdir(folder):
                return f"its '{item}' folder is missing"
            path = os.path.join(folder, metadata_file)
            try:
                load_json(path)
            except (OSError, ValueError) as e:
                return f"{os.path.relpath(path, self.directory)} is missing or truncated ({e})"
        return None

    def _corrupt_error(self, step: int, problem: str) -> CorruptCheckpointError:
        others = [s for s in self.all_steps() if s != step and s not in self._bad_steps]
        return CorruptCheckpointError(
            f"Checkpoint step {step} in {self._step_dir(step)} cannot be read: {problem}. It was "
            "probably cut short (a killed run or a full disk). "
            + (f"Readable steps may be {others}: restore with fallback=True to use the newest of "
               "them, or " if others else "There is no other step to fall back to; ")
            + "move or delete that step folder yourself (nothing was deleted), or use another "
            "--workdir.")

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Optional[dict] = None, *,
             force: bool = False) -> bool:
        """Saves `state` (pytree) and `meta` (JSON dict) as `step`; returns whether it saved.

        An existing `step` is kept as it is (returns False) unless `force=True`, which replaces
        it. Saving a step older than the newest one also returns False unless `force=True` or
        every newer step is known to be damaged (after `restore(fallback=True)` went past them).
        Returns once the arrays are copied to host; the files are written in the background.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step={step}: checkpoint steps are non-negative ints.")
        self._manager.wait_until_finished()
        self._collect_garbage()
        steps = self.all_steps()
        if step in steps:
            if not force:
                return False
            problem = self._check_step(step)
            if problem is not None or step in self._bad_steps:
                raise self._corrupt_error(step, problem or "an earlier restore failed")
            self._manager.delete(step)  # replace our own readable step, as asked
            steps = self.all_steps()
        newer = [s for s in steps if s > step]
        if newer and not force:
            if not all(s in self._bad_steps or self._check_step(s) is not None for s in newer):
                return False
            force = True  # only damaged steps are newer: continue past them (they are kept)
        self._write_fingerprint()
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _META: ocp.args.JsonSave(_to_json(dict(meta or {})))})
        return bool(self._manager.save(step, args=args, force=force))

    def _collect_garbage(self) -> None:
        """Deletes the oldest readable steps beyond `max_to_keep` (never a damaged one)."""
        if self.max_to_keep is None:
            return
        good = [s for s in self.all_steps()
                if s not in self._bad_steps and self._check_step(s) is None]
        for step in good[:-self.max_to_keep]:
            self._manager.delete(step)

    def wait(self) -> None:
        """Blocks until pending saves are on disk (then applies `max_to_keep`)."""
        self._manager.wait_until_finished()
        self._collect_garbage()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore -------------------------------------------------------------------------------

    def restore(self, step: Optional[int] = None, *, like: Any = None,
                fallback: bool = False) -> tuple[Any, dict]:
        """Restores `(state, meta)` of `step` (default: the newest step).

        Args:
          step: which step; None → the newest.
          like: a pytree shaped like the saved state (arrays or `jax.ShapeDtypeStruct`s). The
            result has exactly its structure (NamedTuples, optax states, …) and its shardings.
            None → plain nested dicts/lists, arrays on the default device.
          fallback: when the step cannot be read, try the next older steps (logging a warning)
            instead of raising. The damaged step is left on disk.

        Raises:
          FileNotFoundError: there is no checkpoint (or no such step).
          CorruptCheckpointError: the step is damaged (and no fallback succeeded).
          ValueError: the checkpoint is readable but does not match `like`.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"No checkpoint in {self.directory}.")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            problem = self._check_step(step)
            if problem is not None and _TMP_MARKER in problem:
                raise self._corrupt_error(step, problem)
            raise FileNotFoundError(
                f"No checkpoint step {step} in {self.directory}; finished steps: "
                f"{steps or 'none'}.")
        candidates = [step] + ([s for s in reversed(steps) if s < step] if fallback else [])
        first_error = None
        for s in candidates:
            try:
                state, meta = self._restore_step(s, like)
            except CorruptCheckpointError as e:
                self._bad_steps.add(s)
                first_error = first_error or e
                if fallback:
                    logging.warning("%s Trying an older step.", e)
                continue
            if s != step:
                logging.warning("Restored step %d of %s instead of damaged step %d (left on disk).",
                                s, self.directory, step)
            self.last_restored_step = s
            return state, meta
        raise first_error

    def _restore_step(self, step: int, like: Any) -> tuple[Any, dict]:
        problem = self._check_step(step)
        if problem is not None:
            raise self._corrupt_error(step, problem)
        abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            if abstract is None:
                abstract = self._abstract_from_metadata(step)
            out = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}))
        except Exception as e:  # orbax/tensorstore raise many types; sort them out below
            if like is not None and self._readable_without_template(step):
                raise ValueError(
                    f"Checkpoint step {step} in {self.directory} does not match the state "
                    f"template `like`: {e}") from e
            raise self._corrupt_error(step, f"{type(e).__name__}: {e}") from e
        if _STATE not in out or _META not in out or out[_META] is None:
            raise self._corrupt_error(step, "an item came back empty")
        return out[_STATE], dict(out[_META])

    def _abstract_from_metadata(self, step: int) -> Any:
        """Restore target built from the saved metadata: arrays go to this host's first device
        (so a checkpoint written on other devices, e.g. a GPU, still restores); scalars stay
        Python scalars."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        tree = self._manager.item_metadata(step)[_STATE].tree

        def leaf(m):
            if isinstance(m, ocp.metadata.ScalarMetadata):
                return np.zeros((), m.dtype).item()
            if isinstance(m, ocp.metadata.ArrayMetadata):
                sharding = None if m.sharding is None else device  # None: saved from numpy
                return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
            return m

        return jax.tree.map(leaf, tree)

    def _readable_without_template(self, step: int) -> bool:
        try:
            self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(self._abstract_from_metadata(step)),
                _META: ocp.args.JsonRestore()}))
            return True
        except Exception:  # noqa: BLE001 - any failure means the files themselves are bad
            return False
