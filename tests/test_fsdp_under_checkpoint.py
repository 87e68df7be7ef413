"""FSDP under a user's checkpointed scan step: each parameter gathered twice, not three times.

The backward of a checkpointed step of a `lax.scan` re-runs the step, gather
included; `kernels.fsdp_call` sees it (`shardlax.kernels._remat.inside_checkpoint`) and keeps
the recomputation's gathered parameters for the backward instead of
gathering a third time (as TinyLM's and `fully_shard_scan`'s own remat do).
Outside a loop the re-gather stays (XLA:CPU merges the recomputation's
gather into the forward's). The gradients are those of the same model
without the checkpoint, and of the plain model on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from shardlax.kernels._remat import call_site_of_shard_map, inside_checkpoint
from tests import utils

pytestmark = pytest.mark.standard_dtype_promotion

D, LAYERS = 16, 3


def test_inside_checkpoint_reads_the_trace_stack():
    seen = {}

    def probe(name):
        def f(x):
            seen[name] = inside_checkpoint()
            return x * 2.0

        return f

    def scanned(step):
        return lambda x: jax.lax.scan(lambda c, _: (step(c), None), x, None, length=2)[0]

    probe("outside")(1.0)
    jax.jit(probe("jit"))(1.0)
    jax.grad(jax.checkpoint(probe("checkpoint")))(1.0)  # no loop: the re-gather stays
    jax.grad(scanned(jax.checkpoint(probe("checkpointed scan step"))))(1.0)
    jax.jit(jax.grad(scanned(jax.checkpoint(jax.jit(probe("jit in a step"))))))(1.0)
    jax.grad(scanned(jax.checkpoint(jax.grad(probe("grad in a step")))))(1.0)
    jax.grad(scanned(nnx.remat(probe("nnx.remat step"))))(1.0)
    jax.make_jaxpr(  # traced only: a while loop has no reverse-mode derivative
        lambda x: jax.lax.while_loop(lambda c: c < 4.0, jax.checkpoint(probe("while step")), x)
    )(1.0)
    mesh = utils.mesh(1, 2, 1, axis_types="auto")

    def smap(x):
        with call_site_of_shard_map():
            return jax.shard_map(probe("shard_map body"), mesh=mesh, in_specs=P(), out_specs=P())(x)

    jax.grad(lambda x: scanned(jax.checkpoint(smap))(x).sum())(jnp.ones(()))
    assert seen == {
        "outside": False,
        "jit": False,
        "checkpoint": False,
        "checkpointed scan step": True,
        "jit in a step": True,
        "grad in a step": False,
        "nnx.remat step": True,
        "while step": True,
        "shard_map body": True,
    }


def _gathers(compiled):
    return sum(c.kind == "all-gather" for c in audit.collectives(compiled))


def _x(mesh):
    x = jax.random.normal(jax.random.key(1), (8, D))
    return jax.device_put(x, NamedSharding(mesh, P("fsdp")))


class ScannedLayers(nnx.Module):
    """`LAYERS` layers stacked on a leading dim, one per step of a `lax.scan` (flax's pattern)."""

    def __init__(self, make, checkpoint):
        graphdef, _ = nnx.split(make(0))
        stacked = jax.tree.map(
            lambda *xs: jnp.stack(xs), *[nnx.state(make(i)) for i in range(LAYERS)]
        )
        for _, var in nnx.to_flat_state(stacked):
            meta = var.get_metadata()
            if meta.get("mesh") is not None:  # a shardlax layer: the spec gains the layer dim
                spec = P(None, *meta["out_sharding"])
                var.set_metadata("out_sharding", spec)
                var.set_value(jax.device_put(var.get_value(), NamedSharding(meta["mesh"], spec)))
        self.layers = nnx.merge(graphdef, stacked)
        self.checkpoint = checkpoint

    def __call__(self, x):
        graphdef, state = nnx.split(self.layers)

        def step(h, layer_state):
            return h + jnp.tanh(nnx.merge(graphdef, layer_state)(h)), None

        if self.checkpoint:
            step = jax.checkpoint(step)
        return jax.lax.scan(step, x, state)[0]


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "remat"])
def test_fsdp_layers_in_a_checkpointed_scan_gather_twice(checkpoint):
    utils.need_devices(4)
    mesh = shardlax.make_mesh(fsdp=4, devices=jax.devices()[:4])

    def layer(i):
        return shardlax.nn.ColumnParallelLinear(D, D, rngs=nnx.Rngs(i), mesh=mesh, fsdp_axis="fsdp")

    model = ScannedLayers(layer, checkpoint)
    x = _x(mesh)
    compiled = nnx.jit(nnx.grad(_loss)).lower(model, x).compile()
    # per loop step, kernel and bias: gathered in the forward loop; in the backward loop
    # recomputed under remat (and reused), else the kernel re-gathered (reshard_after_forward)
    assert _gathers(compiled) == (4 if checkpoint else 3)
    got = nnx.to_pure_dict(nnx.jit(nnx.grad(_loss))(model, x))
    plain = ScannedLayers(lambda i: nnx.Linear(D, D, rngs=nnx.Rngs(i)), checkpoint)
    want = nnx.to_pure_dict(nnx.grad(_loss)(plain, np.asarray(x)))
    jax.tree.map(utils.assert_close, utils.to_numpy(got), utils.to_numpy(want))
