"""Mesh construction, lookup and validation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._axes import AXES, DATA, FSDP, MODEL


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    model: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: str = "auto",
) -> Mesh:
    """Build a `(data, fsdp, model)` mesh. Axes of size 1 are kept.

    Keeping every axis means a layer's specs never change shape with the mesh:
    `P(('data', 'fsdp'), None)` is valid on a (1, 1, 8) mesh and on (8, 1, 1).

    Args:
      data: size of the pure data-parallel axis.
      fsdp: size of the fully-sharded data-parallel axis (parameters split).
      model: size of the tensor-parallel axis.
      devices: the devices to use, in order; default `jax.devices()`. The
        first `data * fsdp * model` of them are used.
      axis_types: ``"auto"`` (the default: code outside shardlax's
        `shard_map`s, e.g. a plain `nnx.Embed` lookup or an optax loss on a
        batch-sharded array, is compiled by GSPMD propagation, as unmodified
        flax code expects) or ``"explicit"`` (JAX's default for
        `jax.make_mesh`: shardings are part of array types, and code between
        the layers must itself be valid under explicit sharding; JAX raises
        `ShardingTypeError` at a plain `nnx.Embed` lookup on batch-sharded
        ids). shardlax layers and `fully_shard` units place their inputs and
        parameters themselves and run the same declared collectives on both.

    Returns:
      A `jax.sharding.Mesh` with axis names ``('data', 'fsdp', 'model')``.

    Example:
      >>> mesh = shardlax.make_mesh(data=2, model=4)
      >>> dict(mesh.shape)
      {'data': 2, 'fsdp': 1, 'model': 4}
    """
    sizes = {DATA: data, FSDP: fsdp, MODEL: model}
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 1:
            raise ValueError(
                f"make_mesh({name}={size!r}): an axis size must be a positive int. "
                f"Pass {name}=1 to keep the axis without splitting over it."
            )
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(
            f"make_mesh(data={data}, fsdp={fsdp}, model={model}) needs {n} devices but "
            f"{len(devices)} are available. Choose sizes whose product is at most "
            f"{len(devices)}, or on CPU ask for more simulated devices before JAX starts: "
            f"jax.config.update('jax_num_cpu_devices', {n})."
        )
    kinds = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
    if axis_types not in kinds:
        raise ValueError(f"make_mesh(axis_types={axis_types!r}): expected 'explicit' or 'auto'.")
    grid = np.array(devices[:n], dtype=object).reshape(data, fsdp, model)
    return Mesh(grid, AXES, axis_types=(kinds[axis_types],) * 3)


def resolve_mesh(mesh: Mesh | None, owner: str) -> Mesh:
    """`mesh`, or the one set with `jax.set_mesh`; a clear error if neither."""
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(
                f"{owner}(mesh={mesh!r}): expected a jax.sharding.Mesh, got "
                f"{type(mesh).__name__}. Build one with shardlax.make_mesh(...)."
            )
        _check_axis_types(mesh, owner)
        return mesh
    current = jax.sharding.get_mesh()
    if current is None or current.empty:
        raise ValueError(
            f"{owner}(mesh=None): no mesh was given and none is set with jax.set_mesh. "
            f"Pass mesh=shardlax.make_mesh(model=...) or build the layer inside "
            f"`with jax.set_mesh(mesh):`."
        )
    _check_axis_types(current, owner)
    return current


def _check_axis_types(mesh: Mesh, owner: str) -> None:
    kinds = set(mesh.axis_types)
    if AxisType.Manual in kinds or len(kinds) > 1:
        raise ValueError(
            f"{owner}: mesh axis types {mesh.axis_types} are mixed or Manual. shardlax "
            f"places arrays itself and needs every axis Explicit or every axis Auto: "
            f"use shardlax.make_mesh(...) or jax.make_mesh(..., axis_types=(AxisType.Explicit,)*k)."
        )


def check_axis(mesh: Mesh, axis_name: str, owner: str, argument: str) -> int:
    """The size of `axis_name` in `mesh`; ValueError naming the fix if absent."""
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"{owner}({argument}={axis_name!r}): mesh axis {axis_name!r} is not in the mesh, "
            f"whose axes are {tuple(mesh.axis_names)} with sizes {tuple(mesh.axis_sizes)}. "
            f"Pass {argument}= one of {tuple(mesh.axis_names)}, or build the mesh with "
            f"an axis named {axis_name!r} (shardlax.make_mesh names them {AXES})."
        )
    return mesh.shape[axis_name]


def check_divisible(
    owner: str, argument: str, value: int, axis: str | tuple[str, ...], size: int
) -> None:
    """ValueError in the house style if `size` does not divide `value`."""
    if value % size:
        axis_desc = repr(axis) if isinstance(axis, str) else repr(tuple(axis))
        noun = "mesh axis" if isinstance(axis, str) else "mesh axes"
        raise ValueError(
            f"{owner}({argument}={value}) cannot be sharded over {noun} {axis_desc} "
            f"(size {size}): {size} does not divide {value}. Choose {argument} divisible "
            f"by {size}, or a mesh whose {axis_desc} size divides {value}."
        )


def present_axes(mesh: Mesh, axes: Sequence[str]) -> tuple[str, ...]:
    """The names of `axes` that `mesh` has, in order."""
    return tuple(a for a in axes if a in mesh.axis_names)


def live_axes(mesh: Mesh, axes: Sequence[str]) -> tuple[str, ...]:
    """The names of `axes` whose size in `mesh` is more than 1.

    shardlax specs name only these: an axis of size 1 splits nothing, and a
    value typed as varying over it would make autodiff emit a size-1
    all-reduce that XLA keeps in the compiled program.
    """
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    """Product of the sizes of `axes` in `mesh`."""
    return math.prod(mesh.shape[a] for a in axes)


def manual_axes() -> frozenset[str]:
    """The mesh axes that are manual where this is traced (inside a `shard_map`).

    Empty outside any `shard_map`. Inside the one-`shard_map` train step of
    `shardlax.Trainer` every axis of the mesh is manual.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return frozenset()
    return frozenset(mesh.manual_axes)


def is_manual(mesh: Mesh) -> bool:
    """True when every axis of `mesh` of size > 1 is already manual here.

    Then a shardlax layer (or `fully_shard` unit) built on `mesh` runs its
    per-device body directly on the local shards it is given instead of
    opening a `shard_map` of its own (nested shard_maps do not differentiate
    in this JAX version). Its parameters are then the local shards of their
    specs and its activations the local shards of its `in_specs`.
    """
    live = live_axes(mesh, mesh.axis_names)
    if not live:
        # a mesh with nothing to split: manual iff we are inside some shard_map
        return bool(manual_axes())
    manual = manual_axes()
    return all(a in manual for a in live)


def place(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """Lay `x` out as `spec` on `mesh` (eager: device_put; traced: a sharding constraint).

    A no-op when `x` already has that sharding, so chained layers whose
    output and input specs agree move nothing at the boundary. A no-op in
    manual mode (`is_manual(mesh)`): `x` is then already a local shard.
    """
    if is_manual(mesh):
        return x
    return jax.device_put(x, NamedSharding(mesh, spec))


def named(mesh: Mesh, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(mesh, spec)
