"""Model I/O: the driver's saved models, their predictors, dense-param files and compact exports.

One module that the library API (`jaxprune.save_compact`, `load_compact`, `restore_model`,
`load_predictor`) and the pipeline share:

    workdir/models/<method>/     a saved model (`save_model`): orbax params + `model.json`
    restore_model(workdir, m)    → (FunctionalModel, params, batch_stats)
    load_predictor(workdir, m)   → Predictor: inputs → logits, needing no dataset or config
    save_dense_params / load_dense_params   a dense model as one .npz (GPU runs → CPU studies)
    save_compact / load_compact  a compact program (`jax.export`) + its variables, any model:

        directory/variables.npz   the leaves, in tree-flatten order
        directory/program.bin     `jax.export.Exported.serialize()` of the compact function
        directory/meta.json       format, kept channels per group, input shape, jax version,
                                  the sha256 of the two files above and of itself

Nothing damaged is used. Every file of a saved model is listed with its sha256 in `model.json`,
which carries the sha256 of its own content (`checksum`); an export's `meta.json` does the same
for the export. A missing, truncated, altered or unreadable file raises one
`errors.ModelFileError` naming the file and how to get a good one; a wrong argument (an image
of the wrong dtype, range or shape) one `errors.InputError` naming what is expected. Exports are
written into a temporary folder beside the target and renamed into place, so a reader sees the
old export or the new one, never a mix.

What a predictor accepts is recorded in `model.json` under `input` (`{"kind": "image", ...}`)
and checked by the input kind of that name in `INPUT_KINDS` (see `ImageInput`); another kind
of model (token ids of text) plugs in as one more entry there.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint as ckpt_lib
from jaxprune import checks
from jaxprune import data as data_lib
from jaxprune import discover as dlib
from jaxprune import errors
from jaxprune import files as files_lib
from jaxprune import models as models_lib
from jaxprune import report as report_lib
from jaxprune import structure as structure_lib
from jaxprune import text as text_lib
from jaxprune import train as train_lib

MODEL_INFO = "model.json"  # models/<method>/model.json: see save_model
CHECKSUM = "checksum"  # the key of a sealed JSON file's own sha256
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------
# Checksums: files and sealed JSON (a JSON object that carries the sha256 of its own content)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _intact(path: str, want: str) -> bool:
    return os.path.isfile(path) and file_sha256(path) == want


def check_file(path: str, want: str, fix: str, missing: str = "") -> None:
    """`path` is present with the sha256 `want`, else a `ModelFileError` naming it, `missing`
    (why it is needed, said when it is absent) and `fix`."""
    if not os.path.isfile(path):
        raise errors.ModelFileError(f"{path} is missing{missing}; {fix}.")
    if file_sha256(path) != want:
        raise errors.ModelFileError(f"{path} fails its sha256 check (truncated or altered "
                                    f"after saving); {fix}.")


def _content_sha256(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def save_sealed_json(path: str, obj: dict) -> None:
    """Writes `obj` atomically as JSON with `checksum`: the sha256 of the rest of it."""
    obj = report_lib.strict_json(dict(obj))
    obj.pop(CHECKSUM, None)
    ckpt_lib.save_json(path, dict(obj, **{CHECKSUM: _content_sha256(obj)}))


def load_sealed_json(path: str, fix: str) -> dict:
    """Reads a `save_sealed_json` file, or raises `ModelFileError` naming it and `fix`."""
    if not os.path.isfile(path):
        raise errors.ModelFileError(f"{path} is missing; {fix}.")
    try:
        obj = ckpt_lib.load_json(path)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise errors.ModelFileError(f"{path} is not readable JSON (truncated or damaged: "
                                    f"{errors.short(e)}); {fix}.") from None
    if not isinstance(obj, dict):
        raise errors.ModelFileError(f"{path} does not hold a JSON object (damaged); {fix}.")
    if CHECKSUM not in obj:
        raise errors.ModelFileError(f"{path} has no checksum (written by an older jaxprune, or "
                                    f"edited); {fix}.")
    if obj[CHECKSUM] != _content_sha256(obj):
        raise errors.ModelFileError(f"{path} fails its checksum (it was altered after saving); "
                                    f"{fix}.")
    return obj


def _require(info: dict, path: str, fix: str, checks: dict) -> None:
    """Every key of `checks` ({key: predicate}) present in `info` and accepted."""
    for key, ok in checks.items():
        if key not in info:
            raise errors.ModelFileError(f"{path} lacks the field {key!r}; {fix}.")
        try:
            good = bool(ok(info[key]))
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            good = False
        if not good:
            raise errors.ModelFileError(f"{path}: the field {key!r} = {_short(info[key])} is "
                                        f"not valid; {fix}.")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_int(v, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_shape(v) -> bool:
    return isinstance(v, list) and len(v) >= 1 and all(_is_int(d, 1) for d in v)


def _is_spec(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("name"), str)
            and _is_int(v.get("num_classes"), 1) and _is_shape(v.get("input_shape"))
            and isinstance(v.get("widths"), list)
            and all(isinstance(w, list) and len(w) == 2 and isinstance(w[0], str)
                    and _is_int(w[1], 1) for w in v["widths"]))


# ----------------------------------------------------------------------------------------------
# What a predictor accepts: input kinds


class ImageInput:
    """`input.kind == "image"`: pixels NHWC of the recorded shape, normalised in the graph as
    `(x - mean) / std` per channel (the statistics of the training images, pixel units).

    Accepted: uint8 (or any integer dtype) pixels 0..255; float pixels with `value_range`
    (0, 255) or (0, 1) (scaled to 0..255 here). A float batch given without `value_range` is
    read as 0..255, except when every value lies in [0, 1]: that is the [0, 1] scaling (or a
    black image), which is refused until `value_range` says which. Refused: bool, complex,
    strings / objects, NaN or infinity, values outside the range, any other shape.
    """

    kind = "image"
    RANGES = ((0, 255), (0, 1))

    def __init__(self, shape, mean, std):
        self.shape = tuple(int(d) for d in shape)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def from_info(cls, info: dict, path: str, fix: str) -> "ImageInput":
        channels = info["input_shape"][-1]
        stats = lambda v: (isinstance(v, list) and len(v) in (1, channels)  # noqa: E731
                           and all(_is_finite(x) for x in v))
        _require(info, path, fix, {"mean": stats,
                                   "std": lambda v: stats(v) and all(x > 0 for x in v)})
        return cls(info["input_shape"], info["mean"], info["std"])

    @classmethod
    def record(cls, shape) -> dict:
        """The `input` entry of model.json for images of `shape` (H, W, C)."""
        return {"kind": cls.kind, "shape": [int(d) for d in shape], "layout": "NHWC",
                "dtype": "uint8", "value_range": [0, 255],
                "float": "value_range=(0, 255) or (0, 1)",
                "normalisation": "(x - mean) / std per channel"}

    def describe(self) -> str:
        dims = ", ".join(map(str, self.shape))
        return (f"uint8 images [N, {dims}] (or one [{dims}]) with pixels 0..255, or float "
                "images with value_range=(0, 255) or (0, 1)")

    def prepare(self, images, value_range=None) -> Tuple[np.ndarray, bool]:
        """(batch, single): the images checked and as the model takes them (uint8, or float32
        pixel units), and whether one image without a batch axis was given."""
        expected = f"the model takes {self.describe()}"
        value_range = check_value_range(value_range)
        try:
            x = np.asarray(images)
        except Exception as e:  # noqa: BLE001 - ragged lists and the like
            raise errors.InputError(f"images could not be read as an array "
                                    f"({errors.short(e)}); {expected}.") from None
        kind = "f" if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype.kind  # bfloat16 too
        if kind == "b":
            raise errors.InputError(f"images of dtype bool; {expected} (bool masks are not "
                                    "pixels: convert with `x.astype(np.uint8) * 255`).")
        if kind not in "uif":
            raise errors.InputError(f"images of dtype {x.dtype}; {expected}.")
        single = x.shape == self.shape
        if single:
            x = x[None]
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise errors.InputError(f"images of shape {tuple(x.shape)}; {expected}.")
        if x.size == 0:
            return x.astype(np.uint8), single
        if kind in "ui":
            if value_range == (0.0, 1.0):
                raise errors.InputError(f"integer images with value_range=(0, 1); integer "
                                        "pixels are 0..255: drop value_range, or give floats.")
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi > 255:
                raise errors.InputError(f"integer images with values {lo}..{hi}; {expected}.")
            return x.astype(np.uint8, copy=False), single
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise errors.InputError(f"images hold {bad} NaN or infinite value(s); {expected}.")
        lo, hi = float(x.min()), float(x.max())
        if value_range is None:
            if 0.0 <= lo and hi <= 1.0:
                raise errors.InputError(
                    f"float images with every value in [{lo:g}, {hi:g}]: scaled to [0, 1]? "
                    "Say which with value_range=(0, 1) or (0, 255), or give uint8 pixels.")
            value_range = (0.0, 255.0)
        tolerance = 1e-3 * value_range[1]
        if lo < -tolerance or hi > value_range[1] + tolerance:
            raise errors.InputError(
                f"float images with values in [{lo:g}, {hi:g}], outside value_range="
                f"({value_range[0]:g}, {value_range[1]:g}); {expected}.")
        x = np.clip(x, 0.0, value_range[1])
        return (x * np.float32(255.0 / value_range[1]) if value_range[1] != 255 else x), single

    def transform(self, x) -> jax.Array:
        """In the graph: checked images → the model's float32 input."""
        return data_lib.normalize(x, self.mean, self.std)


