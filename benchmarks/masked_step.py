"""Masked vs dense train step: what the mask costs inside the jitted step.

Both steps are `train.make_train_step` on the same model and batch; the dense one uses an
optimizer without the mask transform and no masks, the masked one carries 50 % channel masks
(same shapes as the params) through the optax chain. Prints median step times and their ratio,
measured in one run.

    python benchmarks/masked_step.py --model=resnet20 --batch=128
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import masks as masks_lib
from jaxprune import models
from jaxprune import train


def _time(step, state, images, labels, recipe, key, repeats):
    state, m = step(state, images, labels, key, recipe)  # compile
    jax.block_until_ready(m)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, images, labels, jax.random.fold_in(key, i), recipe)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--keep", type=float, default=0.5)
    args = ap.parse_args()

    shape = (32, 32, 3)
    model = models.get_model(args.model, num_classes=10, input_shape=shape, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (args.batch,) + shape, dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (args.batch,), dtype=np.int32))
    key = jax.random.key(1)
    mean, std = np.full((3,), 120.0, np.float32), np.full((3,), 64.0, np.float32)

    recipe = train.make_recipe(0.1, 1000)

    def jitted_step(tx):
        step = train.make_train_step(model.apply, tx, schedule="cosine", mean=mean, std=std,
                                     augment=True)
        return jax.jit(step, donate_argnums=(0,))

    # Dense: the same chain without the mask transform, and no masks.
    dense_tx = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(0.9, nesterov=True),
                           train.scale_by_learning_rate_arg())
    ones = masks_lib.ones_like(model.params)
    dense_state = train.create_state(model.params, model.batch_stats, ones, dense_tx)
    dense_step = jitted_step(dense_tx)

    masked_tx = train.make_optimizer(train.Settings(optimizer="sgd", momentum=0.9,
                                                    weight_decay=5e-4))
    groups = models.channel_groups(model)
    scores = masks_lib.channel_scores(jax.tree.map(jnp.abs, model.params), groups)
    keep = masks_lib.channel_keep(scores, jnp.full((len(groups),), args.keep), groups)
    masks = masks_lib.channel_masks(keep, groups, model.params)
    masked_state = train.create_state(model.params, model.batch_stats, masks, masked_tx)
    masked_step = jitted_step(masked_tx)

    t_dense = _time(dense_step, dense_state, images, labels, recipe, key, args.repeats)
    t_masked = _time(masked_step, masked_state, images, labels, recipe, key, args.repeats)
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}  model={args.model} "
          f"batch={args.batch} keep={args.keep}")
    print(f"dense step   {1e3 * t_dense:9.2f} ms   ({args.batch / t_dense:8.1f} img/s)")
    print(f"masked step  {1e3 * t_masked:9.2f} ms   ({args.batch / t_masked:8.1f} img/s)")
    print(f"masked / dense step time ratio: {t_masked / t_dense:.3f}")


if __name__ == "__main__":
    main()
