"""Column/RowParallelLinear and ParallelEinsum take what nnx.Linear / nnx.Einsum take."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from tests import utils

PAIRS = [
    (shardlax.nn.ColumnParallelLinear, nnx.Linear),
    (shardlax.nn.RowParallelLinear, nnx.Linear),
    (shardlax.nn.ParallelEinsum, nnx.Einsum),
]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_every_flax_argument_is_accepted(ours, theirs):
    for name in ("__init__", "__call__"):
        mine = inspect.signature(getattr(ours, name)).parameters
        for arg, p in inspect.signature(getattr(theirs, name)).parameters.items():
            assert arg in mine, f"{ours.__name__}.{name} lacks {arg}"
            assert mine[arg].kind == p.kind, arg
            if p.default is not inspect.Parameter.empty and arg != "kernel_init":
                assert mine[arg].default == p.default or callable(p.default), arg


def test_metadata_with_partitioning_and_out_sharding():
    mesh = utils.mesh(2, 1, 2)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    ref = nnx.Linear(8, 4, kernel_init=nnx.initializers.lecun_normal(), rngs=nnx.Rngs(0))
    col = shardlax.nn.ColumnParallelLinear(
        8, 4, kernel_init=init, kernel_metadata={"tag": "q"}, bias_metadata={"tag": "b"},
        mesh=mesh, rngs=nnx.Rngs(0),
    )  # fmt: skip
    # same values as flax, the logical names kept as metadata, placement shardlax's
    np.testing.assert_array_equal(col.kernel[...], ref.kernel[...])
    assert col.kernel.get_metadata()["tag"] == "q" and col.bias.get_metadata()["tag"] == "b"
    utils.assert_sharding(col.kernel[...], mesh, P(None, "model"))
    row = shardlax.nn.RowParallelLinear(4, 8, mesh=mesh, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (4, 8))
    want = NamedSharding(mesh, P("data", None))
    y = jax.jit(lambda x: row(col(x), out_sharding=want))(x)
    assert y.sharding.is_equivalent_to(want, 2)
    ref_row = nnx.Linear(4, 8, rngs=nnx.Rngs(1))
    utils.assert_close(y, ref_row(ref(x)))
    y = jax.jit(lambda x: col(x, out_sharding=P("data", None)))(x)
    utils.assert_sharding(y, mesh, P("data", None))
    utils.assert_close(y, ref(x))


def test_einsum_metadata():
    mesh = utils.mesh(1, 1, 2)
    e = shardlax.nn.ParallelEinsum(
        "BD,DF->BF", (8, 4), kernel_metadata={"tag": 1}, shard_dim=1, mesh=mesh,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    assert e.kernel.get_metadata()["tag"] == 1
    y = jax.jit(lambda x: e(x, out_sharding=P()))(jnp.ones((2, 8)))
    utils.assert_sharding(y, mesh, P())
