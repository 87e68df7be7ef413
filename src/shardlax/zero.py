"""ZeRO-1/2 around optax: bucket plans, sharded optimizer state, global-norm-aware clipping.

Parameters stay replicated over the data axes; the optimizer sees, for every
parameter, only this device's flat shard (`[ceil(n_p / N)]` elements). The
gradient reduction and the parameter re-gather run one collective per
*bucket* of parameters (`kernels.reduce_scatter_bucket`,
`kernels.all_gather_bucket`), not one per parameter.

Optax on shards. Any optax transformation whose update is elementwise per
parameter (sgd, momentum, adam, adamw, lion, rmsprop, ...) gives on the
shards exactly what it gives on the full arrays, because the state of every
element lives on exactly one device. Transforms that reduce over a whole
parameter or the whole tree need the reduction across devices. For the one
in nearly every chain, the global norm (`optax.clip_by_global_norm`), there
are two ways, both exact:

1. `shardlax.zero.clip_by_global_norm(max_norm)`, a drop-in for optax's whose
   norm is `kernels.sharded_tree_norm`: `sqrt(psum(sum of squares))` over the
   axes each leaf is split over, counting replicas once. It is the plain optax
   clip outside `shard_map`.
2. `global_norm_hook()`: while the step is traced, `optax.tree.norm` (the
   function `optax.clip_by_global_norm` and optax's other global-norm users
   call) is replaced by `kernels.sharded_tree_norm`, so a user's unchanged
   chain gets the true global norm. `shardlax.train` turns it on by default
   (`optax_norm_hook=True`).

Per-parameter transforms that look at a parameter's *shape* (LAMB/LARS trust
ratios, `add_decayed_weights(mask=callable)` whose callable tests `ndim`,
factored Adafactor) see flat 1-D shards and are not supported by ZeRO-1/2;
give masks as a pytree of booleans built from the full parameters instead.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (arXiv:1910.02054).
  Pascanu et al., "On the difficulty of training recurrent neural networks",
  2013 (arXiv:1211.5063): clipping by the global norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from shardlax import kernels

#: Default bucket capacity in bytes (PyTorch DDP's `bucket_cap_mb=25`).
DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Parameters (by leaf index) reduced and gathered by one collective each."""

    leaves: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: Any
    n: int

    @property
    def numel(self) -> int:
        """Elements of the parameters, without padding."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def row(self) -> int:
        """S_b: elements of one device's row (its shards of every parameter)."""
        return sum(kernels.shard_size(math.prod(s), self.n) for s in self.shapes)

    @property
    def padded_bytes(self) -> int:
        """Bytes of the `[N, S_b]` bucket: what a reduce-scatter or all-gather moves."""
        return self.n * self.row * jnp.dtype(self.dtype).itemsize

    @property
    def bytes(self) -> int:
        """Bytes of the parameters themselves (no padding)."""
        return self.numel * jnp.dtype(self.dtype).itemsize


def plan_buckets(
    leaves: Sequence[Any], n: int, bucket_bytes: int | None = DEFAULT_BUCKET_BYTES
) -> tuple[Bucket, ...]:
    """Group parameter leaves, in order, into buckets of one dtype and at most `bucket_bytes`.

    A parameter larger than `bucket_bytes` gets a bucket of its own;
    `bucket_bytes=None` puts every parameter of a dtype into one bucket.

    Args:
      leaves: arrays or `ShapeDtypeStruct`s (the parameters, in tree order).
      n: the number of devices the state is split over.
      bucket_bytes: the capacity of a bucket (padded bytes), or None.
    """
    if bucket_bytes is not None and (
        isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1
    ):
        raise ValueError(
            f"plan_buckets(bucket_bytes={bucket_bytes!r}): expected a positive int (bytes) or "
            f"None for one bucket per dtype. For example bucket_bytes=25 * 2**20."
        )
    open_: dict[Any, list[int]] = {}
    done: list[list[int]] = []

    def nbytes(i: int) -> int:
        x = leaves[i]
        return n * kernels.shard_size(math.prod(x.shape), n) * jnp.dtype(x.dtype).itemsize

    for i, x in enumerate(leaves):
        dtype = jnp.dtype(x.dtype)
        cur = open_.setdefault(dtype, [])
        if cur and bucket_bytes is not None and sum(map(nbytes, cur)) + nbytes(i) > bucket_bytes:
            done.append(cur)
            cur = open_[dtype] = []
        cur.append(i)
    done.extend(b for b in open_.values() if b)
    done.sort(key=lambda b: b[0])
    return tuple(
        Bucket(
            leaves=tuple(b),
            shapes=tuple(tuple(leaves[i].shape) for i in b),
            dtype=jnp.dtype(leaves[b[0]].dtype),
            n=n,
        )
        for b in done
    )


