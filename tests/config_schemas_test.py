"""Config checks are declared by the modules that read the keys and gathered by config_checks."""
import subprocess
import sys

import pytest

from jaxprune import config_checks


def test_importing_config_checks_loads_no_jax():
    code = ("import sys; import jaxprune.config_checks; "
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_every_key_of_every_config_has_one_check():
    """The keys of configs/ are all checked, each declared once, required or optional."""
    declared = set(config_checks.SCHEMA) | set(config_checks.OPTIONAL)
    assert not set(config_checks.SCHEMA) & set(config_checks.OPTIONAL)
    assert config_checks._repository_keys() and config_checks._repository_keys() <= declared
    assert set(config_checks.flatten(config_checks.common_config())) <= declared


def test_a_key_declared_by_two_modules_is_named(monkeypatch):
    from jaxprune import selection
    monkeypatch.setattr(selection, "OPTIONAL_CONFIG_CHECKS",
                        {**selection.OPTIONAL_CONFIG_CHECKS, "train.epochs": lambda v: None})
    config_checks._declared.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="train.epochs has checks in both jaxprune.train "
                                               "and jaxprune.selection"):
            config_checks._declared()
    finally:
        config_checks._declared.cache_clear()


def test_each_controller_hyperparameter_has_a_check_its_default_passes():
    from jaxprune.search import controllers
    for name in controllers.CONTROLLERS:
        defaults = controllers.default_hparams(name)
        declared = controllers.HPARAM_CHECKS.get(name, {})
        assert set(declared) == set(defaults), name
        for argument, value in defaults.items():
            assert declared[argument](value) is None, (name, argument, value)
            assert f"search.{name}.{argument}" in config_checks.OPTIONAL


def test_choices_are_the_owning_registries():
    from jaxprune import data, pruner, schedules, train
    choices = config_checks.CHOICES
    assert choices["train.optimizer"] == train.OPTIMIZERS
    assert choices["train.precision"] == tuple(train.PRECISIONS)
    assert choices["prune.granularity"] == pruner.GRANULARITIES
    assert choices["prune.schedule"] == schedules.SCHEDULES
    assert choices["data.source"] == data.SOURCES
    # a value no name equals (here unhashable, against a dict registry) is refused, not raised
    assert config_checks.SCHEMA["train.precision"](["fp32"]) == "must be one of 'fp32', 'bf16'"
