"""Stateful flax layers inside a `fully_shard` unit: computed as on the whole batch.

Inside a unit's `shard_map` each device sees its batch shard. Two flax layers
would then silently compute per shard what one device computes on the whole
batch; while the unit runs they are swapped (on the unit's private merged
copy only) for subclasses that compute the global quantity:

- `nnx.BatchNorm` in training mode: mean and variance of the global batch
  (`kernels.global_batch_moments`: one all-reduce over the batch axes), so
  the output and the running averages equal the unwrapped module's.
- `nnx.Dropout`: the mask of the *global* array (`kernels.sharding_invariant_dropout`,
  each device computing its own slice from `axis_index` offsets) from the
  key the one-device module draws, so masks are bit-identical to it and the
  rng counters advance as on one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import normalization
from flax.nnx.nn.stochastic import first_from

from shardlax import _flax_layers, kernels
from shardlax.nn._dropout import draw_key


@dataclasses.dataclass(frozen=True)
class UnitBatch:
    """How the batch is laid out inside a unit: `local` examples per device, split over `axes`."""

    owner: str
    axes: tuple[str, ...]  # live batch axes
    size: int  # product of their sizes
    local: int | None  # per-device batch size, None if unknown

    @property
    def entry(self):
        return self.axes if len(self.axes) > 1 else self.axes[0]


_CURRENT: list[UnitBatch] = []


def _batch() -> UnitBatch:
    return _CURRENT[-1]


class _UnitBatchNorm(nnx.BatchNorm):
    def __call__(self, x, use_running_average=None, *, mask=None):
        use_running_average = first_from(
            use_running_average,
            self.use_running_average,
            error_msg="No `use_running_average` argument was provided to BatchNorm.",
        )
        batch = _batch()
        if use_running_average or not batch.axes:
            return nnx.BatchNorm.__call__(self, x, use_running_average, mask=mask)
        if mask is not None or self.axis_name is not None:
            raise ValueError(
                f"{batch.owner}: nnx.BatchNorm(axis_name={self.axis_name!r}) called with "
                f"mask={'given' if mask is not None else None} inside a fully_shard unit: the "
                f"unit computes global-batch statistics itself (over mesh axes {batch.axes}) "
                f"and supports neither a mask nor an axis_name of the user. Build the "
                f"BatchNorm with axis_name=None and call it without mask."
            )
        feature_axes = normalization._canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        dtype = jnp.promote_types(
            jnp.result_type(x) if self.dtype is None else self.dtype, jnp.float32
        )
        mean, var = kernels.global_batch_moments(
            jnp.asarray(x, dtype),
            reduction_axes,
            batch.axes,
            use_fast_variance=self.use_fast_variance,
        )
        self.mean[...] = jax.lax.stop_gradient(
            self.momentum * self.mean[...] + (1 - self.momentum) * mean
        )
        self.var[...] = jax.lax.stop_gradient(
            self.momentum * self.var[...] + (1 - self.momentum) * var
        )
        return normalization._normalize(
            x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon
        )


class _UnitDropout(nnx.Dropout):
    def __call__(self, inputs, *, deterministic=None, rngs=None):
        deterministic = first_from(
            deterministic,
            self.deterministic,
            error_msg="No `deterministic` argument was provided to Dropout.",
        )
        if self.rate == 0.0 or deterministic or self.rate == 1.0:
            return nnx.Dropout.__call__(self, inputs, deterministic=deterministic, rngs=rngs)
        rngs = first_from(
            rngs,
            self.rngs,
            error_msg="`deterministic` is False, but no `rngs` argument was provided to Dropout.",
        )
        key = draw_key(rngs, self.rng_collection)
        if key is None:
            raise TypeError(f"rngs must be a Rngs, RngStream or jax.Array, got {type(rngs)}.")
        batch = _batch()
        split = [a for a in batch.axes if a in kernels.varying_axes(inputs)]
        if split and (inputs.ndim == 0 or inputs.shape[0] != batch.local):
            raise ValueError(
                f"{batch.owner}: nnx.Dropout inside the unit got inputs of shape "
                f"{tuple(inputs.shape)} that depend on the batch shard but whose leading dim "
                f"is not the per-device batch ({batch.local}); the unit cannot tell which "
                f"slice of the global mask they are. Apply dropout to arrays whose leading "
                f"dim is the batch."
            )
        global_shape = list(inputs.shape)
        spec = [None] * inputs.ndim
        if split:
            global_shape[0] *= batch.size
            spec[0] = batch.entry
        key_data = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
        return kernels.sharding_invariant_dropout(
            inputs,
            key_data,
            rate=self.rate,
            global_shape=global_shape,
            spec=spec,
            broadcast_dims=tuple(self.broadcast_dims),
        )


_SWAPS = {nnx.BatchNorm: _UnitBatchNorm, nnx.Dropout: _UnitDropout}


@contextlib.contextmanager
def global_batch_layers(roots, batch: UnitBatch) -> Iterator[None]:
    """While active, BatchNorm / Dropout modules under `roots` compute on the global batch.

    So does the per-example attention dropout of `nnx.MultiHeadAttention`
    (`shardlax._flax_layers.GlobalMaskAttention`).
    """
    from shardlax._flax_layers import GlobalMaskAttention

    swapped, attention = [], []
    for root in roots:
        for _, node in nnx.iter_graph(root):
            new = _SWAPS.get(type(node))
            if new is not None:
                swapped.append((node, type(node)))
                object.__setattr__(node, "__class__", new)
            elif isinstance(node, nnx.MultiHeadAttention) and node.dropout_rate > 0.0:
                fn = node.attention_fn
                if not isinstance(fn, GlobalMaskAttention):  # per-example masks: global ones
                    attention.append((node, fn))
                    wrapped = GlobalMaskAttention(fn, lambda: _batch().axes, batch.owner)
                    object.__setattr__(node, "attention_fn", wrapped)
    _CURRENT.append(batch)
    try:
        yield
    finally:
        _CURRENT.pop()
        for node, cls in swapped:
            object.__setattr__(node, "__class__", cls)
        for node, fn in attention:
            object.__setattr__(node, "attention_fn", fn)


def _attrs(node) -> dict:
    """The Python attributes of a module node: not Variables, not sub-nodes, not nnx's own."""
    out = {}
    for k, v in vars(node).items():
        if k.startswith("_") or isinstance(v, nnx.Variable | nnx.Pytree | jax.Array):
            continue
        out[k] = v
    return out


