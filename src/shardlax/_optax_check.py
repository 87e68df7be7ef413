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
from jax.extend import core as jex_core

from shardlax import kernels, zero

#: Primitives that act element by element (and `select_n`, whose predicate is
#: elementwise too). Anything not here that touches per-element data is refused.
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma",
    "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt",
    "igamma", "igammac", "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "polygamma",
    "pow", "real", "reduce_precision", "rem", "round", "rsqrt", "select_n", "shift_left",
    "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square",
    "stop_gradient", "sub", "tan", "tanh", "xor", "zeta",
    "pcast", "pvary",  # vma casts inside shard_map: the identity on values
})  # fmt: skip
#: Primitives that only change the rank (same elements, same order).
RESHAPES = frozenset({"reshape", "squeeze", "expand_dims"})
#: Call-like primitives whose inner jaxpr is checked in place.
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
                   "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})  # fmt: skip
#: Parameters that carry shapes (erased when the two programs are compared).
SHAPE_PARAMS = frozenset({"shape", "axes", "broadcast_dimensions", "new_sizes", "dimensions",
                          "sharding", "out_sharding", "in_shardings", "out_shardings",
                          "in_layouts", "out_layouts", "donated_invars", "ctx_mesh",
                          "jaxpr", "call_jaxpr", "fun_jaxpr", "jvp_jaxpr_fun",
                          "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd", "branches",
                          "num_consts", "symbolic_zeros", "out_trees"})  # fmt: skip

_NORM_NAME = "_shardlax_global_norm"
_OPTAX_DIR = os.path.dirname(optax.__file__)
_JAX_DIR = os.path.dirname(jax.__file__)


