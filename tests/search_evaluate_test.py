"""Tests for jaxprune.search.evaluate: batched, sharded candidate scoring with adaptive BN.

A tiny hand-written conv net (two conv+BN groups, mean-pool, dense) stands in for the model
zoo; the real 'lenet5' (no BatchNorm) and a tiny-width 'resnet20' (Flax BatchNorm) are used
as well when `jaxprune.models` is importable.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks, parallel
from jaxprune.search import evaluate as evaluate_lib
from jaxprune.structure import ChannelGroup

MOMENTUM = 0.9
EPS = 1e-5
NUM_CLASSES = 3
INPUT_SHAPE = (8, 8, 1)
CONVS = (("conv1", "bn1", 1, 4), ("conv2", "bn2", 4, 6))

GROUPS = (
    ChannelGroup("conv1", 4, producers=(("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias")),
                 consumers=((("conv2", "kernel"), 1),), stats=(("bn1", "mean"), ("bn1", "var"))),
    ChannelGroup("conv2", 6, producers=(("conv2", "kernel"), ("bn2", "scale"), ("bn2", "bias")),
                 consumers=((("dense", "kernel"), 1),), stats=(("bn2", "mean"), ("bn2", "var"))),
)


def _bcast(v):
    return v[None, None, None, :]


def tiny_apply(params, batch_stats, x, *, train, channel_masks=None):
    """Stand-in for FunctionalModel.apply: conv → BN → channel mask → relu, ×2; pool; dense."""
    h = x
    new_stats = {}
    for conv, bn, _, _ in CONVS:
        h = jax.lax.conv_general_dilated(h, params[conv]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if train:
            mean, var = jnp.mean(h, axis=(0, 1, 2)), jnp.var(h, axis=(0, 1, 2))
            old = batch_stats[bn]
            new_stats[bn] = {"mean": MOMENTUM * old["mean"] + (1 - MOMENTUM) * mean,
                             "var": MOMENTUM * old["var"] + (1 - MOMENTUM) * var}
        else:
            mean, var = batch_stats[bn]["mean"], batch_stats[bn]["var"]
            new_stats[bn] = batch_stats[bn]
        h = (h - _bcast(mean)) * _bcast(jax.lax.rsqrt(var + EPS))
        h = h * _bcast(params[bn]["scale"]) + _bcast(params[bn]["bias"])
        if channel_masks is not None:
            h = h * _bcast(channel_masks[conv])
        h = jax.nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params["dense"]["kernel"] + params["dense"]["bias"][None, :], new_stats


def tiny_model(seed):
    """Params and batch stats of the stand-in net (numpy RNG: eager jax.random is slow here)."""
    rng = np.random.default_rng(seed)
    params, stats = {}, {}
    for conv, bn, cin, cout in CONVS:
        params[conv] = {"kernel": 0.5 * rng.standard_normal((3, 3, cin, cout), np.float32)}
        params[bn] = {"scale": 1.0 + 0.3 * rng.standard_normal((cout,), np.float32),
                      "bias": 0.3 * rng.standard_normal((cout,), np.float32)}
        stats[bn] = {"mean": np.zeros((cout,), np.float32), "var": np.ones((cout,), np.float32)}
    params["dense"] = {"kernel": rng.standard_normal((6, NUM_CLASSES), np.float32),
                       "bias": np.zeros((NUM_CLASSES,), np.float32)}
    return jax.tree.map(jnp.asarray, (params, stats))


def make_data(seed, n_calib=8, n_val=14):
    """(calib images, val images, val labels, val weights)."""
    rng = np.random.default_rng(seed)
    calib = rng.standard_normal((n_calib,) + INPUT_SHAPE, np.float32)
    val_x = rng.standard_normal((n_val,) + INPUT_SHAPE, np.float32)
    val_y = rng.integers(0, NUM_CLASSES, (n_val,)).astype(np.int32)
    val_w = rng.uniform(0.5, 1.5, (n_val,)).astype(np.float32)
    return jax.tree.map(jnp.asarray, (calib, val_x, val_y, val_w))


def random_keep(seed, k, num_groups, minval=0.2):
    """float32[k, num_groups] keep ratios in [minval, 1)."""
    return np.random.default_rng(seed).uniform(minval, 1.0, (k, num_groups)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# reference: plain Python, one candidate at a time, momentum known
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 4))
def reference_recalibrate(apply_fn, params, batch_stats, calib, calib_bs, momentum=MOMENTUM):
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    per_batch = []
    for i in range(0, calib.shape[0], calib_bs):
        _, new = apply_fn(params, zeros, calib[i:i + calib_bs], train=True)
        per_batch.append(jax.tree.map(lambda s: s / (1 - momentum), new))
    return jax.tree.map(lambda *s: sum(s) / len(s), *per_batch)


def reference_metrics(apply_fn, params, batch_stats, val_x, val_y, val_w):
    return tuple(float(v) for v in _reference_metrics(apply_fn, params, batch_stats, val_x,
                                                      val_y, val_w))


@functools.partial(jax.jit, static_argnums=0)
def _reference_metrics(apply_fn, params, batch_stats, val_x, val_y, val_w):
    logits, _ = apply_fn(params, batch_stats, val_x, train=False)
    log_probs = jax.nn.log_softmax(logits)
    nll = -log_probs[jnp.arange(val_y.shape[0]), val_y]
    correct = (jnp.argmax(logits, -1) == val_y).astype(jnp.float32)
    return jnp.sum(val_w * correct) / jnp.sum(val_w), jnp.sum(val_w * nll) / jnp.sum(val_w)


@pytest.fixture(scope="module")
def setup():
    params, stats = tiny_model(0)
    data = make_data(1)
    scores = masks.channel_scores(jax.tree.map(jnp.abs, params), GROUPS)
    keep = random_keep(2, 5, len(GROUPS))
    return params, stats, scores, keep, data


def _evaluator(mesh=None, **kwargs):
    kwargs.setdefault("eval_batch_size", 4)
    kwargs.setdefault("calib_batch_size", 4)
    return evaluate_lib.make_evaluator(tiny_apply, GROUPS, mesh=mesh, **kwargs)


def test_channel_mode_equals_weight_masked_model_in_a_python_loop(setup):
    params, stats, scores, keep, (calib, val_x, val_y, val_w) = setup
    out = _evaluator()(params, stats, scores, keep, calib, val_x, val_y, val_w)
    assert out["accuracy"].shape == out["loss"].shape == (5,)
    assert out["accuracy"].dtype == out["loss"].dtype == np.float32
    for i in range(keep.shape[0]):
        channel_keep = masks.channel_keep(scores, keep[i], GROUPS)
        pruned = masks.apply(params, masks.channel_masks(channel_keep, GROUPS, params))
        recal = reference_recalibrate(tiny_apply, pruned, stats, calib, 4)
        acc, loss = reference_metrics(tiny_apply, pruned, recal, val_x, val_y, val_w)
        np.testing.assert_allclose(out["accuracy"][i], acc, atol=1e-6, err_msg=f"candidate {i}")
        np.testing.assert_allclose(out["loss"][i], loss, rtol=1e-4, err_msg=f"candidate {i}")
    assert len(set(np.round(out["loss"], 5))) > 1, "candidates should differ"


def test_all_ones_keep_gives_dense_model_with_recalibrated_stats(setup):
    params, stats, scores, _, (calib, val_x, val_y, val_w) = setup
    out = _evaluator()(params, stats, scores, np.ones((2, len(GROUPS)), np.float32), calib,
                       val_x, val_y, val_w)
    recal = reference_recalibrate(tiny_apply, params, stats, calib, 4)
    acc, loss = reference_metrics(tiny_apply, params, recal, val_x, val_y, val_w)
    np.testing.assert_allclose(out["accuracy"], [acc, acc], atol=1e-6)
    np.testing.assert_allclose(out["loss"], [loss, loss], rtol=1e-4)


def test_recalibration_does_not_depend_on_momentum(setup):
    params, stats, scores, _, (calib, val_x, val_y, val_w) = setup

    def apply_momentum_099(p, s, x, *, train, channel_masks=None):
        logits, new = tiny_apply(p, s, x, train=train, channel_masks=channel_masks)
        if not train:
            return logits, new
        # Re-weight the update as if momentum were 0.99 instead of 0.9.
        return logits, jax.tree.map(lambda n, o: 0.99 * o + 0.01 * (n - MOMENTUM * o) / 0.1,
                                    new, s)

    keep = np.ones((1, len(GROUPS)), np.float32)
    a = _evaluator()(params, stats, scores, keep, calib, val_x, val_y, val_w)
    b = evaluate_lib.make_evaluator(apply_momentum_099, GROUPS, eval_batch_size=4,
                                    calib_batch_size=4)(params, stats, scores, keep, calib,
                                                        val_x, val_y, val_w)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


def test_recalibration_is_accurate_for_large_activations(setup):
    params, stats, scores, keep, (calib, val_x, val_y, val_w) = setup
    calib, val_x = 300.0 * calib, 300.0 * val_x  # BN variances ~1e5
    out = _evaluator()(params, stats, scores, keep[:1], calib, val_x, val_y, val_w)
    channel_keep = masks.channel_keep(scores, keep[0], GROUPS)
    pruned = masks.apply(params, masks.channel_masks(channel_keep, GROUPS, params))
    recal = reference_recalibrate(tiny_apply, pruned, stats, calib, 4)
    assert float(jnp.max(recal["bn1"]["var"])) > 1e4
    acc, loss = reference_metrics(tiny_apply, pruned, recal, val_x, val_y, val_w)
    np.testing.assert_allclose(out["accuracy"], [acc], atol=1e-6)
    np.testing.assert_allclose(out["loss"], [loss], rtol=1e-4)


def test_without_calibration_uses_given_batch_stats(setup):
    params, stats, scores, _, (_, val_x, val_y, val_w) = setup
    out = _evaluator()(params, stats, scores, np.ones((1, len(GROUPS)), np.float32), None,
                       val_x, val_y, val_w)
    acc, loss = reference_metrics(tiny_apply, params, stats, val_x, val_y, val_w)
    np.testing.assert_allclose(out["accuracy"], [acc], atol=1e-6)
    np.testing.assert_allclose(out["loss"], [loss], rtol=1e-4)


@pytest.mark.parametrize("k", [5, 8])
def test_eight_devices_equal_one_device(setup, k):
    params, stats, scores, _, (calib, val_x, val_y, val_w) = setup
    keep = random_keep(10 + k, k, len(GROUPS))
    eight = _evaluator()
    one = _evaluator(mesh=parallel.candidate_mesh(jax.devices()[:1]))
    assert eight.mesh.devices.size == 8 and one.mesh.devices.size == 1
    a = eight(params, stats, scores, keep, calib, val_x, val_y, val_w)
    b = one(params, stats, scores, keep, calib, val_x, val_y, val_w)
    assert a["accuracy"].shape == (k,)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-6)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_chunked_equals_unchunked(setup):
    params, stats, scores, keep, (calib, val_x, val_y, val_w) = setup
    one = parallel.candidate_mesh(jax.devices()[:1])
    a = _evaluator(mesh=one)(params, stats, scores, keep, calib, val_x, val_y, val_w)
    b = _evaluator(mesh=one, chunk_size=2)(params, stats, scores, keep, calib, val_x, val_y,
                                           val_w)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_compiles_once_across_calls(setup):
    params, stats, scores, _, (calib, val_x, val_y, val_w) = setup
    calls = []

    def counting_apply(*args, **kwargs):
        calls.append(1)
        return tiny_apply(*args, **kwargs)

    # Per trace, apply is called once for calibration and once for validation.
    traced_apply = chex.assert_max_traces(counting_apply, n=2)
    evaluate = evaluate_lib.make_evaluator(traced_apply, GROUPS, eval_batch_size=4,
                                           calib_batch_size=4)
    for seed in range(3):
        keep = random_keep(20 + seed, 5, len(GROUPS))
        evaluate(params, stats, scores, keep, calib, val_x, val_y, val_w)
    # K=7 pads to the same 8 rows: still no retrace.
    evaluate(params, stats, scores, np.full((7, len(GROUPS)), 0.5, np.float32), calib, val_x,
             val_y, val_w)
    assert len(calls) == 2


def test_unstructured_mode_equals_python_loop(setup):
    params, stats, _, _, (calib, val_x, val_y, val_w) = setup
    scores = jax.tree.map(jnp.abs, params)
    num_layers = len(masks.prunable_paths(params))
    keep = random_keep(3, 3, num_layers, minval=0.3)
    evaluate = _evaluator(mode="unstructured", chunk_size=2,
                          mesh=parallel.candidate_mesh(jax.devices()[:2]))
    out = evaluate(params, stats, scores, keep, calib, val_x, val_y, val_w)
    for i in range(3):
        pruned = masks.apply(params, masks.from_scores(scores, keep[i]))
        recal = reference_recalibrate(tiny_apply, pruned, stats, calib, 4)
        acc, loss = reference_metrics(tiny_apply, pruned, recal, val_x, val_y, val_w)
        np.testing.assert_allclose(out["accuracy"][i], acc, atol=1e-6, err_msg=f"candidate {i}")
        np.testing.assert_allclose(out["loss"][i], loss, rtol=1e-4, err_msg=f"candidate {i}")


def test_rejects_bad_inputs(setup):
    params, stats, scores, keep, (calib, val_x, val_y, val_w) = setup
    evaluate = _evaluator()
    with pytest.raises(ValueError, match="channel scores"):
        evaluate(params, stats, params, keep, calib, val_x, val_y, val_w)
    with pytest.raises(ValueError, match=r"\[K, G\]"):
        evaluate(params, stats, scores, keep[:, :1], calib, val_x, val_y, val_w)
    with pytest.raises(ValueError, match="calib_batch_size"):
        evaluate(params, stats, scores, keep, calib[:6], val_x, val_y, val_w)
    with pytest.raises(ValueError, match="mode="):
        evaluate_lib.make_evaluator(tiny_apply, GROUPS, mode="nm")


def _hookless(model):
    """A zoo model's apply with activation masks inserted into its program, and its groups
    (`discover`: the zoo has no mask hook)."""
    from jaxprune import discover
    found = discover.discover_groups(
        lambda v, x: model.apply(v["params"], v["batch_stats"], x, train=False)[0],
        {"params": model.params, "batch_stats": model.batch_stats},
        jax.ShapeDtypeStruct((1,) + model.spec.input_shape, jnp.float32))
    return discover.hookless_apply(model.apply), found.channel_groups()


def _lenet5():
    models = pytest.importorskip("jaxprune.models", reason="jaxprune.models not written yet")
    if not hasattr(models, "get_model"):
        pytest.skip("jaxprune.models has no get_model yet")
    return models.get_model("lenet5", num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE,
                            key=jax.random.key(4))


def test_lenet5_activation_masks_equal_weight_masks():
    model = _lenet5()
    calib, val_x, val_y, val_w = make_data(5, n_calib=8, n_val=8)
    masked_apply, groups = _hookless(model)
    scores = masks.channel_scores(jax.tree.map(jnp.abs, model.params), groups)
    keep = random_keep(6, 3, len(groups), minval=0.3)
    evaluate = evaluate_lib.make_evaluator(masked_apply, groups, eval_batch_size=4,
                                           calib_batch_size=4)
    out = evaluate(model.params, model.batch_stats, scores, keep, calib, val_x, val_y, val_w)
    has_stats = bool(jax.tree.leaves(model.batch_stats))
    for i in range(3):
        channel_keep = masks.channel_keep(scores, keep[i], groups)
        pruned = masks.apply(model.params,
                             masks.channel_masks(channel_keep, groups, model.params))
        stats = (reference_recalibrate(model.apply, pruned, model.batch_stats, calib, 4)
                 if has_stats else model.batch_stats)
        acc, loss = reference_metrics(model.apply, pruned, stats, val_x, val_y, val_w)
        np.testing.assert_allclose(out["accuracy"][i], acc, atol=1e-6, err_msg=f"candidate {i}")
        np.testing.assert_allclose(out["loss"][i], loss, rtol=1e-4, err_msg=f"candidate {i}")


def test_resnet20_adaptive_bn_equals_weight_masked_model():
    """Real Flax BatchNorm (a tiny-width resnet20): recalibrated activation-mask evaluation
    equals recalibrating and evaluating the weight-masked model."""
    models = pytest.importorskip("jaxprune.models", reason="jaxprune.models not written yet")
    input_shape = (8, 8, 3)
    widths = {name: 4 for name in models.MODELS["resnet20"].default_widths(input_shape)}
    model = models.get_model("resnet20", num_classes=NUM_CLASSES, input_shape=input_shape,
                             key=jax.random.key(8), widths=widths)
    rng = np.random.default_rng(9)
    # Perturb BN scales / biases so that which channels are kept matters.
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32),
                          model.params)
    calib = jnp.asarray(rng.standard_normal((8,) + input_shape, np.float32))
    val_x = jnp.asarray(rng.standard_normal((8,) + input_shape, np.float32))
    val_y = jnp.asarray(rng.integers(0, NUM_CLASSES, (8,)).astype(np.int32))
    val_w = jnp.ones((8,), jnp.float32)
    masked_apply, groups = _hookless(model)
    scores = masks.channel_scores(jax.tree.map(jnp.abs, params), groups)
    keep = random_keep(10, 2, len(groups), minval=0.3)
    evaluate = evaluate_lib.make_evaluator(masked_apply, groups, eval_batch_size=4,
                                           calib_batch_size=4)
    out = evaluate(params, model.batch_stats, scores, keep, calib, val_x, val_y, val_w)
    for i in range(keep.shape[0]):
        channel_keep = masks.channel_keep(scores, keep[i], groups)
        pruned = masks.apply(params, masks.channel_masks(channel_keep, groups, params))
        stats = reference_recalibrate(model.apply, pruned, model.batch_stats, calib, 4)
        acc, loss = reference_metrics(model.apply, pruned, stats, val_x, val_y, val_w)
        np.testing.assert_allclose(out["accuracy"][i], acc, atol=1e-6, err_msg=f"candidate {i}")
        np.testing.assert_allclose(out["loss"][i], loss, rtol=1e-4, err_msg=f"candidate {i}")
