"""shardlax.audit reads the compiled HLO, and layers compile to what they declare."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit, kernels
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
    assert audit._DTYPE_BYTES[name] == jnp.dtype(dtype).itemsize
