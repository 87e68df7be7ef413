"""Is an optax transformation exact on ZeRO's flat parameter shards? (build-time check)

Under zero1/zero2 `tx.update` runs, on every device, on this device's flat,
zero-padded 1-D shard of each parameter (`[ceil(n_p / N)]` elements), not on
the logical arrays. That is exact iff every element of every update depends
only on the same element of the gradients, state and parameters, plus values
every device computes alike (step counts, schedules) and the global norms that
`shardlax.zero.global_norm_hook` makes exact. Transforms that look at a
parameter's shape or reduce over a parameter or the tree (`adamw(mask=lambda
p: jax.tree.map(lambda x: x.ndim > 1, p))`, `lamb`, `clip_by_block_rms`,
`adafactor`, `apply_if_finite`, `scale_by_trust_ratio`, `add_noise`) are
silently wrong there.

`check_flat_shard_exact` decides it from the programs, not from names: it
traces `tx.update` (`jax.make_jaxpr`, nothing runs) once on the logical shapes
and once on the per-device flat shard shapes, with optax's global norm traced
as one marked call, and accepts only if

1. the logical program is *elementwise*: every value derived from a parameter,
   gradient or state leaf with more than one element is combined only by
   elementwise primitives with values of its own shape or with uniform values
   (scalars, or broadcasts of scalars); no reduction, index arithmetic, random
   draw, slice, gather, dot or loop touches such a value; the only way from
   one to a scalar is the marked global norm; a `cond` / nested jit / custom
   derivative is checked inside, and a `cond` predicate must be uniform;
2. the flat program is elementwise by the same rules; and
3. both are the same program up to shapes: the same primitives with the same
   non-shape parameters and literals on the same operands (rank-only reshapes
   and scalar broadcasts, which differ between ranks, are skipped). A mask or
   option resolved from `ndim` / `shape` makes the two programs differ.

Then the flat update on each device equals the slice of the logical update,
element by element; padding only ever meets padding. The global norm is exact
as long as its argument is zero on the padding: a probe runs 3 steps of
`tx.update` on one padding element per leaf (zeros, state from `tx.init` of
zeros) and requires every marked norm to see only zeros.

Anything else raises a `ValueError` naming the optax transform (read from the
offending operation's source location) and the fixes: `strategy='dp'` or
`'fsdp'`, or an elementwise formulation (a mask given as a pytree of booleans
built from the full parameters).

Exact instead of refused: a step that runs `exact_update(tx, data_axes)` in
place of `tx.update` completes every sum / all / any over a whole per-element
value (a per-parameter norm, an all-finite test) across the shards with one
scalar all-reduce (`kernels.all_reduce`). With `exact_reductions=True` the
check accepts those reductions (LAMB, `scale_by_trust_ratio`,
`apply_if_finite`), provided the rest holds: a per-leaf *mean*
(`clip_by_block_rms`, Adafactor) divides by the shard's size, a literal that
differs between the two programs, and stays refused, as do `ndim` masks.

The program-level pieces (the elementwise check, the comparison up to shapes,
the interpreter `exact_update` runs) are in `shardlax._jaxpr_check`. This module
holds the two checks, their refusals and the padding probe; `normalize_tx` and
the marked global norm are in `shardlax._optax_tx`, the two traced programs and
the naming of the transform to blame in `shardlax._optax_programs`,
`exact_update` in `shardlax._optax_exact`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from shardlax import kernels
from shardlax._optax_exact import _call_exact
from shardlax._optax_exact import exact_update as exact_update
from shardlax._optax_programs import _compare_programs, _flat_kinds, _kinds
from shardlax._optax_tx import _marked_norm, normalize_tx


def _refuse(owner, strategy, tx_name, reason, n, leaves, fix_extra=""):
    shapes = ", ".join(
        f"{tuple(x.shape)} -> ({kernels.shard_size(math.prod(x.shape), n)},)" for x in leaves[:3]
    )
    more = ", ..." if len(leaves) > 3 else ""
    raise ValueError(
        f"{owner}(strategy={strategy!r}, tx=...): {tx_name} is not exact on ZeRO's flat "
        f"parameter shards: {reason}. Under {strategy} each of the {n} devices runs "
        f"tx.update on 1-D shards of the flattened, padded parameters (logical shape -> "
        f"per-device shape: {shapes}{more}), so a transform that reads a parameter's shape or "
        f"reduces over a parameter or the tree computes something else than on one device. "
        f"Use strategy='dp' or strategy='fsdp' (optax sees whole or shape-preserving "
        f"parameters){fix_extra}."
    )


_MASK_HINT = (
    ", or make the transform elementwise: give masks as a pytree of booleans built from "
    "the full parameters (e.g. mask=jax.tree.map(lambda p: p.ndim > 1, params)) instead of a "
    "callable"
)


def check_flat_shard_exact(
    tx: Any,
    param_shapes: Any,
    n: int,
    owner: str = "Trainer",
    *,
    strategy: str = "zero2",
    norm_hook: bool = True,
    exact_reductions: bool = False,
) -> None:
    """Raise unless `tx.update` on ZeRO's flat per-device shards equals it on the arrays.

    Args:
      tx: an optax transformation (or `optax.MultiSteps`, see `normalize_tx`).
      param_shapes: the parameters (a pytree of arrays or `jax.ShapeDtypeStruct`s)
        with their logical shapes.
      n: the number of devices the flat shards are split over (the data axes' size).
      owner: who asks, for the message (e.g. ``"Trainer"``).
      strategy: the strategy asked for (``"zero1"`` or ``"zero2"``), for the message.
      norm_hook: the step traces `tx.update` under `shardlax.zero.global_norm_hook`
        (`Trainer(optax_norm_hook=True)`), so optax's global norm is exact. If
        False the norm is a reduction like any other and is refused.
      exact_reductions: the step runs `exact_update(tx, data_axes)` instead of
        `tx.update`, so sums / all / any over whole per-element values (LAMB,
        `clip_by_block_rms`, `apply_if_finite`, `scale_by_trust_ratio`) are
        completed across the shards and accepted (if the padding is neutral).

    Raises:
      ValueError: naming the transform, why it is not exact and the fixes.
    """
    tx = normalize_tx(tx, owner)
    logical = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), param_shapes)
    leaves, treedef = jax.tree.flatten(logical)
    flat = jax.tree.unflatten(
        treedef,
        [jax.ShapeDtypeStruct((kernels.shard_size(math.prod(x.shape), n),), x.dtype)
         for x in leaves],
    )  # fmt: skip

    def refuse(who, reason, why):
        extra = ""
        if why == "reduce" and not norm_hook:
            extra = ", or keep optax_norm_hook=True"
            reason += " (with optax_norm_hook=False optax's global norm is such a reduction)"
        if why == "program":
            extra = _MASK_HINT
            reason += (" (a mask or an option decided from a parameter's ndim or shape "
                       "resolves differently on 1-D shards)")  # fmt: skip
        _refuse(owner, strategy, who, reason, n, leaves, extra)

    _compare_programs(tx, logical, flat, _flat_kinds, norm_hook=norm_hook,
                      reduce_ok=exact_reductions, where=("flat shard", "flat shards"),
                      refuse=refuse)  # fmt: skip
    _check_padding(tx, treedef, leaves, owner, strategy, n, exact_reductions)


def check_local_shard_exact(
    tx: Any,
    param_shapes: Any,
    local_shapes: Any,
    owner: str = "Trainer",
    *,
    strategy: str = "fsdp",
    norm_hook: bool = True,
) -> None:
    """Raise unless `tx.update` on each device's parameter shards equals it on the arrays.

    Under fsdp (and tensor parallelism) `tx.update` runs per device on the
    local shards of the split parameters (their ndim kept): an elementwise
    transform is exact there, one that reduces over a parameter (per-parameter
    norms, factored statistics, Newton-Schulz orthogonalization) or draws
    noise of a parameter's shape is not. `local_shapes` holds the per-device
    shapes; parameters whose local shape is their logical one are whole on
    every device and could take anything, but one traced program serves all,
    so the check is over the whole tree.

    Raises:
      ValueError: naming the transform, why it is not exact and the fixes.
    """
    tx = normalize_tx(tx, owner)
    logical = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), param_shapes)
    local = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), local_shapes)
    leaves, _ = jax.tree.flatten(logical)
    split = [
        (tuple(a.shape), tuple(b.shape))
        for a, b in zip(leaves, jax.tree.leaves(local), strict=True)
        if tuple(a.shape) != tuple(b.shape)
    ]
    if not split:
        return

    def refuse(who, reason):
        shapes = ", ".join(f"{a} -> {b}" for a, b in split[:3]) + (
            ", ..." if len(split) > 3 else ""
        )
        raise ValueError(
            f"{owner}(strategy={strategy!r}, tx=...): {who} is not exact on the per-device "
            f"parameter shards: {reason}. Under {strategy} each device runs tx.update on its "
            f"shards of the split parameters (logical shape -> per-device shape: {shapes}), so "
            f"a transform that reduces over a parameter, reads its shape or draws noise of its "
            f"shape computes something else than on one device. Use an elementwise transform "
            f"(Adam, SGD, Lion, ...; optax's global norm is exact), or strategy='dp' with "
            f"unsplit parameters."
        )

    def refuse_local(who, reason, why):
        if why == "program":
            reason += " (an option decided from a parameter's shape)"
        refuse(who, reason)

    _compare_programs(tx, logical, local, _kinds, norm_hook=norm_hook, reduce_ok=False,
                      where=("per-device", "per-device shards"), refuse=refuse_local)  # fmt: skip


#: The value a probe substitutes for a completed reduction or a global norm: the
#: padding must stay neutral whatever the real elements contribute.
_GENERIC = 0.7


def _check_padding(tx, treedef, leaves, owner, strategy, n, exact, steps: int = 3) -> None:
    """The global norms (and, if `exact`, the completed reductions) see only neutral
    values on a padding element over `steps` steps.

    The padding element runs alone (zero gradient, zero parameter, state from
    `tx.init`); each norm / completed reduction returns a generic value (what
    the real elements would contribute), and its operand on the padding must be
    neutral (0 for sums and norms, True for all, False for any).
    """
    seen: list[jax.Array] = []

    def recording_norm(operands):
        seen.append(sum(jnp.sum(jnp.abs(x)).astype(jnp.float32) for x in operands))
        return jnp.asarray(_GENERIC, jnp.float32)  # what the real shards would contribute

    def record_reduction(name, operand, local):
        if not exact:  # refused by the elementwise check; here only the norms count
            return local
        bad = {"reduce_sum": jnp.abs(operand), "reduce_and": jnp.logical_not(operand)}.get(
            name, operand
        )
        seen.append(jnp.sum(bad.astype(jnp.float32)))
        generic = {"reduce_sum": _GENERIC, "reduce_and": True}.get(name, False)
        return jnp.full(local.shape, generic, local.dtype)

    pad = jax.tree.unflatten(treedef, [jnp.zeros((1,), x.dtype) for x in leaves])

    def run(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        state = tx.init(params)
        for _ in range(steps):
            with _marked_norm():
                updates, state = _call_exact(
                    tx, zeros, state, params, record_reduction, recording_norm
                )
            params = optax.apply_updates(params, updates)
        return sum(seen, jnp.zeros((), jnp.float32))

    with jax.numpy_dtype_promotion("standard"):
        total = float(jax.jit(run)(pad))
    if total != 0.0:
        reason = (
            "a global norm or a reduction in its chain sees non-neutral values on the padding "
            "of the flat shards (e.g. the padding of an update is not zero)"
        )
        _refuse(owner, strategy, "tx", reason, n, leaves)


__all__ = ["check_flat_shard_exact", "exact_update", "normalize_tx"]
