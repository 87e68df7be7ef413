"""shardlax.audit reads the compiled HLO, and layers compile to what they declare."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit, declarations, kernels
from tests import utils

HLO = """
HloModule m

%region_0.2 (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}

%body.3 (p: (s32[], f32[4,8], /*index=2*/f32[1])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %w = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ag = f32[8,8]{1,0} all-gather(%w), channel_id=3, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %w)
}

ENTRY %main.5 (a: f32[4,8], b: bf16[16]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[16]{0} parameter(1)
  %ar = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%region_0.2, metadata={op_name="jit(f)/psum"}
  %rs = f32[1,8]{1,0} reduce-scatter(%a), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, to_apply=%region_0.2
  %cp = f32[4,8]{1,0} collective-permute(%a), channel_id=4, source_target_pairs={{0,4},{4,0},{1,5},{5,1}}
  %everyone = f32[4,8]{1,0} all-reduce(%a), channel_id=5, replica_groups={}, to_apply=%region_0.2
  %meshform = f32[4,8]{1,0} all-reduce(%a), channel_id=6, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true, to_apply=%region_0.2
  %w = (s32[], f32[4,8]) while(%init), condition=%cond.4, body=%body.3, backend_config={"known_trip_count":{"n":"6"}}
  ROOT %r = f32[4,8]{1,0} add(%a, %a)
}
"""


def _mesh_2x4():
    utils.need_devices(8)
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def test_parse_hlo_kinds_axes_dtypes_bytes():
    report = audit.parse_hlo(HLO, _mesh_2x4())
    by_name = {c.name: c for c in report}
    ar = by_name["ar"]
    assert (ar.kind, ar.axes, ar.dtype, ar.operands) == ("all-reduce", ("model",), "f32", 2)
    assert ar.bytes == 4 * 8 * 4 + 16 * 2 and ar.group_size == 4
    assert ar.wire_bytes == pytest.approx(2 * ar.bytes * 3 / 4)
    assert ar.op_name == "jit(f)/psum"
    rs = by_name["rs"]  # iota groups [2,4]<=[8]: rows {0..3},{4..7} -> 'model'
    assert (rs.kind, rs.axes, rs.bytes, rs.result_bytes) == ("reduce-scatter", ("model",), 128, 32)
    cp = by_name["cp"]  # pairs differ in the first mesh coordinate -> 'data'
    assert (cp.kind, cp.axes, cp.wire_bytes) == ("collective-permute", ("data",), 128)
    assert by_name["everyone"].axes == ("data", "model")
    assert (by_name["meshform"].axes, by_name["meshform"].group_size) == (("data",), 2)
    ag = by_name["ag"]  # [4,2]<=[2,4]T(1,0): groups {0,4},{1,5},... -> 'data', inside a loop
    assert (ag.kind, ag.axes, ag.in_loop, ag.bytes) == ("all-gather", ("data",), True, 256)
    assert ag.trips == 6 and ar.trips == 1 and not ar.in_loop
    assert report.executed_bytes() == report.total_bytes() + 5 * 256
    assert report.executed_wire_bytes() == pytest.approx(
        sum(c.wire_bytes for c in report) + 5 * ag.wire_bytes
    )
    assert report.counts()[("all-reduce", ("model",), "f32")] == 2


def test_axes_follow_the_mesh_device_order():
    """Replica-group ids are positions in the mesh, whatever the device ids are."""
    utils.need_devices(8)
    devices = np.array(jax.devices()[:8])[::-1].reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"))
    f = jax.shard_map(
        lambda x: kernels.all_reduce(x, "model"), mesh=mesh, in_specs=P("data", "model"),
        out_specs=P("data", None),
    )  # fmt: skip
    x = jax.device_put(jnp.ones((4, 8)), jax.sharding.NamedSharding(mesh, P("data", "model")))
    (c,) = audit.collectives(f, x)
    assert (c.kind, c.axes, c.group_size) == ("all-reduce", ("model",), 4)


def _mlp(mesh, d=16, f=64):
    col = shardlax.nn.ColumnParallelLinear(d, f, mesh=mesh, rngs=nnx.Rngs(0))
    row = shardlax.nn.RowParallelLinear(f, d, mesh=mesh, rngs=nnx.Rngs(1))
    return col, row


def test_mlp_forward_is_one_all_reduce_over_model():
    mesh = utils.mesh(data=2, model=4)
    col, row = _mlp(mesh)
    x = jnp.ones((8, 5, 16))
    report = audit.collectives(nnx.jit(lambda c, r, x: r(jax.nn.gelu(c(x)))), col, row, x)
    assert len(report) == 1
    (c,) = report
    assert (c.kind, c.axes, c.dtype) == ("all-reduce", ("model",), "f32")
    assert c.bytes == (8 // 2) * 5 * 16 * 4  # the local activation [B/data, S, D]
    declared = col.declared_collectives(x.shape) + row.declared_collectives((8, 5, 64))
    comparison = audit.compare(declared, report)
    assert comparison.ok, comparison.table()


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8), (8, 1)], ids=str)
def test_mlp_train_step_compiles_to_declared_collectives(mesh_shape, input_grad):
    mesh = utils.mesh(data=mesh_shape[0], model=mesh_shape[1])
    col, row = _mlp(mesh)
    x = jnp.ones((8, 3, 16))

    def loss(c, r, x):
        return jnp.sum(r(jax.nn.gelu(c(x))) ** 2)

    argnums = (0, 1, 2) if input_grad else (0, 1)
    step = nnx.jit(nnx.grad(loss, argnums=argnums))
    report = audit.collectives(step, col, row, x)
    declared = col.declared_collectives(x.shape, grad=True, input_grad=input_grad)
    declared += row.declared_collectives((8, 3, 64), grad=True)
    comparison = audit.compare(declared, report)
    assert comparison.ok, comparison.table()
    # over the data axis only the gradients of the replicated parameters move
    data_moves = report.where(axes=("data",))
    param_bytes = sum(
        int(np.prod(s.data.shape)) * 4
        for p in (col, row)
        for leaf in jax.tree.leaves(nnx.state(p, nnx.Param))
        for s in leaf.addressable_shards[:1]
    )
    if mesh_shape[0] > 1:
        assert {c.kind for c in data_moves} == {"all-reduce"}
        assert data_moves.total_bytes() == param_bytes
    else:
        assert not data_moves


def test_audit_catches_an_extra_all_reduce():
    """A kernel that reduces twice gives the same numbers; only the count shows it."""
    mesh = utils.mesh(data=1, model=4)

    def twice(x):
        y = kernels.all_reduce(x, "model")
        return kernels.all_reduce(kernels.ensure_varying(y, "model"), "model") / 4

    f = jax.shard_map(twice, mesh=mesh, in_specs=P(None, "model"), out_specs=P())
    x = jax.device_put(jnp.ones((2, 8)), jax.sharding.NamedSharding(mesh, P(None, "model")))
    declared = [audit.Declared("all-reduce", ("model",), "f32", bytes=2 * 2 * 4)]
    comparison = audit.compare(declared, audit.collectives(f, x))
    assert not comparison.ok
    assert "NO" in comparison.table()


def test_memory_reports_per_device_arguments():
    mesh = utils.mesh(data=1, model=8)
    col = shardlax.nn.ColumnParallelLinear(64, 256, use_bias=False, mesh=mesh, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 64))
    mem = audit.memory(nnx.jit(lambda c, x: c(x)), col, x)
    assert mem.arguments == 64 * 256 * 4 // 8 + 4 * 64 * 4


@pytest.mark.parametrize(
    "dtype, name",
    [(jnp.float32, "f32"), (jnp.bfloat16, "bf16"), (jnp.float16, "f16"), (jnp.int32, "s32"),
     (jnp.uint16, "u16"), (jnp.int8, "s8"), (jnp.bool_, "pred"), (jnp.float8_e4m3fn, "f8e4m3fn")],
)  # fmt: skip
def test_hlo_dtype_names_match_the_compiled_program(dtype, name):
    assert audit.hlo_dtype(dtype) == name
    assert declarations.DTYPE_BYTES[name] == jnp.dtype(dtype).itemsize


# ------------------------------------------------- replica-group spellings of real programs
#
# Each fixture is one collective line of a program compiled by this JAX version
# (jax 0.10.2, Shardy on), captured with `.lower(...).compile().as_text()` and
# trimmed of metadata; `_program` rebuilds that program so the live compile is
# checked too. The expected device groups come from plain numpy on the user's
# mesh (`_reference_groups`), not from the parser.

_MESHES = {"222": ((2, 2, 2), ("a", "b", "c")), "24": ((2, 4), ("a", "b")), "8": ((8,), ("a",))}

#: (id, mesh, program, the axes each group spans in the user's mesh (in group order), HLO line)
SPELLINGS = [
    # GSPMD, x @ w with w = P(axes, None): one all-gather of w over `axes`.
    ("mesh", "222", ("gather", ("a", "b")), ("a", "b"),
     "%all-gather = f32[32,64]{1,0} all-gather(%param.1), channel_id=1, replica_groups="
     "mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}, dimensions={0}, use_global_device_ids=true"),
    ("mesh+device_ids 3-d iota", "222", ("gather", ("c", "b")), ("c", "b"),
     "%all-gather = f32[32,64]{1,0} all-gather(%param.1), channel_id=1, replica_groups="
     "mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,2,2]T(2,1,0)) {'axis_0'}, "
     "dimensions={0}, use_global_device_ids=true"),
    ("mesh+device_ids one axis", "222", ("gather", ("b",)), ("b",),
     "%all-gather = f32[32,64]{1,0} all-gather(%param.1), channel_id=1, replica_groups="
     "mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}, "
     "dimensions={0}, use_global_device_ids=true"),
    ("mesh+device_ids 2-d iota", "24", ("gather", ("b",)), ("b",),
     "%all-gather = f32[32,64]{1,0} all-gather(%param.1), channel_id=1, replica_groups="
     "mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, "
     "dimensions={0}, use_global_device_ids=true"),
    # GSPMD, w = P(every axis, None): the contraction is split, an all-reduce over all.
    ("mesh+device_ids all devices", "222", ("gather", ("b", "c", "a")), ("a", "b", "c"),
     "ROOT %all-reduce = f32[16,64]{1,0} all-reduce(%ynn_fusion), channel_id=1, replica_groups="
     "mesh['axis_0'=1,'axis_1'=8], device_ids=([2,4]T(1,0)) {'axis_1'}, "
     "use_global_device_ids=true, to_apply=%add.clone"),
    ("mesh 1-d", "8", ("gather", ("a",)), ("a",),
     "ROOT %all-reduce = f32[16,64]{1,0} all-reduce(%ynn_fusion), channel_id=1, replica_groups="
     "mesh['axis_0'=1,'axis_1'=8] {'axis_1'}, use_global_device_ids=true, to_apply=%add.clone"),
    # shard_map, psum / ppermute written by hand: explicit lists and pairs.
    ("explicit list", "222", ("psum", ("a", "c")), ("a", "c"),
     "%psum_invariant.7 = f32[8,4]{1,0} all-reduce(%param.1), channel_id=1, replica_groups="
     "{{0,1,4,5},{2,3,6,7}}, use_global_device_ids=true, to_apply=%region_0.0"),
    ("source_target_pairs", "24", ("ppermute", ("b",)), ("b",),
     "%collective-permute = f32[8,4]{1,0} collective-permute(%param.1), channel_id=1, "
     "source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}"),
]  # fmt: skip

#: GSPMD, x = P('b', 'a') on the (2, 4) mesh, `x.reshape(2, 4, 16).sum(1)`: the sum
#: runs over the minor half of 'b' (a Shardy mesh group with device_ids), then an
#: iota all-gather of the result's dim 0 over the major half. Device b holds rows
#: 2b, 2b+1 = (b_hi, 2 b_lo + {0, 1}) of the reshape, b = 2 b_hi + b_lo.
SUB_AXIS_LINES = (
    "%all-reduce = f32[1,8]{1,0} all-reduce(%reduce_bitcast_fusion), channel_id=1, "
    "replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,4]T(1,0)) "
    "{'axis_1'}, use_global_device_ids=true, to_apply=%region_0.0.clone",
    "ROOT %all-gather = f32[2,8]{1,0} all-gather(%all-reduce), channel_id=2, "
    "replica_groups=[4,2]<=[2,2,2]T(0,2,1), dimensions={0}, use_global_device_ids=true",
)


def _reference_groups(shape, names, over) -> set[tuple[int, ...]]:
    """Positions (row-major in the mesh) of every group spanning `over`, in `over`'s order."""
    pos = np.arange(int(np.prod(shape))).reshape(shape)
    idx = [names.index(a) for a in over]
    rest = [i for i in range(len(shape)) if i not in idx]
    groups = pos.transpose(rest + idx).reshape(-1, int(np.prod([shape[i] for i in idx])))
    return {tuple(int(v) for v in g) for g in groups}


