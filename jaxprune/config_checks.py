"""Checks a config tree before anything runs: every problem in one ConfigError (a ValueError).

    validate_config(config)   # raises ConfigError listing each bad key, its value, what is allowed

Strict: a key that no config in configs/ defines (and `SCHEMA` / `OPTIONAL` do not know) is an
error with the nearest known key suggested, and NaN / infinity is refused for every number.
`phase_settings(config, phase)` is the part of the config that determines a phase's result (its
checkpoint fingerprint). The configs in configs/ start from `common_config()` (the sections and
the defaults they all share) and shrink their 'smoke' variants with `smoke_sizes(config)`.
`load_config('cifar10:smoke')` loads a config file by name or path (notebooks; the CLI uses
config_flags).

The allowed names are read from the modules that own them (`models.MODELS`,
`search.controllers.CONTROLLERS`, `methods.HANDSET_METHODS`, `criteria.CRITERIA`,
`data.DATASETS`, `train.OPTIMIZERS`, `pruner.GRANULARITIES`, `schedules.SCHEDULES`, …) when a
check first needs them, so importing this module stays light (the CLI uses it to name a
mistyped key before JAX loads) and no list of names is copied here.
"""
from __future__ import annotations

import collections.abc
import difflib
import functools
import math
import os
import re
from typing import Any, Callable, Optional

from jaxprune.data import DATASETS, SOURCES
from jaxprune.errors import ConfigError, NotFoundError, UserError, short


class _Registry(collections.abc.Sequence):
    """The names of the registry `module.attr` (a dict or tuple), read on first use."""

    def __init__(self, module: str, attr: str):
        self._where = (module, attr)

    @functools.cached_property
    def _names(self) -> tuple:
        import importlib
        return tuple(getattr(importlib.import_module(self._where[0]), self._where[1]))

    def __getitem__(self, i):
        return self._names[i]

    def __len__(self) -> int:
        return len(self._names)


MODELS = _Registry("jaxprune.models", "MODELS")
PRUNE_METHODS = _Registry("jaxprune.methods", "HANDSET_METHODS")
SEARCH_METHODS = _Registry("jaxprune.search.controllers", "CONTROLLERS")
SEED_KEEPS = _Registry("jaxprune.methods", "SEED_KEEPS")
CRITERIA = _Registry("jaxprune.criteria", "CRITERIA")
CHANNEL_CRITERIA = _Registry("jaxprune.criteria", "CHANNEL_CRITERIA")
# Each choice is read from the module that owns it (the names it dispatches on).
CHOICES = {
    "train.optimizer": _Registry("jaxprune.train", "OPTIMIZERS"),
    "train.schedule": _Registry("jaxprune.train", "SCHEDULES"),
    "train.l1_target": _Registry("jaxprune.train", "L1_TARGETS"),
    "train.precision": _Registry("jaxprune.train", "PRECISIONS"),
    "prune.granularity": _Registry("jaxprune.pruner", "GRANULARITIES"),
    "prune.scope": _Registry("jaxprune.pruner", "SCOPES"),
    "prune.target": _Registry("jaxprune.pruner", "TARGETS"),
    "prune.criterion": CRITERIA,
    "prune.schedule": _Registry("jaxprune.schedules", "SCHEDULES"),
}

Check = Callable[[Any], Optional[str]]  # value -> what is wrong with it, or None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (NaN and infinities are not numbers a config can mean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
            return f"must be a finite number in {text}{note}"
        if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high)):
            return f"must be in {text}{note}"
        return None
    return check


def _positive_number(v):
    return None if _is_number(v) and v > 0 else "must be a finite number > 0"


def _non_negative_number(v):
    return None if _is_number(v) and v >= 0 else "must be a finite number >= 0"


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
    "train.warmup_epochs": _non_negative_number,
    "train.label_smoothing": _number(0, 1, high_open=True),
    "train.compile_cache_dir": _optional_str,
    "train.init_from": _optional_str,
    "train.init_method": _optional_str,
    "finetune.warmup_epochs": _non_negative_number,
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
OPTIONAL: dict[str, Check] = {"data.cache": _optional_str, "data.source": _choice(SOURCES),
                             "data.seq_len": _int(2), "data.vocab_size": _int(4),  # text data
                             "data.portable_path": _optional_str, "data.download": _bool,
                             "prune.imp_rounds": _int(1),
                             "prune.n": _int(1), "prune.m": _int(1),
                             "search.chunk_size": _int(0),
                             "search.seed_keeps": _method_list(SEED_KEEPS),
                             "search.select_top": _int(0), "search.select_val_examples": _int(0),
                             "search.select_finetune": _int(0), "search.select_epochs": _int(1),
                             "prune.channel_multiple": _int(1)}  # may be absent from a config
