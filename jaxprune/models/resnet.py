"""CIFAR ResNets (He et al. 2016): ResNet-20 / ResNet-56, and a CIFAR-style ResNet-18.

Layout and param paths:
  conv1, bn1                     3x3 stem (stride 1) writing into stage1's residual stream
  stage{s}.block{b}.conv1, bn1   3x3 conv, its own channel group 'stage{s}.block{b}.conv1'
  stage{s}.block{b}.conv2, bn2   3x3 conv writing into the stage's residual stream
  stage{s}.block0.shortcut_conv, shortcut_bn
                                 1x1 stride-2 projection, in the first block of every stage
                                 after the first (where the shape changes)
  classifier                     after global average pooling
Because the stage boundaries use projections, the residual stream of each stage is one
independent channel group 'stage{s}': the stem (for stage1) or the projection, plus every
block's conv2/bn2 of that stage, produce it; every block's conv1 (and the next stage's
projection, or the classifier) consume it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models import base
from jaxprune.structure import ChannelGroup


def _bn_paths(prefix, bn):
    return (prefix + (bn, "scale"), prefix + (bn, "bias")), (prefix + (bn, "mean"),
                                                               prefix + (bn, "var"))


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) → ReLU."""

    def __init__(self, in_ch: int, inner: int, out_ch: int, *, stride: int, projection: bool,
                 inner_group: str, stream_group: str, rngs: nnx.Rngs):
        init = base.conv_init()
        self.inner_group = inner_group
        self.stream_group = stream_group
        self.projection = projection
        self.conv1 = base.conv(in_ch, inner, 3, stride=stride, padding=1, rngs=rngs,
                               kernel_init=init)
        self.bn1 = base.batch_norm(inner, rngs=rngs)
        self.conv2 = base.conv(inner, out_ch, 3, padding=1, rngs=rngs, kernel_init=init)
        self.bn2 = base.batch_norm(out_ch, rngs=rngs)
        if projection:
            self.shortcut_conv = base.conv(in_ch, out_ch, 1, stride=stride, padding="VALID",
                                           rngs=rngs, kernel_init=init)
            self.shortcut_bn = base.batch_norm(out_ch, rngs=rngs)

    def __call__(self, x, *, train: bool, channel_masks=None):
        ura = not train
        y = self.bn1(self.conv1(x), use_running_average=ura)
        y = jax.nn.relu(base.mask_channels(y, channel_masks, self.inner_group))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        y = base.mask_channels(y, channel_masks, self.stream_group)
        if self.projection:
            s = self.shortcut_bn(self.shortcut_conv(x), use_running_average=ura)
            s = base.mask_channels(s, channel_masks, self.stream_group)
        else:
            s = x
        return jax.nn.relu(y + s)


class Stage(nnx.Module):
    """`num_blocks` basic blocks as attributes block0, block1, ... (plain str param paths)."""

    def __init__(self, index: int, in_ch: int, widths: dict, num_blocks: int, *, stride: int,
                 rngs: nnx.Rngs):
        stream = f"stage{index}"
        self.num_blocks = num_blocks
        ch = in_ch
        for b in range(num_blocks):
            inner = f"{stream}.block{b}.conv1"
            setattr(self, f"block{b}", BasicBlock(
                ch, widths[inner], widths[stream], stride=stride if b == 0 else 1,
                projection=(b == 0 and index > 1), inner_group=inner, stream_group=stream,
                rngs=rngs))
            ch = widths[stream]

    def __call__(self, x, *, train: bool, channel_masks=None):
        for b in range(self.num_blocks):
            x = getattr(self, f"block{b}")(x, train=train, channel_masks=channel_masks)
        return x


