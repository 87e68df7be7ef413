"""The one train step of `shardlax.Trainer`, for every strategy, and its `TrainState`.

The whole step is one `jax.shard_map` over every axis of the mesh:

1. Each parameter arrives as its local shard (`Placement.spec`) and is typed
   as varying over the batch axes it is replicated over, so its gradient stays
   this device's partial sum (no collective inserted by autodiff).
2. The model (merged from the state) runs on this device's batch shard.
   shardlax layers and `fully_shard` units run their per-device code
   (`shardlax.mesh.is_manual`): FSDP all-gathers over `fsdp` (gradients
   reduce-scattered there), tensor-parallel collectives over `model`. Flax's
   BatchNorm and Dropout are computed as on one device (`_flax_layers`).
   Every `nnx.Variable` the forward updates comes back as the new `rest`.
3. The partial gradients are summed over their replicated batch axes, one
   collective per bucket, by the strategy (all-reduce, all-reduce + slice,
   reduce-scatter).
4. optax updates the full local leaves (dp, fsdp) or this device's flat
   shards (ZeRO-1/2), which are then all-gathered, one collective per bucket.

The loss: `loss_fn(model, batch)` is the mean over the batch it is given. If
its value differs between devices (the usual case: a mean over the local
shard) the step averages it over the batch axes it varies over, and scales
the gradients by the same 1/N; a loss already reduced inside the model
(TinyLM's vocab-parallel cross-entropy) is used as it is.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (arXiv:1910.02054).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shardlax import _flax_layers, kernels, zero
from shardlax._control_flow import varying_carries
from shardlax.placement import path_str, spec_axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What a train step carries from one step to the next (a pytree).

    Attributes:
      params: the model's `nnx.Param` state, global arrays in their storage
        layout (`Placement.spec`).
      opt_state: the optax state. A leaf that follows a parameter is laid out
        like it (dp, fsdp) or, under zero1/zero2, in the flat layout of
        `shardlax.placement` (1/N per device).
      rest: the model's other state (batch statistics, RNG keys and counts,
        any `nnx.Variable`), as the forward of the last step left it.
      step: the number of steps taken (int32 scalar).
      master: with a `mixed_precision` policy (zero1/zero2), the f32 master
        parameters in the flat layout; `params` then holds their
        `param_dtype` copy. None otherwise.
    """

    params: Any
    opt_state: Any
    rest: Any
    step: jax.Array
    master: Any = None


