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
    ("BTNH,NHK->BTNK", (4, 2, 3), (4, 3), 0, (4, 3, 4, 2)),  # batched: heads in and out
    ("BD,DF->BD", (8, 4), None, 1, (4, 8)),  # row, a kernel-only letter: x replicated
    ("...D,DNH->...NH", (8, 4, 2), (4, 2), 1, (4, 3, 8)),  # an input ellipsis
    # flax's own equation, split on a dim of the kernel's ellipsis (batched)
    ("d...ab,bc...->ad...c", (4, 5, 6, 8), (6, 8, 5), -1, (8, 6, 8, 3, 4)),
    ("defab,bcef->adefc", (4, 5, 6, 8), (6, 8, 5), -1, (8, 6, 8, 3, 4)),
]


def assert_matches(layer, ref, x, mesh):
    """Forward, loss, input and parameter gradients of `layer` equal `ref`'s (nnx.Einsum on
    whole arrays); returns the compiled collectives of the layer's value-and-grad."""
    w = jax.random.normal(jax.random.key(2), jax.eval_shape(ref, x).shape)

    def loss(m, x):
        return jnp.sum(m(x) * w)

    want_y = jax.jit(lambda x: ref(x))(x)
    want_l, (want_g, want_dx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(ref, x)
    f = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    got_l, (got_g, got_dx) = f(layer, x)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    utils.assert_close(y, want_y)
    utils.assert_sharding(y, mesh, layer.output_spec(ndim=x.ndim))
    utils.assert_close(got_l, want_l)
    utils.assert_close(got_dx, want_dx)
    utils.assert_close(got_g["kernel"][...], want_g["kernel"][...])
    if ref.bias is not None:
        utils.assert_close(got_g["bias"][...], want_g["bias"][...])
    return shardlax.audit.collectives(f, layer, x, mesh=mesh)


def with_loss_sum(layer, declared, ndim):
    """`declared` plus the loss's own sum of the split output (GSPMD's: one f32 scalar per
    axis the output is split over)."""
    split = {a for e in layer.output_spec(ndim=ndim) if e
             for a in ((e,) if isinstance(e, str) else e)}  # fmt: skip
    return declared + [Declared("all-reduce", (a,), "f32", 1, 4, "loss") for a in sorted(split)]


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
    report = assert_matches(layer, ref, x, mesh)
    declared = with_loss_sum(layer, layer.declared_collectives(xshape, grad=True), len(xshape))
    cmp = shardlax.audit.compare(declared, report)
    assert cmp.ok, cmp.table()


def test_errors():
    mesh = utils.mesh(model=4)
    with pytest.raises(ValueError, match=r"4 does not divide 2 \(kernel dim 2 of"):
        ParallelEinsum("BSD,CDKH->CBSKH", (2, 8, 2, 2), shard_dim=2, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"subscripts 'DF' name 2 dims, the kernel has 3"):
        ParallelEinsum("BTD,DF->BTF", (8, 8, 2), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"must be explicit and include"):
        ParallelEinsum("BTD,DF", (8, 8), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kernel dim 0 of 'BTD,DF->BTF'.* another shard_dim"):
        ParallelEinsum("BTD,DF->BTF", (6, 8), shard_dim=0, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"bias_shape must list the output's kernel dims"):
        ParallelEinsum("BTD,DNH->BTNH", (8, 4, 2), (8,), shard_dim=1, mesh=mesh, rngs=nnx.Rngs(0))
    layer = ParallelEinsum("BTD,DNH->BTNH", (8, 4, 2), shard_dim=1, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"inputs.shape\[2\]=6 \(letter 'D'\) must equal .* 8"):
        layer(jnp.ones((4, 3, 6)))
    with pytest.raises(ValueError, match=r"rank 2, the equation's input 'BTD' has rank 3"):
        layer(jnp.ones((4, 8)))
    ell = ParallelEinsum("...D,DN->...N", (8, 4), (4,), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input '...D' has rank at least 1"):
        ell(jnp.ones(()))
    with pytest.raises(ValueError, match=r"is not an output dim here but is in '...D,DN->...N'"):
        ell(jnp.ones((4, 8)), einsum_str="...D,DN->...D")
    with pytest.raises(ValueError, match=r"letter 'D'\) must equal the kernel's 8; the split"):
        ParallelEinsum("BD,DN->BN", (8, 4), shard_dim=0, mesh=mesh, rngs=nnx.Rngs(0))(
            jnp.ones((4, 1))
        )


def test_flax_semantics_kept():
    """Ellipses, an int bias_shape, a call-time equation and the bias broadcast of nnx.Einsum."""
    mesh = utils.mesh(model=2)
    eq = "d...ab,bc...->ad...c"
    ref = nnx.Einsum(eq, (4, 5, 6, 8), (6, 8, 5), rngs=nnx.Rngs(0))
    layer = ParallelEinsum(eq, (4, 5, 6, 8), (6, 8, 5), mesh=mesh, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 6, 8, 3, 4))
    assert layer._infer_broadcasted_bias_shape(eq, x, layer.kernel) == (
        ref._infer_broadcasted_bias_shape(eq, x, ref.kernel[...])
    )
    utils.assert_close(nnx.jit(lambda m, x: m(x))(layer, x), jax.jit(lambda x: ref(x))(x))
    one = ParallelEinsum("ik,kj->ij", (5, 4), 4, mesh=mesh, rngs=nnx.Rngs(0))
    assert one.bias.shape == (4,)
    seen = []

    def capture(expr, *args, **kwargs):
        seen.append(expr)
        return jnp.einsum(expr, *args, **kwargs)

    cm = ParallelEinsum("ab,bc->ac", (3, 4), einsum_op=capture, mesh=mesh, rngs=nnx.Rngs(0))
    cm(jnp.ones((2, 3)), einsum_str="bi,io->bo")
    assert seen == ["bi,io->bo"]
    # shard_dim=None picks the last kernel dim the model axis divides (here e, a batched dim)
    auto = ParallelEinsum("defab,bcef->adefc", (4, 5, 6, 7), mesh=mesh, rngs=nnx.Rngs(0))
    assert auto.shard_dim == 2
    ref2 = nnx.Einsum("defab,bcef->adefc", (4, 5, 6, 7), rngs=nnx.Rngs(0))
    x2 = jax.random.normal(jax.random.key(3), (8, 6, 7, 3, 4))
    np.testing.assert_array_equal(
        nnx.jit(lambda m, x: m(x))(auto, x2), jax.jit(lambda x: ref2(x))(x2)
    )
    with pytest.raises(ValueError, match=r"\(size 2\): 2 divides none of its dims"):
        ParallelEinsum("bi,io->bo", (3, 5), mesh=mesh, rngs=nnx.Rngs(0))
    # unsplit (model=1), a bias of any shape with the right size is reshaped, as flax does
    m1 = utils.mesh(model=1)
    flat = ParallelEinsum(eq, (4, 5, 6, 7), (5, 6, 7), mesh=m1, rngs=nnx.Rngs(0))
    ref1 = nnx.Einsum(eq, (4, 5, 6, 7), (5, 6, 7), rngs=nnx.Rngs(0))
    x1 = jax.random.normal(jax.random.key(0), (8, 6, 7, 3, 4))
    np.testing.assert_array_equal(
        nnx.jit(lambda m, x: m(x))(flat, x1), jax.jit(lambda x: ref1(x))(x1)
    )


def test_custom_einsum_op_must_return_the_equation_shape():
    """The output is split by the equation's letters: an einsum_op that reshapes would move
    the split dim (silently another layout); refused with the fix."""
    mesh = utils.mesh(model=2)

    def reshaping(expr, *args, **kwargs):
        y = jnp.einsum(expr, *args, **kwargs)
        return y.reshape(y.shape[0], y.shape[2], y.shape[1])

    layer = ParallelEinsum("BTD,DF->BTF", (8, 4), shard_dim=1, einsum_op=reshaping, mesh=mesh,
                           rngs=nnx.Rngs(0))  # fmt: skip
    match = (
        r"einsum_op='reshaping'\): it returned shape \(4, 2, 3\) where 'BTD,DF->BTF' "
        r"gives \(4, 3, 2\).* reshape the layer's output"
    )
    with pytest.raises(ValueError, match=match):
        layer(jnp.ones((4, 3, 8)))
