"""FSDP (ZeRO-3) inside a shardlax layer: the fsdp axis, gathered parameters, declarations.

FSDP (ZeRO-3) in a layer: the `fsdp_axis` (default ``'fsdp'`` when the mesh
has it and the batch is split over it) splits one more dim of each parameter,
so each device stores 1/N of it; the layer all-gathers it inside its
`shard_map` just before use and its gradient leaves reduce-scattered. How a
new layer adopts it (ColumnParallelLinear is the worked example):
  1. `__init__`: call `self._setup_mesh(...)` then `self._setup_fsdp(fsdp_axis,
     reshard_after_forward, mixed_precision)`.
  2. For each parameter, `spec = self._fsdp_spec(tp_spec, shape, dim, "arg")`
     (adds the fsdp axis on `dim`, after any model axis there; checks
     divisibility with a clear error) and build it with
     `sharded_param(..., spec)`; remember `dim` (choose a dim the model axis
     does not split when there is one: [D, F] column kernel -> dim 0).
  3. In the shard_map body, write the math as `use(params, x)` on whole
     parameters and return `self._fsdp_apply(use, (w_shard, b_shard), dims, x)`
     (instead of `self._replicated_for_grad`); compute in
     `self._compute_dtype()`. With `reshard_after_forward` the gathered
     parameters are freed after the forward and re-gathered in the backward.
  4. Run the body with `self._shard_map(body, args, in_specs, out_spec)`
     (it drops `None` args such as a missing bias).
  5. In `declared_collectives`, add `self._declare_fsdp(shape, dim, ...)` per
     parameter (all-gather forward, reduce-scatter + data all-reduce backward).
Biases and other 1-D parameters are split over the fsdp axis too (on their
only dim, after any model-axis split), so every parameter's per-device bytes
are total/N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import FSDP
from shardlax.declarations import Declared, Role, hlo_dtype
from shardlax.mesh import axes_size, check_axis, live_axes
from shardlax.placement import storage_spec
from shardlax.precision import MixedPrecision, wire_dtypes

#: `fsdp_axis` default: ``'fsdp'`` when the mesh has it and the batch is split
#: over it, else no FSDP.
AUTO = "auto"


class LayerFSDP:
    """The FSDP half of `ShardedLayer` (a mixin): needs its `mesh`, `axis_name`,
    `batch_axes`, `param_dtype` and `_declare`."""

    def _setup_fsdp(
        self,
        fsdp_axis: str | None,
        reshard_after_forward: bool = True,
        mixed_precision: MixedPrecision | None = None,
    ) -> None:
        """Choose and validate the fsdp axis; call after `_setup_mesh`."""
        owner = type(self).__name__
        if fsdp_axis == AUTO:
            fsdp_axis = FSDP if FSDP in self.batch_axes else None
        if fsdp_axis is not None:
            if not isinstance(fsdp_axis, str):
                raise TypeError(
                    f"{owner}(fsdp_axis={fsdp_axis!r}): expected a mesh axis name or None. "
                    f"Pass fsdp_axis='fsdp', or None to keep the parameters whole."
                )
            check_axis(self.mesh, fsdp_axis, owner, "fsdp_axis")
            if fsdp_axis == self.axis_name:
                raise ValueError(
                    f"{owner}(fsdp_axis={fsdp_axis!r}, axis_name={self.axis_name!r}): the "
                    f"fsdp axis splits the batch and the tensor-parallel axis does not, so "
                    f"they cannot be the same axis. Pass fsdp_axis='fsdp' on a mesh from "
                    f"shardlax.make_mesh(fsdp=...)."
                )
            if fsdp_axis not in self.batch_axes:
                raise ValueError(
                    f"{owner}(fsdp_axis={fsdp_axis!r}, batch_axes={self.batch_axes}): the batch "
                    f"must be split over the fsdp axis (mesh axis {fsdp_axis!r}, size "
                    f"{self.mesh.shape[fsdp_axis]}), or every device of it would compute the "
                    f"same gradient and the reduce-scatter would count it "
                    f"{self.mesh.shape[fsdp_axis]} times. Add {fsdp_axis!r} to batch_axes, "
                    f"or pass fsdp_axis=None."
                )
        if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
            raise TypeError(
                f"{owner}(mixed_precision={mixed_precision!r}): expected a "
                f"shardlax.precision.MixedPrecision or None, got "
                f"{type(mixed_precision).__name__}. Pass "
                f"MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)."
            )
        self.fsdp_axis = fsdp_axis
        self.fsdp_size = 1 if fsdp_axis is None else self.mesh.shape[fsdp_axis]
        self.reshard_after_forward = bool(reshard_after_forward)
        self.mixed_precision = mixed_precision

    @property
    def _fsdp_live(self) -> bool:
        """Parameters are split over a fsdp axis of size > 1."""
        return self.fsdp_axis is not None and self.fsdp_size > 1

    def _fsdp_spec(self, spec: P, shape: Sequence[int], dim: int, argument: str) -> P:
        """`spec` with the fsdp axis added on `dim` (after any axes already there).

        `P(None, 'model')` on dim 0 gives `P('fsdp', 'model')`; `P('model')` on
        dim 0 gives `P(('model', 'fsdp'))`, whose fsdp-gather is the model
        shard. Raises if `shape[dim]` is not divisible by the product of sizes.
        """
        if not self._fsdp_live:
            return spec
        out = storage_spec(len(shape), [(dim, self.fsdp_axis)], spec)
        entry = out[dim]
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        size = axes_size(self.mesh, axes)
        if shape[dim] % size:
            owner = type(self).__name__
            rest = shape[dim] // max(1, size // self.fsdp_size)
            raise ValueError(
                f"{owner}({argument}={shape[dim]}) cannot be sharded over mesh axes {axes} "
                f"(size {size}) for FSDP: {size} does not divide {shape[dim]} (parameter "
                f"shape {tuple(shape)}, dim {dim}). Choose {argument} divisible by {size}, "
                f"or a mesh whose {self.fsdp_axis!r} axis divides {rest}, "
                f"or pass fsdp_axis=None to keep this layer's parameters whole."
            )
        return out

    def _compute_dtype(self) -> Any:
        """The dtype the layer computes in: its `dtype`, else the policy's `param_dtype`."""
        dtype = getattr(self, "dtype", None)
        if dtype is None and self.mixed_precision is not None:
            return self.mixed_precision.param_dtype
        return dtype

    def _gather(
        self, shard: jax.Array | None, dim: int, token_axes: Sequence[str] = ()
    ) -> jax.Array | None:
        """Inside the shard_map body: the whole (over fsdp) parameter, ready for use.

        FSDP: one tiled all-gather over the fsdp axis (its gradient is one
        reduce-scatter, then an all-reduce of the shard over the other batch
        axes), in the policy's `param_dtype` when a `mixed_precision` is set.
        Without FSDP: the parameter cast to varying over the batch axes (its
        gradient is all-reduced over them), as `_replicated_for_grad`.

        `token_axes`: further axes the tokens this parameter meets are split
        over (the model axis for a bias added after a sequence-parallel
        reduce-scatter); its gradient is summed over them too, in the same
        all-reduce as the other batch axes.
        """
        if shard is None:
            return None
        live = live_axes(self.mesh, (*self.batch_axes, *token_axes))
        compute, reduce = wire_dtypes(shard.dtype, self.mixed_precision)
        if not self._fsdp_live:
            return kernels.ensure_varying(shard, live).astype(compute)
        return kernels.fsdp_gather(
            shard,
            self.fsdp_axis,
            dim=dim,
            replicated_axes=tuple(a for a in live if a != self.fsdp_axis),
            gather_dtype=compute,
            reduce_dtype=reduce,
        )

    def _fsdp_apply(
        self,
        fn: Callable[[Any, Any], Any],
        shards: tuple,
        dims: tuple[int, ...],
        args: Any,
        token_axes: tuple[tuple[str, ...], ...] | None = None,
    ) -> Any:
        """Inside the shard_map body: `fn(params, args)` with `params` gathered.

        `shards` are the parameters as the body receives them (`None` for an
        absent one), `dims` the dim each is split on over the fsdp axis,
        `token_axes` (default none) the extra axes each one's gradient is
        summed over (see `_gather`). With FSDP and `reshard_after_forward`,
        `kernels.fsdp_call` frees the gathered parameters after the forward
        and re-gathers them in the backward; otherwise plain autodiff keeps them.
        """
        extra = ((),) * len(dims) if token_axes is None else token_axes

        def gather(ps):
            return tuple(self._gather(p, d, t) for p, d, t in zip(ps, dims, extra, strict=True))

        if not self._fsdp_live:  # nothing gathered: plain autodiff of the replicated params
            return fn(gather(tuple(shards)), args)
        return kernels.fsdp_call(
            fn,
            tuple(shards),
            args,
            gather=gather,
            reshard_after_forward=self.reshard_after_forward,
        )

    def _declare_fsdp(
        self, local_shape: Sequence[int], dim: int, *, grad: bool, regather: bool, why: str,
        token_axes: Sequence[str] = (),
    ) -> list[Declared]:  # fmt: skip
        """The FSDP collectives of one parameter whose model-local shape is `local_shape`.

        Forward: 1 all-gather over the fsdp axis of the gathered bytes (in the
        gather dtype). Backward (`grad`): 1 reduce-scatter over the fsdp axis
        (reduce dtype) and 1 all-reduce of the shard over the other batch axes;
        plus 1 all-gather when `regather` (reshard_after_forward and the
        backward needs the parameter's value). Without FSDP: the all-reduce of
        the whole local parameter over the batch axes. `token_axes` join the
        batch axes of the all-reduce (see `_gather`).
        """
        stored = self.param_dtype
        gdt, rdt = wire_dtypes(stored, self.mixed_precision)
        n = 1
        for d in local_shape:
            n *= int(d)
        full = n * jnp.dtype(gdt).itemsize
        if not self._fsdp_live:
            if not grad:
                return []
            nbytes = n * jnp.dtype(stored).itemsize
            axes = (*self.batch_axes, *token_axes)
            return self._declare("all-reduce", axes, stored, nbytes, f"d{why}",
                                 role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        gname = gather_hlo_dtype(gdt)
        out = self._declare_as("all-gather", (self.fsdp_axis,), gname, full, f"gather {why}",
                               role=Role.PARAM_GATHER, param=why)  # fmt: skip
        if not grad:
            return out
        if regather:
            out += self._declare_as("all-gather", (self.fsdp_axis,), gname, full,
                                    f"re-gather {why} (reshard_after_forward)")  # fmt: skip
        out += self._declare("reduce-scatter", (self.fsdp_axis,), rdt,
                             n * jnp.dtype(rdt).itemsize, f"d{why} over fsdp",
                             role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        others = (*(a for a in self.batch_axes if a != self.fsdp_axis), *token_axes)
        shard_bytes = n // self.fsdp_size * jnp.dtype(rdt).itemsize
        out += self._declare("all-reduce", others, rdt, shard_bytes, f"d{why} shard",
                             role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        return out

    def _declare_as(
        self, kind: str, axes: Sequence[str], hlo_dtype: str, nbytes: int, why: str,
        **fields: Any,
    ) -> list[Declared]:  # fmt: skip
        live = tuple(a for a in axes if self.mesh.shape[a] > 1)
        if not live:
            return []
        return [Declared(kind, live, hlo_dtype, 1, int(nbytes), why, **fields)]

    def _replicated_for_grad(self, *params: jax.Array | None) -> list[jax.Array | None]:
        """Cast batch-replicated parameters to varying over the batch axes.

        Their gradients are then all-reduced over the batch axes in the
        parameter dtype (before any compute-dtype cast), once per parameter.
        """
        live = live_axes(self.mesh, self.batch_axes)
        return [None if p is None else kernels.ensure_varying(p, live) for p in params]


def gather_hlo_dtype(dtype: Any) -> str:
    """The HLO dtype of an FSDP all-gather: 16/8-bit floats travel as their bits."""
    return hlo_dtype(kernels.gather_bits_dtype(dtype) or dtype)
