"""Megatron sequence parallelism (SP): activations split over the sequence on the model axis.

Between tensor-parallel blocks Megatron-TP keeps the activation `[B, S, D]`
replicated over the model axis, so norms, dropout and residual adds run N
times on the same tokens. Sequence parallelism keeps it split over the
sequence instead, `[B, S/N, D]`, and swaps the collectives at the block
boundaries:

| TP (no SP)                              | TP + SP                                     |
| --------------------------------------- | ------------------------------------------- |
| column entry: identity (bwd all-reduce) | all-gather of the sequence (bwd reduce-scatter) |
| row exit: all-reduce (bwd identity)     | reduce-scatter of the sequence (bwd all-gather) |

An all-reduce is a reduce-scatter followed by an all-gather, so both move the
same bytes; SP stores 1/N of the activation between blocks.

References:
  Korthikanti et al., "Reducing Activation Recomputation in Large
  Transformer Models", 2022 (arXiv:2205.05198), section 4.2.2.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from ._collectives import all_gather, all_reduce, axis_index, ensure_varying, reduce_scatter
from ._linear import DotGeneral, _add_bias, column_parallel_matmul, matmul_last


def cast_varying(x: jax.Array, axis_name: str) -> jax.Array:
    """`ensure_varying(x, axis_name)` unless the axis has size 1 (then no cast, no size-1 psum)."""
    if lax.axis_size(axis_name) == 1:
        return x
    return ensure_varying(x, axis_name)


def shard_start(axis_name: str, size: int) -> jax.Array | int:
    """`axis_index(axis_name) * size`: where this device's block of a split dim starts.

    The Python int 0 when the axis has size 1, so that nothing downstream is
    typed as varying over an axis of size 1 (which would leave size-1
    collectives in the compiled program).
    """
    if lax.axis_size(axis_name) == 1:
        return 0
    return axis_index(axis_name) * size


def gather_sequence(x_shard: jax.Array, axis_name: str, *, seq_axis: int = 1) -> jax.Array:
    """Megatron-SP's `g`: the full sequence from its shards, typed varying over `axis_name`.

    Shardings (N = size of `axis_name`):
      x_shard: [B, S/N, ...]  split over the sequence on `axis_name`
      returns: [B, S, ...]    the same values on every device of `axis_name`

    The result is typed *varying*: each device goes on to multiply it with its
    own weight shard, so the cotangents that come back differ per device and
    must be summed. Collectives: forward 1 all-gather; backward 1
    reduce-scatter (the sum and the re-split in one op, not an all-reduce
    followed by a slice).
    """
    return all_gather(x_shard, axis_name, axis=seq_axis, invariant=False)


def scatter_sequence(partial: jax.Array, axis_name: str, *, seq_axis: int = 1) -> jax.Array:
    """Megatron-SP's `g-bar`: sum partial results over `axis_name`, keep 1/N of the sequence.

    Shardings: partial [B, S, ...] (one term of the sum per device) ->
    [B, S/N, ...]. Collectives: forward 1 reduce-scatter; backward 1 all-gather.
    """
    return reduce_scatter(partial, axis_name, axis=seq_axis)


def enter_tensor_parallel(
    x: jax.Array, axis_name: str, *, sequence_parallel: bool, seq_axis: int = 1
) -> jax.Array:
    """The input of a column-parallel block, ready to multiply with weight shards.

    Without SP, `x: [B, S, D]` is replicated over `axis_name` and is cast to
    varying once (no data moves), so the backward sums the input gradient of
    *all* the block's column matmuls with a single all-reduce. With SP,
    `x: [B, S/N, D]` is all-gathered (backward: one reduce-scatter).
    """
    if sequence_parallel:
        return gather_sequence(x, axis_name, seq_axis=seq_axis)
    return cast_varying(x, axis_name)


def sequence_parallel_column_matmul(
    x_shard: jax.Array,
    kernel_shard: jax.Array,
    bias_shard: jax.Array | None = None,
    *,
    axis_name: str = "model",
    seq_axis: int = 1,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Column-parallel `x @ W + b` whose input arrives split over the sequence.

    Math: `x = concat_i x_i` over the sequence; `y_j = x @ W_j + b_j` on device j.

    Shardings (N = size of `axis_name`):
      x_shard:      [B, S/N, D]   `P(batch, axis_name, None)`
      kernel_shard: [D, F/N]      `P(None, axis_name)`
      bias_shard:   [F/N]
      returns:      [B, S, F/N]   `P(batch, None, axis_name)`

    Collectives over `axis_name`: forward 1 all-gather of x `[B, S, D]`;
    backward 1 reduce-scatter of dx (Korthikanti et al. 2022, fig. 5).
    """
    x = gather_sequence(x_shard, axis_name, seq_axis=seq_axis)  # x: [B, S, D]
    return column_parallel_matmul(
        x, kernel_shard, bias_shard, axis_name=axis_name, precision=precision,
        dot_general=dot_general, preferred_element_type=preferred_element_type,
    )  # fmt: skip


def sequence_parallel_row_matmul(
    x_shard: jax.Array,
    kernel_shard: jax.Array,
    bias: jax.Array | None = None,
    *,
    axis_name: str = "model",
    seq_axis: int = 1,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Row-parallel `sum_i x_i @ W_i + b` whose output leaves split over the sequence.

    Shardings (N = size of `axis_name`):
      x_shard:      [B, S, F/N]   `P(batch, None, axis_name)`
      kernel_shard: [F/N, D]      `P(axis_name, None)`
      bias:         [D]           replicated, added once after the sum
      returns:      [B, S/N, D]   `P(batch, axis_name, None)`

    Collectives over `axis_name`: forward 1 reduce-scatter of the partial
    products `[B, S, D]`; backward 1 all-gather of dy.
    """
    partial = matmul_last(
        x_shard,
        kernel_shard,
        precision=precision,
        dot_general=dot_general,
        preferred_element_type=preferred_element_type,
    )  # partial: [B, S, D], one term of the sum per device
    y = scatter_sequence(partial, axis_name, seq_axis=seq_axis)  # y: [B, S/N, D]
    return _add_bias(y, bias)


def exit_tensor_parallel(
    partial: jax.Array, axis_name: str, *, sequence_parallel: bool, seq_axis: int = 1
) -> jax.Array:
    """Sum the per-device partial outputs of a row-parallel block.

    Without SP: 1 all-reduce, result `[B, S, D]` replicated. With SP: 1
    reduce-scatter, result `[B, S/N, D]`.
    """
    if sequence_parallel:
        return scatter_sequence(partial, axis_name, seq_axis=seq_axis)
    return all_reduce(partial, axis_name)