def flat_shard_shapes(leaves: Sequence[Any], n: int) -> list[jax.ShapeDtypeStruct]:
    """The global shapes `[N * S_p]` of the flat, padded parameters whose shards optax sees."""
    return [
        jax.ShapeDtypeStruct((n * kernels.shard_size(math.prod(x.shape), n),), x.dtype)
        for x in leaves
    ]


def sharded_state_specs(tx: optax.GradientTransformation, params: Any, axes: Any) -> Any:
    """PartitionSpecs for `tx.init` of flat, padded parameters split over `axes`.

    A state leaf whose shape follows its parameter's (Adam's moments) is split
    as `P(axes)`; one that does not (step counts, scalars) is replicated,
    `P()`. Found by initialising abstractly at two sizes and comparing shapes.
    """
    leaves, treedef = jax.tree.flatten(params)

    def abstract(scale: int):
        tree = jax.tree.unflatten(
            treedef, [jax.ShapeDtypeStruct((scale * x.shape[0],), x.dtype) for x in leaves]
        )
        return jax.eval_shape(tx.init, tree)

    one, two = abstract(1), abstract(2)
    return jax.tree.map(lambda a, b: P(axes) if a.shape != b.shape else P(), one, two)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` whose norm is exact when the updates are shards.

    Math: `g <- g * min(1, max_norm / ||g||)` with `||g||` the norm of the full
    gradient: inside `shard_map` the sum of squares of each leaf is all-reduced
    over the axes it is split over (`kernels.sharded_tree_norm`), a leaf
    replicated over an axis is counted once. Outside `shard_map` it is
    `optax.clip_by_global_norm`, operation for operation.

    Collectives: 1 all-reduce of a scalar per group of leaves with the same
    sharding (one under ZeRO-1/2), none for replicated (DP) gradients.

    Example:
      >>> tx = optax.chain(shardlax.zero.clip_by_global_norm(1.0), optax.adamw(1e-3))

    References:
      Pascanu et al., 2013 (arXiv:1211.5063).
    """

    def update_fn(updates, state, params=None):
        del params
        g_norm = _norm(updates)
        trigger = jnp.squeeze(g_norm < max_norm)

        def clip_fn(t):
            return jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip_fn, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


_HOOK_LOCK = threading.RLock()
_RECORD = threading.local()


def _norm(tree, ord=None, squared=False):
    """`kernels.sharded_tree_norm`, noting its all-reduces for `record_norms`."""
    record = getattr(_RECORD, "axes", None)
    if record is not None:
        groups: dict[tuple[str, ...], list[Any]] = {}
        for x in jax.tree.leaves(tree):
            groups.setdefault(tuple(sorted(kernels.varying_axes(x))), []).append(x.dtype)
        record.extend(
            (axes, jnp.dtype(jnp.result_type(*dts))) for axes, dts in groups.items() if axes
        )
    return kernels.sharded_tree_norm(tree, ord=ord, squared=squared)


@contextlib.contextmanager
def record_norms():
    """Collect the mesh axes of every all-reduce the sharded norms traced inside run.

    Yields a list that receives, per global norm computed on shards, one
    `(axes, dtype)` per group of leaves sharded alike: the scalar all-reduces
    a step declares for its norms.
    """
    saved = getattr(_RECORD, "axes", None)
    _RECORD.axes = []
    try:
        yield _RECORD.axes
    finally:
        _RECORD.axes = saved


def optax_norm_targets() -> list[tuple[Any, str]]:
    """The (module, name) of every tree norm optax's global-norm users look up when traced.

    `optax.tree.norm` and `optax.tree_utils.tree_norm`, and the
    `linear_algebra.global_norm` that `clip_by_global_norm` calls before optax 0.2.8.
    """
    from optax._src import linear_algebra

    return [(optax.tree, "norm"), (optax.tree_utils, "tree_norm"), (linear_algebra, "global_norm")]


@contextlib.contextmanager
def global_norm_hook():
    """While active, optax's tree norms are `kernels.sharded_tree_norm`.

    `optax.clip_by_global_norm` (and optax's other users of `optax.tree.norm`)
    look the function up when they are *traced*, so tracing a step under this
    context bakes the cross-device norm into the compiled program. Outside
    `shard_map` the replacement computes the plain norm, so it changes nothing
    there. Restored on exit; re-entrant and serialised across threads.
    """
    targets = optax_norm_targets()
    with _HOOK_LOCK:
        saved = [(mod, name, getattr(mod, name)) for mod, name in targets]

        try:
            for mod, name in targets:
                setattr(mod, name, _norm)
            yield
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Bucket",
    "clip_by_global_norm",
    "flat_shard_shapes",
    "global_norm_hook",
    "plan_buckets",
    "record_norms",
    "sharded_state_specs",
]
