"""Per-device kernels of shardlax: the math that runs inside `jax.shard_map`.

Every collective of the project is called in this package. Each kernel's
docstring states its math, the shardings of its arguments and results, and
the collectives it runs forward and backward.
"""

from ._collectives import all_gather as all_gather
from ._collectives import all_reduce as all_reduce
from ._collectives import all_reduce_max as all_reduce_max
from ._collectives import all_to_all as all_to_all
from ._collectives import axis_index as axis_index
from ._collectives import axis_size as axis_size
from ._collectives import ensure_varying as ensure_varying
from ._collectives import ppermute as ppermute
from ._collectives import reduce_scatter as reduce_scatter
from ._collectives import ring_shift as ring_shift
from ._collectives import varying_axes as varying_axes
from ._linear import column_parallel_matmul as column_parallel_matmul
from ._linear import matmul_last as matmul_last
from ._linear import row_parallel_matmul as row_parallel_matmul

__all__ = [
    "all_gather",
    "all_reduce",
    "all_reduce_max",
    "all_to_all",
    "axis_index",
    "axis_size",
    "column_parallel_matmul",
    "ensure_varying",
    "matmul_last",
    "ppermute",
    "reduce_scatter",
    "ring_shift",
    "row_parallel_matmul",
    "varying_axes",
]
