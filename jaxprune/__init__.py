"""jaxprune: automated pruning of JAX/Flax networks by architecture search."""

__version__ = "0.1.0"

# The library API (see the README, "Use on your own model"). Resolved lazily so that
# `import jaxprune` does not import JAX (scripts set XLA flags first).
_LAZY = {
    # the pruning problem of any model: scores, cost, budget, search, fine-tune, compaction
    "Pruner": "pruner", "train_model": "pruner", "functional": "pruner", "linen_apply": "pruner",
    # channel groups and masks from the jaxpr, compaction, saving the compact model
    "discover_groups": "discover", "mask_activations": "discover", "Discovery": "discover",
    "compact": "surgery",
    # model I/O: compact exports of any model, the driver's saved models and their predictors
    "save_compact": "modelio", "load_compact": "modelio",
    "restore_model": "modelio", "load_predictor": "modelio",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"jaxprune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
