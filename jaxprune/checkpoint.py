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
  * Every saved array has a CRC-32 in the step's meta; a restore recomputes them, so a flipped
    byte is reported as a corrupt step (and `fallback` uses the newest older good step) instead
    of flowing into results. A damaged step that a newer save must replace is renamed to
    `<step>.corrupt-<time>`, never deleted.
  * A directory with steps but without `fingerprint.json` is refused: it is unknown what wrote it.
  * `save_replacing` (saved models) writes a new step before the old one is removed, so a kill at
    any moment leaves a readable model.

orbax's `CheckpointManager` (0.12) does the step folders (`<step>/{state,meta}`, the layout of
older runs, which resume unchanged), the atomic, asynchronous saves, which steps to save
(`should_save`: none older than the newest) and the deletions of `max_to_keep` (a
`preservation_policy`, applied by orbax once the newer step is on disk). What stays here, with
the orbax limitation that keeps it here:
  * Retention counts readable steps only and keeps damaged ones: `max_to_keep` / `LatestN` count
    every step folder and delete any, so orbax gets `_KeepReadable` as its policy instead.
  * Per-array CRC-32: TensorStore's CRC-32C covers OCDBT tree nodes and zarr3 shard indexes, not
    the array bytes; orbax reads a flipped data byte back as a silently changed value.
  * Damaged steps renamed `<step>.corrupt-<time>` and restore falling back to the newest good step:
    orbax restores the step it is asked for, and `todelete_subdir` only moves what retention drops.
  * Replacing a step (`force=True`): orbax refuses to save over one (`StepAlreadyExistsError`), so
    the old step waits as `<step>.replaced` until the new one is on disk.
  * `save_replacing`'s `on_saved` between "new step on disk" and "old step removed": orbax deletes
    in the same finalize step that commits a save, so retention is held and applied after it.
  * Fingerprints: orbax writes root metadata but never compares it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from jaxprune import errors
from jaxprune import files
from jaxprune import report

FINGERPRINT_FILE = "fingerprint.json"
_STATE, _META = "state", "meta"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_STEP_DIR = re.compile(r"^\d+$")
_REPLACED = ".replaced"  # `<step>.replaced`: a step set aside while its replacement is saved
_ASIDE_DIR = re.compile(r"^(\d+)\.replaced$")
_CHECKSUMS = "_checksums"  # meta key holding {leaf path: checksum}; stripped on restore


class CheckpointError(errors.UserError):
    """Base class of the checkpoint errors a user can act on."""


class CheckpointMismatchError(CheckpointError):
    """The directory holds checkpoints of a different run (model, data, widths, config, …)."""


class CorruptCheckpointError(CheckpointError):
    """A step directory exists but cannot be read back, or its arrays fail their checksums."""


class TemplateMismatchError(CheckpointError, ValueError):
    """The step is readable but shaped unlike the state template `like`."""


# ----------------------------------------------------------------------------------------------
# JSON helpers