# Controller hyper-parameters, `search.<controller>.<name>` (the make_* arguments in
# jaxprune/search/; optional, absent keys take the factory defaults).
_PROB = _number(0, 1)
OPTIONAL.update({f"search.{name}": check for name, check in {
    "reinforce.learning_rate": _positive_number, "reinforce.entropy_weight": _non_negative_number,
    "reinforce.baseline_decay": _number(0, 1, high_open=True), "reinforce.num_bins": _int(2),
    "reinforce.autoregressive": _bool, "reinforce.normalize_advantages": _bool,
    "reinforce.hidden_size": _int(1), "reinforce.embed_size": _int(1),
    "reinforce.recurrent_lr_scale": _positive_number,
    "reinforce.reward_shaping": _choice(("none", "rank")),
    "reinforce.clip_epsilon": _number(0, 1, high_open=True), "reinforce.update_epochs": _int(1),
    "gan.elite_size": _int(1), "gan.noise_size": _int(1), "gan.hidden_size": _int(1),
    "gan.learning_rate": _positive_number, "gan.train_steps": _int(0),
    "gan.explore_std": _non_negative_number, "gan.explore_fraction": _PROB,
    "gan.elite_weighting": _choice(("uniform", "rank")),
    "evolution.population_size": _int(2), "evolution.tournament_size": _int(1),
    "evolution.crossover_prob": _PROB, "evolution.mutation_prob": _PROB,
    "evolution.mutation_std": _non_negative_number,
    "evolution.survival": _choice(("elitist", "aging")),
}.items()})


def common_config():
    """A ConfigDict with the settings every config in configs/ starts from: the sections (data,
    model, train, prune, finetune, search), seed 0 and the pruning and search machinery's
    defaults. Each config file fills in its dataset, model and recipe and overrides what it
    needs, so these defaults and their notes live here once."""
    import ml_collections
    from ml_collections import config_dict

    from jaxprune.search import controllers as controllers_lib

    config = ml_collections.ConfigDict()
    config.seed = 0
    for section in ("data", "model", "train", "prune", "finetune", "search"):
        config[section] = ml_collections.ConfigDict()

    config.train.momentum = 0.9  # sgd's (adam does not use it)
    config.train.schedule = "cosine"
    config.train.l1 = 0.0
    config.train.precision = "fp32"  # "bf16": compute in bfloat16 (GPU/TPU); params, optimizer, BN stats stay float32
    config.train.label_smoothing = 0.0
    config.train.compile_cache_dir = config_dict.placeholder(str)  # JAX persistent compilation cache
    # A trained model to prune instead of training one: a workdir (or experiment folder) holding
    # models/<init_method>, saved by a run of the same model and data, or a dense-params .npz
    # (modelio.save_dense_params, e.g. a GPU run's); the dense phase restores it.
    config.train.init_from = config_dict.placeholder(str)
    config.train.init_method = "unpruned"

    config.prune.granularity = "channel"
    config.prune.scope = "layerwise"
    config.prune.target = "macs"
    config.prune.criterion = "l1"  # or l2, taylor, snip (gradients on sensitivity_batches), random, bn_scale, mask_gradient (channels)
    config.prune.schedule = "oneshot"
    config.prune.imp_rounds = 3  # prune.schedule="imp": prune-rewind-train rounds
    config.prune.n, config.prune.m = 2, 4  # prune.granularity="nm": keep n of every m weights

    config.finetune.warmup_epochs = 0.0

    config.search.step = 0.0
    config.search.chunk_size = 0  # candidates per vmapped chunk (0: all K at once; 4 is faster on a CPU)
    # Keeps every controller asks first: comma-separated 'uniform', 'threshold', 'sensitivity'
    # (the sensitivity pre-pass's evaluations are taken off the search's rounds); '' = none.
    config.search.seed_keeps = ""
    # Winner by successive halving over the search log (0: the best proxy score wins): the best
    # select_top candidates re-scored on select_val_examples validation images (0: all), the
    # best select_finetune of those fine-tuned select_epochs epochs, judged on the same images.
    config.search.select_top = 0
    config.search.select_val_examples = 0
    config.search.select_finetune = 0
    config.search.select_epochs = 1
    # Controller hyper-parameters, defaults read off each factory (jaxprune/search/); override
    # e.g. --config.search.reinforce.learning_rate=0.1.
    for name in ("reinforce", "gan", "evolution"):
        config.search[name] = ml_collections.ConfigDict(controllers_lib.default_hparams(name))
    return config