def check_value_range(value_range) -> Optional[tuple]:
    """None, or `value_range` as one of `ImageInput.RANGES` (floats); else an `InputError`."""
    if value_range is None:
        return None
    try:
        out = tuple(float(v) for v in value_range)
    except (TypeError, ValueError):
        out = ()
    if out not in ImageInput.RANGES:
        raise errors.InputError(f"value_range={value_range!r}: use (0, 255) or (0, 1), the range "
                                "of float pixel values.")
    return out


class TextInput:
    """`input.kind == "text"`: raw sentences, tokenized by the tokenizer saved beside model.json
    (`tokenizer.json`, checked against its recorded sha256) into `seq_len` int32 ids: [CLS], the
    words, padding; a longer sentence is truncated, an empty one is [CLS] alone, an unknown
    word [UNK] (`jaxprune.text`).

    Accepted: a list (or tuple, or 1-D array) of str, or one str (one row of logits). Refused:
    anything else (bytes, numbers, token-id arrays), naming the first item that is not a str.
    """

    kind = "text"
    FILE = "tokenizer.json"

    def __init__(self, seq_len: int, tokenizer):
        self.seq_len = int(seq_len)
        self.tokenizer = tokenizer

    @classmethod
    def save(cls, dataset, directory: str) -> dict:
        """Writes the token dataset's tokenizer beside model.json; returns the `input` entry."""
        path = os.path.join(directory, cls.FILE)
        text_lib.save(text_lib.from_json(dataset.tokenizer), path)
        return {"kind": cls.kind, "seq_len": int(dataset.input_shape[0]), "dtype": "int32",
                "pad_id": text_lib.PAD_ID, "tokenizer": cls.FILE,
                "tokenizer_sha256": file_sha256(path),
                "text": "a list of str; each becomes [CLS] + its word ids, truncated to seq_len "
                        "ids, padded with pad_id"}

    @classmethod
    def from_info(cls, info: dict, path: str, fix: str) -> "TextInput":
        entry = info["input"]
        _require(entry, path, fix, {"seq_len": lambda v: [v] == info["input_shape"],
                                    "tokenizer": lambda v: v == cls.FILE,
                                    "tokenizer_sha256": lambda v: isinstance(v, str)})
        file = os.path.join(os.path.dirname(path), entry["tokenizer"])
        check_file(file, entry["tokenizer_sha256"], fix,
                   " (a model of text needs its tokenizer)")
        try:
            tokenizer = text_lib.load(file)
        except (ImportError, ValueError) as e:
            raise errors.ModelFileError(f"{file} cannot be read ({errors.short(e)}); "
                                        f"{fix}.") from None
        return cls(entry["seq_len"], tokenizer)

    def describe(self) -> str:
        return (f"raw text: a list of str (or one str), each cut to {self.seq_len} token ids "
                "([CLS] + words)")

    def prepare(self, texts, value_range=None) -> Tuple[np.ndarray, bool]:
        """(int32 ids [N, seq_len], whether one str was given)."""
        if value_range is not None:
            raise errors.InputError(f"value_range={value_range!r} is for images; the model "
                                    f"takes {self.describe()}.")
        single = isinstance(texts, str)
        if isinstance(texts, np.ndarray) and texts.ndim != 1:
            raise errors.InputError(f"an array of shape {texts.shape} (token ids or images?); "
                                    f"the model takes {self.describe()}.")
        try:
            ids = text_lib.encode(self.tokenizer, [texts] if single else texts, self.seq_len)
        except TypeError as e:
            raise errors.InputError(f"{e} The model takes {self.describe()}.") from None
        return ids, single

    def transform(self, x) -> jax.Array:
        """In the graph: token ids as they are."""
        return jnp.asarray(x)


