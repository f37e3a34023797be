"""Model I/O: the driver's saved models, their predictors, dense-param files and compact exports.

One module that the library API (`jaxprune.save_compact`, `load_compact`, `restore_model`,
`load_predictor`) and the pipeline share:

    workdir/models/<method>/     a saved model (`save_model`): orbax params + `model.json`
                                 (normalisation, input, spec, config, result row)
    restore_model(workdir, m)    → (FunctionalModel, params, batch_stats)
    load_predictor(workdir, m)   → Predictor: images → logits, needing no dataset or config
    save_dense_params / load_dense_params   a dense model as one .npz (GPU runs → CPU studies)
    save_compact / load_compact  a compact program (`jax.export`) + its variables, any model:

        directory/variables.npz   the leaves, in tree-flatten order
        directory/program.bin     `jax.export.Exported.serialize()` of the compact function
        directory/meta.json       the kept channels per group, input shape, jax version
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint as ckpt_lib
from jaxprune import data as data_lib
from jaxprune import discover as dlib
from jaxprune import errors
from jaxprune import files as files_lib
from jaxprune import models as models_lib
from jaxprune import report as report_lib
from jaxprune import structure as structure_lib
from jaxprune import text as text_lib
from jaxprune import train as train_lib


# ----------------------------------------------------------------------------------------------
# Saved models of the pipeline (workdir/models/<method>/)


def save_model(workdir: str, method: str, model, params, batch_stats, *, dataset, config,
               masks=None) -> None:
    """Saves a trained (compact or masked) model as `workdir/models/<method>/` so a notebook can
    restore it with `restore_model` / `load_predictor`: orbax params plus `model.json`.

    `dataset` gives the name, classes, input shape and normalisation (`data.Dataset`), `config`
    the precision and the config recorded beside the params. A rerun writes a changed model as
    a new step and removes the old one only after it (an unchanged one is not rewritten), so a
    kill at any moment leaves a readable model."""
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "models", method), max_to_keep=1,
        fingerprint={"model": model.spec.name, "dataset": dataset.name,
                     "num_classes": int(dataset.num_classes),
                     "input_shape": list(dataset.input_shape),
                     "widths": [list(w) for w in model.spec.widths]})
    tree = {"params": params, "batch_stats": batch_stats}
    if masks is not None:
        tree["masks"] = masks
    changed = checkpointer.save_replacing(tree, {"method": method,
                                                 "spec": _spec_json(model.spec)})
    # What running the model needs besides its params (normalisation, input, precision), in one
    # file beside them; `attach_rows` adds the result row at the end of the run (an unchanged
    # model keeps the row it has).
    path = os.path.join(workdir, "models", method, MODEL_INFO)
    row = None
    if not changed:
        try:
            row = ckpt_lib.load_json(path).get("row")
        except (OSError, ValueError, AttributeError):
            row = None
    ds = dataset
    ckpt_lib.save_json(path, {
        "method": method, "spec": _spec_json(model.spec), "dataset": ds.name,
        "num_classes": int(ds.num_classes), "input_shape": list(ds.input_shape),
        **_input_info(ds, os.path.dirname(path)),
        "precision": str(config.train.precision), "masked": masks is not None,
        "row": row, "config": config.to_dict()})


MODEL_INFO = "model.json"  # models/<method>/model.json: see save_model
TOKENIZER = "tokenizer.json"  # beside model.json, for a model of text (`input.kind == "text"`)


def _input_info(ds, directory: str) -> dict:
    """model.json's record of what the model takes: images with their normalisation, or (a
    token dataset) raw text, with the dataset's tokenizer written beside model.json."""
    if ds.kind == "tokens":
        text_lib.save(text_lib.from_json(ds.tokenizer), os.path.join(directory, TOKENIZER))
        return {"input": {"kind": "text", "tokenizer": TOKENIZER,
                          "seq_len": int(ds.input_shape[0]), "pad_id": text_lib.PAD_ID,
                          "note": "a list of str; each becomes [CLS] + its word ids, truncated "
                                  "to seq_len ids and padded with pad_id"}}
    return {"input": "uint8 pixels 0..255, NHWC; normalised as (x - mean) / std per channel",
            "mean": np.asarray(ds.mean, np.float32).tolist(),
            "std": np.asarray(ds.std, np.float32).tolist()}


