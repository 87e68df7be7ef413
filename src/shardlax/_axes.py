"""Mesh axis roles: the one place their names are defined.

data:  pure data parallelism. Parameters replicated, batch split.
fsdp:  data parallelism whose parameters (and optimizer state) are split too
       (ZeRO-3 / FSDP): the batch is split over it as well.
model: tensor (Megatron) parallelism: weight matrices split by features.
"""

DATA = "data"
FSDP = "fsdp"
MODEL = "model"

#: The axes of `shardlax.make_mesh`, in mesh order (slowest varying first).
AXES = (DATA, FSDP, MODEL)
#: The axes a batch is split over, by default.
BATCH_AXES = (DATA, FSDP)