def record_input(dataset, directory: str) -> dict:
    """model.json's `input` entry for a model trained on `dataset` (a token dataset's
    tokenizer is written into `directory`, beside model.json)."""
    if getattr(dataset, "kind", "image") == "tokens":
        return TextInput.save(dataset, directory)
    return ImageInput.record(dataset.input_shape)


# input kind (model.json `input.kind`) -> class with from_info(info, path, fix), describe(),
# prepare(raw, **options) -> (batch, single) and transform(batch) -> the model's input.
INPUT_KINDS = {"image": ImageInput, "text": TextInput}


def input_kind(info: dict, path: str, fix: str):
    """The input kind `info['input']` names (a model.json before kinds existed: images)."""
    entry = info.get("input")
    kind = entry.get("kind") if isinstance(entry, dict) else "image"
    if kind not in INPUT_KINDS:
        raise errors.ModelFileError(f"{path}: input kind {kind!r} is unknown to this jaxprune "
                                    f"(known: {', '.join(INPUT_KINDS)}); {fix}.")
    return INPUT_KINDS[kind].from_info(info, path, fix)


# ----------------------------------------------------------------------------------------------
# Saved models of the pipeline (workdir/models/<method>/)


def _model_dir(workdir: str, method: str) -> str:
    return os.path.join(os.fspath(workdir), "models", method)


def _fix_saved(workdir: str, method: str) -> str:
    return (f"rerun the same jaxprune command on --workdir {workdir} to save it again (finished "
            f"phases are restored, not retrained; move {_model_dir(workdir, method)} away first "
            "if the rerun refuses it)")


