"""What the parallel projections share: fused parts, flax metadata, one shared input.

`Parts` (the split outputs of a fused projection), `metadata_param` (a
parameter placed by shardlax with flax's `kernel_metadata` / `with_partitioning`
metadata kept) and `shared_model_input` (one input-gradient all-reduce for the
column layers that read the same activation) are used by the linears
(`shardlax.nn._linear`) and `ParallelEinsum`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from flax.nnx.variablelib import VariableMetadata
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax.mesh import is_manual
from shardlax.nn._base import ShardedLayer, run_shard_map


class Parts(tuple):
    """The parts of a fused projection (`Colwise(parts=k)`), each split over the model axis.

    A tuple: unpack it (`k, v = self.kv_proj(x)`). It refuses to become one
    array (so `jnp.split(self.kv_proj(x), 2, -1)` raises instead of silently
    splitting the stacked parts on the wrong dim).
    """

    owner: str = "ColumnParallelLinear(parts=k)"

    def __jax_array__(self):
        k = len(self)
        names = ", ".join(f"y{i}" for i in range(k))
        raise TypeError(
            f"{self.owner} returns its {k} parts already split, each sharded over the "
            f"model axis on its own; it is not one array. Unpack it: write `{names} = "
            f"proj(x)` instead of `{names} = jnp.split(proj(x), {k}, axis=-1)`. (A "
            f"contiguous [..., {k}F] output split by jnp.split would move data between "
            f"devices behind your back.)"
        )


#: Metadata keys that name a placement: shardlax decides placement itself.
_PLACEMENT_KEYS = ("sharding", "out_sharding", "sharding_names", "mesh")


def metadata_param(
    init: Any, key: jax.Array, shape: Sequence[int], dtype: Any, mesh: Any, spec: P,
    metadata: Any = None,
) -> nnx.Param:  # fmt: skip
    """`sharded_param` plus flax's `kernel_metadata`-style extra metadata.

    `init` may be an `nnx.with_partitioning(...)` initializer (its logical
    sharding names are kept as metadata; the placement is shardlax's).
    Placement keys in `metadata` (`sharding`, `out_sharding`, `mesh`) are
    dropped: the layer's spec decides where the parameter lives.
    """
    meta = dict(metadata or {})
    for k in _PLACEMENT_KEYS:
        meta.pop(k, None)
    value = init(key, tuple(shape), dtype)
    if isinstance(value, VariableMetadata):  # nnx.with_partitioning: value + metadata
        extra = {k: v for k, v in value.metadata.items() if k not in _PLACEMENT_KEYS}
        meta = {**extra, **meta}
        value = value.raw_value
    value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
    return nnx.Param(value, out_sharding=spec, mesh=mesh, **meta)


#: The last shared input per (mesh, axis, layout, manual): (x, trace, value, spec).
_SHARED: dict[tuple, tuple[Any, Any, Any, P]] = {}


def shared_model_input(
    layer: ShardedLayer, source: Any, x: jax.Array, x_spec: P
) -> tuple[Any, P, Any]:
    """`x` typed varying over the model axis once for every column layer that reads it.

    `source` is the activation as the caller passed it (before `_place`,
    which makes a new value per call): readers of the same `source` share.
    Returns `(arg, spec, unwrap)`: pass `arg` to the layer's shard_map with
    `spec` and call `unwrap` on it inside the body. Column layers that read
    the same traced activation (same object, same trace: q, k and v of one
    attention; gate and up) get the same `arg`, so autodiff sums their partial
    input gradients locally and one `kernels.share_input` cast turns the sum
    into the only all-reduce of dx.

    Top level (global arrays): `arg` is `x` with a leading model dim,
    `[N, ...]` laid out `P(model, *x_spec)` (each device's slice is its own
    copy of x: no data moves), made by a shard_map of its own. Manual mode
    (inside a shard_map over the mesh): `arg` is the local shard cast to
    varying.
    """
    axis = layer.axis_name
    if layer.model_size == 1:
        return x, x_spec, _identity
    manual = is_manual(layer.mesh)
    key = (layer.mesh, axis, tuple(x_spec), manual)
    cacheable = isinstance(source, jax.core.Tracer)
    if cacheable:
        hit = _SHARED.get(key)
        if hit is not None and hit[0] is source and hit[1] == nnx.tracers.TraceState():
            return hit[2], hit[3], _identity if manual else _first
    if manual:
        arg, spec = kernels.share_input(x, axis), x_spec
    else:
        spec = P(axis, *x_spec)
        arg = run_shard_map(
            lambda x: kernels.share_input(x, axis)[None], layer.mesh, (x,), (x_spec,), spec
        )
    if cacheable:
        _SHARED[key] = (source, nnx.tracers.TraceState(), arg, spec)
    return arg, spec, _identity if manual else _first


def _identity(x):
    return x


def _first(x):
    return x[0]
