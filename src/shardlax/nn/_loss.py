"""Vocabulary-parallel cross-entropy on global arrays (wraps the kernel in shard_map)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import BATCH_AXES, MODEL
from shardlax.mesh import axes_size, check_axis, is_manual, place, present_axes, resolve_mesh
from shardlax.nn._base import run_shard_map

_NAME = "vocab_parallel_cross_entropy"


def vocab_parallel_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    vocab_size: int | None = None,
    reduction: str = "mean",
    mesh: Mesh | None = None,
    axis_name: str = MODEL,
    batch_axes: Sequence[str] | None = None,
) -> jax.Array:
    """Token cross-entropy of logits split over the vocabulary, never gathered.

    Equal to `optax.softmax_cross_entropy_with_integer_labels(logits, labels)`
    on the full logits (restricted to the first `vocab_size` columns). See
    `shardlax.kernels.vocab_parallel_cross_entropy` for the math.

    Args:
      logits: `[B, ..., V]`, laid out (or placed) as `P(batch, ..., 'model')`;
        the model axis must divide V.
      labels: int `[B, ...]`. A label outside `[0, vocab_size)` gives NaN for
        its token (and NaN for the mean): bad labels are never silently
        averaged in.
      vocab_size: the true vocabulary when V was padded (columns past it get
        probability 0); default V.
      reduction: ``'mean'`` (a global f32 scalar) or ``'none'`` (f32 `[B, ...]`).
      mesh, axis_name, batch_axes: as the shardlax layers.

    Collectives: 3 all-reduces of f32 `[B/n, ...]` over the model axis (max,
    sum of exponentials, target logit); with ``'mean'``, 1 scalar all-reduce
    over the batch axes. Backward: none.

    Manual mode (inside a shard_map over the whole mesh, e.g. a `Trainer`
    step's loss): `logits` and `labels` are the local shards of the layouts
    above and the per-device body runs as it is; ``'mean'`` is still the
    global mean over the batch axes.
    """
    mesh = resolve_mesh(mesh, _NAME)
    n = check_axis(mesh, axis_name, _NAME, "axis_name")
    batch_axes = present_axes(mesh, BATCH_AXES) if batch_axes is None else tuple(batch_axes)
    for a in batch_axes:
        check_axis(mesh, a, _NAME, "batch_axes")
    if reduction not in ("mean", "none"):
        raise ValueError(f"{_NAME}(reduction={reduction!r}): expected 'mean' or 'none'.")
    if not hasattr(labels, "dtype") or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{_NAME}: labels must be integer class ids, got "
            f"{getattr(labels, 'dtype', type(labels).__name__)}. Pass labels.astype(jnp.int32)."
        )
    if logits.ndim < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{_NAME}: labels.shape={tuple(labels.shape)} must equal logits.shape[:-1] "
            f"(logits.shape={tuple(logits.shape)}). Pass one label per logits row."
        )
    manual = is_manual(mesh)
    v = logits.shape[-1] * (n if manual else 1)  # the global vocabulary
    if v % n:
        raise ValueError(
            f"{_NAME}: logits.shape[-1]={v} (the vocabulary) cannot be split over mesh axis "
            f"{axis_name!r} (size {n}): {n} does not divide {v}. Pad the vocabulary to a "
            f"multiple of {n} (e.g. {-(-v // n) * n}) and pass vocab_size={v}."
        )
    if vocab_size is not None and not 1 <= vocab_size <= v:
        raise ValueError(
            f"{_NAME}(vocab_size={vocab_size}): must be in [1, logits.shape[-1]={v}]. Pass the "
            f"true vocabulary size, at most the (padded) logits width."
        )
    nb = axes_size(mesh, batch_axes)
    if not manual and logits.shape[0] % nb:
        raise ValueError(
            f"{_NAME}: logits.shape[0]={logits.shape[0]} (the batch) cannot be sharded over "
            f"mesh axes {batch_axes} (size {nb}): {nb} does not divide {logits.shape[0]}. "
            f"Use a batch size divisible by {nb}."
        )
    batch = None if not batch_axes else (batch_axes if len(batch_axes) > 1 else batch_axes[0])
    rest = [None] * (logits.ndim - 2)
    logits_spec = P(batch, *rest, axis_name)
    labels_spec = P(batch, *rest)
    logits = place(logits, mesh, logits_spec)
    labels = place(labels, mesh, labels_spec)

    def body(z, y):
        loss = kernels.vocab_parallel_cross_entropy(
            z, y, vocab_size=vocab_size, axis_name=axis_name
        )
        if reduction == "mean":
            return kernels.global_mean(loss, batch_axes)
        return loss

    out_spec = P() if reduction == "mean" else labels_spec
    with jax.named_scope(_NAME):
        return run_shard_map(body, mesh, (logits, labels), (logits_spec, labels_spec), out_spec)
