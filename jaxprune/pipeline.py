"""The experiment driver: dense baseline → hand-set pruning and searches → fine-tune → compact → report.

Every phase checkpoints into `workdir/checkpoints/<phase>` and records its finished result there,
so running the same command on the same workdir again skips finished phases and continues an
interrupted one from its last checkpoint. Nothing in the workdir is ever deleted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import time
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint as ckpt_lib
from jaxprune import config_checks
from jaxprune import costs as costs_lib
from jaxprune import criteria as criteria_lib
from jaxprune import data as data_lib
from jaxprune import discover as discover_lib
from jaxprune import errors
from jaxprune import masks as masks_lib
from jaxprune import models as models_lib
from jaxprune import modelio
from jaxprune import pruner as pruner_lib
from jaxprune import report as report_lib
from jaxprune import schedules as schedules_lib
from jaxprune import surgery
from jaxprune import train as train_lib
from jaxprune.search import loop as loop_lib
from jaxprune.search import budget as budget_lib

HANDSET_METHODS = ("threshold", "sensitivity")
# `search.seed_keeps`: keeps put first in every controller's first round.
SEED_KEEPS = ("uniform",) + HANDSET_METHODS


@dataclasses.dataclass
class Context:
    """What every phase needs; built once per run."""
    config: Any
    workdir: str
    dataset: Any
    model: Any  # models.FunctionalModel (dense)
    writer: report_lib.MetricWriter
    keys: dict
    progress: bool = True  # False: quiet (no log lines, no table)
    continue_older: bool = False  # checkpoints of another version: see check_workdir
    bars: Optional[bool] = None  # progress bars; None: only on a terminal
    _eval_fns: dict = dataclasses.field(default_factory=dict)  # apply_fn -> evaluate (compiled once)
    _train_fns: dict = dataclasses.field(default_factory=dict)  # (apply_fn, masks fn) -> train_fn
    _device: dict = dataclasses.field(default_factory=dict)  # splits on the device, uploaded once
    _candidate_evaluators: dict = dataclasses.field(default_factory=dict)  # candidate_evaluator
    _handset: dict = dataclasses.field(default_factory=dict)  # handset_keep, per method

    def device_data(self, split: str):
        """`train` → (images, labels) device arrays; `val` / `test` → `train.EvalData`.

        Uploaded once per run; `val` and `test` share one capacity, so one compiled evaluation
        per model serves both."""
        if not self._device:
            ds = self.dataset
            self._device["train"] = (jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels))
            self._device["val"] = self._eval_data(ds.val_images, ds.val_labels)
            self._device["test"] = self._eval_data(ds.test_images, ds.test_labels)
        return self._device[split]

    def val_images(self, start: int, n: int):
        """Validation images [start, start + n) on the device, like `device_data("val")`
        (which it is when they are the whole split), uploaded once."""
        ds = self.dataset
        start, n = int(start), min(int(n), ds.val_images.shape[0] - int(start))
        if (start, n) == (0, ds.val_images.shape[0]):
            return self.device_data("val")
        if (start, n) not in self._device:
            self._device[start, n] = self._eval_data(ds.val_images[start:start + n],
                                                     ds.val_labels[start:start + n])
        return self._device[start, n]

    def _eval_data(self, images, labels):
        """A `train.EvalData` of the `val` / `test` capacity, so one compiled evaluation per
        model serves every evaluation set."""
        ds = self.dataset
        return train_lib.device_eval_data(images, labels, int(self.config.train.eval_batch_size),
                                          max(ds.val_images.shape[0], ds.test_images.shape[0]))

    @functools.cached_property
    def calib_order(self) -> np.ndarray:
        """The permutation of the training split that calibration batches are read from (one
        per run: every evaluator calibrates on the same images)."""
        return np.asarray(jax.random.permutation(self.keys["calib"],
                                                 self.dataset.train_images.shape[0]))

    @functools.cached_property
    def tx(self):
        """One optimizer for every phase (rates and lengths are arguments of the train fn)."""
        return train_lib.make_optimizer(self.config.train)

    @property
    def fingerprint(self) -> dict:
        return {"model": self.model.spec.name, "dataset": self.dataset.name,
                "num_classes": int(self.dataset.num_classes),
                "input_shape": list(self.dataset.input_shape),
                "widths": [list(w) for w in self.model.spec.widths]}

    def checkpointer(self, phase: str, extra: Optional[dict] = None):
        """The phase's checkpoints, fingerprinted with the model, the data, every config key the
        phase's result depends on (`config_checks.phase_settings`) and `extra`; a damaged newest
        step falls back to the previous good one."""
        fingerprint = {**self.fingerprint, **config_checks.phase_settings(self.config, phase),
                       **(extra or {})}
        return ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints", phase),
                                     max_to_keep=2, fingerprint=fingerprint, fallback=True,
                                     before=config_checks.NEUTRAL,
                                     continue_older=self.continue_older)


# ----------------------------------------------------------------------------------------------
# Setup


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


def _prepare_workdir(workdir: str) -> str:
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


def _continued_before(workdir: str) -> bool:
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


def _load_data(data_config):
    """`data.load`, with data that exists but cannot be read reported as a `DataError`."""
    import pickle
    import zipfile

    cache = data_config.get("cache")
    if cache and os.path.isfile(cache) and not zipfile.is_zipfile(cache):
        raise errors.DataError(f"the data cache data.cache={cache} is not an .npz file (damaged "
                               "or truncated); move it away so it is rebuilt.")
    try:
        return data_lib.load(data_config)
    except (errors.UserError, data_lib.DataNotFoundError):
        raise
    except ValueError as e:
        raise errors.DataError(f"data ({data_config.name}): {e}") from e
    except (OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise errors.DataError(_unreadable_data(data_config, e)) from e
    except Exception as e:  # TensorFlow's own errors (e.g. DataLossError of a truncated record)
        if type(e).__module__.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise errors.DataError(_unreadable_data(data_config, e)) from e
        raise


def _unreadable_data(data_config, e) -> str:
    cache = data_config.get("cache")
    fix = (f"move the cache {cache} away so it is rebuilt, or " if cache else "") + \
        "copy or download the dataset again (TFDS_DATA_DIR / data.data_dir)"
    return (f"the {data_config.name} data could not be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged or truncated: {fix}.")


def make_context(config, workdir: str, progress: bool = True,
                 continue_older: bool = False) -> Context:
    config_checks.validate_config(config)
    workdir = _prepare_workdir(workdir)
    try:
        # Continued once (--continue_older), a workdir stays so: rerunning the same command
        # resumes it.
        continue_older = bool(continue_older) or _continued_before(workdir)
        continued = check_workdir(config, workdir, continue_older)
        train_lib.enable_compile_cache(config.train.get("compile_cache_dir"))
        dataset = _load_data(config.data)
        root = jax.random.key(int(config.seed))
        names = ("init", "train", "finetune", "search", "calib")
        keys = dict(zip(names, jax.random.split(root, len(names))))
        model = models_lib.get_model(config.model.name, num_classes=dataset.num_classes,
                                     input_shape=tuple(dataset.input_shape), key=keys["init"],
                                     widths=_data_widths(config, dataset))
        _check_model_fits(config, model)
        write_run_info(config, workdir, continued, continue_older)  # once every check passed
    except BaseException:
        ckpt_lib.unlock_workdir(workdir)  # a notebook kernel lives on
        raise
    writer = report_lib.MetricWriter(workdir)
    return Context(config=config, workdir=workdir, dataset=dataset, model=model, writer=writer,
                   keys=keys, progress=progress, continue_older=bool(continue_older))


def _data_widths(config, dataset) -> Optional[dict]:
    """Widths the data fixes (a token model's embedding rows: the tokenizer's vocabulary), after
    checking that the model takes the dataset's kind of input."""
    kind = models_lib.input_kind(str(config.model.name))
    if kind != dataset.kind:
        raise errors.ConfigError(
            f"model.name={config.model.name!r} takes {kind} input, but data.name="
            f"{dataset.name!r} gives {dataset.kind}; pick a model for {dataset.kind} (or "
            "another dataset).")
    return {"vocab": dataset.vocab_size} if kind == "tokens" else None


