"""Batched candidate scoring: K keep-ratio vectors → K accuracies in one compiled call.

For every candidate the evaluator builds its masks from one set of importance scores, inside
the jitted graph; recalibrates BatchNorm statistics on a few calibration batches (adaptive BN,
as in EagleEye); and measures accuracy and loss on held-out validation arrays. The candidate
axis is vmapped and sharded over all devices (`jaxprune.parallel`); K need not divide the
device count (rows are padded with copies of the last one and the padding is dropped).

Two modes (see DESIGN.md, "Evaluating many candidates at once — what is fast"):

* ``'channel'``: ``scores`` are channel scores ``dict[group -> float[size]]`` and each keep
  row is ``float32[G]`` (groups order). ``masks.channel_keep`` turns a row into per-group
  channel keeps, which multiply the activations right after each group's BatchNorm
  (``apply(..., channel_masks=...)``) — equivalent to removing those channels, with ONE
  shared copy of the weights: only the small [K, size] channel masks are batched.
* ``'unstructured'``: ``scores`` are shaped like ``params``; each keep row goes to
  ``masks.from_scores`` (a scalar or a layer-wise ``float32[L]`` per candidate). Per-candidate
  weights cannot be avoided; ``chunk_size`` bounds how many exist at once.

BatchNorm recalibration. For each candidate the running statistics are replaced by the mean,
over the calibration batches, of that candidate's per-batch BatchNorm statistics (batch mean
and batch variance, computed by ``apply(train=True)``); the original running statistics are
not mixed in. This is what a long exponential moving average over those batches converges
to, without depending on the number of batches or the momentum. The per-batch statistic is
read from the model's running-stat update without knowing its momentum: the update is affine
in the old statistic, ``new = m * old + (1 - m) * batch_stat``, so running it from ``old = 0``
and from ``old = 2**20`` (vmapped: the forward pass does not depend on ``old`` and is not
repeated) gives ``m`` and hence ``batch_stat`` as the update's fixed point. Leaves that the
update leaves unchanged keep their original value. A model without BatchNorm (empty
``batch_stats``) is evaluated as is.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxprune import masks as masks_lib
from jaxprune import parallel
from jaxprune.structure import ChannelGroup

MODES = ("channel", "unstructured")
# Second point at which the running-stat update is probed (the first is 0). A large power of
# two makes the momentum estimate (new(P) - new(0)) / P exact to float32 rounding whatever the
# magnitude of the batch statistic (its error is ~eps * (1 + |stat| / P)).
_PROBE = 2.0 ** 20


def _mean_batch_stats(apply_fn: Callable, params: Any, batch_stats: Any, calib_batches: jax.Array,
                      channel_masks: Optional[Dict[str, jax.Array]]) -> Any:
    """Mean over calibration batches of the per-batch BatchNorm statistics (see module doc)."""
    if not jax.tree.leaves(batch_stats):
        return batch_stats  # no BatchNorm: nothing to recalibrate
    olds = jax.tree.map(lambda s: jnp.stack([jnp.zeros_like(s), jnp.full_like(s, _PROBE)]),
                        batch_stats)

    def batch_stat(x):
        def update(old):
            _, new = apply_fn(params, old, x, train=True, channel_masks=channel_masks)
            return new
        both = jax.vmap(update)(olds)

        def fixed_point(pair, original):
            at_zero, at_probe = pair[0], pair[1]
            one_minus_m = 1.0 - (at_probe - at_zero) / _PROBE
            updates = jnp.abs(one_minus_m) > 1e-6
            return jnp.where(updates, at_zero / jnp.where(updates, one_minus_m, 1.0), original)
        return jax.tree.map(fixed_point, both, batch_stats)

    # Per-batch stats as scan outputs (not a carry): they are small, and a carry initialised
    # from constants would not match the candidate-varying body output under shard_map.
    _, per_batch = jax.lax.scan(lambda carry, x: (carry, batch_stat(x)), None, calib_batches)
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), per_batch)


def _validation_metrics(apply_fn: Callable, params: Any, batch_stats: Any,
                        channel_masks: Optional[Dict[str, jax.Array]], val_batches: Any):
    """(accuracy, mean cross-entropy) weighted by the validation weights."""
    def body(carry, batch):
        x, y, w = batch
        logits, _ = apply_fn(params, batch_stats, x, train=False, channel_masks=channel_masks)
        logits = logits.astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return carry, (jnp.sum(w * correct), jnp.sum(w * nll))

    _, (correct, nll) = jax.lax.scan(body, None, val_batches)
    total = jnp.sum(val_batches[2])
    return jnp.sum(correct) / total, jnp.sum(nll) / total


def _batch(x: jax.Array, batch_size: int) -> jax.Array:
    return x.reshape((x.shape[0] // batch_size, batch_size) + x.shape[1:])


def _check_channel_scores(scores: Any, groups: Sequence[ChannelGroup]) -> None:
    if not isinstance(scores, dict) or set(scores) != {g.name for g in groups}:
        got = sorted(scores) if isinstance(scores, dict) else type(scores).__name__
        raise ValueError(
            "mode='channel' needs channel scores dict[group name -> float[size]] for groups "
            f"{[g.name for g in groups]}; got {got}. Reduce per-weight scores with "
            "masks.channel_scores(scores, groups).")
    for g in groups:
        if np.shape(scores[g.name]) != (g.size,):
            raise ValueError(f"Channel scores for group {g.name!r} have shape "
                             f"{np.shape(scores[g.name])}; expected ({g.size},).")


def make_evaluator(apply_fn: Callable, groups: Sequence[ChannelGroup] = (), *,
                   mode: str = "channel",
                   chunk_size: Optional[int] = None,
                   eval_batch_size: Optional[int] = None,
                   calib_batch_size: Optional[int] = None,
                   mesh: Optional[Mesh] = None,
                   scope: str = "layerwise",
                   prunable_fn: Optional[Callable] = None) -> Callable[..., Dict[str, np.ndarray]]:
    """Builds ``evaluate``: K keep-ratio vectors → accuracy and loss, in one compiled call.

    Args:
      apply_fn: ``apply(params, batch_stats, x, *, train, channel_masks=None)
        -> (logits, new_batch_stats)``, as `models.FunctionalModel.apply`.
      groups: the model's channel groups (required for ``mode='channel'``; the keep rows are
        in this order).
      mode: ``'channel'`` (activation channel masks, shared weights) or ``'unstructured'``
        (per-candidate weight masks from ``masks.from_scores``).
      chunk_size: candidates evaluated at once per device (``lax.map`` over chunks; bounds
        memory, mainly for ``'unstructured'`` on CPU). None: all of a device's candidates at
        once.
      eval_batch_size: validation examples per step (scan over steps bounds memory). None: the
        whole validation set in one step. The set is padded with zero-weight examples to a
        multiple of it.
      calib_batch_size: calibration examples per BatchNorm batch; the number of calibration
        images must be a multiple of it. None: all calibration images form one batch.
      mesh: 1-D candidate mesh; default `parallel.candidate_mesh()` (all global devices).
      scope, prunable_fn: passed to ``masks.from_scores`` in ``'unstructured'`` mode.

    Returns:
      ``evaluate(params, batch_stats, scores, keep_ratios, calib_images, val_images,
      val_labels, val_weights=None) -> {'accuracy': float32[K], 'loss': float32[K]}`` (numpy,
      identical on every process). ``scores``: channel scores (channel mode) or a tree like
      ``params`` (unstructured). ``keep_ratios``: ``float32[K, G]`` (channel) or ``[K, L]`` /
      ``[K]`` (unstructured). ``calib_images``: ``float32[N_c, *input_shape]`` or None (no
      recalibration: the given ``batch_stats`` are used). ``val_images``:
      ``float32[N_v, *input_shape]``, ``val_labels``: ``int[N_v]``, ``val_weights``:
      ``float32[N_v]`` (default ones; accuracy and loss are weighted means). It compiles once
      per (padded K, shapes, dtypes). Call it from Python, not under ``jit``: it places the
      inputs on the mesh (a no-op for inputs already placed with `parallel.replicate`) and
      gathers the results. In a multi-process job every process calls it with the same
      arguments; each computes the candidates on its own devices and all get the full [K].
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {MODES}.")
    groups = tuple(groups)
    if mode == "channel" and not groups:
        raise ValueError("mode='channel' needs the model's channel groups; got none.")
    for name, value in (("chunk_size", chunk_size), ("eval_batch_size", eval_batch_size),
                        ("calib_batch_size", calib_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}; must be None or >= 1.")
    mesh = parallel.candidate_mesh() if mesh is None else mesh
    from_scores_kwargs = dict(scope=scope, granularity="unstructured")
    if prunable_fn is not None:
        from_scores_kwargs["prunable_fn"] = prunable_fn

    def local_block(params, batch_stats, scores, keep_block, calib_images, val_images,
                    val_labels, val_weights):
        """Scores one device's candidates; everything except ``keep_block`` is replicated."""
        n_val = val_images.shape[0]
        val_bs = n_val if eval_batch_size is None else min(eval_batch_size, n_val)
        pad = -n_val % val_bs
        if pad:
            val_images = jnp.concatenate(
                [val_images, jnp.zeros((pad,) + val_images.shape[1:], val_images.dtype)])
            val_labels = jnp.concatenate([val_labels, jnp.zeros((pad,), val_labels.dtype)])
            val_weights = jnp.concatenate([val_weights, jnp.zeros((pad,), val_weights.dtype)])
        val_batches = (_batch(val_images, val_bs), _batch(val_labels, val_bs),
                       _batch(val_weights, val_bs))
        calib_batches = None
        if calib_images is not None:
            calib_bs = calib_images.shape[0] if calib_batch_size is None else calib_batch_size
            calib_batches = _batch(calib_images, calib_bs)

        def score(cand_params, channel_masks):
            stats = batch_stats
            if calib_batches is not None:
                stats = _mean_batch_stats(apply_fn, cand_params, batch_stats, calib_batches,
                                          channel_masks)
            return _validation_metrics(apply_fn, cand_params, stats, channel_masks, val_batches)

        if mode == "channel":
            keeps = jax.vmap(lambda row: masks_lib.channel_keep(scores, row, groups))(keep_block)
            xs = {name: keep.astype(jnp.float32) for name, keep in keeps.items()}
            per_candidate = lambda channel_masks: score(params, channel_masks)
        else:
            xs = keep_block

            def per_candidate(row):
                cand_masks = masks_lib.from_scores(scores, row, **from_scores_kwargs)
                return score(masks_lib.apply(params, cand_masks), None)

        if chunk_size is None:
            return jax.vmap(per_candidate)(xs)
        return jax.lax.map(per_candidate, xs, batch_size=chunk_size)

    replicated = P()
    sharded = P(parallel.CANDIDATE_AXIS)
    compiled = jax.jit(jax.shard_map(
        local_block, mesh=mesh,
        in_specs=(replicated, replicated, replicated, sharded, replicated, replicated,
                  replicated, replicated),
        out_specs=(sharded, sharded)))

    def evaluate(params, batch_stats, scores, keep_ratios, calib_images, val_images, val_labels,
                 val_weights=None) -> Dict[str, np.ndarray]:
        if not isinstance(keep_ratios, jax.Array):
            keep_ratios = np.asarray(keep_ratios, np.float32)
        if np.ndim(keep_ratios) < 1 or np.shape(keep_ratios)[0] < 1:
            raise ValueError(f"keep_ratios needs a leading candidate axis K >= 1; got shape "
                             f"{np.shape(keep_ratios)}.")
        k = np.shape(keep_ratios)[0]
        if mode == "channel":
            _check_channel_scores(scores, groups)
            if np.shape(keep_ratios) != (k, len(groups)):
                raise ValueError(f"keep_ratios has shape {np.shape(keep_ratios)}; mode='channel' "
                                 f"needs [K, G] with G={len(groups)} (groups order).")
        if np.ndim(val_labels) != 1 or np.shape(val_labels)[0] != np.shape(val_images)[0]:
            raise ValueError(f"val_labels must be int[N_v] with N_v={np.shape(val_images)[0]}; "
                             f"got shape {np.shape(val_labels)}.")
        if val_weights is None:
            val_weights = np.ones(np.shape(val_labels), np.float32)
        if np.shape(val_weights) != np.shape(val_labels):
            raise ValueError(f"val_weights shape {np.shape(val_weights)} != val_labels shape "
                             f"{np.shape(val_labels)}.")
        if calib_images is not None and calib_batch_size is not None and (
                np.shape(calib_images)[0] % calib_batch_size):
            raise ValueError(f"{np.shape(calib_images)[0]} calibration images are not a multiple "
                             f"of calib_batch_size={calib_batch_size}.")
        shared = parallel.replicate(
            (params, batch_stats, scores, calib_images, val_images, val_labels, val_weights), mesh)
        keep_block = parallel.shard_candidates(keep_ratios, mesh)
        p, bs, sc, calib, vx, vy, vw = shared
        accuracy, loss = compiled(p, bs, sc, keep_block, calib, vx, vy, vw)
        accuracy, loss = parallel.gather_candidates((accuracy, loss), k)
        return {"accuracy": accuracy.astype(np.float32), "loss": loss.astype(np.float32)}

    evaluate.mesh = mesh
    return evaluate
