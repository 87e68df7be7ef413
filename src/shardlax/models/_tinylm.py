"""TinyLM: a small decoder-only language model built only from `shardlax.nn` layers.

embed -> n_layers x [x + attn(norm(x)), x + mlp(norm(x))] (stacked, run with
`lax.scan`) -> norm -> head (tied `embed.attend`, or a column-parallel
linear) -> vocabulary-parallel cross-entropy. Tensor, sequence and fully
sharded data parallelism are chosen by the mesh alone:

| mesh axis | size > 1 means                                                        |
| --------- | --------------------------------------------------------------------- |
| data      | batch split, parameters replicated, gradients all-reduced             |
| fsdp      | batch split, parameters split too (gathered on use, ZeRO-3)           |
| model     | Megatron tensor parallelism (heads, MLP width, vocabulary split);     |
|           | with `sequence_parallel=True` also the sequence between blocks        |

The parameters are created the same way on every mesh (same initialisers,
same keys in the same order), so `TinyLM(cfg, mesh=a, rngs=nnx.Rngs(0))` and
`TinyLM(cfg, mesh=b, rngs=nnx.Rngs(0))` start from identical values; only
their placement differs. `copy_params(src, dst)` moves the values of one
model onto another's shardings.

References:
  Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053).
  Korthikanti et al., 2022 (arXiv:2205.05198): sequence parallelism.
  Rajbhandari et al., "ZeRO", 2020 (arXiv:1910.02054).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared, Role
from shardlax.mesh import live_axes, resolve_mesh
from shardlax.models._tinylm_blocks import Block, _stack
from shardlax.models._tinylm_config import TinyLMConfig as TinyLMConfig
from shardlax.nn import ColumnParallelLinear, ParallelEmbed, RMSNorm
from shardlax.nn._base import nbytes, run_shard_map


class TinyLM(nnx.Module):
    """A decoder-only LM whose every collective is declared; see the module docstring.

    Example:
      >>> mesh = shardlax.make_mesh(data=2, fsdp=2, model=2)
      >>> cfg = TinyLMConfig(vocab=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=16)
      >>> lm = TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(0))
      >>> tokens = jnp.zeros((8, 16), jnp.int32)
      >>> loss = nnx.jit(lambda m, x, y: m.loss(x, y))(lm, tokens, tokens)
      >>> loss.shape, loss.dtype
      ((), dtype('float32'))
    """

    def __init__(self, config: TinyLMConfig, *, mesh: Mesh | None = None, rngs: nnx.Rngs):
        mesh = resolve_mesh(mesh, "TinyLM")
        cfg = config
        n = mesh.shape.get(MODEL, 1)
        if cfg.padded_vocab % n:
            raise ValueError(
                f"TinyLM(vocab={cfg.vocab}, vocab_multiple={cfg.vocab_multiple}): the padded "
                f"vocabulary {cfg.padded_vocab} cannot be split over mesh axis 'model' (size "
                f"{n}): {n} does not divide {cfg.padded_vocab}. Set vocab_multiple to a "
                f"multiple of {n}."
            )
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"TinyLMConfig(dropout={cfg.dropout}): expected a rate in [0, 1).")
        self.config = cfg
        self.mesh = mesh
        sp = cfg.sequence_parallel
        # the table is padded to vocab_multiple; ids are read against the real vocabulary
        # (an id >= vocab embeds to NaN, -1 is row vocab - 1), never a padded row
        self.embed = ParallelEmbed(
            cfg.padded_vocab, cfg.d_model, vocab_size=cfg.vocab, mesh=mesh, rngs=rngs,
            sequence_parallel=sp,
        )  # fmt: skip
        self.blocks = _stack([Block(cfg, mesh=mesh, rngs=rngs) for _ in range(cfg.n_layers)], mesh)
        self.final_norm = RMSNorm(cfg.d_model, mesh=mesh, rngs=rngs, sequence_parallel=sp)
        self.head = (
            nnx.data(None)
            if cfg.tie_embeddings
            else ColumnParallelLinear(
                cfg.d_model, cfg.padded_vocab, use_bias=False, mesh=mesh, rngs=rngs
            )
        )

    # ------------------------------------------------------------------ forward

    def _check_tokens(self, tokens: jax.Array, targets: jax.Array | None) -> None:
        cfg = self.config
        for name, t in (("tokens", tokens), ("targets", targets)):
            if t is None:
                continue
            if not hasattr(t, "dtype") or not jnp.issubdtype(t.dtype, jnp.integer):
                raise TypeError(
                    f"TinyLM.loss: {name} must be integer token ids, got "
                    f"{getattr(t, 'dtype', type(t).__name__)}. Pass {name}.astype(jnp.int32)."
                )
            if t.ndim != 2:
                raise ValueError(
                    f"TinyLM.loss: {name}.shape={tuple(t.shape)}; expected [batch, sequence]."
                )
        if targets is not None and tuple(targets.shape) != tuple(tokens.shape):
            raise ValueError(
                f"TinyLM.loss: targets.shape={tuple(targets.shape)} must equal "
                f"tokens.shape={tuple(tokens.shape)} (one next token per position)."
            )
        if tokens.shape[1] > cfg.seq_len:
            raise ValueError(
                f"TinyLM: tokens.shape[1]={tokens.shape[1]} is longer than "
                f"TinyLMConfig(seq_len={cfg.seq_len}). Use sequences of at most {cfg.seq_len} "
                f"tokens, or a config with a larger seq_len."
            )

    def hidden(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """The final normed hidden states `[B, S, d_model]` (split over S under SP)."""
        cfg = self.config
        x = self.embed(tokens)  # x: [B, S, D] (SP: [B, S/model, D] per device)
        graphdef, state = nnx.split(self.blocks)
        use_dropout = cfg.dropout > 0.0 and dropout_key is not None
        keys = jax.random.split(dropout_key, cfg.n_layers) if use_dropout else None

        def layer(x, xs):
            layer_state, key = xs
            return nnx.merge(graphdef, layer_state)(x, key), None

        if cfg.remat:
            layer = jax.checkpoint(layer)
        x, _ = jax.lax.scan(layer, x, (state, keys))
        return self.final_norm(x)

    def loss(
        self, tokens: jax.Array, targets: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Mean next-token cross-entropy over the global batch (a replicated f32 scalar).

        Args:
          tokens: int `[B, S]`, split over the batch axes (placed if not).
          targets: int `[B, S]`, the next token of each position. A target
            outside `[0, vocab)` makes the loss NaN (never silently averaged).
          dropout_key: a PRNG key; residual dropout is applied when given and
            `config.dropout > 0` (the same mask on every mesh).

        The logits are never gathered: the head and the loss run in one
        shard_map, each device holding `[B/batch, S, V/model]` logits.
        """
        with jax.named_scope("TinyLM.loss"):
            self._check_tokens(tokens, targets)
            x = self.hidden(tokens, dropout_key=dropout_key)
            return self._head_loss(x, targets)

    def _head_loss(self, x: jax.Array, targets: jax.Array) -> jax.Array:
        cfg, embed = self.config, self.embed
        sp = cfg.sequence_parallel
        x_spec = embed.hidden_spec(3)
        y_spec = embed.ids_spec(2)
        targets = embed._place(targets, y_spec)
        batch = live_axes(self.mesh, embed.batch_axes)
        axis = embed.axis_name
        entries = self._head_entries()
        owner, attr = entries[0][:2]
        weight, w_spec = getattr(owner, attr)[...], getattr(owner, f"{attr}_spec")

        def head(params, x):
            if cfg.tie_embeddings:
                return kernels.vocab_parallel_logits(
                    x, params[0], axis_name=axis, sequence_parallel=sp
                )
            x = kernels.enter_tensor_parallel(x, axis, sequence_parallel=sp)
            return kernels.matmul_last(x, params[0])

        def body(x, w, y):
            # logits: f32[B/batch, S, V/model], never gathered
            logits = embed._apply(head, entries, (w,), x)
            loss = kernels.vocab_parallel_cross_entropy(
                logits, y, vocab_size=cfg.vocab, axis_name=axis
            )  # loss: f32[B/batch, S]
            return kernels.global_mean(loss, batch)

        return run_shard_map(body, self.mesh, (x, weight, targets), (x_spec, w_spec, y_spec), P())

    def _head_entries(self) -> list[tuple]:
        """The head's weight as a `SequenceLayer` entry (its backward reads it for dx)."""
        if self.config.tie_embeddings:
            return [(self.embed, "embedding", 0, False, "input")]
        return [(self.head, "kernel", 0, False, "input")]

    # -------------------------------------------------------------- collectives

    def declared_collectives(
        self, batch_shape: Sequence[int], *, grad: bool = True
    ) -> list[Declared]:
        """The collectives of `loss` (and, with `grad`, of its gradient) for `[B, S]` tokens.

        Those of the blocks are listed once: the blocks run in a `lax.scan`,
        whose body appears once in the compiled program (`in_loop`).
        """
        b, s = batch_shape
        cfg, embed = self.config, self.embed
        hidden = (b, s, cfg.d_model)
        graphdef, state = nnx.split(self.blocks)
        with jax.set_mesh(self.mesh):  # one layer's parameters (their shapes and layouts)
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
        out = embed.declared_collectives((b, s), grad=grad)
        out += layer.declared_collectives(hidden, grad=grad, remat=cfg.remat)
        out += self.final_norm.declared_collectives(hidden, grad=grad)
        # head + loss
        m, sp = (embed.axis_name,), cfg.sequence_parallel
        local = embed._local_batch_shape(hidden)
        f32 = jnp.float32
        out += embed._declare_entries(grad, True, "head", self._head_entries())
        if sp:
            out += embed._declare("all-gather", m, f32, nbytes(local, f32), "head: gather sequence")
        if grad:
            kind = "reduce-scatter" if sp else "all-reduce"
            out += embed._declare(kind, m, f32, nbytes(local, f32), "head: dx")
        tokens = nbytes(local[:2], f32)
        for why in ("max", "sum of exponentials", "target logit"):
            out += embed._declare("all-reduce", m, f32, tokens, f"loss: {why}", role=Role.LOSS)
        out += embed._declare("all-reduce", embed.batch_axes, f32, 4, "loss: global mean",
                              role=Role.LOSS)  # fmt: skip
        return out


def copy_params(src: nnx.Module, dst: nnx.Module) -> None:
    """Give `dst` the parameter values of `src`, laid out as `dst`'s (any two meshes).

    The two models must have the same structure and global shapes (e.g. two
    TinyLMs of one config on different meshes).
    """
    values = nnx.to_pure_dict(nnx.state(src, nnx.Param))
    dst_state = nnx.state(dst, nnx.Param)
    layout = nnx.to_pure_dict(dst_state)
    moved = jax.tree.map(lambda v, d: jax.device_put(v, d.sharding), values, layout)
    nnx.replace_by_pure_dict(dst_state, moved)
    nnx.update(dst, dst_state)