def _auto_mesh(key):
    utils.need_devices(8)
    shape, names = _MESHES[key]
    types = (jax.sharding.AxisType.Auto,) * len(shape)
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), names, axis_types=types)


def _program(mesh, what, axes):
    """(jitted fn, args) of the program a fixture line comes from."""
    sharding = jax.sharding.NamedSharding
    spec = axes if len(axes) > 1 else axes[0]
    if what == "gather":
        x = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=sharding(mesh, P()))
        w = jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=sharding(mesh, P(spec, None)))
        return jax.jit(lambda x, w: x @ w), (x, w)
    n = mesh.shape[axes[0]]
    body = {
        "psum": lambda x: jax.lax.psum(x, axes),
        "ppermute": lambda x: jax.lax.ppermute(x, axes[0], [(i, (i + 1) % n) for i in range(n)]),
    }[what]
    names = mesh.axis_names
    fn = jax.shard_map(body, mesh=mesh, in_specs=P(names), out_specs=P(names), check_vma=False)
    x = jax.ShapeDtypeStruct((64, 4), jnp.float32, sharding=sharding(mesh, P(names)))
    return jax.jit(fn), (x,)


def _groups_as_sets(groups, ordered: bool):
    return {tuple(g) if ordered else tuple(sorted(g)) for g in groups}


