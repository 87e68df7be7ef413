"""ParallelEinsum with sequence parallelism (Megatron-SP) against nnx.Einsum on whole arrays:
forward, gradients (parameters and input), the compiled collectives against the declaration,
a column -> row pair trained inside the Trainer, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import shardlax
from shardlax.declarations import Role
from shardlax.nn import ParallelEinsum
from tests import utils
from tests.test_einsum import assert_matches, with_loss_sum

pytestmark = pytest.mark.standard_dtype_promotion  # optax's reference update on one device

# (equation, kernel shape, bias shape, split dim, input shape)
CASES = [
    ("BTD,DNH->BTNH", (8, 4, 2), (4, 2), 1, (4, 8, 8)),  # column: heads; x split on T
    ("BSD,CDKH->CBSKH", (2, 8, 2, 2), None, 2, (4, 8, 8)),  # column: kv heads; S stays dim 2
    ("BTNH,NHD->BTD", (4, 2, 8), (8,), 0, (4, 8, 4, 2)),  # row: the sum scattered over T
    ("BTF,FD->BTD", (8, 6), (6,), 0, (2, 4, 8)),  # row of a plain projection
]


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 1, 2), (1, 1, 4)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sequence_parallel_matches_nnx_einsum(case, shape):
    eq, kshape, bshape, dim, xshape = case
    mesh = utils.mesh(*shape)
    n = mesh.shape["model"]
    if kshape[dim] % n or xshape[1] % n or xshape[0] % mesh.shape["data"]:
        pytest.skip("not divisible on this mesh")
    ref = nnx.Einsum(eq, kshape, bshape, rngs=nnx.Rngs(0))
    layer = ParallelEinsum(eq, kshape, bshape, shard_dim=dim, mesh=mesh, rngs=nnx.Rngs(0),
                           sequence_parallel=True)  # fmt: skip
    x = jax.random.normal(jax.random.key(1), xshape)
    column = layer.column
    # column-like: the input arrives split over the sequence; row-like: the output leaves so
    x_in = layer.input_spec(ndim=len(xshape))
    y_out = layer.output_spec(ndim=len(xshape))
    assert (x_in[1] == "model") == column and (y_out[1] == "model") == (not column)
    report = assert_matches(layer, ref, x, mesh)
    declared = layer.declared_collectives(xshape, grad=True)
    kinds = {d.kind for d in declared if d.axes == ("model",) and d.role is not Role.GRAD_REDUCE}
    if n > 1:  # SP: gathers and scatters over the model axis, never an all-reduce of x or y
        assert kinds == {"all-gather", "reduce-scatter"}, declared
    declared = with_loss_sum(layer, declared, len(xshape))
    cmp = shardlax.audit.compare(declared, report)
    assert cmp.ok, cmp.table()


class Attn(nnx.Module):
    """A head-split projection pair, Megatron-SP: [B, S/N, D] in and out."""

    def __init__(self, rngs, mesh=None, sp=False):
        kw = dict(mesh=mesh, sequence_parallel=sp) if mesh is not None else {}
        cls = ParallelEinsum if mesh is not None else nnx.Einsum
        self.q = cls("BTD,DNH->BTNH", (8, 4, 2), (4, 2), rngs=rngs,
                     **(dict(kw, shard_dim=1) if kw else {}))  # fmt: skip
        self.o = cls("BTNH,NHD->BTD", (4, 2, 8), (8,), rngs=rngs,
                     **(dict(kw, shard_dim=0) if kw else {}))  # fmt: skip

    def __call__(self, x):
        return x + self.o(jax.nn.gelu(self.q(x)))


def _loss(m, b):
    return jnp.mean((m(b["x"]) - b["y"]) ** 2)


def _train(model, batches, tx):
    """3 steps of `tx` at top level (jit on global arrays), as a user's own loop runs."""
    graphdef, params = nnx.split(model, nnx.Param)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, b):
        loss, g = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), b))(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    losses = []
    for b in batches:
        params, opt, loss = step(params, opt, b)
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 1, 2)])
def test_sequence_parallel_pair_trains_as_one_device(shape):
    mesh = utils.mesh(*shape)
    keys = jax.random.split(jax.random.key(3), 6)
    batches = [{"x": jax.random.normal(keys[2 * i], (4, 8, 8)),
                "y": jax.random.normal(keys[2 * i + 1], (4, 8, 8))} for i in range(3)]  # fmt: skip
    tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-2))
    want, want_losses = _train(Attn(nnx.Rngs(0)), batches, tx)
    got, losses = _train(Attn(nnx.Rngs(0), mesh, sp=True), batches, tx)
    utils.assert_close(jnp.asarray(losses), jnp.asarray(want_losses))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        utils.assert_close(a, b)


class LinearPair(nnx.Module):
    def __init__(self, rngs, mesh):
        self.up = shardlax.nn.ColumnParallelLinear(8, 16, rngs=rngs, mesh=mesh,
                                                   sequence_parallel=True)  # fmt: skip
        self.down = shardlax.nn.RowParallelLinear(16, 8, rngs=rngs, mesh=mesh,
                                                  sequence_parallel=True)  # fmt: skip

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


@pytest.mark.parametrize(("make", "name"), [(lambda mesh: Attn(nnx.Rngs(0), mesh, sp=True),
                                             "ParallelEinsum"),
                                            (lambda mesh: LinearPair(nnx.Rngs(0), mesh),
                                             "ColumnParallelLinear")])  # fmt: skip
def test_sequence_parallel_input_inside_the_trainer_must_be_a_sequence_shard(make, name):
    """In the Trainer's step a replicated [B, S, D] is the whole sequence on every device: the
    column layer's all-gather would repeat it; refused, never computed on N copies."""
    mesh = utils.mesh(data=2, model=2)
    trainer = shardlax.Trainer(make(mesh), optax.sgd(0.1), _loss, mesh=mesh,
                               strategy="dp")  # fmt: skip
    batch = {"x": jnp.ones((4, 8, 8)), "y": jnp.zeros((4, 8, 8))}
    with pytest.raises(ValueError, match=name + r"\(sequence_parallel=True\): inside a "
                       r"shard_map .* replicated over mesh axis 'model' \(size 2\).* pass "
                       r"sequence_parallel=False"):  # fmt: skip
        trainer.step(trainer.init(), batch)


def test_sequence_parallel_errors():
    mesh = utils.mesh(model=2)
    with pytest.raises(ValueError, match=r"sequence_parallel=True\): the split letter 'N' is in "
                       r"the input and the output .* Pass sequence_parallel=False"):  # fmt: skip
        ParallelEinsum("BTNH,NHK->BTNK", (4, 2, 3), shard_dim=0, mesh=mesh, rngs=nnx.Rngs(0),
                       sequence_parallel=True)  # fmt: skip
    layer = ParallelEinsum("BTD,DNH->BTNH", (8, 4, 2), shard_dim=1, mesh=mesh,
                           rngs=nnx.Rngs(0), sequence_parallel=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"inputs.shape\[1\]=3 \(the sequence\) cannot be "
                       r"sharded over mesh axis 'model' \(size 2\)"):  # fmt: skip
        layer(jnp.ones((4, 3, 8)))
    flat = ParallelEinsum("BD,DN->BN", (8, 4), shard_dim=1, mesh=mesh, rngs=nnx.Rngs(0),
                          sequence_parallel=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"splits the input's dim 1 \(the sequence\).* got 'D' "
                       r"in 'BD' -> 'BN'"):  # fmt: skip
        flat(jnp.ones((4, 8)))
