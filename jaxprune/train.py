"""Training and evaluation on the device: one compiled call per chunk of steps, masks in the state.

The train state carries the masks beside the params (not hidden in the optimizer state), so a
pruned weight is zero in `params`, False in `masks`, and stays exactly zero: the optimizer
chain ends in `masks.masked_updates()`, which zeroes its update whatever momentum, Adam or
weight decay did before it.

The loop is built for accelerators whose time is scarce:
  * the whole training split lives on the device once, as uint8; a compiled `train_fn` runs a
    whole epoch (or a chunk of it, between checkpoints) as one `lax.scan`: it draws the epoch's
    permutation, gathers each batch, normalises and augments it on the device, and returns the
    per-step losses once per chunk;
  * the learning rate, the number of steps and the warm-up are arguments (a `Recipe` of
    arrays), not constants, and masks are state: the same compiled function serves the dense
    phase and every masked fine-tune of the same model;
  * `train.precision = "bf16"` computes in bfloat16 while params, optimizer state and BN
    statistics stay float32;
  * evaluation keeps its splits on the device (`EvalData`, padded to one capacity) and loops
    over a dynamic number of batches, so one compilation per model serves every split.

Randomness: the epoch permutation comes from `fold_in(perm_key, epoch)` and each step's
augmentation from `fold_in(aug_key, step)`, so a resumed run sees exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import checks
from jaxprune import data as data_lib
from jaxprune import masks as masks_lib

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam")
L1_TARGETS = ("weights", "bn")  # `l1_penalty` on prunable kernels or on BatchNorm scales
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or infinite; nothing from the bad steps was saved."""


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: Any


class Recipe(NamedTuple):
    """What changes between the phases of one model: passed as arrays, so no recompilation.

    Attributes:
      learning_rate: peak learning rate (float32 scalar).
      total_steps: steps of the whole phase, for the decay (int32 scalar).
      warmup_steps: linear warm-up from ~0 to the peak over these first steps (int32 scalar).
    """

    learning_rate: jax.Array
    total_steps: jax.Array
    warmup_steps: jax.Array


def make_recipe(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> Recipe:
    total_steps = max(int(total_steps), 1)
    return Recipe(jnp.float32(learning_rate), jnp.int32(total_steps),
                  jnp.int32(min(max(int(warmup_steps), 0), total_steps)))


def learning_rate(schedule: str, recipe: Recipe, step) -> jax.Array:
    """The learning rate at `step` (jittable; `recipe` may be traced).

    Linear warm-up over `recipe.warmup_steps`, then `cosine` (to zero at `total_steps`), `step`
    (×0.1 at 50 % and again at 75 % of the steps) or `constant`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}.")
    step = jnp.asarray(step, jnp.float32)
    total = recipe.total_steps.astype(jnp.float32)
    warm = recipe.warmup_steps.astype(jnp.float32)
    ramp = jnp.where(warm > 0, jnp.minimum((step + 1.0) / jnp.maximum(warm, 1.0), 1.0), 1.0)
    if schedule == "cosine":
        progress = jnp.clip((step - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif schedule == "step":
        decay = jnp.where(step >= jnp.floor(0.5 * total), 0.1, 1.0) * \
            jnp.where(step >= jnp.floor(0.75 * total), 0.1, 1.0)
    else:
        decay = jnp.ones(())
    return recipe.learning_rate * ramp * decay


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
    """`updates * -learning_rate`, the rate given per call: `update(..., learning_rate=lr)`."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, learning_rate, **extra):
        del params, extra
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(settings: "Settings") -> optax.GradientTransformationExtraArgs:
    """The optimizer of `settings` (`Settings.from_config` reads a config's); see `optimizer`."""
    return optimizer(settings.optimizer, weight_decay=settings.weight_decay,
                     momentum=settings.momentum)


def optimizer(name: str = "sgd", *, weight_decay: float = 5e-4,
              momentum: float = 0.9) -> optax.GradientTransformationExtraArgs:
    """`tx.update(grads, opt_state, params, masks=..., learning_rate=...)`.

    `sgd`: weight decay added to the gradient, Nesterov momentum (as `optax.sgd`); `adam`:
    AdamW. The learning rate is an argument, not part of the chain, so one compiled step serves
    phases with different rates and lengths. The chain ends in the mask transform: pruned
    weights get exactly zero update.
    """
    if name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(float(weight_decay)),
                         optax.trace(decay=float(momentum), nesterov=True))
    elif name == "adam":
        tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(float(weight_decay)))
    else:
        raise ValueError(f"train.optimizer={name!r}: use one of {', '.join(OPTIMIZERS)}.")
    return optax.chain(tx, scale_by_learning_rate_arg(), masks_lib.masked_updates())


