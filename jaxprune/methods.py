"""The pruning methods of a run, over a library `pruner.Pruner`: the hand-set keeps (threshold and
sensitivity), the keeps a search is seeded with, the rounds a seeded search may spend, and the
batched candidate evaluator built from a run's data. The pipeline's phases and the benchmarks
call these; a notebook calls the `Pruner` methods they wrap.
"""
from __future__ import annotations

import zlib
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checks
from jaxprune import criteria as criteria_lib
from jaxprune import data as data_lib
from jaxprune import errors
from jaxprune import experiment as experiment_lib
from jaxprune import models as models_lib
from jaxprune import pruner as pruner_lib

HANDSET_METHODS = ("threshold", "sensitivity")
# `search.seed_keeps`: keeps put first in every controller's first round.
SEED_KEEPS = ("uniform",) + HANDSET_METHODS
# The checks of the keys read here (`config_checks` assembles them): which hand-set methods run,
# the gradient criteria's batches (make_pruner), the candidate evaluator's calibration and
# validation examples and its chunks (candidate_evaluator), the seeds (seed_names).
CONFIG_CHECKS = {
    "prune.methods": checks.method_list(HANDSET_METHODS),
    "prune.sensitivity_batches": checks.integer(1),
    "search.calib_batches": checks.integer(1),
    "search.calib_batch_size": checks.integer(1),
    "search.val_examples": checks.integer(1),
}
OPTIONAL_CONFIG_CHECKS = {"search.chunk_size": checks.integer(0),
                          "search.seed_keeps": checks.method_list(SEED_KEEPS)}


class HandsetKeep(NamedTuple):
    """A hand-set method's keep vector, what its result row records about it, and the candidate
    evaluations it took."""
    keep: np.ndarray
    extra: dict
    evaluations: int


def make_pruner(exp: experiment_lib.Experiment, dense_state) -> pruner_lib.Pruner:
    """The library `Pruner` of the trained dense model at the config's budget (channel groups
    discovered from the model, named after its width arguments)."""
    cfg, s, m, ds = exp.config.prune, exp.config.search, exp.model, exp.dataset
    criterion = str(cfg.criterion)
    score_batches = None
    if criterion in criteria_lib.GRADIENT_CRITERIA:  # batches of the calibration images' order
        n, bs = int(cfg.sensitivity_batches), int(s.calib_batch_size)
        score_batches = [
            (data_lib.normalize(jnp.asarray(ds.train_images[idx]), ds.mean, ds.std),
             jnp.asarray(ds.train_labels[idx]))
            for idx in np.array_split(exp.calib_order[:bs * n], n)]
    return pruner_lib.Pruner(
        m.apply, dense_state.params, dense_state.batch_stats, ds.input_shape,
        input_dtype=models_lib.input_example(m.spec).dtype,
        discovery=models_lib.discovery(m) if str(cfg.granularity) == "channel" else None,
        unprunable=m.unprunable, granularity=str(cfg.granularity), sparsity=float(cfg.sparsity),
        target=str(cfg.target), criterion=criterion, score_batches=score_batches,
        key=jax.random.fold_in(exp.keys["calib"], 2), scope=str(cfg.scope),
        lower=float(s.lower), step=float(s.step),
        channel_multiple=int(cfg.get("channel_multiple", 1) or 1),
        n=int(cfg.get("n", 2)), m=int(cfg.get("m", 4)))


def handset_keep(pruner: pruner_lib.Pruner, method: str, evaluate: Callable, *,
                 candidates: int) -> HandsetKeep:
    """The keep of `method` ('threshold': `Pruner.threshold_keep`; 'sensitivity':
    `Pruner.sensitivity_keep` scored by `evaluate`, `candidates` keeps per call)."""
    if method == "threshold":
        return HandsetKeep(pruner.threshold_keep(), {}, 0)
    if method == "sensitivity":
        keep, curves = pruner.sensitivity_keep(evaluate, candidates=int(candidates))
        extra = {"sensitivity": {"grid": curves.keep_grid.tolist(), "dense": curves.dense,
                                 "accuracy": np.round(curves.values, 5).tolist()}}
        # the dense model + every unit at every keep of the grid
        return HandsetKeep(keep, extra, 1 + int(curves.values.size))
    raise ValueError(f"prune.methods: unknown method {method!r}; use "
                     f"{', '.join(HANDSET_METHODS)}.")


