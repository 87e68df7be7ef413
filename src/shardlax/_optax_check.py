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
the interpreter `exact_update` runs) are in `shardlax._jaxpr_check`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from shardlax import kernels, zero
from shardlax._jaxpr_check import (
    NotExact,
    _canon,
    _check,
    _eqns,
    _first_difference,
    _interpret,
)

_OPTAX_DIR = os.path.dirname(optax.__file__)
_JAX_DIR = os.path.dirname(jax.__file__)


# ------------------------------------------------------------------- tx forms
def normalize_tx(tx: Any, owner: str = "Trainer") -> optax.GradientTransformation:
    """The `GradientTransformation` to run for `tx` as users pass it.

    Accepts any `optax.GradientTransformation` (including
    `GradientTransformationExtraArgs`, returned as is) and `optax.MultiSteps`
    objects (their `.gradient_transformation()`).

    Raises:
      TypeError: for anything else, naming `owner`.
    """
    if isinstance(tx, optax.MultiSteps):
        return tx.gradient_transformation()
    if isinstance(tx, optax.GradientTransformation):
        return tx
    raise TypeError(
        f"{owner}(tx={tx!r}): expected an optax.GradientTransformation or optax.MultiSteps, "
        f"got {type(tx).__name__}. Pass e.g. optax.adamw(1e-3)."
    )


# ------------------------------------------------------------ the global norm
# (`_jaxpr_check` knows the marked norm by this function name, `_NORM_NAME`)
@functools.partial(jax.jit, static_argnames=("ord", "squared"))
def _shardlax_global_norm(tree, ord=None, squared=False):
    return kernels.sharded_tree_norm(tree, ord=ord, squared=squared)


@contextlib.contextmanager
def _marked_norm(norm=_shardlax_global_norm, optax_norm: bool = True, zero_norm: bool = True):
    """The exact global norms as one marked call each: `shardlax.zero`'s own (always exact
    on shards; not when `norm` itself calls it) and, with `optax_norm` (what
    `zero.global_norm_hook` replaces), optax's."""
    targets = [(zero, "_norm")] if zero_norm else []
    if optax_norm:
        targets += zero.optax_norm_targets()
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]
    try:
        for mod, name in targets:
            setattr(mod, name, norm)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


# ------------------------------------------------------------ naming blame
@functools.cache
def _top_level_def(path: str, line: int) -> str | None:
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        inside = node.lineno <= line <= (getattr(node, "end_lineno", None) or node.lineno)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and inside:
            return node.name
    return None


def _transform_name(*eqns) -> str:
    """The optax transform (or user function) the first of `eqns` that says was traced from."""
    for eqn in eqns:
        name = _name_of(eqn)
        if name is not None:
            return name
    return "tx"


def _name_of(eqn) -> str | None:
    tb = getattr(getattr(eqn, "source_info", None), "traceback", None)
    frames = list(getattr(tb, "frames", ()) or ())
    for f in frames:  # innermost first
        if f.file_name.startswith(_OPTAX_DIR) and "<locals>" in f.function_name:
            return "optax." + f.function_name.split(".<locals>")[0]
    for f in frames:
        if f.file_name.startswith(_OPTAX_DIR):
            top = _top_level_def(f.file_name, f.line_num)
            return "optax." + (top or f.function_name)
    for f in frames:
        if not f.file_name.startswith(_JAX_DIR) and f.file_name != __file__:
            return f"{f.function_name} ({os.path.basename(f.file_name)}:{f.line_num})"
    return None


# -------------------------------------------------------- exact reductions
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


# ------------------------------------------------------------------ the check
def _trace(tx, params, norm_hook: bool = True):
    state = jax.eval_shape(tx.init, params)
    with _marked_norm(optax_norm=norm_hook):
        return jax.make_jaxpr(tx.update)(params, state, params), state


def _kinds(args_flat) -> list[str]:
    """Logical arrays: per-element data unless one element."""
    return ["elem" if math.prod(x.shape) > 1 else "uniform" for x in args_flat]


def _flat_kinds(args_flat) -> list[str]:
    """Flat shards: every 1-D leaf is per-element data, even of one element (a shard of
    a larger parameter); only rank-0 state (step counts) is uniform."""
    return ["elem" if len(x.shape) else "uniform" for x in args_flat]


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


def _compare_programs(tx, logical, shards, shard_kinds, *, norm_hook, reduce_ok, where, refuse):
    """`refuse(who, reason, why)` unless `tx.update` is elementwise and one program on both.

    Traces the update on the `logical` parameter shapes and on the per-device
    `shards`; `why` is ``'trace'`` (it does not trace), ``'reduce'`` (a
    reduction or shape dependence `_check` finds; a marked norm is exact) or
    ``'program'`` (the two programs differ). `where`: how the shards' shapes
    and the shards are named in the reasons.
    """
    progs = []
    for params, which in ((logical, "logical"), (shards, where[0])):
        try:
            progs.append(_trace(tx, params, norm_hook))
        except Exception as e:  # any tracing failure is a refusal
            refuse("tx", f"tx.update fails to trace on the {which} shapes ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200]})", "trace")  # fmt: skip
    for (j, state), params, kinds in zip(progs, (logical, shards), (_kinds, shard_kinds),
                                         strict=True):  # fmt: skip
        try:
            _check(j.jaxpr, kinds(jax.tree.leaves((params, state, params))), True, reduce_ok)
        except NotExact as e:
            refuse(_transform_name(*e.eqns), e.reason, "reduce")
    (j_log, _), (j_shard, _) = progs
    a, b = _canon(j_log.jaxpr), _canon(j_shard.jaxpr)
    if a != b:
        i = _first_difference(a, b)
        eqns = [e for e in (*_eqns(j_log.jaxpr, i), *_eqns(j_shard.jaxpr, i)) if e is not None]
        refuse(_transform_name(*eqns), f"its update is a different program on the {where[1]} "
               f"than on the logical shapes", "program")  # fmt: skip


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
