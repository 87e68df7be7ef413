"""The class of a `fully_shard` unit (`FSDPModule`) and how a module becomes one.

`_make_unit` decides each parameter's split dim and spec, places the
parameters, and changes the module's class in place to `FSDP<Class>`
(`_unit_class`), as FSDP2's `fully_shard` does; `shardlax.fsdp` documents
the contract.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax._axes import BATCH_AXES, FSDP
from shardlax._fsdp_declare import UnitDeclarations
from shardlax._fsdp_place import layer_specs, shard_dim
from shardlax._fsdp_place import path_key as _path_key
from shardlax._fsdp_run import run_unit
from shardlax.mesh import check_axis, present_axes, resolve_mesh
from shardlax.placement import local_shape, path_str, spec_axes, storage_spec
from shardlax.precision import MixedPrecision

_path_str = path_str  # one spelling of nnx paths (shardlax.placement)


@dataclasses.dataclass(frozen=True)
class UnitConfig:
    """How a `fully_shard` unit stores and gathers its parameters (`unit.fsdp_config`).

    Attributes:
      mesh, axis, batch_axes, reshard_after_forward, policy, state_reduction,
        per_device_random: as given to `fully_shard`.
      axis_size: the size of `axis`.
      scan, remat: a stack of layers scanned with `lax.scan` (`fully_shard_scan`).
      forward_methods: private methods that run through the unit
        (`register_fsdp_forward_method`); `__call__` and public methods always do.
      dims: for each parameter (in `jax.tree.leaves` order of
        `nnx.state(unit, nnx.Param)`), the dim split over `axis`; `None` for a
        parameter kept whole (no dim divisible by N) or owned by a nested unit.
      param_specs: the PartitionSpec each parameter is stored with.
      owned: for each parameter, True when this unit gathers it (False: a
        nested unit or a shardlax layer owns it and gathers it itself).
      base: the module's own class (the unit's class is a subclass of it).
    """

    mesh: Mesh
    axis: str
    axis_size: int
    batch_axes: tuple[str, ...]
    reshard_after_forward: bool
    policy: MixedPrecision | None
    scan: bool
    remat: bool
    state_reduction: str | None
    per_device_random: bool
    forward_methods: tuple[str, ...]
    dims: tuple[int | None, ...]
    param_specs: tuple[P, ...]
    owned: tuple[bool, ...]
    base: type


class FSDPModule(UnitDeclarations):
    """The class of every `fully_shard` unit, FSDP2's way: the module itself, re-classed.

    `fully_shard(block)` changes `block`'s class, in place, to a subclass of
    both `FSDPModule` and the block's own class (`FSDPBlock`), as FSDP2's
    `fully_shard` does: the module keeps its identity, its attributes and
    its nnx paths (optax path labels, checkpoints and `nnx.state` see the same
    tree with or without units); `__call__` and the class's public methods run
    through the unit (parameters gathered). `isinstance(block, FSDPModule)`
    tells a unit; `block.fsdp_config` is its `UnitConfig`.
    """

    fsdp_config: UnitConfig

    def spec_of(self, key: tuple) -> P:
        """The stored spec of the parameter at `key` (a path under the unit)."""
        params = nnx.state(self, nnx.Param)
        for (path, _), spec in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            self.fsdp_config.param_specs,
            strict=True,
        ):
            if _path_key(path) == tuple(key):
                return spec
        raise KeyError(key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fsdp_call("__call__", args, kwargs)

    def _fsdp_call(self, method: str, args: tuple, kwargs: dict) -> Any:
        owner = f"FSDPModule({self.fsdp_config.base.__name__})"
        with jax.named_scope(f"{owner}.{method}" if method != "__call__" else owner):
            return run_unit(self, owner, method, args, kwargs)


# what the unit's class adds to the module's: a module defining any of these cannot be a unit
_UNIT_NAMES = frozenset(
    n
    for c in (FSDPModule, UnitDeclarations)
    for n, v in vars(c).items()
    if inspect.isfunction(v) and not n.startswith("__")
) | {"fsdp_config"}
# methods of nnx.Module / flax's layers that configure, never compute: not run through the unit
_NOT_FORWARD = frozenset(dir(nnx.Module)) | {"set_view"}
_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _routed(method: str) -> Any:
    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._fsdp_call(method, args, kwargs)

    run.__name__ = method
    return run


def _refused(method: str) -> Any:
    def refuse(self, *args: Any, **kwargs: Any) -> Any:
        name = self.fsdp_config.base.__name__
        raise AttributeError(
            f"FSDPModule({name}).{method}: a private method of the wrapped module does not "
            f"run through the unit (its parameters would not be gathered). Call "
            f"register_fsdp_forward_method(unit, {method!r}) first, or call "
            f"{name}.{method}(unit, ...) on unsharded parameters."
        )

    refuse.__name__ = method
    return refuse


def _unit_class(base: type, forward_methods: tuple[str, ...]) -> type:
    """`FSDP<base>`: the unit class of `base` (one per class and registered methods, so
    graphdefs of equal units are equal and `nnx.jit` traces once).

    `base` comes first among the bases (CPython allows `__class__` assignment only
    between classes of one layout lineage); the unit's own methods are copied into the
    class so they take precedence over `base`'s."""
    key = (base, forward_methods)
    cls = _CLASSES.get(key)
    if cls is None:
        body: dict[str, Any] = {"__module__": base.__module__, "__doc__": base.__doc__}
        for name in dir(base):
            if name.startswith("__") or name in _NOT_FORWARD:
                continue
            if not inspect.isfunction(inspect.getattr_static(base, name)):
                continue  # properties, static and class methods, data
            owner = next(c for c in base.__mro__ if name in vars(c))
            if not name.startswith("_") or name in forward_methods:
                body[name] = _routed(name)
            elif not owner.__module__.startswith("shardlax."):  # a shardlax layer's helpers
                body[name] = _refused(name)
        for c in (UnitDeclarations, FSDPModule):
            body.update({n: v for n, v in vars(c).items() if inspect.isfunction(v)})
        cls = type(f"FSDP{base.__name__}", (base, FSDPModule), body)
        cls.__qualname__ = f"FSDP{base.__qualname__}"
        _CLASSES[key] = cls
    return cls