def _spec_json(spec) -> dict:
    return {"name": spec.name, "num_classes": int(spec.num_classes),
            "input_shape": list(spec.input_shape), "widths": [list(w) for w in spec.widths]}


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
    `.batch_stats` give the expected shapes) from a `save_dense_params` file."""
    if not os.path.isfile(path):
        raise errors.NotFoundError(f"dense params {path!r}: no such file. Give the .npz that "
                                   "experiments/gpu/pack.py wrote (dense_params.npz).")
    with np.load(path) as z:
        flat = {tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files}
    trees = structure_lib._unflatten(flat)
    got = {top: trees.get(top, {}) for top in ("params", "batch_stats")}
    want = {"params": model.params, "batch_stats": model.batch_stats or {}}
    for top in got:
        if jax.tree.map(jnp.shape, got[top]) != jax.tree.map(jnp.shape, want[top]):
            raise errors.ConfigError(
                f"dense params {path!r}: its {top} do not match the configured model's "
                "(another model or width?); give the file of this model.config.")
    return got["params"], got["batch_stats"]


def restore_model(workdir: str, method: str = "unpruned"):
    """One call for notebooks: the saved model of `method` → (FunctionalModel, params, batch_stats).

    `method` is a row of results.json ('unpruned', 'threshold', 'reinforce', …).
    """
    directory = os.path.join(workdir, "models", method)
    if not os.path.isdir(directory):
        have = sorted(os.listdir(os.path.join(workdir, "models"))) \
            if os.path.isdir(os.path.join(workdir, "models")) else []
        raise errors.NotFoundError(
            f"No saved model {method!r} in {directory}. Saved models: {have or 'none'}; "
            "run the pipeline on this workdir first.")
    # Read-only: keeps every step; a damaged newest step falls back to the previous good one.
    checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=None, fingerprint=None,
                                         fallback=True)
    if checkpointer.latest_step() is None:
        raise errors.NotFoundError(
            f"The saved model {method!r} in {directory} never finished saving (its run was "
            "stopped); run the pipeline on this workdir again to save it.")
    tree, meta = checkpointer.restore()
    spec = meta["spec"]
    spec = models_lib.ModelSpec(name=spec["name"], num_classes=int(spec["num_classes"]),
                                input_shape=tuple(spec["input_shape"]),
                                widths=tuple((k, int(v)) for k, v in spec["widths"]))
    model = models_lib.model_from_spec(spec, tree["params"], tree["batch_stats"])
    return model, model.params, model.batch_stats


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A saved model ready to run: `predictor(images_uint8) -> logits` (float32 [N, classes]),
    or, for a model of text, `predictor(list_of_str) -> logits` (tokenized by the tokenizer
    saved beside the model; one str gives one row of logits).

    Needs no dataset or config: the normalisation, input shape and precision come from
    `models/<method>/model.json` (`info`, which also holds the spec, the config and the
    method's result row). `apply(params, batch_stats, images)` is the pure function behind it
    (for `jax.jit` / `jax.export`)."""
    model: Any  # models.FunctionalModel
    params: Any
    batch_stats: Any
    info: dict
    batch_size: int = 256
    tokenizer: Any = None  # a model of text: its tokenizer (`jaxprune.text`), from model.json

    @property
    def input_shape(self) -> tuple:
        return tuple(self.info["input_shape"])

    def apply(self, params, batch_stats, images) -> jax.Array:
        """uint8 (or float pixel-valued) NHWC images → float32 logits, as the evaluation does."""
        forward = train_lib.mixed_apply(self.model.apply, str(self.info.get("precision", "fp32")))
        x = data_lib.normalize(images, *data_lib.pixel_stats(self.info.get("mean"),
                                                             self.info.get("std")))
        return forward(params, batch_stats, x, train=False)[0]

    @functools.cached_property
    def _compiled(self):
        return jax.jit(self.apply)

    def __call__(self, images) -> np.ndarray:
        if self.tokenizer is not None:
            if isinstance(images, str):  # one sentence
                return self([images])[0]
            images = text_lib.encode(self.tokenizer, images, int(self.input_shape[0]))
        images = np.asarray(images)
        if images.shape == self.input_shape:  # one image
            return self(images[None])[0]
        if images.shape[1:] != self.input_shape:
            raise ValueError(f"images of shape {images.shape}: the model takes "
                             f"[N, {', '.join(map(str, self.input_shape))}] pixels (0..255).")
        n, b = images.shape[0], self.batch_size
        out = []
        for start in range(0, n, b):  # fixed-size batches: compiled once
            chunk = images[start:start + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(self._compiled(self.params, self.batch_stats, chunk))[:b - pad])
        return np.concatenate(out) if out else np.zeros((0, int(self.info["num_classes"])),
                                                        np.float32)


