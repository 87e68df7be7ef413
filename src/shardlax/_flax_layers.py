"""Plain flax layers inside the one-shard_map train step, computed as on one device.

Inside `shardlax.Trainer`'s step every device runs the user's model on its
batch shard. Two flax layers look at more than their own examples, and would
silently compute per-device results:

- `nnx.BatchNorm` (training mode) normalises with the statistics of the
  batch. `sync_batch_norm` gives it the step's batch axes as its
  `axis_name`, flax's own mechanism for cross-device statistics: the mean
  and mean of squares of the local shard are averaged over the batch axes in
  one all-reduce (f32 `[2, F]`) per call, so the statistics, the output and
  the running averages are those of the global batch. Opt out with
  `Trainer(sync_batch_stats=False)` (per-device statistics, as DDP without
  SyncBatchNorm).
- `nnx.Dropout` draws its mask with `jax.random.bernoulli(key, shape)`;
  with the same key on every device each would draw the *same* mask for
  different examples. `GlobalMaskDropout` computes, for each device, its
  slice of the mask one device would draw for the whole batch (the bits of
  each element's global index, `kernels.sharding_invariant_dropout`), so the
  masks are bit-identical to the one-device run and no two devices repeat
  one.

Only those two types are changed, on the model merged inside the step (the
user's model object is never touched).
"""

from __future__ import annotations

import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib

from shardlax import kernels
from shardlax.nn._dropout import draw_key

_RECORD = threading.local()


class _Recorder:
    """Collects the batch-statistics all-reduces traced in one step (for declarations)."""

    def __init__(self):
        self.stats: list[tuple[tuple[str, ...], int, bool]] = []
        # fully_shard(state_reduction='mean'): (axes, where, bytes, dtype) of each mean
        self.state_means: list[tuple[tuple[str, ...], str, int, Any]] = []


def recorder() -> _Recorder | None:
    return getattr(_RECORD, "current", None)


def inherited_state_reduction() -> str | None:
    """The `state_reduction` of the Trainer whose step is being traced (None outside one)."""
    return getattr(_RECORD, "state_reduction", None)


class state_reduction_scope:
    """Context: `fully_shard` units without a `state_reduction` of their own take `value`."""

    def __init__(self, value: str | None):
        self.value = value

    def __enter__(self) -> None:
        self._saved = inherited_state_reduction()
        _RECORD.state_reduction = self.value

    def __exit__(self, *exc) -> None:
        _RECORD.state_reduction = self._saved


class recording:
    """Context: record the BatchNorm statistics collectives traced inside."""

    def __enter__(self) -> _Recorder:
        self._saved = recorder()
        _RECORD.current = _Recorder()
        return _RECORD.current

    def __exit__(self, *exc) -> None:
        _RECORD.current = self._saved


class SyncBatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` whose statistics are reduced over the step's batch axes."""

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        rec = recorder()
        if not use_ra and rec is not None and self.axis_name:
            axes = (self.axis_name,) if isinstance(self.axis_name, str) else self.axis_name
            rec.stats.append((tuple(axes), int(self.num_features), bool(self.use_fast_variance)))
        return super().__call__(x, use_running_average=use_running_average, mask=mask)


def threefry_data(key: jax.Array, who: str) -> jax.Array:
    """The uint32[2] data of a threefry key (typed or raw), which the global masks need."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,):
        raise ValueError(
            f"{who}: its key has data shape {tuple(key.shape)}, not the threefry (2,) uint32 "
            f"that shardlax's sharding-invariant mask needs. Use the default PRNG "
            f"implementation (jax.random.key with 'threefry2x32')."
        )
    return key


class GlobalMaskDropout(nnx.Dropout):
    """`nnx.Dropout` whose mask is this device's slice of the one-device mask."""

    _shardlax_batch: tuple[str, ...] = ()

    def __call__(
        self,
        inputs,
        *,
        deterministic: bool | None = None,
        rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None or self.rate == 0.0 or deterministic or self.rate == 1.0:
            # flax's own code for these cases (its errors included)
            return nnx.Dropout.__call__(self, inputs, deterministic=deterministic, rngs=rngs)
        rngs = self.rngs if rngs is None else rngs
        key = draw_key(rngs, self.rng_collection)
        if key is None:  # flax's own error for what it does not accept
            return nnx.Dropout.__call__(self, inputs, deterministic=deterministic, rngs=rngs)
        key = threefry_data(key, f"nnx.Dropout(rate={self.rate}) in a shardlax.Trainer step")
        batch = self._shardlax_batch
        vary = kernels.varying_axes(inputs)
        if not vary <= set(batch):
            raise ValueError(
                f"nnx.Dropout(rate={self.rate}) in a shardlax.Trainer step: its input of local "
                f"shape {tuple(inputs.shape)} is split over mesh axes {sorted(vary)}, not only "
                f"over the batch axes {batch}, so its global layout is unknown. Use "
                f"shardlax.nn.Dropout(..., mesh=mesh) and pass spec= for tensor-parallel "
                f"activations."
            )
        split = tuple(a for a in batch if a in vary)
        if split and inputs.ndim == 0:
            raise ValueError(
                f"nnx.Dropout(rate={self.rate}) in a shardlax.Trainer step: a scalar input that "
                f"differs between devices has no batch dim to place its mask by."
            )
        global_shape = list(inputs.shape)
        spec: list[Any] = [None] * inputs.ndim
        if split:
            global_shape[0] *= kernels.axis_size(split)
            spec[0] = split if len(split) > 1 else split[0]
        return kernels.sharding_invariant_dropout(
            inputs,
            key,
            rate=self.rate,
            global_shape=tuple(global_shape),
            spec=tuple(spec),
            broadcast_dims=self.broadcast_dims,
        )


class GlobalMaskAttention:
    """An `nnx.MultiHeadAttention.attention_fn` whose per-example dropout is the one-device mask.

    With `broadcast_dropout=False` flax draws one mask over the whole
    attention weights `[batch..., heads, q, k]`; on a batch shard that draw
    has the local shape, so every device would repeat the first examples'
    mask. Here the weights come from flax's `dot_product_attention_weights`
    without dropout, and the mask multiplying them is this device's slice of
    `jax.random.bernoulli(key, 1 - rate, global_shape)` (`kernels.global_bernoulli`),
    applied as flax applies it. Broadcast dropout (one `[q, k]` mask, flax's
    default), no dropout, or an unsplit batch call the original function.
    """

    def __init__(self, fn: Any, batch_axes: Any, owner: str):
        self.fn, self.batch_axes, self.owner = fn, batch_axes, owner

    def __call__(self, query, key, value, **kw):
        from flax.nnx.nn import attention

        axes = self.batch_axes() if callable(self.batch_axes) else self.batch_axes
        split = tuple(a for a in axes if a in kernels.varying_axes(query))
        rate, rng = kw.get("dropout_rate", 0.0), kw.get("dropout_rng")
        if (
            kw.get("deterministic", False) or not rate or rng is None
            or kw.get("broadcast_dropout", True) or not split
        ):  # fmt: skip
            return self.fn(query, key, value, **kw)
        if self.fn is not attention.dot_product_attention:
            raise ValueError(
                f"{self.owner}: nnx.MultiHeadAttention(dropout_rate={rate}, broadcast_dropout="
                f"False) with a custom attention_fn draws a per-example mask on each device's "
                f"batch shard, which cannot equal the one-device mask. Use flax's default "
                f"attention_fn, broadcast_dropout=True, or dropout_rate=0."
            )
        rng = threefry_data(rng, f"{self.owner}: nnx.MultiHeadAttention(dropout_rate={rate})")
        promote = kw.get("promote_dtype", attention.dtypes.promote_dtype)
        query, key, value = promote((query, key, value), dtype=kw.get("dtype"))
        dtype = query.dtype
        weights = attention.dot_product_attention_weights(
            query, key, kw.get("bias"), kw.get("mask"), True, None, 0.0, True, dtype,
            kw.get("precision"), kw.get("module"), promote, kw.get("is_causal", False),
        )  # fmt: skip
        if weights.shape[-3] != value.shape[-2]:
            raise ValueError(
                f"{self.owner}: grouped-query heads ({weights.shape[-3]} query, "
                f"{value.shape[-2]} value) with per-example attention dropout on a batch "
                f"shard are not supported; use broadcast_dropout=True."
            )
        global_shape = (weights.shape[0] * kernels.axis_size(split), *weights.shape[1:])
        spec = (split if len(split) > 1 else split[0],)
        keep_prob = 1.0 - rate
        keep = kernels.global_bernoulli(rng, keep_prob, weights.shape, global_shape, spec)
        weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=kw.get("precision"))


def global_mask_attention(module: nnx.Module, batch_axes: Any, owner: str) -> None:
    """Give every `nnx.MultiHeadAttention` in `module` a `GlobalMaskAttention` (in place)."""
    for _, m in nnx.iter_modules(module):
        wrapped = isinstance(getattr(m, "attention_fn", None), GlobalMaskAttention)
        if isinstance(m, nnx.MultiHeadAttention) and m.dropout_rate > 0.0 and not wrapped:
            m.attention_fn = GlobalMaskAttention(m.attention_fn, batch_axes, owner)


def adapt(model: nnx.Module, batch_axes: tuple[str, ...], *, sync_batch_stats: bool) -> None:
    """Swap the model's `nnx.BatchNorm` / `nnx.Dropout` for their global-batch twins.

    `model` must be the fresh object merged inside the step. Only modules of
    exactly those types are changed (a subclass keeps its own `__call__`;
    a BatchNorm subclass still gets `axis_name`).
    """
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            if sync_batch_stats and batch_axes and m.axis_name is None:
                m.axis_name = batch_axes if len(batch_axes) > 1 else batch_axes[0]
                if type(m) is nnx.BatchNorm:
                    m.__class__ = SyncBatchNorm
        elif type(m) is nnx.Dropout:
            m.__class__ = GlobalMaskDropout
            m._shardlax_batch = tuple(batch_axes)
    global_mask_attention(model, tuple(batch_axes), "shardlax.Trainer step")


__all__ = [
    "GlobalMaskAttention",
    "GlobalMaskDropout",
    "SyncBatchNorm",
    "adapt",
    "global_mask_attention",
    "inherited_state_reduction",
    "recording",
    "state_reduction_scope",
]