def create_state(params, batch_stats, masks, tx) -> TrainState:
    """A fresh train state; params are masked once so pruned weights start at exactly zero.

    Every leaf is a fresh buffer: the train functions donate their state, and the caller's
    params, batch stats and masks must survive that.
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
            raise ValueError(f"train.l1_target={target!r}: use one of {', '.join(L1_TARGETS)}.")
        if hit:
            total = total + jnp.sum(jnp.abs(leaf))
    return total


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-example cross entropy in float32, optionally with label smoothing."""
    logits = logits.astype(jnp.float32)
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def compute_dtype(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: use one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


def mixed_apply(apply_fn: Callable, precision: str) -> Callable:
    """`apply_fn` computing in `precision`; float32 logits and BN statistics come back.

    Params are cast inside (their gradients stay float32); batch statistics are passed and
    returned in float32, so running averages accumulate at full precision.
    """
    dtype = compute_dtype(precision)
    if dtype == jnp.float32:
        return apply_fn

    def apply(params, batch_stats, x, **kwargs):
        x = x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # not token ids
        logits, new_stats = apply_fn(_cast_floats(params, dtype), batch_stats, x, **kwargs)
        return logits.astype(jnp.float32), _cast_floats(new_stats, jnp.float32)

    return apply


def make_train_step(apply_fn: Callable, tx, *, schedule: str, mean, std, augment: bool,
                    precision: str = "fp32", label_smoothing: float = 0.0, l1: float = 0.0,
                    l1_target: str = "weights", unprunable=(), mask_update_fn=None):
    """The pure, un-jitted step `step(state, images_u8, labels, key, recipe) -> (state, metrics)`.

    `images_u8` is one batch; it is normalised (and augmented) here. `mask_update_fn(step,
    params, masks) -> masks`, if given, runs first (gradual / iterative pruning); params are
    re-masked with the new masks so newly pruned weights are exactly 0.
    """
    mean, std = data_lib.pixel_stats(mean, std)
    forward = mixed_apply(apply_fn, precision)
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}.")

    def loss_fn(params, batch_stats, x, y):
        logits, new_batch_stats = forward(params, batch_stats, x, train=True)
        loss = jnp.mean(cross_entropy(logits, y, label_smoothing))
        total = loss + (l1 * l1_penalty(params, l1_target, unprunable) if l1 > 0 else 0.0)
        return total, (loss, logits, new_batch_stats)

    def step(state: TrainState, images, labels, key, recipe: Recipe):
        masks, params = state.masks, state.params
        if mask_update_fn is not None:
            masks = mask_update_fn(state.step, params, masks)
            params = masks_lib.apply(params, masks)
        x = data_lib.normalize(images, mean, std)
        if augment:
            x = data_lib.augment(key, x)
        grads, (loss, logits, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(
            params, state.batch_stats, x, labels)
        lr = learning_rate(schedule, recipe, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, params, masks=masks,
                                       learning_rate=lr)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                               opt_state=opt_state, masks=masks)
        return new_state, {"loss": loss, "accuracy": accuracy, "learning_rate": lr}

    return step


def epoch_order(perm_key, epoch, num: int, batch_size: int) -> jax.Array:
    """The epoch's batches of example indices, int32 [num // batch_size, batch_size] (jittable)."""
    perm = jax.random.permutation(jax.random.fold_in(perm_key, epoch), num)
    steps = num // batch_size
    return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def _indexed_step(step: Callable):
    """`step` on the batch `order[state.step - epoch_start]`, augmented with `fold_in(aug_key, step)`."""

    def run(state, images, labels, order, aug_key, recipe, epoch_start):
        idx = order[state.step - epoch_start]
        return step(state, images[idx], labels[idx], jax.random.fold_in(aug_key, state.step), recipe)

    return run


