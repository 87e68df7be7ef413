"""TinyLM's transformer `Block` and `_stack`, which stacks the blocks for `lax.scan`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import declarations
from shardlax.declarations import Declared, Role
from shardlax.models._tinylm_config import TinyLMConfig
from shardlax.nn import ParallelAttention, ParallelMLP, RMSNorm
from shardlax.nn._dropout import Dropout


class Block(nnx.Module):
    """`x + drop(attn(norm(x)))`, then `x + drop(mlp(norm(x)))`, in the hidden layout."""

    def __init__(self, cfg: TinyLMConfig, *, mesh: Mesh, rngs: nnx.Rngs):
        sp = cfg.sequence_parallel
        # Under remat the block's backward re-runs its forward, which gathers every FSDP
        # parameter again: keeping that gather for the backward (reshard_after_forward=False
        # inside the checkpoint) makes it 2 gathers per parameter and step, the minimum
        # (forward; recomputation shared with dW and dx). The forward's gathers are still
        # freed after the block: jax.checkpoint saves none of them.
        keep = dict(sequence_parallel=sp, reshard_after_forward=not cfg.remat)
        self.attn_norm = RMSNorm(cfg.d_model, mesh=mesh, rngs=rngs, **keep)
        self.attn = ParallelAttention(
            cfg.d_model, cfg.n_heads, num_kv_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta,
            use_bias=cfg.use_bias, mesh=mesh, rngs=rngs, **keep,
        )  # fmt: skip
        self.mlp_norm = RMSNorm(cfg.d_model, mesh=mesh, rngs=rngs, **keep)
        self.mlp = ParallelMLP(
            cfg.d_model, cfg.d_ff, activation=cfg.activation, use_bias=cfg.use_bias, mesh=mesh,
            rngs=rngs, **keep,
        )  # fmt: skip
        self.dropout = Dropout(cfg.dropout, mesh=mesh, sequence_parallel=sp)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.attn(self.attn_norm(x))
        if key is not None:
            h = self.dropout(h, rngs=jax.random.fold_in(key, 0))
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if key is not None:
            h = self.dropout(h, rngs=jax.random.fold_in(key, 1))
        return x + h

    def declared_collectives(
        self, shape: Sequence[int], *, grad: bool, remat: bool = False
    ) -> list[Declared]:
        """One block's collectives (forward, and backward with `grad`).

        `remat` (`jax.checkpoint` around the block, whose layers then keep
        their gathered parameters for the backward): the backward first runs
        the block's forward again, all of it except the MLP's exit collective,
        which only feeds the block's output (XLA removes it as dead code). Each
        FSDP parameter is so gathered twice per step, as without remat.
        """
        out = [
            *self.attn_norm.declared_collectives(shape, grad=grad),
            *self.attn.declared_collectives(shape, grad=grad),
            *self.mlp_norm.declared_collectives(shape, grad=grad),
            *self.mlp.declared_collectives(shape, grad=grad),
        ]
        if grad and remat:
            again = self.declared_collectives(shape, grad=False)
            out += declarations.drop(again, {"role": Role.ACTIVATION, "module": "mlp", "tag": "y"})
        return out


def _stack(modules: Sequence[nnx.Module], mesh: Mesh) -> nnx.Module:
    """One module whose every parameter is the stack of the `modules`' (a new leading dim).

    Each stacked parameter is laid out as `P(None, *spec)` of its layer's spec,
    so `lax.scan` over the leading dim hands each step the layer's own layout.
    """
    graphdef = nnx.graphdef(modules[0])
    states = [nnx.state(m) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for _, var in nnx.to_flat_state(stacked):
        spec = P(None, *var.get_metadata()["out_sharding"])
        var.set_metadata("out_sharding", spec)
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
    return nnx.merge(graphdef, stacked)
