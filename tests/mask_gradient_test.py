"""The 'mask_gradient' criterion (Michel et al. 2019): a channel's importance is |dL/dξ| of a
mask ξ on its output, for attention heads, FFN neurons and conv channels alike, from token or
image inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import criteria, train


class Encoder(nnx.Module):
    def __init__(self, rngs, vocab=50, d=16):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False, rngs=rngs)
        self.ffn1, self.ffn2 = nnx.Linear(d, 24, rngs=rngs), nnx.Linear(24, d, rngs=rngs)
        self.out = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attn(x)
        return self.out((x + self.ffn2(nnx.relu(self.ffn1(x)))).mean(axis=1))


def test_mask_gradient_is_the_signed_sum_of_w_times_grad_over_the_output_rows():
    """A mask on a head's (neuron's) output scales the output projection's rows of it, so
    dL/dξ = Σ W_row · dL/dW_row: the head importance of Michel et al. 2019, exactly."""
    apply, params, stats = jp.functional(Encoder(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 50, (8, 10)).astype(np.int32), rng.integers(0, 3, 8))
               for _ in range(2)]
    pruner = jp.Pruner(apply, params, stats, input_shape=(10,), input_dtype=jnp.int32,
                       criterion="mask_gradient", score_batches=batches, sparsity=0.3)
    assert pruner.scores is None and sorted(pruner.channel_scores) == ["params/attn/query",
                                                                      "params/ffn1"]

    def loss(p, batch):
        logits = apply(p, stats, batch[0], train=False)[0]
        return jnp.mean(train.cross_entropy(logits, batch[1]))

    heads, neurons = 0.0, 0.0
    for batch in batches:
        g = jax.grad(loss)(params, batch)
        heads += np.abs(np.sum(params["attn"]["out"]["kernel"] * g["attn"]["out"]["kernel"],
                               axis=(1, 2)))
        neurons += np.abs(np.sum(params["ffn2"]["kernel"] * g["ffn2"]["kernel"], axis=1))
    np.testing.assert_allclose(pruner.channel_scores["params/attn/query"], heads / 2,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(pruner.channel_scores["params/ffn1"], neurons / 2,
                               rtol=1e-4, atol=1e-7)
    assert float(pruner.cost.macs(pruner.threshold_keep())) <= pruner.budget


def test_mask_gradient_needs_groups_a_loss_and_batches():
    with pytest.raises(ValueError, match="mask_gradient.*mask_loss_fn"):
        criteria.score("mask_gradient", {"w": jnp.ones((2, 2))}, batches=[None])
    with pytest.raises(ValueError, match="batches is empty"):
        criteria.mask_gradient(lambda m, b: 0.0, {"g": 2}, [])
