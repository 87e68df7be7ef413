"""`ColumnParallelLinear`: the column split of `ParallelLinear` (Megatron's ColumnParallelLinear).

The model axis splits the kernel's output features (and the bias). Options
only this split has: `gather_output`, fused `parts` (each part split on its
own), `shared_input` (column layers reading one activation all-reduce their
input gradient once), and sequence parallelism's all-gather on entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared
from shardlax.mesh import check_divisible
from shardlax.nn._base import AUTO, nbytes
from shardlax.nn._linear import COLUMN, ParallelLinear
from shardlax.nn._projection import Parts, _identity, shared_model_input
from shardlax.precision import MixedPrecision


class ColumnParallelLinear(ParallelLinear):
    """`nnx.Linear` with its output features split over the model axis.

    Megatron-LM's ColumnParallelLinear: `y = x @ W + b` with
    `W: f32[in, out]` stored as `P(None, 'model')` and `b: f32[out]` as
    `P('model')`. The input is replicated over the model axis (and split
    over the batch axes); the output is split over the model axis on its last
    dim, ready for a `RowParallelLinear` with no resharding in between.

    Collectives (N = model axis size): forward none (1 all-gather of the output
    with `gather_output=True`); backward 1 all-reduce of the input gradient
    over the model axis, and the weight gradients all-reduced over the batch
    axes (data parallelism), in the parameter dtype.

    FSDP (a mesh with an ``'fsdp'`` axis of size F > 1): the kernel is stored
    as `P('fsdp', 'model')` and the bias as `P(('model', 'fsdp'))`, 1/(F N) of
    each per device. Per call, forward: 1 all-gather of each over fsdp
    ([in, out/N] and [out/N] bytes); backward: 1 reduce-scatter of each over
    fsdp, 1 all-reduce of each 1/F shard over 'data', and with
    `reshard_after_forward` 1 more all-gather of the kernel when the input
    gradient is taken (dx needs W).

    Sequence parallelism (`sequence_parallel=True`, Megatron-SP): the input
    `[B, S, D]` arrives split over the sequence on the model axis,
    `P(batch, 'model', None)`, and is all-gathered over the sequence on entry
    (forward: 1 all-gather of `[B, S, D]`; backward: 1 reduce-scatter of dx
    instead of the all-reduce). The output is `[B, S, F/N]` as without SP.

    Args are those of `nnx.Linear`, plus:
      mesh: the mesh; default the one set with `jax.set_mesh`.
      axis_name: the tensor-parallel mesh axis (default ``'model'``).
      batch_axes: mesh axes the leading input dim is split over; default
        whichever of ``('data', 'fsdp')`` the mesh has.
      gather_output: all-gather the output so every device has all `out_features`
        (not with `sequence_parallel`).
      sequence_parallel: the input is split over the sequence (dim 1) on the
        model axis; it needs rank >= 3 and a sequence divisible by N.
      fsdp_axis: the mesh axis parameters are split over for FSDP; default
        ``'fsdp'`` when the mesh has it and the batch is split over it; None
        keeps the parameters whole (plain data parallelism over the batch).
      reshard_after_forward: free the gathered parameters after the forward
        and gather them again in the backward (default), or keep them.
      mixed_precision: a `shardlax.precision.MixedPrecision`: parameters
        gathered and computed in `param_dtype`, gradients reduced in
        `reduce_dtype`.

    Example:
      >>> mesh = shardlax.make_mesh(data=2, model=4)
      >>> col = shardlax.nn.ColumnParallelLinear(512, 2048, mesh=mesh, rngs=nnx.Rngs(0))
      >>> row = shardlax.nn.RowParallelLinear(2048, 512, mesh=mesh, rngs=nnx.Rngs(1))
      >>> y = row(jax.nn.gelu(col(jnp.ones((8, 512)))))
      >>> y.shape, col.kernel[...].sharding.spec, row.kernel[...].sharding.spec
      ((8, 512), P(None, 'model'), P('model', None))

    References:
      Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053).
    """

    split = COLUMN

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_bias_init,
        dot_general: Any = lax.dot_general,
        promote_dtype: Any = dtypes.promote_dtype,
        preferred_element_type: Any | None = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
        gather_output: bool = False,
        fsdp_axis: str | None = AUTO,
        reshard_after_forward: bool = True,
        mixed_precision: MixedPrecision | None = None,
        sequence_parallel: bool = False,
        parts: int = 1,
        shared_input: bool = False,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        self._setup_fsdp(fsdp_axis, reshard_after_forward, mixed_precision)
        self._setup_sequence_parallel(
            sequence_parallel, "gather_output=True" if gather_output else None
        )
        owner = type(self).__name__
        if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
            raise ValueError(
                f"{owner}(parts={parts!r}): parts is the number of projections fused in the "
                f"kernel's output dim (2 for [k | v]); it must be a positive int."
            )
        if parts > 1 and (gather_output or sequence_parallel):
            raise ValueError(
                f"{owner}(parts={parts}, gather_output={gather_output}, sequence_parallel="
                f"{sequence_parallel}): a fused projection returns its parts split over the "
                f"model axis; it cannot also gather its output or take a sequence-parallel "
                f"input. Pass gather_output=False and sequence_parallel=False."
            )
        if parts > 1 and out_features % parts:
            raise ValueError(
                f"{owner}(out_features={out_features}, parts={parts}): the fused output dim "
                f"holds {parts} equal parts, so {parts} must divide {out_features}."
            )
        check_divisible(
            owner, "out_features" if parts == 1 else f"out_features/parts={parts}",
            out_features // parts, axis_name, self.model_size,
        )  # fmt: skip
        self.parts = parts
        self.shared_input = bool(shared_input) and not self.sequence_parallel
        self._setup_params(
            in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            precision=precision, kernel_init=kernel_init, bias_init=bias_init,
            dot_general=dot_general, promote_dtype=promote_dtype,
            preferred_element_type=preferred_element_type, rngs=rngs,
            kernel_metadata=kernel_metadata, bias_metadata=bias_metadata,
        )  # fmt: skip
        self.gather_output = gather_output

    def input_spec(self, ndim: int) -> P:
        """The input layout: split over the batch axes (and the sequence, under SP)."""
        if self.sequence_parallel:
            return self._sequence_spec(ndim)
        return self._activation_spec(ndim, None)

    def output_spec(self, ndim: int) -> P:
        """The output layout: split over the batch axes and, unless gathered, the model axis."""
        return self._activation_spec(ndim, None if self.gather_output else self.axis_name)

    def _out_specs(self, ndim: int) -> Any:
        spec = self.output_spec(ndim)
        return (spec,) * self.parts if self.parts > 1 else spec

    def _input_arg(self, source: Any, x: jax.Array, x_spec: P) -> tuple[Any, P, Any]:
        if self.shared_input or self.parts > 1:
            return shared_model_input(self, source, x, x_spec)
        return x, x_spec, _identity

    def _matmul(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> Any:
        common = self._matmul_options
        if self.parts > 1:
            return Parts(kernels.fused_column_matmul(x, kernel, bias, parts=self.parts, **common))
        if self.sequence_parallel:
            return kernels.sequence_parallel_column_matmul(x, kernel, bias, **common)
        return kernels.column_parallel_matmul(
            x, kernel, bias, gather_output=self.gather_output, **common
        )

    def _declare_activations(
        self, local: tuple[int, ...], dtype: Any, grad: bool, input_grad: bool
    ) -> list[Declared]:
        lead, m = local[:-1], (self.axis_name,)
        out = []
        if self.sequence_parallel:  # x [B, S, D] gathered over the sequence; dx scattered back
            x_bytes = nbytes(local, dtype)
            out += self._declare("all-gather", m, dtype, x_bytes, "SP: gather x")
            if grad and input_grad:
                out += self._declare("reduce-scatter", m, dtype, x_bytes, "SP: dx")
        if self.gather_output:
            y_bytes = nbytes((*lead, self.out_features), dtype)
            out += self._declare("all-gather", m, dtype, y_bytes, "gather_output")
        if self.parts > 1:  # the fused kernel (and bias) gathered; their gradients scattered
            pd = self.param_dtype
            w = [((self.in_features, self.out_features), "W")]
            w += [((self.out_features,), "b")] if self.use_bias else []
            for shape, name in w:
                out += self._declare("all-gather", m, pd, nbytes(shape, pd),
                                     f"parts: gather {name}")  # fmt: skip
                if grad:
                    out += self._declare("reduce-scatter", m, pd, nbytes(shape, pd),
                                         f"parts: d{name}")  # fmt: skip
        if grad:
            if input_grad and not self.sequence_parallel:
                why = "dx (once per shared input)" if self.shared_input else "dx"
                out += self._declare("all-reduce", m, dtype, nbytes(local, dtype), why)
            if self.gather_output:
                out += self._declare("reduce-scatter", m, dtype,
                                     nbytes((*lead, self.out_features), dtype),
                                     "dy of the gathered output")  # fmt: skip
        return out
