"""One description of where a parameter lives and how its gradient travels.

Every parameter of a model trained by `shardlax.Trainer` gets a `Placement`:

- `spec`: how it is *stored* on the mesh (`P('fsdp', 'model')` for an FSDP +
  tensor-parallel kernel, `P()` for a plain flax parameter). The layers and
  `fully_shard` chose it when they built the parameter; the Trainer reads it
  from the array's `NamedSharding`.
- `replicated`: the batch axes (the mesh axes the batch is split over) the
  parameter is *not* split over. Every device of them computes a partial
  gradient from its own examples; the strategy decides how those partials are
  summed: all-reduced (dp, hybrid FSDP), all-reduced then sliced (ZeRO-1) or
  reduce-scattered (ZeRO-2). Over the batch axes the parameter *is* split
  over (fsdp), its gradient was already reduce-scattered where it was
  gathered (ZeRO-3).
- `shard_state`: whether the optimizer state (and the update) of the
  parameter is split over `replicated` as flat, zero-padded shards
  (`[ceil(n / N)]` elements of the local parameter per device; ZeRO-1/2),
  or laid out like the parameter itself.

- `compute_dtype` / `reduce_dtype`: the dtype the parameter is gathered and
  computed in, and the dtype its gradient is reduced (and, sharded, updated)
  in: the stored dtype, or a `MixedPrecision` policy's choice
  (`shardlax.precision.wire_dtypes`, the rule the layers and `fully_shard`
  apply too).

dp, ZeRO-1/2/3, hybrid sharding and tensor parallelism are all choices of
these fields; `shardlax.strategies` only says which.

The *flat* layout of a ZeRO-sharded leaf, as a global array: the local
parameter (this device's shard of `spec`) is flattened, zero-padded to
`N * S` elements (`N` = size of `replicated`, `S = ceil(local size / N)`) and
device `r` of `replicated` keeps elements `[r*S, (r+1)*S)`. The global array
concatenates those chunks with spec `P((*spec axes, *replicated))`: its
length is `(product of the spec's axis sizes) * N * S`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax.precision import MixedPrecision, wire_dtypes


def spec_axes(spec: P) -> tuple[str, ...]:
    """The mesh axes a PartitionSpec splits over, in order of appearance."""
    out: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        out.extend((entry,) if isinstance(entry, str) else tuple(entry))
    return tuple(out)


def storage_spec(
    ndim: int, splits: Sequence[tuple[int, str | None]] = (), base: P | None = None
) -> P:
    """Where a parameter is stored: `base` with each `(dim, axis)` of `splits` added.

    The one constructor of storage specs: tensor-parallel layers split a dim
    over ``model``, FSDP (the layers' `fsdp_axis`, `fully_shard`) adds
    ``fsdp`` on a dim, after any axis already there, so `P('model')` plus
    `(0, 'fsdp')` is `P(('model', 'fsdp'))`, whose fsdp gather rebuilds the
    model shard. `axis=None` adds nothing. Divisibility is the caller's to
    check (it knows which argument to name).
    """
    base = P() if base is None else base
    entries: list[Any] = list(base) + [None] * (ndim - len(base))
    for dim, axis in splits:
        if axis is None:
            continue
        cur = entries[dim]
        axes = (() if cur is None else ((cur,) if isinstance(cur, str) else tuple(cur))) + (axis,)
        entries[dim] = axes if len(axes) > 1 else axes[0]
    return P(*entries)


def local_shape(shape: Sequence[int], spec: P, sizes: Any) -> tuple[int, ...]:
    """The shape of one device's shard of an array of `shape` stored as `spec`.

    `sizes`: the mesh axis sizes (a `Mesh`, or ``{axis: size}``).
    """
    sizes = dict(sizes.shape) if isinstance(sizes, Mesh) else sizes
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for d, entry in zip(shape, entries, strict=True):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        out.append(int(d) // math.prod(sizes[a] for a in axes))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one parameter is stored and how its gradient and optimizer state are laid out.

    Attributes:
      path: the parameter's nnx path, dotted (``"layers.0.attn.q.kernel"``).
      shape: the global (logical) shape.
      dtype: the model's (master) dtype.
      spec: the storage PartitionSpec (axes of size 1 dropped).
      replicated: live batch axes the parameter is replicated over, in mesh order.
      shard_state: ZeRO-1/2: optimizer state split over `replicated` as flat shards.
      mesh_shape: the mesh's ``{axis: size}``.
      compute_dtype: the dtype it is gathered and computed in (the `TrainState`
        keeps it in this dtype; the f32 master under a `MixedPrecision`).
      reduce_dtype: the dtype its gradient is reduced in (and its flat ZeRO
        shard and optimizer state are kept in).
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    spec: P
    replicated: tuple[str, ...]
    shard_state: bool
    mesh_shape: tuple[tuple[str, int], ...]
    compute_dtype: Any = None
    reduce_dtype: Any = None

    def __post_init__(self) -> None:
        for field in ("compute_dtype", "reduce_dtype"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, jnp.dtype(self.dtype))

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh_shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of one device's shard of `spec`."""
        return local_shape(self.shape, self.spec, self.sizes)

    @property
    def n_replicated(self) -> int:
        sizes = self.sizes
        return math.prod(sizes[a] for a in self.replicated)

    @property
    def flat_shard(self) -> int:
        """S: elements per device of the flat ZeRO shard of the local parameter."""
        n = self.n_replicated
        return -(-math.prod(self.local_shape) // n)

    @property
    def flat_spec(self) -> P:
        """The spec of the flat ZeRO layout (see the module docstring)."""
        axes = (*spec_axes(self.spec), *self.replicated)
        if not axes:
            return P(None)
        return P(axes if len(axes) > 1 else axes[0])

    @property
    def flat_shape(self) -> tuple[int]:
        """The global shape of the flat ZeRO layout."""
        sizes = self.sizes
        spread = math.prod(sizes[a] for a in spec_axes(self.spec))
        return (spread * self.n_replicated * self.flat_shard,)

    @property
    def state_spec(self) -> P:
        """The spec of the optimizer-state leaves that follow this parameter."""
        return self.flat_spec if self.shard_state else self.spec

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.flat_shape if self.shard_state else self.shape

    def state_struct(self) -> jax.ShapeDtypeStruct:
        """The optimizer's view of the parameter: its flat shard (reduce dtype) or itself."""
        if self.shard_state:
            return jax.ShapeDtypeStruct(self.flat_shape, self.reduce_dtype)
        return jax.ShapeDtypeStruct(self.shape, self.dtype)


def live_spec(spec: P, mesh: Mesh) -> P:
    """`spec` with the axes of size 1 dropped (they split nothing and must not compile)."""
    out = []
    for entry in spec:
        if entry is None:
            out.append(None)
            continue
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry)
                     if mesh.shape[a] > 1)  # fmt: skip
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def spec_of(x: Any, mesh: Mesh, owner: str, path: str) -> P:
    """The storage spec of a parameter value (P() when it is not on a mesh)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        if sharding.mesh.shape_tuple != mesh.shape_tuple:
            raise ValueError(
                f"{owner}: parameter {path!r} lives on mesh {dict(sharding.mesh.shape)}, not on "
                f"the trainer's mesh {dict(mesh.shape)}. Build the model and the Trainer on one "
                f"mesh."
            )
        return live_spec(sharding.spec, mesh)
    return P()


def plan(
    paths: Sequence[str],
    values: Sequence[Any],
    mesh: Mesh,
    batch_axes: Sequence[str],
    *,
    shard_state: bool,
    owner: str,
    policy: MixedPrecision | None = None,
) -> list[Placement]:
    """The `Placement` of every parameter leaf (in `jax.tree.leaves` order).

    `policy`: the Trainer's `MixedPrecision` (None: compute and reduce in each
    parameter's own dtype)."""
    live_batch = tuple(a for a in mesh.axis_names if a in batch_axes and mesh.shape[a] > 1)
    mesh_shape = tuple((a, int(mesh.shape[a])) for a in mesh.axis_names)
    out = []
    for path, x in zip(paths, values, strict=True):
        spec = spec_of(x, mesh, owner, path)
        split = set(spec_axes(spec))
        replicated = tuple(a for a in live_batch if a not in split)
        compute, reduce = wire_dtypes(x.dtype, policy)
        out.append(
            Placement(
                path=path,
                shape=tuple(int(d) for d in x.shape),
                dtype=jnp.dtype(x.dtype),
                spec=spec,
                replicated=replicated,
                shard_state=bool(shard_state and replicated),
                mesh_shape=mesh_shape,
                compute_dtype=compute,
                reduce_dtype=reduce,
            )
        )
    return out


def path_str(path: Sequence[Any]) -> str:
    """A dotted nnx path from a `tree_flatten_with_path` key path."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name == "value":
            continue
        parts.append(str(name))
    return ".".join(parts)


__all__ = ["Placement", "live_spec", "path_str", "plan", "spec_axes", "spec_of"]
