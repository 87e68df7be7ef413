"""`RowParallelLinear`: the row split of `ParallelLinear` (Megatron's RowParallelLinear).

The model axis splits the kernel's input features; the partial products are
all-reduced (or, under sequence parallelism, reduce-scattered over the
sequence) and the whole bias is added once, after the reduction.
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
from shardlax.nn._linear import ROW, ParallelLinear
from shardlax.precision import MixedPrecision


class RowParallelLinear(ParallelLinear):
    """`nnx.Linear` with its input features split over the model axis.

    Megatron-LM's RowParallelLinear: `y = sum_i x_i @ W_i + b` with
    `W: f32[in, out]` stored as `P('model', None)` and `b` replicated. The
    input arrives split over the model axis on its last dim (the output of
    a `ColumnParallelLinear`); the partial products are summed with one
    all-reduce and the bias is added once, after the sum.

    Collectives (N = model axis size): forward 1 all-reduce of the output
    over the model axis; backward none for the input gradient (with
    `input_is_parallel=False`, 1 all-reduce of it), and the weight
    gradients all-reduced over the batch axes, in the parameter dtype.

    FSDP: the kernel is stored as `P('model', 'fsdp')` (split on its output
    features) and the bias as `P('fsdp')`; collectives as in
    `ColumnParallelLinear` ([in/N, out] and [out] gathered).

    Sequence parallelism (`sequence_parallel=True`, Megatron-SP): the partial
    products `[B, S, D]` are reduce-scattered over the sequence on exit
    instead of all-reduced (backward: 1 all-gather of dy), and the output is
    `[B, S/N, D]`, `P(batch, 'model', None)`. The bias is added once, after
    the reduce-scatter, to each device's slice of the sequence; its gradient
    is summed over the sequence shards too (1 all-reduce of `[out]` over the
    batch axes and the model axis together).

    Args are those of `nnx.Linear`, plus:
      mesh, axis_name, batch_axes, fsdp_axis, reshard_after_forward,
        mixed_precision: as in `ColumnParallelLinear`.
      input_is_parallel: the input is already split over the model axis
        (True, the Megatron default); if False, it is replicated and each
        device takes its slice (not with `sequence_parallel`).
      sequence_parallel: leave the output split over the sequence (dim 1) on
        the model axis; it needs rank >= 3 and a sequence divisible by N.

    References:
      Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053).
    """

    split = ROW

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
        input_is_parallel: bool = True,
        fsdp_axis: str | None = AUTO,
        reshard_after_forward: bool = True,
        mixed_precision: MixedPrecision | None = None,
        sequence_parallel: bool = False,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        self._setup_fsdp(fsdp_axis, reshard_after_forward, mixed_precision)
        self._setup_sequence_parallel(
            sequence_parallel, None if input_is_parallel else "input_is_parallel=False"
        )
        check_divisible(type(self).__name__, "in_features", in_features, axis_name,
                        self.model_size)  # fmt: skip
        self._setup_params(
            in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            precision=precision, kernel_init=kernel_init, bias_init=bias_init,
            dot_general=dot_general, promote_dtype=promote_dtype,
            preferred_element_type=preferred_element_type, rngs=rngs,
            kernel_metadata=kernel_metadata, bias_metadata=bias_metadata,
        )  # fmt: skip
        self.input_is_parallel = input_is_parallel

    def input_spec(self, ndim: int) -> P:
        """The input layout: split over the batch axes, and the model axis if parallel."""
        return self._activation_spec(ndim, self.axis_name if self.input_is_parallel else None)

    def output_spec(self, ndim: int) -> P:
        """The output layout: split over the batch axes, replicated over the model axis.

        Under sequence parallelism: split over the sequence on the model axis.
        """
        if self.sequence_parallel:
            return self._sequence_spec(ndim)
        return self._activation_spec(ndim, None)

    def _matmul(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> Any:
        common = self._matmul_options
        if self.sequence_parallel:
            return kernels.sequence_parallel_row_matmul(x, kernel, bias, **common)
        return kernels.row_parallel_matmul(
            x, kernel, bias, input_is_parallel=self.input_is_parallel, **common
        )

    def _declare_activations(
        self, local: tuple[int, ...], dtype: Any, grad: bool, input_grad: bool
    ) -> list[Declared]:
        """The output sum (or SP scatter) and, for a replicated input, dx.

        `local` is the local input; under sequence parallelism the output
        sequence is split, the input's is not.
        """
        m = (self.axis_name,)
        y_bytes = nbytes((*local[:-1], self.out_features), dtype)  # the partial products
        if self.sequence_parallel:
            out = self._declare("reduce-scatter", m, dtype, y_bytes, "SP: scatter y")
            if grad:  # dy gathered over the sequence (dW needs it whole)
                out += self._declare("all-gather", m, dtype, y_bytes, "SP: gather dy")
        else:
            out = self._declare("all-reduce", m, dtype, y_bytes, "sum of partial products")
        if grad and input_grad and not self.input_is_parallel:
            out += self._declare("all-reduce", m, dtype, nbytes(local, dtype), "dx")
        return out
