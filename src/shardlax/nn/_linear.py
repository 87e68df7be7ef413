"""Megatron tensor-parallel linears as drop-in Flax NNX modules.

One layer, `ParallelLinear`, with the column / row difference as data: a
`Split` says which kernel dim the model axis splits (and so which one FSDP
splits, whether the bias is split, which size the axis must divide).
`ColumnParallelLinear` (`_column.py`) and `RowParallelLinear` (`_row.py`) are
its two splits, each with nnx.Linear's constructor and its own options
(`gather_output`, `parts`, `shared_input`; `input_is_parallel`) and the
collectives only that split has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax.declarations import Declared
from shardlax.mesh import is_manual
from shardlax.nn._base import ShardedLayer, param_value
from shardlax.nn._projection import Parts, _identity, metadata_param
from shardlax.placement import storage_spec


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
        if self.split.model_dim == 1:  # column: the input is this device's sequence shard
            check_sequence_shard(owner, inputs, self.mesh, self.axis_name)
        s = inputs.shape[1]
        if is_manual(self.mesh):
            return
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


def check_sequence_shard(owner: str, inputs: Any, mesh: Any, axis: str) -> None:
    """Inside a shard_map over the whole mesh (the Trainer's step), a sequence-parallel
    input must be this device's shard of the sequence: varying over the model axis.

    An input replicated over it is the whole sequence on every device, which the
    all-gather would repeat N times (wrong shapes, silently)."""
    if not is_manual(mesh) or mesh.shape[axis] == 1:
        return
    if axis not in kernels.varying_axes(inputs):
        raise ValueError(
            f"{owner}(sequence_parallel=True): inside a shard_map over the whole mesh (the "
            f"Trainer's step) its input is this device's shard of the sequence, but "
            f"inputs.shape={tuple(inputs.shape)} is replicated over mesh axis {axis!r} (size "
            f"{mesh.shape[axis]}): the whole sequence on every device. Feed it a "
            f"sequence-split activation (a sequence-parallel embedding's or row layer's "
            f"output), or pass sequence_parallel=False."
        )
