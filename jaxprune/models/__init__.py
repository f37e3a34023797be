"""Model zoo: plain Flax NNX modules, used functionally.

    model = get_model("resnet20", num_classes=10, input_shape=(32, 32, 3), key=key)
    logits, batch_stats = model.apply(model.params, model.batch_stats, x, train=True)
    discovery(model).groups        # channel groups found in its program, named by its widths
    small = with_widths(model, {"stage1": 8}, params, batch_stats)   # a narrower module

The modules hold no pruning code: their channel groups come from `discover.discover_groups`
(`discovery` names each after the width argument that sizes it), and a compacted model is the
same module built at the kept widths around the variables `surgery.slice_variables` cut.
`apply` is pure; wrap it (or the step that calls it) in `jax.jit`. It merges the NNX graph
inside, which costs Python time at trace time only.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import checks
from jaxprune import discover
from jaxprune import structure
from jaxprune.models.base import FunctionalModel, ModelSpec, resolve_widths
from jaxprune.models.lenet import MLP, LeNet5
from jaxprune.models.resnet import ResNet18, ResNet20, ResNet56
from jaxprune.models.transformer import TransformerClassifier
from jaxprune.models.vgg import VGG16

__all__ = ["MODELS", "FunctionalModel", "ModelSpec", "get_model", "model_from_spec",
           "discovery", "channel_groups", "with_widths"]

# name -> NNX module class with `default_widths(input_shape)` (its width arguments), UNPRUNABLE
# and `__call__(x, *, train)`.
MODELS = {
    "lenet5": LeNet5,
    "mlp": MLP,
    "vgg16": VGG16,
    "resnet20": ResNet20,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "transformer": TransformerClassifier,
}
CONFIG_CHECKS = {"model.name": checks.choice(MODELS)}  # `config_checks` reads it
# What a model's input is (class attribute INPUT_KIND): 'image' (H, W, C) floats, or 'tokens'
# (seq_len,) int32 ids; it must match the dataset's `kind`.
INPUT_RANK = {"image": 3, "tokens": 1}
INPUT_DTYPES = {"image": jnp.float32, "tokens": jnp.int32}  # what `apply` takes (input_example)


def _make_apply(graphdef, input_shape: tuple):
    """The pure apply closure for one architecture (graphdef is static)."""

    def apply(params, batch_stats, x, *, train: bool):
        if tuple(x.shape[1:]) != input_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (batch, *{input_shape})")
        module = nnx.merge(graphdef, nnx.State(params), nnx.State(batch_stats))
        logits = module(x, train=train)
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
    resolved = resolve_widths(name, _default_widths(name, input_shape, widths), widths)
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
    spec = ModelSpec(name, num_classes, input_shape, widths_items)
    return FunctionalModel(apply=_make_apply(graphdef, input_shape), params=params,
                           batch_stats=batch_stats, spec=spec, unprunable=tuple(cls.UNPRUNABLE))


def _default_widths(name: str, input_shape, widths=None) -> dict:
    """{width argument: default} of the zoo model `name`: the class's `default_widths`, plus the
    widths that default to others' values (`derived_widths`, e.g. the Transformer's per-block
    heads and FFN, one pair per layer), derived from `widths` where it sets those others."""
    cls = MODELS[name]
    defaults = cls.default_widths(input_shape)
    derive = getattr(cls, "derived_widths", None)
    if derive is None:
        return defaults
    given = {k: v for k, v in (widths or {}).items() if k in defaults}
    return {**defaults, **derive(resolve_widths(name, defaults, given))}


def input_kind(name: str) -> str:
    """'image' or 'tokens': what the zoo model `name` takes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return getattr(MODELS[name], "INPUT_KIND", "image")


def input_example(spec: ModelSpec, batch: int = 1) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a batch of `batch` inputs of `spec`'s model: float32 images
    (normalised pixels) or int32 token ids (`INPUT_DTYPES`)."""
    return jax.ShapeDtypeStruct((int(batch), *spec.input_shape),
                                INPUT_DTYPES[input_kind(spec.name)])


def get_model(name: str, *, num_classes: int, input_shape, key, widths=None) -> FunctionalModel:
    """Builds a zoo model and returns it as a `FunctionalModel`.

    Args:
      name: one of `MODELS`.
      num_classes: classifier outputs.
      input_shape: (H, W, C) of one example, or (seq_len,) for a token model.
      key: PRNG key for the parameter initialisation.
      widths: optional {width argument: channels} overriding the default widths (used to build
        compacted models); arguments not named keep their default width.

    Raises:
      ValueError for an unknown name (listing the known ones), unknown width arguments or
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


