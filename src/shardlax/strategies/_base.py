"""What a training strategy is: a choice of `Placement`s and one gradient reduction.

Every strategy runs the same step (`shardlax._train_steps`): one `shard_map`
over the whole mesh; the model computes on its batch shard (shardlax layers
and `fully_shard` units run their per-device code there, gathering what is
split over fsdp and running their tensor-parallel collectives over `model`);
each parameter's partial gradient is then summed over the batch axes it is
replicated over (`Placement.replicated`), one collective per bucket, as the
strategy says; optax runs on the result; ZeRO all-gathers the updated shards.

A strategy therefore only states:
  - `shard_state`: whether optimizer state is split over the replicated batch
    axes (ZeRO-1/2) or laid out like the parameters (dp, FSDP);
  - `reduce(grads, axes)`: the collective that sums partial gradients;
  - `validate(trainer)`: what it needs of the model and the mesh;
  - `declare(...)`: the collectives of that reduction.
Adding a strategy is one file with one subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax

from shardlax.declarations import Declared


class Strategy:
    """Base class of the training strategies (see the module docstring)."""

    #: The name `Trainer(strategy=...)` accepts.
    name: ClassVar[str] = ""
    #: Optimizer state split over the replicated batch axes (ZeRO-1/2).
    shard_state: ClassVar[bool] = False
    #: One line for tables and errors.
    summary: ClassVar[str] = ""
    #: Position in `names()` (the order of the table in the package docstring).
    order: ClassVar[int] = 100
    #: The Trainer arguments naming mesh axes this strategy needs (checked to exist).
    needs_axes: ClassVar[tuple[str, ...]] = ()
    #: Parameters are split by the model's own layers (FSDP), not only by the optimizer.
    layer_sharded: ClassVar[bool] = False

    def validate(self, trainer: Any) -> None:
        """Raise a clear error when the model or mesh does not fit this strategy."""

    def reduce(self, grads: Sequence[jax.Array], axes: tuple[str, ...]) -> list[jax.Array]:
        """Sum the per-device partial gradients of one bucket over `axes`.

        Returns the full local gradients (`shard_state=False`) or this
        device's flat `[S_p]` shards (`shard_state=True`).
        """
        raise NotImplementedError

    def declare(self, bucket: Any, axes: tuple[str, ...], reduce_dtype: Any,
                gather_dtype: Any) -> list[Declared]:  # fmt: skip
        """The collectives of one bucket: its reduction (and the ZeRO re-gather)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make `cls` available as `Trainer(strategy=cls.name)`."""
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered strategy names, in table order."""
    return tuple(sorted(_REGISTRY, key=lambda k: (_REGISTRY[k].order, k)))


def get(strategy: str | Strategy, owner: str) -> Strategy:
    """The strategy object for a name (or the object itself)."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy in _REGISTRY:
        return _REGISTRY[strategy]()
    raise ValueError(
        f"{owner}(strategy={strategy!r}): unknown strategy. Choose one of {names()}, "
        f"e.g. strategy='zero2', or pass a shardlax.strategies.Strategy."
    )
