"""The FSDP kernels and the MixedPrecision policy, on their own.

`kernels.fsdp_gather` and `kernels.fsdp_call` inside a bare `jax.shard_map`,
against plain jnp on the full arrays; the dtypes of their collectives.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import audit, kernels
from shardlax.precision import MixedPrecision
from tests import utils

K, M, B = 16, 8, 8  # the parameter is [K, M], split over fsdp on dim 0


def _setup(mesh):
    w = jax.random.normal(jax.random.key(0), (K, M))
    x = jax.random.normal(jax.random.key(1), (B, K))
    w = jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
    return w, x


def _model(mesh, gather):
    """loss = sum(tanh(x @ gather(w))) with the batch over (data, fsdp)."""

    def body(w_shard, x):
        y = jnp.tanh(x.astype(jnp.float32) @ gather(w_shard).astype(jnp.float32))
        return kernels.all_reduce(jnp.sum(y), ("data", "fsdp"))

    f = jax.shard_map(
        body, mesh=mesh, in_specs=(P("fsdp", None), P(("data", "fsdp"), None)), out_specs=P()
    )
    return jax.jit(jax.value_and_grad(f))


def _reference(w, x, dtype):
    def loss(w):
        return jnp.sum(jnp.tanh(x @ w.astype(dtype).astype(jnp.float32)))

    return jax.value_and_grad(loss)(np.asarray(w))


@pytest.mark.parametrize(
    ("gather_dtype", "reduce_dtype", "gather_hlo"),
    [(None, None, "f32"), (jnp.bfloat16, jnp.float32, "u16"), (jnp.bfloat16, jnp.bfloat16, "u16")],
    ids=["f32", "bf16-gather-f32-reduce", "bf16-both"],
)
def test_fsdp_gather_kernel(gather_dtype, reduce_dtype, gather_hlo):
    mesh = utils.mesh(2, 4, 1)
    w, x = _setup(mesh)
    fn = _model(
        mesh,
        lambda s: kernels.fsdp_gather(
            s, "fsdp", dim=0, replicated_axes=("data",), gather_dtype=gather_dtype,
            reduce_dtype=reduce_dtype,
        ),
    )  # fmt: skip
    val, grad = fn(w, x)
    dtype = jnp.float32 if gather_dtype is None else gather_dtype
    ref_val, ref_grad = _reference(w, np.asarray(x), dtype)
    utils.assert_close(val, ref_val, dtype)
    assert grad.dtype == jnp.float32  # the stored dtype, whatever the reduce dtype
    # the gradient of a bf16-gathered parameter passed through bf16: bf16 tolerance
    utils.assert_close(grad, ref_grad, dtype)

    report = audit.collectives(fn, w, x, mesh=mesh)
    gathers = report.where("all-gather", ("fsdp",))
    assert [(c.dtype, c.bytes) for c in gathers] == [
        (gather_hlo, K * M * (2 if gather_hlo == "u16" else 4))
    ]
    assert len(report.where("reduce-scatter", ("fsdp",))) == 1
    # the gradient is all-reduced over data only as a 1/4 shard
    [data_ar] = report.where("all-reduce", ("data",))
    assert data_ar.bytes == K // 4 * M * 4
    # what JAX emits: the reduce-scatter in the reduce dtype (XLA:CPU widens bf16 to f32)
    lowered = fn.lower(w, x).as_text()
    [rs_type] = re.findall(r"stablehlo.reduce_scatter.*?->\s*tensor<[0-9x]+x(\w+)>", lowered, re.S)
    want = {None: "f32", jnp.float32: "f32", jnp.bfloat16: "bf16"}[reduce_dtype]
    assert rs_type == want


@pytest.mark.parametrize(("reshard", "gathers"), [(True, 2), (False, 1)], ids=["reshard", "keep"])
def test_fsdp_call_regathers_in_backward(reshard, gathers):
    """`fsdp_call` with reshard_after_forward: the backward gathers again (the value of
    w is needed for dx); without it the forward gather is kept."""
    mesh = utils.mesh(2, 4, 1)
    w, x = _setup(mesh)

    def body(w_shard, x):
        def fn(params, x):
            (w_full,) = params
            return jnp.tanh(x @ w_full)

        def gather(params):
            return tuple(
                kernels.fsdp_gather(p, "fsdp", dim=0, replicated_axes=("data",)) for p in params
            )

        y = kernels.fsdp_call(fn, (w_shard,), x, gather=gather, reshard_after_forward=reshard)
        return kernels.all_reduce(jnp.sum(jnp.sin(y)), ("data", "fsdp"))

    specs = (P("fsdp", None), P(("data", "fsdp"), None))
    f = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())
    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    val, (dw, dx) = fn(w, x)

    def ref(w, x):
        return jnp.sum(jnp.sin(jnp.tanh(x @ w)))

    ref_val, (ref_dw, ref_dx) = jax.value_and_grad(ref, argnums=(0, 1))(
        np.asarray(w), np.asarray(x)
    )
    utils.assert_close(val, ref_val)
    utils.assert_close(dw, ref_dw, err_msg="dw")
    utils.assert_close(dx, ref_dx, err_msg="dx")
    report = audit.collectives(fn, w, x, mesh=mesh)
    assert len(report.where("all-gather", ("fsdp",))) == gathers
    assert len(report.where("reduce-scatter", ("fsdp",))) == 1


def test_mixed_precision_policy():
    policy = MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)
    assert policy.gather_dtype(jnp.float32) == jnp.bfloat16
    assert policy.grad_reduce_dtype(jnp.float32) == jnp.float32
    keep = MixedPrecision()
    assert keep.gather_dtype(jnp.float32) == jnp.float32
    assert keep.grad_reduce_dtype(jnp.bfloat16) == jnp.bfloat16
    with pytest.raises(TypeError, match=r"MixedPrecision\(reduce_dtype='f33'\): not a dtype"):
        MixedPrecision(reduce_dtype="f33")
    with pytest.raises(TypeError, match=r"MixedPrecision\(output_dtype=.*must be a floating"):
        MixedPrecision(output_dtype=jnp.int32)
