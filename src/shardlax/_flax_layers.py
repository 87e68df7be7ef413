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
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        if key.shape != (2,):
            raise ValueError(
                f"nnx.Dropout(rate={self.rate}) in a shardlax.Trainer step: its key has data "
                f"shape {tuple(key.shape)}, not the threefry (2,) uint32 that shardlax's "
                f"sharding-invariant mask needs. Use the default PRNG implementation "
                f"(jax.random.key with 'threefry2x32')."
            )
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


__all__ = ["GlobalMaskDropout", "SyncBatchNorm", "adapt", "recording"]
