"""Megatron-style tensor-parallel matmuls, per device, inside `jax.shard_map`.

A column -> row pair is the Megatron MLP: the first matmul splits the output
features over the model axis, the second consumes them split and sums the
partial products with one all-reduce. Forward: 1 all-reduce of the
activation. Backward: 1 all-reduce of the input gradient (from the column
layer), none from the row layer.

Under `check_vma=True` the column layer needs no explicit `f` operator
(identity forward, all-reduce backward): the input is invariant over the
model axis and the kernel shard varies over it, so the product casts the
input to varying and autodiff transposes that cast into the all-reduce.
Adding Megatron's `f` on top would reduce the gradient twice.

References:
  Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language
  Models Using Model Parallelism", 2019 (arXiv:1909.08053), section 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._collectives import all_gather, all_reduce, axis_index, axis_size

DotGeneral = Callable[..., jax.Array]


def matmul_last(
    x: jax.Array,
    kernel: jax.Array,
    *,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`x @ kernel` contracting the last dim of `x` with dim 0 of `kernel`, as nnx.Linear."""
    kwargs = {}
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    return dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, **kwargs)


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def column_parallel_matmul(
    x: jax.Array,
    kernel_shard: jax.Array,
    bias_shard: jax.Array | None = None,
    *,
    axis_name: str = "model",
    gather_output: bool = False,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Column-parallel `y = x @ W + b` with `W` split on its output features.

    Math: `W = [W_0 | W_1 | ... | W_{N-1}]`, device i computes
    `y_i = x @ W_i + b_i`, and `y = [y_0 | ... | y_{N-1}]`.

    Shardings (N = size of `axis_name`):
      x:            [..., D]      replicated over `axis_name`
      kernel_shard: [D, F/N]      `P(None, axis_name)` of the global [D, F]
      bias_shard:   [F/N]         `P(axis_name)` of the global [F]
      returns:      [..., F/N]    or [..., F] replicated when `gather_output`

    Collectives over `axis_name`:
      forward:  none; with `gather_output`, 1 all-gather of y.
      backward: 1 all-reduce of dx (the transpose of the replicated input's
                cast to varying); with `gather_output` also 1 reduce-scatter
                of dy. dW and db need none over `axis_name`.
    """
    y_shard = matmul_last(
        x,
        kernel_shard,
        precision=precision,
        dot_general=dot_general,
        preferred_element_type=preferred_element_type,
    )  # y_shard: [..., F/N]
    y_shard = _add_bias(y_shard, bias_shard)
    if gather_output:
        return all_gather(y_shard, axis_name, axis=y_shard.ndim - 1)  # y: [..., F]
    return y_shard


def row_parallel_matmul(
    x_shard: jax.Array,
    kernel_shard: jax.Array,
    bias: jax.Array | None = None,
    *,
    axis_name: str = "model",
    input_is_parallel: bool = True,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Row-parallel `y = x @ W + b` with `W` split on its input features.

    Math: `W = [W_0; W_1; ...; W_{N-1}]` (stacked rows), `x = [x_0 | ... ]`,
    `y = sum_i x_i @ W_i + b`. The bias is added once, after the sum.

    Shardings (N = size of `axis_name`):
      x_shard:      [..., F/N]  `P(..., axis_name)`; with `input_is_parallel=False`
                    the full [..., F], replicated, and each device slices its part
      kernel_shard: [F/N, D]    `P(axis_name, None)` of the global [F, D]
      bias:         [D]         replicated
      returns:      [..., D]    replicated over `axis_name`

    Collectives over `axis_name`:
      forward:  1 all-reduce of the partial products [..., D].
      backward: none for dx, dW or db when `input_is_parallel`; with
                `input_is_parallel=False`, 1 all-reduce of dx (the slice's
                transpose pads with zeros, then the cast sums the pieces).
    """
    if not input_is_parallel:
        n = axis_size(axis_name)
        width = x_shard.shape[-1] // n
        start = axis_index(axis_name) * width
        x_shard = lax.dynamic_slice_in_dim(x_shard, start, width, axis=x_shard.ndim - 1)
    partial_y = matmul_last(
        x_shard,
        kernel_shard,
        precision=precision,
        dot_general=dot_general,
        preferred_element_type=preferred_element_type,
    )  # partial_y: [..., D], one term of the sum per device
    y = all_reduce(partial_y, axis_name)  # y: [..., D]
    return _add_bias(y, bias)
