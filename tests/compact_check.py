"""The compaction invariant (test helper): the compact model's output equals the masked
model's, and masking changed the output (so the check is not vacuous)."""
import numpy as np

from jaxprune import discover, surgery


def assert_compact_equals_masked(apply_fn, variables, x, found, keep):
    """Compacts `apply_fn` at `keep` ({group name: bool[size]}) and checks it against
    `discover.mask_activations`; returns the compact variables."""
    masked = discover.mask_activations(apply_fn)(
        variables, x, {k: v.astype(np.float32) for k, v in keep.items()})
    small_fn, small_vars = surgery.compact(apply_fn, variables, found, keep)
    np.testing.assert_allclose(small_fn(small_vars, x), masked, atol=2e-5)
    assert np.abs(apply_fn(variables, x) - masked).max() > 1e-3
    return small_vars
