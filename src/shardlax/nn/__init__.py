"""Flax NNX layers whose every collective is written by hand in `shardlax.kernels`."""

from ._attention import ParallelAttention as ParallelAttention
from ._column import ColumnParallelLinear as ColumnParallelLinear
from ._dropout import Dropout as Dropout
from ._einsum import ParallelEinsum as ParallelEinsum
from ._embed import ParallelEmbed as ParallelEmbed
from ._loss import vocab_parallel_cross_entropy as vocab_parallel_cross_entropy
from ._mlp import ParallelMLP as ParallelMLP
from ._norm import RMSNorm as RMSNorm
from ._placing import place_params as place_params
from ._row import RowParallelLinear as RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "Dropout",
    "ParallelAttention",
    "ParallelEinsum",
    "ParallelEmbed",
    "ParallelMLP",
    "RMSNorm",
    "RowParallelLinear",
    "place_params",
    "vocab_parallel_cross_entropy",
]
