"""`TinyLMConfig`: the shape of a TinyLM (no mesh in it), validated on construction."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
    """The shape of a TinyLM. Nothing here depends on the mesh.

    Attributes:
      vocab: vocabulary size (token ids in `[0, vocab)`).
      d_model: model width.
      n_layers: transformer blocks (stacked and run with `lax.scan`).
      n_heads: query heads; the model axis must divide it.
      n_kv_heads: key/value heads (grouped-query attention); default n_heads.
      d_ff: MLP hidden width; the model axis must divide it.
      seq_len: the longest sequence the model is used with.
      sequence_parallel: split activations between blocks over the sequence on
        the model axis (Megatron-SP).
      dropout: residual dropout rate (sharding-invariant: the same mask on
        every mesh).
      activation: MLP activation, ``'swiglu'`` (default) or ``'gelu'``.
      tie_embeddings: the head is `embed.attend` (True) or its own
        column-parallel linear (False).
      remat: recompute each block in the backward (`jax.checkpoint`).
      vocab_multiple: the embedding and head are padded to a multiple of this
        (Megatron's make-vocab-size-divisible-by), so the model axis can
        split them; padded columns are masked out of the loss.
      rope_theta: rotary embedding base.
      use_bias: biases in attention and MLP linears.
    """

    vocab: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 64
    seq_len: int = 16
    sequence_parallel: bool = False
    dropout: float = 0.0
    activation: str = "swiglu"
    tie_embeddings: bool = True
    remat: bool = False
    vocab_multiple: int = 8
    rope_theta: float = 10000.0
    use_bias: bool = False

    def __post_init__(self):
        positive = ("vocab", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab_multiple")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"TinyLMConfig({name}={value!r}): expected a positive int. Pass e.g. "
                    f"{name}={getattr(TinyLMConfig, name)}."
                )
        kv = self.n_kv_heads
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
            raise ValueError(
                f"TinyLMConfig(n_kv_heads={kv!r}): expected a positive int or None (None: as "
                f"many as n_heads={self.n_heads})."
            )
        if kv is not None and self.n_heads % kv:
            raise ValueError(
                f"TinyLMConfig(n_heads={self.n_heads}, n_kv_heads={kv}): grouped-query "
                f"attention needs n_kv_heads to divide n_heads. Choose n_kv_heads among the "
                f"divisors of {self.n_heads}."
            )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            good = -(-self.d_model // (2 * self.n_heads)) * 2 * self.n_heads
            raise ValueError(
                f"TinyLMConfig(d_model={self.d_model}, n_heads={self.n_heads}): each head gets "
                f"d_model // n_heads features, which must be a whole, even number (rotary "
                f"embeddings rotate pairs). Choose e.g. d_model={good}."
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"TinyLMConfig(dropout={self.dropout!r}): expected a rate in [0, 1).")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(
                f"TinyLMConfig(activation={self.activation!r}): expected one of ('swiglu', 'gelu')."
            )
        theta = self.rope_theta
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise ValueError(
                f"TinyLMConfig(rope_theta={theta!r}): expected a positive, finite rotary base, "
                f"e.g. 10000.0."
            )

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab // m) * m


__all__ = ["TinyLMConfig"]
