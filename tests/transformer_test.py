"""The zoo's Transformer encoder classifier (jaxprune/models/transformer.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import models
from jaxprune import text
from compact_check import assert_compact_equals_masked  # tests/ is on sys.path under pytest

WIDTHS = {"vocab": 40, "embed": 16, "heads": 4, "ffn": 24, "layers": 2}


def _model(seq_len=12, num_classes=3, seed=0, **widths):
    return models.get_model("transformer", num_classes=num_classes, input_shape=(seq_len,),
                            key=jax.random.key(seed), widths={**WIDTHS, **widths})


def _tokens(rows, seq_len):
    out = np.full((len(rows), seq_len), text.PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def test_forward_shapes_and_registry():
    model = _model()
    assert models.input_kind("transformer") == "tokens" and models.input_kind("lenet5") == "image"
    x = _tokens([[2, 5, 6, 7], [2], [2] + list(range(3, 14))], 12)
    logits, stats = model.apply(model.params, model.batch_stats, x, train=False)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert stats == model.batch_stats
    params = model.params
    assert params["block1"]["attn"]["query"]["kernel"].shape == (16, 4, 4)  # (embed, heads, dim)
    assert params["block0"]["ffn1"]["kernel"].shape == (16, 24)
    assert params["embed"]["embedding"].shape == (40, 16)
    assert params["position"]["embedding"].shape == (12, 16)
    assert model.spec.widths == tuple(WIDTHS.items()) + (
        ("block0.heads", 4), ("block0.ffn", 24), ("block1.heads", 4), ("block1.ffn", 24))


def test_padding_does_not_change_the_logits():
    """A sentence's logits do not depend on the padding after it: the same params with a
    shorter position table (seq_len 6) give the same logits as at seq_len 12."""
    long, short = _model(seq_len=12), _model(seq_len=6)
    params = jax.tree.map(lambda a: a, long.params)
    short_params = dict(params, position={"embedding": params["position"]["embedding"][:6]})
    rows = [[2, 5, 6, 7], [2], [2, 9, 9, 9, 9, 3]]
    a, _ = long.apply(params, long.batch_stats, _tokens(rows, 12), train=False)
    b, _ = short.apply(short_params, short.batch_stats, _tokens(rows, 6), train=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # and the ids at a pad position never matter: nothing reads them but the mask
    x = _tokens(rows, 12)
    c, _ = long.apply(params, long.batch_stats, x, train=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6)


def test_order_and_content_matter():
    model = _model()
    x = _tokens([[2, 5, 6, 7], [2, 7, 6, 5], [2, 5, 6, 8]], 12)
    logits = np.asarray(model.apply(model.params, model.batch_stats, x, train=False)[0])
    assert not np.allclose(logits[0], logits[1]) and not np.allclose(logits[0], logits[2])


def test_dropout_only_in_training_and_deterministic():
    model = _model()
    x = _tokens([[2, 5, 6, 7], [2, 3]], 12)
    run = lambda train: np.asarray(model.apply(model.params, model.batch_stats, x,  # noqa: E731
                                               train=train)[0])
    np.testing.assert_array_equal(run(False), run(False))
    np.testing.assert_array_equal(run(True), run(True))  # same batch, same masks
    assert not np.allclose(run(True), run(False))


def test_trains_on_a_toy_task():
    """Class = whether token 5 occurs anywhere: learnable only by attending over positions."""
    model = _model(num_classes=2, layers=1)
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, 256)
    rows = [[2] + list(rng.integers(6, 40, n - 1)) for n in lengths]
    labels = rng.integers(0, 2, 256).astype(np.int32)
    for row, y in zip(rows, labels):
        if y:
            row[rng.integers(1, len(row))] = 5
    x = _tokens(rows, 12)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply(p, model.batch_stats, x, train=True)[0]
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = model.params, tx.init(model.params)
    for _ in range(150):
        params, opt_state = step(params, opt_state)
    logits = model.apply(params, model.batch_stats, x, train=False)[0]
    assert float(np.mean(np.argmax(logits, -1) == labels)) > 0.95


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_shape=(32, 32, 3)), "seq_len"),
    (dict(widths={**WIDTHS, "heads": 3}), "divisible"),
])
def test_bad_shapes_are_refused(kwargs, match):
    args = dict(num_classes=2, input_shape=(8,), key=jax.random.key(0), widths=WIDTHS)
    with pytest.raises(ValueError, match=match):
        models.get_model("transformer", **{**args, **kwargs})


def test_zoo_discovery_names_heads_and_neurons_per_block_and_rebuilds_them():
    """`models.discovery` names each block's head and FFN groups after its own width arguments
    (the shared ones, vocab / embed / heads / ffn / layers, size no group), and a model rebuilt
    at narrower per-block widths around the sliced variables gives the masked model's logits."""
    from jaxprune import discover, surgery
    from jaxprune import masks as masks_lib
    model = _model(layers=3, **{"block2.ffn": 20})
    found = models.discovery(model)
    assert [(g.name, g.size) for g in found.groups] == [
        ("block0.heads", 4), ("block0.ffn", 24), ("block1.heads", 4), ("block1.ffn", 24),
        ("block2.heads", 4), ("block2.ffn", 20)]
    rng = np.random.default_rng(0)
    keep = {g.name: rng.permutation(g.size) < max(g.size // 2 - i, 1)
            for i, g in enumerate(found.groups)}
    variables = {"params": model.params, "batch_stats": model.batch_stats}
    small = surgery.slice_variables(variables, found, keep)
    narrow = models.with_widths(model, {k: int(v.sum()) for k, v in keep.items()},
                                small["params"], small["batch_stats"])
    assert dict(narrow.spec.widths)["block0.heads"] == 2 and dict(narrow.spec.widths)["heads"] == 4
    assert narrow.params["block2"]["attn"]["query"]["kernel"].shape == (16, 1, 4)
    x = _tokens([[2, 5, 6, 7], [2], [2, 9, 3, 3, 8]], 12)
    masks = masks_lib.channel_masks(keep, discover.params_groups(found), model.params)
    masked = model.apply(masks_lib.apply(model.params, masks), model.batch_stats, x, train=False)[0]
    got = narrow.apply(narrow.params, narrow.batch_stats, x, train=False)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(masked), atol=2e-5)
    dense = model.apply(model.params, model.batch_stats, x, train=False)[0]
    assert np.abs(np.asarray(dense) - np.asarray(masked)).max() > 1e-3
    assert {k: v.tolist() for k, v in masks_lib.channel_keep_from_masks(
        masks, discover.params_groups(found)).items()} == {k: v.tolist() for k, v in keep.items()}


