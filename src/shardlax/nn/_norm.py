"""RMSNorm on activations laid out for tensor or sequence parallelism (drop-in for nnx.RMSNorm)."""

from __future__ import annotations

from collections.abc import Sequence
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
from shardlax.nn._base import AUTO, param_value, run_shard_map, sharded_param
from shardlax.nn._sequence import SequenceLayer


class RMSNorm(SequenceLayer):
    """`nnx.RMSNorm` over the last dim, its scale replicated.

    The normalised dim (features) is never split, so the forward pass needs
    no collective on any layout. With `sequence_parallel=True` it runs on the
    1/N of the tokens each device holds (Megatron-SP's point: norms and
    dropout stop being computed N times). The scale's gradient is summed over
    every axis the tokens are split over: the batch axes, plus the model axis
    under sequence parallelism (1 all-reduce of `[D]`).

    Same constructor (minus the cross-device `axis_name` statistics, which
    a per-token norm does not need) and same initial scale as
    `nnx.RMSNorm(num_features, epsilon=1e-6, ...)`.

    Args are those of `nnx.RMSNorm` (normalising the last dim), plus
    `mesh`, `axis_name` (the model axis), `batch_axes`, `sequence_parallel`,
    `fsdp_axis` and `reshard_after_forward` (FSDP of the scale, as the linears).
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
        self._setup_fsdp(fsdp_axis, reshard_after_forward)
        self.scale_spec = self._fsdp_spec(P(None), (num_features,), 0, "num_features")
        self.scale: nnx.Param | None
        if use_scale:
            self.scale = sharded_param(
                scale_init, rngs.params(), (num_features,), param_dtype, self.mesh, self.scale_spec
            )
        else:
            self.scale = nnx.data(None)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.promote_dtype = promote_dtype
        self.sequence_parallel = sequence_parallel

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            self._check_hidden(x, self.num_features, "num_features")
            spec = self.hidden_spec(x.ndim)
            x = self._place(x, spec)

            def body(x, scale):
                def fn(params, x):
                    x, scale = self.promote_dtype((x, params[0]), dtype=self.dtype)
                    return kernels.rms_norm(x, scale, epsilon=self.epsilon, dtype=self.dtype)

                return self._apply(fn, self._entries(), (scale,), x)

            values = (x, param_value(self.scale))
            return run_shard_map(body, self.mesh, values, (spec, self.scale_spec), spec)

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
