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
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import _flax_layers, _fsdp_state, _random_check, kernels
from shardlax._axes import BATCH_AXES, FSDP
from shardlax._control_flow import varying_carries
from shardlax._fsdp_declare import UnitDeclarations, is_array
from shardlax._fsdp_place import layer_specs, shard_dim
from shardlax._fsdp_place import path_key as _path_key
from shardlax._fsdp_scan import check_scan_state as _check_scan_state
from shardlax._fsdp_scan import fully_shard_scan as fully_shard_scan
from shardlax._fsdp_scan import scan_layers as _scan_layers
from shardlax._fsdp_state import check_state as _check_state
from shardlax.mesh import axes_size, check_axis, is_manual, live_axes, present_axes, resolve_mesh
from shardlax.nn._base import recorded_calls
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
        manual = is_manual(self.mesh)
        live = live_axes(self.mesh, self.batch_axes)
        batch_entry = (live if len(live) > 1 else live[0]) if live else None
        nb = axes_size(self.mesh, live)
        graphdef, params, rest = nnx.split(self.module, nnx.Param, ...)
        p_leaves, p_tree = jax.tree.flatten(params)
        r_leaves, r_tree = jax.tree.flatten(rest)
        r_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(rest)[0]]
        # call arguments: graph nodes (nnx.Rngs, modules) travel as replicated state and
        # come back updated; arrays whose leading dim is the batch are split over the
        # batch axes, other arrays replicated; anything else is static.
        leaves, a_tree = jax.tree.flatten(
            (args, kwargs), is_leaf=lambda x: isinstance(x, nnx.Pytree | nnx.Variable)
        )
        kinds, arrays, nodes, statics = [], [], [], []
        batch = next(
            (x.shape[0] for x in leaves if is_array(x) and x.ndim >= 1), None
        )  # the batch size: the leading dim of the first array argument
        for x in leaves:
            if isinstance(x, nnx.Pytree | nnx.Variable):
                kinds.append("node")
                nodes.append(nnx.split(x))
            elif is_array(x):
                kinds.append("array")
                arrays.append(x)
            else:
                kinds.append("static")
                statics.append(x)
        if batch is not None and not manual and batch % nb:
            raise ValueError(
                f"{owner}: input of shape {next(tuple(x.shape) for x in arrays if x.ndim)} "
                f"has a leading dim (the batch) of {batch}, which cannot be sharded over mesh "
                f"axes {self.batch_axes} (size {nb}): {nb} does not divide {batch}. Use a "
                f"batch size divisible by {nb}."
            )
        local_batch = None if batch is None else (batch if manual else batch // nb)
        a_specs = tuple(
            P(batch_entry) if x.ndim >= 1 and x.shape[0] == batch and live else P() for x in arrays
        )
        n_defs = [d for d, _ in nodes]
        n_states = [s for _, s in nodes]
        n_leaves, n_tree = jax.tree.flatten(n_states)
        n_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(n_states)[0]]
        policy = self.policy
        owned = self.owned
        unit_batch = _fsdp_state.UnitBatch(owner, live, nb, local_batch)

        def gather(shards):
            dims = [d for d, o in zip(self.dims, owned, strict=True) if o]
            return _gather_all(shards, dims, axis=self.axis, live=live, policy=policy)

        def fn(own_full, inputs):
            a_vals, r_vals, n_vals, other = inputs  # activations first: fsdp_call ties to them
            own_it, other_it = iter(own_full), iter(other)
            p_full = [next(own_it) if o else next(other_it) for o in owned]
            m = nnx.merge(
                graphdef,
                jax.tree.unflatten(p_tree, p_full),
                jax.tree.unflatten(r_tree, list(r_vals)),
            )
            call_nodes = [
                nnx.merge(d, s)
                for d, s in zip(n_defs, jax.tree.unflatten(n_tree, list(n_vals)), strict=True)
            ]
            arr_it, node_it, stat_it = iter(a_vals), iter(call_nodes), iter(statics)
            pick = {"array": arr_it, "node": node_it, "static": stat_it}
            call_args, call_kwargs = jax.tree.unflatten(a_tree, [next(pick[k]) for k in kinds])
            if policy is not None and policy.param_dtype is not None:
                call_args, call_kwargs = _cast_floats((call_args, call_kwargs), policy.param_dtype)
            with _fsdp_state.global_batch_layers([m, *call_nodes], unit_batch), varying_carries():
                out = getattr(m, method)(*call_args, **call_kwargs)
            _fsdp_state.check_structure(owner, method, self.module, graphdef, m)
            for i, leaf in enumerate(jax.tree.leaves(out)):
                if not isinstance(leaf, jax.Array):
                    raise TypeError(
                        f"{owner}.{method}: output {i} is a {type(leaf).__name__}, not an "
                        f"array; inside the unit it is computed per device (a shape there is "
                        f"the per-device batch), so the unit cannot return it exactly. Return "
                        f"arrays, or compute the value outside the unit."
                    )
            if policy is not None and policy.output_dtype is not None:
                out = _cast_floats(out, policy.output_dtype)
            new_rest = jax.tree.leaves(nnx.state(m, nnx.Not(nnx.Param)))
            new_nodes = jax.tree.leaves([nnx.state(c) for c in call_nodes])
            return out, tuple(new_rest), tuple(new_nodes)

        reshard = self.reshard_after_forward and self.axis_size > 1

        # a unit's own choice, else the enclosing Trainer's (Trainer(state_reduction=...))
        reduction = self.state_reduction or _flax_layers.inherited_state_reduction()

        def body(p_vals, r_vals, n_vals, a_vals):
            own = tuple(p for p, o in zip(p_vals, owned, strict=True) if o)
            other = tuple(p for p, o in zip(p_vals, owned, strict=True) if not o)
            inputs = (tuple(a_vals), tuple(r_vals), tuple(n_vals), other)
            if not self.scan:
                out, new_r, new_n = kernels.fsdp_call(
                    fn, own, inputs, gather=gather, reshard_after_forward=reshard
                )
            else:
                out, new_r, new_n = _scan_layers(
                    fn,
                    gather,
                    own,
                    r_vals,
                    n_vals,
                    a_vals,
                    remat=self.remat,
                    reshard=reshard,
                    check=functools.partial(
                        _check_scan_state, owner, r_paths, n_paths, reduction=reduction
                    ),
                )
            new_r = _check_state(owner, "state", r_paths, r_vals, new_r, reduction, live)
            new_n = _check_state(owner, "argument state", None, n_vals, new_n, reduction, live)
            return out, new_r, new_n

        inputs = (tuple(p_leaves), tuple(r_leaves), tuple(n_leaves), tuple(arrays))
        if manual:
            out, new_r, new_n = body(*inputs)
        else:
            in_specs = (
                self.param_specs,
                tuple(P() for _ in r_leaves),
                tuple(P() for _ in n_leaves),
                a_specs,
            )
            inputs = (
                inputs[0],
                tuple(_replicate(x, self.mesh) for x in r_leaves),
                tuple(_replicate(x, self.mesh) for x in n_leaves),
                tuple(
                    jax.device_put(a, NamedSharding(self.mesh, s))
                    for a, s in zip(arrays, a_specs, strict=True)
                ),
            )
            probe: list = []

            def probe_body(*xs):
                probe.append(jax.tree.map(lambda o: (o.shape, kernels.varying_axes(o)), body(*xs)))
                return ()

            calls = recorded_calls()
            seen = None if calls is None else len(calls)
            closed = jax.make_jaxpr(
                jax.shard_map(probe_body, mesh=self.mesh, in_specs=in_specs, out_specs=())
            )(*inputs)
            if local_batch is not None and nb > 1 and not self.per_device_random:

                def doubled_program():  # the same unit for a batch twice as large
                    nonlocal unit_batch
                    saved = unit_batch
                    unit_batch = _fsdp_state.UnitBatch(owner, live, nb, 2 * local_batch)
                    twice = tuple(
                        _random_check.doubled(a, NamedSharding(self.mesh, s)) if s != P() else a
                        for a, s in zip(inputs[3], a_specs, strict=True)
                    )
                    try:
                        return jax.make_jaxpr(
                            jax.shard_map(lambda *xs: (body(*xs), ())[1], mesh=self.mesh,
                                          in_specs=in_specs, out_specs=())
                        )(*inputs[:3], twice)  # fmt: skip
                    finally:
                        unit_batch = saved

                _random_check.check_draws(
                    f"{owner}.{method}", closed, doubled_program, nb,
                    "fully_shard(..., per_device_random=True)",
                )  # fmt: skip
            if calls is not None:
                del calls[seen:]  # the probe's trace: the layers are recorded by the real one
            out_types, _, _ = probe[0]
            out_specs = jax.tree.map(
                lambda t: _out_spec(owner, method, t, live, batch_entry, local_batch),
                out_types,
                is_leaf=lambda t: (
                    isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], frozenset)
                ),
            )
            out, new_r, new_n = jax.shard_map(
                body,
                mesh=self.mesh,
                in_specs=in_specs,
                out_specs=(out_specs, tuple(P() for _ in r_leaves), tuple(P() for _ in n_leaves)),
            )(*inputs)
        nnx.update(self.module, jax.tree.unflatten(r_tree, list(new_r)))
        for (_, x), state in zip(
            [(k, x) for k, x in zip(kinds, leaves, strict=True) if k == "node"],
            jax.tree.unflatten(n_tree, list(new_n)),
            strict=True,
        ):
            nnx.update(x, state)
        return out


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


