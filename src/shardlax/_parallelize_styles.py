"""The styles of a `shardlax.parallelize` plan: `Colwise`, `Rowwise`, `VocabParallel`, `Replicate`.

Each is a frozen dataclass naming how one matched submodule is split; the
twins they become are built in `shardlax._parallelize_twins`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Colwise:
    """Split the output features (Linear) or kernel dim `dim` (Einsum, an output dim)."""

    parts: int = 1
    dim: int | None = None
    sequence_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class Rowwise:
    """Split the input features (Linear) or kernel dim `dim` (Einsum, a contracted dim)."""

    dim: int | None = None
    sequence_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class VocabParallel:
    """Split an `nnx.Embed` table over the vocabulary (its `attend` gives split logits)."""

    sequence_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class Replicate:
    """Keep the module as it is, its variables replicated on the mesh."""


STYLES = (Colwise, Rowwise, VocabParallel, Replicate)


__all__ = ["STYLES", "Colwise", "Replicate", "Rowwise", "VocabParallel"]
