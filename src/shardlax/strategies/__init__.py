"""Training strategies: one file each, all choices of one `shardlax.placement.Placement`.

| strategy  | parameters           | gradients over the replicated batch axes | optimizer state |
| --------- | -------------------- | ---------------------------------------- | --------------- |
| `dp`      | as the layers store  | all-reduced                              | like params     |
| `zero1`   | as the layers store  | all-reduced, then sliced to 1/N          | 1/N (flat)      |
| `zero2`   | as the layers store  | reduce-scattered to 1/N                  | 1/N (flat)      |
| `fsdp`    | split over fsdp      | over fsdp by the layers, then all-reduce | like params     |
| `fsdp+tp` | split over fsdp, model | as fsdp                                | like params     |

"As the layers store": tensor-parallel `shardlax.nn` layers (and
`shardlax.parallelize`d models) split their parameters over `model` under
every strategy, so ZeRO-2 + TP (Megatron's distributed optimizer) is
`Trainer(strategy="zero2")` on a `(data, model)` or `(data, fsdp, model)`
mesh.
"""

from shardlax.strategies import dp as _dp  # noqa: F401  (registers)
from shardlax.strategies import fsdp as _fsdp  # noqa: F401
from shardlax.strategies import zero1 as _zero1  # noqa: F401
from shardlax.strategies import zero2 as _zero2  # noqa: F401
from shardlax.strategies._base import Strategy as Strategy
from shardlax.strategies._base import get as get
from shardlax.strategies._base import names as names
from shardlax.strategies._base import register as register
from shardlax.strategies.dp import DataParallel as DataParallel
from shardlax.strategies.fsdp import FullyShard as FullyShard
from shardlax.strategies.fsdp import FullyShardTP as FullyShardTP
from shardlax.strategies.zero1 import ZeRO1 as ZeRO1
from shardlax.strategies.zero2 import ZeRO2 as ZeRO2

__all__ = [
    "DataParallel",
    "FullyShard",
    "FullyShardTP",
    "Strategy",
    "ZeRO1",
    "ZeRO2",
    "get",
    "names",
    "register",
]
