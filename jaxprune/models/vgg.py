"""VGG-16 for CIFAR: 13 conv3x3 + BatchNorm + ReLU layers and one linear classifier."""
from __future__ import annotations

import jax
from flax import nnx

from jaxprune.models import base

# Output channels of the 13 convs; 'M' = 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nnx.Module):
    """CIFAR VGG-16 with BatchNorm (≈14.7M params at 32x32x3, 10 classes).

    Layers conv1..conv13 (bias-free, each followed by bn1..bn13 and ReLU), five 2x2 max-pools,
    flatten, `classifier`. A pool is skipped when the feature map is already 1 px high or wide,
    so small test inputs (8x8, 16x16) work; at 32x32 the flattened map is 1x1x512.
    Width arguments 'conv1'..'conv13' (each conv's output channels).
    """

    UNPRUNABLE = (("conv1", "kernel"), ("classifier", "kernel"))

    @staticmethod
    def default_widths(input_shape) -> dict:
        del input_shape
        return {f"conv{i + 1}": c for i, c in enumerate(v for v in _VGG16 if v != "M")}

    def __init__(self, *, num_classes: int, input_shape, widths: dict, rngs: nnx.Rngs):
        h, w, in_ch = input_shape
        pools = []  # pool after conv i?
        i = 0
        for v in _VGG16:
            if v == "M":
                do_pool = min(h, w) >= 2
                pools[-1] = do_pool
                if do_pool:
                    h, w = h // 2, w // 2
                continue
            i += 1
            name = f"conv{i}"
            setattr(self, name, base.conv(in_ch, widths[name], 3, rngs=rngs,
                                          kernel_init=base.conv_init()))
            setattr(self, f"bn{i}", base.batch_norm(widths[name], rngs=rngs))
            pools.append(False)
            in_ch = widths[name]
        self.num_convs = i
        self.pools = tuple(pools)
        self.spatial = h * w
        self.classifier = nnx.Linear(self.spatial * in_ch, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool):
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"conv{i}")(x)
            x = getattr(self, f"bn{i}")(x, use_running_average=not train)
            x = jax.nn.relu(x)
            if self.pools[i - 1]:
                x = base.max_pool2(x)
        x = x.reshape((x.shape[0], -1))
        return self.classifier(x)
