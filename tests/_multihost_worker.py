"""One process of tests/multihost_test.py: joins a CPU jax.distributed job and evaluates.

Usage: python _multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz
The parent sets JAX_PLATFORMS=cpu and XLA_FLAGS (host device count) in the environment.
Every process builds the same tiny model, data and K candidate keep vectors (same keys),
evaluates them over the global candidate mesh and writes what it got back.
"""
import os
import sys

os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NUM_CANDIDATES = 5  # pads to 8 rows over 4 global devices: process 1 holds padding


def evaluate_candidates(mesh=None):
    """The same K candidates on whatever mesh (default: every global device)."""
    import jax
    import jax.numpy as jnp

    import search_evaluate_test as tiny  # the stand-in model: one definition for both tests
    from jaxprune import masks
    from jaxprune.search import evaluate as evaluate_lib

    params, stats = tiny.tiny_model(0)
    calib, val_x, val_y, val_w = tiny.make_data(1)
    scores = masks.channel_scores(jax.tree.map(jnp.abs, params), tiny.GROUPS)
    keep = tiny.random_keep(2, NUM_CANDIDATES, len(tiny.GROUPS))
    evaluate = evaluate_lib.make_evaluator(tiny.tiny_apply, tiny.GROUPS, mesh=mesh,
                                           eval_batch_size=4, calib_batch_size=4)
    return evaluate(params, stats, scores, keep, calib, val_x, val_y, val_w)


def main(coordinator, num_processes, process_id, out_path):
    from jaxprune import parallel

    parallel.initialize_distributed(coordinator, int(num_processes), int(process_id),
                                    initialization_timeout=120)
    import jax
    import numpy as np

    out = evaluate_candidates()
    mine = parallel.process_slice(NUM_CANDIDATES, parallel.candidate_mesh())
    np.savez(out_path, accuracy=out["accuracy"], loss=out["loss"],
             process_count=jax.process_count(), device_count=jax.device_count(),
             local_device_count=jax.local_device_count(),
             slice_start=mine.start, slice_stop=mine.stop)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
