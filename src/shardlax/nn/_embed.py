"""Vocabulary-parallel embedding (Megatron VocabParallelEmbedding) as a drop-in for nnx.Embed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
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
from shardlax.declarations import Declared, Role
from shardlax.mesh import is_manual, live_axes
from shardlax.nn._base import AUTO, nbytes, run_shard_map
from shardlax.nn._projection import metadata_param
from shardlax.nn._sequence import SequenceLayer


class IdsDtypeError(TypeError, ValueError):
    """Non-integer ids: a TypeError, and a ValueError as `nnx.Embed` raises for them."""


class ParallelEmbed(SequenceLayer):
    """`nnx.Embed` with its table split over the vocabulary on the model axis.

    The table `embedding: f32[num_embeddings, features]` is stored as
    `P('model', None)`; each device looks up the ids in its row range, zeros
    the rest, and one all-reduce sums the pieces (with
    `sequence_parallel=True`, a reduce-scatter that leaves the output split
    over the sequence). `attend` is the tied output head: logits split over
    the vocabulary, `P(batch, None, 'model')`, ready for
    `vocab_parallel_cross_entropy`.

    Same constructor (`embedding_metadata` and `nnx.with_partitioning`
    initializers included) and same initial table as `nnx.Embed` for the
    same `rngs`. Ids of any shape (a scalar, `[B]`, `[B, S]`, `[B, S, K]`;
    dim 0 is the batch) behave bit for bit as in `nnx.Embed` (`jnp.take`):
    negative ids count from the end, ids outside `[-V, V)` embed to NaN and
    get no gradient, and with `num_embeddings=1` every id reads the one row.
    `__call__` and `attend` take flax's `out_sharding=` (the result is laid
    out so).

    The model axis must divide `num_embeddings` (a clear error otherwise):
    pad the vocabulary to a multiple of it, as Megatron's
    `--make-vocab-size-divisible-by` does, and pass the true size as
    `vocab_size=`: ids are then read against `vocab_size` (an id in
    `[vocab_size, num_embeddings)` is out of vocabulary, NaN as in
    `nnx.Embed(vocab_size, ...)`, and `-1` is row `vocab_size - 1`), so the
    padded rows are never read; pass the same size to
    `vocab_parallel_cross_entropy(vocab_size=...)` so they are never
    predicted.

    Collectives (N = model axis size), forward / backward:
      `__call__`: 1 all-reduce `[B, S, D]` / none (SP: 1 reduce-scatter / 1 all-gather).
      `attend`:   none / 1 all-reduce of dx (SP: 1 all-gather / 1 reduce-scatter).
      Table gradient: 1 all-reduce of `[V/N, D]` over the batch axes per use.

    FSDP (`fsdp_axis`, default on when the mesh has 'fsdp'): the table is
    split further over the vocabulary on the fsdp axis, `[V/(N F), D]` per
    device, and a lookup moves whichever is smaller (`fsdp_lookup="auto"`):
    the table's rows or the tokens' rows. `"table"` all-gathers the table
    over fsdp (`[V/N, D]`, FSDP's usual gather; backward 1 reduce-scatter of
    its gradient, no re-gather: a lookup's backward does not read the table);
    `"ids"` never gathers the table: it all-gathers the F batch shards' ids
    (ints), looks up the rows it owns for all of them and reduce-scatters
    `[F B, S, D]` back to their batch shards (backward 1 all-gather of
    `[F B, S, D]`). Auto picks `"table"` when a device's table rows `V/(N F)`
    are at most its tokens `B S` (the bytes and the temporary memory both
    scale with those counts), so a large cluster never moves the global
    batch's activations. `attend` always gathers the table.

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
        embedding_metadata: Mapping[str, Any] = MappingProxyType({}),
        vocab_size: int | None = None,
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
        sequence_parallel: bool = False,
        fsdp_axis: str | None = AUTO,
        reshard_after_forward: bool = True,
        fsdp_lookup: str = "auto",
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        self._setup_fsdp(fsdp_axis, reshard_after_forward)
        owner = type(self).__name__
        if fsdp_lookup not in ("auto", "table", "ids"):
            raise ValueError(
                f"{owner}(fsdp_lookup={fsdp_lookup!r}): expected 'auto', 'table' (all-gather "
                f"the table over fsdp) or 'ids' (all-gather the ids, reduce-scatter the rows)."
            )
        self.fsdp_lookup = fsdp_lookup
        n = self.model_size
        if num_embeddings % n:
            padded = -(-num_embeddings // n) * n
            raise ValueError(
                f"{owner}(num_embeddings={num_embeddings}) cannot be sharded over mesh axis "
                f"{axis_name!r} (size {n}): {n} does not divide {num_embeddings}. Pad the "
                f"table to a multiple of {n} and pass the real size, e.g. "
                f"{owner}({padded}, ..., vocab_size={num_embeddings}) (ids are then read "
                f"against vocab_size, as nnx.Embed({num_embeddings}) reads them), or use a "
                f"mesh whose {axis_name!r} size divides {num_embeddings}."
            )
        if vocab_size is None:
            vocab_size = num_embeddings
        if (
            not isinstance(vocab_size, int)
            or isinstance(vocab_size, bool)
            or not 1 <= vocab_size <= num_embeddings
        ):
            raise ValueError(
                f"{owner}(num_embeddings={num_embeddings}, vocab_size={vocab_size!r}): "
                f"vocab_size is the real vocabulary of a padded table, an int in "
                f"[1, num_embeddings]. Pass vocab_size=None when the table is not padded."
            )
        # embedding [V, D]: P(('model', 'fsdp'), None): FSDP splits the vocabulary further
        self.embedding_spec = self._fsdp_spec(
            P(self._spec_axis(axis_name), None), (num_embeddings, features), 0, "num_embeddings"
        )
        self.embedding = metadata_param(
            embedding_init, rngs.params(), (num_embeddings, features), param_dtype,
            self.mesh, self.embedding_spec, embedding_metadata,
        )  # fmt: skip
        self.num_embeddings = num_embeddings
        self.vocab_size = vocab_size
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
        """The layout of ids of rank `ndim`: dim 0 split over the batch axes (a scalar: `P()`)."""
        if ndim <= 1:
            return P(*[self._batch_entry()] * ndim)
        return self._activation_spec(ndim, None)

    def _check_ids(self, inputs: Any) -> None:
        owner = type(self).__name__
        if not hasattr(inputs, "dtype") or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise IdsDtypeError(
                f"{owner}: inputs must be integer token ids, got "
                f"{getattr(inputs, 'dtype', type(inputs).__name__)}. Pass ids as int32."
            )
        inputs = self._global_view(inputs)
        shape = tuple(inputs.shape)
        n = self.batch_size_divisor
        if not shape and n > 1:
            raise ValueError(
                f"{owner}: inputs.shape=() is one id, with no batch dim to split over mesh "
                f"axes {self.batch_axes} (size {n}). Pass a batch of ids (e.g. inputs[None]), "
                f"or use a mesh whose batch axes have size 1."
            )
        if shape and shape[0] % n:
            raise ValueError(
                f"{owner}: inputs.shape[0]={shape[0]} (the batch) cannot be sharded over mesh "
                f"axes {self.batch_axes} (size {n}): {n} does not divide {shape[0]}. Use a "
                f"batch size divisible by {n}."
            )
        if self.sequence_parallel:
            if len(shape) < 2:
                raise ValueError(
                    f"{owner}(sequence_parallel=True): inputs.shape={shape} has no sequence "
                    f"dim (expected [batch, sequence, ...]). Pass ids of rank >= 2, or "
                    f"sequence_parallel=False."
                )
            self._check_hidden(inputs, None, "inputs")

    def logits_spec(self, ndim: int = 3) -> P:
        """The layout of `attend`'s output: split over the batch and the vocabulary."""
        return self._activation_spec(ndim, self.axis_name)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """`embedding[inputs]` (`[..., features]`); `out_sharding` (as nnx.Embed's) lays it out."""
        with jax.named_scope(type(self).__name__):
            self._check_ids(inputs)
            y = self._lookup(inputs)
            return y if out_sharding is None else self._place(y, _spec(out_sharding))

    def _gathers_table(self, tokens: int) -> bool:
        """Whether a lookup of `tokens` ids per device all-gathers the table over fsdp."""
        if not self._fsdp_live or self.fsdp_lookup == "ids":
            return False
        rows = self.num_embeddings // (self.model_size * self.fsdp_size)
        return self.fsdp_lookup == "table" or rows <= tokens

    def _lookup(self, inputs: jax.Array) -> jax.Array:
        ids_spec = self.ids_spec(inputs.ndim)
        tokens = math.prod(inputs.shape)  # per device (manual mode: a local shard already)
        if not is_manual(self.mesh) and inputs.ndim:
            tokens //= self.batch_size_divisor
        gathers_table = self._gathers_table(tokens)
        inputs = self._place(inputs, ids_spec)

        def body(ids, table):
            if gathers_table:  # FSDP's gather of [V/N, D]; backward: its reduce-scatter
                table = self._use_param(self, table, 0)
            else:  # never gathered: its gradient is summed over the pure data axes only
                table = kernels.ensure_varying(table, self._lookup_grad_axes())
            (table,) = self.promote_dtype((table,), dtype=self.dtype, inexact=False)
            return kernels.vocab_parallel_embed(
                ids, table, num_embeddings=self.vocab_size, axis_name=self.axis_name,
                sequence_parallel=self.sequence_parallel,
                fsdp_axis=self.fsdp_axis if self._fsdp_live and not gathers_table else None,
            )  # fmt: skip

        return run_shard_map(
            body, self.mesh, (inputs, self.embedding[...]),
            (ids_spec, self.embedding_spec), self.hidden_spec(inputs.ndim + 1),
        )  # fmt: skip

    def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Logits `query @ embedding.T`, split over the vocabulary (as `nnx.Embed.attend`).

        `query: [..., features]` of any rank >= 1 (rank >= 3 under sequence
        parallelism); `out_sharding` (as nnx.Embed's) lays the logits out.
        """
        with jax.named_scope(type(self).__name__ + ".attend"):
            self._check_query(query)
            y = self._attend(query)
            return y if out_sharding is None else self._place(y, _spec(out_sharding))

    def _check_query(self, query: Any) -> None:
        owner = type(self).__name__
        self._check_inputs(query, self.features, "features")
        query = self._global_view(query)
        n = self.batch_size_divisor
        if query.ndim == 1 and n > 1:
            raise ValueError(
                f"{owner}.attend: query.shape={tuple(query.shape)} is one vector, with no "
                f"batch dim to split over mesh axes {self.batch_axes} (size {n}). Pass a "
                f"batch of queries (e.g. query[None]), or use a mesh whose batch axes have "
                f"size 1."
            )
        if self.sequence_parallel:
            if query.ndim < 3:
                raise ValueError(
                    f"{owner}(sequence_parallel=True).attend: query.shape="
                    f"{tuple(query.shape)}; expected [batch, sequence, ..., {self.features}]. "
                    f"Pass a query of rank >= 3, or sequence_parallel=False."
                )
            self._check_hidden(query, self.features, "features")

    def _attend(self, query: jax.Array) -> jax.Array:
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
        ids_shape = tuple(ids_shape)
        if ids_shape:  # dim 0 is the batch, for ids of any rank >= 1
            ids_shape = (ids_shape[0] // self.batch_size_divisor, *ids_shape[1:])
        full = (*ids_shape, self.features)
        m, sp = (self.axis_name,), self.sequence_parallel
        kind = "reduce-scatter" if sp else "all-reduce"
        out = first = self._declare(kind, m, dtype, nbytes(full, dtype), "embed: sum of row shards")
        gathers_table = self._gathers_table(math.prod(ids_shape))
        if gathers_table:
            table = (self.num_embeddings // self.model_size, self.features)
            out += self._declare_param(self, table, 0, grad=grad, regather=False, why="embedding")
            if grad and sp:
                out += self._declare("all-gather", m, dtype, nbytes(full, dtype), "embed: dy")
        elif self._fsdp_live:
            f, lf = self.fsdp_size, (self.fsdp_axis,)
            ids_all = nbytes((full[0] * f, *full[1:-1]), jnp.int32)
            rows_all = nbytes((full[0] * f, *full[1:]), dtype)
            out = self._declare(
                "all-gather", lf, jnp.int32, ids_all, "embed: ids of every batch shard"
            )
            out += self._declare(
                "reduce-scatter", lf, dtype, rows_all, "embed: rows to their batch"
            )
            out += first
        if grad and not gathers_table:
            if sp:
                out += self._declare("all-gather", m, dtype, nbytes(full, dtype), "embed: dy")
            if self._fsdp_live:
                out += self._declare("all-gather", lf, dtype, rows_all, "embed: dy of every shard")
            shard = (self.num_embeddings // (self.model_size * self.fsdp_size), self.features)
            pd = self.param_dtype
            out += self._declare("all-reduce", self._lookup_grad_axes(), pd,
                                 nbytes(shard, pd), "d table over the data axes",
                                 role=Role.GRAD_REDUCE, param="embedding")  # fmt: skip
        if attend:
            out += self._declare_entries(grad, True, "attend", self._entries())
            if sp:
                out += self._declare("all-gather", m, dtype, nbytes(full, dtype), "attend: x")
            if grad:
                kind = "reduce-scatter" if sp else "all-reduce"
                out += self._declare(kind, m, dtype, nbytes(full, dtype), "attend: dx")
        return out


def _spec(out_sharding: Any) -> P:
    """A `PartitionSpec` from flax's `out_sharding` (a spec or a `NamedSharding`)."""
    return getattr(out_sharding, "spec", out_sharding)
