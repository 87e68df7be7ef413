"""Where a `fully_shard` unit stores each parameter: the fsdp dim, shardlax layers' specs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax.nn._base import ShardedLayer


def path_key(path: Sequence[Any]) -> tuple:
    """A parameter's path as a tuple of names (attribute names and list indices)."""
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path.pop()  # the Variable's value, not a module named `value` (MultiHeadAttention's)
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def shard_dim(shape: Sequence[int], n: int) -> int | None:
    """The dim FSDP splits: 0 if `n` divides it, else the first dim `n` divides."""
    for d, size in enumerate(shape):
        if size % n == 0:
            return d
    return None


def layer_specs(
    owner: str, module: nnx.Module, mesh: Mesh, axis: str, batch_axes: tuple[str, ...],
    units: dict, scan: bool,
) -> dict[tuple, P]:  # fmt: skip
    """{parameter path: stored spec} of the shardlax layers in a unit (outside nested units).

    Inside the unit's `shard_map` the layers run as per-device code (manual
    mode, as in the Trainer's step): their tensor-parallel collectives over
    the model axis are theirs; the unit gathers their model-local shards over
    `axis` (or leaves a layer built with `fsdp_axis=axis` to gather its own).
    """
    out: dict[tuple, P] = {}
    for path, m in nnx.iter_graph(module):
        path = tuple(path)
        if not isinstance(m, ShardedLayer) or any(path[: len(q)] == q for q in units):
            continue
        where = f"{type(m).__name__} at {'.'.join(map(str, path)) or 'the root'!r}"
        fix = "Build it on the unit's mesh with the same batch_axes (fully_shard's defaults)"
        if scan:
            raise ValueError(
                f"{owner}(scan=True): the stacked layers contain a shardlax layer ({where}). "
                f"Wrap each block with fully_shard instead of fully_shard_scan."
            )
        if m.mesh != mesh or tuple(m.batch_axes) != tuple(batch_axes):
            raise ValueError(
                f"{owner}: the shardlax layer {where} was built with mesh axes "
                f"{tuple(m.mesh.shape.items())} and batch_axes={tuple(m.batch_axes)}, the unit "
                f"with {tuple(mesh.shape.items())} and batch_axes={tuple(batch_axes)}. {fix}."
            )
        if getattr(m, "sequence_parallel", False):
            raise ValueError(
                f"{owner}: the shardlax layer {where} is sequence-parallel, but a unit passes "
                f"its inputs whole over the model axis. Build it with sequence_parallel=False "
                f"(or the plan style without sequence_parallel=True), or leave it outside the "
                f"unit."
            )
        own = getattr(m, "fsdp_axis", None) if getattr(m, "_fsdp_live", False) else None
        if own is not None and own != axis:
            raise ValueError(
                f"{owner}(axis={axis!r}): the shardlax layer {where} splits its parameters over "
                f"fsdp_axis={own!r}. Use one fsdp axis for both."
            )
        for name, var in vars(m).items():
            if isinstance(var, nnx.Param):
                spec = getattr(m, f"{name}_spec", None)
                out[(*path, name)] = spec if isinstance(spec, P) else P()
        m.in_fsdp_unit = True  # the unit places these parameters (ShardedLayer.place_params)
    return out
