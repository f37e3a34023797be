"""The search loop: ask → project onto the budget → evaluate → tell, checkpointed every round.

Randomness is `fold_in(search_key, round)`, the controller state and the whole search log are
saved after every round, so a search killed at any point and started again with the same
command continues from its last finished round and ends with the same result as an
uninterrupted run.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.search import budget as budget_lib
from jaxprune.search import space as space_lib


class SearchLog(NamedTuple):
    """Every candidate evaluated, preallocated for `rounds * k` rows (`filled` says how many)."""
    keep: np.ndarray       # float32[N, G] keep ratios (after projection)
    macs: np.ndarray       # float32[N]
    params: np.ndarray     # float32[N]
    accuracy: np.ndarray   # float32[N] proxy (validation) accuracy
    round: np.ndarray      # int32[N]
    filled: np.ndarray     # int32[] rows written

    @classmethod
    def empty(cls, n: int, g: int) -> "SearchLog":
        return cls(keep=np.zeros((n, g), np.float32), macs=np.zeros((n,), np.float32),
                   params=np.zeros((n,), np.float32), accuracy=np.full((n,), -1.0, np.float32),
                   round=np.full((n,), -1, np.int32), filled=np.zeros((), np.int32))

    def rows(self) -> slice:
        return slice(0, int(self.filled))

    def best(self) -> int:
        """Index of the best candidate (highest proxy accuracy; the earliest on ties)."""
        n = int(self.filled)
        if n == 0:
            raise ValueError("The search log is empty: no candidate was evaluated.")
        return int(np.argmax(self.accuracy[:n]))

    def to_records(self, dense_macs: Optional[float] = None) -> list:
        """One dict per evaluated candidate; with `dense_macs`, also its realised MACs fraction."""
        out = []
        for i in range(int(self.filled)):
            rec = {"round": int(self.round[i]), "accuracy": float(self.accuracy[i]),
                   "macs": float(self.macs[i]), "params": float(self.params[i]),
                   "keep": [round(float(v), 5) for v in self.keep[i]]}
            if dense_macs:
                rec["macs_fraction"] = float(self.macs[i]) / float(dense_macs)
            out.append(rec)
        return out


class SearchResult(NamedTuple):
    best_keep: np.ndarray
    best_accuracy: float
    log: SearchLog
    controller_state: object
    seconds: float


def run(controller, space: space_lib.SearchSpace, *, key, rounds: int, k: int,
        evaluate_fn: Callable, macs_fn: Callable, params_fn: Callable, budget: float,
        budget_fn: Optional[Callable] = None, checkpointer=None, meta: Optional[dict] = None,
        name: str = "search", progress: bool = True, writer=None, step=None) -> SearchResult:
    """Runs (or resumes) one search.

    Args:
      controller: a `Controller(init, ask, tell)`.
      space: the search space (bounds, discretisation).
      key: the search stream; round r uses `fold_in(key, r)`.
      rounds, k: rounds and candidates per round (`rounds * k` evaluations in all).
      evaluate_fn: `keep float32[K, G] -> accuracy float32[K]` (batched evaluation).
      macs_fn, params_fn: jittable `keep float32[G] -> cost` of one candidate.
      budget: the absolute budget on `budget_fn` (MACs or params); `budget_fn` defaults to macs_fn.
      checkpointer: optional `checkpoint.Checkpointer`; state + log are saved every round.
      step: the grid candidates are snapped to by the projection, scalar or per-group [G]
        (e.g. whole multiples of 8 channels); defaults to `space.step`.
    """
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"search.candidates={k}: need at least 1 candidate per round.")
    if rounds < 1:
        raise ValueError(f"search.rounds={rounds}: need at least 1 round.")
    budget_fn = macs_fn if budget_fn is None else budget_fn
    g = int(space.num_groups)
    init_key, ask_key = jax.random.split(key)
    state = controller.init(init_key, space)
    log = SearchLog.empty(rounds * k, g)
    start_round = 0
    seconds = 0.0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        restored, saved_meta = checkpointer.restore(like={"controller": state, "log": log._asdict()})
        state = restored["controller"]
        log = SearchLog(**{f: np.asarray(v) for f, v in restored["log"].items()})
        start_round = int(saved_meta["round"]) + 1
        seconds = float(saved_meta.get("seconds", 0.0))

    lower, upper = space.lower, space.upper
    step = space.step if step is None else step

    @jax.jit
    def propose(round_key, state):
        keep = controller.ask(round_key, state, k)
        keep = budget_lib.project(keep, budget_fn, budget, lower, upper, step=step)
        return keep, jax.vmap(macs_fn)(keep), jax.vmap(params_fn)(keep)

    tell = jax.jit(controller.tell)
    bar = tqdm(range(start_round, rounds), desc=f"search {name}", disable=not progress,
               initial=start_round, total=rounds, dynamic_ncols=True)
    for r in bar:
        t0 = time.perf_counter()
        keep, macs, params = propose(jax.random.fold_in(ask_key, r), state)
        accuracy = jnp.asarray(evaluate_fn(keep), jnp.float32)
        state = tell(state, keep, accuracy)
        rows = slice(r * k, (r + 1) * k)
        keep, macs, params, accuracy = jax.device_get((keep, macs, params, accuracy))
        log.keep[rows] = keep
        log.macs[rows] = macs
        log.params[rows] = params
        log.accuracy[rows] = accuracy
        log.round[rows] = r
        log = log._replace(filled=np.asarray((r + 1) * k, np.int32))
        dt = time.perf_counter() - t0
        seconds += dt
        best = log.best()
        bar.set_postfix(best=f"{100 * log.accuracy[best]:.2f}%", cand_s=f"{k / max(dt, 1e-9):.1f}")
        if writer is not None:
            writer.write(r, {"phase": f"search_{name}", "round": r,
                             "round_best_accuracy": float(np.max(accuracy)),
                             "best_accuracy": float(log.accuracy[best]),
                             "candidates_per_second": k / max(dt, 1e-9)})
        if checkpointer is not None:
            checkpointer.save(r, {"controller": state, "log": log._asdict()},
                              dict(meta or {}, round=r, seconds=seconds, done=r == rounds - 1))
    if checkpointer is not None:
        checkpointer.wait()
    best = log.best()
    return SearchResult(best_keep=np.asarray(log.keep[best]), best_accuracy=float(log.accuracy[best]),
                        log=log, controller_state=state, seconds=seconds)


class Stage(NamedTuple):
    """One rung of `successive_halving`: score the best `top` survivors with `score_fn`."""
    name: str
    top: int
    score_fn: Callable  # keep float32[M, G] -> score float32[M] (higher is better)


def successive_halving(log: SearchLog, stages) -> tuple[np.ndarray, list]:
    """The winner of a search chosen by successive halving over its log.

    Every distinct candidate the search evaluated has its (cheap) proxy score; the best
    `stages[0].top` by that score are scored again by `stages[0].score_fn` (e.g. the whole
    validation split), the best `stages[1].top` of those by the next (e.g. a short masked
    fine-tune), and so on. The same stages after every controller's search keep the comparison
    at equal cost. Ties keep the earlier candidate. Returns `(best_keep, history)` where
    history has, per stage, the candidates' log rows and their scores.
    """
    n = int(log.filled)
    if n == 0:
        raise ValueError("The search log is empty: no candidate was evaluated.")
    keeps = log.keep[:n]
    _, first = np.unique(keeps, axis=0, return_index=True)
    rows = np.sort(first)  # one row per distinct candidate, earliest first
    scores = log.accuracy[rows].astype(np.float64)
    history = []
    for stage in stages:
        if int(stage.top) < 1:
            raise ValueError(f"selection stage {stage.name!r}: top={stage.top}; must be >= 1.")
        keep_idx = np.argsort(-scores, kind="stable")[:int(stage.top)]
        rows = rows[keep_idx]
        scores = np.asarray(stage.score_fn(keeps[rows]), np.float64)
        history.append({"stage": stage.name, "rows": rows.tolist(),
                        "scores": [float(v) for v in scores]})
    return np.asarray(keeps[rows[int(np.argmax(scores))]]), history
