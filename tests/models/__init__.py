"""A corpus of models written as people write them with plain Flax NNX 0.12.

Every model file has a constructor with tiny default sizes (`make(seed=0,
**sizes)`), `make_batch(key, batch_size) -> batch` (a dict of arrays whose
leading dim is the batch) and `loss_fn(model, batch) -> mean loss over batch`
(the `shardlax.Trainer` contract).

`CORPUS` maps a name to `(ctor, make_batch, loss_fn)`; `one_device_reference`
trains one of them with plain `nnx` + optax on ONE device: the reference every
sharded run is compared with (losses, parameters, non-parameter state).

Models with randomness (`cnn`'s `nnx.Dropout(rngs=...)`, `rngs_at_call`) draw
their masks from their own RNG streams; a sharded run equals the reference
bit for bit only where the trainer reproduces those draws, so exactness tests
may build them with `dropout_rate=0.0` and test the masks separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from tests.models import cnn, counter, decoder, mlp, recurrent, rngs_at_call, vit

#: name -> (ctor, make_batch, loss_fn)
CORPUS: dict[str, tuple[Callable[..., nnx.Module], Callable, Callable]] = {
    "mlp": (mlp.make, mlp.make_batch, mlp.loss_fn),
    "cnn": (cnn.make, cnn.make_batch, cnn.loss_fn),
    "vit": (vit.make, vit.make_batch, vit.loss_fn),
    "decoder": (decoder.make, decoder.make_batch, decoder.loss_fn),
    "decoder_linear": (decoder.make_linear, decoder.make_batch, decoder.loss_fn),
    "counter": (counter.make, counter.make_batch, counter.loss_fn),
    "rngs_at_call": (rngs_at_call.make, rngs_at_call.make_batch, rngs_at_call.loss_fn),
    "recurrent": (recurrent.make, recurrent.make_batch, recurrent.loss_fn),
}


class Reference(NamedTuple):
    """What one-device training produced."""

    losses: list[float]  #: loss of every step (before its update)
    grad_norms: list[float]  #: global norm of every step's gradient
    params: nnx.State  #: final `nnx.Param` state (numpy leaves)
    rest: nnx.State  #: final non-parameter state (batch stats, rng keys/counts, counters)
    opt_state: Any  #: final optimizer state (numpy leaves)
    first_grads: nnx.State  #: the gradients of the first step (numpy leaves)


def batches(make_batch: Callable, batch_size: int, n_steps: int, seed: int = 0) -> list:
    """`n_steps` batches of `batch_size` from keys 0.. of `seed`."""
    keys = jax.random.split(jax.random.key(seed), n_steps)
    return [make_batch(k, batch_size) for k in keys]


def host(tree):
    """Every leaf as a numpy array; typed PRNG keys as their `key_data` (uint32).

    Apply it to both sides of a comparison (e.g. a `TrainState.rest` and
    `Reference.rest`).
    """

    def leaf(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def logical(tree) -> dict:
    """{dotted nnx path: host leaf} (`fully_shard` units keep their modules' paths, so a
    wrapped model's state compares with the plain model's as it is)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(host(tree))[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out[".".join(k for k in keys if k != "value")] = x
    return out


def one_device_reference(
    ctor: Callable[[], nnx.Module],
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    tx: optax.GradientTransformation,
    batches: Sequence[Any],
) -> Reference:
    """Train `ctor()` on `batches` with plain nnx + optax on one device.

    The step is `nnx.jit` of `nnx.value_and_grad(loss_fn)` (gradients of the
    `nnx.Param`s; every other Variable the forward mutates is carried by nnx)
    and `nnx.Optimizer(model, tx, wrt=nnx.Param).update`. Batches are copied
    to the first device whatever their sharding. Runs under standard dtype
    promotion (optax mixes Python scalars with int32 step counts).
    """
    device = jax.devices()[0]
    with jax.default_device(device), jax.numpy_dtype_promotion("standard"):
        model = ctor()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, batch):
            loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
            optimizer.update(model, grads)
            return loss, optax.tree.norm(grads), grads

        losses, norms, first = [], [], None
        for batch in batches:
            batch = jax.tree.map(lambda x: jax.device_put(np.asarray(x), device), batch)
            loss, norm, grads = step(model, optimizer, batch)
            first = grads if first is None else first
            losses.append(float(loss))
            norms.append(float(norm))
        return Reference(
            losses=losses,
            grad_norms=norms,
            params=host(nnx.state(model, nnx.Param)),
            rest=host(nnx.state(model, nnx.Not(nnx.Param))),
            opt_state=host(nnx.state(optimizer, nnx.optimizer.OptState)),
            first_grads=host(first),
        )


__all__ = ["CORPUS", "Reference", "batches", "host", "logical", "one_device_reference"]
