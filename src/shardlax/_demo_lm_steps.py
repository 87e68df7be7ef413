"""The demo's AdamW optimizer and train steps (sharded, and pure for the one-device runs)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax.models import TinyLM


def _optimizer(model: TinyLM, mesh, lr: float, weight_decay: float) -> nnx.Optimizer:
    """AdamW on the model's parameters, its scalars (step counts) placed on `mesh`.

    optax creates the counts on the default device; the jitted step returns
    them replicated over the mesh, and a second input sharding would compile
    the step a second time. Placing them on the mesh first keeps it to one.
    """
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)
    state = nnx.state(optimizer)
    replicated = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x.sharding, NamedSharding):
            return x
        value = np.asarray(x)  # built from the host value on every process: no transfer
        return jax.make_array_from_callback(value.shape, replicated, lambda idx: value[idx])

    state = jax.tree.map(place, state)
    nnx.update(optimizer, state)
    return optimizer


def _make_step():
    """An AdamW step on the model's own (sharded) parameters.

    Under FSDP + TP the layers already leave every gradient reduce-scattered
    or all-reduced to the layout of its parameter, so the optimizer update is
    elementwise on each device's shards: no collective of its own. One
    jitted function serves every model of the same structure and layout.
    """

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(inputs, targets))(model)
        optimizer.update(model, grads)
        return loss

    return step


def _pure_step(graphdef):
    """The same AdamW step on `nnx.split((model, optimizer))` states, for one graph.

    Two models of one structure then share one compiled program (`nnx.jit`
    compiles again for each model object): the reference and the permuted
    one-device runs compile once between them.
    """

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, inputs, targets):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: m.loss(inputs, targets))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return step


def _compile(step, *args):
    """`step` compiled for `args` (the jit cache keeps it: the first call does not compile)."""
    compiled = step.lower(*args).compile()
    return getattr(compiled, "compiled", compiled)  # nnx.jit wraps jax.stages.Compiled