@pytest.mark.parametrize(
    "sid, mesh_key, program, over, line", SPELLINGS, ids=[s[0] for s in SPELLINGS]
)
def test_replica_group_spelling_parses_to_the_right_devices(sid, mesh_key, program, over, line):
    mesh = _auto_mesh(mesh_key)
    shape, names = _MESHES[mesh_key]
    want = _reference_groups(shape, names, over)
    (c,) = audit.parse_hlo(line, mesh)
    # an all-gather's group order is the order of the gathered blocks; the others' is free
    ordered = c.kind == "all-gather"
    if c.kind == "collective-permute":
        # pairs (source, target) of a ring shift over `over`: each pair inside one group
        assert all(any(set(p) <= set(g) for g in want) for p in c.groups), c.groups
        assert len(c.groups) == int(np.prod(shape))
    else:
        assert _groups_as_sets(c.groups, ordered) == _groups_as_sets(want, ordered)
    assert c.axes == tuple(sorted(over)) and c.whole_axes
    # the live compile of the same program has the same spelling and reads the same
    fn, args = _program(mesh, *program)
    text = fn.lower(*args).compile().as_text()
    key = re.search(
        r"(replica_groups=\S+(?:, device_ids=\(\S+\))?(?: \{[^}]*\})?|source_target_pairs=\S+)",
        line,
    ).group(1)
    assert key in text, f"{sid}: this JAX version no longer prints {key!r}"
    live = [d for d in audit.parse_hlo(text, mesh) if d.kind == c.kind]
    assert live and all(d.axes == c.axes and d.groups == c.groups for d in live)


