"""Every config in configs/ loads (with its variants), passes validation, and bad values fail."""
import copy
import importlib.util
import os

import pytest

from jaxprune import config_checks
from jaxprune import errors

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
VARIANTS = {"cifar10.py": [None, "gpu", "gpu_resnet56", "gpu_vgg16", "lenet", "cpu", "smoke"], "mnist.py": [None, "smoke"],
            "quickstart.py": [None, "smoke"], "sst2.py": [None, "gpu", "cpu", "smoke"]}
KEYS = {  # the contract's config tree (plus the optional data.cache)
    "seed": None,
    "data": {"name", "data_dir", "val_size", "train_size", "test_size", "augment", "cache"},
    "model": {"name"},
    "train": {"epochs", "batch_size", "eval_batch_size", "optimizer", "learning_rate", "momentum",
              "weight_decay", "schedule", "l1", "l1_target", "checkpoint_every"},
    "prune": {"methods", "granularity", "scope", "target", "sparsity", "criterion", "schedule",
              "sensitivity_batches"},
    "finetune": {"epochs", "learning_rate"},
    "search": {"methods", "rounds", "candidates", "calib_batches", "calib_batch_size",
               "val_examples", "lower", "step"},
}


def load_config_module(filename):
    spec = importlib.util.spec_from_file_location(filename[:-3], os.path.join(CONFIG_DIR, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get(filename, arg=None):
    return load_config_module(filename).get_config(arg)


ALL = [(f, a) for f, args in VARIANTS.items() for a in args]


def test_every_config_file_is_listed():
    assert sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py")) == sorted(VARIANTS)


@pytest.mark.parametrize("filename,arg", ALL)
def test_config_loads_with_contract_keys_and_validates(filename, arg):
    config = get(filename, arg)
    assert set(config.keys()) == set(KEYS)
    for section, keys in KEYS.items():
        if keys is not None:  # the contract keys are there; others are known (checked below)
            assert keys <= set(config[section].keys()), section
    assert set(config_checks.flatten(config)) <= config_checks.known_keys()
    config_checks.validate_config(config)
    doc = load_config_module(filename).__doc__
    for word in ("Command", "python -m jaxprune.main", "Hardware", "Wall time", "Expected"):
        assert word in doc, (filename, word)


@pytest.mark.parametrize("filename", sorted(VARIANTS))
def test_smoke_variant_is_tiny(filename):
    config = get(filename, "smoke")
    assert config.train.epochs == 1 and config.finetune.epochs <= 1
    assert config.data.train_size <= 64 and config.data.test_size <= 64
    assert config.search.rounds == 1 and config.search.candidates <= 8
    assert config.search.val_examples <= config.data.val_size


def test_unknown_variant_fails():
    with pytest.raises(ValueError, match="unknown variant 'tpu'"):
        get("quickstart.py", "tpu")


def test_overrides_from_the_command_line():
    """None-valued keys are typed placeholders, so `--config.data.train_size=100` works with a
    locked config, and a typo fails (absl's parser as main.py uses it, on fresh flag values)."""
    from absl import flags
    from ml_collections import config_flags

    def parse(*argv):
        values = flags.FlagValues()
        holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                                 lock_config=True, sys_argv=["prog", *argv])
        values(["prog", *argv])
        return holder.value

    path = os.path.join(CONFIG_DIR, "quickstart.py")
    c = parse(f"--config={path}:smoke", "--config.data.train_size=100",
              "--config.data.data_dir=some/dir", "--config.data.cache=d.npz",
              "--config.search.methods=", "--config.search.step=0.05")
    assert (c.data.train_size, c.data.data_dir, c.data.cache, c.search.methods, c.search.step) == \
        (100, "some/dir", "d.npz", "", 0.05)
    with pytest.raises(AttributeError, match="epoch"):
        parse(f"--config={path}", "--config.train.epoch=3")


BAD_VALUES = [
    ("prune.sparsity", 1.0, "1.0 or above"),
    ("prune.sparsity", 1.5, "in [0, 1)"),
    ("prune.sparsity", -0.1, "in [0, 1)"),
    ("prune.granularity", "filter", "'channel', 'unstructured', 'nm'"),
    ("prune.methods", "threshold,magic",
     "unknown method(s) ['magic']; allowed: threshold, sensitivity"),
    ("prune.methods", "threshold,threshold", "twice"),
    ("search.methods", "reinforce,ppo", "allowed: reinforce, gan, evolution, random, uniform"),
    ("search.candidates", 0, "int >= 1"),
    ("search.rounds", 2.0, "int >= 1"),
    ("search.lower", 0.0, "(0, 1]"),
    ("search.step", 1.0, "[0, 1)"),
    ("train.epochs", True, "int >= 1"),
    ("train.batch_size", -8, "int >= 1"),
    ("train.learning_rate", 0.0, "> 0"),
    ("train.momentum", 1.0, "[0, 1)"),
    ("train.optimizer", "rmsprop", "'sgd', 'adam'"),
    ("data.name", "imagenet", "'cifar10', 'mnist', 'fashion_mnist', 'digits'"),
    ("data.train_size", 0, "None (all) or an int >= 1"),
    ("data.augment", "yes", "True or False"),
    ("model.name", "resnet99", "'resnet20'"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES)
def test_bad_value_names_key_and_allowed_values(key, value, expected):
    config = get("quickstart.py", "smoke")
    section, name = key.split(".")
    with config.unlocked(), config.ignore_type():
        config[section][name] = value
    with pytest.raises(ValueError) as info:
        config_checks.validate_config(config)
    message = str(info.value)
    assert f"{key}={value!r}" in message and expected in message, message


def _numeric_keys():
    flat = config_checks.flatten(get("quickstart.py"))
    return sorted(k for k, v in flat.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool))


@pytest.mark.parametrize("key", _numeric_keys())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_for_every_numeric_key(key, value):
    config = get("quickstart.py", "smoke")
    node = config
    *parents, name = key.split(".")
    for p in parents:
        node = node[p]
    with config.unlocked(), config.ignore_type():
        node[name] = value
    with pytest.raises(errors.ConfigError) as info:
        config_checks.validate_config(config)
    assert f"{key}={value!r}" in str(info.value)


def test_unknown_key_in_the_api_is_refused_with_the_nearest_key():
    config = get("quickstart.py", "smoke")
    config.prune.sparsty = 0.5  # load_config's configs are unlocked: a typo adds a key
    config.trian = {"epochs": 3}
    with pytest.raises(errors.ConfigError) as info:
        config_checks.validate_config(config)
    message = str(info.value)
    assert "prune.sparsty is not a known config key (did you mean prune.sparsity?)" in message
    assert "trian.epochs" in message and "train.epochs" in message


def test_unknown_key_inside_a_config_file_is_refused(tmp_path):
    from jaxprune import pipeline
    source = open(os.path.join(CONFIG_DIR, "quickstart.py")).read()
    path = tmp_path / "mine.py"
    path.write_text(source.replace("config.prune.sparsity = 0.8", "config.prune.sparsty = 0.5"))
    config = pipeline.load_config(str(path), "smoke")
    with pytest.raises(errors.ConfigError, match="did you mean prune.sparsity"):
        config_checks.validate_config(config)


def test_known_keys_come_from_the_config_files():
    """New keys in configs/ are known without being listed anywhere else."""
    flat = config_checks.flatten(get("quickstart.py"))
    assert set(flat) <= config_checks.known_keys()
    assert "prune.channel_multiple" in config_checks.known_keys()


def test_phase_settings_cover_what_changes_a_result():
    config = get("quickstart.py")
    dense = config_checks.phase_settings(config, "dense")
    assert {"seed", "train.momentum", "train.l1_target", "data.augment", "model.name"} <= set(dense)
    assert not any(k.split(".")[0] in ("prune", "search", "finetune") for k in dense)
    for quiet in ("train.eval_batch_size", "train.checkpoint_every", "data.cache"):
        assert quiet not in dense
    search = config_checks.phase_settings(config, "search_evolution")
    assert {"search.step", "search.calib_batches", "search.rounds", "prune.channel_multiple",
            "train.momentum"} <= set(search)
    assert "finetune.epochs" not in search and "search.methods" not in search
    handset = config_checks.phase_settings(config, "finetune_threshold_imp2")
    assert {"prune.channel_multiple", "search.lower", "search.step", "finetune.epochs"} <= set(handset)
    assert "search.rounds" not in handset and "prune.methods" not in handset
    searched = config_checks.phase_settings(config, "finetune_random")
    assert {"search.rounds", "finetune.learning_rate"} <= set(searched)


def test_all_problems_reported_at_once_and_relations():
    config = get("quickstart.py").to_dict()  # plain dicts are accepted too
    bad = copy.deepcopy(config)
    bad["prune"]["sparsity"] = 1.0
    bad["search"]["candidates"] = 0
    del bad["finetune"]["epochs"]
    found = config_checks.problems(bad)
    assert len(found) == 3 and "finetune.epochs is missing" in found
    rel = copy.deepcopy(config)
    rel["data"]["train_size"], rel["train"]["batch_size"] = 32, 64
    rel["data"]["val_size"] = 0
    message = "\n".join(config_checks.problems(rel))
    assert "train.batch_size=64 is larger than data.train_size=32" in message
    assert "data.val_size=0" in message and "sensitivity" in message


def test_allowed_names_are_read_from_the_registries():
    import subprocess
    import sys
    code = ("import sys; from jaxprune import config_checks as c; "
            "assert 'flax' not in sys.modules and 'tensorflow' not in sys.modules; "
            "names = list(c.MODELS); assert 'flax' in sys.modules; print(names)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # light to import; the registry read on use
    from jaxprune import data
    assert config_checks.DATASETS == data.DATASETS
    models = pytest.importorskip("jaxprune.models")
    assert list(config_checks.MODELS) == list(models.MODELS)
    controllers = pytest.importorskip("jaxprune.search.controllers")
    assert set(config_checks.SEARCH_METHODS) == set(controllers.CONTROLLERS)
    criteria = pytest.importorskip("jaxprune.criteria")
    assert set(config_checks.CRITERIA) == set(criteria.CRITERIA)
    pipeline = pytest.importorskip("jaxprune.pipeline")
    assert set(config_checks.PRUNE_METHODS) == set(pipeline.HANDSET_METHODS)
