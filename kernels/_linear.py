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

from ._collectives import (
    all_gather,
    all_reduce,
    axis_index,
    axis_size,
    ensure_varying,
    reduce_scatter,
)

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


def share_input(x: jax.Array, axis_name: str = "model") -> jax.Array:
    """Type a model-replicated input as varying over `axis_name`, once for all its readers.

    Every column-parallel layer that reads the same activation (q, k and v;
    gate and up) multiplies it by a kernel shard that varies over the model
    axis, so each would cast it to varying on its own, and autodiff would
    transpose each cast into its own all-reduce of dx. Casting it once here
    and handing the varying value to every reader leaves their partial input
    gradients local; the sum of the readers' cotangents then reaches this one
    cast, whose transpose is the only all-reduce.

    Shardings: x [..., D] replicated over `axis_name`; returns the same
    values, typed varying. Collectives: forward none; backward 1 all-reduce
    of dx over `axis_name` (however many layers read the result).
    """
    return ensure_varying(x, (axis_name,))


def einsum_subscripts(
    einsum_str: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]
) -> tuple[str, str, str]:
    """The explicit (input, kernel, output) subscripts of a two-operand equation.

    Ellipses are replaced by letters exactly as `nnx.Einsum` does it (opt_einsum's
    parser, right-aligned broadcasting), so ``'d...ab,bc...->ad...c'`` on ranks
    5 and 4 reads ``('dhiab', 'bchi', 'adhic')``. Only the ranks matter.
    """
    einsum_str = einsum_str.replace(" ", "")
    if "." not in einsum_str:
        lhs, out = einsum_str.split("->")
        x, k = lhs.split(",")
        return x, k, out
    from opt_einsum.parser import parse_einsum_input  # a dependency of jax

    shapes = (jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
              jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32))  # fmt: skip
    ops, out, _ = parse_einsum_input((einsum_str, *shapes))
    x, k = ops.split(",")
    return x, k, out


def parallel_einsum(
    einsum_str: str,
    x: jax.Array,
    kernel_shard: jax.Array,
    bias_shard: jax.Array | None = None,
    *,
    split: str | int,
    axis_name: str = "model",
    precision: Any = None,
    einsum_op: Callable[..., jax.Array] = jnp.einsum,
    preferred_element_type: Any = None,
    sequence_axis: int | None = None,
) -> jax.Array:
    """`einsum(einsum_str, x, W) + b` with one kernel dim (`split`) split over `axis_name`.

    `split` names the kernel dim, by its letter or by its index (an index also
    reaches a dim of an ellipsis: ``'...D,D...->...'``). What the split letter
    `c` is in the equation decides the parallelism:

    - column-like, `c` in the output only (the heads of a ``'BTD,DNH->BTNH'``
      kernel): device i computes its slice of the output,
      `y_i = einsum(x, W_i) + b_i`, no collective forward; the input is
      replicated and its gradient is all-reduced once by the caller (see
      `share_input`).
    - batched, `c` in the input and the output (``'BTNH,NHK->BTNK'`` split on
      N): device i computes `y_i = einsum(x_i, W_i) + b_i` on its own slice of
      `c`; no collective forward or backward.
    - row-like, `c` contracted (``'BTNH,NHD->BTD'``): `y = sum_i einsum(x_i,
      W_i) + b`, 1 all-reduce of the output forward, the bias added once after
      the sum; backward none for dx when `x` is split on `c` (when `c` is not
      an input letter, `x` is replicated and autodiff all-reduces its gradient).

    Shardings (N = size of `axis_name`):
      x:            the input; split over `axis_name` on `c` when `c` is one
                    of its letters (batched, row-like), else replicated
      kernel_shard: the kernel, split on its `split` dim (its global layout is
                    untouched: no re-layout, the shard is a plain slice)
      bias_shard:   broadcast like nnx.Einsum's bias; split on `c` when `c` is
                    an output letter, else replicated
      returns:      split on `c` when `c` is an output letter; else replicated

    Sequence parallelism (`sequence_axis`, Megatron-SP), column-like: `x`
    arrives split over `axis_name` on its dim `sequence_axis` and is
    all-gathered there first (backward: 1 reduce-scatter of dx, in place of
    the caller's all-reduce); row-like: the sum of the partial products is 1
    reduce-scatter onto the output's dim `sequence_axis` instead of the
    all-reduce (backward: 1 all-gather of dy), the bias added after it.

    The bias is reshaped as `nnx.Einsum` does it: kernel letters that survive
    in the output keep their (local) kernel size, the others become 1.
    """
    _, ks, out = einsum_subscripts(einsum_str, x.shape, kernel_shard.shape)
    c = ks[split] if isinstance(split, int) else split
    if sequence_axis is not None and c in out:  # column-like SP: the whole sequence first
        x = all_gather(x, axis_name, axis=sequence_axis, invariant=False)
    kwargs = {}
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    y = einsum_op(einsum_str, x, kernel_shard, precision=precision, **kwargs)
    if einsum_op is not jnp.einsum and axis_size(axis_name) > 1:  # (unsplit: any shape is fine)
        want = jax.eval_shape(lambda a, k: jnp.einsum(einsum_str, a, k), x, kernel_shard).shape
        if tuple(y.shape) != tuple(want):
            raise ValueError(
                f"ParallelEinsum(einsum_op={getattr(einsum_op, '__name__', einsum_op)!r}): it "
                f"returned shape {tuple(y.shape)} where {einsum_str!r} gives {tuple(want)} on "
                f"this device's shards. The output is laid out over the mesh by the equation's "
                f"letters (kernel dim {c!r} split over {axis_name!r}), so a custom einsum_op "
                f"must return the equation's shape: reshape the layer's output instead."
            )
    if c not in out and sequence_axis is not None:  # row-like SP: sum and split the sequence
        y = reduce_scatter(y, axis_name, axis=sequence_axis)
    elif c not in out:  # row-like: y holds one term of the sum per device
        y = all_reduce(y, axis_name)
    if bias_shard is not None:
        shape = [kernel_shard.shape[ks.index(k)] if k in ks else 1 for k in out]
        y = y + jnp.reshape(bias_shard, shape)
    return y


