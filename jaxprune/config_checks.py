"""Checks a config tree before anything runs: every problem in one ConfigError (a ValueError).

    validate_config(config)   # raises ConfigError listing each bad key, its value, what is allowed

Strict: a key that no config in configs/ defines (and `SCHEMA` / `OPTIONAL` do not know) is an
error with the nearest known key suggested, and NaN / infinity is refused for every number.
`phase_settings(config, phase)` is the part of the config that determines a phase's result (its
checkpoint fingerprint). The configs in configs/ start from `common_config()` (the sections and
the defaults they all share) and shrink their 'smoke' variants with `smoke_sizes(config)`.
`load_config('cifar10:smoke')` loads a config file by name or path (notebooks; the CLI uses
config_flags).

The check of each key is declared by the module that reads it (`CONFIG_CHECKS`: keys every
config has; `OPTIONAL_CONFIG_CHECKS`: keys a config may leave out; built from `checks`), and the
allowed names are those modules' registries (`models.MODELS`, `data.DATASETS`,
`train.OPTIMIZERS`, `pruner.GRANULARITIES`, `search.controllers.CONTROLLERS`, …). `SCHEMA` and
`OPTIONAL` gather the modules of `OWNERS` when a check first needs them, so importing this
module stays light (no JAX: the CLI uses it to name a mistyped key) and no key or list of names
is copied here.
"""
from __future__ import annotations

import collections.abc
import difflib
import functools
import importlib
import math
import os
import re
from typing import Optional

from jaxprune.checks import Check, methods  # methods: the drivers call config_checks.methods
from jaxprune.errors import ConfigError, NotFoundError, UserError, short


class _Registry(collections.abc.Sequence):
    """The names of the registry `module.attr` (a dict or tuple), read on first use."""

    def __init__(self, module: str, attr: str):
        self._where = (module, attr)

    @functools.cached_property
    def _names(self) -> tuple:
        return tuple(getattr(importlib.import_module(self._where[0]), self._where[1]))

    def __getitem__(self, i):
        return self._names[i]

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other) -> bool:
        return isinstance(other, collections.abc.Sequence) and tuple(self) == tuple(other)

    __hash__ = None


MODELS = _Registry("jaxprune.models", "MODELS")
DATASETS = _Registry("jaxprune.data", "DATASETS")
PRUNE_METHODS = _Registry("jaxprune.methods", "HANDSET_METHODS")
SEARCH_METHODS = _Registry("jaxprune.search.controllers", "CONTROLLERS")
CRITERIA = _Registry("jaxprune.criteria", "CRITERIA")
CHANNEL_CRITERIA = _Registry("jaxprune.criteria", "CHANNEL_CRITERIA")

# The modules that declare the checks of their config keys, in the order problems are listed.
# A key with no single reader is declared where its value's meaning lives (e.g. search.rounds in
# pruner: `Pruner.search`'s argument, which methods.search_rounds also reads); the modules' own
# comments say which code reads each.
OWNERS = ("jaxprune.experiment", "jaxprune.data", "jaxprune.models", "jaxprune.train",
          "jaxprune.modelio", "jaxprune.pruner", "jaxprune.schedules", "jaxprune.methods",
          "jaxprune.search.controllers", "jaxprune.selection")


class _Lazy(collections.abc.Mapping):
    """A read-only dict made by `build()` on first use."""

    def __init__(self, build: collections.abc.Callable[[], dict]):
        self._build = build

    @functools.cached_property
    def _dict(self) -> dict:
        return self._build()

    def __getitem__(self, key):
        return self._dict[key]

    def __iter__(self):
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)


@functools.lru_cache(maxsize=1)
def _declared() -> tuple[dict, dict]:
    """({key: Check} every config has, {key: Check} a config may leave out): the `CONFIG_CHECKS`
    and `OPTIONAL_CONFIG_CHECKS` of the modules in `OWNERS`. A key declared twice is a
    programming error, named at once."""
    found, where = ({}, {}), {}
    for name in OWNERS:
        module = importlib.import_module(name)
        for out, attr in zip(found, ("CONFIG_CHECKS", "OPTIONAL_CONFIG_CHECKS")):
            for key, check in getattr(module, attr, {}).items():
                if key in where:
                    raise RuntimeError(f"config key {key} has checks in both {where[key]} and "
                                       f"{name}; declare it only in the module that reads it")
                out[key], where[key] = check, name
    return found


# {key: Check}: the keys every config has, and those a config may leave out.
SCHEMA: collections.abc.Mapping[str, Check] = _Lazy(lambda: _declared()[0])
OPTIONAL: collections.abc.Mapping[str, Check] = _Lazy(lambda: _declared()[1])
# {key: its allowed names} of every key whose check is a `checks.choice`.
CHOICES: collections.abc.Mapping[str, tuple] = _Lazy(lambda: {
    key: check.allowed for key, check in {**SCHEMA, **OPTIONAL}.items()
    if hasattr(check, "allowed")})


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
