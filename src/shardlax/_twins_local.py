"""The model's own code between tensor-parallel twins, run per device and checked.

Inside a `shard_map` over the whole mesh (the Trainer's step) every twin
`shardlax.parallelize` made returns its local shard. `call_local` runs the
model's loss there and turns the two ways model code trips over local sizes
(a reshape with a global head count; a loss reduced over a split dim) into
errors naming the twins and the fix; `planned_twins` lists the twins the
Trainer's first-step check compares against global arrays.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.mesh import is_manual
from shardlax.nn._column import ColumnParallelLinear
from shardlax.nn._einsum import ParallelEinsum
from shardlax.nn._embed import ParallelEmbed
from shardlax.nn._row import RowParallelLinear

#: the twins `parallelize` builds
_PARALLEL = (ColumnParallelLinear, RowParallelLinear, ParallelEinsum, ParallelEmbed)


def call_local(
    fn: Callable[..., Any], model: nnx.Module, *args: Any, axis_name: str = MODEL, **kwargs: Any
) -> Any:
    """`fn(model, *args, **kwargs)` where the twins run as per-device code, checked.

    Inside a `shard_map` over the whole mesh (the Trainer's step) every twin
    returns its local shard: a dim it splits has its local size there. This
    runs `fn` (a `loss_fn`) unchanged and turns the two ways model code can
    trip over that into errors naming the twin, its local and global sizes,
    the mesh axis and the fix:

    - `fn` raises a TypeError / ValueError outside shardlax (a reshape with a
      global head count): re-raised with the same type, naming the twins whose
      local output matches the failing shape (every split twin if none does).
    - a scalar `fn` returns (the loss) varies over `axis_name`: it was computed
      over a split dim (softmax over vocabulary-split logits) without the
      reduction a twin runs; one device computes one value.

    Outside manual mode, or for a model without split twins, it is `fn(...)`.

    Args:
      fn: called as `fn(model, *args, **kwargs)`.
      model: the (parallelized) model; its twins over `axis_name` are checked.
      axis_name: the tensor-parallel mesh axis.

    Raises:
      TypeError, ValueError: as described above.
    """
    twins = [t for t in _split_twins(model, axis_name) if is_manual(t[1].mesh)]
    if not twins:
        return fn(model, *args, **kwargs)
    try:
        out = fn(model, *args, **kwargs)
    except (TypeError, ValueError) as e:
        if _raised_by_shardlax(e):
            raise
        msg = _local_failure(e, twins, axis_name)
        if type(e) in (TypeError, ValueError):
            raise type(e)(msg) from e
        e.add_note(msg)
        raise
    for leaf in jax.tree.leaves(out):
        if getattr(leaf, "shape", None) == () and axis_name in kernels.varying_axes(leaf):
            raise ValueError(_loss_varies(twins, axis_name))
    return out


def planned_twins(model: nnx.Module, axis: str) -> list[str]:
    """Paths of the twins `parallelize` put in `model` whose output is split over `axis`."""
    return [t[0] for t in _split_twins(model, axis) if getattr(t[1], "from_plan", False)]


def _split_twins(model: nnx.Module, axis: str) -> list[tuple[str, Any, str, int, int]]:
    """(path, twin, what, global size, local size) of every twin whose output is split."""
    out = []
    for path, m in nnx.iter_modules(model):
        if not isinstance(m, _PARALLEL) or m.axis_name != axis or m.model_size < 2:
            continue
        n, name = m.model_size, _dotted(path) or type(model).__name__
        if isinstance(m, ColumnParallelLinear) and not m.gather_output:
            size = m.out_features // m.parts
            each = f" (each of its {m.parts} parts)" if m.parts > 1 else ""
            out.append((name, m, f"ColumnParallelLinear output{each} [..., F]", size, size // n))
        elif isinstance(m, ParallelEinsum) and m.column:
            size = m.kernel_shape[m.shard_dim]
            what = f"ParallelEinsum {m.einsum_str!r} output, dim {m.split_letter!r}"
            out.append((name, m, what, size, size // n))
        elif isinstance(m, ParallelEmbed):
            size = m.num_embeddings
            out.append((name, m, "ParallelEmbed.attend logits [..., V]", size, size // n))
    # embedders first: their vocabulary-split logits are what a loss reduces over
    return sorted(out, key=lambda t: not isinstance(t[1], ParallelEmbed))


def _describe(twins: list, axis: str) -> str:
    """The twins grouped by what they return: 'a', 'b' (what) is k per device, the global ..."""
    groups: dict[tuple, list[str]] = {}
    for name, m, what, size, local in twins:
        groups.setdefault((what, size, local, m.model_size), []).append(repr(name))
    parts = []
    for (what, size, local, n), names in list(groups.items())[:3]:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        verb = "is" if len(names) == 1 else "are"
        parts.append(
            f"{shown} ({what}) {verb} {local} per device, the global {size} split over mesh "
            f"axis {axis!r} (size {n})"
        )
    return "; ".join(parts)


def _local_failure(error: Exception, twins: list, axis: str) -> str:
    shape = re.search(r"shape \(([\d, ]+)\)", str(error))
    last = int(shape.group(1).split(",")[-1] or -1) if shape and shape.group(1).strip() else None
    hits = [t for t in twins if t[4] == last] or twins
    named = _describe(hits, axis)
    return (
        f"the model code raised {type(error).__name__} on a per-device array: inside a "
        f"shard_map over the whole mesh (the Trainer's step) tensor-parallel layers return "
        f"their local shard: {named}. Code that reads the global size of a split dim fails "
        f"there. Take sizes from the arrays instead (x.reshape(b, t, -1, head_dim), not "
        f"x.reshape(b, t, num_heads, head_dim)). The error was: {error}"
    )


def _loss_varies(twins: list, axis: str) -> str:
    named = _describe(twins, axis)
    return (
        f"the loss varies over mesh axis {axis!r} (size {twins[0][1].model_size}): the model "
        f"reduced over a dim a tensor-parallel layer splits, on each device's shard only "
        f"(e.g. a softmax cross-entropy over vocabulary-split logits), where one device "
        f"computes one value. Split outputs: {named}. Fix: keep that layer whole "
        f"(Replicate() it, or drop it from the plan), or reduce over the split dim with a "
        f"collective (a vocabulary-parallel cross-entropy)."
    )


def _raised_by_shardlax(error: Exception) -> bool:
    """The innermost frame outside jax / flax / numpy belongs to shardlax (its own errors)."""
    import os

    import flax
    import numpy

    import shardlax

    ours = (os.path.dirname(shardlax.__file__), os.path.dirname(kernels.__file__))
    theirs = tuple(os.path.dirname(m.__file__) for m in (jax, flax, numpy))
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith(theirs):
            continue
        return frame.filename.startswith(ours)
    return False


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)
