"""Picking a search's winner from its log by successive halving (`search.select_*`): the best
candidates by proxy re-scored on more validation images, the best of those fine-tuned briefly
and judged again. The same stages follow every controller, so each costs the same. The pipeline
and the benchmarks call `select_winner` with their own scoring functions.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from jaxprune import checks
from jaxprune.search import loop as loop_lib

# The checks of the `search.select_*` keys (`config_checks` reads them; absent keys take the
# defaults `selection_settings` gives).
OPTIONAL_CONFIG_CHECKS = {
    "search.select_top": checks.integer(0), "search.select_val_examples": checks.integer(0),
    "search.select_finetune": checks.integer(0), "search.select_epochs": checks.integer(1)}


def selection_settings(config) -> dict:
    """The `search.select_*` keys as ints (absent keys at their defaults), or {} when the
    selection is off (`select_top` < 1)."""
    s = config.search
    out = {"select_top": int(s.get("select_top", 0) or 0),
           "select_val_examples": int(s.get("select_val_examples", 0) or 0),
           "select_finetune": int(s.get("select_finetune", 0) or 0),
           "select_epochs": int(s.get("select_epochs", 1) or 1)}
    return out if out["select_top"] >= 1 else {}


def select_val_examples(config, val_size: int) -> int:
    """How many validation images (the first ones, of the `val_size` the split has) the
    selection scores on: 0 when it is off."""
    s, n = selection_settings(config), int(val_size)
    return min(s["select_val_examples"] or n, n) if s else 0


def select_winner(log, settings: dict, *, validate: Callable,
                  short_finetune: Optional[Callable] = None) -> dict:
    """Successive halving over a search `log` with `settings` (`selection_settings`): the
    `select_top` distinct candidates with the best proxy are scored by `validate(keeps[K, G])`
    (on `select_val_examples` validation images), then, with `select_finetune` > 0, the best
    `select_finetune` of those by `short_finetune(keeps) -> accuracies` (each fine-tuned for
    `select_epochs` epochs and judged on the same images).
    Returns {} when `settings` is {}, else {'best_keep', 'stages', 'seconds'}."""
    if not settings:
        return {}
    stages = [loop_lib.Stage("validation", settings["select_top"], validate)]
    if settings["select_finetune"] > 0:
        if short_finetune is None:
            raise ValueError("search.select_finetune > 0 needs a short_finetune function.")
        stages.append(loop_lib.Stage("short fine-tune", settings["select_finetune"],
                                     short_finetune))
    t0 = time.perf_counter()
    best_keep, history = loop_lib.successive_halving(log, stages)
    return {"best_keep": best_keep, "stages": history, "seconds": time.perf_counter() - t0}


def describe(method: str, selection: dict) -> str:
    """The log line of a selection: each stage's size and best score."""
    return f"[search_{method}] selection: " + "; ".join(
        f"{h['stage']} of {len(h['rows'])}: best {100 * max(h['scores']):.2f} %"
        for h in selection["stages"])
