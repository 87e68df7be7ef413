"""Vocabulary-parallel embedding and its tied output head (Megatron VocabParallelEmbedding).

The table `E: [V, D]` is split by rows over the model axis: device i holds
rows `[i V/N, (i+1) V/N)`. A lookup is then a sum over devices of "my row if
the id is mine, else zeros", and the tied head `x @ E^T` produces logits
already split over the vocabulary, which `vocab_parallel_cross_entropy`
consumes without gathering them.

References:
  Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053), section 3
  (input embedding and output layer parallelised along the vocabulary).
  Korthikanti et al., 2022 (arXiv:2205.05198): with sequence parallelism the
  embedding's all-reduce becomes a reduce-scatter over the sequence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._collectives import all_gather, all_reduce, axis_index, reduce_scatter
from ._sequence import cast_varying, gather_sequence, scatter_sequence


def vocab_parallel_embed(
    ids: jax.Array,
    table_shard: jax.Array,
    *,
    num_embeddings: int,
    axis_name: str = "model",
    sequence_parallel: bool = False,
    seq_axis: int = 1,
    fsdp_axis: str | None = None,
) -> jax.Array:
    """`E[ids]` from a table split over the vocabulary.

    Math: `E[t] = sum_i [t in rows_i] E_i[t - start_i]`, one term non-zero.
    Ids follow `jnp.take` (as `nnx.Embed`), with `V = num_embeddings` (the
    real vocabulary, which may be smaller than the padded global table): a
    negative id counts from the end (`-1` is row V-1); an id outside
    `[-V, V)` embeds to NaN on every device and gets no gradient, so padded
    rows `[V, V_padded)` are never read. Ids may have any shape `[...]`.

    Shardings (N = size of `axis_name`):
      ids:         int[B, S]   replicated over `axis_name` (any shape `[...]`)
      table_shard: [V/N, D]    `P(axis_name, None)` of the global [V, D]
      returns:     [B, S, D]   (`[..., D]`) replicated over `axis_name`; with
                   `sequence_parallel`, [B, S/N, D] split over the sequence

    Collectives over `axis_name`: forward 1 all-reduce of `[B, S, D]` (SP: 1
    reduce-scatter over the sequence); backward none (SP: 1 all-gather of the
    output gradient). The table gradient stays local: rows outside a
    device's range get zero.

    FSDP (`fsdp_axis`, which also splits the batch): the table is split over
    the vocabulary on `(axis_name, fsdp_axis)`, `[V/(N F), D]`, and is never
    gathered. Instead the *ids* of the F batch shards are all-gathered (a few
    ints per token), each device looks up the rows it owns for all of them,
    and one reduce-scatter over `fsdp_axis` sums the owners and hands each
    device its own batch shard back: forward 1 all-gather of int `[F B, S]`
    and 1 reduce-scatter of `[F B, S, D]`; backward 1 all-gather of
    `[F B, S, D]`. The table gradient again stays on its owner.
    """
    fsdp = fsdp_axis is not None and lax.axis_size(fsdp_axis) > 1
    row, invalid = normalize_ids(ids, num_embeddings)  # row: int32[B, S], invalid: bool[B, S]
    ids = jnp.where(invalid, -1, row)  # -1: an invalid id, owned by no device
    if fsdp:
        ids = all_gather(ids, fsdp_axis, axis=0)  # ids: int32[F B, S], every batch shard's
    invalid = ids < 0
    rows_local = table_shard.shape[0]
    owners = tuple(a for a in (axis_name, fsdp_axis if fsdp else None) if a is not None)
    owners = tuple(a for a in owners if lax.axis_size(a) > 1)
    start = axis_index(owners) * rows_local if owners else 0
    local = ids - start
    mine = (local >= 0) & (local < rows_local)
    rows = jnp.take(table_shard, jnp.where(mine, local, 0), axis=0)  # rows: [B, S, D]
    rows = jnp.where(mine[..., None], rows, jnp.zeros((), rows.dtype))
    rows = jnp.where(invalid[..., None], jnp.full((), jnp.nan, rows.dtype), rows)
    if fsdp:
        rows = reduce_scatter(rows, fsdp_axis, axis=0)  # rows: [B, S, D], my batch shard
    if sequence_parallel:
        return scatter_sequence(rows, axis_name, seq_axis=seq_axis)  # [B, S/N, D]
    return all_reduce(rows, axis_name)  # [B, S, D]


def normalize_ids(ids: jax.Array, num_embeddings: int) -> tuple[jax.Array, jax.Array]:
    """Token ids as `jnp.take` reads them: `(row, invalid)`, both shaped as `ids`.

    A negative id counts from the end (`-1` is row `num_embeddings - 1`);
    an id outside `[-num_embeddings, num_embeddings)` is invalid (`row` is
    then 0, to be masked by the caller). Any integer dtype: narrow ids are
    widened to int32 first (so `-1` as int8 with 300 rows is row 299, not an
    overflow), and uint32 ids are compared before the cast (so 2**32 - 1 is
    invalid, not -1). With one row every id reads it, as `nnx.Embed(1, ...)`
    broadcasts its only row.
    """
    if num_embeddings == 1:
        return jnp.zeros(ids.shape, jnp.int32), jnp.zeros(ids.shape, jnp.bool_)
    if jnp.dtype(ids.dtype) == jnp.uint32:
        invalid = ids >= jnp.uint32(num_embeddings)
        return jnp.where(invalid, jnp.uint32(0), ids).astype(jnp.int32), invalid
    wide = ids.astype(jnp.int32)
    invalid = (wide < -num_embeddings) | (wide >= num_embeddings)
    row = jnp.where(wide < 0, wide + num_embeddings, wide)
    return jnp.where(invalid, 0, row), invalid


def vocab_parallel_logits(
    x: jax.Array,
    table_shard: jax.Array,
    *,
    axis_name: str = "model",
    sequence_parallel: bool = False,
    seq_axis: int = 1,
    precision: Any = None,
) -> jax.Array:
    """The tied output head `x @ E^T`, its logits split over the vocabulary.

    Shardings (N = size of `axis_name`):
      x:           [B, S, D]    replicated over `axis_name` (SP: [B, S/N, D])
      table_shard: [V/N, D]     `P(axis_name, None)`
      returns:     [B, S, V/N]  `P(batch, None, axis_name)`

    Collectives over `axis_name`: forward none (SP: 1 all-gather of x);
    backward 1 all-reduce of dx (SP: 1 reduce-scatter).
    """
    if sequence_parallel:
        x = gather_sequence(x, axis_name, seq_axis=seq_axis)  # x: [B, S, D]
    else:
        x = cast_varying(x, axis_name)
    # logits_shard: [B, S, V/N]
    return lax.dot_general(x, table_shard, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)
