"""Training and evaluation: a pure, jitted train step with masks, and the epoch loop around it.

The train state carries the masks beside the params (not hidden in the optimizer state), so a
pruned weight is zero in `params`, False in `masks`, and stays exactly zero: the optimizer
chain ends in `masks.masked_updates()`, which zeroes its update whatever momentum, Adam or
weight decay did before it.

The whole training split lives on the device as uint8; a step receives only the int32 indices
of its batch and does gather → normalise → augment inside the compiled step.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import data as data_lib
from jaxprune import masks as masks_lib


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: Any


def learning_rate_schedule(train_config, total_steps: int) -> optax.Schedule:
    """`cosine` (to zero), `step` (×0.1 at 50 % and 75 %) or `constant`."""
    lr = float(train_config.learning_rate)
    total_steps = max(int(total_steps), 1)
    if train_config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps)
    if train_config.schedule == "step":
        return optax.piecewise_constant_schedule(
            lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})
    if train_config.schedule == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"train.schedule={train_config.schedule!r}: use 'cosine', 'step' or 'constant'.")


def make_optimizer(train_config, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """The configured optimizer, ending in the mask transform (call `update(..., masks=...)`)."""
    schedule = learning_rate_schedule(train_config, total_steps)
    weight_decay = float(train_config.weight_decay)
    if train_config.optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(schedule, momentum=float(train_config.momentum), nesterov=True))
    elif train_config.optimizer == "adam":
        tx = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        raise ValueError(f"train.optimizer={train_config.optimizer!r}: use 'sgd' or 'adam'.")
    return optax.chain(tx, masks_lib.masked_updates())


def create_state(params, batch_stats, masks, tx) -> TrainState:
    """A fresh train state; params are masked once so pruned weights start at exactly zero.

    Every leaf is a fresh buffer: the train step donates its state, and the caller's params,
    batch stats and masks must survive that.
    """
    masks_lib.check_compatible(params, masks)
    params = masks_lib.apply(params, masks)
    batch_stats, masks = jax.tree.map(jnp.copy, (batch_stats, masks))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), masks=masks)


def l1_penalty(params, target: str, unprunable=()) -> jax.Array:
    """Sum of |w| over prunable kernels (`weights`) or over BatchNorm scales (`bn`, network slimming)."""
    total = jnp.zeros((), jnp.float32)
    for keys, leaf in masks_lib.leaves_with_paths(params)[0]:
        if target == "bn":
            hit = keys[-1] == "scale"
        elif target == "weights":
            hit = leaf.ndim >= 2 and keys not in unprunable
        else:
            raise ValueError(f"train.l1_target={target!r}: use 'weights' or 'bn'.")
        if hit:
            total = total + jnp.sum(jnp.abs(leaf))
    return total


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(apply_fn: Callable, tx, *, mean, std, augment: bool, l1: float = 0.0,
                    l1_target: str = "weights", unprunable=(), mask_update_fn=None):
    """Returns a jitted `step(state, images_u8, labels, idx, key) -> (state, metrics)`.

    `mask_update_fn(step, params, masks) -> masks`, if given, runs first (gradual / iterative
    pruning); params are re-masked with the new masks so newly pruned weights are exactly 0.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    def loss_fn(params, batch_stats, x, y):
        logits, new_batch_stats = apply_fn(params, batch_stats, x, train=True)
        loss = jnp.mean(cross_entropy(logits, y))
        total = loss + (l1 * l1_penalty(params, l1_target, unprunable) if l1 > 0 else 0.0)
        return total, (loss, logits, new_batch_stats)

    def step(state: TrainState, images, labels, idx, key):
        masks, params = state.masks, state.params
        if mask_update_fn is not None:
            masks = mask_update_fn(state.step, params, masks)
            params = masks_lib.apply(params, masks)
        x = data_lib.normalize(images[idx], mean, std)
        y = labels[idx]
        if augment:
            x = data_lib.augment(key, x)
        grads, (loss, logits, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(
            params, state.batch_stats, x, y)
        updates, opt_state = tx.update(grads, state.opt_state, params, masks=masks)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                               opt_state=opt_state, masks=masks)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return jax.jit(step, donate_argnums=(0,))