def _read_saved(method: str, path: str, read: Callable):
    """`read(path)` of a file saved beside a model, or a NotFoundError saying how to rewrite it."""
    try:
        return read(path)
    except (OSError, ValueError) as e:
        raise errors.NotFoundError(
            f"The saved model {method!r} has no readable {path} (saved by an older version, or "
            "damaged); run the pipeline on this workdir again to write it (finished phases are "
            "restored, not redone).") from e


def load_predictor(workdir: str, method: str = "unpruned", batch_size: int = 256) -> Predictor:
    """The saved model of `method` as a `Predictor`: `load_predictor(workdir, 'evolution')(images)`
    gives the logits the evaluation computes, from uint8 images alone."""
    model, params, batch_stats = restore_model(workdir, method)
    path = os.path.join(workdir, "models", method, MODEL_INFO)
    info = _read_saved(method, path, ckpt_lib.load_json)
    entry = info.get("input")
    tokenizer = None
    if isinstance(entry, dict) and entry.get("kind") == "text":
        tokenizer = _read_saved(method, os.path.join(os.path.dirname(path), entry["tokenizer"]),
                                text_lib.load)
    return Predictor(model=model, params=params, batch_stats=batch_stats, info=info,
                     batch_size=int(batch_size), tokenizer=tokenizer)


def attach_rows(workdir: str, rows) -> None:
    """Writes each method's result row into its saved model's `model.json`."""
    for row in rows:
        path = os.path.join(workdir, "models", str(row["method"]), MODEL_INFO)
        try:
            info = ckpt_lib.load_json(path)
        except (OSError, ValueError):
            continue  # no saved model (or an older one without the file)
        if isinstance(info, dict) and info.get("row") != report_lib.strict_json(dict(row)):
            ckpt_lib.save_json(path, dict(info, row=row))


# ----------------------------------------------------------------------------------------------
# Compact exports of any model (the library's save_compact / load_compact)


def save_compact(directory: str, compact_apply_fn: Callable, compact_variables, example_input, *,
         batch_polymorphic: bool = True) -> None:
    """Writes the compact variables and the exported compact program into `directory`.

    The program is exported with `jax.export` for the input shape of `example_input` (a
    single array, batch axis first); with `batch_polymorphic` the batch size is symbolic.
    """
    os.makedirs(directory, exist_ok=True)
    shape = tuple(np.shape(example_input))
    dtype = jnp.result_type(example_input)
    if batch_polymorphic:
        dims = ", ".join(["b"] + [str(d) for d in shape[1:]])
        x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), dtype)
    else:
        x_spec = jax.ShapeDtypeStruct(shape, dtype)
    exported = jax.export.export(jax.jit(compact_apply_fn))(dlib._abstract(compact_variables),
                                                            x_spec)
    with open(os.path.join(directory, "program.bin"), "wb") as f:
        f.write(exported.serialize())
    leaves = [np.asarray(x) for x in jax.tree.leaves(compact_variables)]
    np.savez(os.path.join(directory, "variables.npz"),
             **{f"leaf{i:05d}": x for i, x in enumerate(leaves)})
    meta = dict(widths=getattr(compact_apply_fn, "widths", None), input_shape=list(shape[1:]),
                batch_polymorphic=batch_polymorphic, jax_version=jax.__version__)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_compact(directory: str) -> Tuple[Callable, Any]:
    """`(apply_fn, variables)` of a model written by `save_compact`; `apply_fn(variables, x)`."""
    with open(os.path.join(directory, "program.bin"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, "variables.npz")) as z:
        leaves = [jnp.asarray(z[k]) for k in sorted(z.files)]
    args_tree = exported.in_tree.children()[0]           # ((variables, x), {}) -> (variables, x)
    var_tree = args_tree.children()[0]
    variables = jax.tree.unflatten(var_tree, leaves)
    return exported.call, variables
