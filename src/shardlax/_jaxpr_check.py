"""Is a traced program elementwise, and the same program on other shapes? (jaxpr level)

`_check` walks a jaxpr and labels every value by what it may depend on:
'elem' (per-element data of a leaf), 'uniform' (one value for every element,
the same on every device) or 'other' (device-invariant, not uniform). It
raises `NotExact`, with the offending equation, where per-element data meets
anything but an elementwise primitive on values of its own shape or uniform
values: a reduction, dot, slice, gather, random draw, a broadcast or reshape
that changes the number of elements, a `cond` predicate. Nested calls, custom
derivatives and `cond` branches are checked inside; the call named
`_shardlax_global_norm` (the marked exact global norm) is uniform, and with
`reduce_ok` so is a sum / all / any over a whole value.

`_canon` writes a program as nested tuples with shapes, rank-only reshapes
and scalar broadcasts erased, so two traces of one function on different
shapes compare equal iff they are the same program up to shapes;
`_first_difference` and `_eqns` find the first equation where they differ.

`_interpret` evaluates a program equation by equation and hands each full
reduction of per-element data (and each marked norm) to a callback: how
`exact_update` completes them across shards and how the padding probe
records them.

These read programs only; tracing optax updates, labelling their arguments
and wording the refusals is `shardlax._optax_check`'s.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.extend import core as jex_core

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


class NotExact(Exception):
    """Why a program is not elementwise: a reason and the offending equation."""

    def __init__(self, reason: str, eqn: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.eqns = [] if eqn is None else [eqn]  # innermost first, then the calls around it


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


# ------------------------------------------------------------- interpreter
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