def _check_model_fits(config, model) -> None:
    """What the config asks of this model's shapes, checked before the dense phase trains."""
    p = config.prune
    if str(p.granularity) == "nm" and config_checks.methods(p.methods):
        try:
            masks_lib.check_nm(model.params, int(p.get("n", 2)), int(p.get("m", 4)),
                               masks_lib.make_prunable_fn(exclude=model.unprunable))
        except ValueError as e:
            raise errors.ConfigError(f"prune.m={p.get('m', 4)} does not fit "
                                     f"{config.model.name}: {e}") from None
    if str(p.criterion) == "bn_scale" and config_checks.methods(p.methods) + \
            config_checks.methods(config.search.methods):
        try:
            criteria_lib.bn_scale(model.params,
                                  discover_lib.params_groups(models_lib.discovery(model)))
        except ValueError as e:
            raise errors.ConfigError(f"prune.criterion='bn_scale' does not fit "
                                     f"{config.model.name}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Training phases


def eval_fn(ctx: Context, apply_fn):
    """Exact evaluation of a model on a device split (`evaluate(params, batch_stats, split)`);
    one compiled function per model for the whole run."""
    if apply_fn not in ctx._eval_fns:
        ds = ctx.dataset
        evaluate = train_lib.make_eval_fn(
            apply_fn, mean=ds.mean, std=ds.std, batch_size=int(ctx.config.train.eval_batch_size),
            precision=str(ctx.config.train.precision))

        def on_split(params, batch_stats, split):
            data = ctx.device_data(split) if isinstance(split, str) else split
            return evaluate(params, batch_stats, data)

        on_split.compiled = evaluate.compiled
        ctx._eval_fns[apply_fn] = on_split
    return ctx._eval_fns[apply_fn]


def _train_fn(ctx: Context, apply_fn, mask_update_fn=None):
    """The compiled chunk-of-steps function of a model: one for the dense phase and every
    one-shot fine-tune (masks are state; rates and lengths are arguments); gradual and IMP
    schedules, which update masks inside the step, get their own."""
    cache_key = (apply_fn, mask_update_fn)
    if cache_key not in ctx._train_fns:
        t = ctx.config.train
        ds = ctx.dataset
        step = train_lib.make_train_step(
            apply_fn, ctx.tx, schedule=str(t.schedule), mean=ds.mean, std=ds.std,
            augment=bool(ctx.config.data.augment), precision=str(t.precision),
            label_smoothing=float(t.label_smoothing), l1=float(t.l1),
            l1_target=str(t.l1_target), unprunable=ctx.model.unprunable,
            mask_update_fn=mask_update_fn)
        ctx._train_fns[cache_key] = train_lib.make_train_fn(step, batch_size=int(t.batch_size))
    return ctx._train_fns[cache_key]


def train_phase(ctx: Context, phase: str, *, apply_fn, params, batch_stats, masks, epochs: int,
                learning_rate: float, key, warmup_epochs: float = 0.0, mask_update_fn=None,
                recipe: Optional[dict] = None):
    """Trains (or resumes, or restores a finished) phase; returns (state, train_seconds).

    The phase's checkpoint directory is fingerprinted with the model, the data and `recipe`
    (what determines the phase's result: schedule, keep vector, …), so a workdir made with
    other settings is refused with a message instead of being silently reused.
    """
    t = ctx.config.train
    ds = ctx.dataset
    steps_per_epoch = max(ds.train_images.shape[0] // int(t.batch_size), 1)
    total_steps = int(epochs) * steps_per_epoch
    schedule = train_lib.make_recipe(learning_rate, total_steps,
                                     round(float(warmup_epochs) * steps_per_epoch))
    state = train_lib.create_state(params, batch_stats, masks, ctx.tx)
    checkpointer = ctx.checkpointer(phase, extra=dict(
        recipe or {}, epochs=int(epochs), learning_rate=float(learning_rate),
        warmup_epochs=float(warmup_epochs), batch_size=int(t.batch_size),
        optimizer=str(t.optimizer), schedule=str(t.schedule), weight_decay=float(t.weight_decay),
        l1=float(t.l1), precision=str(t.precision), label_smoothing=float(t.label_smoothing),
        seed=int(ctx.config.seed), train_examples=int(ds.train_images.shape[0])))
    seconds = 0.0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(like=state, fallback=True)
        seconds = float(meta.get("train_seconds", 0.0))
        if meta.get("done"):
            _log(ctx, f"[{phase}] finished earlier (step {int(state.step)}); restored from checkpoint.")
            return state, seconds
        _log(ctx, f"[{phase}] resuming from step {int(state.step)}.")
    images, labels = ctx.device_data("train")
    result = train_lib.fit(
        state, _train_fn(ctx, apply_fn, mask_update_fn), images=images, labels=labels,
        epochs=int(epochs), batch_size=int(t.batch_size), key=key, recipe=schedule,
        evaluate=eval_fn(ctx, apply_fn), val="val", checkpointer=checkpointer,
        checkpoint_every=int(t.checkpoint_every), writer=ctx.writer, phase=phase,
        seconds_so_far=seconds, progress=ctx.progress, bars=_bars(ctx))
    return result.state, result.train_seconds


def _bars(ctx: Context) -> bool:
    return train_lib.is_terminal() if ctx.bars is None else bool(ctx.bars)


def _log(ctx: Context, text: str) -> None:
    if ctx.progress:
        print(text, flush=True)


def measure_row(ctx: Context, method: str, *, model, params, batch_stats, masks=None,
                train_seconds: float, extra: Optional[dict] = None) -> dict:
    """Test accuracy, params, MACs, size, latency of a (compact or masked) model."""
    ds = ctx.dataset
    evaluate = eval_fn(ctx, model.apply)
    test = evaluate(params, batch_stats, "test")
    shape = tuple(ds.input_shape)
    batch = int(ctx.config.train.eval_batch_size)
    example = models_lib.input_example(model.spec, batch)  # float32 images or int32 token ids
    n_params = costs_lib.count_params(params, masks)
    dense_params = costs_lib.count_params(ctx.model.params)
    macs = costs_lib.count_macs(model.apply, params, batch_stats, shape, masks=masks,
                                input_dtype=example.dtype)
    x = jnp.zeros(example.shape, example.dtype)
    forward = train_lib.mixed_apply(model.apply, str(ctx.config.train.precision))
    fwd = jax.jit(lambda p, b, x: forward(p, b, x, train=False)[0])
    latency = costs_lib.latency(fwd, params, batch_stats, x)
    row = {"method": method, "accuracy": test["accuracy"], "test_loss": test["loss"],
           "params": int(n_params), "macs": int(macs),
           "size_mb": costs_lib.param_bytes(params) / 1e6,
           "train_seconds": float(train_seconds), "latency_ms": float(latency["median_ms"]),
           "latency_batch": batch, "sparsity": 1.0 - n_params / dense_params}
    row.update(extra or {})
    return row


def dense_phase(ctx: Context):
    m = ctx.model
    cfg = ctx.config.train
    state, seconds = train_phase(ctx, "dense", apply_fn=m.apply, params=m.params,
                                 batch_stats=m.batch_stats, masks=masks_lib.ones_like(m.params),
                                 epochs=int(cfg.epochs), learning_rate=float(cfg.learning_rate),
                                 warmup_epochs=float(cfg.warmup_epochs), key=ctx.keys["train"])
    row = measure_row(ctx, "unpruned", model=m, params=state.params, batch_stats=state.batch_stats,
                      train_seconds=seconds)
    return state, row


# ----------------------------------------------------------------------------------------------
# Pruning: keep vectors → masks → fine-tune → compact


def make_pruner(ctx: Context, dense_state) -> pruner_lib.Pruner:
    """The library `Pruner` of the trained dense model at the config's budget (channel groups
    discovered from the model, named after its width arguments)."""
    cfg, s, m, ds = ctx.config.prune, ctx.config.search, ctx.model, ctx.dataset
    criterion = str(cfg.criterion)
    score_batches = None
    if criterion in criteria_lib.GRADIENT_CRITERIA:  # batches of the calibration images' order
        n, bs = int(cfg.sensitivity_batches), int(s.calib_batch_size)
        score_batches = [
            (data_lib.normalize(jnp.asarray(ds.train_images[idx]), ds.mean, ds.std),
             jnp.asarray(ds.train_labels[idx]))
            for idx in np.array_split(ctx.calib_order[:bs * n], n)]
    return pruner_lib.Pruner(
        m.apply, dense_state.params, dense_state.batch_stats, ds.input_shape,
        input_dtype=models_lib.input_example(m.spec).dtype,
        discovery=models_lib.discovery(m) if str(cfg.granularity) == "channel" else None,
        unprunable=m.unprunable, granularity=str(cfg.granularity), sparsity=float(cfg.sparsity),
        target=str(cfg.target), criterion=criterion, score_batches=score_batches,
        key=jax.random.fold_in(ctx.keys["calib"], 2), scope=str(cfg.scope),
        lower=float(s.lower), step=float(s.step),
        channel_multiple=int(cfg.get("channel_multiple", 1) or 1),
        n=int(cfg.get("n", 2)), m=int(cfg.get("m", 4)))


def finish(ctx: Context, pruner: pruner_lib.Pruner, method: str, keep, *,
           extra: Optional[dict] = None) -> dict:
    """Masks at `keep`, fine-tunes, compacts (channel), saves and measures; returns the row.

    The threshold method follows `prune.schedule`: `oneshot` prunes to `keep` and fine-tunes;
    `gradual` starts dense and raises the sparsity along Zhu & Gupta's cubic schedule during
    fine-tuning; `imp` prunes in `prune.imp_rounds` rounds, rewinding the survivors to the
    dense weights before each round's training (lottery-ticket style). Searched and
    sensitivity keeps are always applied one-shot.
    """
    m = ctx.model
    masks, channel_keep = pruner.masks(keep)
    schedule = str(ctx.config.prune.schedule) if method == "threshold" else "oneshot"
    if schedule == "oneshot":
        state, seconds = finetune_phase(ctx, pruner, f"finetune_{method}", masks, pruner.params)
    else:
        state, seconds = _scheduled(ctx, pruner, method, schedule, keep, masks)
        masks = state.masks
        if pruner.granularity == "channel":
            channel_keep = masks_lib.channel_keep_from_masks(masks, pruner.groups)
    keep_list = [float(v) for v in np.asarray(keep)]
    extra = dict(extra or {}, keep=keep_list, units=pruner.units,
                 granularity=pruner.granularity, schedule=schedule)
    if pruner.granularity == "channel":
        extra["kept_channels"] = {name: int(np.sum(v)) for name, v in channel_keep.items()}
        small = surgery.slice_variables({"params": state.params, "batch_stats": state.batch_stats},
                                        pruner.discovery, channel_keep)
        compact_model = models_lib.with_widths(m, extra["kept_channels"], small["params"],
                                               small["batch_stats"])
        params, batch_stats = compact_model.params, compact_model.batch_stats
        save_model(ctx, method, compact_model, params, batch_stats)
        return measure_row(ctx, method, model=compact_model, params=params,
                           batch_stats=batch_stats, train_seconds=seconds, extra=extra)
    save_model(ctx, method, m, state.params, state.batch_stats, masks=state.masks)
    return measure_row(ctx, method, model=m, params=state.params, batch_stats=state.batch_stats,
                       masks=state.masks, train_seconds=seconds, extra=extra)


def finetune_phase(ctx: Context, pruner: pruner_lib.Pruner, phase: str, masks, params,
                   mask_update_fn=None, epochs: Optional[int] = None, key=None):
    """The configured fine-tune (`finetune.*`; `epochs` overrides its length) of `params` under
    `masks`, a checkpointed phase. `key` (default: from the phase name) orders the data."""
    fcfg, pcfg = ctx.config.finetune, ctx.config.prune
    kept = masks_lib.count(masks)
    recipe = {"granularity": pruner.granularity, "scope": str(pcfg.scope),
              "target": str(pcfg.target), "sparsity": float(pcfg.sparsity),
              "criterion": str(pcfg.criterion), "schedule": str(pcfg.schedule),
              "kept_weights": int(kept.kept)}
    return train_phase(ctx, phase, apply_fn=ctx.model.apply, params=params,
                       batch_stats=pruner.batch_stats, masks=masks,
                       epochs=int(fcfg.epochs if epochs is None else epochs),
                       learning_rate=float(fcfg.learning_rate),
                       warmup_epochs=float(fcfg.warmup_epochs),
                       key=jax.random.fold_in(ctx.keys["finetune"], stable_hash(phase))
                       if key is None else key,
                       mask_update_fn=mask_update_fn, recipe=recipe)


def _scheduled(ctx: Context, pruner: pruner_lib.Pruner, method: str, schedule: str, keep,
               oneshot_masks):
    """Gradual or iterative pruning towards the one-shot masks' sparsity."""
    cfg = ctx.config
    scope = str(cfg.prune.scope)
    if scope == "layerwise":
        final = 1.0 - float(np.mean(np.asarray(keep)))  # threshold keeps are uniform per unit
    else:
        fn = None if pruner.granularity == "channel" else pruner.prunable_fn
        final = float(masks_lib.count(oneshot_masks, fn).sparsity)
    groups = pruner.groups if pruner.granularity == "channel" else None
    update = functools.partial(schedules_lib.update_masks, scope=scope,
                               granularity=pruner.granularity, groups=groups,
                               prunable_fn=pruner.prunable_fn)
    dense_masks = masks_lib.ones_like(pruner.params)
    if schedule == "gradual":
        steps = int(cfg.finetune.epochs) * max(
            ctx.dataset.train_images.shape[0] // int(cfg.train.batch_size), 1)
        end = max(int(0.75 * steps), 2)
        sched = schedules_lib.polynomial(final, begin_step=0, end_step=end,
                                         frequency=max(end // 20, 1))
        return finetune_phase(ctx, pruner, f"finetune_{method}_gradual", dense_masks,
                              pruner.params,
                              mask_update_fn=lambda step, p, mk: update(step, p, mk, sched))
    rounds = int(cfg.prune.get("imp_rounds", 3))
    sched = schedules_lib.imp(rounds, 1.0 - (1.0 - final) ** (1.0 / rounds), round_steps=1)
    masks, params, seconds = dense_masks, pruner.params, 0.0
    state = None
    for r in range(rounds):
        masks = update(jnp.int32(r + 1), params, masks, sched)
        params = schedules_lib.rewind(pruner.params, masks)
        state, sec = finetune_phase(ctx, pruner, f"finetune_{method}_imp{r + 1}", masks, params)
        params, seconds = state.params, seconds + sec
    return state, seconds


def stable_hash(text: str) -> int:
    """A hash of the whole text, stable across processes (Python's `hash` is salted)."""
    return zlib.crc32(text.encode()) % (2 ** 31)


# Documented as `pipeline.restore_model` / `pipeline.load_predictor` (README, notebooks); they
# live in `modelio`, with the rest of model I/O.
restore_model, load_predictor = modelio.restore_model, modelio.load_predictor


def save_model(ctx: Context, method: str, model, params, batch_stats, masks=None) -> None:
    """`modelio.save_model` of this run's workdir, dataset and config."""
    modelio.save_model(ctx.workdir, method, model, params, batch_stats, dataset=ctx.dataset,
                       config=ctx.config, masks=masks)


def candidate_evaluator(ctx: Context, pruner: pruner_lib.Pruner, val: Optional[tuple] = None,
                        *, calib_batches: Optional[int] = None,
                        metric: str = "accuracy") -> Callable:
    """`keep float32[K, G] -> proxy float32[K]`: adaptive BN on `search.calib_batches` (or
    `calib_batches`) calibration batches of the training split, then `metric` ('accuracy' or
    'loss') on the first `search.val_examples` validation images, or on validation images
    [start, start + n) with `val=(start, n)`. Built once per run for each setting. Never the test
    split."""
    ds, s = ctx.dataset, ctx.config.search
    start, n = val if val is not None else (0, min(int(s.val_examples), ds.val_images.shape[0]))
    calib_n = int(s.calib_batches if calib_batches is None else calib_batches) * \
        int(s.calib_batch_size)
    settings = (start, n, calib_n, metric)
    if settings in ctx._candidate_evaluators:
        return ctx._candidate_evaluators[settings]
    order = ctx.calib_order[:calib_n]
    evaluate = pruner.evaluator(
        data_lib.normalize(jnp.asarray(ds.train_images[order]), ds.mean, ds.std),
        data_lib.normalize(jnp.asarray(ds.val_images[start:start + n]), ds.mean, ds.std),
        ds.val_labels[start:start + n], calib_batch_size=int(s.calib_batch_size),
        eval_batch_size=int(ctx.config.train.eval_batch_size),
        chunk_size=int(s.get("chunk_size", 0) or 0) or None,
        precision=str(ctx.config.train.precision), metric=metric)
    ctx._candidate_evaluators[settings] = evaluate
    return evaluate


# Names of earlier releases (the pruning problem lived here), kept so scripts written against
# them still run: the library `pruner.Pruner` has `threshold_keep`, `sensitivity_keep`, `masks`.
Pruner = make_pruner
make_candidate_evaluator = candidate_evaluator


# ----------------------------------------------------------------------------------------------
# Methods


def handset_keep(ctx: Context, pruner: pruner_lib.Pruner, method: str) -> tuple:
    """(keep, extra, evaluations) of a hand-set method: its keep vector, what the row records
    about it and the candidate evaluations it took. Made once per run: the hand-set phase and
    the search's seeds (`search.seed_keeps`) share it."""
    if method not in ctx._handset:
        if method == "threshold":
            ctx._handset[method] = (pruner.threshold_keep(), {}, 0)
        elif method == "sensitivity":
            keep, curves = pruner.sensitivity_keep(candidate_evaluator(ctx, pruner),
                                                   candidates=int(ctx.config.search.candidates))
            extra = {"sensitivity": {"grid": curves.keep_grid.tolist(), "dense": curves.dense,
                                     "accuracy": np.round(curves.values, 5).tolist()}}
            # the dense model + every unit at every keep of the grid
            ctx._handset[method] = (keep, extra, 1 + int(curves.values.size))
        else:
            raise ValueError(f"prune.methods: unknown method {method!r}; use "
                             f"{', '.join(HANDSET_METHODS)}.")
    return ctx._handset[method]


def handset_phase(ctx: Context, pruner: pruner_lib.Pruner, method: str) -> dict:
    keep, extra, _ = handset_keep(ctx, pruner, method)
    macs_fraction = float(pruner.cost.macs(jnp.asarray(keep))) / pruner.cost.dense_macs \
        if pruner.granularity == "channel" else None
    return finish(ctx, pruner, method, keep, extra=dict(extra, planned_macs_fraction=macs_fraction))


def select_winner(ctx: Context, pruner: pruner_lib.Pruner, method: str, log) -> dict:
    """Successive halving over the search log (`search.select_*`; off when select_top is 0):
    the `select_top` distinct candidates with the best proxy are scored on
    `select_val_examples` validation images (0: the whole split), then the best
    `select_finetune` of those are fine-tuned for `select_epochs` epochs and judged by their
    exact accuracy on the same images. The same stages follow every controller, so each costs
    the same. `method` names the fine-tunes' phases (`select_<method>_<i>`).
    Returns {} when off, else {'best_keep', 'stages', 'seconds'}."""
    s = selection_settings(ctx.config)
    if not s:
        return {}
    n_val = select_val_examples(ctx)
    stages = [loop_lib.Stage("validation", s["select_top"],
                             candidate_evaluator(ctx, pruner, val=(0, n_val)))]
    if s["select_finetune"] > 0:
        evaluate = eval_fn(ctx, ctx.model.apply)
        images = ctx.val_images(0, n_val)

        def short_finetune(keeps):  # the configured fine-tune, shortened; each a phase
            out = []
            for i, keep in enumerate(keeps):
                state, _ = finetune_phase(ctx, pruner, f"select_{method}_{i}",
                                          pruner.masks(keep)[0], pruner.params,
                                          epochs=s["select_epochs"])
                out.append(float(evaluate(state.params, state.batch_stats, images)["accuracy"]))
            return np.asarray(out)

        stages.append(loop_lib.Stage("short fine-tune", s["select_finetune"], short_finetune))
    t0 = time.perf_counter()
    best_keep, history = loop_lib.successive_halving(log, stages)
    _log(ctx, f"[search_{method}] selection: " + "; ".join(
        f"{h['stage']} of {len(h['rows'])}: best {100 * max(h['scores']):.2f} %" for h in history))
    return {"best_keep": best_keep, "stages": history, "seconds": time.perf_counter() - t0}


def selection_settings(config) -> dict:
    """The `search.select_*` keys as ints (absent keys at their defaults), or {} when the
    selection is off (`select_top` < 1)."""
    s = config.search
    out = {"select_top": int(s.get("select_top", 0) or 0),
           "select_val_examples": int(s.get("select_val_examples", 0) or 0),
           "select_finetune": int(s.get("select_finetune", 0) or 0),
           "select_epochs": int(s.get("select_epochs", 1) or 1)}
    return out if out["select_top"] >= 1 else {}


def select_val_examples(ctx: Context) -> int:
    """How many validation images (the first ones) the selection (`select_winner`) scores on:
    0 when it is off."""
    s, n = selection_settings(ctx.config), ctx.dataset.val_images.shape[0]
    return min(s["select_val_examples"] or n, n) if s else 0


def search_seeds(ctx: Context, pruner: pruner_lib.Pruner):
    """(seeds float32[S, G] or None, evaluations): the keeps `search.seed_keeps` names, which
    every controller asks first ('uniform': the same keep in every group, projected onto the
    budget; 'threshold' / 'sensitivity': the hand-set methods' keeps), and the candidate
    evaluations it took to make them (the sensitivity pre-pass, shared with the hand-set
    phase), which the search is charged."""
    names = config_checks.methods(ctx.config.search.get("seed_keeps", ""))
    if not names:
        return None, 0
    rows, cost = [], 0
    for name in names:
        if name == "uniform":
            rows.append(pruner.project(np.ones((len(pruner.units),), np.float32)))
        else:
            keep, _, evaluations = handset_keep(ctx, pruner, name)
            rows.append(keep)
            cost += evaluations
    return np.unique(np.stack(rows), axis=0), cost


def search_rounds(ctx: Context, seed_evaluations: int) -> int:
    """`search.rounds` less the rounds the seeds' making cost (whole rounds, rounded up), so a
    seeded search evaluates no more candidates than an unseeded one."""
    s = ctx.config.search
    k = int(s.candidates)
    rounds = int(s.rounds) - -(-int(seed_evaluations) // k)
    if rounds < 1:
        raise errors.ConfigError(
            f"search.seed_keeps={s.seed_keeps!r} costs {seed_evaluations} evaluations, all of "
            f"search.rounds x search.candidates = {int(s.rounds)} x {k}: raise search.rounds, or "
            "seed with 'uniform' / 'threshold' (free).")
    return rounds


def search_phase(ctx: Context, pruner: pruner_lib.Pruner, method: str):
    s = ctx.config.search
    seeds, seed_evaluations = search_seeds(ctx, pruner)
    rounds = search_rounds(ctx, seed_evaluations)
    checkpointer = ctx.checkpointer(f"search_{method}", extra={
        "units": pruner.units, "rounds": int(s.rounds), "candidates": int(s.candidates),
        "method": method, "budget": float(pruner.budget), "lower": float(s.lower),
        "val_examples": int(s.val_examples), "seed": int(ctx.config.seed)})
    result = pruner.search(
        method, candidate_evaluator(ctx, pruner),
        key=jax.random.fold_in(ctx.keys["search"], stable_hash(method)), rounds=rounds,
        candidates=int(s.candidates), hparams=dict(s.get(method, {})),  # search.<method>
        seeds=seeds, checkpointer=checkpointer, name=method,
        progress=ctx.progress and _bars(ctx), writer=ctx.writer)
    selection = select_winner(ctx, pruner, method, result.log)
    best_keep = selection.get("best_keep", result.best_keep)
    ckpt_lib.save_json(os.path.join(ctx.workdir, f"search_{method}.json"), {
        "method": method, "units": pruner.units, "best_keep": np.asarray(best_keep).tolist(),
        "best_accuracy": result.best_accuracy, "seconds": result.seconds,
        "selection": {k: v for k, v in selection.items() if k != "best_keep"} or None,
        "dense_macs": float(pruner.cost.dense_macs), "budget": float(pruner.budget),
        "budget_target": str(ctx.config.prune.target),
        "seeds": None if seeds is None else np.asarray(seeds).tolist(),
        "seed_evaluations": seed_evaluations,
        "candidates": result.log.to_records(dense_macs=pruner.cost.dense_macs)})
    extra = {"search_seconds": result.seconds, "proxy_accuracy": result.best_accuracy,
             "evaluated": int(result.log.filled)}
    if seed_evaluations:
        extra["seed_evaluations"] = seed_evaluations
    if selection:
        extra.update(selection_seconds=selection["seconds"],
                     selection_scores={h["stage"]: max(h["scores"]) for h in selection["stages"]})
    row = finish(ctx, pruner, method, best_keep, extra=extra)
    return row, result._replace(best_keep=np.asarray(best_keep))


# ----------------------------------------------------------------------------------------------
# The whole run


def run(config, workdir: str, progress: bool = True, bars: Optional[bool] = None,
        continue_older: bool = False) -> list:
    """Runs (or resumes) the experiment of `config` in `workdir`; returns the result rows.

    progress: False prints nothing (no per-epoch lines, no table; errors still raise).
    bars: progress bars on (True) or off (False); None: only when stderr is a terminal, so a
      redirected log gets plain lines. (Training bars follow `train.fit`: terminal only.)
    continue_older: continue checkpoints made by another version of jaxprune that did not
      record every setting this one has, at the current values (see `check_workdir`)."""
    ctx = make_context(config, workdir, progress=progress, continue_older=continue_older)
    ctx.bars = bars
    try:
        return _run_phases(ctx, config, workdir)
    finally:
        ckpt_lib.unlock_workdir(ctx.workdir)  # also when a phase raises (a notebook kernel lives on)


def _run_phases(ctx: Context, config, workdir: str) -> list:
    t_start = time.perf_counter()
    rows = []
    with _timed(ctx, "dense"):
        dense_state, dense_row = dense_phase(ctx)
        save_model(ctx, "unpruned", ctx.model, dense_state.params, dense_state.batch_stats)
    rows.append(dense_row)
    handset = config_checks.methods(config.prune.methods)
    searches = config_checks.methods(config.search.methods)
    pruner = None
    if handset or searches:
        pruner = make_pruner(ctx, dense_state)
    for method in handset:
        with _timed(ctx, method):
            rows.append(handset_phase(ctx, pruner, method))
        _write(ctx, rows)
    search_logs, winners = {}, {}
    if searches:
        # Compile the shared evaluator once, outside every search's clock, so the first method's
        # search_seconds is not charged for it.
        k = int(config.search.candidates)
        with _timed(ctx, "compile candidate evaluator"):
            candidate_evaluator(ctx, pruner)(np.ones((k, len(pruner.units)), np.float32))
    for method in searches:
        with _timed(ctx, method):
            row, result = search_phase(ctx, pruner, method)
        rows.append(row)
        search_logs[method] = {"macs": result.log.macs[result.log.rows()],
                               "accuracy": result.log.accuracy[result.log.rows()]}
        winners[method] = result.best_keep
        _write(ctx, rows)
    for row in rows:
        if row["method"] in HANDSET_METHODS and pruner is not None:
            winners.setdefault(row["method"], np.asarray(row["keep"]))
    if search_logs:
        report_lib.plot_search(os.path.join(workdir, "search_pareto.png"), search_logs,
                               dense_macs=pruner.cost.dense_macs if pruner.granularity == "channel" else None,
                               budget_macs=pruner.budget if str(config.prune.target) == "macs" else None)
    if winners:
        report_lib.plot_keep_ratios(os.path.join(workdir, "keep_ratios.png"), pruner.units, winners)
    _write(ctx, rows, final=True, wall=time.perf_counter() - t_start)
    merged = report_lib.read_results(workdir)
    modelio.attach_rows(workdir, merged)
    # TensorBoard: the flattened config as hparams (metrics: each method's test accuracy), the
    # table as text, the plots as images.
    ctx.writer.write_summary(
        config.to_dict(), {f"accuracy/{r['method']}": r.get("accuracy") for r in merged},
        text={"results": report_lib.table_markdown(merged)},
        images={name: os.path.join(workdir, f"{name}.png")
                for name in ("search_pareto", "keep_ratios")})
    ctx.writer.close()
    return rows


@contextlib.contextmanager
def _timed(ctx: Context, phase: str):
    """Prints `[timing] <phase>: <seconds> s` (wall time of this invocation, compilation and
    checkpoint restores included) when the phase ends."""
    t0 = time.perf_counter()
    yield
    _log(ctx, f"[timing] {phase}: {time.perf_counter() - t0:.1f} s")


def _write(ctx: Context, rows, final: bool = False, wall: Optional[float] = None) -> None:
    note = (f"Model {ctx.model.spec.name} on {ctx.dataset.name}; MACs are multiply-accumulates per "
            f"example; latency is the median for a batch of {int(ctx.config.train.eval_batch_size)} "
            f"on {jax.devices()[0].platform}; size is the bytes of the saved (compact) params; "
            f"train (s) is the dense training or the fine-tuning time.")
    # Merged by method with the table on disk: a rerun that stops early (Ctrl-C, a refused
    # phase, a damaged checkpoint) never shrinks a complete table.
    merged = report_lib.write_results(ctx.workdir, rows, note)
    if final and ctx.progress:
        print("\n" + report_lib.table_text(merged))
        if wall is not None:
            print(f"wall time of this invocation: {wall:.1f} s; results in {ctx.workdir}/results.md")


# Errors that mean "the input is wrong" (config, data, workdir, checkpoints, a diverging recipe):
# main prints them as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError, data_lib.DataNotFoundError, budget_lib.InfeasibleBudgetError,
               FloatingPointError)


def config_path(name: str) -> str:
    """The file of a config given by name ('quickstart', 'cifar10') or path: a path that exists
    as given, else the repository's `configs/<name>.py` (a source checkout), else the copy
    installed with the package (`jaxprune/configs/`, mapped from `configs/` by pyproject.toml)."""
    if os.path.isfile(name):
        return name
    stem = os.path.splitext(os.path.basename(name))[0]
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(os.path.dirname(here), "configs"), os.path.join(here, "configs")):
        candidate = os.path.join(folder, stem + ".py")
        if stem and os.path.isfile(candidate):
            return candidate
    return name


def load_config(path: str, arg: Optional[str] = None):
    """Loads `get_config(arg)` from a config file (for notebooks; the CLI uses config_flags).

    `path`: a file ('configs/cifar10.py') or a name ('quickstart', 'cifar10'), optionally with
    the variant after ':' ('cifar10:smoke'); names work from an installed package too."""
    import importlib.util

    if arg is None and ":" in os.path.basename(path):
        path, _, arg = path.rpartition(":")
    path = config_path(path)
    if not os.path.isfile(path):
        raise errors.NotFoundError(f"No config file at {path}; give a name (quickstart, cifar10, "
                                   "mnist) or a file like configs/quickstart.py.")
    spec = importlib.util.spec_from_file_location(f"jaxprune_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise errors.NotFoundError(f"{path} is not a Python config file; use one like "
                                   "configs/quickstart.py.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise errors.ConfigError(f"{path} has no get_config(); a config file defines "
                                     "get_config(arg=None) returning a ConfigDict.")
        config = module.get_config(arg) if arg else module.get_config()
    except errors.UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside the user's file is bad input
        raise errors.ConfigError(f"config file {path}{':' + arg if arg else ''} fails to load: "
                                 f"{errors.short(e)}. Fix that file.") from e
    if not hasattr(config, "to_dict"):
        raise errors.ConfigError(f"config file {path}{':' + arg if arg else ''}: get_config() "
                                 f"returned {type(config).__name__}, not a ConfigDict; return "
                                 "one (a missing `return config`?).")
    return config