def save_json(path: str, obj: Any) -> None:
    """Writes `obj` as strict JSON atomically: a temporary file in the same folder, fsync, then
    `os.replace`. A reader never sees a half-written file. numpy / jax numbers and arrays are
    converted; NaN and infinities become null.
    """
    with files.atomic_open(path, "w") as f:
        json.dump(report.strict_json(obj), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def load_json(path: str) -> Any:
    """Reads a JSON file written by `save_json` (or any JSON file)."""
    with open(os.fspath(path)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Fingerprints and checksums


def _step_folders(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if _STEP_DIR.match(n))


def check_fingerprint(directory: str, fingerprint: dict, keys=None, *,
                      before: Optional[dict] = None, continue_older: bool = False,
                      assumed: Optional[dict] = None) -> bool:
    """Compares `directory/fingerprint.json` with `fingerprint`; returns whether one is stored.

    `keys`: a predicate on field names; only those fields are compared (None: all). Raises
    `CheckpointMismatchError` naming every field that differs, or when the directory holds
    steps but no (readable) fingerprint, since then it is unknown which run wrote them.

    Fields that one side lacks come from another version of jaxprune (a key added or removed
    since). `before` ({field: value}) gives the value that versions before a field existed
    behaved as: a stored fingerprint without it matches that value. Any other such field is
    refused with the flag that continues anyway: with `continue_older`, they match at the
    current values. `assumed` (a dict), when given, receives every field matched this way.
    """
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, FINGERPRINT_FILE)
    if not os.path.exists(path):
        steps = _step_folders(directory)
        if steps:
            raise CheckpointMismatchError(
                f"{directory} holds checkpoint steps {steps} but no {FINGERPRINT_FILE}, so it is "
                "unknown which config wrote them. Use another --workdir, or move that directory "
                "away yourself to redo the phase; nothing was deleted.")
        return False
    try:
        stored = load_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(
            f"{path} cannot be read ({errors.short(e)}), so it is unknown which run wrote the "
            f"checkpoints in {directory}. Use another --workdir, or fix or delete that directory "
            "yourself; nothing was deleted.") from e
    stored = stored if isinstance(stored, dict) else {"<fingerprint>": stored}
    new = report.strict_json(dict(fingerprint))
    before = report.strict_json(dict(before or {}))
    names = sorted(k for k in set(stored) | set(new) if keys is None or keys(k))
    diffs, unrecorded, older = [], [], {}
    for k in names:
        old_v, new_v = stored.get(k, _ABSENT), new.get(k, _ABSENT)
        if old_v == new_v:
            continue
        if old_v is _ABSENT and k in before:
            if new_v == before[k]:
                older[k] = new_v
            else:
                diffs.append(f"`{k}` did not exist when they were made (as {k}={before[k]!r}), "
                             f"now {_shown(new_v)}: add --config.{k}={before[k]!r} to continue "
                             "them")
        elif old_v is _ABSENT or new_v is _ABSENT:
            if continue_older:
                older[k] = None if new_v is _ABSENT else new_v
            else:
                state = f"now {_shown(new_v)}" if old_v is _ABSENT else \
                    f"was {_shown(old_v)}, unknown now"
                unrecorded.append(f"`{k}` ({state})")
        else:
            diffs.append(f"`{k}` was {_shown(old_v)}, now {_shown(new_v)}")
    if len(diffs) > 8:
        diffs = diffs[:8] + [f"and {len(diffs) - 8} more"]
    if diffs:
        raise CheckpointMismatchError(
            f"Checkpoints in {directory} were made with other settings: " + "; ".join(diffs)
            + (f"; another version recorded {', '.join(unrecorded[:4])} differently"
               if unrecorded else "")
            + ". Use another --workdir, or restore the value(s); nothing was deleted.")
    if unrecorded:
        raise CheckpointMismatchError(
            f"Checkpoints in {directory} were made by another version of jaxprune, which did "
            f"not record the same settings: {', '.join(unrecorded[:6])}"
            + (f" and {len(unrecorded) - 6} more" if len(unrecorded) > 6 else "")
            + ". Rerun with --continue_older to continue them with the current values (noted "
            "in run_info.json), or use another --workdir; nothing was deleted.")
    if assumed is not None:
        assumed.update(older)
    return True


_ABSENT = object()


def _shown(value) -> str:
    return "not set" if value is _ABSENT else repr(value)


def _leaf_name(path) -> str:
    """A path name that is the same for a NamedTuple / dataclass field and a dict key."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _host_array(x) -> Optional[np.ndarray]:
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None  # multi-host arrays: no host-local copy to check
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
    return np.asarray(x)


def _checksum(x, dtype: Optional[str] = None) -> Optional[str]:
    """`crc32:dtype:shape` of an array; 0-d values by value (they may come back as Python
    scalars of another type)."""
    a = _host_array(x)
    if a is None or a.dtype == object:
        return None
    if a.ndim == 0:
        return f"value:{float(a.astype(np.float64))!r}"
    if dtype is not None and str(a.dtype) != dtype:
        a = a.astype(dtype)
    return f"crc32:{a.dtype}:{list(a.shape)}:{zlib.crc32(np.ascontiguousarray(a).tobytes()):08x}"


def checksums(tree) -> dict:
    """{leaf path: checksum} of every array of `tree`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        c = _checksum(leaf)
        if c is not None:
            out[_leaf_name(path)] = c
    return out


def _verify(tree, expected: dict) -> Optional[str]:
    """What does not match the stored checksums, or None."""
    leaves = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    bad = []
    for name, want in expected.items():
        if name not in leaves:
            continue  # restored into a template without that leaf; its shape check is orbax's
        dtype = want.split(":")[1] if want.startswith("crc32:") else None
        if _checksum(leaves[name], dtype) != want:
            bad.append(name)
    if bad:
        return (f"the checksum of {len(bad)} saved array(s) does not match ({', '.join(bad[:3])}"
                f"{', …' if len(bad) > 3 else ''}): the files were altered after saving")
    return None


# ----------------------------------------------------------------------------------------------
# Checkpointer


class _KeepReadable(preservation_policy.PreservationPolicy):
    """orbax preservation policy: the newest `n` readable steps (all when None) and every damaged
    one. Orbax asks it in `save`, before the new step (`writing`) is on disk, and deletes what it
    does not keep once that step is; `hold` keeps everything (see `save_replacing`)."""

    def __init__(self, n: Optional[int], damaged_fn):
        self.n, self.damaged_fn, self.writing, self.hold = n, damaged_fn, None, False

    def removable(self, steps) -> list[int]:
        if self.n is None or self.hold:
            return []
        readable = sorted(s for s in steps if s == self.writing or not self.damaged_fn(s))
        return readable[:-self.n]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        removed = set(self.removable([c.step for c in checkpoints]))
        return [c.step not in removed for c in checkpoints]


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
      fallback: the default of `restore(fallback=...)`.
      before, continue_older: how fields that a stored fingerprint lacks (written by another
        version) are matched; see `check_fingerprint`.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2,
                 fingerprint: Optional[dict] = None, async_save: bool = True,
                 fallback: bool = False, before: Optional[dict] = None,
                 continue_older: bool = False):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or int(max_to_keep) < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r}: use a positive int or None (keep all).")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self.fingerprint = None if fingerprint is None else report.strict_json(dict(fingerprint))
        self.last_restored_step: Optional[int] = None
        self.fallback = bool(fallback)
        self._bad_steps: set[int] = set()
        self._pending_aside: set[int] = set()
        self._fingerprint_written = False
        self._older = {"before": before, "continue_older": bool(continue_older)}
        if self.fingerprint is not None:
            self._check_fingerprint()
        os.makedirs(self.directory, exist_ok=True)
        if fingerprint is not None:  # a writer: finish what a killed replacement left
            self._finish_replacements()
        leftovers = sorted(n for n in os.listdir(self.directory) if _TMP_MARKER in n)
        if leftovers:
            logging.warning(
                "Checkpoint directory %s has unfinished saves %s (a run was stopped while saving). "
                "They are ignored; remove them yourself once you no longer need them.",
                self.directory, leftovers)
        self._retention = _KeepReadable(self.max_to_keep, self._damaged)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=self._retention, create=True,
                enable_async_checkpointing=bool(async_save)),
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _META: ocp.JsonCheckpointHandler()})

    # -- fingerprint ---------------------------------------------------------------------------

    def _check_fingerprint(self) -> None:
        self._fingerprint_written = check_fingerprint(self.directory, self.fingerprint,
                                                      **self._older)

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
        return _step_folders(self.directory)

    def latest_step(self) -> Optional[int]:
        """The newest finished step, or None when there is none."""
        return max(self.all_steps(), default=None)

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

    def _damaged(self, step: int) -> bool:
        """Known damaged (a failed restore, `mark_damaged`) or failing the structural check."""
        return step in self._bad_steps or self._check_step(step) is not None

    def _corrupt_error(self, step: int, problem: str) -> CorruptCheckpointError:
        """The error for a damaged `step`; the steps it suggests are never known-damaged ones
        (raise it again after trying others, so it names what they turned out to be)."""
        failed = sorted(self._bad_steps - {step})
        others = [s for s in self.all_steps() if s != step and s not in self._bad_steps]
        error = CorruptCheckpointError(
            f"Checkpoint step {step} in {self._step_dir(step)} cannot be read: {problem}. It was "
            "probably cut short (a killed run or a full disk) or altered. "
            + (f"Steps {failed} failed too. " if failed else "")
            + (f"Steps not yet found damaged: {others}; restore with fallback=True to use the "
               "newest readable one, or " if others else
               "There is no other step to fall back to; ")
            + "move or delete that step folder yourself (nothing was deleted), or use another "
            "--workdir.")
        error.step, error.problem = step, problem
        return error

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
        self.wait()
        if step in self.all_steps():
            if self._damaged(step):  # a newer save replaces a damaged step: kept aside, never
                self._quarantine(step)  # deleted
            elif force:  # our own readable step, replaced as asked: removed only once the new
                self._set_aside(step)  # one is on disk (a kill in between restores it)
            self._manager.reload()
        newer = [s for s in self.all_steps() if s >= step]
        if not force and newer and all(self._damaged(s) for s in newer):
            force = True  # only damaged steps are newer: continue past them (they are kept)
        if not force and not self._manager.should_save(step):
            return False  # orbax's rule: a step not newer than the newest one is not saved
        self._write_fingerprint()
        meta = dict(report.strict_json(dict(meta or {})), **{_CHECKSUMS: checksums(state)})
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _META: ocp.args.JsonSave(meta)})
        self._retention.writing = step
        return bool(self._manager.save(step, args=args, force=force))

    def save_replacing(self, state: Any, meta: Optional[dict] = None, *, force: bool = False,
                       on_saved=None) -> bool:
        """Makes `state` the newest step without a moment with no readable step: it is saved as a
        new step and waited for; then `on_saved(step)` is called (e.g. to describe the new step
        in a file beside it); only then `max_to_keep` removes older ones. Skipped (returns False)
        when the newest step already holds exactly this state and meta and reads back, unless
        `force`; `on_saved` is then called with that step, again before older steps (left by a
        replacement stopped before it removed them) are removed. A damaged step it replaces (found so, or `mark_damaged`) is renamed to
        `<step>.corrupt-<time>`, never removed."""
        self.wait()
        steps = self.all_steps()
        if steps and not force:
            last = steps[-1]
            try:
                stored = load_json(os.path.join(self._step_dir(last), _META, "metadata"))
            except (OSError, ValueError):
                stored = None
            wanted = dict(report.strict_json(dict(meta or {})), **{_CHECKSUMS: checksums(state)})
            if stored == wanted and last not in self._bad_steps:
                try:
                    self._restore_step(last, None)
                except CorruptCheckpointError:
                    self._bad_steps.add(last)
                else:  # older steps left by a replacement stopped before removing them go now
                    if on_saved is not None:
                        on_saved(last)
                    self._remove_old_steps()
                    return False
        damaged = [s for s in steps if s in self._bad_steps]
        for s in damaged:  # replaced: kept aside, never removed by `max_to_keep`
            self._quarantine(s)
        if damaged:
            self._manager.reload()
        step = (steps[-1] + 1) if steps else 0
        self._retention.hold = True  # orbax keeps the older steps: they go after `on_saved`
        try:
            saved = self.save(step, state, meta, force=True)
        finally:
            self._retention.hold = False
        self.wait()
        if saved and on_saved is not None:
            on_saved(step)
        self._remove_old_steps()
        return saved

    def _remove_old_steps(self) -> None:
        """Applies `max_to_keep` outside orbax's saves (orbax applies it only in `save`)."""
        for s in self._retention.removable(self.all_steps()):
            self._manager.delete(s)

    def mark_damaged(self, step: int) -> None:
        """Records that `step` is damaged (found so by a check of the caller's): it is never
        restored by fallback, and a replacement sets it aside instead of removing it."""
        self._bad_steps.add(int(step))

    def _set_aside(self, step: int) -> None:
        aside = self._step_dir(step) + _REPLACED
        if os.path.exists(aside):  # left by an earlier replacement that finished
            shutil.rmtree(aside)
        os.rename(self._step_dir(step), aside)
        self._pending_aside.add(step)

    def _finish_replacements(self) -> None:
        """Removes set-aside steps whose replacement is on disk; restores the others (the
        replacement never finished: a kill during its save)."""
        for name in os.listdir(self.directory):
            match = _ASIDE_DIR.match(name)
            if not match:
                continue
            step = int(match.group(1))
            if step in self._pending_aside:
                continue  # its replacement is being written right now
            aside = os.path.join(self.directory, name)
            if os.path.isdir(self._step_dir(step)):
                shutil.rmtree(aside)
            else:
                os.rename(aside, self._step_dir(step))
                logging.warning("Checkpoint step %d of %s restored: its replacement never "
                                "finished.", step, self.directory)

    def _quarantine(self, step: int) -> None:
        src = self._step_dir(step)
        dst = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while os.path.exists(dst):
            dst, n = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        os.rename(src, dst)
        logging.warning("Damaged checkpoint step %s moved to %s (kept; delete it yourself).",
                        src, dst)
        self._bad_steps.discard(step)

    def wait(self) -> None:
        """Blocks until pending saves are on disk (orbax has then removed the steps beyond
        `max_to_keep`) and removes the steps they replaced."""
        self._manager.wait_until_finished()
        self._retention.writing = None
        if self._pending_aside:
            self._pending_aside.clear()
            self._finish_replacements()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:  # stopped (an error, Ctrl-C): release orbax (a save it finishes still applies
            self._manager.close()  # `max_to_keep`); steps set aside are sorted out at next start

    # -- restore -------------------------------------------------------------------------------

    def restore(self, step: Optional[int] = None, *, like: Any = None,
                fallback: Optional[bool] = None) -> tuple[Any, dict]:
        """Restores `(state, meta)` of `step` (default: the newest step).

        Args:
          step: which step; None → the newest.
          like: a pytree shaped like the saved state (arrays or `jax.ShapeDtypeStruct`s). The
            result has exactly its structure (NamedTuples, optax states, …) and its shardings.
            None → plain nested dicts/lists, arrays on the default device.
          fallback: when the step cannot be read or fails its checksums, try the next older steps
            (logging a warning) instead of raising. The damaged step is left on disk. None: the
            constructor's `fallback`.

        Raises:
          FileNotFoundError: there is no checkpoint (or no such step).
          CorruptCheckpointError: the step is damaged (and no fallback succeeded).
          TemplateMismatchError (a ValueError): the step is readable but does not match `like`.
        """
        fallback = self.fallback if fallback is None else bool(fallback)
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
                if fallback and s != candidates[-1]:
                    logging.warning("Checkpoint step %d of %s cannot be read (%s); trying an "
                                    "older step.", s, self.directory, e.problem)
                continue
            if s != step:
                logging.warning("Restored step %d of %s instead of damaged step %d (left on disk).",
                                s, self.directory, step)
            self.last_restored_step = s
            return state, meta
        # Built again now that every step tried is known: its hint names no damaged step.
        raise self._corrupt_error(first_error.step, first_error.problem) from first_error.__cause__

    def _restore_step(self, step: int, like: Any) -> tuple[Any, dict]:
        problem = self._check_step(step)
        if problem is not None:
            raise self._corrupt_error(step, problem)
        abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self._read(step, abstract)
        except Exception as e:  # orbax/tensorstore raise many types; sort them out below
            # Their messages run to thousands of characters (TensorStore specs): the log gets
            # them whole, the error their first line.
            errors.details.info("Restoring step %d of %s failed:", step, self.directory,
                                exc_info=True)
            if like is not None and self._readable_without_template(step):
                raise TemplateMismatchError(
                    f"Checkpoint step {step} in {self.directory} does not match the state "
                    f"template `like`: {errors.short(e)}") from e
            raise self._corrupt_error(step, errors.short(e)) from e
        if _STATE not in out or _META not in out or out[_META] is None:
            raise self._corrupt_error(step, "an item came back empty")
        meta = dict(out[_META])
        expected = meta.pop(_CHECKSUMS, None)
        if expected:  # steps written before checksums existed have none
            problem = _verify(out[_STATE], expected)
            if problem is not None:
                raise self._corrupt_error(step, problem)
        return out[_STATE], meta

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

    def _read(self, step: int, abstract: Any) -> dict:
        """orbax's restore of both items; `abstract` None: shaped as saved (see below)."""
        if abstract is None:
            abstract = self._abstract_from_metadata(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}))

    def _readable_without_template(self, step: int) -> bool:
        try:
            self._read(step, None)
            return True
        except Exception:  # noqa: BLE001 - any failure means the files themselves are bad
            return False


