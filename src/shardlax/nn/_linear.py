"""Megatron tensor-parallel linears as drop-in Flax NNX modules.

One layer, `ParallelLinear`, with the column / row difference as data: a
`Split` says which kernel dim the model axis splits (and so which one FSDP
splits, whether the bias is split, which size the axis must divide).
`ColumnParallelLinear` and `RowParallelLinear` are its two splits, each with
nnx.Linear's constructor and its own options (`gather_output`, `parts`,
`shared_input`; `input_is_parallel`) and the collectives only that split has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

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
from shardlax.nn._base import AUTO, ShardedLayer, nbytes, param_value
from shardlax.nn._projection import Parts, _identity, metadata_param, shared_model_input
from shardlax.placement import storage_spec
from shardlax.precision import MixedPrecision


@dataclasses.dataclass(frozen=True)
class Split:
    """Where the model axis splits a `[in_features, out_features]` kernel.

    model_dim: the kernel dim split over the model axis (1: column, 0: row).
      FSDP splits the other one; the model axis must divide that dim's size.
    """

    name: str
    model_dim: int

    @property
    def fsdp_dim(self) -> int:
        """The kernel dim split over fsdp (the one the model axis leaves whole)."""
        return 1 - self.model_dim

    @property
    def bias_split(self) -> bool:
        """The bias `[out]` follows the kernel's output dim: split iff that dim is."""
        return self.model_dim == 1

    @property
    def divides(self) -> str:
        """The constructor argument the model axis must divide."""
        return ("in_features", "out_features")[self.model_dim]


COLUMN = Split("column", model_dim=1)
ROW = Split("row", model_dim=0)