class _Steps:
    """The train step of `Trainer` (a mixin; `Trainer` holds the layout)."""

    def _step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        self._check_batch(batch)
        specs = self.state_specs()
        batch_specs = jax.tree.map(lambda x: self._batch_spec(x), batch)
        batch = jax.tree.map(lambda x, s: self._put(x, s), batch, batch_specs)
        body = jax.shard_map(
            self._body,
            mesh=self.mesh,
            in_specs=(specs.params, specs.master, specs.opt_state, specs.rest, batch_specs),
            out_specs=(specs.params, specs.master, specs.opt_state, specs.rest, jax.P()),
        )
        params, master, opt_state, rest, loss = body(
            state.params, state.master, state.opt_state, state.rest, batch
        )
        return TrainState(params, opt_state, rest, state.step + 1, master), {"loss": loss}

    # ------------------------------------------------------------ gradients
    def _loss_of(self, leaves, rest, batch):
        # copy=True: fresh Variables at this trace level, so the forward may update them
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves), rest, copy=True)
        _flax_layers.adapt(model, self.live, sync_batch_stats=self.sync_batch_stats)
        from shardlax._twins_local import call_local

        # tensor-parallel twins return local shards here: model code that trips over a
        # local size (a reshape with a global head count, a softmax over split logits)
        # gets an error naming the twin and the fix
        with _flax_layers.state_reduction_scope(self.state_reduction), varying_carries():
            loss = call_local(self.loss_fn, model, batch, axis_name=self.tp_axis)
        if not hasattr(loss, "shape") or loss.shape != ():
            raise ValueError(
                f"Trainer(loss_fn={getattr(self.loss_fn, '__name__', self.loss_fn)!r}): "
                f"loss_fn(model, batch) must return a scalar (the mean loss over the batch), "
                f"got {type(loss).__name__} of shape {getattr(loss, 'shape', None)}."
            )
        new_rest = nnx.state(model, self._rest_filter)
        return loss.astype(jnp.float32), new_rest

    def _local_grads(self, leaves, rest, batch):
        """This device's loss and partial gradients, summed over its micro-batches."""
        k = self.accum_steps
        grad_fn = jax.value_and_grad(self._loss_of, has_aux=True)
        if k == 1:
            (loss, rest), grads = grad_fn(leaves, rest, batch)
            return loss, grads, rest

        micro = jax.tree.map(lambda x: jnp.reshape(x, (k, x.shape[0] // k, *x.shape[1:])), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        # the vma types of one micro-batch's loss and gradients, for the carry
        (loss0, _), grads0 = jax.eval_shape(grad_fn, leaves, rest, first)

        def zeros_like(s, dtype=None):
            z = jnp.zeros(s.shape, dtype or s.dtype)
            mat = getattr(s, "manual_axis_type", None)
            return kernels.ensure_varying(z, tuple(mat.varying) if mat is not None else ())

        acc = [p.reduce_dtype for p in self.placements]
        carry0 = (
            zeros_like(loss0),
            [zeros_like(g, d) for g, d in zip(grads0, acc, strict=True)],
            rest,
        )

        def one(carry, mb):
            loss_sum, grad_sum, rest = carry
            (loss, rest), grads = grad_fn(leaves, rest, mb)
            grad_sum = [a + g.astype(a.dtype) for a, g in zip(grad_sum, grads, strict=True)]
            return (loss_sum + loss, grad_sum, rest), None

        (loss, grads, rest), _ = jax.lax.scan(one, carry0, micro)
        return loss, grads, rest

    # ------------------------------------------------------------- the body
    def _body(self, params, master, opt_state, rest, batch):
        leaves = jax.tree.leaves(params)
        places = self.placements
        if self._cast_params:
            # typed varying over the batch axes they are replicated over: the gradient
            # stays this device's partial sum, and the one reduction is the strategy's
            leaves = [kernels.ensure_varying(x, p.replicated)
                      for x, p in zip(leaves, places, strict=True)]  # fmt: skip
        loss, grads, new_rest = self._local_grads(leaves, rest, batch)
        new_rest = self._reduce_rest(new_rest)
        over = tuple(a for a in self.live if a in kernels.varying_axes(loss))
        self._loss_axes = over
        n = math.prod(self.mesh.shape[a] for a in over)
        scale = 1.0 / (n * self.accum_steps)
        loss = kernels.all_reduce(loss, over) * jnp.float32(scale)  # loss: f32[], global mean
        reduced = self._reduce(grads, scale)
        stored = jax.tree.leaves(params)
        if master is None:
            current = [
                kernels.local_shard(x, p.replicated) if p.shard_state else x
                for x, p in zip(stored, places, strict=True)
            ]
        else:
            current = jax.tree.leaves(master)  # the flat f32 shards
        new, opt_state = self._update(reduced, opt_state, current)
        new_leaves = self._gather(new)
        if master is not None:
            master = jax.tree.unflatten(self._treedef, new)
        new_params = jax.tree.unflatten(self._treedef, new_leaves)
        return new_params, master, opt_state, new_rest, loss

    def _reduce(self, grads, scale):
        """Sum the partial gradients over their replicated axes, one collective per bucket."""
        out = [None] * len(grads)
        for i, (g, p) in enumerate(zip(grads, self.placements, strict=True)):
            if not p.replicated:
                out[i] = g * jnp.asarray(scale, g.dtype)
        for (axes, _), buckets in self.bucket_groups.items():
            for b in buckets:
                _, rdt = self._bucket_dtypes(b)
                parts = [kernels.ensure_varying(grads[i].astype(rdt), axes) for i in b.leaves]
                for i, g in zip(b.leaves, self.strategy.reduce(parts, axes), strict=True):
                    out[i] = g * jnp.asarray(scale, g.dtype)
        return out

    def _gather(self, new):
        """ZeRO: all-gather the updated flat shards into the stored parameters."""
        out = list(new)
        if not self.strategy.shard_state:
            return out
        for (axes, _), buckets in self.bucket_groups.items():
            for b in buckets:
                gdt, _ = self._bucket_dtypes(b)
                row = [new[i].astype(gdt) for i in b.leaves]
                gathered = kernels.all_gather_bucket(row, b.shapes, axes)
                for i, x in zip(b.leaves, gathered, strict=True):
                    out[i] = x
        return out

    def _update(self, grads, opt_state, params):
        """`tx.update` + `optax.apply_updates` on leaves (full or shards)."""
        g = jax.tree.unflatten(self._treedef, grads)
        p = jax.tree.unflatten(self._treedef, params)
        with zero.record_norms() as norms:
            if self.optax_norm_hook:
                with zero.global_norm_hook():
                    updates, opt_state = self.tx.update(g, opt_state, p)
            else:
                updates, opt_state = self.tx.update(g, opt_state, p)
        self._norm_reductions = list(norms)
        new = jax.tree.leaves(optax.apply_updates(p, updates))
        # updates keep each leaf's dtype (optax may promote a bf16 leaf)
        return [x.astype(q.dtype) for x, q in zip(new, params, strict=True)], opt_state

    def _reduce_rest(self, new_rest):
        """Every updated Variable must be one value on the devices that store one copy.

        A value that differs between devices over batch axes (computed from
        each device's own examples) is averaged over them with
        `state_reduction='mean'`, else it is an error.
        """
        specs = jax.tree.leaves(self.state_specs().rest, is_leaf=lambda x: isinstance(x, jax.P))
        flat, treedef = jax.tree_util.tree_flatten_with_path(new_rest)
        self._state_reductions = []
        out = []
        for (path, x), spec in zip(flat, specs, strict=True):
            extra = kernels.varying_axes(x) - set(spec_axes(spec))
            if not extra:
                out.append(x)
                continue
            where = path_str(path)
            batch_only = extra <= set(self.live)
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            if self.state_reduction == "mean" and batch_only and floating:
                axes = tuple(a for a in self.live if a in extra)
                n = math.prod(self.mesh.shape[a] for a in axes)
                out.append(kernels.all_reduce(x, axes) / jnp.asarray(n, x.dtype))
                self._state_reductions.append((axes, where, x.size * x.dtype.itemsize, x.dtype))
                continue
            hint = (
                "Pass Trainer(state_reduction='mean') if it is a mean over the batch (a running "
                "mean of activations), "
                if batch_only and floating
                else ""
            )
            raise ValueError(
                f"Trainer: the forward updates the nnx.Variable {where!r} (local shape "
                f"{tuple(x.shape)}) with values that differ between devices over mesh axes "
                f"{sorted(extra)}: each device computed it from its own batch shard, where one "
                f"device would compute it from the whole batch. {hint}reduce it over the batch "
                f"in the model (nnx.BatchNorm is synchronised automatically), or keep "
                f"per-example values out of module state."
            )
        return jax.tree_util.tree_unflatten(treedef, out)
