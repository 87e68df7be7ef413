"""Activation layouts shared by the transformer layers, with and without sequence parallelism."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax.declarations import Role
from shardlax.mesh import live_axes
from shardlax.nn._base import ShardedLayer, nbytes, run_shard_map
from shardlax.nn._column import ColumnParallelLinear
from shardlax.precision import wire_dtypes


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
        inputs = self._global_view(inputs)
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

    def _use_param(
        self, owner: ShardedLayer, value: jax.Array | None, dim: int, *, token_sum: bool = False
    ) -> jax.Array | None:
        """Inside the body: a parameter of `owner` ready for use, typed for its gradient.

        FSDP (`owner`'s fsdp axis live): all-gathered over it (backward:
        reduce-scatter). Otherwise cast to varying over the batch axes
        (backward: all-reduce). `token_sum`: the parameter multiplies
        activations that, under sequence parallelism, are split over the model
        axis too (a norm scale, the bias after a row-parallel exit), so its
        gradient is also summed over the model axis; without FSDP the casts
        are merged, so the backward is one all-reduce over both.
        """
        if value is None:
            return None
        model = live_axes(self.mesh, (self.axis_name,)) if self.sequence_parallel else ()
        if token_sum and model:
            if not owner._fsdp_live:
                axes = live_axes(self.mesh, (*self.batch_axes, self.axis_name))
                return kernels.ensure_varying(value, axes)
            # FSDP: reduce-scatter over fsdp first, then one all-reduce of the 1/N shard
            # over the other batch axes and the model axis together.
            compute, reduce = wire_dtypes(value.dtype, owner.mixed_precision)
            others = tuple(
                a for a in live_axes(self.mesh, owner.batch_axes) if a != owner.fsdp_axis
            )
            return kernels.fsdp_gather(
                value, owner.fsdp_axis, dim=dim, replicated_axes=(*others, *model),
                gather_dtype=compute, reduce_dtype=reduce,
            )  # fmt: skip
        return owner._gather(value, dim)

    def _declare_param(
        self, owner: ShardedLayer, local_shape: Sequence[int], dim: int, *, grad: bool,
        regather: bool, why: str, token_sum: bool = False,
    ) -> list:  # fmt: skip
        """The collectives of one parameter used via `_use_param` (model-local shape).

        `regather`: the backward gathers the parameter again (FSDP with
        `reshard_after_forward`, when the backward uses its value).
        """
        model = live_axes(self.mesh, (self.axis_name,)) if self.sequence_parallel else ()
        if token_sum and model and grad:
            dt = owner.param_dtype
            if not owner._fsdp_live:
                axes = (*self.batch_axes, self.axis_name)
                return owner._declare("all-reduce", axes, dt, nbytes(local_shape, dt), f"d{why}",
                                      role=Role.GRAD_REDUCE, param=why)  # fmt: skip
            out = owner._declare_fsdp(local_shape, dim, grad=grad, regather=regather, why=why)
            out = [d for d in out if d.kind != "all-reduce"]
            _, rdt = wire_dtypes(dt, owner.mixed_precision)
            others = tuple(a for a in owner.batch_axes if a != owner.fsdp_axis)
            shard = nbytes(local_shape, rdt) // owner.fsdp_size
            return out + owner._declare("all-reduce", (*others, *model), rdt, shard,
                                        f"d{why} shard over the other tokens",
                                        role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        return owner._declare_fsdp(local_shape, dim, grad=grad, regather=regather, why=why)

    # A fused block (attention, MLP) lists its parameters as entries
    # (owner linear, attribute, fsdp dim, token_sum, when the backward needs the value:
    # "always", "input" (only for the input gradient) or "never").
    def _entries(self) -> list[tuple]:
        raise NotImplementedError

    def _entry_values(self) -> tuple:
        return tuple(_value(getattr(o, a)) for o, a, *_ in self._entries())

    def _entry_specs(self) -> tuple:
        return tuple(getattr(o, f"{a}_spec") for o, a, *_ in self._entries())

    def _apply(self, fn, entries: Sequence[tuple], values: Sequence, args):
        """Inside the body: `fn(params, args)` with each parameter gathered / cast by `_use_param`.

        With FSDP and `reshard_after_forward` (any owner), `kernels.fsdp_call`
        frees the gathered parameters after the forward and re-gathers them in
        the backward, as the linears do; otherwise plain autodiff.
        """

        def gather(ps):
            return tuple(
                self._use_param(o, p, dim, token_sum=ts)
                for (o, _, dim, ts, _), p in zip(entries, ps, strict=True)
            )

        reshard = any(o._fsdp_live and o.reshard_after_forward for o, *_ in entries)
        return kernels.fsdp_call(
            fn, tuple(values), args, gather=gather, reshard_after_forward=reshard
        )

    def _run_fused(self, x: jax.Array, spec: P, kernel, compute_dtype: Any) -> jax.Array:
        """`kernel(x, *params)` in one shard_map over this layer's parameter entries.

        The parameters are gathered / cast by `_apply`, then `promote_dtype`
        brings `x` and them to `compute_dtype`; input and output share `spec`.
        """

        def body(x, *params):
            def fn(params, x):
                x, *params = self.promote_dtype((x, *params), dtype=compute_dtype)
                return kernel(x, *params)

            return self._apply(fn, self._entries(), params, x)

        values, specs = self._entry_values(), self._entry_specs()
        return run_shard_map(body, self.mesh, (x, *values), (spec, *specs), spec)

    def _owners(self) -> list:
        return [o for o, *_ in self._entries()]

    def _declare_entries(
        self, grad: bool, input_grad: bool, why: str, entries: Sequence[tuple] | None = None
    ) -> list:
        """The parameter collectives of `entries` (default `self._entries()`).

        FSDP with `reshard_after_forward` re-gathers in the backward exactly the
        parameters whose value the backward uses: "always" (a row kernel, needed
        for the hidden gradient), "input" (a column kernel or norm scale, needed
        only for the input gradient), never a bias or a lookup table.
        """
        out = []
        names = {id(v): k for k, v in vars(self).items() if isinstance(v, nnx.Module)}
        for o, a, dim, ts, needed in self._entries() if entries is None else entries:
            value = getattr(o, a)
            if value is None:
                continue
            shape = list(value[...].shape)
            col = isinstance(o, ColumnParallelLinear)
            if a == "embedding":
                shape[0] //= o.model_size
            elif a == "scale":
                pass
            elif a == "kernel":  # the model-local shape, which the fsdp gather rebuilds
                shape[1 if col else 0] //= o.model_size
            elif col:
                shape[0] //= o.model_size
            regather = (
                o.reshard_after_forward
                and grad
                and (needed == "always" or (needed == "input" and input_grad))
            )
            out += self._declare_param(o, shape, dim, grad=grad, regather=regather,
                                       why=".".join(filter(None, (why, names.get(id(o)), a))),
                                       token_sum=ts)  # fmt: skip
        return out

    def _local_hidden_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Per-device shape of a `[B, S, ...]` activation in `hidden_spec`."""
        shape = list(self._local_batch_shape(shape))
        if self.sequence_parallel:
            shape[1] //= self.model_size
        return tuple(shape)


def _value(p):
    return None if p is None else p[...]
