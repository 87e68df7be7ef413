"""FSDP (ZeRO-3) per device: gather a parameter on use, reduce-scatter its gradient.

A parameter `W` of global shape `[..., K, ...]` is stored split on one dim
`k` over the fsdp axis (N devices): device i holds `W_i`, a `K/N` slice.
Inside the layer's `shard_map`, `fsdp_gather` rebuilds the whole `W` on
every device just before use (one tiled all-gather), and autodiff (or the
hand-written backward of the mixed-precision path) turns the gradient of the
gathered `W` into this device's slice of the summed gradient (one tiled
reduce-scatter): `dW_i = sum over devices d of (dW computed on d's batch)_i`.
The batch is split over the fsdp axis too, so each device's gradient of the
gathered `W` is a partial sum that the reduce-scatter completes.

Parameters replicated over a pure data axis (`replicated_axes`, usually
`'data'`) are cast to varying over it *before* the gather, so that their
gradients are all-reduced over it as 1/N-sized shards, after the
reduce-scatter, instead of as whole parameters.

Collectives per gathered parameter, per call:
  forward:  1 all-gather over the fsdp axis of `|W|` bytes (gathered size, in
            the gather dtype).
  backward: 1 reduce-scatter over the fsdp axis of `|W|` bytes (in the reduce
            dtype) + 1 all-reduce over `replicated_axes` of `|W|/N` bytes;
            with `reshard_after_forward` (`fsdp_call`), 1 more all-gather
            when the backward needs `W`.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", 2020 (arXiv:1910.02054), stage 3.
  Zhao et al., "PyTorch FSDP", 2023 (arXiv:2304.11277).
  JAX shard_map notebook, `predict_fsdp` (docs/notebooks/shard_map.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._collectives import (
    _as_tuple,
    all_gather,
    all_reduce,
    ensure_varying,
    gather_bits,
    gather_bits_dtype,
    reduce_scatter,
    varying_axes,
)
from ._remat import inside_checkpoint


def _along_major(collective: Callable, x: jax.Array, dim: int) -> jax.Array:
    """`collective` (a gather or scatter along dim 0) applied along `dim` of `x`.

    The split dim is moved first and back after, so XLA transposes the
    1/N-sized shard, not the whole parameter or gradient: a collective on a
    non-major dim cost XLA:CPU a full-size copy of the gathered kernel and of
    its gradient (measured on a [2048, 512] row kernel split on dim 1: the
    FSDP x TP MLP step went 1.16x -> 0.79x GSPMD's at fsdp=2).
    """
    return jnp.moveaxis(collective(jnp.moveaxis(x, dim, 0)), 0, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _gather_cast(
    shard: jax.Array,
    axis_name: str,
    dim: int,
    replicated: tuple[str, ...],
    gather_dtype: Any,
    reduce_dtype: Any,
) -> jax.Array:
    # shard: [..., K/N, ...] stored dtype -> returns [..., K, ...] gather_dtype
    shard = ensure_varying(shard, replicated)
    gather = functools.partial(gather_bits, axes=axis_name, axis=0, invariant=False)
    return _along_major(gather, shard.astype(gather_dtype), dim)


def _gather_cast_fwd(shard, axis_name, dim, replicated, gather_dtype, reduce_dtype):
    out = _gather_cast(shard, axis_name, dim, replicated, gather_dtype, reduce_dtype)
    return out, jnp.zeros((0,), shard.dtype)  # residual: only the stored dtype


def _gather_cast_bwd(axis_name, dim, replicated, gather_dtype, reduce_dtype, res, ct):
    # ct: [..., K, ...] in gather_dtype, a partial sum (this device's batch)
    scatter = functools.partial(reduce_scatter, axes=axis_name, axis=0)
    ct_shard = _along_major(scatter, ct.astype(reduce_dtype), dim)  # [..., K/N, ...]
    ct_shard = all_reduce(ct_shard, replicated)  # summed over the pure data axes
    return (ct_shard.astype(res.dtype),)


_gather_cast.defvjp(_gather_cast_fwd, _gather_cast_bwd)


def fsdp_gather(
    shard: jax.Array,
    axis_name: str,
    *,
    dim: int = 0,
    replicated_axes: Sequence[str] | str = (),
    gather_dtype: Any = None,
    reduce_dtype: Any = None,
) -> jax.Array:
    """All-gather an FSDP-sharded parameter for use; its gradient is reduce-scattered.

    Math: `W = concat_i(W_i)` along `dim` (i over `axis_name`); the gradient
    of `W_i` is `sum_d dW^(d)` restricted to slice i, where `dW^(d)` is the
    gradient device d computes from its batch shard.

    Shardings (N = size of `axis_name`, K = the global size of `dim`):
      shard:   [..., K/N, ...]  this device's slice; varying over `axis_name`
               and invariant over `replicated_axes`.
      returns: [..., K, ...]    the whole parameter (over `axis_name`), typed
               varying over `axis_name` and `replicated_axes` so that the
               batch-dependent gradient flows back unreduced.

    Collectives:
      forward:  1 all-gather over `axis_name` of the gathered bytes, in
                `gather_dtype` (16-bit floats travel as `u16` bits).
      backward: 1 reduce-scatter over `axis_name` of the gathered bytes in
                `reduce_dtype`, then 1 all-reduce over `replicated_axes` of
                the shard (1/N of the bytes).

    Args:
      shard: this device's slice of the parameter, in its stored dtype.
      axis_name: the fsdp mesh axis.
      dim: the dim of the parameter that is split over `axis_name`.
      replicated_axes: batch axes the parameter is replicated over (pure
        data parallelism): its gradient is summed over them too.
      gather_dtype: dtype to cast the shard to *before* the gather (default:
        the stored dtype). The result has this dtype.
      reduce_dtype: dtype the gradient is reduced in (default: the stored
        dtype); the gradient is returned in the stored dtype.

    With both dtypes equal to the stored one (>= 32 bits) the gather is a
    plain tiled all-gather whose transpose autodiff derives (a tiled
    psum_scatter, then the transpose of the cast to varying: a psum over
    `replicated_axes`). Otherwise a `custom_vjp` states the same backward
    with the casts in the right places.
    """
    replicated = tuple(
        a for a in _as_tuple(replicated_axes) if a != axis_name and a not in varying_axes(shard)
    )
    stored = jnp.dtype(shard.dtype)
    gather_dtype = stored if gather_dtype is None else jnp.dtype(gather_dtype)
    reduce_dtype = stored if reduce_dtype is None else jnp.dtype(reduce_dtype)
    if gather_dtype == stored == reduce_dtype and gather_bits_dtype(stored) is None:
        shard = ensure_varying(shard, replicated)
        gather = functools.partial(all_gather, axes=axis_name, axis=0, invariant=False)
        return _along_major(
            gather, shard, dim
        )  # [..., K, ...]; its transpose scatters the same way
    return _gather_cast(shard, axis_name, dim, replicated, gather_dtype, reduce_dtype)


def _tie_to(shards: list, ct: Any, allowed: list) -> tuple[list, list]:
    """`shard + z` per shard, `z` a -0.0 computed from `ct`: bit-identical values, but
    only available once `ct` exists.

    XLA merges two identical all-gathers of the same shard (CSE), even across
    `jax.checkpoint`'s optimization barriers (XLA:CPU removes them first; an
    explicit `lax.optimization_barrier` on `(shards, ct)` was measured not to
    stop the merge either), so a re-gather in the backward would silently
    become the forward one and keep the gathered parameter alive in between,
    and a forward gather would be hoisted to the start of the program. Adding
    a zero computed from the cotangent (or the unit's inputs, for the forward
    gather) makes the gather's operand a value that only exists once they do.

    The zero is data-independent: `z = where(isfinite(c), -(|c| * 0), -0.0)`
    for one element `c` of `ct` is -0.0 for every `c`, inf and NaN included,
    and `x + (-0.0)` is exactly `x` for every float `x` (both zeros, infs and
    NaNs). So an inf or NaN in the inputs or the cotangent reaches nothing it
    would not reach on one device (the earlier `x + 0 * c` turned every
    parameter NaN when `c` was inf). XLA cannot fold `z` (`|c| * 0` is NaN for
    an infinite `c`, so it is not a constant), which is what keeps the order.

    The zero varies over the batch axes; a shard is first cast to varying over
    the axes it lacks (`extras`, which the gather would cast it over anyway;
    the caller sums its gradient over them). A shard whose gathered value does
    not vary over all the zero's axes (`allowed`) is left untied: casting it
    would change its gradient. The zero comes from the first floating leaf of
    `ct` (the cotangent, or the inputs for a forward gather): callers put the
    activations first. Integer shards are tied through their bits' xor with 0.
    """
    leaves = [c for c in jax.tree.leaves(ct) if jnp.issubdtype(c.dtype, jnp.floating)]
    if not leaves:
        return shards, [()] * len(shards)
    c = leaves[0]
    c = lax.stop_gradient(c[(0,) * c.ndim]).astype(jnp.float32)  # c: f32[]
    neg_zero = jnp.float32(-0.0)
    zero = jnp.where(jnp.isfinite(c), -(jnp.abs(c) * 0.0), neg_zero)  # zero: f32[] = -0.0
    zero_axes = varying_axes(zero)
    tied, extras = [], []
    for s, ok in zip(shards, allowed, strict=True):
        if not zero_axes <= ok:
            tied.append(s)
            extras.append(())
            continue
        extra = tuple(sorted(zero_axes - varying_axes(s)))
        tied.append(_add_zero(ensure_varying(s, extra), zero))
        extras.append(extra)
    return tied, extras


def _add_zero(s: jax.Array, zero: jax.Array) -> jax.Array:
    """`s + zero` (zero = -0.0): exactly `s`, for floats of any width and for integers."""
    if jnp.issubdtype(s.dtype, jnp.floating):
        return s + zero.astype(s.dtype)  # x + (-0.0) == x bit for bit
    bits = lax.bitcast_convert_type(zero, jnp.uint32) ^ jnp.uint32(0x80000000)  # bits: u32[] = 0
    return s ^ bits.astype(s.dtype)


def fsdp_call(
    fn: Callable[[Any, Any], Any],
    shards: Any,
    args: Any,
    *,
    gather: Callable[[Any], Any],
    reshard_after_forward: bool = True,
) -> Any:
    """`fn(gather(shards), args)`: one FSDP unit, optionally resharded after forward.

    `gather` maps the pytree of parameter shards to the gathered parameters
    (`fsdp_gather` per leaf); `fn` computes the unit from the gathered
    parameters and `args`. Both run inside `shard_map`.

    `reshard_after_forward=False`: plain autodiff; the gathered parameters are
    residuals of `fn`'s backward, so they stay alive from the forward to the
    backward. Per gathered parameter and step: 1 all-gather + 1 reduce-scatter.

    `reshard_after_forward=True` (FSDP2's default): a `custom_vjp` whose
    forward runs `jax.vjp(fn, gathered, args)` and keeps its residuals
    *except* the gathered parameters themselves (matched by identity), plus the
    shards; its backward gathers the shards again (tied to the cotangent, see
    `_tie_to`, so XLA cannot merge it into the forward gather), puts them back
    into the residuals and runs the saved backward. Nothing of `fn` is
    recomputed. Per gathered parameter and step: 2 all-gathers (1 when the
    backward does not use its value, e.g. a bias or the first layer's kernel
    without an input gradient: XLA removes the dead gather) + 1 reduce-scatter.
    Values derived from a gathered parameter inside `fn` (a dtype cast, a
    transpose) are not matched and stay saved: cast before gathering
    (`fsdp_gather(gather_dtype=...)`).

    Inside a checkpointed step of a loop (`inside_checkpoint()`: a user's
    `jax.checkpoint` / `nnx.remat` around a `lax.scan` step) the first path
    is taken whatever `reshard_after_forward` says: the backward loop
    recomputes the step, gather included, and that gathered value serves the
    backward, so each parameter is gathered twice per step (forward loop,
    backward loop), the minimum, and lives only within its step.

    Collectives: those of `gather` (forward) and its transpose (backward), as
    stated above; nothing else.
    """
    shard_leaves, shard_tree = jax.tree.flatten(shards)
    allowed = [
        frozenset(o.manual_axis_type.varying)
        for o in jax.tree.leaves(jax.eval_shape(gather, shards))
    ]

    def gather_tied(leaves, anchor):
        """`gather` of the shards tied to `anchor` (see `_tie_to`), and the extra axes."""
        tied, extras = _tie_to(leaves, anchor, allowed)
        return gather(jax.tree.unflatten(shard_tree, tied)), extras

    if not reshard_after_forward or inside_checkpoint():
        gathered, _ = gather_tied(shard_leaves, args)  # autodiff sums over the extras
        return fn(gathered, args)

    layout: dict[str, Any] = {}

    @jax.custom_vjp
    def call(shards, args):
        return fn(gather(shards), args)

    def call_fwd(shards, args):
        gathered, _ = gather_tied(jax.tree.leaves(shards), args)
        out, vjp_fn = jax.vjp(fn, gathered, args)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        params = jax.tree.leaves(gathered)
        which = [next((i for i, p in enumerate(params) if leaf is p), -1) for leaf in leaves]
        layout["treedef"], layout["which"] = treedef, which
        saved = [leaf for leaf, w in zip(leaves, which, strict=True) if w < 0]
        return out, (shards, saved)

    def call_bwd(res, ct):
        shards, saved = res
        tied, extras = _tie_to(jax.tree.leaves(shards), ct, allowed)
        gather_flat = lambda leaves: gather(jax.tree.unflatten(shard_tree, leaves))
        gathered, gather_vjp = jax.vjp(gather_flat, tied)  # the re-gather
        params = jax.tree.leaves(gathered)
        saved_it = iter(saved)
        leaves = [next(saved_it) if w < 0 else params[w] for w in layout["which"]]
        vjp_fn = jax.tree.unflatten(layout["treedef"], leaves)
        d_gathered, d_args = vjp_fn(ct)
        (d_tied,) = gather_vjp(d_gathered)
        d_leaves = [all_reduce(d, e) for d, e in zip(d_tied, extras, strict=True)]
        return jax.tree.unflatten(shard_tree, d_leaves), d_args

    call.defvjp(call_fwd, call_bwd)
    return call(shards, args)


def global_batch_moments(
    x_shard: jax.Array,
    reduction_axes: Sequence[int],
    batch_axes: Sequence[str] | str,
    *,
    use_fast_variance: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of the *global* batch over `reduction_axes` (BatchNorm statistics).

    Math: every device holds an equal share of the batch, so the global mean
    is the mean over `batch_axes` of the local means: `mu = pmean(mean(x))`;
    fast variance (flax's default): `var = max(0, pmean(mean(x^2)) - mu^2)`,
    else `var = pmean(mean((x - mu)^2))`. Equal to `nnx.BatchNorm` on the
    whole batch on one device (flax's `axis_name` path computes the same).

    Shardings: x_shard [B/n, ..., F] varying over `batch_axes` (n = their
    size); returns (mu, var), each [F] (the kept dims), invariant.

    Collectives: forward 1 all-reduce over `batch_axes` of the stacked
    [2, F] means (2 all-reduces of [F] with `use_fast_variance=False`);
    backward the transposes, 1 all-reduce of the same size each (the
    cotangent of an invariant statistic used by every device's batch is
    summed over them).
    """
    axes = tuple(a for a in _as_tuple(batch_axes) if a in varying_axes(x_shard))
    n = 1
    for a in axes:
        n *= lax.axis_size(a)

    def pmean(v):
        return all_reduce(v, axes) / n if axes else v

    red = tuple(reduction_axes)
    if use_fast_variance:
        both = pmean(jnp.stack([x_shard.mean(red), jnp.square(x_shard).mean(red)]))
        mu, mu2 = both[0], both[1]
        return mu, jnp.maximum(0.0, mu2 - jnp.square(mu))
    mu = pmean(x_shard.mean(red))
    keep = [d for d in range(x_shard.ndim) if d not in red]
    shape = [x_shard.shape[d] if d in keep else 1 for d in range(x_shard.ndim)]
    var = pmean(jnp.square(x_shard - mu.reshape(shape)).mean(red))
    return mu, var
