"""jaxprune: automated pruning of JAX/Flax networks by architecture search."""

__version__ = "0.1.0"

# Structured pruning of any traced model (issue #10): `jaxprune.discover_groups`,
# `jaxprune.mask_activations`, `jaxprune.compact`. Resolved lazily so that `import jaxprune`
# does not import JAX (scripts set XLA flags first).
_LAZY = {"discover_groups": "discover", "mask_activations": "discover", "Discovery": "discover",
         "compact": "surgery"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"jaxprune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