def smoke_sizes(config) -> None:
    """Shrinks `config` (in place) to the sizes every config's 'smoke' variant runs in seconds
    for tests: 64 training / 32 validation / 32 test examples, one epoch of batch 16, one
    search round of 8 candidates on 16 validation examples."""
    config.data.val_size = 32
    config.data.train_size = 64
    config.data.test_size = 32
    config.train.epochs = 1
    config.train.batch_size = 16
    config.train.eval_batch_size = 16
    config.train.checkpoint_every = 2
    config.finetune.epochs = 1
    config.search.rounds = 1
    config.search.candidates = 8
    config.search.calib_batches = 1
    config.search.calib_batch_size = 8
    config.search.val_examples = 16


_MISSING = object()
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# ----------------------------------------------------------------------------------------------
# Loading a config file by name or path (notebooks; the CLI uses config_flags)


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
        raise NotFoundError(f"No config file at {path}; give a name (quickstart, cifar10, "
                            "mnist) or a file like configs/quickstart.py.")
    spec = importlib.util.spec_from_file_location(f"jaxprune_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise NotFoundError(f"{path} is not a Python config file; use one like "
                            "configs/quickstart.py.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"{path} has no get_config(); a config file defines "
                              "get_config(arg=None) returning a ConfigDict.")
        config = module.get_config(arg) if arg else module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside the user's file is bad input
        raise ConfigError(f"config file {path}{':' + arg if arg else ''} fails to load: "
                          f"{short(e)}. Fix that file.") from e
    if not hasattr(config, "to_dict"):
        raise ConfigError(f"config file {path}{':' + arg if arg else ''}: get_config() "
                          f"returned {type(config).__name__}, not a ConfigDict; return "
                          "one (a missing `return config`?).")
    return config


