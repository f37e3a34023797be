"""jaxprune.checkpoint on orbax's CheckpointManager: retention and the save decision are orbax's
(with a policy that counts readable steps only), the on-disk layout is the one older runs wrote."""
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoint_test import FINGERPRINT, assert_trees_equal, make_state, save_steps
from jaxprune import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMPAIGN = os.path.join(REPO, "experiments", "2026-12-03_resnet20_cpu", "workdir", "checkpoints",
                        "dense")


def _truncate_meta(step_dir):
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()  # a killed writer's leftover


def test_orbax_removes_old_steps_once_the_new_one_is_on_disk(tmp_path):
    ckpt = save_steps(tmp_path, [1, 2], max_to_keep=2)
    assert ckpt.save(3, make_state(3.0), {})
    ckpt._manager.wait_until_finished()  # orbax alone: no deletion is left to `Checkpointer.wait`
    assert ckpt.all_steps_on_disk() == [2, 3]
    ckpt.close()


def test_retention_counts_readable_steps_and_keeps_damaged_ones(tmp_path):
    save_steps(tmp_path, [1, 2], max_to_keep=2).close()
    _truncate_meta(tmp_path / "2")
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, fingerprint=FINGERPRINT)
    assert ckpt.save(3, make_state(3.0), {})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]  # two readable (1, 3) and the damaged 2
    assert ckpt.save(4, make_state(4.0), {})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3, 4]
    ckpt.close()
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=None, fingerprint=FINGERPRINT) as keep_all:
        for s in (5, 6, 7):
            assert keep_all.save(s, make_state(float(s)), {})
    assert ckpt_lib.Checkpointer(tmp_path, fingerprint=None).all_steps() == [2, 3, 4, 5, 6, 7]


def test_older_steps_are_saved_only_past_damaged_ones(tmp_path):
    ckpt = save_steps(tmp_path, [1, 3], max_to_keep=3)
    assert not ckpt.save(2, make_state(2.0), {})  # 3 is readable: orbax refuses an older step
    _truncate_meta(tmp_path / "3")
    assert ckpt.save(2, make_state(2.0), {"past": 3})  # only damaged steps are newer
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3] and os.path.isdir(tmp_path / "3")
    state, meta = ckpt.restore(like=make_state(), fallback=True)
    assert int(state.step) == 2 and meta == {"past": 3}
    assert ckpt.save(3, make_state(5.0), {})  # the damaged step is set aside, not deleted
    ckpt.wait()
    assert len(glob.glob(str(tmp_path / "3.corrupt-*"))) == 1
    assert int(ckpt.restore(like=make_state())[0].step) == 5
    ckpt.close()


def test_save_replacing_runs_on_saved_while_the_old_step_is_on_disk(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, fingerprint=FINGERPRINT)
    seen = []

    def on_saved(step):
        seen.append((step, ckpt.all_steps_on_disk()))

    assert ckpt.save_replacing(make_state(1.0), {"v": 1}, on_saved=on_saved)
    assert ckpt.save_replacing(make_state(2.0), {"v": 2}, on_saved=on_saved)
    assert seen == [(0, [0]), (1, [0, 1])] and ckpt.all_steps_on_disk() == [1]
    assert ckpt.save(5, make_state(5.0), {})  # the hold is released: a plain save retains as asked
    ckpt.wait()
    assert ckpt.all_steps_on_disk() == [5]
    ckpt.close()


def test_save_replacing_stopped_in_on_saved_keeps_the_old_step_until_the_next_call(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, fingerprint=FINGERPRINT)
    assert ckpt.save_replacing(make_state(1.0), {"v": 1})

    def stopped(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_replacing(make_state(2.0), {"v": 2}, on_saved=stopped)
    ckpt.close()
    assert ckpt.all_steps_on_disk() == [0, 1]  # the old step outlives a stop before it is described
    again = ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, fingerprint=FINGERPRINT)
    seen = []
    # The same state: not rewritten, but described (`on_saved`) before the old step goes, so a
    # file that still names the old step never outlives it.
    assert not again.save_replacing(
        make_state(2.0), {"v": 2}, on_saved=lambda step: seen.append((step, again.all_steps_on_disk())))
    assert seen == [(1, [0, 1])]
    assert again.all_steps_on_disk() == [1]
    again.close()


def _layout(step_dir):
    """Relative paths of a step's files, content-addressed names replaced by `*`."""
    out = set()
    for folder, _, names in os.walk(step_dir):
        rel = os.path.relpath(folder, step_dir)
        for name in names:
            out.add(os.path.join(rel, "*" if os.path.basename(rel) == "d" else name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(CAMPAIGN), reason="no committed campaign snapshot")
def test_the_campaign_snapshot_resumes_and_continues_in_its_layout(tmp_path):
    """A copy of the ResNet-20 campaign's dense checkpoints (written before orbax's retention was
    used) restores into the ResNet-20 train state with every checksum verified, and the steps
    saved after it have the same layout; `max_to_keep` then removes the old step."""
    from jaxprune import masks, models, pipeline, train
    directory = str(tmp_path / "dense")
    shutil.copytree(CAMPAIGN, directory)
    (old,) = ckpt_lib.Checkpointer(directory, fingerprint=None).all_steps()
    cfg = pipeline.load_config("cifar10", "resnet20_cpu")
    model = models.get_model("resnet20", num_classes=10, input_shape=(32, 32, 3),
                             key=jax.random.key(0))
    like = train.create_state(model.params, model.batch_stats, masks.ones_like(model.params),
                              train.make_optimizer(train.Settings.from_config(cfg)))
    fingerprint = ckpt_lib.load_json(os.path.join(directory, ckpt_lib.FINGERPRINT_FILE))
    ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=2, fingerprint=fingerprint, fallback=True)
    state, meta = ckpt.restore(like=like)
    assert ckpt.last_restored_step == old == int(state.step) and meta["phase"] == "dense"
    assert jax.tree.structure(state) == jax.tree.structure(like)
    for step in (old + 1, old + 2):
        assert ckpt.save(step, state, meta)
        ckpt.wait()
        assert _layout(os.path.join(directory, str(step))) == _layout(os.path.join(CAMPAIGN,
                                                                                   str(old)))
    assert ckpt.all_steps() == [old + 1, old + 2]
    assert sorted(os.listdir(directory)) == sorted(map(str, [old + 1, old + 2])) + [
        ckpt_lib.FINGERPRINT_FILE]
    again, _ = ckpt.restore(like=like)
    assert_trees_equal(again, state)
    ckpt.close()
    logits, _ = model.apply(again.params, again.batch_stats, jnp.zeros((2, 32, 32, 3)),
                            train=False)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
