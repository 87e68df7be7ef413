"""Head-parallel causal self-attention (Megatron-LM) with optional grouped-query heads."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from jax import lax
from jax.sharding import Mesh

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared
from shardlax.nn._base import AUTO
from shardlax.nn._column import ColumnParallelLinear
from shardlax.nn._mlp import _activation_collectives
from shardlax.nn._row import RowParallelLinear
from shardlax.nn._sequence import SequenceLayer


class ParallelAttention(SequenceLayer):
    """Causal multi-head (or grouped-query) self-attention, heads split over the model axis.

    `q_proj`, `k_proj`, `v_proj` are `ColumnParallelLinear`s
    (`in_features -> heads * head_dim`), `o_proj` a `RowParallelLinear`; each
    device computes attention for its `num_heads / N` query heads and
    `num_kv_heads / N` key/value heads, with no communication inside
    attention. Rotary position embeddings (RoPE, half-split as in GPT-NeoX /
    Llama) are applied to q and k unless `rope_theta=None`.

    Math (one device's view of the global computation, d = head_dim):
      `q = x Wq, k = x Wk, v = x Wv`, reshaped to heads; `q, k <- rope(q, k)`;
      `o_h = softmax(q_h k_g^T / sqrt(d) + causal) v_g` with
      `g = h // (num_heads / num_kv_heads)`; `y = concat_h(o_h) Wo + bo`.

    Collectives over the model axis (N), forward / backward:
      TP: 1 all-reduce of y / 1 all-reduce of dx (shared by q, k, v).
      SP: 1 all-gather of x and 1 reduce-scatter of y / 1 all-gather of dy and
      1 reduce-scatter of dx.
    Weight gradients: 1 all-reduce per parameter over the batch axes.

    Args:
      in_features: the model width D.
      num_heads: query heads; N must divide it.
      num_kv_heads: key/value heads (grouped-query attention); default
        `num_heads`. N must divide it and it must divide `num_heads`.
      head_dim: default `in_features // num_heads`; even when RoPE is on.
      causal: apply the causal mask (default True).
      rope_theta: RoPE base, or None for no position embedding.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
        dot_general, promote_dtype, rngs: as `nnx.Linear` (use_bias default False).
      mesh, axis_name, batch_axes, sequence_parallel, fsdp_axis,
        reshard_after_forward: as `ParallelMLP`.

    References:
      Shoeybi et al., 2019 (arXiv:1909.08053); Ainslie et al., 2023
      (arXiv:2305.13245); Su et al., 2021 (arXiv:2104.09864); Korthikanti et
      al., 2022 (arXiv:2205.05198).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = True,
        rope_theta: float | None = 10000.0,
        use_bias: bool = False,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_bias_init,
        dot_general: Any = lax.dot_general,
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
        owner, n = type(self).__name__, self.model_size
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for arg, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}({arg}={value!r}): expected a positive int.")
            if value % n:
                raise ValueError(
                    f"{owner}({arg}={value}) cannot be split over mesh axis {axis_name!r} "
                    f"(size {n}): {n} does not divide {value}. Heads are the unit of tensor "
                    f"parallelism: choose {arg} divisible by {n}, or a mesh whose "
                    f"{axis_name!r} axis divides {value}."
                )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{owner}(num_heads={num_heads}, num_kv_heads={num_kv_heads}): grouped-query "
                f"attention needs num_kv_heads to divide num_heads. Choose num_kv_heads among "
                f"the divisors of {num_heads}."
            )
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(
                    f"{owner}(in_features={in_features}, num_heads={num_heads}): head_dim "
                    f"defaults to in_features // num_heads, but {num_heads} does not divide "
                    f"{in_features}. Pass head_dim= explicitly."
                )
            head_dim = in_features // num_heads
        if rope_theta is not None and head_dim % 2:
            raise ValueError(
                f"{owner}(head_dim={head_dim}): rotary embeddings rotate pairs of features, so "
                f"head_dim must be even. Choose an even head_dim, or rope_theta=None."
            )
        common = dict(
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
            kernel_init=kernel_init, bias_init=bias_init, dot_general=dot_general,
            promote_dtype=promote_dtype, rngs=rngs, mesh=self.mesh, axis_name=axis_name,
            batch_axes=self.batch_axes, fsdp_axis=fsdp_axis,
            reshard_after_forward=reshard_after_forward,
        )  # fmt: skip
        self.q_proj = ColumnParallelLinear(in_features, num_heads * head_dim, **common)
        self.k_proj = ColumnParallelLinear(in_features, num_kv_heads * head_dim, **common)
        self.v_proj = ColumnParallelLinear(in_features, num_kv_heads * head_dim, **common)
        self.o_proj = RowParallelLinear(num_heads * head_dim, in_features, **common)
        self.in_features = in_features
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.rope_theta = rope_theta
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.sequence_parallel = sequence_parallel

    def _entries(self) -> list[tuple]:
        """Parameters in `kernels.head_parallel_attention` order (see `SequenceLayer._entries`)."""
        q, k, v, o = self.q_proj, self.k_proj, self.v_proj, self.o_proj
        return [
            (q, "kernel", 0, False, "input"), (k, "kernel", 0, False, "input"),
            (v, "kernel", 0, False, "input"), (o, "kernel", 1, False, "always"),
            (q, "bias", 0, False, "never"), (k, "bias", 0, False, "never"),
            (v, "bias", 0, False, "never"), (o, "bias", 0, True, "never"),
        ]  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            self._check_hidden(x, self.in_features, "in_features")
            if x.ndim != 3:
                raise ValueError(
                    f"{type(self).__name__}: inputs.shape={tuple(x.shape)}; expected "
                    f"[batch, sequence, {self.in_features}]."
                )
            spec = self.hidden_spec(3)
            x = self._place(x, spec)

            attention = functools.partial(
                kernels.head_parallel_attention, head_dim=self.head_dim,
                axis_name=self.axis_name, sequence_parallel=self.sequence_parallel,
                causal=self.causal, rope_theta=self.rope_theta, precision=self.precision,
                dot_general=self.dot_general,
            )  # fmt: skip
            return self._run_fused(x, spec, attention, self.q_proj._compute_dtype())

    def declared_collectives(
        self, input_shape: Sequence[int], *, dtype: Any = None, grad: bool = False,
        input_grad: bool = True,
    ) -> list[Declared]:  # fmt: skip
        """Collectives of one call on a global input `[B, S, in_features]`."""
        dtype = dtype or self.q_proj._compute_dtype() or self.param_dtype
        out = _activation_collectives(
            self, input_shape, self.in_features, self.in_features, dtype, grad, input_grad,
            "attention",
        )  # fmt: skip
        return out + self._declare_entries(grad, input_grad, "attention")
