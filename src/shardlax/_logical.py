"""The logical layout of a `TrainState`, and the conversions to and from it.

A `TrainState` depends on the strategy and the device count: under zero1 /
zero2 every optimizer-state leaf that follows a parameter (Adam's moments),
and the f32 `master` copy of a mixed-precision step, is in the *flat* layout
of `shardlax.placement`: each device's shard of the parameter flattened,
zero-padded to `N * S` elements and split over the `N` devices of the batch
axes it is replicated over. The *logical* layout removes that: one array per
parameter and per optimizer-state leaf at the parameter's global, unpadded
shape, in the structure `tx.init(params)` gives on the model's parameters.
Leaves that are not flat (dp, fsdp, fsdp+tp, the parameters themselves)
already are logical, whatever their sharding.

Conversions run on device under `jax.jit` with `out_shardings` (the
compiler moves the elements, each device computing its part): a logical
leaf is split like its parameter and, in addition, over the parameter's
replicated batch axes along its largest local dimension they divide, so no
device holds more than its share of the optimizer state and nothing goes
through a host. A leaf with no such dimension stays split like its parameter.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Logical:
    """A training state in the logical layout (a pytree).

    Attributes:
      params: the model's `nnx.Param` state, every leaf at its global unpadded
        shape and stored dtype (the f32 master values under mixed precision).
      opt_state: `tx`'s state in the structure of `tx.init(params)`; a leaf
        that follows a parameter has that parameter's shape.
      rest: the model's other state (batch statistics, RNG keys and counts).
      step: the number of steps taken (int32 scalar).
    """

    params: Any
    opt_state: Any
    rest: Any
    step: Any


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(trainer, name: str, make):
    """One value per trainer and name (the jitted converters compile once per trainer)."""
    per = _CACHE.setdefault(trainer, {})
    if name not in per:
        per[name] = make()
    return per[name]


def _abstract_state(trainer):
    return _cached(trainer, "abstract", lambda: jax.eval_shape(trainer.init))


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _param_tree(trainer, leaves) -> Any:
    return jax.tree.unflatten(trainer._treedef, list(leaves))


def _places(trainer) -> list[Any]:
    places = getattr(trainer, "placements", None)
    if places is None:
        raise TypeError(
            f"shardlax.checkpoint: {type(trainer).__name__} has no `placements` (one "
            f"shardlax.placement.Placement per parameter); pass a shardlax.Trainer."
        )
    return list(places)


def _entries(p) -> list[tuple[str, ...]]:
    """The mesh axes of each dimension of `p.spec` (one tuple per dimension)."""
    spec = list(p.spec) + [None] * (len(p.shape) - len(p.spec))
    return [() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in spec]


def _is_flat(p) -> bool:
    return bool(p.shard_state)


def _logical_spec(p) -> P:
    """Where a logical leaf that follows parameter `p` lives while converted (see module doc)."""
    if not _is_flat(p):
        return p.spec
    n, local, entries = p.n_replicated, p.local_shape, _entries(p)
    dims = [d for d, size in enumerate(local) if size % n == 0]
    if not dims:
        return p.spec
    d = max(dims, key=lambda d: local[d])
    axes = (*entries[d], *p.replicated)
    out: list[Any] = [None if not e else (e[0] if len(e) == 1 else e) for e in entries]
    out[d] = axes[0] if len(axes) == 1 else axes
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _unflat(flat: jax.Array, p) -> jax.Array:
    """The flat layout of `p` (`[spread * N * S]`) -> the logical `[*p.shape]`."""
    sizes, entries, local = p.sizes, _entries(p), p.local_shape
    if flat.shape != tuple(p.flat_shape):
        raise ValueError(
            f"shardlax.checkpoint: an optimizer-state leaf of parameter {p.path!r} "
            f"{tuple(p.shape)} has shape {tuple(flat.shape)}, not the flat ZeRO layout "
            f"{tuple(p.flat_shape)}: its optimizer keeps per-parameter state of another "
            f"shape (e.g. factored Adafactor), which zero1/zero2 do not support. Train it "
            f"with strategy='dp' or 'fsdp'."
        )
    axes = [a for e in entries for a in e]
    grid = [sizes[a] for a in axes]
    numel = math.prod(local)
    x = jnp.reshape(flat, (*grid, p.n_replicated * p.flat_shard))[..., :numel]
    x = jnp.reshape(x, (*grid, *local))
    perm, i = [], 0
    for d, e in enumerate(entries):  # dim d = its split axes (major) then its local size
        perm += list(range(i, i + len(e)))
        i += len(e)
        perm.append(len(axes) + d)
    return jnp.reshape(jnp.transpose(x, perm), p.shape)


def _flat(x: jax.Array, p) -> jax.Array:
    """The logical `[*p.shape]` -> the flat layout of `p`, zero-padded."""
    sizes, entries, local = p.sizes, _entries(p), p.local_shape
    split = []
    for d, e in enumerate(entries):
        split += [sizes[a] for a in e] + [local[d]]
    x = jnp.reshape(x, split)
    outer, inner, i = [], [], 0
    for e in entries:
        outer += list(range(i, i + len(e)))
        i += len(e)
        inner.append(i)
        i += 1
    numel = math.prod(local)
    x = jnp.reshape(jnp.transpose(x, outer + inner), (-1, numel))
    x = jnp.pad(x, ((0, 0), (0, p.n_replicated * p.flat_shard - numel)))
    return jnp.reshape(x, p.flat_shape)


def _auto(f, mesh, spec):
    """`f` with the mesh axes Auto inside (the compiler moves the data), output laid out as `spec`.

    A flat `f32[N*S]` split over the batch axes and a `f32[a, b]` split along
    a dimension are different partitions of the same elements: on an Explicit
    mesh JAX refuses the slice between them, so the compiler is asked for it.
    """
    return jax.sharding.auto_axes(f, out_sharding=NamedSharding(mesh, spec))


def _map_opt(trainer, f, opt_state, *rest, non_params=lambda x: x):
    """`f(leaf, *rest_leaves)` on every optimizer-state leaf that follows a parameter."""
    return optax.tree_utils.tree_map_params(
        trainer.tx, f, opt_state, *rest, transform_non_params=non_params, is_leaf=_is_spec
    )


def abstract_logical(trainer) -> Logical:
    """The logical layout of `trainer`'s state: `ShapeDtypeStruct`s (no shardings)."""
    places = _param_tree(trainer, _places(trainer))
    abstract = _abstract_state(trainer)

    def logical(x, p):
        return jax.ShapeDtypeStruct(p.shape, x.dtype) if _is_flat(p) else x

    params = _param_tree(trainer, trainer._shapes)
    return Logical(
        params=params,
        opt_state=_map_opt(trainer, logical, abstract.opt_state, places),
        rest=abstract.rest,
        step=jax.ShapeDtypeStruct((), jnp.int32),
    )


