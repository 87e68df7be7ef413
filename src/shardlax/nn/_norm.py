"""RMSNorm on activations laid out for tensor or sequence parallelism (drop-in for nnx.RMSNorm)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared
from shardlax.nn._base import AUTO, param_value, run_shard_map
from shardlax.nn._projection import metadata_param
from shardlax.nn._sequence import SequenceLayer


class RMSNorm(SequenceLayer):
    """`nnx.RMSNorm` over the last dim, its scale replicated.

    The normalised dim (features) is never split, so the forward pass needs
    no collective on any layout. With `sequence_parallel=True` it runs on the
    1/N of the tokens each device holds (Megatron-SP's point: norms and
    dropout stop being computed N times). The scale's gradient is summed over
    every axis the tokens are split over: the batch axes, plus the model axis
    under sequence parallelism (1 all-reduce of `[D]`).

    Same constructor as `nnx.RMSNorm` (flax 0.12.8: `reduction_axes`,
    `feature_axes`, `use_fast_variance`, `scale_metadata`,
    `nnx.with_partitioning` initializers) and the `mask=` call argument, with
    the same values for the same inputs, bit for bit. `use_fast_variance`
    changes nothing, as in flax (an RMS has no mean to subtract).
    `reduction_axes` / `feature_axes` must not name a dim the layer splits
    over the mesh (the batch dim 0 when the batch axes have size > 1; the
    sequence dim 1 under sequence parallelism): a clear error otherwise.
    `axis_name` here names the tensor-parallel mesh axis (default
    ``'model'``; flax's default `None` means the same); the statistics are
    per token, so flax's cross-device statistics (`axis_name` as a pmap axis,
    `axis_index_groups`) have nothing to reduce, and `axis_index_groups`
    other than None is refused.

    Args are those of `nnx.RMSNorm`, plus `mesh`, `batch_axes`,
    `sequence_parallel`, `fsdp_axis` and `reshard_after_forward` (FSDP of
    the scale, as the linears).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Any = initializers.ones,
        reduction_axes: int | Sequence[int] = -1,
        feature_axes: int | Sequence[int] = -1,
        axis_name: str | None = MODEL,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        mesh: Mesh | None = None,
        batch_axes: Sequence[str] | None = None,
        sequence_parallel: bool = False,
        fsdp_axis: str | None = AUTO,
        reshard_after_forward: bool = True,
    ):
        owner = type(self).__name__
        if axis_index_groups is not None:
            raise ValueError(
                f"{owner}(axis_index_groups={axis_index_groups!r}): groups of devices that "
                f"share statistics have nothing to group here: the statistics are per token, "
                f"computed on each device's own tokens (axis_name names the tensor-parallel "
                f"mesh axis). Pass axis_index_groups=None."
            )
        for name, axes in (("reduction_axes", reduction_axes), ("feature_axes", feature_axes)):
            ok = isinstance(axes, int) or (
                isinstance(axes, Sequence) and axes and all(isinstance(a, int) for a in axes)
            )
            if not ok or isinstance(axes, bool):
                raise TypeError(
                    f"{owner}({name}={axes!r}): expected an int or a non-empty sequence of "
                    f"ints (dims of the input, negative counting from the end). Pass "
                    f"{name}=-1 to normalise the last dim."
                )
        self._setup_mesh(mesh, MODEL if axis_name is None else axis_name, batch_axes)
        self._setup_fsdp(fsdp_axis, reshard_after_forward)
        self.scale_spec = self._fsdp_spec(P(None), (num_features,), 0, "num_features")
        self.scale: nnx.Param | None
        if use_scale:
            self.scale = metadata_param(
                scale_init, rngs.params(), (num_features,), param_dtype, self.mesh,
                self.scale_spec, scale_metadata,
            )  # fmt: skip
        else:
            self.scale = nnx.data(None)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.sequence_parallel = sequence_parallel

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`x` normalised over `reduction_axes` (as nnx.RMSNorm's).

        `mask` (bool, broadcastable to x): only its True entries enter the
        statistics, as `nnx.RMSNorm(...)(x, mask=mask)`.
        """
        with jax.named_scope(type(self).__name__):
            self._check_norm_input(x, mask)
            spec = self.hidden_spec(x.ndim)
            x = self._place(x, spec)
            if mask is not None:
                mask = self._place(jnp.broadcast_to(mask, x.shape), spec)

            def body(x, scale, mask):
                def fn(params, args):
                    x, mask = args
                    x, scale = self.promote_dtype((x, params[0]), dtype=self.dtype)
                    return kernels.rms_norm(
                        x, scale, epsilon=self.epsilon, dtype=self.dtype,
                        reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
                        mask=mask,
                    )  # fmt: skip

                return self._apply(fn, self._entries(), (scale,), (x, mask))

            values = (x, param_value(self.scale), mask)
            return run_shard_map(body, self.mesh, values, (spec, self.scale_spec, spec), spec)

    def _check_norm_input(self, x: Any, mask: Any) -> None:
        """x an array whose split dims are neither reduced nor features; mask broadcastable."""
        owner = type(self).__name__
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(
                f"{owner}: inputs must be an array, got {type(x).__name__}. Pass a jax.Array "
                f"of shape [..., {self.num_features}]."
            )
        g = self._global_view(x)
        shape, ndim = tuple(g.shape), g.ndim
        red, feat = (
            _axes(owner, name, axes, ndim, shape)
            for name, axes in (
                ("reduction_axes", self.reduction_axes), ("feature_axes", self.feature_axes)
            )
        )  # fmt: skip
        features = 1
        for a in feat:
            features *= shape[a]
        if feat == (ndim - 1,):
            self._check_inputs(x, self.num_features, "num_features")
        elif self.use_scale and features != self.num_features:
            raise ValueError(
                f"{owner}(num_features={self.num_features}, feature_axes="
                f"{self.feature_axes!r}): inputs.shape={shape} has {features} features on "
                f"those dims, expected {self.num_features}. Pass inputs whose feature dims "
                f"hold {self.num_features} values, or build the layer with "
                f"num_features={features}."
            )
        n = self.batch_size_divisor
        split = {}
        if n > 1:
            if ndim < 2:
                raise ValueError(
                    f"{owner}: inputs.shape={shape} has no batch dim to split over mesh axes "
                    f"{self.batch_axes} (size {n}). Pass a batch (e.g. x[None]), or use a mesh "
                    f"whose batch axes have size 1."
                )
            if shape[0] % n:
                raise ValueError(
                    f"{owner}: inputs.shape[0]={shape[0]} (the batch) cannot be sharded over "
                    f"mesh axes {self.batch_axes} (size {n}): {n} does not divide {shape[0]}. "
                    f"Use a batch size divisible by {n}."
                )
            split[0] = (f"mesh axes {self.batch_axes}", n, "a mesh whose batch axes have size 1")
        if self.sequence_parallel:
            self._check_hidden(x, None, "inputs")
            split[1] = (f"mesh axis {self.axis_name!r}", self.model_size, "sequence_parallel=False")
        for name, axes, dims in (
            ("reduction_axes", self.reduction_axes, red), ("feature_axes", self.feature_axes, feat)
        ):  # fmt: skip
            for d in dims:
                if d in split:
                    where, size, other = split[d]
                    raise ValueError(
                        f"{owner}({name}={axes!r}): dim {d} of inputs.shape={shape} is split "
                        f"over {where} (size {size}); statistics or a scale along it would need "
                        f"a collective this layer does not run. Normalise over unsplit dims "
                        f"(e.g. {name}=-1), or use {other}."
                    )
        if mask is not None:
            mshape = tuple(getattr(mask, "shape", ()))
            try:
                ok = jnp.broadcast_shapes(mshape, shape) == shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{owner}: mask.shape={mshape} does not broadcast to inputs.shape={shape}. "
                    f"Pass a bool mask of shape {shape}, or one that broadcasts to it."
                )

    def _entries(self) -> list[tuple]:
        # the scale's gradient is summed over every token axis. The backward reads
        # `rsqrt(var + eps) * scale`, saved from the forward, never the scale itself
        # (so FSDP does not re-gather it).
        return [(self, "scale", 0, True, "never")]

    def declared_collectives(
        self, input_shape: Sequence[int], *, grad: bool = False, input_grad: bool = True
    ) -> list[Declared]:
        """Forward none; with `grad`, the scale gradient's all-reduce over the token axes."""
        if not self.use_scale:
            return []
        return self._declare_entries(grad, input_grad, "norm")


def _axes(owner: str, name: str, axes: Any, ndim: int, shape: tuple) -> tuple[int, ...]:
    """`axes` canonicalised for a rank-`ndim` input, or a ValueError naming the argument."""
    dims = (axes,) if isinstance(axes, int) else tuple(axes)
    bad = [a for a in dims if not -ndim <= a < ndim]
    if bad:
        raise ValueError(
            f"{owner}({name}={axes!r}): dim {bad[0]} is out of range for inputs.shape={shape} "
            f"(rank {ndim}). Pass dims in [-{ndim}, {ndim})."
        )
    return tuple(sorted({a + ndim if a < 0 else a for a in dims}))
