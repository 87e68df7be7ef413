"""Where a `Trainer`'s state lives: buckets, the TrainState's specs, init, full parameters,
and whether `tx` is exact on the shards it will see (flat ZeRO shards, local shards).

`Trainer` (`shardlax.train`) inherits these from `_Layout`: everything here
reads only the Trainer's placements (`shardlax.placement`), mesh, strategy,
optimizer and mixed-precision policy, and never runs a step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from shardlax import placement, zero
from shardlax._train_steps import TrainState
from shardlax.mesh import axes_size, place

_OWNER = "Trainer"


class _Layout:
    """The layout half of `shardlax.Trainer` (see the module docstring)."""

    def _plan_buckets(self, bucket_bytes):
        """Buckets per group of parameters replicated over the same batch axes."""
        # one group per (replicated axes, axes the parameter is split over): a bucket
        # mixes only leaves of one vma type, so its slices keep their own
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
        for i, p in enumerate(self.placements):
            if p.replicated:
                split = tuple(sorted(placement.spec_axes(p.spec)))
                groups.setdefault((p.replicated, split), []).append(i)
        if bucket_bytes is not None and (
            isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1
        ):
            raise ValueError(
                f"{_OWNER}(bucket_bytes={bucket_bytes!r}): expected a positive int (bytes) or "
                f"None for one bucket per dtype. For example bucket_bytes=25 * 2**20."
            )
        out = {}
        for key, idx in groups.items():
            n = axes_size(self.mesh, key[0])
            local = [jax.ShapeDtypeStruct(self.placements[i].local_shape, self._shapes[i].dtype)
                     for i in idx]  # fmt: skip
            planned = zero.plan_buckets(local, n, bucket_bytes)
            out[key] = tuple(
                zero.Bucket(tuple(idx[j] for j in b.leaves), b.shapes, b.dtype, b.n)
                for b in planned
            )
        return out

    @property
    def _split(self) -> str | tuple[str, ...] | None:
        """The PartitionSpec entry of the batch axes (None when all have size 1)."""
        if not self.live:
            return None
        return self.live if len(self.live) > 1 else self.live[0]

    @property
    def layer_sharded(self) -> bool:
        return self.strategy.layer_sharded

    @property
    def sharded_state(self) -> bool:
        return self.strategy.shard_state

    def _batch_spec(self, x) -> P:
        return P(self._split) if getattr(x, "ndim", 0) else P()

    def _put(self, x, spec):
        return place(x, self.mesh, spec)

    def _shardings(self, specs):
        return jax.tree.map(
            lambda s: jax.sharding.NamedSharding(self.mesh, s),
            specs,
            is_leaf=lambda x: isinstance(x, P),
        )

    def _flat_params(self) -> Any:
        """ShapeDtypeStructs of the parameters as optax sees them (full or flat)."""
        return jax.tree.unflatten(self._treedef, [p.state_struct() for p in self.placements])

    def _opt_specs(self) -> Any:
        """Optimizer state that follows a parameter is laid out like its (flat) shards."""

        def follow(x, spec, shape):
            # a MaskedNode (optax.masked, multi_transform) holds no state; state of another
            # shape than its parameter (sm3's per-dim accumulators) is replicated
            if isinstance(x, optax.MaskedNode):
                return x
            if isinstance(x, list | tuple) or tuple(getattr(x, "shape", ())) != shape:
                return jax.tree.map(lambda _: P(), x)
            return spec

        placements = self.placements
        return optax.tree_utils.tree_map_params(
            self.tx,
            follow,
            jax.eval_shape(self.tx.init, self._flat_params()),
            jax.tree.unflatten(self._treedef, [p.state_spec for p in placements]),
            jax.tree.unflatten(self._treedef, [p.state_shape for p in placements]),
            transform_non_params=lambda _: P(),
            is_leaf=lambda x: isinstance(x, P | optax.MaskedNode | list) or type(x) is tuple,
        )

    def state_specs(self) -> TrainState:
        """The PartitionSpec of every leaf of the `TrainState`."""
        master = None
        if self.mixed_precision is not None:
            master = jax.tree.unflatten(self._treedef, [p.state_spec for p in self.placements])
        return TrainState(
            params=jax.tree.unflatten(self._treedef, [p.spec for p in self.placements]),
            opt_state=self._opt_specs(),
            rest=self._rest_specs,
            step=P(),
            master=master,
        )

    def _check_tx_on_flat_shards(self) -> None:
        """ZeRO runs `tx.update` on flat 1-D shards: refuse a transform that is not exact there.

        `shardlax._optax_check` compares the traced update on the local
        parameter shapes with the one on the flat shards (elementwise, same
        program up to shapes; masks decided by `ndim`, per-parameter norms,
        factored statistics are refused with the transform's name and fixes).
        """
        from shardlax import _optax_check

        sharded = [p for p in self.placements if p.shard_state]
        if not sharded:
            return
        local = jax.tree.unflatten(
            self._treedef,
            [jax.ShapeDtypeStruct(p.local_shape, p.reduce_dtype) for p in self.placements],
        )  # fmt: skip
        n = max(p.n_replicated for p in sharded)
        _optax_check.check_flat_shard_exact(
            self.tx, local, n, _OWNER, strategy=self.strategy.name,
            norm_hook=self.optax_norm_hook,
        )  # fmt: skip

    def _check_tx_on_local_shards(self) -> None:
        """Split parameters (fsdp, tensor parallelism) meet `tx.update` as local shards:
        refuse a transform that is not exact there (`_optax_check.check_local_shard_exact`)."""
        from shardlax import _optax_check

        shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in self._shapes]
        local = [jax.ShapeDtypeStruct(p.local_shape, s.dtype)
                 for p, s in zip(self.placements, self._shapes, strict=True)]  # fmt: skip
        _optax_check.check_local_shard_exact(
            self.tx, jax.tree.unflatten(self._treedef, shapes),
            jax.tree.unflatten(self._treedef, local), _OWNER, strategy=self.strategy.name,
            norm_hook=self.optax_norm_hook,
        )  # fmt: skip

    def _bucket_dtypes(self, b: Any) -> tuple[Any, Any]:
        """`(compute, reduce)` of a bucket's parameters (one dtype per bucket)."""
        p = self.placements[b.leaves[0]]
        return p.compute_dtype, p.reduce_dtype

    def _initializer(self):
        """`make(params, rest) -> TrainState` and the specs (for init and abstract_state)."""
        specs = self.state_specs()
        places = self.placements

        def local_flat(params):
            def body(*leaves):
                from shardlax import kernels

                return [kernels.local_shard(x.astype(p.reduce_dtype), p.replicated)
                        if p.shard_state else x
                        for x, p in zip(leaves, places, strict=True)]  # fmt: skip

            return jax.shard_map(
                body,
                mesh=self.mesh,
                in_specs=tuple(p.spec for p in places),
                out_specs=[p.state_spec if p.shard_state else p.spec for p in places],
            )(*jax.tree.leaves(params))

        def make(params, rest):
            params = jax.tree.map(lambda x, s: place(x, self.mesh, s), params, specs.params)
            master = None
            if self.strategy.shard_state:
                flat = jax.tree.unflatten(self._treedef, local_flat(params))
                opt = self.tx.init(flat)
                if self.mixed_precision is not None:
                    master = flat
                    params = jax.tree.unflatten(self._treedef, [
                        x.astype(p.compute_dtype)
                        for x, p in zip(jax.tree.leaves(params), places, strict=True)])  # fmt: skip
            else:
                opt = self.tx.init(params)
            return TrainState(params, opt, rest, jnp.zeros((), jnp.int32), master)

        return make, specs

    def init(self) -> TrainState:
        """The first `TrainState`: the model's parameters, placed, and `tx.init` of them.

        Under zero1/zero2 the optimizer state is initialised on the flat,
        zero-padded parameters (`shardlax.placement`), 1/N per device.
        """
        make, specs = self._initializer()
        return jax.jit(make, out_shardings=self._shardings(specs))(
            self._init_params, self._init_rest
        )

    def abstract_state(self) -> TrainState:
        """`init()`'s result as `jax.ShapeDtypeStruct`s with their shardings; nothing allocated.

        For compile-only studies (`shardlax.plan`): `trainer.step.lower(
        trainer.abstract_state(), batch_structs).compile()` reports the per-device
        memory and collectives of a configuration without its memory. The model
        may itself be abstract (built under `nnx.eval_shape`).
        """
        make, specs = self._initializer()
        out = jax.eval_shape(make, self._init_params, self._init_rest)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            out,
            self._shardings(specs),
        )

    def full_params(self, state: TrainState) -> Any:
        """The parameters in their stored dtype and layout: `state.params`, or the
        f32 master shards of a mixed-precision step gathered (padding cut off)."""
        if state.master is None:
            return state.params
        places = self.placements

        def body(*leaves):
            from shardlax import kernels

            out = []
            for m, p in zip(leaves, places, strict=True):
                if not p.shard_state:
                    out.append(m)
                    continue
                (full,) = kernels.all_gather_bucket([m], [p.local_shape], p.replicated)
                out.append(full)
            return out

        leaves = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=tuple(p.state_spec for p in places),
            out_specs=[p.spec for p in places],
        )(*jax.tree.leaves(state.master))
        return jax.tree.unflatten(self._treedef, leaves)

    def state_bytes(self) -> dict[str, int]:
        """Bytes per device of the parameters and the optimizer state (global / shard)."""
        state = jax.eval_shape(self.init)
        specs = self.state_specs()

        def local(x, s):
            shard = jax.sharding.NamedSharding(self.mesh, s).shard_shape(x.shape)
            return math.prod(shard) * jnp.dtype(x.dtype).itemsize

        def total(tree, spec_tree):
            return sum(
                jax.tree.leaves(
                    jax.tree.map(local, tree, spec_tree, is_leaf=lambda x: isinstance(x, P))
                )
            )

        out = {
            "params": total(state.params, specs.params),
            "opt_state": total(state.opt_state, specs.opt_state),
        }
        if state.master is not None:
            out["master"] = total(state.master, specs.master)
        return out
