"""One fine-tune: the library's (`Pruner.finetune` / `pruner.train_model`) and the pipeline's
fine-tune phase are one function, `train.train`, with one optimizer config (`train.Settings`)."""
import os
import types

import jax
import numpy as np

from jaxprune import experiment, masks, pipeline, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_and_pipeline_finetune_give_identical_params(tmp_path):
    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    with config.unlocked():
        config.train.checkpoint_every = 0
        config.finetune.epochs = 2
        config.finetune.warmup_epochs = 0.5
        config.train.label_smoothing = 0.1  # settings beyond the library's keywords count too
        config.model.name, config.prune.granularity = "mlp", "unstructured"  # fast to compile
    exp = experiment.setup(config, str(tmp_path), progress=False)
    try:
        dense = types.SimpleNamespace(params=exp.model.params, batch_stats=exp.model.batch_stats)
        pruner = pipeline.make_pruner(exp, dense)
        keep = pruner.threshold_keep()
        pruned = pruner.masks(keep)[0]
        state, _ = pipeline.finetune_phase(exp, pruner, "finetune_check", pruned, pruner.params,
                                           key=jax.random.key(7))
        ds = exp.dataset
        tuned = pruner.finetune(keep, ds.train_images, ds.train_labels, epochs=2, key=jax.random.key(7),
                                learning_rate=float(config.finetune.learning_rate),
                                warmup_epochs=0.5, settings=train.Settings.from_config(config),
                                mean=ds.mean, std=ds.std)
    finally:
        from jaxprune import checkpoint
        checkpoint.unlock_workdir(str(tmp_path))
    assert jax.tree.structure(tuned.params) == jax.tree.structure(state.params)
    jax.tree.map(np.testing.assert_array_equal, (tuned.params, tuned.batch_stats),
                 (state.params, state.batch_stats))
    # It trained (the params moved) and the pruned weights stayed exactly zero.
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         tuned.params, masks.apply(pruner.params, pruned))
    assert any(jax.tree.leaves(moved))
    zero = jax.tree.map(lambda p, m: bool(np.all(np.asarray(p)[~np.asarray(m)] == 0)),
                        tuned.params, pruned)
    assert all(jax.tree.leaves(zero))


def test_library_settings_are_the_train_settings_defaults():
    """`train_model`'s keywords override single fields of `train.Settings` (its defaults are
    the library's: SGD + Nesterov 0.9, weight decay 5e-4, cosine, batches of 128)."""
    s = train.Settings()
    assert (s.optimizer, s.momentum, s.weight_decay, s.schedule, s.batch_size) == \
        ("sgd", 0.9, 5e-4, "cosine", 128)
