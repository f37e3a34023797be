"""Train step with masks: pruned weights stay exactly zero, no retracing, exact evaluation, resume."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxprune import checkpoint, masks as masks_lib, models, train

SHAPE = (8, 8, 1)


def _cfg(optimizer="sgd", **kw):
    return ml_collections.ConfigDict(dict(learning_rate=0.05, schedule="cosine", optimizer=optimizer,
                                          momentum=0.9, weight_decay=5e-4, **kw))


@pytest.fixture(scope="module")
def setup():
    model = models.get_model("lenet5", num_classes=10, input_shape=SHAPE, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40,) + SHAPE, dtype=np.uint8)
    labels = rng.integers(0, 10, (40,), dtype=np.int32)
    scores = masks_lib.channel_scores(jax.tree.map(jnp.abs, model.params), model.groups)
    keep = masks_lib.channel_keep(scores, jnp.full((len(model.groups),), 0.5), model.groups)
    masks = masks_lib.channel_masks(keep, model.groups, model.params)
    return model, images, labels, masks


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero(setup, optimizer):
    model, images, labels, masks = setup
    tx = train.make_optimizer(_cfg(optimizer), 10)
    state = train.create_state(model.params, model.batch_stats, masks, tx)
    step = train.make_train_step(model.apply, tx, mean=np.full((1,), 100.0), std=np.full((1,), 50.0),
                                 augment=True, l1=1e-4)
    key = jax.random.key(1)
    x, y = jnp.asarray(images), jnp.asarray(labels)
    before = jax.tree.map(np.array, state.params)  # the step donates its state
    for i in range(3):
        state, metrics = step(state, x, y, jnp.arange(8 * i, 8 * i + 8, dtype=jnp.int32),
                              jax.random.fold_in(key, i))
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1  # compiled once: no retrace across steps
    for p, m, p0 in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks), jax.tree.leaves(before)):
        p, m = np.asarray(p), np.asarray(m)
        assert np.all(p[~m] == 0.0)
    moved = [not np.allclose(np.asarray(p), np.asarray(p0)) for p, p0 in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
    assert any(moved)


def test_evaluate_is_exact_with_padding(setup):
    model, images, labels, _ = setup
    mean, std = np.full((1,), 100.0), np.full((1,), 50.0)
    evaluate = train.make_eval_fn(model.apply, mean=mean, std=std, batch_size=16)  # 40 → 48 padded
    out = evaluate(model.params, model.batch_stats, images, labels)
    x = (images.astype(np.float32) - 100.0) / 50.0
    logits, _ = model.apply(model.params, model.batch_stats, jnp.asarray(x), train=False)
    assert out["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)), abs=1e-6)


def test_fit_resumes_to_the_same_state(setup, tmp_path):
    model, images, labels, masks = setup
    mean, std = np.full((1,), 100.0), np.full((1,), 50.0)
    tx = train.make_optimizer(_cfg(), 10)
    step = train.make_train_step(model.apply, tx, mean=mean, std=std, augment=True)
    key = lambda: jax.random.key(7)  # the same stream in each "process" (fresh key objects)

    def fresh():
        return train.create_state(model.params, model.batch_stats, masks, tx)

    full = train.fit(fresh(), step, images=images, labels=labels, epochs=2, batch_size=8, key=key(),
                     progress=False).state
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), fingerprint={"m": 1})
    # First run: one epoch only, saved as not done (as if killed after epoch 1).
    part = train.fit(fresh(), step, images=images, labels=labels, epochs=1, batch_size=8, key=key(),
                     checkpointer=ckpt, checkpoint_every=2, progress=False).state
    restored, meta = ckpt.restore(like=fresh())
    assert int(restored.step) == 5
    resumed = train.fit(restored, step, images=images, labels=labels, epochs=2, batch_size=8, key=key(),
                        progress=False).state
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bad_optimizer_and_schedule():
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer(_cfg("rmsprop"), 10)
    with pytest.raises(ValueError, match="schedule"):
        train.learning_rate_schedule(ml_collections.ConfigDict(dict(learning_rate=0.1, schedule="poly")), 10)