def test_sub_axis_groups_of_a_real_gspmd_program():
    mesh = _auto_mesh("24")
    # b = 2 b_hi + b_lo: positions on the refined (a, b_hi, b_lo) = (2, 2, 2) mesh
    ar, ag = audit.parse_hlo("\n".join(SUB_AXIS_LINES), mesh)
    for c, half in ((ar, "lo"), (ag, "hi")):
        want = _reference_groups((2, 2, 2), ("a", "hi", "lo"), (half,))
        assert c.axes == ("b",) and c.group_size == 2 and not c.whole_axes
        assert _groups_as_sets(c.groups, True) == want
    x = jax.ShapeDtypeStruct(
        (8, 16), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P("b", "a"))
    )
    compiled = jax.jit(lambda x: x.reshape(2, 4, 16).sum(1)).lower(x).compile()
    text = compiled.as_text()
    assert all(line.split("replica_groups=")[1].split(", use_global")[0].split(", dim")[0] in text
               for line in SUB_AXIS_LINES)  # fmt: skip
    live = audit.collectives(compiled)
    assert [(c.kind, c.axes, c.groups, c.whole_axes) for c in live] == [
        (c.kind, c.axes, c.groups, c.whole_axes) for c in (ar, ag)
    ]


@pytest.mark.parametrize(
    "text, over",
    [
        # Shardy sub-axes (pre_size)size: axis_0 (size 4) = (hi, lo); (2)2 is lo, (1)2 is hi.
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0':(2)2}", ("lo",)),
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0':(1)2}", ("hi",)),
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0':(2)2, 'axis_2'}", ("lo", "c")),
    ],
)
def test_shardy_sub_axis_terms(text, over):
    """The spelling of jax/NOTES (GSPMD on (2,2,2)): `(k)n` terms split an axis row-major."""
    mesh = _auto_mesh("222")  # axis_0 = ('a', 'b') = (hi, lo), axis_2 = 'c'
    line = f"%ar = f32[4]{{0}} all-reduce(%p), channel_id=1, replica_groups={text}, to_apply=%add"
    (c,) = audit.parse_hlo(line, mesh)
    renamed = tuple({"hi": "a", "lo": "b"}.get(a, a) for a in over)
    assert _groups_as_sets(c.groups, True) == _reference_groups((2, 2, 2), ("a", "b", "c"), renamed)
    assert c.axes == tuple(sorted(renamed)) and c.whole_axes


