"""Training on the device: pruned weights stay zero, one compilation for every phase, exact
evaluation, exact resume, mixed precision, schedules and non-finite losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint, masks as masks_lib, models, train

SHAPE = (8, 8, 1)
MEAN, STD = np.full((1,), 100.0), np.full((1,), 50.0)


def _cfg(optimizer="sgd"):
    return train.Settings(optimizer=optimizer, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def setup():
    model = models.get_model("lenet5", num_classes=10, input_shape=SHAPE, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40,) + SHAPE, dtype=np.uint8)
    labels = rng.integers(0, 10, (40,), dtype=np.int32)
    groups = models.channel_groups(model)
    scores = masks_lib.channel_scores(jax.tree.map(jnp.abs, model.params), groups)
    keep = masks_lib.channel_keep(scores, jnp.full((len(groups),), 0.5), groups)
    masks = masks_lib.channel_masks(keep, groups, model.params)
    return model, images, labels, masks


def _train_fn(model, tx, batch_size=8, mode=None, **kw):
    step = train.make_train_step(model.apply, tx, schedule="cosine", mean=MEAN, std=STD,
                                 augment=True, **kw)
    return train.make_train_fn(step, batch_size=batch_size, mode=mode)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero(setup, optimizer):
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg(optimizer))
    state = train.create_state(model.params, model.batch_stats, masks, tx)
    train_fn = _train_fn(model, tx, l1=1e-4)
    x, y = jnp.asarray(images), jnp.asarray(labels)
    before = jax.tree.map(np.array, state.params)  # the train fn donates its state
    recipe = train.make_recipe(0.05, 10)
    for begin in (0, 2):
        state, metrics = train_fn(state, x, y, jax.random.key(1), jax.random.key(2), recipe, begin,
                                  num_steps=2)
    assert int(state.step) == 4 and np.all(np.isfinite(np.asarray(metrics["loss"])))
    assert train_fn._cache_size() == 1  # compiled once: the start step is an argument
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    moved = [not np.allclose(np.asarray(p), p0) for p, p0 in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
    assert any(moved)


def test_one_compilation_serves_dense_and_masked_phases(setup):
    """Masks are state and the recipe is an argument: a dense phase and two fine-tunes with other
    rates, lengths and warm-ups run through one compiled function."""
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg())
    train_fn = _train_fn(model, tx)
    for phase_masks, lr, epochs, warmup in ((masks_lib.ones_like(model.params), 0.1, 2, 3),
                                           (masks, 0.01, 1, 0), (masks, 0.02, 3, 0)):
        state = train.create_state(model.params, model.batch_stats, phase_masks, tx)
        result = train.fit(state, train_fn, images=images, labels=labels, epochs=epochs,
                           batch_size=8, key=jax.random.key(3),
                           recipe=train.make_recipe(lr, epochs * 5, warmup), progress=False)
        assert int(result.state.step) == epochs * 5
    assert train_fn._cache_size() == 1  # 5 steps an epoch: one chunk length


def test_scanned_and_stepwise_chunks_train_identically(setup):
    """`scan` (accelerators) and `steps` (CPU) run the same step on the same batches and keys."""
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg())
    out = {}
    for mode in ("scan", "steps"):
        fn = _train_fn(model, tx, mode=mode)
        state = train.create_state(model.params, model.batch_stats, masks, tx)
        result = train.fit(state, fn, images=images, labels=labels, epochs=2, batch_size=8,
                           key=jax.random.key(5), recipe=train.make_recipe(0.05, 10),
                           checkpoint_every=3, progress=False)
        out[mode] = result
        lengths = {e - b for b, e in train.chunk_bounds(0, 10, 5, 3)}  # {3, 2, 1}
        assert fn._cache_size() == (len(lengths) if mode == "scan" else 1)
    for a, b in zip(jax.tree.leaves(out["scan"].state), jax.tree.leaves(out["steps"].state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert out["scan"].history[-1]["train_loss"] == pytest.approx(
        out["steps"].history[-1]["train_loss"], rel=1e-4)


def test_chunks_stay_inside_epochs_and_stop_at_checkpoints():
    assert train.chunk_bounds(0, 10, 5, 0) == [(0, 5), (5, 10)]
    assert train.chunk_bounds(0, 10, 5, 2) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8), (8, 10)]
    assert train.chunk_bounds(3, 10, 5, 0) == [(3, 5), (5, 10)]
    assert train.chunk_bounds(10, 10, 5, 3) == []


def test_evaluate_is_exact_and_compiles_once_for_two_splits(setup):
    model, images, labels, _ = setup
    evaluate = train.make_eval_fn(model.apply, mean=MEAN, std=STD, batch_size=16)
    splits = {"a": (images, labels), "b": (images[:21], labels[:21])}
    data = {k: train.device_eval_data(*v, 16, capacity=40) for k, v in splits.items()}
    assert data["b"].num_batches == 2 and data["b"].images.shape[0] == 48
    for name, (x_u8, y) in splits.items():
        out = evaluate(model.params, model.batch_stats, data[name])
        x = (x_u8.astype(np.float32) - 100.0) / 50.0
        logits, _ = model.apply(model.params, model.batch_stats, jnp.asarray(x), train=False)
        assert out["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)), abs=1e-6)
        expected_loss = float(np.mean(train.cross_entropy(logits, jnp.asarray(y))))
        assert out["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert evaluate.compiled._cache_size() == 1
    # Host arrays still work (uploaded per call).
    host = evaluate(model.params, model.batch_stats, images, labels)
    assert host["accuracy"] == pytest.approx(
        evaluate(model.params, model.batch_stats, data["a"])["accuracy"])


def test_fit_resumes_to_the_same_state(setup, tmp_path):
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg())
    train_fn = _train_fn(model, tx)
    recipe = train.make_recipe(0.05, 10)
    key = lambda: jax.random.key(7)  # the same stream in each "process" (fresh key objects)

    def fresh():
        return train.create_state(model.params, model.batch_stats, masks, tx)

    full = train.fit(fresh(), train_fn, images=images, labels=labels, epochs=2, batch_size=8,
                     key=key(), recipe=recipe, progress=False).state
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), fingerprint={"m": 1})
    # First run killed after step 6 (mid-epoch): its last checkpoint is step 6.
    train.fit(fresh(), train_fn, images=images, labels=labels, epochs=2, batch_size=8,
                     key=key(), recipe=recipe, checkpointer=ckpt, checkpoint_every=2,
                     progress=False, stop_at_step=6)
    ckpt.wait()
    restored, meta = ckpt.restore(like=fresh())
    assert int(restored.step) == 6 and not meta["done"]
    resumed = train.fit(restored, train_fn, images=images, labels=labels, epochs=2, batch_size=8,
                        key=key(), recipe=recipe, progress=False).state
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bf16_computes_low_keeps_float32_state(setup):
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg())
    losses = {}
    for precision in ("fp32", "bf16"):
        state = train.create_state(model.params, model.batch_stats, masks, tx)
        train_fn = _train_fn(model, tx, precision=precision)
        state, metrics = train_fn(state, jnp.asarray(images), jnp.asarray(labels),
                                  jax.random.key(1), jax.random.key(2), train.make_recipe(0.05, 5),
                                  0, num_steps=5)
        for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
            assert leaf.dtype in (jnp.float32, jnp.int32), (precision, leaf.dtype)
        losses[precision] = np.asarray(metrics["loss"])
        for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    assert np.all(np.isfinite(losses["bf16"]))
    np.testing.assert_allclose(losses["bf16"][0], losses["fp32"][0], rtol=0.05)


def test_learning_rate_warmup_and_schedules():
    recipe = train.make_recipe(1.0, 100, 10)
    lr = lambda sched, s: float(train.learning_rate(sched, recipe, s))
    assert lr("cosine", 0) == pytest.approx(0.1)
    assert lr("cosine", 9) == pytest.approx(1.0)
    assert lr("cosine", 55) == pytest.approx(0.5, abs=1e-6)  # halfway through the decay
    assert lr("cosine", 100) == pytest.approx(0.0, abs=1e-7)
    no_warmup = train.make_recipe(1.0, 100)
    assert float(train.learning_rate("step", no_warmup, 49)) == pytest.approx(1.0)
    assert float(train.learning_rate("step", no_warmup, 50)) == pytest.approx(0.1)
    assert float(train.learning_rate("step", no_warmup, 75)) == pytest.approx(0.01)
    assert float(train.learning_rate("constant", recipe, 99)) == pytest.approx(1.0)


def test_label_smoothing_changes_the_loss_only_when_asked():
    logits = jnp.asarray([[4.0, 0.0, 0.0]])
    y = jnp.asarray([0])
    plain = float(train.cross_entropy(logits, y)[0])
    assert float(train.cross_entropy(logits, y, 0.0)[0]) == pytest.approx(plain)
    assert float(train.cross_entropy(logits, y, 0.3)[0]) > plain


def test_non_finite_loss_stops_without_saving(setup, tmp_path):
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg())
    train_fn = _train_fn(model, tx)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), fingerprint={"m": 1})
    state = train.create_state(model.params, model.batch_stats, masks, tx)
    with pytest.raises(train.NonFiniteError, match=r"\[dense\].*step \d+.*learning_rate"):
        train.fit(state, train_fn, images=images, labels=labels, epochs=3, batch_size=8,
                  key=jax.random.key(0), recipe=train.make_recipe(1e30, 15), checkpointer=ckpt,
                  checkpoint_every=5, phase="dense", progress=False)
    ckpt.wait()
    steps = ckpt.all_steps()
    for s in steps:  # whatever was saved came from finite chunks
        restored, _ = ckpt.restore(s, like=train.create_state(model.params, model.batch_stats,
                                                              masks, tx))
        assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(restored.params))


def test_bad_optimizer_schedule_and_precision():
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer(_cfg("rmsprop"))
    with pytest.raises(ValueError, match="schedule"):
        train.learning_rate("poly", train.make_recipe(0.1, 10), 0)
    with pytest.raises(ValueError, match="precision"):
        train.compute_dtype("fp8")
