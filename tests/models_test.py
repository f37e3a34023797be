"""Tests for the model zoo: shapes, jit, BatchNorm updates, channel masks, compaction, costs.

The zoo holds no pruning code: channel groups come from discovery (`models.channel_groups`),
activation masks from `discover.hookless_apply`, and a compact model is the module rebuilt at
the kept widths around the variables `surgery.slice_variables` cut."""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import discover, models, structure, surgery

NUM_CLASSES = 10
BATCH = 2


def _small_widths(name):
    """≤16-channel widths for the big models (distinct per stage to catch wiring mix-ups)."""
    if name == "vgg16":
        defaults = models.MODELS[name].default_widths(None)
        return {g: max(3, c // 32) for g, c in defaults.items()}
    if name in ("resnet56", "resnet18"):
        defaults = models.MODELS[name].default_widths(None)
        return {g: max(3, c // (4 if name == "resnet56" else 32)) for g, c in defaults.items()}
    return None


# (name, input_shape, widths): every zoo model, big ones at small inputs / widths.
CASES = [
    ("lenet5", (8, 8, 1), None),
    ("lenet5", (28, 28, 1), None),
    ("lenet5", (32, 32, 3), None),
    ("mlp", (8, 8, 1), None),
    ("vgg16", (8, 8, 3), _small_widths("vgg16")),
    ("resnet20", (8, 8, 3), None),
    ("resnet56", (8, 8, 3), _small_widths("resnet56")),
    ("resnet18", (16, 16, 3), _small_widths("resnet18")),
]
IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s, _ in CASES]


def _flat(tree):
    return {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _perturb(key, model):
    """Non-trivial BN scale/bias, biases and running stats so that masking matters."""
    def leaf(key, path, a):
        if path[-1] in ("scale", "var"):
            return jax.random.uniform(key, a.shape, a.dtype, 0.5, 1.5)
        if path[-1] in ("bias", "mean"):
            return 0.2 * jax.random.normal(key, a.shape, a.dtype)
        return a

    def tree(key, t):
        flat = _flat(t)
        keys = jax.random.split(key, max(len(flat), 1))
        new = {p: leaf(k, p, a) for k, (p, a) in zip(keys, flat.items())}
        return structure._unflatten(new)

    pkey, skey = jax.random.split(key)
    return tree(pkey, model.params), tree(skey, model.batch_stats)


def _random_keep(key, groups):
    keys = jax.random.split(key, len(groups))
    keep = {}
    for k, g in zip(keys, groups):
        v = np.array(jax.random.bernoulli(k, 0.5, (g.size,)))
        v[np.random.default_rng(g.size).integers(g.size)] = True  # at least one
        keep[g.name] = v
    return keep


def _param_masks(keep, groups, params):
    """Local stand-in for masks.channel_masks: bool masks on producers' out / consumers' in."""
    masks = {p: np.ones(a.shape, bool) for p, a in _flat(params).items()}
    for g in groups:
        k = np.asarray(keep[g.name])
        for path in g.producers:
            masks[path] = masks[path] & k
        for path, spatial in g.consumers:
            masks[path] = masks[path] & np.tile(k, spatial)[:, None]
    return structure._unflatten(masks)


def _assert_close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, float(np.abs(a).max()))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


def _input(key, shape):
    return jax.random.normal(key, (BATCH,) + tuple(shape), jnp.float32)


def _masked_apply(model):
    """`model.apply` with activation masks {group name: float[size]} under the zoo's names."""
    hookless = discover.hookless_apply(model.apply)
    apply_fn = lambda v, x: model.apply(v["params"], v["batch_stats"], x, train=False)[0]  # noqa: E731
    found = discover.discover_groups(apply_fn, {"params": model.params,
                                                "batch_stats": model.batch_stats},
                                     jax.ShapeDtypeStruct((1,) + model.spec.input_shape,
                                                          jnp.float32))
    raw = {frozenset(g.members): g.name for g in found.groups}
    names = {g.name: raw[frozenset(g.members)] for g in models.discovery(model).groups}

    def masked(params, batch_stats, x, *, train, channel_masks):
        return hookless(params, batch_stats, x, train=train,
                        channel_masks={names[n]: m for n, m in channel_masks.items()})

    return masked


@functools.lru_cache(maxsize=None)
def _zoo(case):
    """(model, full_fn) for CASES[case], built once per test session.

    `full_fn(params, batch_stats, x, cm)` returns the eval logits without masks, and the eval
    and train outputs with (hookless) channel masks `cm`; one compile serves every check below.
    """
    name, input_shape, widths = CASES[case]
    model = models.get_model(name, num_classes=NUM_CLASSES, input_shape=input_shape,
                             key=jax.random.fold_in(jax.random.key(0), case), widths=widths)

    masked = _masked_apply(model)

    @jax.jit
    def full_fn(params, batch_stats, x, cm):
        plain, same_stats = model.apply(params, batch_stats, x, train=False)
        eval_logits, _ = masked(params, batch_stats, x, train=False, channel_masks=cm)
        train_logits, new_stats = masked(params, batch_stats, x, train=True, channel_masks=cm)
        return plain, same_stats, eval_logits, train_logits, new_stats

    return model, full_fn


CASE_IDX = list(range(len(CASES)))
# The default tier covers each family with its cheapest member: resnet56 is resnet20's code at
# three times the depth (the costliest case here to compile), resnet18 the same basic blocks at
# ImageNet's stem, and vgg16 the plain conv + BatchNorm + pooling stack whose parts resnet20 (BN)
# and lenet5 (pooling, dense head) have; the slow tier runs them.
SLOW_CASES = {"resnet56", "resnet18", "vgg16"}
CASE_PARAMS = [pytest.param(i, id=IDS[i], marks=[pytest.mark.slow] if CASES[i][0] in SLOW_CASES
                            else []) for i in CASE_IDX]
LENET5, RESNET20 = 0, 5
assert CASES[LENET5][0] == "lenet5" and CASES[RESNET20][0] == "resnet20"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_apply_jit_train_and_all_ones_masks(case):
    name, input_shape, _ = CASES[case]
    model, full_fn = _zoo(case)
    groups = models.channel_groups(model)
    structure.validate_groups(groups, model.params, model.batch_stats)
    assert hash(model.spec) == hash(models.ModelSpec(*model.spec))
    assert dict(model.spec.widths) == {g.name: g.size for g in groups}
    x = _input(jax.random.key(10 + case), input_shape)
    ones = {g.name: jnp.ones(g.size, jnp.float32) for g in groups}
    plain, same_stats, masked, train_logits, new_stats = full_fn(
        model.params, model.batch_stats, x, ones)
    assert plain.shape == train_logits.shape == (BATCH, NUM_CLASSES)
    assert np.all(np.isfinite(plain)) and np.all(np.isfinite(train_logits))
    np.testing.assert_array_equal(plain, masked)  # all-ones channel masks == no masks
    jax.tree.map(np.testing.assert_array_equal, same_stats, model.batch_stats)
    assert jax.tree.structure(new_stats) == jax.tree.structure(model.batch_stats)
    has_bn = bool(jax.tree.leaves(model.batch_stats))
    assert has_bn == (name not in ("lenet5", "mlp"))
    if has_bn:  # every running mean moved (zero-init means, batch means are nonzero)
        for path, mean in _flat(new_stats).items():
            if path[-1] == "mean":
                assert np.any(np.asarray(mean) != 0), path


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_compact_equals_masked(case):
    name, input_shape, _ = CASES[case]
    model, full_fn = _zoo(case)
    perturb_key, keep_key, x_key = jax.random.split(jax.random.key(20 + case), 3)
    params, batch_stats = _perturb(perturb_key, model)
    model = model._replace(params=params, batch_stats=batch_stats)
    groups = models.channel_groups(model)
    keep = _random_keep(keep_key, groups)
    masks = _param_masks(keep, groups, params)
    masked_params = jax.tree.map(lambda p, m: p * m, params, masks)
    x = _input(x_key, input_shape)
    ones = {g.name: jnp.ones(g.size, jnp.float32) for g in groups}
    keep_f = {n: jnp.asarray(v, jnp.float32) for n, v in keep.items()}
    _, _, w_eval, w_train, w_stats = full_fn(masked_params, batch_stats, x, ones)  # zeroed
    _, _, a_eval, a_train, _ = full_fn(params, batch_stats, x, keep_f)  # activation masks

    sliced = surgery.slice_variables({"params": params, "batch_stats": batch_stats},
                                     models.discovery(model), keep)
    small = models.with_widths(model, {n: int(v.sum()) for n, v in keep.items()},
                               sliced["params"], sliced["batch_stats"])
    assert dict(small.spec.widths) == {n: int(v.sum()) for n, v in keep.items()}
    assert [g.size for g in models.channel_groups(small)] == [int(keep[g.name].sum())
                                                              for g in groups]

    @jax.jit
    def compact_fn(params, batch_stats):
        eval_logits, _ = small.apply(params, batch_stats, x, train=False)
        train_logits, new_stats = small.apply(params, batch_stats, x, train=True)
        return eval_logits, train_logits, new_stats

    c_eval, c_train, c_stats = compact_fn(small.params, small.batch_stats)
    _assert_close(w_eval, c_eval)
    _assert_close(a_eval, c_eval)
    _assert_close(w_train, c_train)
    _assert_close(a_train, c_train)
    # Updated running stats of the kept channels agree too.
    sliced_stats = surgery.slice_variables({"params": masked_params, "batch_stats": w_stats},
                                           models.discovery(model), keep)["batch_stats"]
    jax.tree.map(_assert_close, sliced_stats, c_stats)
    # Compact param count == kept entries of the channel param masks.
    n_compact = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(small.params))
    n_kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
    assert n_compact == n_kept
    # get_model with the compact widths builds the same architecture.
    rebuilt = jax.eval_shape(lambda k: models.get_model(
        name, num_classes=NUM_CLASSES, input_shape=input_shape, key=k,
        widths=dict(small.spec.widths)).params, jax.random.key(2))
    assert jax.tree.map(jnp.shape, rebuilt) == jax.tree.map(jnp.shape, small.params)


@pytest.mark.parametrize("case", [LENET5, RESNET20], ids=[IDS[LENET5], IDS[RESNET20]])
def test_vmap_over_channel_masks(case):
    """K candidates' channel masks vmapped over one shared copy of the weights."""
    _, input_shape, _ = CASES[case]
    model, _ = _zoo(case)
    groups = models.channel_groups(model)
    masked = _masked_apply(model)
    keep_key, x_key = jax.random.split(jax.random.key(30 + case))
    keeps = [_random_keep(k, groups) for k in jax.random.split(keep_key, 3)]
    stacked = {g.name: jnp.stack([jnp.asarray(k[g.name], jnp.float32) for k in keeps])
               for g in groups}
    x = _input(x_key, input_shape)

    def one(cm):
        return masked(model.params, model.batch_stats, x, train=True, channel_masks=cm)

    batched_logits, batched_stats = jax.jit(jax.vmap(one))(stacked)
    for i in range(len(keeps)):
        logits, stats = one(jax.tree.map(lambda a: a[i], stacked))  # noqa: B023
        _assert_close(batched_logits[i], logits)
        jax.tree.map(lambda b, s: _assert_close(b[i], s), batched_stats, stats)  # noqa: B023


def test_bn_running_stats_use_momentum_0_9():
    model, full_fn = _zoo(RESNET20)
    x = _input(jax.random.key(40), CASES[RESNET20][1])
    ones = {g.name: jnp.ones(g.size, jnp.float32) for g in models.channel_groups(model)}
    new_stats = full_fn(model.params, model.batch_stats, x, ones)[-1]
    y = jax.lax.conv_general_dilated(x, model.params["conv1"]["kernel"], (1, 1),
                                     ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _assert_close(new_stats["bn1"]["mean"], 0.1 * y.mean(axis=(0, 1, 2)))
    _assert_close(new_stats["bn1"]["var"], 0.9 + 0.1 * y.var(axis=(0, 1, 2)))


def _count_macs(jaxpr):
    """Local stand-in for costs.count_macs: conv and dot MACs of a jaxpr (recursive)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
            total += int(np.prod(out)) * int(np.prod(kernel[:-1]))
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += int(np.prod(eqn.outvars[0].aval.shape)) * int(
                np.prod([lhs[d] for d in contract]))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_macs(sub)
    return total


@pytest.mark.parametrize("name, params_m, macs_m", [
    ("resnet20", 0.27, 41), ("resnet56", 0.86, 126), ("vgg16", 14.7, 313),
    ("resnet18", 11.2, 555), ("lenet5", 0.062, 0.65),
])
def test_param_and_mac_counts_at_cifar_size(name, params_m, macs_m):
    """Abstract (never materialised) full-size models: counts, shapes and group validity."""
    shape = (32, 32, 3)

    def build(key):
        m = models.get_model(name, num_classes=10, input_shape=shape, key=key)
        return m.params, m.batch_stats

    params, batch_stats = jax.eval_shape(build, jax.random.key(5))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert abs(n / 1e6 - params_m) / params_m < 0.02, n
    model = models.model_from_spec(
        models.ModelSpec(name, 10, shape, tuple(
            models.MODELS[name].default_widths(shape).items())), params, batch_stats)
    structure.validate_groups(models.channel_groups(model), params, batch_stats)
    x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, s, x: model.apply(p, s, x, train=False))(
        params, batch_stats, x)
    macs = _count_macs(jaxpr.jaxpr)
    assert abs(macs / 1e6 - macs_m) / macs_m < 0.02, macs
    out, _ = jax.eval_shape(lambda p, s, x: model.apply(p, s, x, train=True),
                            params, batch_stats, jax.ShapeDtypeStruct((4,) + shape, jnp.float32))
    assert out.shape == (4, 10)


def test_unprunable_paths_exist():
    for name, shape, widths in CASES:
        params = jax.eval_shape(lambda k: models.get_model(  # noqa: B023
            name, num_classes=3, input_shape=shape, key=k, widths=widths).params,
            jax.random.key(6))
        model_flat = _flat(params)
        unprunable = models.MODELS[name].UNPRUNABLE
        assert all(p in model_flat for p in unprunable), (name, unprunable)


def test_errors():
    key = jax.random.key(7)
    with pytest.raises(ValueError, match="resnet20"):
        models.get_model("resnet21", num_classes=10, input_shape=(8, 8, 3), key=key)
    with pytest.raises(ValueError, match="bogus"):
        models.get_model("lenet5", num_classes=10, input_shape=(8, 8, 1), key=key,
                         widths={"bogus": 3})
    with pytest.raises(ValueError, match="conv2"):
        models.get_model("lenet5", num_classes=10, input_shape=(8, 8, 1), key=key,
                         widths={"conv2": 0})
    with pytest.raises(ValueError, match="fc1"):
        models.get_model("mlp", num_classes=10, input_shape=(8, 8, 1), key=key,
                         widths={"fc1": 2.5})
    model = models.get_model("mlp", num_classes=10, input_shape=(8, 8, 1), key=key,
                             widths={"fc1": 4, "fc2": 3})
    with pytest.raises(ValueError, match="expected"):
        model.apply(model.params, model.batch_stats, jnp.zeros((2, 8, 8, 3)), train=False)
    with pytest.raises(ValueError, match="fc2"):
        surgery.slice_variables({"params": model.params, "batch_stats": {}},
                                models.discovery(model),
                                {"fc1": np.ones(4, bool), "fc2": np.zeros(3, bool)})
