"""LeNet-5 and a LeNet-300-100 style MLP (small models for digits / MNIST / CIFAR smoke runs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models import base


class LeNet5(nnx.Module):
    """LeNet-5 with ReLU: conv5x5(6), pool, conv5x5(16), pool, fc(120), fc(84), classifier.

    Padding adapts to the input so that every supported size works: conv1 uses SAME below
    32 px (for 28x28 this is the classic pad-to-32), conv2 uses SAME when its input is below
    10 px (8x8 sklearn digits), VALID otherwise. So 32x32 and 28x28 inputs give a 5x5x16 map,
    8x8 gives 2x2x16. Width arguments: 'conv1', 'conv2', 'fc1', 'fc2' (no BatchNorm).
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
        self.conv1 = base.conv(c, widths["conv1"], 5, padding=pad1, use_bias=True, rngs=rngs)
        self.conv2 = base.conv(widths["conv1"], widths["conv2"], 5, padding=pad2, use_bias=True,
                               rngs=rngs)
        self.fc1 = nnx.Linear(self.spatial * widths["conv2"], widths["fc1"], rngs=rngs)
        self.fc2 = nnx.Linear(widths["fc1"], widths["fc2"], rngs=rngs)
        self.classifier = nnx.Linear(widths["fc2"], num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool):
        del train  # no BatchNorm / dropout
        x = base.max_pool2(jax.nn.relu(self.conv1(x)))
        x = base.max_pool2(jax.nn.relu(self.conv2(x)))
        x = x.reshape((x.shape[0], -1))
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.classifier(x)


class MLP(nnx.Module):
    """LeNet-300-100: flatten → fc(300) → fc(100) → classifier, ReLU. Widths 'fc1', 'fc2'.

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
        self.fc1 = nnx.Linear(features, widths["fc1"], rngs=rngs)
        self.fc2 = nnx.Linear(widths["fc1"], widths["fc2"], rngs=rngs)
        self.classifier = nnx.Linear(widths["fc2"], num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool):
        del train
        x = jnp.reshape(x, (x.shape[0], -1))
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.classifier(x)