def _manifest(directory: str, step: int) -> dict:
    """{path relative to `directory`: sha256} of every file of step `step` and the fingerprint."""
    out = {}
    for folder, _, names in os.walk(os.path.join(directory, str(step))):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, directory)] = file_sha256(path)
    fingerprint = os.path.join(directory, ckpt_lib.FINGERPRINT_FILE)
    if os.path.isfile(fingerprint):
        out[ckpt_lib.FINGERPRINT_FILE] = file_sha256(fingerprint)
    return dict(sorted(out.items()))


def save_model(workdir: str, method: str, model, params, batch_stats, *, dataset, config,
               masks=None) -> None:
    """Saves a trained (compact or masked) model as `workdir/models/<method>/` so a notebook can
    restore it with `restore_model` / `load_predictor`: orbax params plus `model.json`.

    `dataset` gives the name, classes, input shape and normalisation (`data.Dataset`), `config`
    the precision and the config recorded beside the params; what a predictor accepts is
    `record_input` of the dataset (images, or text with its tokenizer written beside
    model.json). A rerun writes a changed model as a new step and removes the old one only
    after it (an unchanged, intact one is not rewritten; a damaged one is saved again). `model.json`, with the sha256 of every
    file of the step and of itself, is written once the new step is on disk and before the old
    one is removed, so a kill at any moment leaves a readable model (the old or the new)."""
    directory = _model_dir(workdir, method)
    try:  # the saved model as it is: intact (every file as listed), or to be saved again
        old = read_model_info(workdir, method)
    except errors.UserError:
        old = None
    checkpointer = ckpt_lib.Checkpointer(
        directory, max_to_keep=1,
        fingerprint={"model": model.spec.name, "dataset": dataset.name,
                     "num_classes": int(dataset.num_classes),
                     "input_shape": list(dataset.input_shape),
                     "widths": [list(w) for w in model.spec.widths]})
    tree = {"params": params, "batch_stats": batch_stats}
    if masks is not None:
        tree["masks"] = masks
    info = {"method": method, "spec": _spec_json(model.spec), "dataset": dataset.name,
            "num_classes": int(dataset.num_classes), "input_shape": list(dataset.input_shape),
            "input": record_input(dataset, directory),  # the checkpointer made `directory`
            "precision": str(config.train.precision), "masked": masks is not None,
            "config": config.to_dict()}
    for stat in ("mean", "std"):  # the image normalisation (an image dataset has both)
        if getattr(dataset, stat, None) is not None:
            info[stat] = np.asarray(getattr(dataset, stat), np.float32).tolist()

    def describe(step):
        # What running the model needs besides its params (normalisation, input, precision)
        # and the sha256 of every file of `step`, in one file beside them, written once the
        # step is on disk and before the step it replaces is removed; `attach_rows` adds the
        # result row at the end of the run (an unchanged step keeps the row it has: a new
        # step's number is always above the old one's).
        row = old.get("row") if old and old.get("step") == step else None
        save_sealed_json(os.path.join(directory, MODEL_INFO), dict(
            info, row=row, step=int(step), files=_manifest(directory, step)))

    if old is None:
        damaged = _damaged_step(directory)
        if damaged is not None:  # set aside by the replacement below, never removed
            checkpointer.mark_damaged(damaged)
    with checkpointer:
        checkpointer.save_replacing(tree, {"method": method, "spec": info["spec"]},
                                    force=old is None, on_saved=describe)


def _damaged_step(directory: str) -> Optional[int]:
    """The step a sealed model.json describes when one of that step's files is missing or fails
    its sha256; None when intact or unknown (no readable model.json)."""
    try:
        info = load_sealed_json(os.path.join(directory, MODEL_INFO), "")
        step, listed = int(info["step"]), dict(info["files"])
    except (errors.UserError, KeyError, TypeError, ValueError):
        return None
    for name, want in listed.items():
        if name.startswith(f"{step}{os.sep}") and not _intact(os.path.join(directory, name), want):
            return step if os.path.isdir(os.path.join(directory, str(step))) else None
    return None


def _spec_json(spec) -> dict:
    return {"name": spec.name, "num_classes": int(spec.num_classes),
            "input_shape": list(spec.input_shape), "widths": [list(w) for w in spec.widths]}


def attach_rows(workdir: str, rows) -> None:
    """Writes each method's result row into its saved model's `model.json` (an intact one: a
    damaged file is left for its loader to report, never sealed again)."""
    for row in rows:
        path = os.path.join(_model_dir(workdir, str(row["method"])), MODEL_INFO)
        if not os.path.isfile(path):
            continue  # no saved model
        try:
            info = load_sealed_json(path, "")
        except errors.ModelFileError:
            continue
        if info.get("row") != report_lib.strict_json(dict(row)):
            save_sealed_json(path, dict(info, row=row))


