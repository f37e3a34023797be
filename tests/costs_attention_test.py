"""The MACs counter counts attention's two activation matmuls (q.k and p.v), which grow with
the square of the sequence length, beside the projections (issue 19 item 2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import costs

D, HEADS, FF = 8, 2, 12


def apply(p, batch_stats, x, *, train=False):
    """One pre-norm-free encoder block on embedded inputs x [B, S, D] (hand-written heads)."""
    b, s, d = x.shape
    hd = d // HEADS
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    q, k, v = (t.reshape(b, s, HEADS, hd) for t in (q, k, v))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, s, d) @ p["out"]
    x = x + jax.nn.relu(x @ p["ff1"]) @ p["ff2"]
    return x.mean(1) @ p["head"], batch_stats


@pytest.mark.parametrize("seq", [4, 16])
def test_attention_macs_equal_a_hand_count(seq):
    shapes = {"qkv": (D, 3 * D), "out": (D, D), "ff1": (D, FF), "ff2": (FF, D), "head": (D, 2)}
    params = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
    hd = D // HEADS
    projections = seq * D * 3 * D + seq * D * D + 2 * seq * D * FF + D * 2
    attention = 2 * HEADS * seq * seq * hd  # q.k^T and p.v, per example
    assert costs.count_macs(apply, params, {}, (seq, D)) == projections + attention
