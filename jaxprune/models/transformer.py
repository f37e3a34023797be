"""A small Transformer encoder classifier over token ids (SST-2 and other text datasets).

token + position embeddings → `layers` pre-LayerNorm blocks (multi-head self-attention with a
padding mask, then a ReLU FFN, each added to the residual stream) → final LayerNorm → the mean
over the non-pad tokens → classifier. A plain Flax NNX module: attention is
`nnx.MultiHeadAttention`, the FFN two `nnx.Linear`s, and nothing in it is about pruning (its
heads and FFN neurons are for discovery to find).

Each block has its own width arguments, `block{i}.heads` and `block{i}.ffn`, which default to
`heads` and `ffn`: a pruned model keeps a different number of heads and FFN neurons per block
(`models.with_widths`). A head is always `embed // heads` wide (`heads`, the dense model's
head count, fixes the head size; a block's own count only says how many it has).

Input: int32 [batch, seq_len] token ids, `text.PAD_ID` (0) at padded positions. Pad positions
are masked out of attention (as keys) and of the pooling, so the logits of a sentence do not
depend on how much padding follows it.

Dropout (`dropout` > 0, train=True only): the zoo's `apply` takes no random key, so the
dropout masks are drawn from a key derived from the batch's token ids (a different batch gives
different masks; the same batch the same ones). Deterministic and resumable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import text

# Architecture defaults (overridable as `widths`; `vocab` comes from the dataset's tokenizer).
DEFAULTS = {"vocab": 16384, "embed": 64, "heads": 4, "ffn": 128, "layers": 2}
DROPOUT = 0.1


def _dropout(key, x, rate: float):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _batch_key(tokens):
    """A PRNG key that depends on every token id, its position and its row (for dropout)."""
    rows, cols = tokens.shape
    weights = (jnp.arange(1, rows + 1, dtype=jnp.uint32)[:, None] * jnp.uint32(2654435761)
               + jnp.arange(1, cols + 1, dtype=jnp.uint32)[None, :] * jnp.uint32(40503))
    return jax.random.fold_in(jax.random.key(0), jnp.sum(tokens.astype(jnp.uint32) * weights))


class Block(nnx.Module):
    """Pre-LN encoder block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, embed: int, heads: int, head_dim: int, ffn: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(embed, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=embed,
                                           qkv_features=heads * head_dim, out_features=embed,
                                           decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(embed, rngs=rngs)
        self.ffn1 = nnx.Linear(embed, ffn, rngs=rngs)
        self.ffn2 = nnx.Linear(ffn, embed, rngs=rngs)

    def __call__(self, x, mask, drop):
        x = x + drop(self.attn(self.ln1(x), mask=mask, deterministic=True))
        return x + drop(self.ffn2(drop(jax.nn.relu(self.ffn1(self.ln2(x))))))


class TransformerClassifier(nnx.Module):
    """Transformer encoder classifier; input_shape is (seq_len,) of int32 token ids.

    widths: vocab (embedding rows: the tokenizer's vocabulary size), embed (d_model), heads
    (attention heads; embed must divide by it), ffn (hidden units per block), layers (blocks),
    and per block `block{i}.heads` / `block{i}.ffn` (default: heads / ffn; `derived_widths`),
    the widths pruning narrows.
    """

    INPUT_KIND = "tokens"
    UNPRUNABLE = (("embed", "embedding"), ("classifier", "kernel"))
    # Width arguments that shape the model but size no prunable group (the blocks' own
    # `block{i}.*` widths do): `models.discovery` leaves them at their values.
    FIXED_WIDTHS = tuple(DEFAULTS)

    @staticmethod
    def default_widths(input_shape) -> dict:
        del input_shape
        return dict(DEFAULTS)

    @staticmethod
    def derived_widths(widths: dict) -> dict:
        """The per-block widths, one pair per layer of `widths['layers']`, at the shared
        `heads` / `ffn` (their defaults)."""
        return {f"block{i}.{name}": int(widths[name])
                for i in range(int(widths["layers"])) for name in ("heads", "ffn")}

    def __init__(self, *, num_classes: int, input_shape, widths: dict, rngs: nnx.Rngs):
        if len(input_shape) != 1:
            raise ValueError(f"transformer: input_shape must be (seq_len,) of token ids, got "
                             f"{tuple(input_shape)} (an image dataset? use an image model)")
        embed, heads = widths["embed"], widths["heads"]
        if embed % heads:
            raise ValueError(f"transformer: embed={embed} must be divisible by heads={heads}")
        self.embed = nnx.Embed(widths["vocab"], embed, rngs=rngs)
        self.position = nnx.Embed(int(input_shape[0]), embed, rngs=rngs)
        self.num_layers = int(widths["layers"])
        for i in range(self.num_layers):  # block0, block1, …: str keys in the params tree
            setattr(self, f"block{i}", Block(embed, widths[f"block{i}.heads"], embed // heads,
                                             widths[f"block{i}.ffn"], rngs=rngs))
        self.ln = nnx.LayerNorm(embed, rngs=rngs)
        self.classifier = nnx.Linear(embed, num_classes, rngs=rngs)

    def __call__(self, tokens, *, train: bool):
        tokens = tokens.astype(jnp.int32)
        valid = tokens != text.PAD_ID  # [B, L]
        if train and DROPOUT > 0:
            keys = iter(jax.random.split(_batch_key(tokens), 1 + 3 * self.num_layers))
            drop = lambda y: _dropout(next(keys), y, DROPOUT)  # noqa: E731
        else:
            drop = lambda y: y  # noqa: E731
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))[None]
        x = drop(x)
        mask = valid[:, None, None, :]  # [B, heads(1), queries(1), keys]: pad keys masked
        for i in range(self.num_layers):
            x = getattr(self, f"block{i}")(x, mask, drop)
        x = self.ln(x)
        weights = valid.astype(x.dtype)[..., None]
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return self.classifier(pooled)
