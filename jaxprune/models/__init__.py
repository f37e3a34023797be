"""Model zoo (Flax NNX, used functionally) and its channel-group declarations.

    model = get_model("resnet20", num_classes=10, input_shape=(32, 32, 3), key=key)
    logits, batch_stats = model.apply(model.params, model.batch_stats, x, train=True)
    small = compact_model(model, keep)   # physically remove channels: {group: bool[size]}

`apply` is pure; wrap it (or the step that calls it) in `jax.jit`. It merges the NNX graph
inside, which costs Python time at trace time only.
"""
from __future__ import annotations

import jax
from flax import nnx

from jaxprune import structure
from jaxprune.models.base import FunctionalModel, ModelSpec, resolve_widths
from jaxprune.models.lenet import MLP, LeNet5
from jaxprune.models.resnet import ResNet18, ResNet20, ResNet56
from jaxprune.models.transformer import TransformerClassifier
from jaxprune.models.vgg import VGG16

__all__ = ["MODELS", "FunctionalModel", "ModelSpec", "get_model", "compact_model",
           "model_from_spec"]

# name -> NNX module class with `default_widths(input_shape)`, `channel_groups()`, UNPRUNABLE
# and `__call__(x, *, train, channel_masks=None)`.
MODELS = {
    "lenet5": LeNet5,
    "mlp": MLP,
    "vgg16": VGG16,
    "resnet20": ResNet20,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "transformer": TransformerClassifier,
}
# What a model's input is (class attribute INPUT_KIND): 'image' (H, W, C) floats, or 'tokens'
# (seq_len,) int32 ids; it must match the dataset's `kind`.
INPUT_RANK = {"image": 3, "tokens": 1}


def _make_apply(graphdef, input_shape: tuple, group_names: frozenset):
    """The pure apply closure for one architecture (graphdef is static)."""

    def apply(params, batch_stats, x, *, train: bool, channel_masks=None):
        if tuple(x.shape[1:]) != input_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (batch, *{input_shape})")
        if channel_masks is not None:
            unknown = sorted(set(channel_masks) - group_names)
            if unknown:
                raise ValueError(f"channel_masks has unknown group(s) {unknown}; "
                                 f"allowed: {sorted(group_names)}")
        module = nnx.merge(graphdef, nnx.State(params), nnx.State(batch_stats))
        logits = module(x, train=train, channel_masks=channel_masks)
        if not train:
            return logits, batch_stats
        return logits, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    return apply


def _make(cls, num_classes, input_shape, widths_items, key):
    return cls(num_classes=num_classes, input_shape=input_shape, widths=dict(widths_items),
               rngs=nnx.Rngs(params=key))


def _build(name, num_classes, input_shape, widths, key, *, abstract: bool) -> FunctionalModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    cls = MODELS[name]
    input_shape = tuple(int(d) for d in input_shape)
    kind = input_kind(name)
    if len(input_shape) != INPUT_RANK[kind] or min(input_shape) < 1:
        raise ValueError(f"{name}: input_shape must be {'(H, W, C)' if kind == 'image' else '(seq_len,)'}"
                         f" positive ints ({kind} input), got {input_shape}")
    if int(num_classes) < 1:
        raise ValueError(f"{name}: num_classes must be >= 1, got {num_classes}")
    num_classes = int(num_classes)
    resolved = resolve_widths(name, cls.default_widths(input_shape), widths)
    widths_items = tuple(resolved.items())
    if abstract:
        module = nnx.eval_shape(
            lambda: _make(cls, num_classes, input_shape, widths_items, jax.random.key(0)))
    else:
        # Eager on purpose: each initialiser op compiles once per shape and is cached across
        # models, while a jitted init unrolls one threefry per layer into a program that takes
        # many seconds to compile for the deep models.
        module = _make(cls, num_classes, input_shape, widths_items, key)
    graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    groups = tuple(module.channel_groups())
    spec = ModelSpec(name, num_classes, input_shape, widths_items)
    apply = _make_apply(graphdef, input_shape, frozenset(g.name for g in groups))
    return FunctionalModel(apply=apply, params=params, batch_stats=batch_stats, groups=groups,
                           spec=spec, unprunable=tuple(cls.UNPRUNABLE))


def input_kind(name: str) -> str:
    """'image' or 'tokens': what the zoo model `name` takes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return getattr(MODELS[name], "INPUT_KIND", "image")


def get_model(name: str, *, num_classes: int, input_shape, key, widths=None) -> FunctionalModel:
    """Builds a zoo model and returns it as a `FunctionalModel`.

    Args:
      name: one of `MODELS`.
      num_classes: classifier outputs.
      input_shape: (H, W, C) of one example, or (seq_len,) for a token model.
      key: PRNG key for the parameter initialisation.
      widths: optional {group name: channels} overriding the default widths (used to build
        compacted models); groups not named keep their default width.

    Raises:
      ValueError for an unknown name (listing the known ones), unknown width groups or
      non-positive widths (naming them), or a bad input_shape.
    """
    return _build(name, num_classes, input_shape, widths, key, abstract=False)


def model_from_spec(spec: ModelSpec, params, batch_stats) -> FunctionalModel:
    """The `FunctionalModel` of `spec` carrying the given params / batch_stats (no init).

    Raises:
      ValueError when the trees do not match the architecture's structure and shapes.
    """
    model = _build(spec.name, spec.num_classes, spec.input_shape, dict(spec.widths),
                   jax.random.key(0), abstract=True)
    for what, want, got in (("params", model.params, params),
                            ("batch_stats", model.batch_stats, batch_stats)):
        want_shapes = jax.tree.map(lambda a: tuple(a.shape), want)
        got_shapes = jax.tree.map(lambda a: tuple(a.shape), got)
        if want_shapes != got_shapes:
            raise ValueError(f"{spec.name}: {what} do not match the architecture of {spec}")
    return model._replace(params=params, batch_stats=batch_stats)


def compact_model(model: FunctionalModel, keep) -> FunctionalModel:
    """The physically smaller model that computes what `model` computes with channels masked.

    Args:
      model: a `FunctionalModel` (its params / batch_stats are the ones compacted).
      keep: {group name: bool[size]} for every group of `model.groups` (concrete arrays).

    Returns:
      A `FunctionalModel` built with the kept widths (`spec.widths` updated) carrying the
      sliced params and batch stats (see `structure.compact`).
    """
    params, batch_stats, widths = structure.compact(model.params, model.batch_stats,
                                                    model.groups, keep)
    spec = model.spec._replace(widths=tuple(widths.items()))
    return model_from_spec(spec, params, batch_stats)
