"""The per-device step bodies of `shardlax.train.Trainer`, and its `TrainState`.

`_Steps` is a mixin of `Trainer` (which provides the mesh, the specs, the
bucket plan and the checks): one method per kind of step.

- `_replicated_step`: dp / zero1 / zero2. One `shard_map` over the mesh:
  local gradients over the micro-batches (no collective), one reduction per
  bucket, optax on full gradients (dp) or on flat shards (zero1/2), one
  all-gather per bucket.
- `_layer_sharded_step`: fsdp / fsdp+tp. The gradient on global arrays (the
  layers reduce it), then optax in a `shard_map` over the parameters' specs.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (arXiv:1910.02054).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from shardlax import kernels, zero
from shardlax.mesh import place


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What a train step carries from one step to the next (a pytree).

    Attributes:
      params: the model's `nnx.Param` state (global arrays; replicated over
        the data axes for dp/zero1/zero2).
      opt_state: the optax state. Under zero1/zero2 every leaf that follows a
        parameter is that parameter flattened and zero-padded to
        `N * ceil(n_p / N)` elements and split `P(data)`: 1/N per device.
      rest: the model's other state (e.g. RNG counters), read-only in the step.
      step: the number of steps taken (int32 scalar).
      master: with a `mixed_precision` policy (zero1/zero2), the f32 master
        parameters, flat and zero-padded like the optimizer state and split
        `P(data)`; `params` then holds their `param_dtype` copy. None otherwise.
    """

    params: Any
    opt_state: Any
    rest: Any
    step: jax.Array
    master: Any = None


