"""Tests for jaxprune.parallel: mesh, pad / shard / drop, replicate, gather."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxprune import parallel


def test_candidate_mesh_spans_all_devices():
    mesh = parallel.candidate_mesh()
    assert mesh.axis_names == (parallel.CANDIDATE_AXIS,)
    assert mesh.devices.size == jax.device_count() == 8
    one = parallel.candidate_mesh(jax.devices()[:1])
    assert one.devices.size == 1


def test_candidate_mesh_rejects_empty():
    with pytest.raises(ValueError, match="at least one device"):
        parallel.candidate_mesh([])


@pytest.mark.parametrize("k, expected", [(1, 8), (5, 8), (8, 8), (9, 16), (16, 16)])
def test_padded_size(k, expected):
    assert parallel.padded_size(k, parallel.candidate_mesh()) == expected


def test_padded_size_rejects_zero():
    with pytest.raises(ValueError, match="k=0"):
        parallel.padded_size(0, parallel.candidate_mesh())


def test_pad_candidates_repeats_last_row_and_drop_undoes_it():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(3, 2), "b": jnp.arange(3)}
    padded = parallel.pad_candidates(tree, 5)
    np.testing.assert_array_equal(padded["a"][3:], np.tile(tree["a"][-1:], (2, 1)))
    np.testing.assert_array_equal(padded["b"], [0, 1, 2, 2, 2])
    dropped = parallel.drop_padding(padded, 3)
    np.testing.assert_array_equal(dropped["a"], tree["a"])
    np.testing.assert_array_equal(dropped["b"], tree["b"])


def test_shard_candidates_pads_and_splits_rows():
    mesh = parallel.candidate_mesh()
    keep = np.arange(10, dtype=np.float32).reshape(5, 2)
    sharded = parallel.shard_candidates({"keep": keep}, mesh)["keep"]
    assert sharded.shape == (8, 2)
    assert sharded.sharding.spec == P(parallel.CANDIDATE_AXIS)
    assert len(sharded.addressable_shards) == 8
    assert all(s.data.shape == (1, 2) for s in sharded.addressable_shards)
    np.testing.assert_array_equal(parallel.gather_candidates(sharded, 5), keep)
    np.testing.assert_array_equal(np.asarray(sharded)[5:], np.tile(keep[-1:], (3, 1)))


def test_shard_candidates_rejects_mismatched_leading_axes():
    with pytest.raises(ValueError, match="disagree"):
        parallel.shard_candidates({"a": np.zeros((3, 2)), "b": np.zeros((4,))},
                                  parallel.candidate_mesh())


def test_replicate_places_full_copies_and_is_idempotent():
    mesh = parallel.candidate_mesh()
    tree = {"w": np.ones((3, 4), np.float32)}
    rep = parallel.replicate(tree, mesh)["w"]
    assert rep.sharding.is_fully_replicated
    assert len(rep.addressable_shards) == 8
    assert parallel.replicate({"w": rep}, mesh)["w"] is rep


def test_process_slice_single_process_holds_everything():
    mesh = parallel.candidate_mesh()
    assert parallel.process_slice(5, mesh) == slice(0, 5)
    assert parallel.process_slice(16, mesh) == slice(0, 16)


def test_gather_candidates_of_jitted_sharded_output():
    mesh = parallel.candidate_mesh()
    x = parallel.shard_candidates(np.arange(3, dtype=np.float32), mesh)
    y = jax.jit(lambda v: v * 2.0)(x)
    out = parallel.gather_candidates({"y": y}, 3)
    assert isinstance(out["y"], np.ndarray)
    np.testing.assert_array_equal(out["y"], [0.0, 2.0, 4.0])


def test_initialize_distributed_single_process_is_noop():
    parallel.initialize_distributed()
    parallel.initialize_distributed(None, 1, 0)
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
