"""The two programs `shardlax._optax_check` compares, and the transform it blames.

`_compare_programs` traces `tx.update` on the logical parameter shapes and on
the per-device shard shapes (`_trace`; each argument a per-element or a
uniform value, `_kinds` / `_flat_kinds`), checks both are elementwise and the
same program up to shapes, and names the optax transform (or user function)
an offending operation was traced from (`_transform_name`).
"""

from __future__ import annotations

import ast
import functools
import math
import os

import jax
import jax.numpy as jnp
import optax

from shardlax._jaxpr_check import NotExact, _canon, _check, _eqns, _first_difference
from shardlax._optax_tx import _marked_norm

_OPTAX_DIR = os.path.dirname(optax.__file__)
_JAX_DIR = os.path.dirname(jax.__file__)
#: the check's own files (`shardlax._optax_check` and the modules split from it): a
#: frame there is never the transform to blame
_OWN_FILES = frozenset(
    os.path.join(os.path.dirname(__file__), f"{name}.py")
    for name in ("_optax_check", "_optax_exact", "_optax_programs", "_optax_tx")
)


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
        if not f.file_name.startswith(_JAX_DIR) and f.file_name not in _OWN_FILES:
            return f"{f.function_name} ({os.path.basename(f.file_name)}:{f.line_num})"
    return None


# ---------------------------------------------------------- the two programs
def _trace(tx, params, norm_hook: bool = True):
    state = jax.eval_shape(tx.init, params)
    with _marked_norm(optax_norm=norm_hook):
        return jax.make_jaxpr(tx.update)(params, state, params), state


def _kinds(args_flat) -> list[str]:
    """Logical arrays: per-element data unless one element."""
    return ["elem" if math.prod(jnp.shape(x)) > 1 else "uniform" for x in args_flat]


def _flat_kinds(args_flat) -> list[str]:
    """Flat shards: every 1-D leaf is per-element data, even of one element (a shard of
    a larger parameter); only rank-0 state (step counts, Python scalars such as
    `optimistic_gradient_descent`'s flags) is uniform."""
    return ["elem" if jnp.ndim(x) else "uniform" for x in args_flat]


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