def _is_probe_leaf(t: Any) -> bool:
    return isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], frozenset)


def _replicate(x: Any, mesh: Mesh) -> Any:
    return jax.device_put(x, NamedSharding(mesh, P()))


def _out_spec(owner, method, t, live, batch_entry, local_batch) -> P:
    shape, varying = t
    split = sorted(varying - set(live))
    if split:
        raise ValueError(
            f"{owner}.{method}: an output of per-device shape {tuple(shape)} varies over mesh "
            f"axis {split[0]!r}, which the unit does not split the batch over: it is a "
            f"tensor-parallel layer's split output (a Colwise twin's, a ColumnParallelLinear's "
            f"without gather_output), and the unit returns whole arrays. End the unit with a "
            f"layer whose output is whole (a Rowwise twin), or build the last column layer "
            f"with gather_output=True."
        )
    if not (varying & set(live)):
        return P()  # the same on every device: replicated
    if len(shape) >= 1 and shape[0] == local_batch and set(live) <= varying:
        return P(batch_entry)  # per example: the devices' shards concatenated
    raise ValueError(
        f"{owner}.{method}: an output of per-device shape {tuple(shape)} depends on this "
        f"device's batch shard but is not per example (its leading dim is not the per-device "
        f"batch {local_batch}), e.g. a mean or sum over the batch: its global value is not "
        f"determined by one device's. Return per-example values (leading dim = batch) and "
        f"reduce them outside the unit."
    )


def _gather_all(
    shards: Sequence[jax.Array],
    dims: Sequence[int | None],
    *,
    axis: str,
    live: Sequence[str],
    policy: MixedPrecision | None,
) -> tuple[jax.Array, ...]:
    """Inside shard_map: every shard gathered over `axis` on its dim (`None`: not split)."""
    replicated = tuple(a for a in live if a != axis)
    out = []
    for s, d in zip(shards, dims, strict=True):
        gdt = None if policy is None else policy.gather_dtype(s.dtype)
        if d is None:  # the fsdp axis has size 1: nothing to gather
            s = kernels.ensure_varying(s, live)
            out.append(s if gdt is None else s.astype(gdt))
            continue
        rdt = None if policy is None else policy.grad_reduce_dtype(s.dtype)
        out.append(
            kernels.fsdp_gather(
                s, axis, dim=d, replicated_axes=replicated, gather_dtype=gdt, reduce_dtype=rdt
            )
        )
    return tuple(out)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


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