class TrainFn:
    """`train_fn(state, images, labels, perm_key, aug_key, recipe, start, num_steps) -> (state,
    metrics)`: runs `num_steps` steps from global step `start` (all inside one epoch) on the
    device-resident training split; metrics are per step (`loss`, `accuracy`,
    `learning_rate`: float32[num_steps]). The state is donated.

    Two executions of the same step, with the same batches and keys:
      * `scan` (accelerators): one compiled call per chunk; it draws the epoch's permutation and
        `lax.scan`s over the batches. Each distinct chunk length compiles once.
      * `steps` (CPU): the chunk is dispatched step by step without any host sync or host data
        (the batch index is read on the device from `state.step`). XLA:CPU runs a convolution's
        gradient 3-4× slower inside a while loop than outside one (measured on LeNet-5 and
        ResNet-20 here), so a scanned epoch would lose on a CPU what it wins on a GPU.
    """

    def __init__(self, step: Callable, *, batch_size: int, mode: Optional[str] = None):
        mode = mode or ("steps" if jax.default_backend() == "cpu" else "scan")
        if mode not in ("scan", "steps"):
            raise ValueError(f"train mode {mode!r}: use 'scan' or 'steps'.")
        self.mode = mode
        self.batch_size = int(batch_size)
        indexed = _indexed_step(step)
        if mode == "scan":
            def chunk(state, images, labels, perm_key, aug_key, recipe, start, num_steps):
                steps_per_epoch = images.shape[0] // self.batch_size
                epoch = jnp.asarray(start, jnp.int32) // steps_per_epoch
                order = epoch_order(perm_key, epoch, images.shape[0], self.batch_size)
                epoch_start = epoch * steps_per_epoch

                def body(state, _):
                    return indexed(state, images, labels, order, aug_key, recipe, epoch_start)

                return jax.lax.scan(body, state, None, length=num_steps)

            self._compiled = jax.jit(chunk, donate_argnums=(0,), static_argnames=("num_steps",))
        else:
            self._compiled = jax.jit(indexed, donate_argnums=(0,))
            self._order = jax.jit(epoch_order, static_argnums=(2, 3))

    def __call__(self, state, images, labels, perm_key, aug_key, recipe, start, num_steps: int):
        if int(state.step) != int(start):
            raise ValueError(f"the state is at step {int(state.step)}, not at start={start}.")
        if self.mode == "scan":
            return self._compiled(state, images, labels, perm_key, aug_key, recipe, start,
                                  num_steps=num_steps)
        steps_per_epoch = images.shape[0] // self.batch_size
        epoch = int(start) // steps_per_epoch
        order = self._order(perm_key, epoch, images.shape[0], self.batch_size)
        epoch_start = jnp.int32(epoch * steps_per_epoch)
        history = []
        for _ in range(num_steps):
            state, metrics = self._compiled(state, images, labels, order, aug_key, recipe,
                                            epoch_start)
            history.append(metrics)
        return state, jax.tree.map(lambda *m: jnp.stack(m), *history)

    def _cache_size(self) -> int:
        """Compilations of the training step (for tests: one per model, whatever the phase)."""
        return self._compiled._cache_size()


def make_train_fn(step: Callable, *, batch_size: int, mode: Optional[str] = None) -> TrainFn:
    """Compiles `step` (from `make_train_step`) into a `TrainFn`; `mode` None picks `steps` on a
    CPU and `scan` on an accelerator."""
    return TrainFn(step, batch_size=batch_size, mode=mode)


# ----------------------------------------------------------------------------------------------
# Evaluation


class EvalData(NamedTuple):
    """One split on the device, padded to whole batches (and to a shared capacity).

    `weights` is 1 for real examples and 0 for padding; `num_batches` (a Python int) says how
    many batches hold real examples, so a split padded to a larger capacity costs no more.
    """

    images: jax.Array
    labels: jax.Array
    weights: jax.Array
    num_batches: int


