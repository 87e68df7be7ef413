"""FSDP (ZeRO-3) and FSDP + tensor parallelism; hybrid sharding on a (data, fsdp) mesh."""

from __future__ import annotations

from shardlax.placement import spec_axes
from shardlax.strategies._base import register
from shardlax.strategies.dp import DataParallel


def _split_over(trainer, axis: str) -> bool:
    return any(axis in spec_axes(p.spec) for p in trainer.placements)


@register
class FullyShard(DataParallel):
    """``fsdp``: parameters split over the fsdp axis by the model's own layers.

    The layers (`shardlax.nn` with `fsdp_axis`, or `shardlax.fully_shard`
    units) store 1/N of each parameter, all-gather it on use and
    reduce-scatter its gradient over `fsdp` (ZeRO-3); optimizer state is
    split like the parameters. On a `(data, fsdp)` mesh the 1/N gradient
    shards are then all-reduced over `data`: that is hybrid sharding
    (PyTorch's ``HYBRID_SHARD``, FSDP2's 2-D device mesh). Parameters the
    layers leave whole (an embedding outside every unit) are all-reduced over
    all batch axes, as under dp.
    """

    name = "fsdp"
    order = 3
    summary = "parameters, gradients and optimizer state split over fsdp by the layers"
    needs_axes = ("fsdp_axis",)
    layer_sharded = True

    def validate(self, trainer) -> None:
        for argument in self.needs_axes:
            axis = getattr(trainer, argument)
            size = trainer.mesh.shape[axis]
            if size > 1 and not _split_over(trainer, axis):
                fix = (
                    f"Wrap the model, or each block, with shardlax.fully_shard(block, mesh=mesh) "
                    f"(FSDP2's pattern), or build it from shardlax.nn layers on this mesh (they "
                    f"split their parameters over {axis!r}); or use strategy='zero2' to keep "
                    f"the parameters replicated and split only the optimizer state."
                    if argument == "fsdp_axis"
                    else "Build the model from shardlax.nn tensor-parallel layers, or apply "
                    "shardlax.parallelize(model, plan, mesh=mesh) to the model you have."
                )
                raise ValueError(
                    f"Trainer(strategy={self.name!r}, {argument}={axis!r}): no parameter of the "
                    f"model is split over mesh axis {axis!r} (size {size}), so {self.name} "
                    f"would replicate every parameter. {fix}"
                )


@register
class FullyShardTP(FullyShard):
    """``fsdp+tp``: FSDP over `fsdp` and tensor parallelism over `model`."""

    name = "fsdp+tp"
    order = 4
    summary = "fsdp, with tensor-parallel layers over the model axis"
    needs_axes = ("fsdp_axis", "tp_axis")
