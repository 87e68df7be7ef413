"""Activation layouts shared by the transformer layers, with and without sequence parallelism."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax.mesh import live_axes
from shardlax.nn._base import ShardedLayer


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * jnp.dtype(dtype).itemsize


class SequenceLayer(ShardedLayer):
    """A layer whose activations are `[B, S, ...]`, optionally split over S on the model axis.

    With `sequence_parallel=False` the activation between layers is
    `P(batch, None, None)` (replicated over the model axis, Megatron-TP); with
    `sequence_parallel=True` it is `P(batch, model, None)` (Megatron-SP).
    """

    sequence_parallel: bool

    def hidden_spec(self, ndim: int = 3) -> P:
        """The layout of the `[B, S, D]` activation this layer takes and returns."""
        if self.sequence_parallel and ndim >= 2:
            return P(self._batch_entry(), self._spec_axis(self.axis_name), *([None] * (ndim - 2)))
        return self._activation_spec(ndim, None)

    def _check_hidden(self, inputs: jax.Array, features: int | None, argument: str) -> None:
        """Array, rank >= 2, last dim, batch divisible and, under SP, sequence divisible."""
        owner = type(self).__name__
        if features is not None:
            self._check_inputs(inputs, features, argument)
        elif not hasattr(inputs, "shape"):
            raise TypeError(f"{owner}: inputs must be an array, got {type(inputs).__name__}.")
        if inputs.ndim < 2:
            raise ValueError(
                f"{owner}: inputs.shape={tuple(inputs.shape)} has rank {inputs.ndim}; expected "
                f"[batch, sequence, ...]. Add a batch dim, e.g. inputs[None]."
            )
        if features is None and inputs.shape[0] % self.batch_size_divisor:
            n, b = self.batch_size_divisor, inputs.shape[0]
            raise ValueError(
                f"{owner}: inputs.shape[0]={b} (the batch) cannot be sharded over mesh axes "
                f"{self.batch_axes} (size {n}): {n} does not divide {b}. Use a batch size "
                f"divisible by {n}."
            )
        if self.sequence_parallel:
            s, n = inputs.shape[1], self.model_size
            if s % n:
                raise ValueError(
                    f"{owner}(sequence_parallel=True): inputs.shape[1]={s} (the sequence) "
                    f"cannot be sharded over mesh axis {self.axis_name!r} (size {n}): {n} does "
                    f"not divide {s}. Use a sequence length divisible by {n}, or "
                    f"sequence_parallel=False."
                )

    def _cast_for_grad(self, params: Sequence[jax.Array | None], row_bias: int) -> list:
        """Cast parameters to varying over the axes their gradient is summed over.

        Every parameter: the batch axes. The bias added after the row-parallel
        exit under sequence parallelism: the batch axes *and* the model axis
        (its tokens are split over both), cast in one go so the backward is
        one all-reduce over both, not two.
        """
        params = list(params)
        if self.sequence_parallel and params[row_bias] is not None:
            axes = live_axes(self.mesh, (*self.batch_axes, self.axis_name))
            params[row_bias] = kernels.ensure_varying(params[row_bias], axes)
        return self._replicated_for_grad(*params)

    def _local_hidden_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Per-device shape of a `[B, S, ...]` activation in `hidden_spec`."""
        shape = list(self._local_batch_shape(shape))
        if self.sequence_parallel:
            shape[1] //= self.model_size
        return tuple(shape)


def run_shard_map(body, mesh, args: tuple, in_specs: tuple, out_spec):
    """`jax.shard_map(body)` over `args`, dropping `None` arguments (missing biases)."""
    present = [i for i, a in enumerate(args) if a is not None]

    @functools.wraps(body)
    def wrapped(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return body(*full)

    return jax.shard_map(
        wrapped,
        mesh=mesh,
        in_specs=tuple(in_specs[i] for i in present),
        out_specs=out_spec,
    )(*(args[i] for i in present))
