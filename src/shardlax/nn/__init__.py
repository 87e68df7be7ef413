"""Flax NNX layers whose every collective is written by hand in `shardlax.kernels`."""

from ._linear import ColumnParallelLinear as ColumnParallelLinear
from ._linear import RowParallelLinear as RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
]
