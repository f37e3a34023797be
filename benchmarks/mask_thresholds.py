"""Masks for many keep ratios: K separate `lax.top_k` builds vs one sort + K rank lookups.

The search evaluator needs masks for K candidate keep ratios from ONE set of scores. A top-k
mask needs a static k, so K keep ratios mean K top-k selections (and K compilations); the
rank-based `masks.from_scores` sorts once and compares the ranks with K thresholds
(`jax.vmap` over the keep ratios keeps the sort outside the batch).

    python benchmarks/mask_thresholds.py            # 786,432-weight leaf [768, 1024], K = 16

Prints the time of both (first call, which includes compilation, and a second, cached call)
and their ratio, and checks that both give identical masks.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks


@functools.partial(jax.jit, static_argnums=1)
def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """The per-candidate way: select the top k (static) scores, scatter them into a mask."""
    flat = scores.ravel()
    _, idx = jax.lax.top_k(flat, k)
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(scores.shape)


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=768)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16, help="number of keep ratios")
    parser.add_argument("--repeats", type=int, default=3, help="cached runs (median)")
    args = parser.parse_args()

    scores = jnp.abs(jax.random.normal(jax.random.key(0), (args.rows, args.cols)))
    size = scores.size
    keeps = np.linspace(0.05, 0.8, args.k, dtype=np.float32)
    counts = [max(1, int(np.round(np.float32(k) * np.float32(size)))) for k in keeps]
    jax.block_until_ready(scores)

    def looped():
        return [topk_mask(scores, c) for c in counts]

    # scores are an ARGUMENT: closed over, they become a constant and XLA constant-folds the
    # sort at compile time (measured: minutes of compilation for this leaf).
    by_rank = jax.jit(jax.vmap(lambda s, k: masks.from_scores({"w": s}, k)["w"],
                               in_axes=(None, 0)))
    keeps_dev = jnp.asarray(keeps)

    def ranked():
        return by_rank(scores, keeps_dev)

    t_topk_cold, topk_out = _timed(looped)
    t_rank_cold, rank_out = _timed(ranked)
    t_topk_warm = statistics.median(_timed(looped)[0] for _ in range(args.repeats))
    t_rank_warm = statistics.median(_timed(ranked)[0] for _ in range(args.repeats))

    for i, (a, c) in enumerate(zip(topk_out, counts)):
        assert int(a.sum()) == c and bool(jnp.all(a == rank_out[i])), f"keep {keeps[i]}"

    print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}")
    print(f"leaf {args.rows}x{args.cols} = {size:,} weights, {args.k} keep ratios "
          f"{keeps[0]:.2f}..{keeps[-1]:.2f}; masks identical: yes")
    print(f"{'':34s}{'first call (incl. compile)':>28s}{'cached (median)':>18s}")
    print(f"{args.k} x lax.top_k mask builds{'':10s}{t_topk_cold:27.3f}s{t_topk_warm:17.3f}s")
    print(f"1 sort + {args.k} rank lookups (vmap){'':3s}{t_rank_cold:27.3f}s"
          f"{t_rank_warm:17.3f}s")
    print(f"ratio top_k / rank{'':16s}{t_topk_cold / t_rank_cold:27.1f}x"
          f"{t_topk_warm / t_rank_warm:17.1f}x")


if __name__ == "__main__":
    main()