def _check_method(workdir, method) -> Tuple[str, str]:
    if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
        raise errors.InputError(f"workdir={workdir!r}: give the --workdir of a jaxprune run.")
    if not isinstance(method, str) or not method or os.sep in method or method in (".", ".."):
        raise errors.InputError(f"method={method!r}: give the name of a saved model, a row of "
                                "results.json ('unpruned', 'threshold', 'evolution', …).")
    workdir = os.fspath(workdir)
    directory = _model_dir(workdir, method)
    if not os.path.isdir(directory):
        root = os.path.join(workdir, "models")
        have = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))) \
            if os.path.isdir(root) else []
        raise errors.NotFoundError(
            f"No saved model {method!r} in {directory}. Saved models: {have or 'none'}; "
            "run the pipeline on this workdir first.")
    return workdir, directory


def read_model_info(workdir: str, method: str = "unpruned") -> dict:
    """The checked `model.json` of a saved model: sealed, every field present and valid, and
    every file of the model present with the sha256 it was saved with."""
    return _read_model(workdir, method)[0]


def _read_model(workdir: str, method: str):
    """(info, its input kind): `read_model_info`, and the input kind it checked (built once: a
    text model's tokenizer is read here, not again by the predictor)."""
    workdir, directory = _check_method(workdir, method)
    path = os.path.join(directory, MODEL_INFO)
    fix = _fix_saved(workdir, method)
    info = load_sealed_json(path, fix)
    _require(info, path, fix, {
        "spec": _is_spec, "num_classes": lambda v: _is_int(v, 1),
        "input_shape": _is_shape, "precision": lambda v: v in PRECISIONS,
        "input": lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str),
        "step": lambda v: _is_int(v, 0), "masked": lambda v: isinstance(v, bool),
        "files": lambda v: isinstance(v, dict) and v and all(
            isinstance(k, str) and isinstance(h, str) and not os.path.isabs(k)
            and ".." not in k.split("/") for k, h in v.items())})
    kind = input_kind(info, path, fix)
    spec = info["spec"]
    if spec["num_classes"] != info["num_classes"] or spec["input_shape"] != info["input_shape"]:
        raise errors.ModelFileError(f"{path}: its spec disagrees with num_classes / input_shape "
                                    f"(altered); {fix}.")
    for name, want in info["files"].items():
        check_file(os.path.join(directory, name), want, fix,
                   f" (the saved model {method!r} is incomplete)")
    return info, kind


def restore_model(workdir: str, method: str = "unpruned"):
    """One call for notebooks: the saved model of `method` → (FunctionalModel, params, batch_stats).

    `method` is a row of results.json ('unpruned', 'threshold', 'reinforce', …). Every file of
    the model is checked first (`read_model_info`); damage raises `errors.ModelFileError`.
    """
    model, _, _ = _restore(workdir, method)
    return model, model.params, model.batch_stats


def _restore(workdir: str, method: str):
    """(model, info, input kind) of a saved model, every file checked first."""
    info, kind = _read_model(workdir, method)  # also checks `workdir` and `method`
    workdir, directory = os.fspath(workdir), _model_dir(workdir, method)
    fix = _fix_saved(workdir, method)
    step = info["step"]
    try:  # read-only: no fingerprint check, nothing written or deleted
        with ckpt_lib.Checkpointer(directory, max_to_keep=None, fingerprint=None) as checkpointer:
            tree, meta = checkpointer.restore(step)
    except Exception as e:  # noqa: BLE001 - every file passed its sha256: report, don't dump
        errors.details.info("Restoring %s step %s failed:", directory, step, exc_info=True)
        raise errors.ModelFileError(f"the saved model {method!r} in {directory} (step {step}) "
                                    f"cannot be read ({errors.short(e)}); {fix}.") from None
    if not isinstance(meta, dict) or meta.get("spec") != info["spec"] or \
            not isinstance(tree, dict) or "params" not in tree or "batch_stats" not in tree:
        raise errors.ModelFileError(f"the saved model {method!r} in {directory}: step {step} "
                                    f"does not hold the model {MODEL_INFO} describes; {fix}.")
    spec = info["spec"]
    spec = models_lib.ModelSpec(name=spec["name"], num_classes=int(spec["num_classes"]),
                                input_shape=tuple(spec["input_shape"]),
                                widths=tuple((k, int(v)) for k, v in spec["widths"]))
    try:
        model = models_lib.model_from_spec(spec, tree["params"], tree["batch_stats"])
    except ValueError as e:
        raise errors.ModelFileError(f"the saved model {method!r} in {directory}: "
                                    f"{errors.short(e)}; {fix}.") from None
    return model, info, kind


# The saved model a run starts from (`restore_to_start`'s arguments: pipeline.dense_phase
# passes them; `config_checks` reads these checks).
CONFIG_CHECKS = {"train.init_from": checks.optional_str, "train.init_method": checks.optional_str}