def test_bad_sub_axis_is_a_clear_error():
    line = "%ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['x'=4] {'x':(3)2}, to_apply=%add"
    with pytest.raises(
        ValueError,
        match=r"sub-axis 'x':\(3\)2 of axis 'x' \(size 4\): a sub-axis \(p\)k needs p\*k = 6",
    ):
        audit.parse_hlo(line)


def _tp_step():
    mesh = utils.mesh(data=2, model=4)
    col, row = _mlp(mesh)
    x = jnp.ones((8, 3, 16))
    fn = nnx.jit(nnx.grad(lambda c, r, x: jnp.sum(r(jax.nn.gelu(c(x))) ** 2), argnums=(0, 1)))
    return fn, (col, row, x)


def test_collectives_and_memory_accept_lowered_and_compiled():
    fn, args = _tp_step()
    from_fn = audit.collectives(fn, *args)
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    assert audit.collectives(lowered) == from_fn
    assert audit.collectives(compiled) == from_fn
    assert from_fn and {c.axes for c in from_fn} <= {("data",), ("model",)}
    assert audit.memory(compiled) == audit.memory(lowered) == audit.memory(fn, *args)


def test_compiled_with_arguments_is_a_clear_error():
    fn, args = _tp_step()
    compiled = fn.lower(*args).compile()
    with pytest.raises(
        TypeError, match=r"jax.stages.Compiled and 3 argument\(s\).*Pass the Compiled alone"
    ):
        audit.collectives(compiled, *args)


def test_device_ids_of_the_wrong_length_is_a_clear_error():
    line = (
        "%ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['x'=4], device_ids=([2,4]T(1,0)) "
        "{'x'}, to_apply=%add"
    )
    with pytest.raises(ValueError, match=r"device_ids=\(\[2,4\]T\(1,0\)\) lists 8 devices, but "):
        audit.parse_hlo(line)
