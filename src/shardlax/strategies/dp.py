"""Data parallelism (DDP): replicated parameters and state, gradients all-reduced."""

from __future__ import annotations

from shardlax import kernels
from shardlax.declarations import Declared, hlo_dtype
from shardlax.strategies._base import Strategy, register


@register
class DataParallel(Strategy):
    """``dp``: each bucket of partial gradients is all-reduced over its replicated axes.

    Parameters the model splits itself (tensor-parallel layers over `model`,
    `fully_shard` / fsdp layers over `fsdp`) stay split; only the batch axes
    they are replicated over are all-reduced. Optimizer state follows the
    parameters. Collectives per step and bucket: 1 all-reduce of the
    bucket's bytes (no padding).
    """

    name = "dp"
    order = 0
    shard_state = False
    summary = "replicated parameters and optimizer state, gradients all-reduced"

    def reduce(self, grads, axes):
        return kernels.all_reduce_bucket(list(grads), axes)

    def declare(self, bucket, axes, reduce_dtype, gather_dtype):
        nbytes = bucket.numel * reduce_dtype.itemsize
        return [Declared("all-reduce", axes, hlo_dtype(reduce_dtype), 1, nbytes,
                         "gradient bucket")]  # fmt: skip