# Width of every argument in the probe build of `_width_names`: distinct, and far from any
# other axis size of the zoo (input channels, classes), so a leaf's axis names its argument.
_PROBE_WIDTH = 4099
_DISCOVERED: dict = {}  # ModelSpec -> discover.Discovery named by width arguments


def discovery(model: FunctionalModel) -> discover.Discovery:
    """The model's channel groups as `discover.discover_groups` finds them in its program,
    each named after the width argument that sets its size (`spec.widths`: 'conv2',
    'stage1.block0.conv1', ...) and in their order. Traced once per `spec` (shapes only).

    Width arguments the class lists in `FIXED_WIDTHS` (the Transformer's vocab, embed, layers
    and shared heads / ffn) shape the model but size no group; every other one sizes exactly
    one group (the Transformer's `block{i}.heads`, `block{i}.ffn`).

    Raises:
      ValueError when a prunable group is not set by exactly one width argument (a model whose
      program couples two arguments could not be rebuilt at the kept widths), or when its
      other width arguments are not independent channel widths.
    """
    spec = model.spec
    if spec not in _DISCOVERED:
        shapes = jax.eval_shape(lambda: {"params": model.params,
                                         "batch_stats": model.batch_stats})
        found = discover.discover_groups(
            lambda v, x: model.apply(v["params"], v["batch_stats"], x, train=False)[0],
            shapes, input_example(spec))
        names = _width_names(spec, found)
        order = {name: i for i, (name, _) in enumerate(spec.widths)}
        groups = sorted((dataclasses.replace(g, name=names[g.name]) for g in found.groups),
                        key=lambda g: order[g.name])
        _DISCOVERED[spec] = found._replace(groups=tuple(groups))
    return _DISCOVERED[spec]


def _width_names(spec: ModelSpec, found: discover.Discovery) -> dict:
    """{discovered group name: width argument}: the argument whose size a group's producers
    take in a probe build where every argument but the `FIXED_WIDTHS` has its own width."""
    fixed = getattr(MODELS[spec.name], "FIXED_WIDTHS", ())
    names = [name for name, _ in spec.widths if name not in fixed]
    probe_widths = dict(spec.widths, **{name: _PROBE_WIDTH + i for i, name in enumerate(names)})
    try:
        probe = _build(spec.name, spec.num_classes, spec.input_shape, probe_widths,
                       jax.random.key(0), abstract=True)
    except ValueError as e:  # a module whose arguments constrain each other
        raise ValueError(f"{spec.name}: its width arguments ({', '.join(names)}) are not all "
                         f"independent channel widths, so its discovered groups cannot be named "
                         f"after them (the probe build at distinct widths fails: {e}); use "
                         f"discover.discover_groups on its apply instead") from e
    shapes = dict(structure.leaves_with_paths(
        {"params": probe.params, "batch_stats": probe.batch_stats})[0])
    out = {}
    for g in found.groups:
        hit = {shapes[m.path].shape[m.axis] - _PROBE_WIDTH for m in g.members
               if m.role != "consumer"}
        if len(hit) != 1 or not 0 <= min(hit) < len(names):
            raise ValueError(f"{spec.name}: channel group {g.name!r} is not sized by one width "
                             f"argument ({sorted(names)}), so its kept widths cannot be built")
        out[g.name] = names[hit.pop()]
    if sorted(out.values()) != sorted(names):
        raise ValueError(f"{spec.name}: width arguments {sorted(set(names) - set(out.values()))} "
                         f"size no prunable channel group of the traced model")
    return out


def channel_groups(model: FunctionalModel) -> tuple:
    """`discovery(model)` as `structure.ChannelGroup`s (param masks, scores, costs)."""
    return discovery(model).channel_groups()


def with_widths(model: FunctionalModel, widths: dict, params, batch_stats) -> FunctionalModel:
    """The model rebuilt at other widths ({width argument: channels}; those not named keep
    theirs) carrying `params` / `batch_stats` of those shapes, e.g. the variables that
    `surgery.slice_variables` cut from it: a narrower Flax module to restore and fine-tune.

    Raises:
      ValueError naming an unknown width argument, or when the variables do not fit.
    """
    resolved = resolve_widths(model.spec.name, dict(model.spec.widths), widths)
    return model_from_spec(model.spec._replace(widths=tuple(resolved.items())), params,
                           batch_stats)