def _make_unit(
    module: nnx.Module,
    *,
    mesh: Mesh | None = None,
    axis: str = FSDP,
    reshard_after_forward: bool = True,
    policy: MixedPrecision | None = None,
    batch_axes: Sequence[str] | None = None,
    scan: bool = False,
    remat: bool = False,
    state_reduction: str | None = None,
    per_device_random: bool = False,
) -> FSDPModule:
    """`fully_shard` / `fully_shard_scan`: place `module`'s parameters, re-class it."""
    owner = f"fully_shard({type(module).__name__})"
    if state_reduction not in (None, "mean"):
        raise ValueError(
            f"{owner}(state_reduction={state_reduction!r}): expected None (state updated "
            f"from the batch shard is an error) or 'mean' (it is averaged over the batch "
            f"axes: a running mean over the batch)."
        )
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"fully_shard(module={type(module).__name__}): expected a flax.nnx.Module. "
            f"Pass an nnx module such as nnx.Linear(...) or your own block."
        )
    if isinstance(module, FSDPModule):
        raise ValueError(
            f"fully_shard(module={type(module).__name__}): the module is already a fully_shard "
            f"unit (its parameters are placed). Call fully_shard once per module: wrap the "
            f"blocks, then their parent."
        )
    clash = sorted(
        n for n in _UNIT_NAMES
        if n in vars(module) or any(
            n in vars(c) for c in type(module).__mro__ if not c.__module__.startswith("shardlax")
        )
    )  # fmt: skip
    if clash:
        raise ValueError(
            f"{owner}: {type(module).__name__} defines {clash}, which the unit's class "
            f"(FSDPModule) defines too. Rename them in {type(module).__name__}, or wrap its "
            f"children instead."
        )
    mesh = resolve_mesh(mesh, owner)
    n = check_axis(mesh, axis, owner, "axis")
    if batch_axes is None:
        batch_axes = present_axes(mesh, BATCH_AXES)
    batch_axes = tuple(batch_axes)
    for a in batch_axes:
        check_axis(mesh, a, owner, "batch_axes")
    if axis not in batch_axes:
        raise ValueError(
            f"{owner}(axis={axis!r}, batch_axes={batch_axes}): the batch must be split over "
            f"the fsdp axis (mesh axis {axis!r}, size {n}), or every device of it would "
            f"compute the same gradient and the reduce-scatter would count it {n} times. "
            f"Add {axis!r} to batch_axes."
        )
    if policy is not None and not isinstance(policy, MixedPrecision):
        raise TypeError(
            f"{owner}(policy={policy!r}): expected a shardlax.precision.MixedPrecision or "
            f"None, got {type(policy).__name__}. Pass "
            f"MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)."
        )

    # nested units: their parameters keep their specs and are gathered by them
    units = {}
    for path, m in nnx.iter_graph(module):
        if isinstance(m, FSDPModule) and not any(path[: len(q)] == q for q in units):
            c = m.fsdp_config
            if c.mesh != mesh or c.axis != axis or c.batch_axes != batch_axes:
                raise ValueError(
                    f"{owner}: the nested unit at {'.'.join(map(str, path))!r} was built "
                    f"with mesh axes {tuple(c.mesh.shape.items())}, axis={c.axis!r}, "
                    f"batch_axes={c.batch_axes}, this one with "
                    f"{tuple(mesh.shape.items())}, axis={axis!r}, batch_axes="
                    f"{batch_axes}. Nested fully_shard calls must use the same mesh and axes."
                )
            units[tuple(path)] = m
    if units and scan:
        raise ValueError(
            f"{owner}(scan=True): the stacked layers cannot contain fully_shard units."
        )

    # shardlax layers (parallelize's twins): they run as per-device code in the unit
    own_specs = layer_specs(owner, module, mesh, axis, batch_axes, units, scan)

    params = nnx.state(module, nnx.Param)
    dims, specs, owned = [], [], []
    lead = 1 if scan else 0  # a stacked layer dim is never split
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = _path_key(path)
        unit = next(((q, u) for q, u in units.items() if key[: len(q)] == q), None)
        if unit is not None:
            q, u = unit
            specs.append(u.spec_of(key[len(q) :]))
            dims.append(None)
            owned.append(False)
            continue
        if key in own_specs:
            base = own_specs[key]
            if axis in spec_axes(base):  # the layer gathers it over fsdp itself
                specs.append(base)
                dims.append(None)
                owned.append(False)
                continue
            d = shard_dim(local_shape(x.shape, base, mesh), n) if n > 1 else None
            dims.append(d)  # the unit gathers the layer's (model-local) shard over fsdp
            specs.append(storage_spec(x.ndim, [(d, axis)] if d is not None else [], base))
            owned.append(True)
            continue
        if scan and x.ndim == 0:
            raise ValueError(
                f"{owner}(scan=True): parameter {_path_str(path)!r} is a scalar, so it has "
                f"no leading layer dim. Build the stack with nnx.vmap (see fully_shard_scan)."
            )
        d = shard_dim(x.shape[lead:], n) if n > 1 else None
        dims.append(d)  # the dim of one layer's parameter; None: kept whole
        specs.append(storage_spec(x.ndim, [(lead + d, axis)] if d is not None else []))
        owned.append(True)
    leaves, treedef = jax.tree.flatten(params)
    placed = [
        x if not o else jax.device_put(x, NamedSharding(mesh, s))
        for x, s, o in zip(leaves, specs, owned, strict=True)
    ]
    nnx.update(module, jax.tree.unflatten(treedef, placed))
    # the spec as Variable metadata too (as shardlax.nn layers do): nnx.eval_shape of
    # a model on an Auto mesh keeps the placement only from there
    keys = [_path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    mine = {k: sp for k, sp, o in zip(keys, specs, owned, strict=True) if o}
    for path, node in nnx.iter_graph(module):
        spec = mine.get(tuple(path)) if isinstance(node, nnx.Param) else None
        if spec is not None:
            node.set_metadata("out_sharding", spec)
            node.set_metadata("mesh", mesh)
    config = UnitConfig(
        mesh=mesh,
        axis=axis,
        axis_size=n,
        batch_axes=batch_axes,
        reshard_after_forward=bool(reshard_after_forward),
        policy=policy,
        scan=bool(scan),
        remat=bool(remat),
        state_reduction=state_reduction,
        per_device_random=bool(per_device_random),
        forward_methods=(),
        dims=tuple(dims),
        param_specs=tuple(specs),
        owned=tuple(owned),
        base=type(module),
    )
    module.__class__ = _unit_class(config.base, ())
    module.fsdp_config = config
    return module
