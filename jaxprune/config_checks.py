"""Checks a config tree before anything runs: every problem in one ValueError.

    validate_config(config)   # raises ValueError listing each bad key, its value, what is allowed

The allowed names below mirror the registries (`models.MODELS`, `search.controllers.CONTROLLERS`,
`pipeline.HANDSET_METHODS`, `criteria.CRITERIA`); tests/configs_test.py checks that they agree.
They are spelled out here so that checking a config does not import Flax, the search code or
TensorFlow, and fails at once.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from jaxprune.data import DATASETS
MODELS = ("lenet5", "mlp", "vgg16", "resnet20", "resnet56", "resnet18")
PRUNE_METHODS = ("threshold", "sensitivity")
SEARCH_METHODS = ("reinforce", "gan", "evolution", "random", "uniform")
# The pipeline scores weights with criterion(params) alone, so only magnitude criteria fit here.
CRITERIA = ("l1", "l2")
CHOICES = {
    "train.optimizer": ("sgd", "adam"),
    "train.schedule": ("cosine", "step", "constant"),
    "train.l1_target": ("weights", "bn"),
    "prune.granularity": ("channel", "unstructured", "nm"),
    "prune.scope": ("layerwise", "global"),
    "prune.target": ("macs", "params"),
    "prune.criterion": CRITERIA,
    "prune.schedule": ("oneshot", "gradual", "imp"),
}

Check = Callable[[Any], Optional[str]]  # value -> what is wrong with it, or None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(minimum: int) -> Check:
    def check(v):
        if not _is_int(v) or v < minimum:
            return f"must be an int >= {minimum}"
        return None
    return check


def _optional_int(minimum: int) -> Check:
    def check(v):
        if v is not None and (not _is_int(v) or v < minimum):
            return f"must be None (all) or an int >= {minimum}"
        return None
    return check


def _number(low: float, high: float, *, low_open=False, high_open=False, note="") -> Check:
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v):
        if not _is_number(v):
            return f"must be a number in {text}{note}"
        if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high)):
            return f"must be in {text}{note}"
        return None
    return check


def _positive_number(v):
    return None if _is_number(v) and v > 0 else "must be a number > 0"


def _non_negative_number(v):
    return None if _is_number(v) and v >= 0 else "must be a number >= 0"


def _bool(v):
    return None if isinstance(v, bool) else "must be True or False"


def _optional_str(v):
    return None if v is None or isinstance(v, str) else "must be None or a path string"


def _choice(allowed) -> Check:
    def check(v):
        return None if v in allowed else f"must be one of {', '.join(map(repr, allowed))}"
    return check


def _method_list(allowed) -> Check:
    def check(v):
        if not isinstance(v, str):
            return f"must be a comma-separated string of {', '.join(allowed)} (or '')"
        names = [m.strip() for m in v.split(",") if m.strip()]
        unknown = [m for m in names if m not in allowed]
        if unknown:
            return f"has unknown method(s) {unknown}; allowed: {', '.join(allowed)} (or '')"
        if len(set(names)) != len(names):
            return "names a method twice"
        return None
    return check


def methods(text: str) -> list[str]:
    """'threshold, sensitivity' → ['threshold', 'sensitivity'] ('' → [])."""
    return [m.strip() for m in str(text or "").split(",") if m.strip()]


SCHEMA: dict[str, Check] = {
    "seed": _int(0),
    "data.name": _choice(DATASETS),
    "data.data_dir": _optional_str,
    "data.val_size": _int(0),
    "data.train_size": _optional_int(1),
    "data.test_size": _optional_int(1),
    "data.augment": _bool,
    "model.name": _choice(MODELS),
    "train.epochs": _int(1),
    "train.batch_size": _int(1),
    "train.eval_batch_size": _int(1),
    "train.learning_rate": _positive_number,
    "train.momentum": _number(0, 1, high_open=True),
    "train.weight_decay": _non_negative_number,
    "train.l1": _non_negative_number,
    "train.checkpoint_every": _int(0),  # 0: only at the end of each phase
    "prune.methods": _method_list(PRUNE_METHODS),
    "prune.sparsity": _number(0, 1, high_open=True,
                              note=" (the fraction removed; 1.0 or above would remove everything)"),
    "prune.sensitivity_batches": _int(1),
    "finetune.epochs": _int(0),
    "finetune.learning_rate": _positive_number,
    "search.methods": _method_list(SEARCH_METHODS),
    "search.rounds": _int(1),
    "search.candidates": _int(1),
    "search.calib_batches": _int(1),
    "search.calib_batch_size": _int(1),
    "search.val_examples": _int(1),
    "search.lower": _number(0, 1, low_open=True, note=" (the smallest keep ratio of a group)"),
    "search.step": _number(0, 1, high_open=True, note=" (keep-ratio grid step; 0 = continuous)"),
    **{key: _choice(allowed) for key, allowed in CHOICES.items()},
}
OPTIONAL: dict[str, Check] = {"data.cache": _optional_str, "prune.imp_rounds": _int(1),
                             "prune.n": _int(1), "prune.m": _int(1),
                             "search.chunk_size": _int(0),
                             "prune.channel_multiple": _int(1)}  # may be absent from a config

_MISSING = object()


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def problems(config) -> list[str]:
    """Every problem of `config` (ConfigDict or nested dict), one message each; [] if none."""
    found = []
    for key, check in list(SCHEMA.items()) + list(OPTIONAL.items()):
        value = _lookup(config, key)
        if value is _MISSING:
            if key in SCHEMA:
                found.append(f"{key} is missing")
            continue
        problem = check(value)
        if problem:
            found.append(f"{key}={value!r} {problem}")
    if found:
        return found
    # Relations between keys (only once each key is valid on its own).
    train_size = _lookup(config, "data.train_size")
    batch_size = _lookup(config, "train.batch_size")
    if train_size is not None and batch_size > train_size:
        found.append(f"train.batch_size={batch_size} is larger than data.train_size={train_size}; "
                     "lower the batch size or use more training examples")
    scored = methods(_lookup(config, "search.methods")) + [
        m for m in methods(_lookup(config, "prune.methods")) if m == "sensitivity"]
    if scored and _lookup(config, "data.val_size") == 0:
        found.append(f"data.val_size=0, but {', '.join(scored)} score candidates on the "
                     "validation split; use data.val_size >= 1")
    granularity = _lookup(config, "prune.granularity")
    if granularity == "nm" and (methods(_lookup(config, "search.methods"))
                                or "sensitivity" in methods(_lookup(config, "prune.methods"))):
        found.append("prune.granularity='nm' has one fixed pattern (n of every m weights), so there "
                     "is nothing to search or to rank by sensitivity; use prune.methods=threshold "
                     "and search.methods='' with it, or granularity 'channel' / 'unstructured'")
    if granularity == "nm" and _lookup(config, "prune.schedule") != "oneshot":
        found.append("prune.granularity='nm' supports only prune.schedule='oneshot'")
    return found


def validate_config(config) -> None:
    """Raises ValueError naming every bad key, its value and what is allowed."""
    found = problems(config)
    if found:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(found))