def logical_specs(trainer) -> Logical:
    """Where each logical leaf lives on `trainer`'s mesh (a `Logical` of PartitionSpecs).

    Parameters as stored (under mixed precision, the master values split like
    the logical optimizer leaves); optimizer leaves that follow a parameter
    split as `_logical_spec` says; the rest as in the `TrainState`.
    """
    specs = trainer.state_specs()
    places = _param_tree(trainer, _places(trainer))
    split = jax.tree.map(_logical_spec, places)
    params = specs.params if specs.master is None else split
    opt = _map_opt(trainer, lambda _, spec: spec, specs.opt_state, split)
    return Logical(params=params, opt_state=opt, rest=specs.rest, step=P())


def to_logical(trainer, state) -> Logical:
    """`state` (of `trainer`'s strategy and mesh) in the logical layout.

    Leaves already logical are returned as they are (nothing moves); flat
    ZeRO leaves (and master shards) are cut to their parameters' shapes on
    device, into the shardings of `logical_specs`.

    Args:
      trainer: the `shardlax.Trainer` that made `state`.
      state: its `TrainState`.

    Returns:
      A `Logical` of global arrays.
    """
    places = _param_tree(trainer, _places(trainer))
    params, opt, master = state.params, state.opt_state, state.master
    if any(_is_flat(p) for p in _places(trainer)):
        specs = logical_specs(trainer)
        mesh = trainer.mesh

        def unflat(x, p):
            return _auto(lambda x: _unflat(x, p), mesh, _logical_spec(p))(x) if _is_flat(p) else x

        def convert(opt, master):
            opt = _map_opt(trainer, unflat, opt, places)
            if master is None:
                return opt, None
            return opt, jax.tree.map(unflat, master, places)

        named = jax.tree.map(lambda s: NamedSharding(mesh, s), (specs.opt_state, specs.params),
                             is_leaf=_is_spec)  # fmt: skip
        out = (named[0], None if master is None else named[1])
        jitted = _cached(trainer, f"to_logical{master is None}",
                         lambda: jax.jit(convert, out_shardings=out))  # fmt: skip
        opt, unflat_master = jitted(opt, master)
        if master is not None:
            params = unflat_master
    elif master is not None:  # mixed precision with nothing flat: master is the parameter
        params = master
    return Logical(params=params, opt_state=opt, rest=state.rest, step=state.step)


def from_logical(trainer, logical: Logical):
    """The `TrainState` of `trainer`'s strategy and mesh holding `logical`'s values.

    Leaves already in place are not copied; flat ZeRO leaves (and the master
    copy) are flattened and padded on device into their shards; mixed
    precision casts the parameters to their `param_dtype` copy.

    Args:
      trainer: the `shardlax.Trainer` to make the state for.
      logical: a `Logical` of arrays (any sharding) shaped as
        `abstract_logical(trainer)`.

    Returns:
      A `TrainState` laid out as `trainer.state_specs()`.
    """
    abstract = _abstract_state(trainer)
    specs = trainer.state_specs()
    mesh = trainer.mesh
    places = _param_tree(trainer, _places(trainer))

    def put(tree, spec_tree):
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                            tree, spec_tree, is_leaf=_is_spec)  # fmt: skip

    step = jax.device_put(jnp.asarray(logical.step, jnp.int32), NamedSharding(mesh, P()))
    mixed = abstract.master is not None

    def to_flat(x, p):
        return _auto(lambda x: _flat(x, p), mesh, p.state_spec)(x) if _is_flat(p) else x

    def convert(params, opt):
        opt = _map_opt(trainer, to_flat, opt, places)
        if not mixed:
            return None, opt, None
        master = jax.tree.map(to_flat, params, places)
        params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract.params)
        return params, opt, master

    def named(tree):
        return jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=_is_spec)

    if mixed or any(_is_flat(p) for p in _places(trainer)):
        out = (named(specs.params) if mixed else None, named(specs.opt_state),
               named(specs.master) if mixed else None)  # fmt: skip
        jitted = _cached(trainer, "from_logical", lambda: jax.jit(convert, out_shardings=out))
        params, opt, master = jitted(logical.params, logical.opt_state)
    else:  # already the trainer's layout: place, no copy where the sharding fits
        params, opt, master = None, put(logical.opt_state, specs.opt_state), None
    if not mixed:
        params = put(logical.params, specs.params)
    return dataclasses.replace(
        abstract,
        params=params,
        opt_state=opt,
        rest=put(logical.rest, specs.rest),
        step=step,
        master=master,
    )
