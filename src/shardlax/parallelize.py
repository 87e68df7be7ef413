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

import dataclasses
import fnmatch
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax._twins_local import _PARALLEL, _dotted, call_local
from shardlax.mesh import resolve_mesh
from shardlax.nn._column import ColumnParallelLinear
from shardlax.nn._einsum import ParallelEinsum
from shardlax.nn._embed import ParallelEmbed
from shardlax.nn._row import RowParallelLinear


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


# --------------------------------------------------------------------------- twins


def _twin(
    module: nnx.Module, style: Any, mesh: Mesh, axis_name: str, batch_axes: Any,
    fsdp_axis: str | None,
) -> Any:  # fmt: skip
    kind = type(module).__name__
    if isinstance(module, _PARALLEL):
        raise ValueError(
            f"the module is already a shardlax parallel layer ({kind}). Drop it from the plan."
        )
    common = dict(mesh=mesh, axis_name=axis_name, batch_axes=batch_axes)
    if isinstance(style, Replicate):
        return module
    if isinstance(style, (Colwise, Rowwise)) and isinstance(module, nnx.Linear):
        return _linear_twin(module, style, dict(common, fsdp_axis=fsdp_axis))
    if isinstance(style, (Colwise, Rowwise)) and isinstance(module, nnx.Einsum | nnx.LinearGeneral):
        if fsdp_axis is not None:
            raise ValueError(
                f"parallelize(fsdp_axis={fsdp_axis!r}): the nnx.{kind} twin (ParallelEinsum) does "
                f"not split its kernel over an fsdp axis, so FSDP would silently not apply to "
                f"it. Pass fsdp_axis=None (and strategy='zero2' for sharded optimizer state), "
                f"or write the projection as an nnx.Linear."
            )
        einsum = module if isinstance(module, nnx.Einsum) else _as_einsum(module)
        return _einsum_twin(einsum, style, common)
    if isinstance(style, VocabParallel) and isinstance(module, nnx.Embed):
        return ParallelEmbed(
            module.num_embeddings, module.features, dtype=module.dtype,
            param_dtype=module.param_dtype, embedding_init=_value(module.embedding),
            promote_dtype=module.promote_dtype, rngs=nnx.Rngs(0),
            sequence_parallel=style.sequence_parallel, fsdp_axis=fsdp_axis, **common,
        )  # fmt: skip
    fits = {
        Colwise: "nnx.Linear, nnx.LinearGeneral or nnx.Einsum",
        Rowwise: "nnx.Linear, nnx.LinearGeneral or nnx.Einsum",
        VocabParallel: "nnx.Embed",
    }[type(style)]
    raise ValueError(
        f"style {type(style).__name__} fits {fits}, not {kind}. Use Replicate() for "
        f"{kind}, or point the pattern at a {fits}."
    )


def _linear_twin(module: nnx.Linear, style: Any, common: dict) -> Any:
    col = isinstance(style, Colwise)
    want = 1 if col else 0
    if style.dim is not None and style.dim % 2 != want:
        raise ValueError(
            f"{type(style).__name__}(dim={style.dim}) on an nnx.Linear kernel [in, out]: "
            f"{type(style).__name__} splits dim {want} ({'out' if col else 'in'}_features). "
            f"Drop dim=, or use {'Rowwise' if col else 'Colwise'}()."
        )
    kw = dict(
        use_bias=module.use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
        precision=module.precision, kernel_init=_value(module.kernel),
        bias_init=_value(module.bias), dot_general=module.dot_general,
        promote_dtype=module.promote_dtype,
        preferred_element_type=module.preferred_element_type, rngs=nnx.Rngs(0),
        sequence_parallel=style.sequence_parallel, **common,
    )  # fmt: skip
    if col:
        if style.parts > 1 and module.dot_general is not lax.dot_general:
            raise ValueError(
                f"Colwise(parts={style.parts}) needs the default dot_general (the fused "
                f"kernel is gathered and sliced per part); this Linear has "
                f"{module.dot_general!r}."
            )
        return ColumnParallelLinear(
            module.in_features, module.out_features, parts=style.parts, shared_input=True, **kw
        )
    return RowParallelLinear(module.in_features, module.out_features, **kw)


