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
                units = getattr(trainer, "_fsdp_units", 0)
                if argument == "fsdp_axis" and units:
                    good = sorted(
                        {
                            n
                            for p in trainer.placements
                            for d in p.shape
                            for n in (2, 4, 8, 16)
                            if d % n == 0
                        }
                    )[:3]
                    shapes = sorted(
                        {tuple(p.shape) for p in trainer.placements if p.shape}, key=len
                    )[:4]
                    raise ValueError(
                        f"Trainer(strategy={self.name!r}, fsdp_axis={axis!r}): the model has "
                        f"{units} fully_shard unit(s), but mesh axis {axis!r} (size "
                        f"{size}) divides no dim of any parameter (shapes such as {shapes}), "
                        f"so every one was kept whole and fsdp would shard nothing. Use an "
                        f"fsdp size that divides the parameters' dims (e.g. {good}), or "
                        f"strategy='zero2' to split the optimizer state over any size."
                    )
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