# ----------------------------------------------------------------------------------------------
# One process per workdir

LOCK_FILE = ".jaxprune.lock"
_HELD: dict = {}  # workdir -> open lock file of this process


def lock_workdir(workdir: str) -> None:
    """Takes the workdir's lock for this process, or raises `errors.WorkdirLockedError` naming
    the process that holds it (pid, host, start time).

    The lock is an OS file lock (`flock`) on `workdir/.jaxprune.lock`, so the kernel frees it
    when its holder dies, even by SIGKILL: a stale lock left by a dead process is taken over
    (the file only names who held it last). Re-entrant within one process; `unlock_workdir`
    releases it (exit does too).
    """
    import fcntl
    import socket

    workdir = os.path.abspath(os.fspath(workdir))
    if workdir in _HELD:
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise errors.WorkdirError(
            f"--workdir {workdir} cannot be written ({e.strerror or e}); use a directory you can "
            "write to.") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        try:
            holder = json.loads(f.read() or "{}")
        except ValueError:
            holder = {}
        f.close()
        raise errors.WorkdirLockedError(
            f"--workdir {workdir} is in use by another jaxprune run (pid {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}, started {holder.get('started', '?')}). Wait for it "
            "to finish or stop it, or use another --workdir.") from None
    f.seek(0)
    try:
        previous = json.loads(f.read() or "{}")
    except ValueError:
        previous = {}
    if previous.get("pid") and previous.get("pid") != os.getpid():
        logging.info("Taking over the lock of %s left by pid %s (no longer running).",
                     workdir, previous.get("pid"))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
    f.flush()
    _HELD[workdir] = f


def unlock_workdir(workdir: str) -> None:
    """Releases this process's lock on `workdir` (no-op when not held)."""
    f = _HELD.pop(os.path.abspath(os.fspath(workdir)), None)
    if f is not None:
        f.close()  # closing the file releases the flock