def flatten(config) -> dict:
    """{'train.epochs': 30, …}: every leaf of a ConfigDict or nested dict under its dotted key."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) or hasattr(v, "to_dict"):
                walk(v.to_dict() if hasattr(v, "to_dict") else v, key + ".")
            else:
                out[key] = v
    walk(tree, "")
    return out


@functools.lru_cache(maxsize=1)
def _repository_keys() -> frozenset:
    """Keys of every `get_config(variant)` in configs/ (variants read off `arg == '…'`)."""
    import importlib.util

    keys = set()
    if not os.path.isdir(CONFIG_DIR):
        return frozenset()
    for name in sorted(os.listdir(CONFIG_DIR)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(CONFIG_DIR, name)
        try:
            spec = importlib.util.spec_from_file_location(f"_jaxprune_known_{name[:-3]}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            variants = [None] + re.findall(r"arg\s*==\s*[\"'](\w+)[\"']", open(path).read())
            for arg in variants:
                keys |= set(flatten(module.get_config(arg) if arg else module.get_config()))
        except Exception:  # noqa: BLE001 - a config being edited must not break every run
            continue
    return frozenset(keys)


def known_keys() -> frozenset:
    """Every valid dotted key: `SCHEMA`, `OPTIONAL` and the keys of the configs in configs/."""
    return frozenset(SCHEMA) | frozenset(OPTIONAL) | _repository_keys()


def _unknown_key_problems(flat: dict) -> list[str]:
    known = known_keys()
    found = []
    for key in sorted(flat):
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no config in configs/ has it"
        found.append(f"{key} is not a known config key ({hint}); remove or rename it")
    return found


def _non_finite_problems(flat: dict) -> list[str]:
    return [f"{key}={value!r} must be a finite number (not NaN or infinity)"
            for key, value in sorted(flat.items())
            if isinstance(value, float) and not math.isfinite(value)]


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
    flat = flatten(config)
    found = _unknown_key_problems(flat)
    checked = set()
    for key, check in list(SCHEMA.items()) + list(OPTIONAL.items()):
        value = _lookup(config, key)
        if value is _MISSING:
            if key in SCHEMA:
                found.append(f"{key} is missing")
            continue
        checked.add(key)
        problem = check(value)
        if problem:
            found.append(f"{key}={value!r} {problem}")
    found += _non_finite_problems({k: v for k, v in flat.items() if k not in checked})
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
    if _lookup(config, "data.source") == "portable" and not _lookup(config, "data.portable_path") \
            and _lookup(config, "data.name") != "digits":
        found.append("data.source='portable' needs data.portable_path: make the file once where "
                     "TFDS works with `python -m jaxprune.data portable --name "
                     f"{_lookup(config, 'data.name')} --out FILE.npz`, then pass "
                     "--config.data.portable_path=FILE.npz")
    granularity = _lookup(config, "prune.granularity")
    if granularity == "nm" and (methods(_lookup(config, "search.methods"))
                                or "sensitivity" in methods(_lookup(config, "prune.methods"))):
        found.append("prune.granularity='nm' has one fixed pattern (n of every m weights), so there "
                     "is nothing to search or to rank by sensitivity; use prune.methods=threshold "
                     "and search.methods='' with it, or granularity 'channel' / 'unstructured'")
    if granularity == "nm" and _lookup(config, "prune.schedule") != "oneshot":
        found.append("prune.granularity='nm' supports only prune.schedule='oneshot'")
    criterion = _lookup(config, "prune.criterion")
    if criterion in CHANNEL_CRITERIA and granularity != "channel":
        weight_criteria = ", ".join(c for c in CRITERIA if c not in CHANNEL_CRITERIA)
        found.append(f"prune.criterion={criterion!r} scores channels (BatchNorm scales, mask "
                     f"gradients), not the weights that prune.granularity={granularity!r} "
                     f"prunes; use granularity 'channel' or a weight criterion ({weight_criteria})")
    return found


def validate_config(config) -> None:
    """Raises ConfigError (a ValueError) naming every bad key, its value and what is allowed."""
    found = problems(config)
    if found:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(found))


# ----------------------------------------------------------------------------------------------
# What determines each phase's result (its checkpoint fingerprint)

# Keys that change no result: where things are read or cached, how often to checkpoint, how
# evaluation is batched, and which methods run (each method has its own phases).
NOT_RESULT = frozenset({
    "train.eval_batch_size", "train.checkpoint_every", "train.compile_cache_dir",
    "data.data_dir", "data.cache", "data.portable_path", "data.download",
    "prune.methods", "search.methods", "search.chunk_size"})
# Optional keys that change nothing at this value, which is what the versions before the key
# existed did: left out of fingerprints there, so a workdir made before the key existed still
# matches (`checkpoint.check_fingerprint(before=NEUTRAL)` names this value when it differs).
# A key added to a phase's settings belongs here with its neutral value, so that older workdirs
# stay resumable without --continue_older.
NEUTRAL = {"search.seed_keeps": "", "train.init_from": None, "train.init_method": "unpruned"}
# The winner's selection after a search (`selection.select_winner`) changes the fine-tune, not
# the search.
SELECTION_PREFIX = "search.select_"
# What the hand-set methods read from `search`: the keep-ratio space and, for sensitivity, the
# candidate scoring (calibration and validation examples).
HANDSET_SEARCH_KEYS = ("search.lower", "search.step", "search.calib_batches",
                       "search.calib_batch_size", "search.val_examples")


def phase_settings(config, phase: str) -> dict:
    """{dotted key: value} of every config key that can change the result of `phase`.

    Phases: 'dense' (seed, data, model, train); 'search_<method>' (+ prune, search: the dense
    recipe, the budget and the search); 'finetune_<method>[_…]' (+ prune, finetune, and search
    for searched methods, the keep space and scoring for hand-set ones). Keys in `NOT_RESULT`
    never count.
    """
    flat = flatten(config)
    kind, _, rest = phase.partition("_")
    method = rest.split("_")[0]
    sections = {"seed", "data", "model", "train"}
    extra = ()
    if kind == "search":
        sections |= {"prune", "search"}
    elif kind == "finetune":
        sections |= {"prune", "finetune"}
        if method in PRUNE_METHODS:
            extra = HANDSET_SEARCH_KEYS
        else:
            sections.add("search")
    elif kind != "dense":
        sections |= {"prune", "finetune", "search"}  # an unknown phase: everything counts
    out = {k: v for k, v in flat.items() if k.split(".")[0] in sections and k not in NOT_RESULT
           and not (kind == "search" and k.startswith(SELECTION_PREFIX))
           and not (k in NEUTRAL and v == NEUTRAL[k])}
    out.update({k: flat[k] for k in extra if k in flat})
    return out


def is_setting(name: str) -> bool:
    """Whether a fingerprint field is a config key (as `phase_settings` names them)."""
    return name == "seed" or "." in name
