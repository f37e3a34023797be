"""Attention heads found, masked and cut out by discovery, for three ways of writing attention:
`flax.nnx.MultiHeadAttention`, `flax.linen.MultiHeadDotProductAttention` and attention by hand
(one Dense to 3*d, reshape or split, einsum). Tiny models; each test runs in seconds."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import costs, discover, surgery
from jaxprune import masks as masks_lib
from compact_check import assert_compact_equals_masked  # tests/ is on sys.path under pytest

D, HEADS, FF, VOCAB, SEQ = 8, 2, 12, 11, 5


class NNXEncoder(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.ff1, self.ff2 = nnx.Linear(D, FF, rngs=rngs), nnx.Linear(FF, D, rngs=rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.ln1(x))
        x = x + self.ff2(nnx.relu(self.ff1(self.ln2(x))))
        return self.head(x.mean(1))


class LinenEncoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x))
        x = x + nn.Dense(D)(nn.gelu(nn.Dense(FF)(nn.LayerNorm()(x))))
        return nn.Dense(2)(x.mean(1))


def hand_params(key, kv_heads=HEADS):
    k = jax.random.split(key, 8)
    n = lambda k, s: jax.random.normal(k, s) * 0.3
    kv = D // HEADS * kv_heads
    return {"embed": n(k[0], (VOCAB, D)),
            "qkv": {"kernel": n(k[1], (D, D + 2 * kv)), "bias": n(k[2], (D + 2 * kv,))},
            "out": {"kernel": n(k[3], (D, D)), "bias": n(k[4], (D,))},
            "ff1": {"kernel": n(k[5], (D, FF))}, "ff2": {"kernel": n(k[6], (FF, D))},
            "head": {"kernel": n(k[7], (D, 2))}}


def hand_apply(style, kv_heads=HEADS):
    """Attention by hand: `style` 'reshape' (B, S, 3, H, hd) or 'split' (jnp.split then
    reshape); kv_heads < HEADS is grouped-query attention (k / v repeated over the groups)."""
    def apply(p, tokens):
        x = p["embed"][tokens]
        b, s, d = x.shape
        hd = d // HEADS
        h = x - x.mean(-1, keepdims=True)
        qkv = h @ p["qkv"]["kernel"] + p["qkv"]["bias"][None, None]
        if style == "reshape":
            qkv = qkv.reshape(b, s, 3, HEADS, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q, k, v = jnp.split(qkv, [d, d + kv_heads * hd], axis=-1) if kv_heads != HEADS \
                else jnp.split(qkv, 3, axis=-1)
            q = q.reshape(b, s, HEADS, hd)
            k, v = (t.reshape(b, s, kv_heads, hd) for t in (k, v))
            if kv_heads != HEADS:
                k, v = (jnp.repeat(t, HEADS // kv_heads, axis=2) for t in (k, v))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, s, d)
        x = x + ctx @ p["out"]["kernel"] + p["out"]["bias"][None, None]
        x = x + jax.nn.relu(x @ p["ff1"]["kernel"]) @ p["ff2"]["kernel"]
        return x.mean(1) @ p["head"]["kernel"]
    return apply


def model(style):
    """(apply_fn(variables, tokens), variables, tokens, head-group leaf paths by role)."""
    tokens = jax.random.randint(jax.random.key(1), (3, SEQ), 0, VOCAB)
    if style == "nnx":
        graph, state = nnx.split(NNXEncoder(nnx.Rngs(0)))
        leaves = {"producer": [f"attn/{n}/kernel/value" for n in ("query", "key", "value")],
                  "param": [f"attn/{n}/bias/value" for n in ("query", "key", "value")],
                  "consumer": ["attn/out/kernel/value"]}
        return lambda s, x: nnx.merge(graph, s)(x), state, tokens, leaves
    if style == "linen":
        module = LinenEncoder()
        variables = module.init(jax.random.key(0), tokens)
        at = "params/MultiHeadDotProductAttention_0"
        leaves = {"producer": [f"{at}/{n}/kernel" for n in ("query", "key", "value")],
                  "param": [f"{at}/{n}/bias" for n in ("query", "key", "value")],
                  "consumer": [f"{at}/out/kernel"]}
        return module.apply, variables, tokens, leaves
    leaves = {"producer": ["qkv/kernel"], "param": ["qkv/bias"], "consumer": ["out/kernel"]}
    return hand_apply(style), hand_params(jax.random.key(0)), tokens, leaves


def head_group(found):
    groups = [g for g in found.groups if g.size == HEADS]
    assert len(groups) == 1, [(g.name, g.size) for g in found.groups]
    return groups[0]


STYLES = ["nnx", "linen", "reshape", "split"]


@pytest.mark.parametrize("style", STYLES)
def test_heads_and_ffn_neurons_are_found(style):
    apply_fn, variables, tokens, leaves = model(style)
    found = discover.discover_groups(apply_fn, variables, tokens)
    heads = head_group(found)
    by_role = {}
    for m in heads.members:
        by_role.setdefault(m.role, set()).add("/".join(m.path))
    assert by_role == {role: set(paths) for role, paths in leaves.items()}
    ffn = [g for g in found.groups if g.size == FF]
    assert len(ffn) == 1 and {m.role for m in ffn[0].members} >= {"producer", "consumer"}
    assert len(found.groups) == 2
    reasons = " ".join(found.unprunable.values())
    assert "embedding lookup" in reasons          # the residual stream, from the embedding
    assert "reduces over the channel axis" in reasons   # LayerNorm (or the hand centring)
    assert "feeds a model output" in reasons      # the logits


@pytest.mark.parametrize("style", STYLES)
def test_compact_heads_equal_masked_heads(style):
    apply_fn, variables, tokens, _ = model(style)
    found = discover.discover_groups(apply_fn, variables, tokens)
    heads = head_group(found)
    ffn = next(g for g in found.groups if g.size == FF)
    keep = {heads.name: np.array([False, True]), ffn.name: np.arange(FF) % 3 != 0}
    small_vars = assert_compact_equals_masked(apply_fn, variables, tokens, found, keep)
    dense_size = sum(x.size for x in jax.tree.leaves(variables))
    small_size = sum(x.size for x in jax.tree.leaves(small_vars))
    hd, cut = D // HEADS, FF // 3
    removed = 4 * D * hd + 3 * hd + 2 * D * cut  # q, k, v columns, out rows, biases; FFN
    if style in ("nnx", "linen"):
        removed += cut  # the FFN's first bias
    assert dense_size - small_size == removed


@pytest.mark.parametrize("style", ["nnx", "reshape"])
def test_masking_a_head_zeroes_its_output_projection_rows(style):
    """Oracle without discovery: head h off == the output projection's rows of head h zeroed."""
    apply_fn, variables, tokens, _ = model(style)
    found = discover.discover_groups(apply_fn, variables, tokens)
    heads = head_group(found)
    masked = discover.mask_activations(apply_fn)(variables, tokens,
                                                 {heads.name: jnp.array([1.0, 0.0])})
    out_path = next(m.path for m in heads.members if m.role == "consumer")
    leaves, treedef = masks_lib.leaves_with_paths(variables)
    # the output projection's head-1 slice: (H, hd, D)[1] (nnx) or (D, D)[hd:] (by hand)
    zeroed = jax.tree.unflatten(treedef, [
        leaf if path != out_path else
        leaf.at[1].set(0.0) if leaf.ndim == 3 else leaf.at[D // HEADS:].set(0.0)
        for path, leaf in leaves])
    np.testing.assert_allclose(masked, apply_fn(zeroed, tokens), atol=2e-5)


class NNXBlockOnEmbeddings(nnx.Module):
    """An encoder block on embedded inputs [B, S, D] (what `Pruner`'s float input feeds)."""

    def __init__(self, rngs, heads=4):
        self.attn = nnx.MultiHeadAttention(heads, D, decode=False, rngs=rngs)
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.ff1, self.ff2 = nnx.Linear(D, FF, rngs=rngs), nnx.Linear(FF, D, rngs=rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        x = x + self.ff2(nnx.relu(self.ff1(self.ln(x))))
        return self.head(x.mean(1))


def test_pruner_searches_heads_and_ffn_neurons():
    """`Pruner` on a Transformer block: heads and FFN neurons are its units, a head group's
    grid is whole heads (not `channel_multiple` heads), fine-tuning holds pruned weights at
    zero, and the compacted model equals the masked one."""
    import jaxprune as jp
    apply, params, stats = jp.functional(NNXBlockOnEmbeddings(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (32, SEQ, D))
    y = (x[:, 0, 0] > 0).astype(jnp.int32)
    pruner = jp.Pruner(apply, params, stats, input_shape=(SEQ, D), sparsity=0.3,
                       channel_multiple=4)
    sizes = dict(zip(pruner.units, (g.size for g in pruner.groups)))
    assert sorted(sizes.values()) == [4, FF]
    heads = next(n for n, size in sizes.items() if size == 4)
    np.testing.assert_allclose(pruner.step[pruner.units.index(heads)], 1 / 4)
    evaluate = pruner.evaluator(None, x, y)
    keep = pruner.search("random", evaluate, key=jax.random.key(2), rounds=2,
                         candidates=4).best_keep
    assert pruner.cost.macs(keep) <= pruner.budget
    keep = np.where(np.asarray(pruner.units) == heads, 0.5, 1.0 - 3 / FF).astype(np.float32)
    kept = pruner.channel_keep(keep)
    assert kept[heads].sum() == 2
    masks = pruner.masks(keep)[0]
    q = masks["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(np.asarray(q).all(axis=(0, 2)), kept[heads])
    tuned = pruner.finetune(keep, x, y, epochs=1, key=jax.random.key(3), batch_size=8)
    dropped = ~kept[heads]
    assert np.all(np.asarray(tuned.params["attn"]["out"]["kernel"])[dropped] == 0)
    small_apply, small_vars = pruner.compact(keep, tuned.params, tuned.batch_stats)
    masked = discover.mask_activations(lambda v, x: apply(v["params"], v["batch_stats"], x,
                                                          train=False)[0])(
        {"params": tuned.params, "batch_stats": tuned.batch_stats}, x,
        {k: v.astype(np.float32) for k, v in kept.items()})
    np.testing.assert_allclose(small_apply(small_vars, x), masked, atol=2e-5)
    assert small_vars["params"]["attn"]["query"]["kernel"].shape[1] == kept[heads].sum()
    # The cost model scales the projections and attention's two matmuls (2 * SEQ * SEQ *
    # head_dim per head, no param in them) with the heads kept: it plans what the compact
    # model has.
    small_macs = costs.count_macs(
        lambda p, s, x, train=False: (small_apply({"params": p, "batch_stats": s}, x), s),
        small_vars["params"], small_vars["batch_stats"], (SEQ, D))
    assert int(pruner.cost.macs(keep)) == small_macs


def test_grouped_query_attention_prunes_key_value_heads_with_their_query_heads():
    """4 query heads over 2 key / value heads (k, v repeated twice, by hand): a channel of the
    head group is one key / value head with its 2 query heads."""
    q_heads, kv_heads, hd = 4, 2, D // 4
    k = jax.random.split(jax.random.key(0), 4)
    params = {"q": jax.random.normal(k[0], (D, q_heads * hd)),
              "kv": jax.random.normal(k[1], (D, 2 * kv_heads * hd)),
              "out": jax.random.normal(k[2], (q_heads * hd, D)),
              "head": jax.random.normal(k[3], (D, 2))}

    def apply_fn(p, x):
        b, s, _ = x.shape
        q = (x @ p["q"]).reshape(b, s, q_heads, hd)
        key, value = (t.reshape(b, s, kv_heads, hd) for t in jnp.split(x @ p["kv"], 2, -1))
        key, value = (jnp.repeat(t, q_heads // kv_heads, axis=2) for t in (key, value))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, key), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", w, value).reshape(b, s, -1) @ p["out"]
        return x.mean(1) @ p["head"]

    x = jax.random.normal(jax.random.key(1), (3, SEQ, D))
    found = discover.discover_groups(apply_fn, params, x)
    assert [g.size for g in found.groups] == [kv_heads], found
    group = found.groups[0]
    assert {("/".join(m.path), m.role, m.inner) for m in group.members} == {
        ("q", "producer", 2 * hd), ("kv", "producer", hd), ("out", "consumer", 2 * hd)}
    keep = {group.name: np.array([False, True])}
    masked = discover.mask_activations(apply_fn)(params, x, {group.name: jnp.array([0.0, 1.0])})
    small_fn, small_vars = surgery.compact(apply_fn, params, found, keep)
    np.testing.assert_allclose(small_fn(small_vars, x), masked, atol=2e-5)
    assert small_vars["q"].shape == (D, 2 * hd) and small_vars["kv"].shape == (D, 2 * hd)
