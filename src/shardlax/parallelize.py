"""Tensor-parallel plans for a model the user already has (`shardlax.parallelize`).

A plan maps glob patterns over the nnx path of a submodule (``'layers.*.attn.q_proj'``,
``*`` matches one level) to a style. `parallelize` swaps every matched
`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum` and `nnx.Embed` for its shardlax twin in place,
keeping every value, every global parameter shape and so the checkpoint
layout, and places every other variable replicated on the mesh. The model's
own `__call__` runs unchanged.

Styles:
  `Colwise(parts=1, dim=None)`: output features split (`ColumnParallelLinear`,
    or `ParallelEinsum` split on kernel dim `dim`). Column layers that read the
    same activation (q, k, v; gate, up) all-reduce their input gradient once.
    `parts=k` (nnx.Linear only): the kernel fuses k projections (`[k | v]`);
    the twin returns the k parts already split, each over the model axis (the
    model unpacks them, `k, v = self.kv_proj(x)`, instead of `jnp.split`).
  `Rowwise(dim=None)`: input features split, 1 all-reduce of the output.
  `VocabParallel()`: `nnx.Embed` split over the vocabulary, `attend` included.
  `Replicate()`: the module's variables replicated on the mesh (norms, ...).
  `sequence_parallel=True` on Colwise / Rowwise / VocabParallel: Megatron-SP
  (activations between them split over the sequence).

Execution: call the parallelized model at top level under `jax.jit` on global
arrays: each twin runs its own `shard_map` and GSPMD only joins them (the
reshapes and attention math of the model's own code). Inside a shard_map over
the whole mesh (the Trainer's step) the twins run as per-device code; the
model's code then sees local sizes on split dims (heads / mesh size). Code
that works per head or per element (activations, RoPE, attention over the
local heads, `reshape(b, t, -1, head_dim)`) is correct there; code that reads
a global size of a split dim (`reshape(b, t, num_heads, head_dim)`) fails, and
`call_local` turns that failure into an error naming the twin; a loss computed
over a split dim (softmax over vocabulary-split logits) varies over the model
axis, which `call_local` refuses, naming the twin. What no check can see (a
`jnp.split` of a `Colwise(parts=1)` output, a norm over the hidden features
between a column and a row twin) is wrong on local shards: fuse with
`Colwise(parts=k)`, and keep such code out of the span between twins.

FSDP + TP (`strategy='fsdp+tp'`), two ways: parallelize first, then wrap
each block with `fully_shard` (torchtitan's order): the unit stores the twins'
parameters split over fsdp too (`P('fsdp', 'model')`), gathers their
model-local shards over fsdp, and runs the twins as per-device code in its
`shard_map`, with every other parameter of the block (norms) sharded as
usual. Or `parallelize(..., fsdp_axis='fsdp')` builds the linear and
embedding twins with their parameters split over the fsdp axis themselves
(gathered per use inside the twin). Applying a plan inside an existing unit
(the other order) is refused: the unit has already laid out the parameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax._axes import MODEL
from shardlax._parallelize_styles import STYLES, Colwise, Replicate, Rowwise, VocabParallel
from shardlax._parallelize_twins import _twin
from shardlax._parallelize_twins import dtypes_zero_init as dtypes_zero_init
from shardlax._twins_local import _dotted, call_local
from shardlax.mesh import resolve_mesh


def parallelize(
    model: nnx.Module,
    plan: Mapping[str, Any],
    *,
    mesh: Mesh | None = None,
    axis_name: str = MODEL,
    batch_axes: Any = None,
    fsdp_axis: str | None = None,
) -> nnx.Module:
    """Apply a tensor-parallel `plan` to `model` in place and return it.

    Args:
      model: an NNX module (built on one device, as for single-device training).
      plan: ``{pattern: style}``; a pattern is a dotted nnx path whose
        segments are `fnmatch` globs (``*`` matches one level, e.g.
        ``'layers.*.mlp.down'``).
      mesh: the mesh; default the one set with `jax.set_mesh`.
      axis_name: the tensor-parallel mesh axis (default ``'model'``).
      batch_axes: the mesh axes the batch is split over (default: whichever
        of ``('data', 'fsdp')`` the mesh has).
      fsdp_axis: also split the parameters of the `nnx.Linear` and `nnx.Embed`
        twins over this mesh axis (FSDP inside each twin: gathered per use,
        gradients reduce-scattered; ``Trainer(strategy='fsdp+tp')``). Default
        None: the twins' parameters are whole over the batch axes.

    Returns:
      `model`, its matched submodules swapped for their shardlax twins with the
      same values and global shapes, every other variable replicated on `mesh`.

    Raises:
      ValueError: a pattern matches nothing, two patterns match one module, a
        style does not fit the module it matches, the mesh axis does not
        divide the split dim, or the module sits inside a `fully_shard` unit
        (the message names the path).
      TypeError: a style is not one of `Colwise`, `Rowwise`, `VocabParallel`,
        `Replicate`.

    Example:
      >>> class Mlp(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.up = nnx.Linear(8, 32, rngs=rngs)
      ...         self.down = nnx.Linear(32, 8, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.down(nnx.relu(self.up(x)))
      >>> mesh = shardlax.make_mesh(data=2, model=4, axis_types="auto")
      >>> model = Mlp(nnx.Rngs(0))
      >>> x = jnp.ones((4, 8))
      >>> before = model(x)
      >>> model = shardlax.parallelize(model, {"up": Colwise(), "down": Rowwise()}, mesh=mesh)
      >>> type(model.up).__name__, model.up.kernel.shape  # global shapes, as before
      ('ColumnParallelLinear', (8, 32))
      >>> bool(jnp.allclose(model(x), before, atol=1e-6))
      True
    """
    mesh = resolve_mesh(mesh, "parallelize")
    if not isinstance(plan, Mapping):
        raise TypeError(
            f"parallelize(plan={type(plan).__name__}): expected a mapping "
            f"{{path pattern: style}}, e.g. {{'layers.*.mlp.up': Colwise()}}."
        )
    modules = [(_dotted(path), path, m) for path, m in nnx.iter_modules(model) if path]
    chosen: dict[tuple, tuple[str, Any]] = {}
    for pattern, style in plan.items():
        if not isinstance(style, STYLES):
            raise TypeError(
                f"parallelize: plan[{pattern!r}] = {style!r} is not a style. Use one of "
                f"Colwise(), Rowwise(), VocabParallel(), Replicate()."
            )
        hits = [(name, path, m) for name, path, m in modules if _match(pattern, name)]
        if not hits:
            sample = ", ".join(repr(n) for n, _, _ in modules[:8])
            more = ", ..." if len(modules) > 8 else ""
            raise ValueError(
                f"parallelize: plan pattern {pattern!r} matches no submodule of "
                f"{type(model).__name__}. Paths look like {sample}{more}"
                f" ('*' matches exactly one level). Fix the pattern or drop it."
            )
        for name, path, _ in hits:
            if path in chosen and chosen[path][0] != pattern:
                raise ValueError(
                    f"parallelize: submodule {name!r} is matched by two plan patterns, "
                    f"{chosen[path][0]!r} and {pattern!r}. Make the patterns disjoint."
                )
            chosen[path] = (pattern, style)
    by_path = {path: m for _, path, m in modules}
    _refuse_inside_units(model, chosen)
    for path, (pattern, style) in chosen.items():
        name = _dotted(path)
        module = by_path[path]
        try:
            twin = _twin(module, style, mesh, axis_name, batch_axes, fsdp_axis)
        except ValueError as e:
            raise ValueError(
                f"parallelize: at {name!r} ({type(module).__name__}, plan[{pattern!r}] = "
                f"{style}): {e}"
            ) from None
        if twin is not module:
            _set(model, path, twin)
    _replicate_rest(model, mesh)
    return model


# --------------------------------------------------------------------------- paths


def _match(pattern: str, name: str) -> bool:
    want, got = pattern.split("."), name.split(".")
    return len(want) == len(got) and all(
        fnmatch.fnmatchcase(g, w) for w, g in zip(want, got, strict=True)
    )


def _set(model: nnx.Module, path: tuple, twin: Any) -> None:
    parent: Any = model
    for p in path[:-1]:
        parent = (
            parent[p] if not isinstance(p, str) or not hasattr(parent, p) else getattr(parent, p)
        )
    key = path[-1]
    twin.from_plan = True  # model code the user wrote runs around it (see Trainer)
    if isinstance(key, str) and hasattr(parent, key):
        setattr(parent, key, twin)
    else:
        parent[key] = twin


def _refuse_inside_units(model: nnx.Module, chosen: Mapping[tuple, Any]) -> None:
    """A twin cannot live in a `fully_shard` unit (it runs its own shard_map)."""
    from shardlax.fsdp import FSDPModule

    units = [path for path, m in nnx.iter_modules(model) if isinstance(m, FSDPModule)]
    for path, (pattern, _) in chosen.items():
        unit = next((u for u in units if path[: len(u)] == u), None)
        if unit is None:
            continue
        where = _dotted(unit) or type(model).__name__
        raise ValueError(
            f"parallelize: {_dotted(path)!r} (plan[{pattern!r}]) is inside the fully_shard unit "
            f"{where!r}, which has already laid out its parameters for FSDP: a twin swapped "
            f"in there would not match that layout. Apply the plan first, then wrap: "
            f"parallelize(model, plan, mesh=mesh), then fully_shard(block, mesh=mesh) (the "
            f"unit splits the twins' parameters over fsdp too)."
        )


def _replicate_rest(model: nnx.Module, mesh: Mesh) -> None:
    """Every variable not already on `mesh` (parameters, batch stats, rng keys) replicated."""
    for _, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if not isinstance(value, jax.Array):
            continue
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            continue
        var.set_value(jax.device_put(value, NamedSharding(mesh, P())))


__all__ = ["Colwise", "Replicate", "Rowwise", "VocabParallel", "call_local", "parallelize"]
