"""Prunable structure: channel groups that must be removed together, and compaction.

A *channel group* is a set of channels that has to be pruned as one: the output channels of
a conv (with its BatchNorm), or every tensor that writes into a ResNet stage's residual stream.
Models declare their groups; this module turns per-group channel keeps into param masks and
into a physically smaller model. It works on plain pytrees and never imports Flax.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together.

    Attributes:
      name: unique group name, e.g. "stage1" or "block3.conv1".
      size: number of channels in the current (dense) model.
      producers: param paths whose LAST axis indexes these channels (kernel out axis, its
        bias, BatchNorm scale and bias).
      consumers: (kernel path, spatial) pairs whose INPUT axis (axis -2) is indexed by these
        channels. `spatial > 1` when an (H, W, C) feature map is flattened into a Dense layer:
        the Dense input index of channel c at position p is p * C + c.
      stats: batch-stat paths (BatchNorm mean / var) indexed on the last axis.
    """

    name: str
    size: int
    producers: Tuple[Path, ...]
    consumers: Tuple[Tuple[Path, int], ...] = ()
    stats: Tuple[Path, ...] = ()