def restore_to_start(source: str, method: str, *, model, dataset):
    """A trained model to start a run from instead of training it (`train.init_from`):
    (params, batch_stats, the seconds its training took). `source` is a workdir (or experiment
    folder) holding the saved `models/<method>`, or a `save_dense_params` .npz (e.g. a GPU run's
    `dense_params.npz`; it records no training time: 0).

    A saved model is refused with a `ConfigError` naming the difference unless it is this run's
    model on this run's data: the same spec (architecture, widths, classes, input shape),
    dataset and input (normalisation, or tokenizer), and unmasked. An .npz carries only arrays:
    their paths, shapes and dtypes must be the model's (`load_dense_params`)."""
    if str(source).endswith(".npz"):
        params, batch_stats = load_dense_params(source, model)
        return params, batch_stats, 0.0
    saved, info, kind = _restore(source, method)
    where = f"train.init_from={os.fspath(source)!r} (its models/{method})"
    fix = "give a model saved by a run of this config, or leave train.init_from unset to train one"
    problems = []
    if saved.spec != model.spec:
        problems.append(f"it is {_spec_json(saved.spec)}, this run's model "
                        f"{_spec_json(model.spec)}")
    if info["dataset"] != dataset.name:
        problems.append(f"it was trained on {info['dataset']!r}, this run uses {dataset.name!r}")
    if info["masked"]:
        problems.append("it is a masked (pruned) model")
    if isinstance(kind, TextInput):
        if text_lib.to_json(kind.tokenizer) != text_lib.to_json(
                text_lib.from_json(dataset.tokenizer)):
            problems.append("its tokenizer differs from the one this run trained on its data")
    else:
        for stat in ("mean", "std"):
            want = getattr(dataset, stat, None)
            if want is not None and not np.allclose(info.get(stat), np.asarray(want, np.float32)):
                problems.append(f"its normalisation {stat} {info.get(stat)} differs from this "
                                f"run's {np.asarray(want).tolist()}")
    if problems:
        raise errors.ConfigError(f"{where} cannot start this run: {'; '.join(problems)}; {fix}.")
    return saved.params, saved.batch_stats, float((info.get("row") or {}).get("train_seconds", 0.0))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A saved model ready to run: `predictor(inputs) -> logits` (float32 [N, classes]).

    Needs no dataset or config: what it accepts (`input_kind`, from `model.json`'s `input`),
    the normalisation and the precision come from `models/<method>/model.json` (`info`, which
    also holds the spec, the config and the method's result row). For images, see
    `ImageInput`: uint8 pixels 0..255, or floats with `value_range=(0, 255)` / `(0, 1)`
    (given here as the default, or per call); for text, see `TextInput`: a list of str
    (tokenized by the model's own tokenizer). Anything else is refused with an
    `errors.InputError` naming what is expected. `apply(params, batch_stats, x)` is the pure
    function behind it (for `jax.jit` / `jax.export`); it takes checked inputs
    (`input_kind.prepare`)."""
    model: Any  # models.FunctionalModel
    params: Any
    batch_stats: Any
    info: dict
    batch_size: int = 256
    value_range: Optional[tuple] = None
    info_path: str = MODEL_INFO  # where `info` was read (a text model's tokenizer is beside it)
    # The input kind, when already built from `info` (`load_predictor`); else built from it.
    checked_input: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.info["input_shape"])

    @functools.cached_property
    def input_kind(self):
        if self.checked_input is not None:
            return self.checked_input
        return input_kind(self.info, self.info_path, "save the model again")

    def apply(self, params, batch_stats, x) -> jax.Array:
        """Checked inputs (uint8 or float32 pixel-valued NHWC images) → float32 logits, as the
        evaluation computes them."""
        forward = train_lib.mixed_apply(self.model.apply, str(self.info.get("precision", "fp32")))
        return forward(params, batch_stats, self.input_kind.transform(x), train=False)[0]

    @functools.cached_property
    def _compiled(self):
        return jax.jit(self.apply)

    def __call__(self, inputs, value_range=None) -> np.ndarray:
        options = {}
        value_range = self.value_range if value_range is None else value_range
        if value_range is not None:
            options["value_range"] = value_range
        x, single = self.input_kind.prepare(inputs, **options)
        n, b = x.shape[0], self.batch_size
        out = []
        for start in range(0, n, b):  # fixed-size batches: compiled once
            chunk = x[start:start + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(self._compiled(self.params, self.batch_stats, chunk))[:b - pad])
        logits = np.concatenate(out) if out else np.zeros((0, int(self.info["num_classes"])),
                                                          np.float32)
        return logits[0] if single else logits


def load_predictor(workdir: str, method: str = "unpruned", batch_size: int = 256,
                   value_range: Optional[tuple] = None) -> Predictor:
    """The saved model of `method` as a `Predictor`: `load_predictor(workdir, 'evolution')(images)`
    gives the logits the evaluation computes, from uint8 images alone (float images: give
    `value_range`, here or per call). Every file of the model is checked first."""
    if not _is_int(batch_size, 1):
        raise errors.InputError(f"batch_size={batch_size!r}: use an int >= 1.")
    value_range = check_value_range(value_range)
    model, info, kind = _restore(workdir, method)
    return Predictor(model=model, params=model.params, batch_stats=model.batch_stats, info=info,
                     batch_size=int(batch_size), value_range=value_range,
                     info_path=os.path.join(_model_dir(workdir, method), MODEL_INFO),
                     checked_input=kind)


# ----------------------------------------------------------------------------------------------
# Dense params as one .npz (experiments/gpu/pack.py → CPU studies)


def save_dense_params(path: str, params, batch_stats) -> None:
    """Writes a model's variables to an .npz of flat `params/conv1/kernel`, `batch_stats/...`
    leaves: the portable form of a trained dense model (`experiments/gpu/pack.py` writes it
    after a GPU run; `load_dense_params` and the benchmarks' `--dense_params` read it)."""
    flat = {"/".join((top,) + tuple(p)): np.asarray(v)
            for top, tree in (("params", params), ("batch_stats", batch_stats or {}))
            for p, v in structure_lib._flatten(jax.device_get(tree)).items()}
    with files_lib.atomic_open(path, "wb") as f:
        np.savez_compressed(f, **flat)


def load_dense_params(path: str, model) -> tuple:
    """(params, batch_stats) of `model` (a zoo or discovered model: its `.params` and
    `.batch_stats` give the expected shapes) from a `save_dense_params` file. Every array's
    CRC is checked (zip); shapes and dtypes must be the model's."""
    fix = "give the .npz that experiments/gpu/pack.py wrote (dense_params.npz) for this model"
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise errors.NotFoundError(f"dense params {path!r}: no such file. Give the .npz that "
                                   "experiments/gpu/pack.py wrote (dense_params.npz).")
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {tuple(k.split("/")): np.asarray(z[k]) for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile / numpy raise many types for damage
        raise errors.ModelFileError(f"dense params {path}: not a complete .npz (truncated or "
                                    f"damaged: {errors.short(e)}); {fix}.") from None
    if any(k[0] not in ("params", "batch_stats") for k in flat):
        raise errors.ModelFileError(f"dense params {path}: not a save_dense_params file (it "
                                    f"holds {sorted('/'.join(k) for k in flat)[:3]}); {fix}.")
    trees = structure_lib._unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    got = {top: trees.get(top, {}) for top in ("params", "batch_stats")}
    want = {"params": model.params, "batch_stats": model.batch_stats or {}}
    for top in got:
        spec = lambda t: jax.tree.map(lambda a: (tuple(jnp.shape(a)), str(jnp.result_type(a))), t)  # noqa: E731
        if spec(got[top]) != spec(want[top]):
            raise errors.ConfigError(
                f"dense params {path!r}: its {top} do not match the configured model's "
                "(another model or width?); give the file of this model.config.")
        if not all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(got[top])):
            raise errors.ModelFileError(f"dense params {path}: its {top} hold NaN or infinite "
                                        f"values; {fix}.")
    return got["params"], got["batch_stats"]


# ----------------------------------------------------------------------------------------------
# Compact exports of any model (the library's save_compact / load_compact)

EXPORT_FORMAT = "jaxprune-compact-1"
EXPORT_FILES = ("program.bin", "variables.npz", "meta.json")
_EXPORT_FIX = ("export the model again with jaxprune.save_compact, or copy the whole folder "
               "again from where it came from")


def save_compact(directory: str, compact_apply_fn: Callable, compact_variables, example_input, *,
                 batch_polymorphic: bool = True) -> None:
    """Writes the compact variables and the exported compact program into `directory`.

    The program is exported with `jax.export` for the input shape of `example_input` (a
    single array, batch axis first); with `batch_polymorphic` the batch size is symbolic.
    The files are written into a temporary folder beside `directory`, which then replaces
    `directory` (an earlier export there is replaced; a folder holding anything else is
    refused, never overwritten).
    """
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise errors.InputError(f"directory={directory!r}: give a folder path to export to.")
    directory = os.path.abspath(os.fspath(directory))
    _check_export_target(directory)
    try:
        x = np.asarray(example_input) if not isinstance(example_input, jax.Array) \
            else example_input
    except Exception:  # noqa: BLE001
        x = None
    if x is None or np.ndim(x) < 1 or np.dtype(x.dtype).kind not in "uif":
        raise errors.InputError("example_input: give one numeric array with the batch axis "
                                f"first, e.g. test_images[:1] (got {type(example_input).__name__}).")
    shape, dtype = tuple(np.shape(x)), jnp.result_type(x)
    if batch_polymorphic:
        dims = ", ".join(["b"] + [str(d) for d in shape[1:]])
        x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), dtype)
    else:
        x_spec = jax.ShapeDtypeStruct(shape, dtype)
    exported = jax.export.export(jax.jit(compact_apply_fn))(dlib._abstract(compact_variables),
                                                            x_spec)
    leaves = [np.asarray(v) for v in jax.tree.leaves(compact_variables)]
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", suffix=".tmp", dir=parent)
    try:
        with open(os.path.join(tmp, "program.bin"), "wb") as f:
            f.write(exported.serialize())
        with open(os.path.join(tmp, "variables.npz"), "wb") as f:
            np.savez(f, **{f"leaf{i:05d}": v for i, v in enumerate(leaves)})
        save_sealed_json(os.path.join(tmp, "meta.json"), dict(
            format=EXPORT_FORMAT, widths=getattr(compact_apply_fn, "widths", None),
            input_shape=list(shape[1:]), input_dtype=str(np.dtype(dtype)),
            batch_polymorphic=bool(batch_polymorphic), jax_version=jax.__version__,
            leaves=[[list(v.shape), str(v.dtype)] for v in leaves],
            files={name: file_sha256(os.path.join(tmp, name)) for name in EXPORT_FILES[:2]}))
        for name in EXPORT_FILES:
            _fsync(os.path.join(tmp, name))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; exports are not
        _install(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder only
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_export_target(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise errors.InputError(f"{directory} is a file; export to a new or empty folder.")
    if os.path.isdir(directory):
        other = sorted(set(os.listdir(directory)) - set(EXPORT_FILES))
        if other:
            raise errors.InputError(
                f"{directory} holds other files ({', '.join(other[:3])}); export to a new or "
                "empty folder (an earlier export there would be replaced, nothing else is).")


def _install(tmp: str, directory: str) -> None:
    """Renames the finished folder `tmp` to `directory`; an earlier export (or an empty folder)
    there is set aside first and removed once the new one is in place."""
    _check_export_target(directory)
    if not os.path.isdir(directory):
        os.rename(tmp, directory)
        return
    aside = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", suffix=".old",
                             dir=os.path.dirname(directory))
    os.rmdir(aside)
    os.rename(directory, aside)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    shutil.rmtree(aside)


def load_compact(directory: str) -> Tuple[Callable, Any]:
    """`(apply_fn, variables)` of a model written by `save_compact`; `apply_fn(variables, x)`
    runs the exported program (jittable; `apply_fn.exported` is the `jax.export.Exported`).

    Every file is checked first (its sha256 in the sealed meta.json); a missing, truncated or
    altered file raises `errors.ModelFileError` naming it."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise errors.InputError(f"directory={directory!r}: give the folder save_compact wrote.")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise errors.NotFoundError(f"No exported model at {directory}: give the folder that "
                                   "jaxprune.save_compact wrote (program.bin, variables.npz, "
                                   "meta.json).")
    meta_path = os.path.join(directory, "meta.json")
    meta = load_sealed_json(meta_path, _EXPORT_FIX)
    _require(meta, meta_path, _EXPORT_FIX, {
        "format": lambda v: v == EXPORT_FORMAT,
        "files": lambda v: isinstance(v, dict) and set(v) == set(EXPORT_FILES[:2]),
        "leaves": lambda v: isinstance(v, list) and all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], list) for s in v)})
    for name, want in meta["files"].items():
        check_file(os.path.join(directory, name), want, _EXPORT_FIX)
    path = os.path.join(directory, "program.bin")
    try:
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        var_tree = exported.in_tree.children()[0].children()[0]  # ((variables, x), {})
    except Exception as e:  # noqa: BLE001 - a program this jax cannot read
        raise errors.ModelFileError(f"{path} cannot be read by jax {jax.__version__} (written "
                                    f"by jax {meta.get('jax_version')}: {errors.short(e)}); "
                                    f"{_EXPORT_FIX}.") from None
    path = os.path.join(directory, "variables.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            leaves = [np.asarray(z[k]) for k in sorted(z.files)]
    except Exception as e:  # noqa: BLE001 - zipfile / numpy raise many types for damage
        raise errors.ModelFileError(f"{path} cannot be read ({errors.short(e)}); "
                                    f"{_EXPORT_FIX}.") from None
    got = [[list(v.shape), str(v.dtype)] for v in leaves]
    want = [[list(a.shape), str(a.dtype)] for a in exported.in_avals[:var_tree.num_leaves]]
    if got != meta["leaves"] or got != want:
        raise errors.ModelFileError(f"{path} does not hold the variables program.bin takes "
                                    f"({len(got)} arrays, {len(want)} expected); {_EXPORT_FIX}.")
    variables = jax.tree.unflatten(var_tree, [jnp.asarray(v) for v in leaves])
    input_shape = tuple(meta.get("input_shape") or ())

    def apply_fn(variables, x):
        """The exported program; `x` is [N, *input_shape] (checked: an `InputError` names it)."""
        shape = tuple(np.shape(x))
        if len(shape) != len(input_shape) + 1 or shape[1:] != input_shape:
            raise errors.InputError(f"x of shape {shape}: the exported model takes "
                                    f"[N, {', '.join(map(str, input_shape))}] "
                                    f"({meta.get('input_dtype', 'float32')}).")
        return exported.call(variables, x)

    apply_fn.exported = exported
    return apply_fn, variables
