"""LeNet-5 and a LeNet-300-100 style MLP (small models for digits / MNIST / CIFAR smoke runs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models import base
from jaxprune.structure import ChannelGroup


class LeNet5(nnx.Module):
    """LeNet-5 with ReLU: conv5x5(6), pool, conv5x5(16), pool, fc(120), fc(84), classifier.

    Padding adapts to the input so that every supported size works: conv1 uses SAME below
    32 px (for 28x28 this is the classic pad-to-32), conv2 uses SAME when its input is below
    10 px (8x8 sklearn digits), VALID otherwise. So 32x32 and 28x28 inputs give a 5x5x16 map,
    8x8 gives 2x2x16. Groups: 'conv1', 'conv2', 'fc1', 'fc2' (no BatchNorm).
    """

    UNPRUNABLE = (("conv1", "kernel"), ("classifier", "kernel"))

    @staticmethod
    def default_widths(input_shape) -> dict:
        del input_shape
        return {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}

    def __init__(self, *, num_classes: int, input_shape, widths: dict, rngs: nnx.Rngs):
        h, w, c = input_shape
        pad1 = "VALID" if min(h, w) >= 32 else "SAME"
        h1, w1 = (h - 4, w - 4) if pad1 == "VALID" else (h, w)
        h1, w1 = h1 // 2, w1 // 2
        pad2 = "VALID" if min(h1, w1) >= 10 else "SAME"
        h2, w2 = (h1 - 4, w1 - 4) if pad2 == "VALID" else (h1, w1)
        h2, w2 = h2 // 2, w2 // 2
        if min(h2, w2) < 1:
            raise ValueError(f"lenet5: input_shape {tuple(input_shape)} is too small")
        self.spatial = h2 * w2
        self.widths = tuple(widths.items())
        self.conv1 = base.conv(c, widths["conv1"], 5, padding=pad1, use_bias=True, rngs=rngs)
        self.conv2 = base.conv(widths["conv1"], widths["conv2"], 5, padding=pad2, use_bias=True,
                               rngs=rngs)
        self.fc1 = nnx.Linear(self.spatial * widths["conv2"], widths["fc1"], rngs=rngs)
        self.fc2 = nnx.Linear(widths["fc1"], widths["fc2"], rngs=rngs)
        self.classifier = nnx.Linear(widths["fc2"], num_classes, rngs=rngs)

    def channel_groups(self) -> tuple:
        w = dict(self.widths)

        def layer(name, consumer, spatial=1):
            return ChannelGroup(name, w[name], producers=((name, "kernel"), (name, "bias")),
                                consumers=(((consumer, "kernel"), spatial),))

        return (layer("conv1", "conv2"), layer("conv2", "fc1", self.spatial),
                layer("fc1", "fc2"), layer("fc2", "classifier"))

    def __call__(self, x, *, train: bool, channel_masks=None):
        del train  # no BatchNorm / dropout
        m = lambda y, g: base.mask_channels(y, channel_masks, g)  # noqa: E731
        x = base.max_pool2(jax.nn.relu(m(self.conv1(x), "conv1")))
        x = base.max_pool2(jax.nn.relu(m(self.conv2(x), "conv2")))
        x = x.reshape((x.shape[0], -1))
        x = jax.nn.relu(m(self.fc1(x), "fc1"))
        x = jax.nn.relu(m(self.fc2(x), "fc2"))
        return self.classifier(x)


class MLP(nnx.Module):
    """LeNet-300-100: flatten → fc(300) → fc(100) → classifier, ReLU. Groups 'fc1', 'fc2'.

    Only the classifier kernel is unprunable by default: there is no first conv, and the first
    dense layer holds most of the weights (it is pruned in the classic MLP pruning results).
    """

    UNPRUNABLE = (("classifier", "kernel"),)

    @staticmethod
    def default_widths(input_shape) -> dict:
        del input_shape
        return {"fc1": 300, "fc2": 100}

    def __init__(self, *, num_classes: int, input_shape, widths: dict, rngs: nnx.Rngs):
        features = 1
        for d in input_shape:
            features *= int(d)
        self.widths = tuple(widths.items())
        self.fc1 = nnx.Linear(features, widths["fc1"], rngs=rngs)
        self.fc2 = nnx.Linear(widths["fc1"], widths["fc2"], rngs=rngs)
        self.classifier = nnx.Linear(widths["fc2"], num_classes, rngs=rngs)

    def channel_groups(self) -> tuple:
        w = dict(self.widths)
        return (
            ChannelGroup("fc1", w["fc1"], producers=(("fc1", "kernel"), ("fc1", "bias")),
                         consumers=((("fc2", "kernel"), 1),)),
            ChannelGroup("fc2", w["fc2"], producers=(("fc2", "kernel"), ("fc2", "bias")),
                         consumers=((("classifier", "kernel"), 1),)),
        )

    def __call__(self, x, *, train: bool, channel_masks=None):
        del train
        x = jnp.reshape(x, (x.shape[0], -1))
        x = jax.nn.relu(base.mask_channels(self.fc1(x), channel_masks, "fc1"))
        x = jax.nn.relu(base.mask_channels(self.fc2(x), channel_masks, "fc2"))
        return self.classifier(x)
