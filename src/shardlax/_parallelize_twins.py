"""The shardlax twin of one module under one plan style (`shardlax.parallelize`).

`_twin` builds, for a matched `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum` or
`nnx.Embed`, the shardlax layer with the same values, global shapes and
metadata (`ColumnParallelLinear`, `RowParallelLinear`, `ParallelEinsum`,
`ParallelEmbed`), or refuses a style that does not fit the module.
"""

from __future__ import annotations

import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh

from shardlax import kernels
from shardlax._parallelize_styles import Colwise, Replicate, Rowwise, VocabParallel
from shardlax._twins_local import _PARALLEL
from shardlax.nn._column import ColumnParallelLinear
from shardlax.nn._einsum import ParallelEinsum
from shardlax.nn._embed import ParallelEmbed
from shardlax.nn._row import RowParallelLinear


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
        shard_dim=dim, sequence_parallel=style.sequence_parallel, **common,
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
