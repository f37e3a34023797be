"""CIFAR ResNets (He et al. 2016): ResNet-20 / ResNet-56, and a CIFAR-style ResNet-18.

Layout and param paths:
  conv1, bn1                     3x3 stem (stride 1) writing into stage1's residual stream
  stage{s}.block{b}.conv1, bn1   3x3 conv, width argument 'stage{s}.block{b}.conv1'
  stage{s}.block{b}.conv2, bn2   3x3 conv writing into the stage's residual stream
  stage{s}.block0.shortcut_conv, shortcut_bn
                                 1x1 stride-2 projection, in the first block of every stage
                                 after the first (where the shape changes)
  classifier                     after global average pooling
Because the stage boundaries use projections, the residual stream of each stage has its own
width argument 'stage{s}' (the stem or the projection and every block's conv2 write into it),
and pruning finds it as one independent channel group (`models.discovery`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models import base


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) → ReLU."""

    def __init__(self, in_ch: int, inner: int, out_ch: int, *, stride: int, projection: bool,
                 rngs: nnx.Rngs):
        init = base.conv_init()
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

    def __call__(self, x, *, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        if self.projection:
            s = self.shortcut_bn(self.shortcut_conv(x), use_running_average=ura)
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
                projection=(b == 0 and index > 1), rngs=rngs))
            ch = widths[stream]

    def __call__(self, x, *, train: bool):
        for b in range(self.num_blocks):
            x = getattr(self, f"block{b}")(x, train=train)
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

    def __call__(self, x, *, train: bool):
        x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{s}")(x, train=train)
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
