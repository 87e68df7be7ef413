"""Vocabulary-parallel embedding (Megatron VocabParallelEmbedding) as a drop-in for nnx.Embed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_embed_init
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared
from shardlax.mesh import check_divisible, live_axes
from shardlax.nn._base import AUTO, nbytes, run_shard_map, sharded_param
from shardlax.nn._sequence import SequenceLayer


class ParallelEmbed(SequenceLayer):
    """`nnx.Embed` with its table split over the vocabulary on the model axis.

    The table `embedding: f32[num_embeddings, features]` is stored as
    `P('model', None)`; each device looks up the ids in its row range, zeros
    the rest, and one all-reduce sums the pieces (with
    `sequence_parallel=True`, a reduce-scatter that leaves the output split
    over the sequence). `attend` is the tied output head: logits split over
    the vocabulary, `P(batch, None, 'model')`, ready for
    `vocab_parallel_cross_entropy`.

    Same constructor and same initial table as `nnx.Embed` for the same
    `rngs`. Ids behave as in `nnx.Embed` (`jnp.take`): negative ids count from
    the end, ids outside `[-V, V)` embed to NaN.

    The model axis must divide `num_embeddings` (a clear error otherwise):
    pad the vocabulary to a multiple of it, as Megatron's
    `--make-vocab-size-divisible-by` does, and pass the true size to
    `vocab_parallel_cross_entropy(vocab_size=...)` so padded rows are never
    predicted.

    Collectives (N = model axis size), forward / backward:
      `__call__`: 1 all-reduce `[B, S, D]` / none (SP: 1 reduce-scatter / 1 all-gather).
      `attend`:   none / 1 all-reduce of dx (SP: 1 all-gather / 1 reduce-scatter).
      Table gradient: 1 all-reduce of `[V/N, D]` over the batch axes per use;
      with FSDP (`fsdp_axis`, default on when the mesh has 'fsdp') the table is
      also split over the features on the fsdp axis, all-gathered per use and
      its gradient reduce-scattered.

    References:
      Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053).
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Any = default_embed_init,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
        sequence_parallel: bool = False,
        fsdp_axis: str | None = AUTO,
        reshard_after_forward: bool = True,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        self._setup_fsdp(fsdp_axis, reshard_after_forward)
        check_divisible(
            type(self).__name__, "num_embeddings", num_embeddings, axis_name, self.model_size
        )
        # embedding [V, D]: P(('model', 'fsdp'), None): FSDP splits the vocabulary further
        self.embedding_spec = self._fsdp_spec(
            P(self._spec_axis(axis_name), None), (num_embeddings, features), 0, "num_embeddings"
        )
        self.embedding = sharded_param(
            embedding_init, rngs.params(), (num_embeddings, features), param_dtype,
            self.mesh, self.embedding_spec,
        )  # fmt: skip
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype or param_dtype
        self.param_dtype = param_dtype
        self.promote_dtype = promote_dtype
        self.sequence_parallel = sequence_parallel

    def _entries(self) -> list[tuple]:
        # attend: the table gathered over fsdp (dim 0); its dx reads it
        return [(self, "embedding", 0, False, "input")]

    def _lookup_grad_axes(self) -> tuple[str, ...]:
        """The axes the lookup's table gradient is all-reduced over: the batch axes but fsdp."""
        live = live_axes(self.mesh, self.batch_axes)
        return tuple(a for a in live if not (self._fsdp_live and a == self.fsdp_axis))

    def ids_spec(self, ndim: int = 2) -> P:
        return self._activation_spec(ndim, None) if ndim > 1 else P(None)

    def logits_spec(self, ndim: int = 3) -> P:
        """The layout of `attend`'s output: split over the batch and the vocabulary."""
        return self._activation_spec(ndim, self.axis_name)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            owner = type(self).__name__
            if not hasattr(inputs, "dtype") or not jnp.issubdtype(inputs.dtype, jnp.integer):
                raise TypeError(
                    f"{owner}: inputs must be integer token ids, got "
                    f"{getattr(inputs, 'dtype', type(inputs).__name__)}. Pass ids as int32."
                )
            self._check_hidden(inputs, None, "inputs")
            ids_spec = self.ids_spec(inputs.ndim)
            inputs = self._place(inputs, ids_spec)

            def body(ids, table):
                # never gathered: its gradient is summed over the pure data axes only
                table = kernels.ensure_varying(table, self._lookup_grad_axes())
                (table,) = self.promote_dtype((table,), dtype=self.dtype, inexact=False)
                return kernels.vocab_parallel_embed(
                    ids, table, num_embeddings=self.num_embeddings, axis_name=self.axis_name,
                    sequence_parallel=self.sequence_parallel,
                    fsdp_axis=self.fsdp_axis if self._fsdp_live else None,
                )  # fmt: skip

            return run_shard_map(
                body, self.mesh, (inputs, self.embedding[...]),
                (ids_spec, self.embedding_spec), self.hidden_spec(inputs.ndim + 1),
            )  # fmt: skip

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits `query @ embedding.T`, split over the vocabulary (as `nnx.Embed.attend`)."""
        with jax.named_scope(type(self).__name__ + ".attend"):
            self._check_hidden(query, self.features, "features")
            q_spec = self.hidden_spec(query.ndim)
            query = self._place(query, q_spec)

            def body(x, table):
                def fn(params, x):
                    x, table = self.promote_dtype((x, params[0]), dtype=self.dtype)
                    return kernels.vocab_parallel_logits(
                        x, table, axis_name=self.axis_name,
                        sequence_parallel=self.sequence_parallel,
                    )  # fmt: skip

                return self._apply(fn, self._entries(), (table,), x)

            return run_shard_map(
                body, self.mesh, (query, self.embedding[...]),
                (q_spec, self.embedding_spec), self.logits_spec(query.ndim),
            )  # fmt: skip

    def declared_collectives(
        self, ids_shape: Sequence[int], *, grad: bool = False, attend: bool = False
    ) -> list[Declared]:
        """Collectives of `__call__` (and `attend` on its output, if `attend`) for `ids_shape`."""
        dtype = self.dtype
        full = (*self._local_batch_shape(ids_shape), self.features)
        m, sp = (self.axis_name,), self.sequence_parallel
        kind = "reduce-scatter" if sp else "all-reduce"
        out = first = self._declare(kind, m, dtype, nbytes(full, dtype), "embed: sum of row shards")
        if self._fsdp_live:
            f, lf = self.fsdp_size, (self.fsdp_axis,)
            ids_all = nbytes((full[0] * f, full[1]), jnp.int32)
            rows_all = nbytes((full[0] * f, *full[1:]), dtype)
            out = self._declare(
                "all-gather", lf, jnp.int32, ids_all, "embed: ids of every batch shard"
            )
            out += self._declare(
                "reduce-scatter", lf, dtype, rows_all, "embed: rows to their batch"
            )
            out += first
        if grad:
            if sp:
                out += self._declare("all-gather", m, dtype, nbytes(full, dtype), "embed: dy")
            if self._fsdp_live:
                out += self._declare("all-gather", lf, dtype, rows_all, "embed: dy of every shard")
            shard = (self.num_embeddings // (self.model_size * self.fsdp_size), self.features)
            pd = self.param_dtype
            out += self._declare("all-reduce", self._lookup_grad_axes(), pd,
                                 nbytes(shard, pd), "d table over the data axes")  # fmt: skip
        if attend:
            out += self._declare_entries(grad, True, "attend", self._entries())
            if sp:
                out += self._declare("all-gather", m, dtype, nbytes(full, dtype), "attend: x")
            if grad:
                kind = "reduce-scatter" if sp else "all-reduce"
                out += self._declare(kind, m, dtype, nbytes(full, dtype), "attend: dx")
        return out
