"""The library API outside the driver: the README's "Use on your own model" block runs as
written; `Pruner` on discovered groups agrees with the zoo's declarations; every criterion
behind one signature; N:M refused with the leaves named."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import criteria, masks, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Use on your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_prunes_searches_finetunes_compacts_and_restores(tmp_path):
    code = readme_example()
    api_lines = [l for l in code.splitlines() if "jp." in l or "pruner." in l]
    assert len(api_lines) <= 15, api_lines
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    match = re.search(r"(\d+)% of the MACs, test accuracy ([\d.]+)%", r.stdout)
    assert match, r.stdout
    assert int(match.group(1)) <= 50 and float(match.group(2)) > 90.0, r.stdout
    assert os.path.exists(tmp_path / "pruned_cnn" / "program.bin")


def _lenet():
    model = models.get_model("lenet5", num_classes=10, input_shape=(16, 16, 1),
                             key=jax.random.key(0))
    hookless = lambda p, b, x, *, train: model.apply(p, b, x, train=train)  # noqa: E731
    return model, hookless


def test_zoo_named_pruner_equals_the_discovered_one():
    """`discovery=models.discovery(model)` only renames (and orders) the discovered groups."""
    model, _ = _lenet()
    kw = dict(input_shape=(16, 16, 1), sparsity=0.5, lower=0.2)
    named = jp.Pruner(model.apply, model.params, model.batch_stats,
                      discovery=models.discovery(model), **kw)
    found = jp.Pruner(model.apply, model.params, model.batch_stats, **kw)
    assert named.units == [name for name, _ in model.spec.widths]
    assert found.units == ["params/" + u for u in named.units]  # discovery's own names
    assert found.cost.dense_macs == named.cost.dense_macs
    rng = np.random.default_rng(0)
    keeps = rng.uniform(0.2, 1.0, (4, len(named.units))).astype(np.float32)
    for keep in keeps:
        assert float(found.cost.macs(keep)) == pytest.approx(float(named.cost.macs(keep)),
                                                             rel=1e-6)
    x = jax.random.uniform(jax.random.key(1), (64, 16, 16, 1))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 10)
    a = named.evaluator(x[:32], x, y, metric="loss")(keeps)
    b = found.evaluator(x[:32], x, y, metric="loss")(keeps)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(found.threshold_keep(), named.threshold_keep())
    small_a, vars_a = named.compact(keeps[0])
    small_b, vars_b = found.compact(keeps[0])
    np.testing.assert_allclose(small_a(vars_a, x[:4]), small_b(vars_b, x[:4]), atol=1e-6)
    other = models.get_model("mlp", num_classes=10, input_shape=(16, 16, 1),
                             key=jax.random.key(0))
    with pytest.raises(ValueError, match="not groups of this model"):
        jp.Pruner(model.apply, model.params, model.batch_stats,
                  discovery=models.discovery(other), **kw)


def test_compact_of_a_discovered_pruner_equals_the_masked_model():
    _, hookless = _lenet()
    model, _ = _lenet()
    pruner = jp.Pruner(hookless, model.params, model.batch_stats, input_shape=(16, 16, 1),
                       sparsity=0.6)
    keep = pruner.threshold_keep()
    small_apply, small_vars = pruner.compact(keep)
    x = jax.random.uniform(jax.random.key(3), (4, 16, 16, 1))
    masks_, _ = pruner.masks(keep)
    want, _ = hookless(masks.apply(model.params, masks_), model.batch_stats, x, train=False)
    np.testing.assert_allclose(small_apply(small_vars, x), want, rtol=1e-4, atol=1e-5)
    assert sum(v.size for v in jax.tree.leaves(small_vars)) < sum(
        v.size for v in jax.tree.leaves((model.params, model.batch_stats)))


def test_linen_model_through_the_pruner():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
            x = nn.relu(nn.Conv(16, (3, 3))(x)).mean(axis=(1, 2))
            return nn.Dense(10)(x)

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    pruner = jp.Pruner(jp.linen_apply(net), variables["params"], variables["batch_stats"],
                       input_shape=(8, 8, 1), sparsity=0.5, channel_multiple=4)
    assert len(pruner.units) == 2
    keep = pruner.threshold_keep()
    assert float(pruner.cost.macs(keep)) <= pruner.budget
    kept = {k: int(v.sum()) for k, v in pruner.channel_keep(keep).items()}
    assert all(v % 4 == 0 for v in kept.values()), kept


def test_every_criterion_behind_one_signature():
    model, _ = _lenet()
    x = jax.random.uniform(jax.random.key(1), (8, 16, 16, 1))
    y = jnp.arange(8) % 10

    def loss_fn(p, batch):
        logits, _ = model.apply(p, model.batch_stats, batch[0], train=False)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(8), batch[1]])

    for name in set(criteria.CRITERIA) - set(criteria.CHANNEL_CRITERIA):
        out = criteria.score(name, model.params, groups=models.channel_groups(model),
                             loss_fn=loss_fn,
                             batches=[(x, y)], key=jax.random.key(0))
        assert jax.tree.structure(out.weights) == jax.tree.structure(model.params), name
        assert out.channels is None
    with pytest.raises(ValueError, match="no BatchNorm"):  # LeNet-5 has none
        criteria.score("bn_scale", model.params, groups=models.channel_groups(model))
    resnet = models.get_model("resnet20", num_classes=10, input_shape=(8, 8, 3), key=jax.random.key(0))
    groups = models.channel_groups(resnet)
    out = criteria.score("bn_scale", resnet.params, groups=groups)
    assert out.weights is None and set(out.channels) == {g.name for g in groups}
    lenet_groups = models.channel_groups(model)
    out = criteria.score("mask_gradient", model.params, groups=lenet_groups, batches=[(x, y)] * 2,
                         mask_loss_fn=lambda m, batch: -2.0 * sum(jnp.sum(v) for v in m.values()))
    assert out.weights is None and {k: np.asarray(v).tolist() for k, v in out.channels.items()} \
        == {g.name: [2.0] * g.size for g in lenet_groups}
    with pytest.raises(ValueError, match="gradient-based"):
        criteria.score("taylor", model.params)
    with pytest.raises(ValueError, match="unknown criterion"):
        criteria.score("l3", model.params)


def test_nm_that_does_not_fit_names_every_leaf_and_the_m_that_would():
    params = {"a": {"kernel": jnp.ones((3, 3, 6, 8))}, "b": {"kernel": jnp.ones((12, 4))}}
    with pytest.raises(ValueError, match=r"'a/kernel' \(6\).*e\.g\. 2"):
        masks.check_nm(params, 2, 4)
    masks.check_nm(params, 1, 2)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        masks.check_nm(params, 4, 2)
