"""Shared pieces of the model zoo: the functional model record and small layer helpers.

Models are Flax NNX modules used functionally: `get_model` builds one, splits it once into a
graph definition and plain-dict `params` / `batch_stats`, and returns a pure `apply` closure
that merges them back inside (at trace time only).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Tuple

import jax
from flax import nnx

from jaxprune.structure import Path

# Momentum of the BatchNorm running statistics: running = 0.9 * running + 0.1 * batch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class ModelSpec(NamedTuple):
    """Everything needed to rebuild a model's architecture; hashable (usable as a static arg).

    Attributes:
      name: registry name ('lenet5', 'resnet20', ...).
      num_classes: classifier outputs.
      input_shape: (H, W, C) of one example, or (seq_len,) for a token model (`INPUT_KIND`).
      widths: ((width argument, channels), ...) for every width argument of the module, in
        `default_widths` order (a discovered channel group is named after the one it sets).
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, ...]
    widths: Tuple[Tuple[str, int], ...]


class FunctionalModel(NamedTuple):
    """A model as pure data plus a pure function.

    Attributes:
      apply: `apply(params, batch_stats, x, *, train) -> (logits, new_batch_stats)`; pure and
        jittable. `x` is float32 NHWC (int32 [batch, seq_len] token ids for a token model).
        With `train=False` BatchNorm uses the running statistics and `batch_stats` is returned
        unchanged; with `train=True` it uses batch statistics and returns updated running
        statistics (momentum 0.9).
      params, batch_stats: nested dicts of arrays (str keys).
      spec: `ModelSpec`.
      unprunable: param paths excluded from unstructured / n:m pruning by default (first conv
        and classifier kernels). Channel groups come from discovery (`models.discovery`).
    """

    apply: Callable[..., Any]
    params: dict
    batch_stats: dict
    spec: ModelSpec
    unprunable: Tuple[Path, ...]


def resolve_widths(name: str, defaults: dict, widths: dict | None) -> dict:
    """Default widths overridden by `widths`; validates the argument names and values.

    Raises:
      ValueError naming unknown width arguments or non-positive / non-integer widths.
    """
    resolved = dict(defaults)
    if not widths:
        return resolved
    unknown = sorted(k for k in widths if k not in defaults)
    if unknown:
        raise ValueError(
            f"{name}: unknown width argument(s) {unknown}; known: {list(defaults)}")
    bad = {k: v for k, v in widths.items()
           if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1}
    if bad:
        raise ValueError(f"{name}: widths must be positive ints, got {bad}")
    resolved.update({k: int(v) for k, v in widths.items()})
    return resolved


def conv_init():
    """He (fan-out, normal) initialisation for convolutions followed by BatchNorm + ReLU."""
    return nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: Any = "SAME",
         use_bias: bool = False, rngs: nnx.Rngs, kernel_init=None) -> nnx.Conv:
    """A square-kernel `nnx.Conv` (HWIO kernel)."""
    kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
                    use_bias=use_bias, rngs=rngs, **kwargs)


def batch_norm(ch: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm over the last axis with the zoo's momentum / epsilon."""
    return nnx.BatchNorm(ch, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (VALID), NHWC."""
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