class _Steps:
    """The train steps of `Trainer` (a mixin; `Trainer` holds the layout)."""

    def _step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        self._check_batch(batch)
        if self.layer_sharded:
            return self._layer_sharded_step(state, batch)
        return self._replicated_step(state, batch)

    def _replicated_step(self, state: TrainState, batch: Any):
        """dp / zero1 / zero2: the whole step in one shard_map over the mesh."""
        specs = self.state_specs()
        batch_specs = jax.tree.map(lambda x: P(self._split), batch)
        params = jax.tree.map(lambda x, s: place(x, self.mesh, s), state.params, specs.params)
        batch = jax.tree.map(lambda x, s: place(x, self.mesh, s), batch, batch_specs)
        body = jax.shard_map(
            self._body,
            mesh=self.mesh,
            in_specs=(specs.params, specs.master, specs.opt_state, specs.rest, batch_specs),
            out_specs=(specs.params, specs.master, specs.opt_state, P()),
        )
        new_params, master, opt_state, loss = body(
            params, state.master, state.opt_state, state.rest, batch
        )
        new_state = TrainState(new_params, opt_state, state.rest, state.step + 1, master)
        return new_state, {"loss": loss}

    def _layer_sharded_step(self, state: TrainState, batch: Any):
        """fsdp / fsdp+tp: the layers reduce the gradients; optax runs on their shards.

        The loss and its gradient are taken on global arrays: each shardlax
        layer's shard_map all-gathers its parameters and reduce-scatters their
        gradients (over the fsdp axis) and all-reduces them over the data axes.
        The update is one shard_map over the parameters' own specs, so optax
        sees each device's shards and the global norm is reduced over the axes
        each parameter is split over.
        """
        specs = self.state_specs()
        split = self._split
        batch = jax.tree.map(lambda x: place(x, self.mesh, P(split)), batch)
        rest = state.rest

        def loss_of(params, micro):
            return self.loss_fn(nnx.merge(self.graphdef, params, rest), micro)

        grad_fn = jax.value_and_grad(loss_of)
        k = self.accum_steps
        if k == 1:
            loss, grads = grad_fn(state.params, batch)
        else:
            # micro-batch j = rows j, j + k, j + 2k, ...: each spans every device
            def micro_of(x):
                rows = jax.sharding.NamedSharding(self.mesh, P(split))
                x = jnp.reshape(x, (x.shape[0] // k, k, *x.shape[1:]), out_sharding=rows)
                return jnp.swapaxes(x, 0, 1)  # [k, B/k, ...]

            micro = jax.tree.map(micro_of, batch)

            def one(carry, mb):
                loss, grads = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (loss.astype(jnp.float32), grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(one, zeros, micro)
            loss = loss / k
            grads = jax.tree.map(lambda g: g / jnp.asarray(k, g.dtype), grads)
        grads = jax.tree.map(lambda g, s: place(g, self.mesh, s), grads, specs.params)
        update = jax.shard_map(
            self._sharded_update,
            mesh=self.mesh,
            in_specs=(specs.params, specs.params, specs.opt_state),
            out_specs=(specs.params, specs.opt_state),
        )
        new_params, opt_state = update(grads, state.params, state.opt_state)
        new_state = TrainState(new_params, opt_state, rest, state.step + 1)
        return new_state, {"loss": loss}

    def _sharded_update(self, grads, params, opt_state):
        new_leaves, opt_state = self._update(
            jax.tree.leaves(grads), opt_state, jax.tree.leaves(params)
        )
        return jax.tree.unflatten(self._treedef, new_leaves), opt_state

    def _local_grads(self, leaves, rest, batch):
        """Sum over micro-batches of this device's loss and gradients (no collective)."""
        k = self.accum_steps

        def loss_of(leaves, micro):
            model = nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves), rest)
            return self.loss_fn(model, micro)

        grad_fn = jax.value_and_grad(loss_of)
        if k == 1:
            return grad_fn(leaves, batch)
        micro = jax.tree.map(lambda x: jnp.reshape(x, (k, x.shape[0] // k, *x.shape[1:])), batch)

        def one(carry, mb):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(leaves, mb)
            return (
                loss_sum + loss.astype(jnp.float32),
                [a + g.astype(a.dtype) for a, g in zip(grad_sum, grads, strict=True)],
            ), None

        # accumulate in the reduce dtype (f32 under a bf16 mixed-precision policy)
        acc = [self._reduce_dtype(s.dtype) for s in self._shapes]
        zeros = [kernels.ensure_varying(jnp.zeros(x.shape, d), self._vary(x))
                 for x, d in zip(leaves, acc, strict=True)]  # fmt: skip
        loss0 = kernels.ensure_varying(jnp.zeros((), jnp.float32), self.live)  # batch varies
        (loss, grads), _ = jax.lax.scan(one, (loss0, zeros), micro)
        return loss, grads

    def _vary(self, x) -> tuple[str, ...]:
        return tuple(kernels.varying_axes(x))

    def _body(self, params, master, opt_state, rest, batch):
        leaves = jax.tree.leaves(params)
        live, n, k = self.live, self.n, self.accum_steps
        if self._cast_params:
            # Replicated params typed as varying: their gradients stay per device, and
            # the one reduction per step is ours (all-reduce or reduce-scatter), not
            # the all-reduce autodiff would insert for an invariant input.
            leaves = [kernels.ensure_varying(x, live) for x in leaves]
        loss, grads = self._local_grads(leaves, rest, batch)
        scale = 1.0 / (n * k)
        loss = kernels.all_reduce(loss, live) * scale  # loss: f32[], the global mean
        params_leaves = jax.tree.leaves(params)
        if self.strategy == "dp":
            full = [None] * len(leaves)
            for b in self.buckets:
                reduced = kernels.all_reduce_bucket([grads[i] for i in b.leaves], live)
                for i, g in zip(b.leaves, reduced, strict=True):
                    full[i] = g * jnp.asarray(scale, g.dtype)
            new_leaves, opt_state = self._update(full, opt_state, params_leaves)
            return jax.tree.unflatten(self._treedef, new_leaves), None, opt_state, loss
        reduce = (
            kernels.reduce_scatter_bucket
            if self.strategy == "zero2"
            else kernels.all_reduce_then_shard_bucket
        )
        grad_shards = [None] * len(leaves)
        for b in self.buckets:
            rdt = self._reduce_dtype(b.dtype)
            shards = reduce([grads[i].astype(rdt) for i in b.leaves], live)  # [S_p] each
            for i, g in zip(b.leaves, shards, strict=True):
                grad_shards[i] = g * jnp.asarray(scale, g.dtype)
        if master is None:
            param_shards = [kernels.local_shard(x, live) for x in params_leaves]  # [S_p] each
        else:
            param_shards = jax.tree.leaves(master)  # [S_p] each, f32
        new_shards, opt_state = self._update(grad_shards, opt_state, param_shards)
        new_leaves = [None] * len(leaves)
        for b in self.buckets:
            gdt = self._gather_dtype(b.dtype)
            row = [new_shards[i].astype(gdt) for i in b.leaves]
            for i, x in zip(b.leaves, kernels.all_gather_bucket(row, b.shapes, live), strict=True):
                new_leaves[i] = x
        if master is not None:
            master = jax.tree.unflatten(self._treedef, new_shards)
        return jax.tree.unflatten(self._treedef, new_leaves), master, opt_state, loss

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
        return jax.tree.leaves(optax.apply_updates(p, updates)), opt_state
