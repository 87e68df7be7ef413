"""How an FSDP unit runs a call (`FSDPModule._fsdp_call`): one `shard_map` per call.

The call's arguments are sorted into arrays (split over the batch axes when
their leading dim is the batch, else replicated), graph nodes (`nnx.Rngs`,
modules: replicated state that comes back updated) and static values. A
probe trace (`jax.make_jaxpr`, nothing runs) gives the output types, from
which the output specs follow, and the program the random-draw check reads
(`shardlax._random_check`). The body gathers the owned parameters over the
fsdp axis (`kernels.fsdp_call`: freed after the forward and gathered again in
the backward with `reshard_after_forward`), runs the module with BatchNorm /
Dropout on the global batch (`_fsdp_state`) and the model's loops made
per-device safe (`_control_flow`), and checks the state the forward updated.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import _flax_layers, _fsdp_state, _random_check, _trace_cache, kernels
from shardlax._control_flow import varying_carries
from shardlax._fsdp_declare import is_array
from shardlax._fsdp_scan import check_scan_state as _check_scan_state
from shardlax._fsdp_scan import scan_layers as _scan_layers
from shardlax._fsdp_state import check_state as _check_state
from shardlax.kernels._remat import call_site_of_shard_map, inside_checkpoint
from shardlax.mesh import axes_size, is_manual, live_axes
from shardlax.nn._placing import recorded_calls
from shardlax.placement import path_str as _path_str
from shardlax.precision import MixedPrecision, wire_dtypes


def run_unit(unit: Any, owner: str, method: str, args: tuple, kwargs: dict) -> Any:
    """Run `unit.<method>(*args, **kwargs)` as one FSDP unit: see `shardlax.fsdp`."""
    module, unit = unit, unit.fsdp_config  # the module; how it is placed (UnitConfig)
    manual = is_manual(unit.mesh)
    live = live_axes(unit.mesh, unit.batch_axes)
    batch_entry = (live if len(live) > 1 else live[0]) if live else None
    nb = axes_size(unit.mesh, live)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
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
            f"axes {unit.batch_axes} (size {nb}): {nb} does not divide {batch}. Use a "
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
    policy = unit.policy
    owned = unit.owned
    unit_batch = _fsdp_state.UnitBatch(owner, live, nb, local_batch)

    def gather(shards):
        dims = [d for d, o in zip(unit.dims, owned, strict=True) if o]
        return _gather_all(shards, dims, axis=unit.axis, live=live, policy=policy)

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
        unit_class, m.__class__ = type(m), unit.base  # the module's own method runs here
        try:
            with _fsdp_state.global_batch_layers([m, *call_nodes], unit_batch), varying_carries():
                out = getattr(m, method)(*call_args, **call_kwargs)
        finally:
            m.__class__ = unit_class
        _fsdp_state.check_structure(owner, method, module, graphdef, m)
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

    reshard = unit.reshard_after_forward and unit.axis_size > 1

    # a unit's own choice, else the enclosing Trainer's (Trainer(state_reduction=...))
    reduction = unit.state_reduction or _flax_layers.inherited_state_reduction()

    def body(p_vals, r_vals, n_vals, a_vals):
        own = tuple(p for p, o in zip(p_vals, owned, strict=True) if o)
        other = tuple(p for p, o in zip(p_vals, owned, strict=True) if not o)
        inputs = (tuple(a_vals), tuple(r_vals), tuple(n_vals), other)
        if not unit.scan:
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
                remat=unit.remat,
                reshard=reshard,
                check=functools.partial(
                    _check_scan_state, owner, r_paths, n_paths, reduction=reduction
                ),
            )
        new_r = _check_state(owner, "state", r_paths, r_vals, new_r, reduction, live)
        new_n = _check_state(owner, "argument state", None, n_vals, new_n, reduction, live)
        return out, new_r, new_n

    inputs = (tuple(p_leaves), tuple(r_leaves), tuple(n_leaves), tuple(arrays))
    key = None
    if recorded_calls() is None and _flax_layers.recorder() is None:  # not declaring
        key = _trace_cache.key_of(
            (
                type(module),
                method,
                unit,
                graphdef,
                a_tree,
                tuple(kinds),
                tuple(n_defs),
                reduction,
                manual,
                inside_checkpoint(),  # fsdp_call keeps the gathers under one
            ),
            statics,
            inputs,
        )  # identical units after the first replay its trace (`shardlax._trace_cache`)
    name = f"fsdp_{unit.base.__name__}"  # the unit's call in profiles and the HLO
    if manual:  # inside the caller's shard_map (the Trainer's step): the body as it is
        out, new_r, new_n = _trace_cache.call(key, lambda: body, inputs, name)
    else:
        in_specs = (
            unit.param_specs,
            tuple(P() for _ in r_leaves),
            tuple(P() for _ in n_leaves),
            a_specs,
        )
        inputs = (
            inputs[0],
            tuple(_replicate(x, unit.mesh) for x in r_leaves),
            tuple(_replicate(x, unit.mesh) for x in n_leaves),
            tuple(
                jax.device_put(a, NamedSharding(unit.mesh, s))
                for a, s in zip(arrays, a_specs, strict=True)
            ),
        )

        def make():  # the unit's shard_map (its output specs from a probe trace)
            probe: list = []

            def probe_body(*xs):
                probe.append(jax.tree.map(lambda o: (o.shape, kernels.varying_axes(o)), body(*xs)))
                return ()

            calls = recorded_calls()
            seen = None if calls is None else len(calls)
            closed = jax.make_jaxpr(
                jax.shard_map(probe_body, mesh=unit.mesh, in_specs=in_specs, out_specs=())
            )(*inputs)
            if local_batch is not None and nb > 1 and not unit.per_device_random:

                def doubled_program():  # the same unit for a batch twice as large
                    nonlocal unit_batch
                    saved = unit_batch
                    unit_batch = _fsdp_state.UnitBatch(owner, live, nb, 2 * local_batch)
                    twice = tuple(
                        _random_check.doubled(a, NamedSharding(unit.mesh, s)) if s != P() else a
                        for a, s in zip(inputs[3], a_specs, strict=True)
                    )

                    def traced(*xs):
                        body(*xs)
                        return ()

                    try:
                        return jax.make_jaxpr(
                            jax.shard_map(traced, mesh=unit.mesh, in_specs=in_specs, out_specs=())
                        )(*inputs[:3], twice)
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
            return jax.shard_map(
                body,
                mesh=unit.mesh,
                in_specs=in_specs,
                out_specs=(out_specs, tuple(P() for _ in r_leaves), tuple(P() for _ in n_leaves)),
            )

        with call_site_of_shard_map():  # the body learns if it runs under a checkpoint
            out, new_r, new_n = _trace_cache.call(key, make, inputs, name)
    nnx.update(module, jax.tree.unflatten(r_tree, list(new_r)))
    for (_, x), state in zip(
        [(k, x) for k, x in zip(kinds, leaves, strict=True) if k == "node"],
        jax.tree.unflatten(n_tree, list(new_n)),
        strict=True,
    ):
        nnx.update(x, state)
    return out


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
        gdt, rdt = wire_dtypes(s.dtype, policy)
        if d is None:  # the fsdp axis has size 1: nothing to gather
            out.append(kernels.ensure_varying(s, live).astype(gdt))
            continue
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