def _as_einsum(module: nnx.LinearGeneral) -> types.SimpleNamespace:
    """`module` as the nnx.Einsum it computes (``'...D,DNH->...NH'`` for D -> (N, H))."""
    k, n = len(module.in_features), len(module.out_features)
    if module.batch_axis or tuple(module.axis) != tuple(range(-k, 0)):
        raise ValueError(
            f"nnx.LinearGeneral(axis={tuple(module.axis)}, batch_axis="
            f"{dict(module.batch_axis)}): only a contraction of the trailing input dims, "
            f"written as negative axes (axis={tuple(range(-k, 0))}), without batch_axis, has "
            f"a tensor-parallel twin. Use Replicate() for this module."
        )
    if module.dot_general not in (None, jax.lax.dot_general) or module.dot_general_cls:
        raise ValueError(
            "nnx.LinearGeneral with a custom dot_general has no tensor-parallel twin (the "
            "twin computes jnp.einsum). Use Replicate() for this module."
        )
    letters = "abcdefghijklmnopqrstuvwxyz"
    lhs, rhs = letters[:k], letters[k : k + n]
    return types.SimpleNamespace(
        einsum_str=f"...{lhs},{lhs}{rhs}->...{rhs}",
        kernel_shape=(*module.in_features, *module.out_features),
        bias_shape=tuple(module.out_features) if module.bias is not None else None,
        dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
        kernel=module.kernel, bias=module.bias, promote_dtype=module.promote_dtype,
        einsum_op=jnp.einsum, preferred_element_type=module.preferred_element_type,
    )  # fmt: skip


def _einsum_twin(module: Any, style: Any, common: dict) -> Any:
    if isinstance(style, Colwise) and style.parts != 1:
        raise ValueError(
            f"Colwise(parts={style.parts}) is for a fused nnx.Linear; an nnx.Einsum with a "
            f"parts dim (e.g. 'BSD,CDKH->CBSKH') splits each part already: pass "
            f"Colwise(dim=<the heads dim>)."
        )
    if style.sequence_parallel:
        raise ValueError(
            f"{type(style).__name__}(sequence_parallel=True) is not supported on nnx.Einsum; "
            f"pass sequence_parallel=False."
        )
    eq = module.einsum_str.replace(" ", "")
    # an input ellipsis read as empty: dims of the kernel's ellipsis are output-only
    x_named = len(eq.split(",")[0].replace("...", ""))
    xs, ks, out = kernels.einsum_subscripts(eq, (1,) * x_named, tuple(module.kernel_shape))
    col = isinstance(style, Colwise)
    fits = [
        i for i, c in enumerate(ks) if (c in out and c not in xs) == col and (c in out) != (c in xs)
    ]
    dim = style.dim
    if dim is None:
        if len(fits) != 1:
            raise ValueError(
                f"{type(style).__name__}() on {eq!r}: kernel dims {fits} (letters "
                f"{[ks[i] for i in fits]}) could be split; choose one with "
                f"{type(style).__name__}(dim=...)."
            )
        dim = fits[0]
    elif dim % len(ks) not in fits:
        what = "an output-only" if col else "a contracted"
        raise ValueError(
            f"{type(style).__name__}(dim={dim}) on {eq!r}: kernel letter "
            f"{ks[dim % len(ks)]!r} is not {what} dim; {type(style).__name__} splits one of "
            f"dims {fits} (letters {[ks[i] for i in fits]})."
        )
    return ParallelEinsum(
        eq, module.kernel_shape, module.bias_shape, dtype=module.dtype,
        param_dtype=module.param_dtype, precision=module.precision,
        kernel_init=_value(module.kernel), bias_init=_value(module.bias),
        promote_dtype=module.promote_dtype, einsum_op=module.einsum_op,
        preferred_element_type=module.preferred_element_type, rngs=nnx.Rngs(0),
        kernel_metadata=_metadata(module.kernel), bias_metadata=_metadata(module.bias),
        shard_dim=dim, **common,
    )  # fmt: skip


def _value(param: Any):
    """An initializer returning `param`'s current value (shape and dtype checked)."""
    if param is None:
        return dtypes_zero_init
    value = param[...]

    def init(key, shape, dtype):
        del key
        if tuple(shape) != tuple(value.shape) or jax.numpy.dtype(dtype) != value.dtype:
            raise ValueError(  # pragma: no cover - the twins take shapes from the module
                f"twin parameter {tuple(shape)} {dtype} != {tuple(value.shape)} {value.dtype}"
            )
        return value

    return init


def dtypes_zero_init(key, shape, dtype):  # pragma: no cover - never called (no bias)
    return jax.numpy.zeros(shape, dtype)


def _metadata(param: Any) -> dict:
    if param is None:
        return {}
    meta = dict(param.get_metadata())
    for k in ("sharding", "out_sharding", "sharding_names", "mesh", "eager_sharding"):
        meta.pop(k, None)
    return {k: v for k, v in meta.items() if not k.startswith("on_")}


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
