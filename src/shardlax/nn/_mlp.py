"""The Megatron MLP (column -> activation -> row) as one shard_map."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from jax import lax
from jax.sharding import Mesh

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared, Role
from shardlax.kernels._mlp import ACTIVATIONS
from shardlax.nn._base import AUTO, nbytes
from shardlax.nn._column import ColumnParallelLinear
from shardlax.nn._row import RowParallelLinear
from shardlax.nn._sequence import SequenceLayer


class ParallelMLP(SequenceLayer):
    """`down(act(up(x)))` or SwiGLU `down(silu(gate(x)) * up(x))`, tensor-parallel.

    `up` (and `gate`) are `ColumnParallelLinear(in_features, hidden_features)`,
    `down` is `RowParallelLinear(hidden_features, out_features)`; they hold the
    parameters (same values as `nnx.Linear`s built in the order up, gate,
    down from the same `rngs`) and the whole MLP runs as one shard_map.

    Collectives over the model axis (N), forward / backward:
      TP: 1 all-reduce of y / 1 all-reduce of dx.
      SP (`sequence_parallel=True`, x and y `[B, S/N, D]`): 1 all-gather of x
      and 1 reduce-scatter of y / 1 all-gather of dy and 1 reduce-scatter of dx.
    Weight gradients: 1 all-reduce per parameter over the batch axes.

    Args:
      in_features, hidden_features: model and hidden widths (N divides hidden).
      out_features: default `in_features`.
      activation: ``'gelu'`` (tanh approximation, `nnx.gelu`), ``'relu'``,
        ``'silu'`` or ``'swiglu'`` (adds a `gate` projection).
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
        dot_general, promote_dtype, rngs: as `nnx.Linear`.
      mesh, axis_name, batch_axes: as `ColumnParallelLinear`.
      sequence_parallel: activations split over the sequence (Megatron-SP).
      fsdp_axis, reshard_after_forward: FSDP of the parameters, as
        `ColumnParallelLinear` (default: on when the mesh has a 'fsdp' axis).

    References:
      Shoeybi et al., 2019 (arXiv:1909.08053); Korthikanti et al., 2022
      (arXiv:2205.05198); Shazeer, 2020 (arXiv:2002.05202).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        *,
        activation: str = "gelu",
        use_bias: bool = True,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_bias_init,
        dot_general: Any = lax.dot_general,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
        sequence_parallel: bool = False,
        fsdp_axis: str | None = AUTO,
        reshard_after_forward: bool = True,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"ParallelMLP(activation={activation!r}): expected one of {ACTIVATIONS}."
            )
        out_features = in_features if out_features is None else out_features
        common = dict(
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
            kernel_init=kernel_init, bias_init=bias_init, dot_general=dot_general,
            promote_dtype=promote_dtype, rngs=rngs, mesh=self.mesh, axis_name=axis_name,
            batch_axes=self.batch_axes, fsdp_axis=fsdp_axis,
            reshard_after_forward=reshard_after_forward,
        )  # fmt: skip
        self.up = ColumnParallelLinear(in_features, hidden_features, **common)
        self.gate = (
            ColumnParallelLinear(in_features, hidden_features, **common)
            if activation == "swiglu"
            else nnx.data(None)
        )
        self.down = RowParallelLinear(hidden_features, out_features, **common)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.activation = activation
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.sequence_parallel = sequence_parallel

    def _entries(self) -> list[tuple]:
        """Parameters in `kernels.parallel_mlp` order (see `SequenceLayer._entries`)."""
        up, down, gate = self.up, self.down, self.gate
        out = [(up, "kernel", 0, False, "input"), (down, "kernel", 1, False, "always"),
               (up, "bias", 0, False, "never"), (down, "bias", 0, True, "never")]  # fmt: skip
        if gate is not None:
            out += [(gate, "kernel", 0, False, "input"), (gate, "bias", 0, False, "never")]
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            self._check_hidden(x, self.in_features, "in_features")
            spec = self.hidden_spec(x.ndim)
            x = self._place(x, spec)

            mlp = functools.partial(
                kernels.parallel_mlp, activation=self.activation, axis_name=self.axis_name,
                sequence_parallel=self.sequence_parallel, precision=self.precision,
                dot_general=self.dot_general,
            )  # fmt: skip
            return self._run_fused(x, spec, mlp, self.up._compute_dtype())

    def declared_collectives(
        self, input_shape: Sequence[int], *, dtype: Any = None, grad: bool = False,
        input_grad: bool = True,
    ) -> list[Declared]:  # fmt: skip
        """Collectives of one call on a global input `[B, S, in_features]`."""
        dtype = dtype or self.up._compute_dtype() or self.param_dtype
        out = _activation_collectives(
            self, input_shape, self.in_features, self.out_features, dtype, grad, input_grad, "mlp"
        )
        return out + self._declare_entries(grad, input_grad, "mlp")


def _activation_collectives(
    layer: SequenceLayer, input_shape, in_features, out_features, dtype, grad, input_grad, name
) -> list[Declared]:
    """Entry/exit collectives of a column -> row block over the model axis."""
    local = layer._local_batch_shape(input_shape)
    full_in = (*local[:-1], in_features)
    full_out = (*local[:-1], out_features)
    m = (layer.axis_name,)
    out: list[Declared] = []
    if layer.sequence_parallel:
        out += layer._declare("all-gather", m, dtype, nbytes(full_in, dtype), f"{name}: gather x")
        out += layer._declare("reduce-scatter", m, dtype, nbytes(full_out, dtype),
                              f"{name}: scatter y", role=Role.ACTIVATION, module=name,
                              tag="y")  # fmt: skip
    else:
        out += layer._declare("all-reduce", m, dtype, nbytes(full_out, dtype), f"{name}: sum y",
                              role=Role.ACTIVATION, module=name, tag="y")  # fmt: skip
    if grad:
        if layer.sequence_parallel:
            out += layer._declare("all-gather", m, dtype, nbytes(full_out, dtype), f"{name}: dy")
            if input_grad:
                out += layer._declare("reduce-scatter", m, dtype, nbytes(full_in, dtype),
                                      f"{name}: dx")  # fmt: skip
        elif input_grad:
            out += layer._declare("all-reduce", m, dtype, nbytes(full_in, dtype), f"{name}: dx")
    return out
