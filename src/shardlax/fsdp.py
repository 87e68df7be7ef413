"""`fully_shard`: make any Flax NNX module an FSDP (ZeRO-3) unit.

`fully_shard(module, mesh=mesh)` splits every `nnx.Param` of `module` over the
fsdp mesh axis (each device stores 1/N of it) and returns an `FSDPModule`
whose `__call__` runs the module inside one `jax.shard_map`: the parameters
are all-gathered on entry, the module computes on its batch shard, and the
gathered parameters are freed after the forward (`reshard_after_forward`,
the default) and gathered again in the backward. Gradients leave
reduce-scattered, in the parameters' sharded layout.

Collectives per unit and training step (N = fsdp axis size, |p| = the bytes
of a parameter in the gather dtype, |g| in the reduce dtype):
  forward:  1 all-gather per parameter over `fsdp`, |p| (N-1)/N on the wire.
  backward: 1 reduce-scatter per parameter over `fsdp`, |g| (N-1)/N; with
            `reshard_after_forward=True`, 1 more all-gather per parameter whose
            value the backward needs (a matmul's weight; not a bias); with a
            pure data axis too, 1 all-reduce of each 1/N gradient shard over it.
Memory per device: parameters |P|/N, plus one unit's gathered parameters while
it runs, plus activations.

Which dim is split: dim 0 when N divides it (as FSDP2 does), else the first
dim N divides. A parameter none of whose dims N divides (a (10,) bias on 8
devices) is kept whole on every device, as DeepSpeed's persistence threshold
keeps small parameters: no gather, and its gradient is all-reduced over the
batch axes (1 all-reduce of its bytes). Nothing is padded, so logical shapes
stay those of the module for the user, the optimizer and checkpoints.

What a unit does with a call (FSDP2's contract, made exact):
  - arguments: arrays whose leading dim is the batch (that of the first array
    argument) are split over the batch axes; other arrays are replicated;
    `nnx.Rngs` / modules travel as replicated state and come back updated;
    anything else (flags, Python scalars) is static.
  - outputs: per-example arrays (leading dim the per-device batch, depending
    on the batch shard) are concatenated over the batch axes; arrays that do
    not depend on the batch shard are returned replicated; anything else (a
    mean over the batch shard, a Python value) is a clear error.
  - state: every non-parameter Variable the forward updates comes back into
    the module. It is stored replicated, so an update computed from one
    device's batch shard is a clear error; `nnx.BatchNorm` (training) uses
    global-batch statistics (`kernels.global_batch_moments`, one all-reduce
    over the batch axes forward and one backward) and `nnx.Dropout` draws the
    mask of the global array (`kernels.sharding_invariant_dropout`):
    bit-identical to the unwrapped module on one device, rng counters
    advancing as there.
  - tensor parallelism: shardlax layers inside the unit (the twins of
    `shardlax.parallelize`, applied first, as torchtitan applies TP before
    FSDP) run as per-device code in the unit's `shard_map`, their collectives
    over the model axis their own; the unit stores each of their parameters
    split over the fsdp axis too (`P('fsdp', 'model')` for a column kernel)
    and gathers the model-local shard over fsdp. A layer built with
    `fsdp_axis` gathers its own. Sequence-parallel layers are refused.
  - nesting: `fully_shard` blocks, then the root: the root gathers only the
    parameters no inner unit owns; inner units run as per-device code inside
    the root's `shard_map`.
  - methods: public methods of the wrapped module run through the unit
    (`fully_shard(embedder).attend(h)`); `register_fsdp_forward_method` adds
    private ones.
  - manual mode: called inside a `shard_map` over every live axis of its mesh
    (`shardlax.mesh.is_manual`), the unit runs its body on the local shards it
    is given (parameters as local shards of `param_specs`).

Example:
  >>> mesh = shardlax.make_mesh(fsdp=8)
  >>> plain = nnx.Linear(512, 512, rngs=nnx.Rngs(0))
  >>> x = jnp.ones((16, 512))
  >>> want = plain(x)
  >>> block = fully_shard(plain, mesh=mesh)  # the same module, its parameters 1/8 per device
  >>> block.module.kernel[...].sharding.spec
  P('fsdp', None)
  >>> y = nnx.jit(lambda m, x: m(x))(block, x)
  >>> bool(jnp.allclose(y, want, atol=1e-5))
  True

References:
  Zhao et al., "PyTorch FSDP", 2023 (arXiv:2304.11277); FSDP2's
  `torch.distributed.fsdp.fully_shard`.
  Rajbhandari et al., "ZeRO", 2020 (arXiv:1910.02054), stage 3.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax._axes import BATCH_AXES, FSDP
from shardlax._fsdp_declare import UnitDeclarations
from shardlax._fsdp_place import layer_specs, shard_dim
from shardlax._fsdp_place import path_key as _path_key
from shardlax._fsdp_run import run_unit
from shardlax._fsdp_scan import fully_shard_scan as fully_shard_scan
from shardlax.mesh import check_axis, present_axes, resolve_mesh
from shardlax.placement import local_shape, path_str, spec_axes, storage_spec
from shardlax.precision import MixedPrecision

_path_str = path_str  # one spelling of nnx paths (shardlax.placement)


class FSDPModule(UnitDeclarations, nnx.Module):
    """A module whose parameters are FSDP-sharded and gathered on use (see `fully_shard`).

    Attributes:
      module: the wrapped module; its `nnx.Param`s are stored 1/N per device.
      mesh, axis, batch_axes, reshard_after_forward, policy: as given.
      dims: for each parameter (in `jax.tree.leaves` order of
        `nnx.state(module, nnx.Param)`), the dim split over `axis`; `None`
        for a parameter kept whole (no dim divisible by N) or owned by a
        nested unit.
      param_specs: the PartitionSpec each parameter is stored with.
      owned: for each parameter, True when this unit gathers it (False: a
        nested `FSDPModule` owns it and gathers it itself).
    """

    def __init__(
        self,
        module: nnx.Module,
        *,
        mesh: Mesh | None = None,
        axis: str = FSDP,
        reshard_after_forward: bool = True,
        policy: MixedPrecision | None = None,
        batch_axes: Sequence[str] | None = None,
        scan: bool = False,
        remat: bool = False,
        state_reduction: str | None = None,
        per_device_random: bool = False,
    ):
        owner = f"fully_shard({type(module).__name__})"
        if state_reduction not in (None, "mean"):
            raise ValueError(
                f"{owner}(state_reduction={state_reduction!r}): expected None (state updated "
                f"from the batch shard is an error) or 'mean' (it is averaged over the batch "
                f"axes: a running mean over the batch)."
            )
        if not isinstance(module, nnx.Module):
            raise TypeError(
                f"fully_shard(module={type(module).__name__}): expected a flax.nnx.Module. "
                f"Pass an nnx module such as nnx.Linear(...) or your own block."
            )
        self.mesh = resolve_mesh(mesh, owner)
        n = check_axis(self.mesh, axis, owner, "axis")
        if batch_axes is None:
            batch_axes = present_axes(self.mesh, BATCH_AXES)
        batch_axes = tuple(batch_axes)
        for a in batch_axes:
            check_axis(self.mesh, a, owner, "batch_axes")
        if axis not in batch_axes:
            raise ValueError(
                f"{owner}(axis={axis!r}, batch_axes={batch_axes}): the batch must be split over "
                f"the fsdp axis (mesh axis {axis!r}, size {n}), or every device of it would "
                f"compute the same gradient and the reduce-scatter would count it {n} times. "
                f"Add {axis!r} to batch_axes."
            )
        if policy is not None and not isinstance(policy, MixedPrecision):
            raise TypeError(
                f"{owner}(policy={policy!r}): expected a shardlax.precision.MixedPrecision or "
                f"None, got {type(policy).__name__}. Pass "
                f"MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)."
            )
        self.axis = axis
        self.axis_size = n
        self.batch_axes = batch_axes
        self.reshard_after_forward = bool(reshard_after_forward)
        self.policy = policy
        self.scan = bool(scan)
        self.remat = bool(remat)
        self.state_reduction = state_reduction
        self.per_device_random = bool(per_device_random)
        self.forward_methods = ("__call__",)

        # nested units: their parameters keep their specs and are gathered by them
        units = {}
        for path, m in nnx.iter_graph(module):
            if isinstance(m, FSDPModule) and not any(path[: len(q)] == q for q in units):
                if m.mesh != self.mesh or m.axis != axis or m.batch_axes != batch_axes:
                    raise ValueError(
                        f"{owner}: the nested unit at {'.'.join(map(str, path))!r} was built "
                        f"with mesh axes {tuple(m.mesh.shape.items())}, axis={m.axis!r}, "
                        f"batch_axes={m.batch_axes}, this one with "
                        f"{tuple(self.mesh.shape.items())}, axis={axis!r}, batch_axes="
                        f"{batch_axes}. Nested fully_shard calls must use the same mesh and axes."
                    )
                units[tuple(path)] = m
        if units and self.scan:
            raise ValueError(
                f"{owner}(scan=True): the stacked layers cannot contain fully_shard units."
            )

        # shardlax layers (parallelize's twins): they run as per-device code in the unit
        own_specs = layer_specs(owner, module, self.mesh, axis, batch_axes, units, self.scan)

        params = nnx.state(module, nnx.Param)
        dims, specs, owned = [], [], []
        lead = 1 if self.scan else 0  # a stacked layer dim is never split
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            key = _path_key(path)
            unit = next(((q, u) for q, u in units.items() if key[: len(q)] == q), None)
            if unit is not None:
                q, u = unit
                specs.append(u.spec_of(key[len(q) + 1 :]))  # skip the unit's 'module'
                dims.append(None)
                owned.append(False)
                continue
            if key in own_specs:
                base = own_specs[key]
                if axis in spec_axes(base):  # the layer gathers it over fsdp itself
                    specs.append(base)
                    dims.append(None)
                    owned.append(False)
                    continue
                d = shard_dim(local_shape(x.shape, base, self.mesh), n) if n > 1 else None
                dims.append(d)  # the unit gathers the layer's (model-local) shard over fsdp
                specs.append(storage_spec(x.ndim, [(d, axis)] if d is not None else [], base))
                owned.append(True)
                continue
            if self.scan and x.ndim == 0:
                raise ValueError(
                    f"{owner}(scan=True): parameter {_path_str(path)!r} is a scalar, so it has "
                    f"no leading layer dim. Build the stack with nnx.vmap (see fully_shard_scan)."
                )
            d = shard_dim(x.shape[lead:], n) if n > 1 else None
            dims.append(d)  # the dim of one layer's parameter; None: kept whole
            specs.append(storage_spec(x.ndim, [(lead + d, axis)] if d is not None else []))
            owned.append(True)
        self.dims = tuple(dims)
        self.param_specs = tuple(specs)
        self.owned = tuple(owned)
        leaves, treedef = jax.tree.flatten(params)
        placed = [
            x if not o else jax.device_put(x, NamedSharding(self.mesh, s))
            for x, s, o in zip(leaves, specs, owned, strict=True)
        ]
        nnx.update(module, jax.tree.unflatten(treedef, placed))
        # the spec as Variable metadata too (as shardlax.nn layers do): nnx.eval_shape of
        # a model on an Auto mesh keeps the placement only from there
        keys = [_path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        mine = {k: sp for k, sp, o in zip(keys, specs, owned, strict=True) if o}
        for path, node in nnx.iter_graph(module):
            spec = mine.get(tuple(path)) if isinstance(node, nnx.Param) else None
            if spec is not None:
                node.set_metadata("out_sharding", spec)
                node.set_metadata("mesh", self.mesh)
        self.module = module

    def spec_of(self, key: tuple) -> P:
        """The stored spec of the parameter at `key` (a path under `module`)."""
        params = nnx.state(self.module, nnx.Param)
        for (path, _), spec in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], self.param_specs, strict=True
        ):
            if _path_key(path) == tuple(key):
                return spec
        raise KeyError(key)

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: forward methods of the wrapped module
        # (e.g. `fully_shard(embedder).attend`) run through the unit, parameters gathered.
        module = self.__dict__.get("module")
        if module is None or name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(module, name)
        if not isinstance(attr, types.MethodType):
            return attr  # data, a submodule, an nnx.Rngs (callable, but not a forward method)
        if not name.startswith("_") or name in self.__dict__.get("forward_methods", ()):
            return functools.partial(self._run, name)
        raise AttributeError(
            f"FSDPModule({type(module).__name__}).{name}: a private method of the wrapped "
            f"module does not run through the unit (its parameters would not be gathered). "
            f"Call register_fsdp_forward_method(unit, {name!r}) first, or call "
            f"unit.module.{name} on unsharded parameters."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("__call__", *args, **kwargs)

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        owner = f"FSDPModule({type(self.module).__name__})"
        with jax.named_scope(f"{owner}.{method}" if method != "__call__" else owner):
            return self._run_unit(owner, method, args, kwargs)

    def _run_unit(self, owner: str, method: str, args: tuple, kwargs: dict) -> Any:
        return run_unit(self, owner, method, args, kwargs)


def register_fsdp_forward_method(unit: FSDPModule, name: str) -> None:
    """Run `unit.<name>(...)` through the unit (parameters gathered), like FSDP2's API.

    Public methods of the wrapped module already are (`fully_shard(embedder)
    .attend(x)`); register a private one (`_decode`) with this.
    """
    if not isinstance(unit, FSDPModule):
        raise TypeError(
            f"register_fsdp_forward_method(unit={type(unit).__name__}): expected the "
            f"FSDPModule that fully_shard returned."
        )
    if not callable(getattr(unit.module, name, None)):
        raise ValueError(
            f"register_fsdp_forward_method(name={name!r}): {type(unit.module).__name__} has no "
            f"method {name!r}."
        )
    unit.forward_methods = (*unit.forward_methods, name)


def fully_shard(
    module: nnx.Module,
    *,
    mesh: Mesh | None = None,
    axis: str = FSDP,
    reshard_after_forward: bool = True,
    policy: MixedPrecision | None = None,
    batch_axes: Sequence[str] | None = None,
    state_reduction: str | None = None,
    per_device_random: bool = False,
) -> FSDPModule:
    """Make `module` an FSDP unit: parameters 1/N per device, gathered on use.

    Args:
      module: any `nnx.Module` (nnx.Linear, nnx.Embed, nnx.LayerNorm, a block)
        or a whole model containing units. Its
        parameters are re-placed in place (sharded over `axis`, or kept whole
        when N divides none of their dims); other state is replicated and its
        updates come back (see the module docstring for arguments, outputs,
        state, nesting and methods).
      mesh: the mesh; default the one set with `jax.set_mesh`.
      axis: the fsdp mesh axis (default ``'fsdp'``).
      reshard_after_forward: free the gathered parameters after the forward
        and all-gather them again in the backward (True, FSDP2's default), or
        keep them until the backward (False: one all-gather fewer per
        parameter, one unit of gathered parameters more in memory).
      policy: a `MixedPrecision`: parameters gathered and computed in
        `param_dtype` (inputs cast to it on entry), gradients reduced in
        `reduce_dtype`, outputs cast to `output_dtype`.
      batch_axes: mesh axes the leading dim of every input is split over;
        default whichever of ``('data', 'fsdp')`` the mesh has.
      state_reduction: ``'mean'``: a floating Variable the forward computes
        from the device's batch shard (a running mean of activations) is
        averaged over the batch axes (1 all-reduce each, declared by the
        Trainer), as `Trainer(state_reduction='mean')` does outside units;
        ``None`` (default): such an update is an error.
      per_device_random: the unit refuses random numbers its module's own
        code draws (`jax.random.*` with the key every device holds) in a
        shape that follows the batch shard, which every device would repeat
        (`shardlax._random_check`); True accepts them (not equal to one device).

    Returns:
      An `FSDPModule`; call it like the module, inside `nnx.jit`.
    """
    return FSDPModule(
        module,
        mesh=mesh,
        axis=axis,
        reshard_after_forward=reshard_after_forward,
        policy=policy,
        batch_axes=batch_axes,
        state_reduction=state_reduction,
        per_device_random=per_device_random,
    )
