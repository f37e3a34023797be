"""Latency of a channel-masked model (full size, pruned weights zeroed) vs its compact model.

Keeps a random `--keep` fraction of every channel group, checks that both models give the same
logits, then times the jitted eval forward pass of each (after warm-up, median of repeats,
`block_until_ready`) and prints both latencies and their ratio.

    python benchmarks/compact_latency.py                       # resnet20, batch 128, keep 0.5
    python benchmarks/compact_latency.py --model vgg16 --batch_size 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models, surgery


def random_keep(rng: np.random.Generator, groups, keep_fraction: float) -> dict:
    """{group: bool[size]} keeping exactly max(1, round(keep_fraction * size)) random channels."""
    keep = {}
    for g in groups:
        k = np.zeros(g.size, bool)
        k[rng.permutation(g.size)[:max(1, round(keep_fraction * g.size))]] = True
        keep[g.name] = k
    return keep


def zero_dropped(params, groups, keep):
    """Params with the dropped channels' producer slices and consumer rows set to zero."""
    flat = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    for g in groups:
        k = jnp.asarray(keep[g.name])
        for path in g.producers:
            flat[path] = flat[path] * k
        for path, spatial in g.consumers:
            flat[path] = flat[path] * jnp.tile(k, spatial)[:, None]
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def median_latency(fn, args, *, warmup: int, repeats: int) -> float:
    """Median wall time (seconds) of `fn(*args)` after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(models.MODELS))
    parser.add_argument("--input_shape", default="32,32,3", help="H,W,C")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--keep", type=float, default=0.5, help="kept fraction per group")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 < args.keep <= 1.0:
        parser.error(f"--keep must be in (0, 1], got {args.keep}")

    input_shape = tuple(int(d) for d in args.input_shape.split(","))
    init_key, x_key = jax.random.split(jax.random.key(args.seed))
    model = models.get_model(args.model, num_classes=args.num_classes,
                             input_shape=input_shape, key=init_key)
    groups = models.channel_groups(model)  # discovered, named after the width arguments
    keep = random_keep(np.random.default_rng(args.seed), groups, args.keep)
    masked_params = zero_dropped(model.params, groups, keep)
    start = time.perf_counter()
    sliced = surgery.slice_variables({"params": model.params, "batch_stats": model.batch_stats},
                                     models.discovery(model), keep)
    small = models.with_widths(model, {n: int(k.sum()) for n, k in keep.items()},
                               sliced["params"], sliced["batch_stats"])
    jax.block_until_ready(small.params)
    compaction_s = time.perf_counter() - start
    x = jax.random.normal(x_key, (args.batch_size,) + input_shape, jnp.float32)

    masked_fn = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False)[0])
    compact_fn = jax.jit(lambda p, s, x: small.apply(p, s, x, train=False)[0])
    masked_args = (masked_params, model.batch_stats, x)
    compact_args = (small.params, small.batch_stats, x)
    diff = float(jnp.max(jnp.abs(masked_fn(*masked_args) - compact_fn(*compact_args))))

    t_masked = median_latency(masked_fn, masked_args, warmup=args.warmup, repeats=args.repeats)
    t_compact = median_latency(compact_fn, compact_args, warmup=args.warmup,
                               repeats=args.repeats)
    count = lambda p: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))  # noqa: E731
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"model: {args.model}, input {input_shape}, batch {args.batch_size}, "
          f"keep {args.keep} per group, repeats {args.repeats}")
    print(f"params: masked model {count(model.params):,} (dense) / compact {count(small.params):,}")
    print(f"max |masked - compact| logits: {diff:.2e}")
    print(f"compaction (slice variables + rebuild the module): {compaction_s * 1e3:.1f} ms")
    print(f"masked  model median latency: {t_masked * 1e3:9.2f} ms")
    print(f"compact model median latency: {t_compact * 1e3:9.2f} ms")
    print(f"speed-up (masked / compact):  {t_masked / t_compact:9.2f}x")


if __name__ == "__main__":
    main()
