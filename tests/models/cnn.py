"""A small CNN as in the flax MNIST example: Conv + BatchNorm + Dropout + Linear head.

NHWC images of 8x8x3, 5 classes. `model.train()` / `model.eval()` switch
BatchNorm's running averages and Dropout, as in plain flax. The model is built
in training mode (batch statistics, dropout on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tests.models._common import cross_entropy

SIZE, CHANNELS_IN, CLASSES = 8, 3, 5


class CNN(nnx.Module):
    def __init__(
        self,
        channels: int = 4,
        num_classes: int = CLASSES,
        dropout_rate: float = 0.25,
        *,
        rngs: nnx.Rngs,
    ):
        c = channels
        # no conv bias before a BatchNorm (as flax's ResNet example writes it): the mean
        # subtraction cancels it, its true gradient is exactly 0, and Adam would turn the
        # f32 rounding of that 0 (which depends on the summation order) into full steps
        self.conv1 = nnx.Conv(CHANNELS_IN, c, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c, use_running_average=False, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(c, 2 * c, kernel_size=(3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * c, use_running_average=False, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        half = SIZE // 2
        self.head = nnx.Linear(half * half * 2 * c, num_classes, rngs=rngs)

    def __call__(self, x):
        # x: f32[B, 8, 8, 3]
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))  # [B, 4, 4, 2c]
        x = self.dropout(x.reshape(x.shape[0], -1))
        return self.head(x)


def make(seed: int = 0, **kwargs) -> CNN:
    return CNN(rngs=nnx.Rngs(seed), **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "image": jax.random.normal(kx, (batch_size, SIZE, SIZE, CHANNELS_IN)),
        "label": jax.random.randint(ky, (batch_size,), 0, CLASSES, jnp.int32),
    }


def loss_fn(model: CNN, batch) -> jax.Array:
    return cross_entropy(model(batch["image"]), batch["label"])
