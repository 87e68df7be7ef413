"""The Megatron MLP: column-parallel up projection, activation, row-parallel down projection.

References:
  Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053), section 3, fig. 3a.
  Shazeer, "GLU Variants Improve Transformer", 2020 (arXiv:2002.05202): SwiGLU.
  Korthikanti et al., 2022 (arXiv:2205.05198): sequence parallelism.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from ._linear import DotGeneral, _add_bias, matmul_last
from ._sequence import enter_tensor_parallel, exit_tensor_parallel

ACTIVATIONS = ("gelu", "swiglu", "relu", "silu")


def _act(name: str, h: jax.Array) -> jax.Array:
    if name == "gelu":
        return jax.nn.gelu(h)  # tanh approximation, as flax's nnx.gelu
    if name == "relu":
        return jax.nn.relu(h)
    if name == "silu":
        return jax.nn.silu(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def parallel_mlp(
    x: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    up_bias: jax.Array | None = None,
    down_bias: jax.Array | None = None,
    gate_kernel: jax.Array | None = None,
    gate_bias: jax.Array | None = None,
    *,
    activation: str = "gelu",
    axis_name: str = "model",
    sequence_parallel: bool = False,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
) -> jax.Array:
    """`y = act(x W_up + b_up) W_down + b_down`, or SwiGLU `(silu(x W_gate) * x W_up) W_down`.

    Shardings (N = size of `axis_name`):
      x:           [B, S, D]   replicated over `axis_name` (SP: [B, S/N, D])
      up/gate:     [D, F/N]    `P(None, axis_name)`; biases [F/N]
      down_kernel: [F/N, D]    `P(axis_name, None)`; down_bias [D] replicated
      returns:     like x

    Collectives over `axis_name`: forward 1 all-reduce of y (SP: 1 all-gather
    of x, 1 reduce-scatter of y); backward 1 all-reduce of dx (SP: 1
    all-gather of dy, 1 reduce-scatter of dx). The activation is elementwise
    on the feature shard, so it needs none.
    """
    x = enter_tensor_parallel(x, axis_name, sequence_parallel=sequence_parallel)  # [B, S, D]
    up = _add_bias(
        matmul_last(x, up_kernel, precision=precision, dot_general=dot_general), up_bias
    )  # up: [B, S, F/N]
    if activation == "swiglu":
        gate = _add_bias(
            matmul_last(x, gate_kernel, precision=precision, dot_general=dot_general), gate_bias
        )  # gate: [B, S, F/N]
        h = jax.nn.silu(gate) * up
    else:
        h = _act(activation, up)
    partial = matmul_last(h, down_kernel, precision=precision, dot_general=dot_general)
    y = exit_tensor_parallel(partial, axis_name, sequence_parallel=sequence_parallel)
    return _add_bias(y, down_bias)