class NotExact(Exception):
    """Why a program is not elementwise: a reason and the offending equation."""

    def __init__(self, reason: str, eqn: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.eqns = [] if eqn is None else [eqn]  # innermost first, then the calls around it


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


# --------------------------------------------------------- elementwise check
def _size(v) -> int:
    return math.prod(getattr(v.aval, "shape", ()))


def _inner(eqn) -> tuple[Any, list[Any]]:
    """(jaxpr, consts) of a call-like equation."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is not None:
            if isinstance(j, jex_core.ClosedJaxpr):
                return j.jaxpr, list(j.consts)
            return j, []
    raise NotExact(f"{eqn.primitive.name} without an inner jaxpr", eqn)


def _check(jaxpr, kinds: list[str], norm_ok: bool = True, reduce_ok: bool = False) -> list[str]:
    """Elementwise check of `jaxpr` given each invar's kind; returns the outvars' kinds.

    Kinds: 'elem' (per-element data of a leaf), 'uniform' (one value for every
    element, the same on every device), 'other' (device-invariant but not
    uniform, e.g. a schedule's boundary array: must never meet 'elem').
    """
    kind: dict[Any, str] = {}
    for v, k in zip(jaxpr.invars, kinds, strict=True):
        kind[v] = k
    for v in jaxpr.constvars:
        kind[v] = "uniform" if _size(v) <= 1 else "other"

    def of(a) -> str:
        if isinstance(a, jex_core.Literal):
            return "uniform"
        return kind[a]

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [of(a) for a in eqn.invars]
        out = _eqn_kinds(eqn, name, ins, norm_ok, reduce_ok)
        for v, k in zip(eqn.outvars, out, strict=True):
            kind[v] = k
    return [of(v) for v in jaxpr.outvars]


def _eqn_kinds(eqn, name: str, ins: list[str], norm_ok: bool, reduce_ok: bool) -> list[str]:
    n_out = len(eqn.outvars)
    if name in CALLS:
        if eqn.params.get("name") == _NORM_NAME:
            if not norm_ok:
                raise NotExact("it computes a global norm and optax_norm_hook=False", eqn)
            return ["uniform"] * n_out  # exact by zero.global_norm_hook
        inner, _ = _inner(eqn)
        if len(inner.invars) != len(ins):
            raise NotExact(f"a {name} call whose operands do not match its jaxpr", eqn)
        try:
            return _check(inner, ins, norm_ok, reduce_ok)
        except NotExact as e:
            e.eqns.append(eqn)
            raise
    if "elem" not in ins:
        # device-invariant data: any primitive; uniform only if size-1 in, broadcast out
        if name == "broadcast_in_dim" and ins == ["uniform"]:
            return ["uniform"]
        if name in ELEMENTWISE and all(k == "uniform" for k in ins):
            return ["uniform"] * n_out
        return ["uniform" if _size(v) <= 1 else "other" for v in eqn.outvars]
    if name == "cond":
        pred, *ops = ins
        if pred == "elem":
            raise NotExact("a lax.cond whose predicate depends on per-element data", eqn)
        outs = None
        for branch in eqn.params["branches"]:
            ks = _check(branch.jaxpr, ops, norm_ok, reduce_ok)
            outs = ks if outs is None else [_join(a, b) for a, b in zip(outs, ks, strict=True)]
        return outs
    if name in ELEMENTWISE:
        shape = eqn.outvars[0].aval.shape
        for a, k in zip(eqn.invars, ins, strict=True):
            if k == "other":
                raise NotExact("per-element data combined with a non-uniform array", eqn)
            if k == "elem" and tuple(a.aval.shape) != tuple(shape):
                raise NotExact("per-element data broadcast against another shape", eqn)
        return ["elem"] * n_out
    if reduce_ok and _is_full_reduction(eqn):
        return ["uniform"]  # made exact by an all-reduce over the shards (exact_update)
    if name == "broadcast_in_dim" or name in RESHAPES:
        src, dst = eqn.invars[0], eqn.outvars[0]
        if _size(src) == _size(dst):
            return ["elem"]
        raise NotExact(f"{name} changes the number of elements of per-element data", eqn)
    what = {
        "reduce_sum": "a reduction over a parameter-shaped value",
        "reduce_max": "a reduction over a parameter-shaped value",
        "reduce_min": "a reduction over a parameter-shaped value",
        "reduce_and": "a reduction over a parameter-shaped value (e.g. an all-finite test)",
        "reduce_or": "a reduction over a parameter-shaped value",
        "reduce_prod": "a reduction over a parameter-shaped value",
        "dot_general": "a contraction over a parameter's dims",
        "random_bits": "random numbers drawn per element",
        "threefry2x32": "random numbers drawn per element",
    }.get(name, f"the non-elementwise operation {name!r} on per-element data")
    raise NotExact(what, eqn)


#: Reductions `exact_update` completes across the shards, and the value the
#: padding must hold so that it changes nothing.
REDUCTIONS = {"reduce_sum": 0, "reduce_and": True, "reduce_or": False}


def _is_full_reduction(eqn) -> bool:
    """A sum / all / any over every dim of one value (a per-leaf or per-tree total)."""
    if eqn.primitive.name not in REDUCTIONS or len(eqn.invars) != 1:
        return False
    src = eqn.invars[0]
    return tuple(sorted(eqn.params.get("axes", ()))) == tuple(range(len(src.aval.shape)))


def _join(a: str, b: str) -> str:
    return "elem" if "elem" in (a, b) else ("other" if "other" in (a, b) else "uniform")


# -------------------------------------------------------- program comparison
def _rank_only(eqn) -> bool:
    """A reshape / broadcast that only changes the rank or broadcasts one element
    (these differ between a logical leaf and its 1-D shard, not the values)."""
    if eqn.primitive.name not in RESHAPES and eqn.primitive.name != "broadcast_in_dim":
        return False
    src, dst = eqn.invars[0], eqn.outvars[0]
    return _size(src) == _size(dst) or _size(src) == 1


def _canon(jaxpr, names: dict | None = None) -> list:
    """The program as nested tuples with shapes erased and rank-only ops skipped."""
    names = {} if names is None else names
    alias: dict[Any, Any] = {}

    def ref(a):
        if not isinstance(a, jex_core.Literal):
            a = alias.get(a, a)
        if isinstance(a, jex_core.Literal):
            return ("lit", repr(a.val), str(a.aval.dtype))
        if a not in names:
            names[a] = len(names)
        return ("v", names[a], str(a.aval.dtype))

    for v in (*jaxpr.constvars, *jaxpr.invars):
        ref(v)
    out = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if _rank_only(eqn):
            src = eqn.invars[0]
            alias[eqn.outvars[0]] = (
                src if isinstance(src, jex_core.Literal) else alias.get(src, src)
            )
            continue
        params = []
        for k, p in sorted(eqn.params.items()):
            if k in SHAPE_PARAMS:
                continue
            params.append((k, repr(p)))
        subs = []
        if name in CALLS and eqn.params.get("name") != _NORM_NAME:
            subs.append(_canon(_inner(eqn)[0]))
        if name == "cond":
            subs.extend(_canon(b.jaxpr) for b in eqn.params["branches"])
        out.append((name, tuple(params), tuple(ref(a) for a in eqn.invars),
                    tuple(ref(v) for v in eqn.outvars), tuple(map(tuple, subs))))  # fmt: skip
    out.append(("return", tuple(ref(v) for v in jaxpr.outvars)))
    return out


def _first_difference(a: list, b: list) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


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
def _interpret(jaxpr, consts, args, kinds, on_reduce, on_norm=None):
    """Evaluate `jaxpr`, passing every full reduction of per-element data to `on_reduce`.

    `on_reduce(name, operand, local_result)` returns the value to use instead
    of `local_result` (the reduction over all shards, or a probe's record);
    `on_norm(operands)`, if given, replaces each marked global norm. Calls that
    touch per-element data are evaluated inline; a `cond` on per-element data
    evaluates every branch inline and selects (`lax.select_n`), so no value is
    traced in a nested scope and the selected values are the branch's.
    """
    env: dict[Any, Any] = {}
    kind: dict[Any, str] = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def kread(v):
        return "uniform" if isinstance(v, jex_core.Literal) else kind[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v], kind[v] = c, ("uniform" if _size(v) <= 1 else "other")
    for v, a, k in zip(jaxpr.invars, args, kinds, strict=True):
        env[v], kind[v] = a, k
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        invals, ins = [read(v) for v in eqn.invars], [kread(v) for v in eqn.invars]
        elem = "elem" in ins
        if name in CALLS and eqn.params.get("name") == _NORM_NAME and on_norm is not None:
            outs, ks = [on_norm(invals)], ["uniform"]
        elif elem and name in CALLS and eqn.params.get("name") != _NORM_NAME:
            inner, inner_consts = _inner(eqn)
            outs, ks = _interpret(inner, inner_consts, invals, ins, on_reduce, on_norm)
        elif elem and name == "cond":
            index, *ops = invals
            ks = _eqn_kinds(eqn, name, ins, True, True)
            cases = [_interpret(b.jaxpr, b.consts, ops, ins[1:], on_reduce, on_norm)[0]
                     for b in eqn.params["branches"]]  # fmt: skip
            outs = [jax.lax.select_n(index, *vals) for vals in zip(*cases, strict=True)]
        elif elem and _is_full_reduction(eqn):
            local = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs, ks = [on_reduce(name, invals[0], local)], ["uniform"]
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
            ks = _eqn_kinds(eqn, name, ins, True, True)
        for v, x, k in zip(eqn.outvars, outs, ks, strict=True):
            env[v], kind[v] = x, k
    return [read(v) for v in jaxpr.outvars], [kread(v) for v in jaxpr.outvars]


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


def _eqns(jaxpr, i: int) -> list:
    """The i-th equation of `jaxpr` counted as `_canon` counts (rank-only ops skipped)."""
    k = 0
    for eqn in jaxpr.eqns:
        if _rank_only(eqn):
            continue
        if k == i:
            return [eqn]
        k += 1
    return [None]


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
