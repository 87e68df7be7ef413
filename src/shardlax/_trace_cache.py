"""Identical `fully_shard` units are traced once: the unit's shard_map kept as a jaxpr, replayed.

An unrolled stack of L identical units (the same class and graphdef, the same
`UnitConfig`, the same argument types) ran the same Python L times per trace,
three times each (the probe that finds the output specs, the random-draw
check's doubled batch, the real call): jax.jit's own cache cannot help, as
each unit's call is a fresh `shard_map` inside one trace. The first call now
records its `shard_map` as a ClosedJaxpr (`jax.make_jaxpr`) and binds it
through one `jax.jit` of `jax.core.eval_jaxpr`; a later call with the same key
calls that jit: the same equations the `shard_map` call would bind, without
running the model's Python, the probe or the checks again (they read only
what the key holds, so they would pass again).

The key is everything the trace reads besides the input values: the unit's
class, method, config and graphdef, the call's tree structure, static
arguments and call-node graphdefs, the abstract values of every input
(shape, dtype, weak type, sharding), the inherited state reduction, and
JAX's own trace context (`jax.jit`'s cache key: the config flags such as
dtype promotion and x64, the abstract mesh, the axis environment). A call
whose key cannot be formed (an unhashable static argument) or whose trace
closed over a tracer (a constant that belongs to one trace), or one traced
while declarations are being recorded, is traced as before.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax

try:  # JAX's jit cache key of the ambient configuration (config flags, mesh, axis env)
    from jax._src.config import trace_context as _trace_context
except ImportError:  # pragma: no cover - another JAX: no replay, every call traced
    _trace_context = None

#: The most recent traces, oldest first (bounded: a stack needs one entry per distinct unit).
_TRACES: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()
_MAX_ENTRIES = 256
#: Counts of the calls that traced and that replayed (tests read them).
stats = {"traced": 0, "replayed": 0}


def key_of(static: tuple, statics: Sequence[Any], inputs: Any) -> Any:
    """The trace key of one unit call, or None when the call must be traced."""
    if _trace_context is None:
        return None
    try:
        avals = tuple(_aval_key(x) for x in jax.tree.leaves(inputs))
        key = (static, tuple(statics), avals, _trace_context())
        hash(key)
    except TypeError:  # an unhashable static argument or config value
        return None
    return key


def _aval_key(x: Any) -> Any:
    aval = jax.typeof(x)
    return (aval, getattr(aval, "sharding", None))


def call(key: Any, make: Callable[[], Callable], inputs: tuple, name: str = "fsdp_unit") -> Any:
    """`make()(*inputs)`, traced once per key: a stored trace replayed when `key` was seen.

    `make` builds the shard_map to trace (the probe and checks run there,
    so a replay skips them too). The stored trace is bound through one
    `jax.jit` per key (named `name`), so JAX's own caches of a jit's
    linearization and transpose (keyed by its jaxpr) serve every replay:
    the backward is not traced again per unit either. XLA inlines the call.
    """
    entry = None if key is None else _TRACES.get(key)
    if entry is None:
        fn = make()
        stats["traced"] += 1
        if key is None:
            return fn(*inputs)
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*inputs)
        out_tree = jax.tree.structure(shape)

        def replay(*flat):
            return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *flat)

        replay.__name__ = replay.__qualname__ = name
        entry = (jax.jit(replay), out_tree)
        if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            _TRACES[key] = entry
            while len(_TRACES) > _MAX_ENTRIES:
                _TRACES.popitem(last=False)
    else:
        _TRACES.move_to_end(key)
        stats["replayed"] += 1
    jitted, out_tree = entry
    return jax.tree.unflatten(out_tree, jitted(*jax.tree.leaves(inputs)))


def clear() -> None:
    """Forget every stored trace."""
    _TRACES.clear()