def search_seeds(pruner: pruner_lib.Pruner, names: Sequence[str],
                 keep_of: Callable[[str], HandsetKeep]):
    """(seeds float32[S, G] or None, evaluations): the keeps `names` (`search.seed_keeps`), which
    every controller asks first ('uniform': the same keep in every group, projected onto the
    budget; 'threshold' / 'sensitivity': the hand-set keeps `keep_of(name)`, shared with the
    hand-set phases), and the candidate evaluations their making took (the sensitivity
    pre-pass), which the search is charged."""
    if not names:
        return None, 0
    rows, cost = [], 0
    for name in names:
        if name == "uniform":
            rows.append(pruner.project(np.ones((len(pruner.units),), np.float32)))
        else:
            made = keep_of(name)
            rows.append(made.keep)
            cost += made.evaluations
    return np.unique(np.stack(rows), axis=0), cost


def search_rounds(search_config, seed_evaluations: int) -> int:
    """`search.rounds` less the rounds the seeds' making cost (whole rounds, rounded up), so a
    seeded search evaluates no more candidates than an unseeded one."""
    s = search_config
    k = int(s.candidates)
    rounds = int(s.rounds) - -(-int(seed_evaluations) // k)
    if rounds < 1:
        raise errors.ConfigError(
            f"search.seed_keeps={s.seed_keeps!r} costs {seed_evaluations} evaluations, all of "
            f"search.rounds x search.candidates = {int(s.rounds)} x {k}: raise search.rounds, or "
            "seed with 'uniform' / 'threshold' (free).")
    return rounds


def seed_names(config) -> list:
    """The names of `search.seed_keeps` (absent: none)."""
    return checks.methods(config.search.get("seed_keeps", ""))


def candidate_evaluator(exp: experiment_lib.Experiment, pruner: pruner_lib.Pruner,
                        val: Optional[tuple] = None, *, calib_batches: Optional[int] = None,
                        metric: str = "accuracy") -> Callable:
    """`keep float32[K, G] -> proxy float32[K]` (`Pruner.evaluator` on the run's data): adaptive
    BN on `search.calib_batches` (or `calib_batches`) calibration batches of the training split
    (`exp.calib_order`), then `metric` ('accuracy' or 'loss') on the first
    `search.val_examples` validation images, or on validation images [start, start + n) with
    `val=(start, n)`. Never the test split. Each call compiles a new evaluator: build it once
    and pass it."""
    ds, s = exp.dataset, exp.config.search
    start, n = val if val is not None else (0, min(int(s.val_examples), ds.val_images.shape[0]))
    calib_n = int(s.calib_batches if calib_batches is None else calib_batches) * \
        int(s.calib_batch_size)
    order = exp.calib_order[:calib_n]
    return pruner.evaluator(
        data_lib.normalize(jnp.asarray(ds.train_images[order]), ds.mean, ds.std),
        data_lib.normalize(jnp.asarray(ds.val_images[start:start + n]), ds.mean, ds.std),
        ds.val_labels[start:start + n], calib_batch_size=int(s.calib_batch_size),
        eval_batch_size=int(exp.config.train.eval_batch_size),
        chunk_size=int(s.get("chunk_size", 0) or 0) or None,
        precision=str(exp.config.train.precision), metric=metric)


def stable_hash(text: str) -> int:
    """A hash of the whole text, stable across processes (Python's `hash` is salted): the
    per-method search key and per-phase data order fold it in."""
    return zlib.crc32(text.encode()) % (2 ** 31)