def make_eval_fn(apply_fn: Callable, *, mean, std, batch_size: int):
    """Returns jitted `eval(params, batch_stats, images_u8, labels) -> {accuracy, loss}` (exact).

    The split is padded to a multiple of `batch_size` on the host and scanned over on the
    device, with a weight per example so padding does not count.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    @jax.jit
    def _eval(params, batch_stats, images, labels, weights):
        def body(carry, batch):
            x, y, w = batch
            logits, _ = apply_fn(params, batch_stats, data_lib.normalize(x, mean, std), train=False)
            correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
            loss = jnp.sum(cross_entropy(logits, y) * w)
            return (carry[0] + correct, carry[1] + loss), None

        n = images.shape[0] // batch_size
        shaped = (images.reshape((n, batch_size) + images.shape[1:]),
                  labels.reshape((n, batch_size)), weights.reshape((n, batch_size)))
        (correct, loss), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), shaped)
        total = jnp.sum(weights)
        return {"accuracy": correct / total, "loss": loss / total}

    def evaluate(params, batch_stats, images, labels):
        images, labels, weights = pad_to_multiple(np.asarray(images), np.asarray(labels), batch_size)
        out = _eval(params, batch_stats, images, labels, weights)
        return {k: float(v) for k, v in out.items()}

    return evaluate


def pad_to_multiple(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Pads a split to a multiple of batch_size; returns images, labels, float32 weights."""
    n = images.shape[0]
    padded = -(-n // batch_size) * batch_size
    weights = np.zeros((padded,), np.float32)
    weights[:n] = 1.0
    if padded != n:
        images = np.concatenate([images, np.zeros((padded - n,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros((padded - n,), labels.dtype)])
    return images, labels, weights


class FitResult(NamedTuple):
    state: TrainState
    train_seconds: float
    history: list


def fit(state: TrainState, step_fn, *, images, labels, epochs: int, batch_size: int, key,
        eval_fn: Optional[Callable] = None, val: Optional[tuple] = None,
        checkpointer=None, checkpoint_every: int = 0, meta: Optional[dict] = None,
        writer=None, phase: str = "train", seconds_so_far: float = 0.0,
        progress: bool = True) -> FitResult:
    """Runs `epochs` epochs of `step_fn` from `state.step` on (a resumed state is continued).

    Batches come from a permutation seeded by `fold_in(key, epoch)` and per-step augmentation keys
    from `fold_in(key, step)`, so a resumed run sees exactly the batches an uninterrupted one would.
    Saves through `checkpointer` every `checkpoint_every` steps and at the end.
    """
    from tqdm.auto import tqdm  # local: keeps `import jaxprune.train` light

    num = int(images.shape[0])
    steps_per_epoch = num // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {num} training examples; "
                         "lower --config.train.batch_size.")
    total_steps = epochs * steps_per_epoch
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    start = int(state.step)
    history = []
    seconds = float(seconds_so_far)
    perm_key, aug_key = jax.random.split(key)
    for epoch in range(start // steps_per_epoch, epochs):
        order = data_lib.epoch_batches(jax.random.fold_in(perm_key, epoch), num, batch_size)
        first = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
        bar = tqdm(range(first, steps_per_epoch), desc=f"{phase} epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0}
        seen = 0
        metrics = None
        for i in bar:
            step_key = jax.random.fold_in(aug_key, epoch * steps_per_epoch + i)
            state, metrics = step_fn(state, images, labels, jnp.asarray(order[i]), step_key)
            seen += 1
            if seen % 10 == 0 or i == steps_per_epoch - 1:
                m = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{float(m['loss']):.3f}", acc=f"{float(m['accuracy']):.3f}",
                                img_s=f"{seen * batch_size / max(elapsed, 1e-9):.0f}")
            for k in sums:
                sums[k] += metrics[k]  # stays on device; read once at epoch end
            step = int(epoch * steps_per_epoch + i + 1)
            if checkpointer is not None and checkpoint_every and step % checkpoint_every == 0 \
                    and step < total_steps:
                jax.block_until_ready(state)
                checkpointer.save(step, state, dict(meta or {}, phase=phase, done=False,
                                                    train_seconds=seconds + time.perf_counter() - t0))
        jax.block_until_ready(state)
        epoch_seconds = time.perf_counter() - t0
        seconds += epoch_seconds
        record = {"phase": phase, "epoch": epoch + 1, "step": int(state.step),
                  "train_loss": float(sums["loss"]) / max(seen, 1),
                  "train_accuracy": float(sums["accuracy"]) / max(seen, 1),
                  "images_per_second": seen * batch_size / max(epoch_seconds, 1e-9),
                  "train_seconds": seconds}
        if eval_fn is not None and val is not None:
            ev = eval_fn(state.params, state.batch_stats, *val)
            record.update(val_accuracy=ev["accuracy"], val_loss=ev["loss"])
        history.append(record)
        if writer is not None:
            writer.write(int(state.step), record)
        if progress:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.items() if k != "phase")
            tqdm.write(f"[{phase}] {shown}")
    if checkpointer is not None:
        checkpointer.save(int(state.step), state, dict(meta or {}, phase=phase, done=True,
                                                       train_seconds=seconds), force=True)
        checkpointer.wait()
    return FitResult(state=state, train_seconds=seconds, history=history)
