"""ZeRO-1: optimizer state split over the data axes; gradients all-reduced, then sliced."""

from __future__ import annotations

from shardlax import kernels
from shardlax.declarations import Declared, hlo_dtype
from shardlax.nn._fsdp_layer import gather_hlo_dtype
from shardlax.strategies._base import Strategy, register


@register
class ZeRO1(Strategy):
    """``zero1``: all-reduce each bucket, keep this device's 1/N, update it, all-gather.

    Per step and bucket: 1 all-reduce of the padded `[N, S_b]` bucket and 1
    all-gather of the updated `[1, S_b]` rows. Optimizer state per device:
    1/N of every parameter replicated over the data axes.

    References:
      Rajbhandari et al., "ZeRO", SC 2020 (arXiv:1910.02054), stage 1.
    """

    name = "zero1"
    order = 1
    shard_state = True
    summary = "optimizer state 1/N, gradients all-reduced then sliced"

    def reduce(self, grads, axes):
        return kernels.all_reduce_then_shard_bucket(list(grads), axes)

    def declare(self, bucket, axes, reduce_dtype, gather_dtype):
        padded = bucket.n * bucket.row
        return [
            Declared("all-reduce", axes, hlo_dtype(reduce_dtype), 1,
                     padded * reduce_dtype.itemsize, "gradient bucket"),
            Declared("all-gather", axes, gather_hlo_dtype(gather_dtype), 1,
                     padded * gather_dtype.itemsize, "parameter bucket"),
        ]  # fmt: skip
