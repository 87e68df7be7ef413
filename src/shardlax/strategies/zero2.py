"""ZeRO-2: optimizer state and gradients split over the data axes (Megatron's distributed
optimizer)."""

from __future__ import annotations

from shardlax import kernels
from shardlax.declarations import Declared, hlo_dtype
from shardlax.nn._fsdp_layer import gather_hlo_dtype
from shardlax.strategies._base import Strategy, register


@register
class ZeRO2(Strategy):
    """``zero2``: reduce-scatter each bucket, update this device's 1/N, all-gather.

    Composes with tensor parallelism: a `ColumnParallelLinear` kernel stored
    `P(None, 'model')` is flattened per device (its model shard) and that
    shard is reduce-scattered over the data axes, so each device keeps 1/(N*M)
    of the optimizer state. Per step and bucket: 1 reduce-scatter of the
    padded `[N, S_b]` bucket and 1 all-gather of the updated rows: the bytes
    of one all-reduce, with 1/N of the optimizer memory.

    References:
      Rajbhandari et al., "ZeRO", SC 2020 (arXiv:1910.02054), stage 2.
      Shoeybi et al., Megatron-LM; Megatron-Core's distributed optimizer.
    """

    name = "zero2"
    order = 2
    shard_state = True
    summary = "optimizer state and gradients 1/N, gradients reduce-scattered"

    def reduce(self, grads, axes):
        return kernels.reduce_scatter_bucket(list(grads), axes)

    def declare(self, bucket, axes, reduce_dtype, gather_dtype):
        padded = bucket.n * bucket.row
        return [
            Declared("reduce-scatter", axes, hlo_dtype(reduce_dtype), 1,
                     padded * reduce_dtype.itemsize, "gradient bucket"),
            Declared("all-gather", axes, gather_hlo_dtype(gather_dtype), 1,
                     padded * gather_dtype.itemsize, "parameter bucket"),
        ]  # fmt: skip