def fused_column_matmul(
    x: jax.Array,
    kernel_shard: jax.Array,
    bias_shard: jax.Array | None = None,
    *,
    parts: int,
    axis_name: str = "model",
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
    preferred_element_type: Any = None,
) -> tuple[jax.Array, ...]:
    """`jnp.split(x @ W + b, parts, -1)`, each part split over `axis_name` on its own.

    `W = [W^0 | W^1 | ... ]` is a fused projection (`[k | v]`, `[gate | up]`)
    stored in its own global layout, `P(None, axis_name)`: device i holds the
    contiguous columns `[i kF/N, (i+1) kF/N)`, which mix the parts. Each
    device needs its slice of *every* part (its heads of k and of v), so the
    kernel shard is all-gathered over `axis_name` and each device keeps
    columns `p F + [i F/N, (i+1) F/N)` of every part p; the parts are
    returned separately, each `[..., F/N]` = `P(..., axis_name)`.

    Shardings (N = size of `axis_name`, k = `parts`, F = the width of a part):
      x:            [..., D]      replicated over `axis_name` (typed varying by
                                  `share_input` so dx is all-reduced once)
      kernel_shard: [D, kF/N]     `P(None, axis_name)` of the global [D, kF]
      bias_shard:   [kF/N]        `P(axis_name)` of the global [kF]
      returns:      k arrays [..., F/N]

    Collectives over `axis_name`: forward 1 all-gather of the kernel (and 1 of
    the bias): each device receives (N-1)/N of `D kF` elements; backward 1
    reduce-scatter of the kernel gradient (and of the bias gradient), the
    same bytes. A fused projection the model splits by `jnp.split` cannot
    keep every part local under a contiguous layout; separate projections, or
    an `nnx.Einsum` with a parts dim (``'BSD,CDKH->CBSKH'``), need none of it.
    """
    n = axis_size(axis_name)
    i = axis_index(axis_name)

    def shares(w: jax.Array) -> jax.Array:
        # typed varying: each device keeps its own slices of it, and the transpose of a
        # varying all-gather is the reduce-scatter of dW (an invariant one would psum it)
        w = all_gather(w, axis_name, axis=w.ndim - 1, invariant=False)  # w: [..., kF]
        width = w.shape[-1] // parts // n
        w = w.reshape(*w.shape[:-1], parts, n * width)  # w: [..., k, F]
        return lax.dynamic_slice_in_dim(w, i * width, width, axis=w.ndim - 1)  # [..., k, F/N]

    kernel = shares(kernel_shard)  # kernel: [D, k, F/N]
    kwargs = {}
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, **kwargs)
    if bias_shard is not None:  # y: [..., k, F/N]
        y = y + jnp.reshape(shares(bias_shard), (1,) * (x.ndim - 1) + y.shape[-2:])
    return tuple(y[..., p, :] for p in range(parts))
