"""The state of one run, built once and passed to every phase: the config, the workdir, the data
(with its device copies uploaded once), the dense model, the random streams and the compiled
programs the phases share. Nothing in it is cached later or changed: a phase reads it.

    exp = experiment.setup(config, workdir)          # checks, locks the workdir, loads, uploads
    state = train.train(exp.trainer, ...)            # the dense model's one compiled train step
    exp.evaluate(params, batch_stats, exp.test)      # its one compiled exact evaluation
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint as ckpt_lib
from jaxprune import checks
from jaxprune import config_checks
from jaxprune import costs as costs_lib
from jaxprune import criteria as criteria_lib
from jaxprune import data as data_lib
from jaxprune import discover as discover_lib
from jaxprune import errors
from jaxprune import masks as masks_lib
from jaxprune import models as models_lib
from jaxprune import report as report_lib
from jaxprune import train as train_lib
from jaxprune import workdir as workdir_lib

# The random streams of a run, split once from `key(config.seed)`.
STREAMS = ("init", "train", "finetune", "search", "calib")
CONFIG_CHECKS = {"seed": checks.integer(0)}  # `config_checks` reads it


class Experiment(NamedTuple):
    """What every phase of a run reads (see the module docstring); `setup` makes it."""
    config: Any
    workdir: str
    dataset: Any  # data.Dataset (host arrays)
    model: Any  # models.FunctionalModel (dense, untrained)
    keys: dict  # {stream: key} of `STREAMS`
    writer: report_lib.MetricWriter
    train_data: tuple  # (images, labels): the training split on the device
    val: train_lib.EvalData  # the validation and test splits on the device, padded to one
    test: train_lib.EvalData  # capacity so one compiled evaluation serves both
    calib_order: np.ndarray  # the training-split permutation calibration batches are read from
    trainer: train_lib.Trainer  # the dense model's compiled training (dense phase + fine-tunes)
    evaluate: Callable  # the dense model's exact evaluation: (params, batch_stats, EvalData)
    progress: bool = True  # False: quiet (no log lines, no table)
    bars: bool = False  # progress bars
    continue_older: bool = False  # checkpoints of another version: see workdir.check_workdir


def setup(config, workdir: str, progress: bool = True, bars: Optional[bool] = None,
          continue_older: bool = False) -> Experiment:
    """Validates `config`, prepares and checks `workdir` (before anything is written), loads the
    data, builds the model and uploads the splits; `bars` None: only on a terminal."""
    config_checks.validate_config(config)
    workdir = workdir_lib.prepare(workdir)
    try:
        # Continued once (--continue_older), a workdir stays so: rerunning the same command
        # resumes it.
        continue_older = bool(continue_older) or workdir_lib.continued_before(workdir)
        continued = workdir_lib.check_workdir(config, workdir, continue_older)
        train_lib.enable_compile_cache(config.train.get("compile_cache_dir"))
        ds = load_data(config.data)
        keys = dict(zip(STREAMS, jax.random.split(jax.random.key(int(config.seed)), len(STREAMS))))
        model = models_lib.get_model(config.model.name, num_classes=ds.num_classes,
                                     input_shape=tuple(ds.input_shape), key=keys["init"],
                                     widths=_data_widths(config, ds))
        _check_model_fits(config, model)
        workdir_lib.write_run_info(config, workdir, continued, continue_older)  # checks passed
        exp = Experiment(
            config=config, workdir=workdir, dataset=ds, model=model, keys=keys,
            writer=report_lib.MetricWriter(workdir),
            train_data=(jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)),
            val=eval_data(config, ds, ds.val_images, ds.val_labels),
            test=eval_data(config, ds, ds.test_images, ds.test_labels),
            calib_order=np.asarray(jax.random.permutation(keys["calib"],
                                                          ds.train_images.shape[0])),
            trainer=train_lib.make_trainer(model.apply, train_lib.Settings.from_config(config),
                                           mean=ds.mean, std=ds.std,
                                           unprunable=model.unprunable),
            evaluate=None, progress=bool(progress),
            bars=train_lib.is_terminal() if bars is None else bool(bars),
            continue_older=bool(continue_older))
        return exp._replace(evaluate=eval_fn(exp, model.apply))
    except BaseException:
        ckpt_lib.unlock_workdir(workdir)  # a notebook kernel lives on
        raise


def eval_fn(exp: Experiment, apply_fn) -> Callable:
    """A new compiled exact evaluation `evaluate(params, batch_stats, data)` of a model (a
    compact one; the dense model's is `exp.evaluate`) on `EvalData` such as `exp.test`."""
    return train_lib.make_eval_fn(apply_fn, mean=exp.dataset.mean, std=exp.dataset.std,
                                  batch_size=int(exp.config.train.eval_batch_size),
                                  precision=str(exp.config.train.precision))


def val_images(exp: Experiment, start: int, n: int) -> train_lib.EvalData:
    """Validation images [start, start + n) on the device, at the capacity of `exp.val` (which
    it is when they are the whole split), so the same compiled evaluation serves them."""
    ds = exp.dataset
    start, n = int(start), min(int(n), ds.val_images.shape[0] - int(start))
    if (start, n) == (0, ds.val_images.shape[0]):
        return exp.val
    return eval_data(exp.config, ds, ds.val_images[start:start + n], ds.val_labels[start:start + n])


def eval_data(config, dataset, images, labels) -> train_lib.EvalData:
    """A split on the device, padded to the run's one evaluation capacity (the larger of the
    validation and test splits), so one compiled evaluation per model serves every set."""
    return train_lib.device_eval_data(
        images, labels, int(config.train.eval_batch_size),
        max(dataset.val_images.shape[0], dataset.test_images.shape[0]))


def measure_row(exp: Experiment, method: str, *, model, params, batch_stats, masks=None,
                train_seconds: float, extra: Optional[dict] = None) -> dict:
    """Test accuracy, params, MACs, size, latency of a (compact or masked) model."""
    evaluate = exp.evaluate if model.apply is exp.model.apply else \
        eval_fn(exp, model.apply)
    test = evaluate(params, batch_stats, exp.test)
    shape = tuple(exp.dataset.input_shape)
    batch = int(exp.config.train.eval_batch_size)
    example = models_lib.input_example(model.spec, batch)  # float32 images or int32 token ids
    n_params = costs_lib.count_params(params, masks)
    dense_params = costs_lib.count_params(exp.model.params)
    macs = costs_lib.count_macs(model.apply, params, batch_stats, shape, masks=masks,
                                input_dtype=example.dtype)
    x = jnp.zeros(example.shape, example.dtype)
    fwd = functools.partial(_logits, apply_fn=model.apply,
                            precision=str(exp.config.train.precision))
    latency = costs_lib.latency(fwd, params, batch_stats, x)
    row = {"method": method, "accuracy": test["accuracy"], "test_loss": test["loss"],
           "params": int(n_params), "macs": int(macs),
           "size_mb": costs_lib.param_bytes(params) / 1e6,
           "train_seconds": float(train_seconds), "latency_ms": float(latency["median_ms"]),
           "latency_batch": batch, "sparsity": 1.0 - n_params / dense_params}
    row.update(extra or {})
    return row


@functools.partial(jax.jit, static_argnames=("apply_fn", "precision"))
def _logits(params, batch_stats, x, *, apply_fn, precision):
    """The inference logits `measure_row` times: compiled once per model program and precision,
    so the rows of one model (the dense and every masked one) share one compilation."""
    return train_lib.mixed_apply(apply_fn, precision)(params, batch_stats, x, train=False)[0]


def fingerprint(exp: Experiment) -> dict:
    """What every phase's checkpoints are made for: the model and the data."""
    return {"model": exp.model.spec.name, "dataset": exp.dataset.name,
            "num_classes": int(exp.dataset.num_classes),
            "input_shape": list(exp.dataset.input_shape),
            "widths": [list(w) for w in exp.model.spec.widths]}


def checkpointer(exp: Experiment, phase: str, extra: Optional[dict] = None):
    """`workdir.checkpointer` of this run's phase (fingerprinted with `fingerprint(exp)`, the
    phase's config keys and `extra`)."""
    return workdir_lib.checkpointer(exp.workdir, exp.config, phase, fingerprint(exp), extra,
                                    continue_older=exp.continue_older)


def log(exp: Experiment, text: str) -> None:
    if exp.progress:
        print(text, flush=True)


def load_data(data_config):
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
