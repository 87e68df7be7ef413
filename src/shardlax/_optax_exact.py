"""`exact_update`: `tx.update` on ZeRO's flat shards with its full reductions completed.

`_call_exact` re-runs the traced `tx.update` through `shardlax._jaxpr_check`'s
interpreter, handing every sum / all / any over a whole per-element value to a
callback: `exact_update` completes them over the data axes, the padding probe
of `shardlax._optax_check` records them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from shardlax import kernels, zero
from shardlax._jaxpr_check import _interpret
from shardlax._optax_programs import _flat_kinds
from shardlax._optax_tx import _marked_norm, normalize_tx


def _call_exact(tx, updates, state, params, on_reduce, on_norm=None):
    """`tx.update(updates, state, params)` with its full reductions passed to `on_reduce`."""
    closed, out_shape = jax.make_jaxpr(tx.update, return_shape=True)(updates, state, params)
    args = jax.tree.leaves((updates, state, params))
    kinds = _flat_kinds(args)
    outs, _ = _interpret(closed.jaxpr, closed.consts, args, kinds, on_reduce, on_norm)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def exact_update(tx: Any, axes: str | Sequence[str]):
    """`tx.update` for ZeRO's flat shards, with per-leaf and tree reductions made exact.

    Call it inside the step's `shard_map`, on this device's flat shards, in place
    of `tx.update`, for a `tx` that `check_flat_shard_exact(...,
    exact_reductions=True)` accepted. Each sum / all / any over every element
    of a per-element value (LAMB's and `clip_by_block_rms`'s per-parameter
    norms, `apply_if_finite`'s all-finite test) is computed on the shard and
    completed over `axes` by one scalar all-reduce (`kernels.all_reduce`; an
    all/any as an int32 sum of the failing elements). The padding holds the
    neutral value (checked by the build-time probe). optax's global norm stays
    `zero.global_norm_hook`'s (one all-reduce, recorded by `zero.record_norms`).

    Collectives: one scalar all-reduce over `axes` per such reduction per step
    (LAMB: two per parameter); none for elementwise transforms.
    """
    tx = normalize_tx(tx)
    axes = (axes,) if isinstance(axes, str) else tuple(axes)

    def all_reduce(name, operand, local):
        del operand
        if name == "reduce_sum":
            out = kernels.all_reduce(local, axes)
        elif name == "reduce_and":
            out = kernels.all_reduce(jnp.logical_not(local).astype(jnp.int32), axes) == 0
        else:
            out = kernels.all_reduce(local.astype(jnp.int32), axes) > 0
        return kernels.ensure_varying(out, tuple(kernels.varying_axes(local)))

    def update(updates, state, params=None):
        # a fresh marked norm per trace, so zero.record_norms sees every norm
        @functools.partial(jax.jit, static_argnames=("ord", "squared"))
        def _shardlax_global_norm(tree, ord=None, squared=False):
            return zero._norm(tree, ord=ord, squared=squared)

        with _marked_norm(_shardlax_global_norm, zero_norm=False):
            return _call_exact(tx, updates, state, params, all_reduce)

    return update


__all__ = ["exact_update"]
