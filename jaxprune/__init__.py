"""jaxprune: automated pruning of JAX/Flax networks by architecture search."""

__version__ = "0.1.0"