def check_structure(owner: str, method: str, original, graphdef, module) -> None:
    """`module` (the unit's copy after its forward) still has `original`'s structure.

    A unit runs its forward on a private copy (merged from the parameters and
    state it was given) and brings back only Variable values. A forward that
    creates a Variable, removes one, or assigns a Python attribute
    (`self.steps += 1` on an int) changes the copy's graph, which nothing
    would bring back: a ValueError naming the unit, the method and what
    changed, never a silent drop.
    """
    if nnx.graphdef(module) == graphdef:
        return
    before = dict(nnx.iter_graph(original))
    after = dict(nnx.iter_graph(module))
    changed = []
    for path in sorted(set(before) | set(after), key=str):
        name = ".".join(map(str, path)) or "<module>"
        if path not in before:
            kind = type(after[path]).__name__
            changed.append(f"{name} ({kind}, created in the forward)")
        elif path not in after:
            changed.append(f"{name} (removed in the forward)")
        elif isinstance(after[path], nnx.Pytree) and isinstance(before[path], nnx.Pytree):
            old, new = _attrs(before[path]), _attrs(after[path])
            for k in sorted(set(old) | set(new)):
                if k not in old or k not in new or not _same(old[k], new[k]):
                    attr = f"{name}.{k}" if path else k
                    changed.append(
                        f"{attr} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})"
                    )
    what = ", ".join(changed) if changed else "its graph (nnx.graphdef)"
    raise ValueError(
        f"{owner}.{method}: the forward changes the module's structure: {what}. The unit runs "
        f"the forward on its own copy of the module and brings back the values of existing "
        f"Variables only, so this change would be lost. Create every Variable in __init__ "
        f"and keep changing values in Variables (e.g. `self.steps = nnx.Variable(jnp.zeros((), "
        f"jnp.int32))` in __init__, `self.steps[...] += 1` in the forward)."
    )


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an attribute whose == is not a bool: compare identity
        return a is b


def check_state(owner, what, paths, old, new, reduction=None, batch_axes=()):
    """Updated non-parameter state must be the same on every device (it is stored replicated).

    A floating value computed from this device's batch shard alone is averaged
    over the batch axes it varies over with `reduction='mean'` (recorded for
    the Trainer's declarations), else it is an error.
    """
    out = []
    for i, (o, n) in enumerate(zip(old, new, strict=True)):
        extra = kernels.varying_axes(n) - kernels.varying_axes(o)
        if n is o or not extra:
            out.append(n)
            continue
        name = paths[i] if paths else f"leaf {i}"
        mean = extra <= set(batch_axes) and jnp.issubdtype(n.dtype, jnp.floating)
        if reduction == "mean" and mean:
            axes = tuple(a for a in batch_axes if a in extra)
            count = math.prod(kernels.axis_size(a) for a in axes)
            out.append(kernels.all_reduce(n, axes) / jnp.asarray(count, n.dtype))
            rec = _flax_layers.recorder()
            if rec is not None:
                rec.state_means.append((axes, f"{owner} {name}", n.size * n.dtype.itemsize,
                                        n.dtype))  # fmt: skip
            continue
        hint = (
            "Pass fully_shard(..., state_reduction='mean') (or Trainer(state_reduction="
            "'mean')) if it is a mean over the batch "
            "(a running mean of activations), or compute"
            if mean
            else "Compute"
        )
        raise ValueError(
            f"{owner}: the forward updates {what} {name!r} from this device's batch shard "
            f"(it varies over mesh axes {sorted(kernels.varying_axes(n))}); one device would "
            f"compute it from the whole batch, and the unit stores it replicated. nnx.BatchNorm "
            f"and nnx.Dropout are handled by the unit. {hint} other state from the global batch "
            f"(e.g. shardlax.kernels collectives) or update it outside the unit."
        )
    return tuple(out)
