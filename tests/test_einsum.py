"""ParallelEinsum against nnx.Einsum: same parameters, forward, gradients, declared collectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax.audit import Declared
from shardlax.nn import ParallelEinsum
from tests import utils

# (equation, kernel shape, bias shape, split dim, input shape)
CASES = [
    ("BTD,DNH->BTNH", (8, 4, 2), (4, 2), 1, (4, 3, 8)),  # column: heads
    ("BSD,CDKH->CBSKH", (2, 8, 2, 2), None, 2, (4, 3, 8)),  # column: kv heads of [k; v]
    ("BTNH,NHD->BTD", (4, 2, 8), (8,), 0, (4, 3, 4, 2)),  # row: heads contracted
]


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 1, 4)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_nnx_einsum(case, shape):
    eq, kshape, bshape, dim, xshape = case
    mesh = utils.mesh(*shape)
    if kshape[dim] % mesh.shape["model"]:
        pytest.skip("split dim not divisible")
    ref = nnx.Einsum(eq, kshape, bshape, rngs=nnx.Rngs(0))
    layer = ParallelEinsum(eq, kshape, bshape, shard_dim=dim, mesh=mesh, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])
    want = [None] * len(kshape)
    want[dim] = "model"
    utils.assert_sharding(layer.kernel[...], mesh, P(*want))
    x = jax.random.normal(jax.random.key(1), xshape)
    w = jax.random.normal(jax.random.key(2), jax.eval_shape(ref, x).shape)

    def loss(m, x):
        return jnp.sum(m(x) * w)

    want_y = jax.jit(lambda x: ref(x))(x)
    want_l, (want_g, want_dx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(ref, x)
    f = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    got_l, (got_g, got_dx) = f(layer, x)
    utils.assert_close(nnx.jit(lambda m, x: m(x))(layer, x), want_y)
    utils.assert_close(got_l, want_l)
    utils.assert_close(got_dx, want_dx)
    utils.assert_close(got_g["kernel"][...], want_g["kernel"][...])
    if bshape is not None:
        utils.assert_close(got_g["bias"][...], want_g["bias"][...])
    report = shardlax.audit.collectives(f, layer, x, mesh=mesh)
    declared = layer.declared_collectives(xshape, grad=True)
    # the loss's own sum of the split output is GSPMD's: one f32 scalar per split axis
    split = {a for e in layer.output_spec() if e for a in ((e,) if isinstance(e, str) else e)}
    declared += [Declared("all-reduce", (a,), "f32", 1, 4, "loss") for a in sorted(split)]
    cmp = shardlax.audit.compare(declared, report)
    assert cmp.ok, cmp.table()


def test_errors():
    mesh = utils.mesh(model=4)
    with pytest.raises(ValueError, match=r"4 does not divide 2 \(letter 'K'"):
        ParallelEinsum("BSD,CDKH->CBSKH", (2, 8, 2, 2), shard_dim=2, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"letter 'D' appears in the input and the output"):
        ParallelEinsum("BTD,DF->BTD", (8, 8), shard_dim=0, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"must be explicit and include"):
        ParallelEinsum("BTD,DF", (8, 8), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"bias_shape must list the output's kernel dims"):
        ParallelEinsum("BTD,DNH->BTNH", (8, 4, 2), (8,), shard_dim=1, mesh=mesh, rngs=nnx.Rngs(0))
    layer = ParallelEinsum("BTD,DNH->BTNH", (8, 4, 2), shard_dim=1, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"inputs.shape\[2\]=6 \(letter 'D'\) must equal .* 8"):
        layer(jnp.ones((4, 3, 6)))