def device_eval_data(images, labels, batch_size: int, capacity: Optional[int] = None) -> EvalData:
    """Pads a split to whole batches (at least `capacity` examples) and puts it on the device once.

    Splits given the same capacity share one compiled evaluation.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    n = images.shape[0]
    num_batches = max(math.ceil(n / batch_size), 1)
    padded = max(num_batches * batch_size, math.ceil((capacity or 0) / batch_size) * batch_size)
    weights = np.zeros((padded,), np.float32)
    weights[:n] = 1.0
    if padded != n:
        images = np.concatenate([images, np.zeros((padded - n,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros((padded - n,), labels.dtype)])
    return EvalData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(weights), num_batches)


def make_eval_fn(apply_fn: Callable, *, mean, std, batch_size: int, precision: str = "fp32"):
    """Returns `evaluate(params, batch_stats, data) -> {"accuracy", "loss"}` (exact, floats).

    `data` is an `EvalData` (preferred: already on the device) or an `(images, labels)` pair of
    host arrays, which is padded and uploaded on each call. Compiled once per data capacity;
    the loop runs over `data.num_batches` batches only.
    """
    mean, std = data_lib.pixel_stats(mean, std)
    forward = mixed_apply(apply_fn, precision)

    @jax.jit
    def _eval(params, batch_stats, images, labels, weights, num_batches):
        def body(i, carry):
            x = jax.lax.dynamic_slice_in_dim(images, i * batch_size, batch_size)
            y = jax.lax.dynamic_slice_in_dim(labels, i * batch_size, batch_size)
            w = jax.lax.dynamic_slice_in_dim(weights, i * batch_size, batch_size)
            logits, _ = forward(params, batch_stats, data_lib.normalize(x, mean, std), train=False)
            correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
            loss = jnp.sum(cross_entropy(logits, y) * w)
            return carry[0] + correct, carry[1] + loss

        correct, loss = jax.lax.fori_loop(0, num_batches, body, (jnp.zeros(()), jnp.zeros(())))
        total = jnp.maximum(jnp.sum(weights), 1.0)
        return {"accuracy": correct / total, "loss": loss / total}

    def evaluate(params, batch_stats, data, labels=None):
        if labels is not None:  # (params, batch_stats, images, labels)
            data = (data, labels)
        if not isinstance(data, EvalData):
            data = device_eval_data(*data, batch_size)
        out = _eval(params, batch_stats, data.images, data.labels, data.weights,
                    jnp.int32(data.num_batches))
        return {k: float(v) for k, v in jax.device_get(out).items()}

    evaluate.compiled = _eval  # for tests that count compilations
    return evaluate


# ----------------------------------------------------------------------------------------------
# The loop around the compiled chunks


class FitResult(NamedTuple):
    state: TrainState
    train_seconds: float
    history: list


def chunk_bounds(start: int, total_steps: int, steps_per_epoch: int, checkpoint_every: int):
    """[(begin, end)) step ranges from `start`: each within one epoch, cut at checkpoint steps."""
    bounds = []
    step = start
    while step < total_steps:
        end = min((step // steps_per_epoch + 1) * steps_per_epoch, total_steps)
        if checkpoint_every and checkpoint_every > 0:
            end = min(end, (step // checkpoint_every + 1) * checkpoint_every)
        bounds.append((step, end))
        step = end
    return bounds


def is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars there; plain lines in a log file)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fit(state: TrainState, train_fn, *, images, labels, epochs: int, batch_size: int, key,
        recipe: Recipe, evaluate: Optional[Callable] = None, val=None,
        checkpointer=None, checkpoint_every: int = 0, meta: Optional[dict] = None,
        writer=None, phase: str = "train", seconds_so_far: float = 0.0,
        progress: bool = True, bars: Optional[bool] = None,
        stop_at_step: Optional[int] = None) -> FitResult:
    """Runs `epochs` epochs of `train_fn` (from `make_train_fn`) from `state.step` on.

    `images`/`labels` are the training split (put on the device once here if they are host
    arrays; pass device arrays to share them between phases). After every epoch, `evaluate(params,
    batch_stats, val)` if given. Saves through `checkpointer` every `checkpoint_every` steps and
    at the end. `progress` prints a line per epoch; `bars` draws a progress bar (None: only when
    stderr is a terminal, so a log file gets plain lines). `stop_at_step` ends early without the
    final save (as a kill would).

    Raises:
      NonFiniteError: a training loss became NaN/inf; the state of that chunk is not saved.
    """
    num = int(images.shape[0])
    steps_per_epoch = num // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {num} training examples; "
                         "lower --config.train.batch_size.")
    total_steps = epochs * steps_per_epoch
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    start = int(state.step)
    history = []
    seconds = float(seconds_so_far)
    perm_key, aug_key = jax.random.split(key)
    bar = None
    if progress and (is_terminal() if bars is None else bars):
        from tqdm.auto import tqdm  # only on a terminal: a log file gets plain lines
        bar = tqdm(total=total_steps, initial=start, desc=phase, unit="step", leave=False,
                   dynamic_ncols=True)
    sums, seen, t_epoch = {"loss": 0.0, "accuracy": 0.0}, 0, 0.0
    for begin, end in chunk_bounds(start, total_steps, steps_per_epoch, checkpoint_every):
        if stop_at_step is not None and begin >= stop_at_step:
            break
        t0 = time.perf_counter()
        state, metrics = train_fn(state, images, labels, perm_key, aug_key, recipe, begin,
                                  num_steps=end - begin)
        metrics = jax.device_get(metrics)  # one host sync per chunk
        elapsed = time.perf_counter() - t0
        bad = np.flatnonzero(~np.isfinite(metrics["loss"]))
        if bad.size:
            raise NonFiniteError(
                f"[{phase}] the training loss became {metrics['loss'][bad[0]]} at step "
                f"{begin + int(bad[0]) + 1} (learning rate {float(metrics['learning_rate'][bad[0]]):.3g}); "
                "the learning rate is the likely cause: lower --config.train.learning_rate (or "
                "finetune.learning_rate), or add warm-up. Nothing from these steps was saved; the "
                "last good checkpoint is kept.")
        seconds += elapsed
        t_epoch += elapsed
        sums["loss"] += float(np.sum(metrics["loss"]))
        sums["accuracy"] += float(np.sum(metrics["accuracy"]))
        seen += end - begin
        if bar is not None:
            bar.update(end - begin)
            bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.3f}",
                            img_s=f"{(end - begin) * batch_size / max(elapsed, 1e-9):.0f}")
        if checkpointer is not None and checkpoint_every and end % checkpoint_every == 0 \
                and end < total_steps:
            checkpointer.save(end, state, dict(meta or {}, phase=phase, done=False,
                                               train_seconds=seconds))
        if end % steps_per_epoch == 0 or end == total_steps:
            epoch = -(-end // steps_per_epoch)
            record = {"phase": phase, "epoch": epoch, "step": end,
                      "train_loss": sums["loss"] / max(seen, 1),
                      "train_accuracy": sums["accuracy"] / max(seen, 1),
                      "learning_rate": float(metrics["learning_rate"][-1]),
                      "images_per_second": seen * batch_size / max(t_epoch, 1e-9),
                      "train_seconds": seconds}
            if evaluate is not None and val is not None:
                ev = evaluate(state.params, state.batch_stats, val)
                record.update(val_accuracy=ev["accuracy"], val_loss=ev["loss"])
            history.append(record)
            if writer is not None:
                writer.write(end, record)
            if progress:
                line = (f"[{phase}] epoch {epoch}/{epochs}: loss {record['train_loss']:.4f}, "
                        f"train acc {record['train_accuracy']:.4f}")
                if "val_accuracy" in record:
                    line += f", val acc {record['val_accuracy']:.4f}"
                line += f", {record['images_per_second']:.0f} img/s, {seconds:.1f} s"
                bar.write(line) if bar is not None else print(line, flush=True)
            sums, seen, t_epoch = {"loss": 0.0, "accuracy": 0.0}, 0, 0.0
    if bar is not None:
        bar.close()
    if checkpointer is not None and (stop_at_step is None or int(state.step) >= total_steps):
        checkpointer.save(int(state.step), state, dict(meta or {}, phase=phase, done=True,
                                                       train_seconds=seconds), force=True)
        checkpointer.wait()
    return FitResult(state=state, train_seconds=seconds, history=history)


class Settings(NamedTuple):
    """How a model is trained, one set for the library (`pruner.train_model`,
    `Pruner.finetune`) and the pipeline (`train.*` of a config): the optimizer and its
    schedule, the batch and the step's options. The peak rate, the length and the warm-up are
    per call (`train`), so one compiled program serves every phase of a model."""
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    batch_size: int = 128
    augment: bool = False
    precision: str = "fp32"
    label_smoothing: float = 0.0
    l1: float = 0.0
    l1_target: str = "weights"

    @classmethod
    def from_config(cls, config) -> "Settings":
        """The settings of a pipeline config (`train.*`, `data.augment`)."""
        t = config.train
        return cls(optimizer=str(t.optimizer), weight_decay=float(t.weight_decay),
                   momentum=float(t.momentum), schedule=str(t.schedule),
                   batch_size=int(t.batch_size), augment=bool(config.data.augment),
                   precision=str(t.precision), label_smoothing=float(t.label_smoothing),
                   l1=float(t.l1), l1_target=str(t.l1_target))


# The checks of the `train.*` keys (`Settings.from_config` reads most; the rest are the
# arguments of `train`, `make_eval_fn` and `enable_compile_cache` that the pipeline passes) and of
# `finetune.*` (the same `train` arguments for the fine-tunes: pipeline.finetune_phase).
CONFIG_CHECKS = {
    "train.optimizer": checks.choice(OPTIMIZERS),
    "train.schedule": checks.choice(SCHEDULES),
    "train.l1_target": checks.choice(L1_TARGETS),
    "train.precision": checks.choice(PRECISIONS),
    "train.epochs": checks.integer(1),
    "train.batch_size": checks.integer(1),
    "train.eval_batch_size": checks.integer(1),
    "train.learning_rate": checks.positive_number,
    "train.momentum": checks.number(0, 1, high_open=True),
    "train.weight_decay": checks.non_negative_number,
    "train.l1": checks.non_negative_number,
    "train.checkpoint_every": checks.integer(0),  # 0: only at the end of each phase
    "train.warmup_epochs": checks.non_negative_number,
    "train.label_smoothing": checks.number(0, 1, high_open=True),
    "train.compile_cache_dir": checks.optional_str,
    "finetune.epochs": checks.integer(0),
    "finetune.learning_rate": checks.positive_number,
    "finetune.warmup_epochs": checks.non_negative_number,
}


class Trainer(NamedTuple):
    """A model's compiled training program under `settings`: the optimizer and the `TrainFn`
    (masks are state, rate and length arguments: the dense phase and every fine-tune share it)."""
    settings: Settings
    tx: Any
    train_fn: TrainFn


def make_trainer(apply_fn: Callable, settings: Settings, *, mean, std, unprunable=(),
                 mask_update_fn=None) -> Trainer:
    """The `Trainer` of `apply_fn`: `make_optimizer` / `make_train_step` / `make_train_fn` with
    `settings`; inputs are normalised with `mean` / `std` inside the step."""
    s = settings
    tx = make_optimizer(s)
    step = make_train_step(apply_fn, tx, schedule=s.schedule, mean=mean, std=std,
                           augment=s.augment, precision=s.precision,
                           label_smoothing=s.label_smoothing, l1=s.l1, l1_target=s.l1_target,
                           unprunable=unprunable, mask_update_fn=mask_update_fn)
    return Trainer(s, tx, make_train_fn(step, batch_size=s.batch_size))


def train(trainer: Trainer, params, batch_stats, masks, images, labels, *, epochs: int,
          learning_rate: float, key, warmup_epochs: float = 0.0, checkpointer=None,
          phase: str = "train", progress: bool = False, log: Optional[Callable] = None,
          **fit_kwargs) -> FitResult:
    """THE training of a (masked) model, for the library and the pipeline alike: `epochs` epochs
    of `trainer` from fresh state at `params` under `masks` (pruned weights start and stay 0),
    peak `learning_rate` with `warmup_epochs` of linear warm-up, data order from `key`.

    With a `checkpointer` holding a step, training resumes from it (a finished phase is
    restored, not redone; `log` is told which). `fit_kwargs` go to `fit` (evaluate / val,
    checkpoint_every, writer, bars). `train_seconds` counts the restored phase's time too."""
    batch_size = trainer.settings.batch_size
    steps_per_epoch = int(np.shape(images)[0]) // batch_size  # 0: `fit` says what to change
    recipe = make_recipe(learning_rate, int(epochs) * steps_per_epoch,
                         round(float(warmup_epochs) * steps_per_epoch))
    state = create_state(params, batch_stats if batch_stats is not None else {}, masks,
                         trainer.tx)
    seconds = 0.0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(like=state, fallback=True)
        seconds = float(meta.get("train_seconds", 0.0))
        if meta.get("done"):
            if log is not None:
                log(f"[{phase}] finished earlier (step {int(state.step)}); restored from checkpoint.")
            return FitResult(state=state, train_seconds=seconds, history=[])
        if log is not None:
            log(f"[{phase}] resuming from step {int(state.step)}.")
    return fit(state, trainer.train_fn, images=images, labels=labels, epochs=int(epochs),
               batch_size=batch_size, key=key, recipe=recipe, checkpointer=checkpointer,
               phase=phase, seconds_so_far=seconds, progress=progress, **fit_kwargs)


def enable_compile_cache(directory: Optional[str]) -> None:
    """JAX's persistent compilation cache in `directory` (None: leave it off).

    A rerun, or the next config on the same machine, loads compiled programs instead of
    compiling them again (worth most on an accelerator, where compiling a ResNet step takes
    tens of seconds)."""
    if not directory:
        return
    import os

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
