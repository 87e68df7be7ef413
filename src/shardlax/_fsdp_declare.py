"""What a `fully_shard` unit promises to communicate: `declared_collectives`.

`FSDPModule` (`shardlax.fsdp`) inherits it from `UnitDeclarations`; the
re-gathers a backward runs are derived from the traced gradient, not listed
by hand.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from shardlax.declarations import Declared, Role, hlo_dtype
from shardlax.mesh import live_axes
from shardlax.nn._fsdp_layer import gather_hlo_dtype
from shardlax.placement import local_shape, path_str
from shardlax.precision import wire_dtypes


class UnitDeclarations(nnx.Module):
    """The declarations half of `shardlax.fsdp.FSDPModule` (see the module docstring)."""

    def _fsdp_gathered_shape(self, shape: Sequence[int], d: int | None, spec: P) -> tuple[int, ...]:
        """One layer's parameter (a scan) as the unit gathers it: whole over `axis`, and a
        shardlax layer's model-local shard (split over the model axis as the layer stores it)."""
        c = self.fsdp_config
        local = list(local_shape(shape, spec, c.mesh))
        if d is not None:
            local[d + c.scan] *= c.axis_size
        return tuple(local[1:] if c.scan else local)

    def param_paths(self) -> tuple[str, ...]:
        """The dotted path of every parameter, in the order of `dims`."""
        params = nnx.state(self, nnx.Param)
        return tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])

    def declared_collectives(
        self, *args: Any, grad: bool = True, regathered: Sequence[str] | None = None,
        input_grad: bool = True, **kwargs: Any,
    ) -> list[Declared]:  # fmt: skip
        """The FSDP collectives of one call (and its backward, with `grad`).

        With example call arguments (`unit.declared_collectives(x)`) the
        re-gathered parameters are derived, not listed by hand: the gradient
        of `sum(outputs)` with respect to the parameters and the floating
        inputs is traced (abstractly, nothing runs), dead code is removed as
        XLA does, and the all-gathers left are counted per parameter; nested
        units' declarations are included (each from the same trace). With
        `scan`, the loops' bodies are read the same way (one layer's gathers).
        The shardlax layers the unit runs (`parallelize`'s twins) add their
        own collectives (tensor parallelism over the model axis), each for
        the global shape a traced forward called it with; column layers that
        read one activation declare its dx all-reduce once.

        Args:
          *args, **kwargs: example arguments of a call (arrays or
            `jax.ShapeDtypeStruct`s), to derive `regathered`.
          grad: include the backward.
          input_grad: the backward also takes the gradient of the floating
            inputs (False for a unit that reads the batch itself: a whole model,
            the first block), which decides the re-gathers derived.
          regathered: with `reshard_after_forward`, the paths (see
            `param_paths`) of the parameters whose *value* the backward uses,
            which it gathers again: a matmul's weight when the gradient of its
            input is needed, a norm's scale when the gradient of the norm's
            input is needed; not a bias, not an embedding table. XLA removes
            the re-gather of the others as dead code.

        Each gathered parameter: 1 all-gather over the fsdp axis (forward),
        1 reduce-scatter (backward), 1 all-reduce of its shard over the other
        live batch axes (backward). A parameter kept whole: 1 all-reduce of
        its gradient over the live batch axes (backward). Parameters of nested
        units are declared by those units (`unit.declared_collectives`). The
        loss and anything outside the unit are not included. With `scan`, the
        collectives are those of one layer, inside the scan loops (the HLO
        holds each once; it runs once per layer).
        """
        c = self.fsdp_config
        if regathered is None and (args or kwargs):
            out = self._fsdp_layer_declarations(args, kwargs, grad, input_grad)
            if c.axis_size == 1:
                return out
            derived = self._fsdp_derive_regathered(args, kwargs, input_grad) if grad else {}
            out += self.declared_collectives(grad=grad, regathered=derived.get(id(self), ()))
            for unit in inner_units(self):
                out += unit.declared_collectives(grad=grad, regathered=derived.get(id(unit), ()))
            return out
        if c.axis_size == 1:
            return []
        regathered = () if regathered is None else tuple(regathered)
        params = jax.tree.leaves(nnx.state(self, nnx.Param))
        paths = self.param_paths()
        unknown = set(regathered) - set(paths)
        if unknown:
            raise ValueError(
                f"FSDPModule.declared_collectives(regathered={sorted(unknown)}): no such "
                f"parameter. The parameters are {paths}."
            )
        live = live_axes(c.mesh, c.batch_axes)
        others = tuple(a for a in live if a != c.axis)
        out = []
        for path, x, d, o, spec in zip(paths, params, c.dims, c.owned, c.param_specs, strict=True):
            if not o:
                continue
            stored = x.dtype
            gdt, rdt = wire_dtypes(stored, c.policy)
            # the gathered size: one layer's in a scan, a shardlax layer's model-local shard
            size = math.prod(self._fsdp_gathered_shape(x.shape, d, spec))
            rbytes, rname = size * jnp.dtype(rdt).itemsize, hlo_dtype(rdt)
            if d is None:  # kept whole: its gradient is all-reduced over the batch axes
                if grad:
                    out.append(Declared("all-reduce", live, rname, 1, rbytes, path,
                                        role=Role.GRAD_REDUCE, param=path))  # fmt: skip
                continue
            gname = gather_hlo_dtype(gdt)
            full = size * jnp.dtype(gdt).itemsize
            gathers = 1 + (grad and c.reshard_after_forward and path in regathered)
            out.append(Declared("all-gather", (c.axis,), gname, gathers, gathers * full, path,
                                role=Role.PARAM_GATHER, param=path))  # fmt: skip
            if grad:
                out.append(Declared("reduce-scatter", (c.axis,), rname, 1, rbytes, path,
                                    role=Role.GRAD_REDUCE, param=path))  # fmt: skip
                if others:
                    shard = rbytes // c.axis_size
                    out.append(Declared("all-reduce", others, rname, 1, shard, path,
                                        role=Role.GRAD_REDUCE, param=path))  # fmt: skip
        return out

    def _fsdp_layer_declarations(
        self, args: tuple, kwargs: dict, grad: bool, input_grad: bool
    ) -> list[Declared]:
        """The shardlax layers' own collectives (tensor parallelism), from one traced forward.

        Each layer the unit runs declares itself for the global input shape it
        was called with (`declared_collectives(shape, grad=..., input_grad=...)`);
        column layers that read one activation declare its dx all-reduce once
        (the first one), as they run it. A layer whose parameters the unit
        gathers leaves their gradient reduction to the unit (its reduce-scatter
        is declared above), so its own all-reduce over the batch axes is dropped.
        """
        from shardlax.nn import ParallelEmbed
        from shardlax.nn._placing import recording_calls

        c = self.fsdp_config
        graphdef, state = nnx.split(self)
        with recording_calls() as calls:
            jax.eval_shape(
                lambda s, a, k: nnx.merge(graphdef, s, copy=True)(*a, **k), state, args, kwargs
            )
        batch = set(c.batch_axes)
        out: list[Declared] = []
        shared: list[Any] = []  # activations a column layer has declared the dx of
        for layer, method, x, shape, dtype, call_kwargs in calls:
            owner = f"FSDPModule({c.base.__name__}).declared_collectives"
            if method != "__call__" or shape is None:
                raise ValueError(
                    f"{owner}: the unit calls {type(layer).__name__}.{method}, whose "
                    f"collectives it cannot derive. Pass regathered= (the fsdp collectives "
                    f"only) and add the layer's declared_collectives(...) by hand."
                )
            declare = layer.declared_collectives
            if isinstance(layer, UnitDeclarations):  # the unit is the layer: its own method
                declare = functools.partial(layer.fsdp_config.base.declared_collectives, layer)
            if isinstance(layer, ParallelEmbed):
                mine = declare(shape, grad=grad)
            else:
                ig = input_grad and dtype is not None and jnp.issubdtype(dtype, jnp.floating)
                if _shares_input(layer):
                    ig = ig and not any(x is s for s in shared)
                    shared.append(x)
                extra = {"einsum_str": call_kwargs["einsum_str"]} if call_kwargs.get(
                    "einsum_str"
                ) else {}  # fmt: skip
                mine = declare(shape, grad=grad, input_grad=ig, **extra)
            if not getattr(layer, "_fsdp_live", False):
                mine = [
                    d for d in mine if not (d.role is Role.GRAD_REDUCE and set(d.axes) <= batch)
                ]
            out += mine
        return out

    def _fsdp_derive_regathered(
        self, args: tuple, kwargs: dict, input_grad: bool = True
    ) -> dict[int, tuple[str, ...]]:
        """{id(unit): paths its backward gathers again}, from the DCE'd gradient jaxpr."""
        from jax._src import core as jax_core
        from jax._src.interpreters import partial_eval as pe

        c = self.fsdp_config
        if not c.reshard_after_forward:
            return {}
        graphdef, params, rest = nnx.split(self, nnx.Param, ...)
        leaves, tree = jax.tree.flatten((args, kwargs))
        is_float = [
            input_grad and is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) for x in leaves
        ]
        floats = [x for x, f in zip(leaves, is_float, strict=True) if f]

        def loss(params, floats):
            it = iter(floats)
            full = [next(it) if f else x for x, f in zip(leaves, is_float, strict=True)]
            call_args, call_kwargs = jax.tree.unflatten(tree, full)
            out = nnx.merge(graphdef, params, rest, copy=True)(*call_args, **call_kwargs)
            return sum(
                jnp.sum(o.astype(jnp.float32))
                for o in jax.tree.leaves(out)
                if jnp.issubdtype(o.dtype, jnp.floating)
            )

        # value and gradient, as a train step: the forward stays live (the loss is an output)
        closed = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(params, floats)
        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))

        def walk(j):
            for e in j.eqns:
                if e.primitive.name == "all_gather" and c.axis in _as_names(
                    e.params.get("axis_name")
                ):
                    yield tuple(e.invars[0].aval.shape)
                for sub in jax_core.jaxprs_in_params(e.params):
                    yield from walk(sub)

        counts: dict[tuple, int] = {}
        for shape in walk(jaxpr):
            counts[shape] = counts.get(shape, 0) + 1
        groups: dict[tuple, list] = {}  # local shard shape -> [(unit, path)] gathered once each
        for unit in (self, *inner_units(self)):
            p_leaves = jax.tree.leaves(nnx.state(unit, nnx.Param))
            uc = unit.fsdp_config
            for path, x, d, o, spec in zip(
                unit.param_paths(), p_leaves, uc.dims, uc.owned, uc.param_specs, strict=True
            ):
                if o and d is not None:
                    local = list(unit._fsdp_gathered_shape(x.shape, d, spec))
                    local[d] //= uc.axis_size
                    groups.setdefault(tuple(local), []).append((unit, path))
        out: dict[int, list] = {}
        for shape, members in groups.items():
            extra = max(0, counts.get(shape, 0) - len(members))  # gathered again
            for unit, path in members[:extra]:
                out.setdefault(id(unit), []).append(path)
        return {k: tuple(v) for k, v in out.items()}


def _as_names(axis_name: Any) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def inner_units(unit: Any) -> list[Any]:
    """The FSDP units nested in `unit`, at any depth."""
    return [m for p, m in nnx.iter_graph(unit) if p and isinstance(m, UnitDeclarations)]


def is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.generic)
    )


def _shares_input(layer: Any) -> bool:
    """A column layer that sums its dx with the other readers of its input (see
    `shared_model_input`)."""
    from shardlax.nn import ColumnParallelLinear, ParallelEinsum

    if isinstance(layer, ColumnParallelLinear):
        return layer.shared_input or layer.parts > 1
    return isinstance(layer, ParallelEinsum) and layer.column
