"""Where a layer's loaded parameters and inputs are laid out, and the layer calls a trace made.

`place_params` moves weights loaded the ordinary way (host arrays,
unsharded arrays) to the layout a layer stores them in, once, with an
explicit `device_put`; `to_spec` does the same for a layer's arguments
(a sharding constraint under jit). `recording_calls` records the outermost
shardlax layer calls a trace makes (a `fully_shard` unit declares the
collectives of the layers it runs from them).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def place_params(module: nnx.Module) -> nnx.Module:
    """Lay out every shardlax layer's parameters in `module` as the layer stores them.

    Call it once after loading weights the ordinary way (`nnx.update(model,
    host_state)`, `param.set_value(numpy_array)`), outside `jit`: each
    parameter not laid out as its spec is moved there by one explicit
    `jax.device_put` (see `ShardedLayer.place_params`). Layers do this by
    themselves when called eagerly; under `jit` they can only constrain the
    value for that program, so placing first keeps the compiled step as
    declared. Plain flax layers in `module` are left as they are. Returns
    `module`.
    """
    from shardlax.nn._base import ShardedLayer

    for _, node in nnx.iter_graph(module):
        if isinstance(node, ShardedLayer):
            node.place_params()
    return module


#: (layer, method, input, global input shape, input dtype, kwargs) of the outermost layer
#: calls traced under `recording_calls` (None: not recording).
_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar("shardlax_calls", default=None)
_IN_LAYER: contextvars.ContextVar[bool] = contextvars.ContextVar("shardlax_in_layer", default=False)


@contextlib.contextmanager
def recording_calls() -> Iterator[list]:
    """Record the shardlax layer calls traced inside (not the inner layers of a composite).

    A `fully_shard` unit declares the collectives of the layers it runs from
    these (each layer's `declared_collectives` for the global shape it saw).
    """
    calls: list = []
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


def recorded_calls() -> list | None:
    """The list `recording_calls` is filling, or None."""
    return _CALLS.get()


def _placing(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def method(self, *args: Any, **kwargs: Any) -> Any:
        self.place_params()
        calls = _CALLS.get()
        if calls is None or _IN_LAYER.get():
            return fn(self, *args, **kwargs)
        x = args[0] if args else None
        shape = tuple(self._global_view(x).shape) if hasattr(x, "shape") else None
        calls.append((self, fn.__name__, x, shape, getattr(x, "dtype", None), dict(kwargs)))
        token = _IN_LAYER.set(True)
        try:
            return fn(self, *args, **kwargs)
        finally:
            _IN_LAYER.reset(token)

    method._places_params = True
    return method


def _explicit(mesh: Mesh) -> bool:
    return all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _type_spec(x: Any) -> P:
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return P() if spec is None else spec


def _spec_entries(spec: P, ndim: int, mesh: Mesh) -> tuple[tuple[str, ...], ...]:
    """Per dim, the live mesh axes `spec` splits it over (size-1 axes split nothing)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    out = []
    for e in entries[:ndim]:
        axes = () if e is None else ((e,) if isinstance(e, str) else tuple(e))
        out.append(tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1))
    return tuple(out)


def _laid_out(x: Any, mesh: Mesh, spec: P) -> bool:
    sharding = getattr(x, "sharding", None)
    return (
        isinstance(x, jax.Array)
        and sharding is not None
        and sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
    )


def _to_spec(x: Any, mesh: Mesh, spec: P) -> Any:
    """`x` laid out as `spec` where it is not yet: a loaded (unsharded or host) value.

    Eager: one explicit `device_put` unless `x` already is laid out so (the
    layers' own activations and stored parameters: a no-op). Traced on an
    Explicit mesh: an unsharded value gets a sharding constraint to `spec`
    (a local slice); any other layout is left to shard_map's own check
    (parameters are checked, with their names, by `ShardedLayer.place_params`).
    """
    if not isinstance(spec, P) or not hasattr(x, "ndim"):
        return x  # a pytree argument with its own spec tree: left as the layer built it
    if isinstance(x, jax.core.Tracer):
        if (
            _explicit(mesh)
            and any(_spec_entries(spec, x.ndim, mesh))
            and not any(_spec_entries(_type_spec(x), x.ndim, mesh))
        ):
            return jax.device_put(x, NamedSharding(mesh, spec))
        return x
    if _laid_out(x, mesh, spec):
        return x
    return jax.device_put(x, NamedSharding(mesh, spec))
