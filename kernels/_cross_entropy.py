"""Cross-entropy of logits split over the vocabulary, without gathering them.

References:
  Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053), section 3: "fuse
  the output of the parallel GEMM with the cross entropy loss", reducing the
  communication from b*s*v logits to b*s scalars.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ._collectives import all_reduce, all_reduce_max, axis_size
from ._sequence import shard_start


def vocab_parallel_cross_entropy(
    logits_shard: jax.Array,
    labels: jax.Array,
    *,
    vocab_size: int | None = None,
    axis_name: str = "model",
) -> jax.Array:
    """Per-token `-log softmax(logits)[label]` from vocabulary-split logits.

    Math, with `m = max_v z_v` (a stability shift that cancels):
      `loss = log sum_v exp(z_v - m) - (z_label - m)`
    Each device computes its local max, local sum of exponentials and, if it
    owns the label's column, the label's logit; one all-reduce each combines
    them. The gradient `softmax(z) - onehot(label)` is computed locally from
    the same values: the backward pass has no collective.

    Padded vocabulary: the global logits may be wider than the vocabulary,
    `V_pad >= vocab_size` (e.g. padded so the model axis divides it, as
    Megatron's `make-vocab-size-divisible-by`). Columns at or past
    `vocab_size` are masked to `-inf`: probability exactly 0, gradient
    exactly 0, never a target.

    Labels: a label outside `[0, vocab_size)` (including a padded column)
    gives a NaN loss for that token, so a bad label cannot be silently
    averaged in; its gradient is NaN as well.

    Shardings (N = size of `axis_name`):
      logits_shard: [..., V_pad/N]  `P(..., axis_name)`; any float dtype,
                    computed in float32
      labels:       int[...]        replicated over `axis_name`
      returns:      f32[...]        replicated over `axis_name`

    Collectives over `axis_name`: forward 3 all-reduces of f32[...] (max,
    sum of exponentials, target logit: a few scalars per token, not the
    logits); backward none.
    """
    v_local = logits_shard.shape[-1]
    v_pad = v_local * axis_size(axis_name)
    vocab = v_pad if vocab_size is None else vocab_size
    start = shard_start(axis_name, v_local)
    z = logits_shard.astype(jnp.float32)  # z: f32[..., V/N]
    if vocab < v_pad:
        column = start + jnp.arange(v_local)
        z = jnp.where(column < vocab, z, -jnp.inf)
    m = all_reduce_max(jax.lax.stop_gradient(jnp.max(z, axis=-1)), axis_name)  # m: f32[...]
    shifted = z - m[..., None]
    sum_exp = all_reduce(jnp.sum(jnp.exp(shifted), axis=-1), axis_name)  # f32[...]
    local = labels - start
    mine = (local >= 0) & (local < v_local)
    picked = jnp.take_along_axis(shifted, jnp.where(mine, local, 0)[..., None], axis=-1)[..., 0]
    target = all_reduce(jnp.where(mine, picked, jnp.zeros((), jnp.float32)), axis_name)
    loss = jnp.log(sum_exp) - target  # loss: f32[...]
    valid = (labels >= 0) & (labels < vocab)
    return jnp.where(valid, loss, jnp.full((), jnp.nan, jnp.float32))


def global_mean(local: jax.Array, batch_axes: Sequence[str]) -> jax.Array:
    """The mean over the global batch of values split over `batch_axes`.

    Shardings: local f32[B/n, ...] -> f32[] replicated. Collectives: forward 1
    all-reduce of a scalar over `batch_axes`; backward none.
    """
    count = local.size * axis_size(tuple(batch_axes)) if batch_axes else local.size
    return all_reduce(jnp.sum(local), tuple(batch_axes)) / count
