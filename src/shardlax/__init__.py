"""shardlax: explicit distributed training for Flax NNX.

Every collective is written by hand in `shardlax.kernels`, declared by the
layer that runs it, checked against the compiled HLO (`shardlax.audit`), and
tested against single-device math.
"""

from shardlax import audit as audit
from shardlax import budget as budget
from shardlax import checkpoint as checkpoint
from shardlax import fsdp as fsdp
from shardlax import kernels as kernels
from shardlax import nn as nn
from shardlax import precision as precision
from shardlax import strategies as strategies
from shardlax import train as train
from shardlax import zero as zero
from shardlax._axes import AXES as AXES
from shardlax._axes import BATCH_AXES as BATCH_AXES
from shardlax._axes import DATA as DATA
from shardlax._axes import FSDP as FSDP
from shardlax._axes import MODEL as MODEL
from shardlax.fsdp import fully_shard as fully_shard
from shardlax.fsdp import register_fsdp_forward_method as register_fsdp_forward_method
from shardlax.mesh import make_mesh as make_mesh
from shardlax.parallelize import Colwise as Colwise
from shardlax.parallelize import Replicate as Replicate
from shardlax.parallelize import Rowwise as Rowwise
from shardlax.parallelize import VocabParallel as VocabParallel
from shardlax.parallelize import parallelize as parallelize
from shardlax.precision import MixedPrecision as MixedPrecision
from shardlax.train import Trainer as Trainer
from shardlax.train import TrainState as TrainState
from shardlax.train import make_train_step as make_train_step

__version__ = "0.1.0"

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DATA",
    "FSDP",
    "MODEL",
    "Colwise",
    "MixedPrecision",
    "Replicate",
    "Rowwise",
    "TrainState",
    "Trainer",
    "VocabParallel",
    "audit",
    "checkpoint",
    "fsdp",
    "fully_shard",
    "kernels",
    "make_mesh",
    "make_train_step",
    "nn",
    "parallelize",
    "precision",
    "register_fsdp_forward_method",
    "strategies",
    "train",
    "zero",
]