class ParallelLinear(ShardedLayer):
    """`nnx.Linear` with its kernel split over the model axis as `split` says.

    Use `ColumnParallelLinear` / `RowParallelLinear` (the two splits). This
    class holds what they share: the parameters and their placement (model
    axis on `split.model_dim`, FSDP on the other dim, the bias with the
    output dim), the call path (checks, layouts, FSDP gather, one shard_map),
    and the declared collectives of the parameters. A split adds its matmul
    kernel (`_matmul`), its layouts and its activation collectives.
    """

    split: ClassVar[Split]
    sequence_parallel: bool

    def _setup_params(
        self, in_features: int, out_features: int, *, use_bias: bool, dtype: Any,
        param_dtype: Any, precision: Any, kernel_init: Any, bias_init: Any, dot_general: Any,
        promote_dtype: Any, preferred_element_type: Any, rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Kernel `[in, out]` and bias `[out]`, created placed (nnx.Linear's values)."""
        s, m = self.split, self._spec_axis(self.axis_name)
        shape = (in_features, out_features)
        # column: kernel P('fsdp', 'model'), bias P(('model', 'fsdp'))
        # row:    kernel P('model', 'fsdp'), bias P('fsdp')
        fsdp_arg = ("in_features", "out_features")[s.fsdp_dim]
        kernel = storage_spec(2, [(s.model_dim, m)])
        self.kernel_spec = self._fsdp_spec(kernel, shape, s.fsdp_dim, fsdp_arg)
        bias = storage_spec(1, [(0, m if s.bias_split else None)])
        self.bias_spec = self._fsdp_spec(bias, (out_features,), 0, "out_features")
        self._param_dims = (s.fsdp_dim, 0)  # the dims of (kernel, bias) split over fsdp
        self.kernel = metadata_param(
            kernel_init, rngs.params(), shape, param_dtype, self.mesh, self.kernel_spec,
            kernel_metadata,
        )  # fmt: skip
        self.bias: nnx.Param | None
        if use_bias:
            self.bias = metadata_param(
                bias_init, rngs.params(), (out_features,), param_dtype, self.mesh,
                self.bias_spec, bias_metadata,
            )  # fmt: skip
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    @property
    def _kernel_local(self) -> tuple[int, int]:
        """The kernel on one model-axis shard: what the fsdp all-gather rebuilds."""
        shape = [self.in_features, self.out_features]
        shape[self.split.model_dim] //= self.model_size
        return (shape[0], shape[1])

    @property
    def _bias_token_axes(self) -> tuple[str, ...]:
        """Axes besides the batch ones the bias gradient sums over.

        An unsplit bias meets the output's tokens; under sequence parallelism
        (row) those are split over the model axis too.
        """
        return () if self.split.bias_split else self._model_token_axes

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """`inputs @ kernel + bias`; `out_sharding` (as nnx.Linear's) lays out the result."""
        y = self._call(inputs)
        if out_sharding is not None:
            y = self._place(y, getattr(out_sharding, "spec", out_sharding))
        return y

    def _call(self, inputs: jax.Array) -> Any:
        with jax.named_scope(type(self).__name__):
            self._check_inputs(inputs, self.in_features, "in_features")
            self._check_sequence(inputs)
            x_spec = self.input_spec(inputs.ndim)
            source, inputs = inputs, self._place(inputs, x_spec)
            kernel, bias = self.kernel[...], param_value(self.bias)
            arg, arg_spec, unwrap = self._input_arg(source, inputs, x_spec)

            def use(params, x):
                kernel, bias = params
                x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self._compute_dtype())
                y = self._matmul(x, kernel, bias)
                # a plain tuple through fsdp_call's custom_vjp: Parts refuses to be an array
                return tuple(y) if isinstance(y, Parts) else y

            def body(x, kernel, bias):
                return self._fsdp_apply(use, (kernel, bias), self._param_dims, unwrap(x),
                                        ((), self._bias_token_axes))  # fmt: skip

            out_specs = self._out_specs(inputs.ndim)
            y = self._shard_map(
                body, (arg, kernel, bias), (arg_spec, self.kernel_spec, self.bias_spec), out_specs
            )
            return Parts(y) if isinstance(out_specs, tuple) else y

    # what a split adds
    def input_spec(self, ndim: int) -> P:
        raise NotImplementedError

    def output_spec(self, ndim: int) -> P:
        raise NotImplementedError

    def _out_specs(self, ndim: int) -> Any:
        return self.output_spec(ndim)

    def _input_arg(self, source: Any, x: jax.Array, x_spec: P) -> tuple[Any, P, Any]:
        """What the shard_map receives for the input (and how the body unwraps it)."""
        return x, x_spec, _identity

    def _matmul(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> Any:
        raise NotImplementedError

    @property
    def _matmul_options(self) -> dict[str, Any]:
        """What every matmul kernel of the linears takes besides its operands."""
        return dict(
            axis_name=self.axis_name, precision=self.precision, dot_general=self.dot_general,
            preferred_element_type=self.preferred_element_type,
        )  # fmt: skip

    def _declare_activations(
        self, local: tuple[int, ...], dtype: Any, grad: bool, input_grad: bool
    ) -> list[Declared]:
        raise NotImplementedError

    def declared_collectives(
        self, input_shape: Sequence[int], *, dtype: Any = None, grad: bool = False,
        input_grad: bool = True,
    ) -> list[Declared]:  # fmt: skip
        """The collectives this layer compiles to for a global input of `input_shape`.

        Args:
          input_shape: the global input shape `[..., in_features]` (under sequence
            parallelism the whole sequence, `[B, S, ..., in_features]`).
          dtype: the compute dtype (default: the layer's dtype or param dtype).
          grad: include the backward pass (gradients of the parameters).
          input_grad: with `grad`, the input gradient is needed too (it is when a
            parameterised layer precedes this one). With FSDP and
            `reshard_after_forward`, it is what makes the backward re-gather the
            kernel (dx needs W; dW and db do not).
        """
        dtype = dtype or self._compute_dtype() or self.param_dtype
        local = self._local_batch_shape(input_shape)
        out = self._declare_activations(local, dtype, grad, input_grad)
        return out + self._declare_params(grad, input_grad)

    def _declare_params(self, grad: bool, input_grad: bool) -> list[Declared]:
        """FSDP all-gathers / reduce-scatters (or batch all-reduces) of kernel and bias.

        The bias is never re-gathered: its value is not needed by the backward.
        """
        regather = self.reshard_after_forward and grad and input_grad
        out = self._declare_fsdp(self._kernel_local, self.split.fsdp_dim, grad=grad,
                                 regather=regather, why="W")  # fmt: skip
        if self.use_bias:
            out += self._declare_fsdp((self._kernel_local[1],), 0, grad=grad, regather=False,
                                      why="b", token_axes=self._bias_token_axes)  # fmt: skip
        return out

    def _setup_sequence_parallel(self, sequence_parallel: bool, conflict: str | None) -> None:
        """Store `sequence_parallel`; `conflict` names an option it cannot be combined with."""
        if sequence_parallel and conflict is not None:
            owner = type(self).__name__
            raise ValueError(
                f"{owner}(sequence_parallel=True, {conflict}): sequence parallelism keeps the "
                f"activation split over the sequence on mesh axis {self.axis_name!r} (size "
                f"{self.model_size}), which {conflict} cannot be combined with. Pass "
                f"sequence_parallel=False, or drop {conflict.split('=')[0]}."
            )
        self.sequence_parallel = bool(sequence_parallel)

    def _sequence_spec(self, ndim: int) -> P:
        """`P(batch, model, None, ...)`: a `[B, S, ...]` activation split over the sequence."""
        return P(self._batch_entry(), self._spec_axis(self.axis_name), *([None] * (ndim - 2)))

    def _check_sequence(self, inputs: jax.Array) -> None:
        """Under sequence parallelism: rank >= 3 and the sequence divisible by the model axis."""
        if not self.sequence_parallel:
            return
        owner, n = type(self).__name__, self.model_size
        if inputs.ndim < 3:
            raise ValueError(
                f"{owner}(sequence_parallel=True): inputs.shape={tuple(inputs.shape)} has rank "
                f"{inputs.ndim}; sequence parallelism needs [batch, sequence, ..., features] "
                f"(rank >= 3) to split dim 1 over mesh axis {self.axis_name!r} (size {n}). Add "
                f"a sequence dim, e.g. inputs[:, None], or pass sequence_parallel=False."
            )
        s = inputs.shape[1]
        if s % n:
            raise ValueError(
                f"{owner}(sequence_parallel=True): inputs.shape[1]={s} (the sequence) cannot "
                f"be sharded over mesh axis {self.axis_name!r} (size {n}): {n} does not divide "
                f"{s}. Use a sequence length divisible by {n}, or sequence_parallel=False."
            )

    @property
    def _model_token_axes(self) -> tuple[str, ...]:
        """The model axis when it splits the tokens (sequence parallelism), else ()."""
        return (self.axis_name,) if self.sequence_parallel else ()


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
      >>> col = ColumnParallelLinear(512, 2048, mesh=mesh, rngs=nnx.Rngs(0))
      >>> row = RowParallelLinear(2048, 512, mesh=mesh, rngs=nnx.Rngs(1))
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