class CifarResNet(nnx.Module):
    """Basic-block ResNet for 32x32 inputs; subclasses set BLOCKS and STAGE_WIDTHS."""

    BLOCKS: tuple = ()
    STAGE_WIDTHS: tuple = ()
    UNPRUNABLE = (("conv1", "kernel"), ("classifier", "kernel"))

    @classmethod
    def default_widths(cls, input_shape) -> dict:
        del input_shape
        widths = {}
        for s, (n, c) in enumerate(zip(cls.BLOCKS, cls.STAGE_WIDTHS), start=1):
            widths[f"stage{s}"] = c
            for b in range(n):
                widths[f"stage{s}.block{b}.conv1"] = c
        return widths

    def __init__(self, *, num_classes: int, input_shape, widths: dict, rngs: nnx.Rngs):
        in_ch = input_shape[-1]
        self.widths = tuple(widths.items())
        self.num_stages = len(self.BLOCKS)
        init = base.conv_init()
        self.conv1 = base.conv(in_ch, widths["stage1"], 3, padding=1, rngs=rngs, kernel_init=init)
        self.bn1 = base.batch_norm(widths["stage1"], rngs=rngs)
        ch = widths["stage1"]
        for s, n in enumerate(self.BLOCKS, start=1):
            setattr(self, f"stage{s}", Stage(s, ch, widths, n, stride=1 if s == 1 else 2,
                                             rngs=rngs))
            ch = widths[f"stage{s}"]
        self.classifier = nnx.Linear(ch, num_classes, rngs=rngs)

    def channel_groups(self) -> tuple:
        w = dict(self.widths)
        groups = []
        for s, n in enumerate(self.BLOCKS, start=1):
            stream = f"stage{s}"
            if s == 1:
                bn_p, bn_s = _bn_paths((), "bn1")
                producers, stats = [("conv1", "kernel"), *bn_p], [*bn_s]
            else:
                pre = (stream, "block0")
                bn_p, bn_s = _bn_paths(pre, "shortcut_bn")
                producers, stats = [pre + ("shortcut_conv", "kernel"), *bn_p], [*bn_s]
            consumers = []
            for b in range(n):
                pre = (stream, f"block{b}")
                bn_p, bn_s = _bn_paths(pre, "bn2")
                producers += [pre + ("conv2", "kernel"), *bn_p]
                stats += bn_s
                if b > 0 or s == 1:  # block0 of a later stage reads the previous stream
                    consumers.append((pre + ("conv1", "kernel"), 1))
                inner = f"{stream}.block{b}.conv1"
                bn_p, bn_s = _bn_paths(pre, "bn1")
                groups.append(ChannelGroup(
                    inner, w[inner], producers=(pre + ("conv1", "kernel"), *bn_p),
                    consumers=((pre + ("conv2", "kernel"), 1),), stats=bn_s))
            if s < self.num_stages:
                nxt = (f"stage{s + 1}", "block0")
                consumers += [(nxt + ("conv1", "kernel"), 1),
                              (nxt + ("shortcut_conv", "kernel"), 1)]
            else:
                consumers += [(("classifier", "kernel"), 1)]
            groups.append(ChannelGroup(stream, w[stream], producers=tuple(producers),
                                       consumers=tuple(consumers), stats=tuple(stats)))
        order = {name: i for i, name in enumerate(w)}
        return tuple(sorted(groups, key=lambda g: order[g.name]))

    def __call__(self, x, *, train: bool, channel_masks=None):
        x = self.bn1(self.conv1(x), use_running_average=not train)
        x = jax.nn.relu(base.mask_channels(x, channel_masks, "stage1"))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{s}")(x, train=train, channel_masks=channel_masks)
        x = jnp.mean(x, axis=(1, 2))
        return self.classifier(x)


class ResNet20(CifarResNet):
    """ResNet-20 (3x3 blocks, 16/32/64): ≈0.27M params, ≈41M MACs at 32x32x3."""

    BLOCKS = (3, 3, 3)
    STAGE_WIDTHS = (16, 32, 64)


class ResNet56(CifarResNet):
    """ResNet-56 (3x9 blocks, 16/32/64): ≈0.86M params, ≈126M MACs at 32x32x3."""

    BLOCKS = (9, 9, 9)
    STAGE_WIDTHS = (16, 32, 64)


class ResNet18(CifarResNet):
    """CIFAR ResNet-18 (3x3 stem, no max-pool, 4x2 blocks, 64-512): ≈11.2M params."""

    BLOCKS = (2, 2, 2, 2)
    STAGE_WIDTHS = (64, 128, 256, 512)