def test_image_model_refuses_token_shape():
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        models.get_model("lenet5", num_classes=2, input_shape=(16,), key=jax.random.key(0))


def _discovered(model):
    from jaxprune import discover
    apply_fn = lambda v, x: model.apply(v["params"], v["batch_stats"], x, train=False)[0]  # noqa: E731
    variables = {"params": model.params, "batch_stats": model.batch_stats}
    x = _tokens([[2, 5, 6, 7], [2]], 12)
    return apply_fn, variables, x, discover.discover_groups(apply_fn, variables, x)


def test_discovery_finds_the_ffn_neurons_and_compacts_them():
    apply_fn, variables, x, found = _discovered(_model())
    ffn = {g.name: g for g in found.groups if g.size == WIDTHS["ffn"]}
    assert sorted(ffn) == ["params/block0/ffn1", "params/block1/ffn1"]
    assert "embedding lookup" in found.unprunable["params/embed/embedding"]
    keep = {name: np.arange(g.size) % 3 != 0 for name, g in ffn.items()}
    assert_compact_equals_masked(apply_fn, variables, x, found, keep)


def test_discovery_finds_the_heads_despite_the_padding_mask():
    """nnx attention with a key padding mask broadcast over the heads: every block's heads and
    FFN neurons are found, and compact == masked on padded sentences."""
    apply_fn, variables, x, found = _discovered(_model())
    assert sorted((g.name, g.size) for g in found.groups) == [
        ("params/block0/attn/query", 4), ("params/block0/ffn1", 24),
        ("params/block1/attn/query", 4), ("params/block1/ffn1", 24)], found.unprunable
    keep = {g.name: np.arange(g.size) % 2 == i % 2 for i, g in enumerate(found.groups)}
    small = assert_compact_equals_masked(apply_fn, variables, x, found, keep)
    assert small["params"]["block0"]["attn"]["query"]["kernel"].shape == (16, 2, 4)


def test_pruner_cost_model_counts_attention_matmuls_per_head():
    """QK^T and AV shrink with the heads kept: the Pruner's planned MACs of a keep equal the
    MACs counted in the compacted program, so a 50 % budget is used, not undershot."""
    import jax.numpy as jnp
    from jaxprune import costs
    from jaxprune import pruner as pruner_lib
    model = _model(seq_len=32)
    pruner = pruner_lib.Pruner(model.apply, model.params, model.batch_stats, (32,),
                               input_dtype=jnp.int32, discovery=models.discovery(model),
                               sparsity=0.5)
    dense = costs.count_macs(model.apply, model.params, model.batch_stats, (32,),
                             input_dtype=jnp.int32)
    assert pruner.cost.dense_macs == dense
    for keep in (pruner.threshold_keep(), np.asarray([0.25, 1.0, 0.75, 0.5], np.float32)):
        small_fn, small_vars = pruner.compact(keep)
        counted = costs.count_macs(
            lambda p, s, x, *, train: (small_fn({"params": p, "batch_stats": s}, x), s),
            small_vars["params"], small_vars["batch_stats"], (32,), input_dtype=jnp.int32)
        assert pruner.cost.macs_exact(keep) == counted
    assert 0.45 * dense <= pruner.cost.macs_exact(pruner.threshold_keep()) <= pruner.budget
