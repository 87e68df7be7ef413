"""RMSNorm is a drop-in for nnx.RMSNorm: flax's constructor arguments and `mask=`, same values.

The reference is flax's own `nnx.RMSNorm` on one device, under `jit` as the
shardlax layer always is (eager flax rounds differently from its own jitted
self by an ulp, so jit against jit is the bitwise comparison); gradients
within the f32 tolerance.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shardlax
from tests import utils

#: (name, constructor kwargs, x shape, mask shape or None): each a flax argument in use.
CASES = [
    ("default", {}, (4, 6, 8), None),
    ("mask_features", {}, (4, 6, 8), (8,)),
    ("mask_full", {}, (4, 6, 8), (4, 6, 8)),
    ("two_reduction_axes", dict(reduction_axes=(-2, -1)), (4, 6, 8), None),
    (
        "other_feature_axis",
        dict(reduction_axes=-2, feature_axes=-2, num_features=6),
        (4, 6, 8),
        None,
    ),
    ("no_scale_masked", dict(use_scale=False), (4, 6, 8), (6, 8)),
    ("slow_variance_eps", dict(use_fast_variance=False, epsilon=1e-2), (4, 6, 8), None),
    ("bf16", dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), (4, 6, 8), None),
    ("rank_2", {}, (4, 8), (8,)),
]


def _build(cls, kw, **extra):
    kw = dict(kw)
    num = kw.pop("num_features", 8)
    return cls(num, scale_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0), **kw, **extra)


def test_constructor_and_call_signatures_match_flax():
    """Every nnx.RMSNorm argument exists, same kind, same default (axis_name: the model axis)."""
    ours = inspect.signature(shardlax.nn.RMSNorm.__init__).parameters
    for name, p in inspect.signature(nnx.RMSNorm.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        if name == "axis_name":  # flax: None (no cross-device statistics); here the TP axis
            assert ours[name].default == "model"
        elif name != "scale_metadata":
            assert ours[name].default is p.default or ours[name].default == p.default, name
    assert list(inspect.signature(shardlax.nn.RMSNorm.__call__).parameters) == ["self", "x", "mask"]


@pytest.mark.standard_dtype_promotion  # flax's RMSNorm promotes bf16 with f32 statistics
@pytest.mark.parametrize(
    ("mesh_shape", "sp"), [((1, 1, 2), False), ((2, 1, 2), False), ((1, 1, 2), True)], ids=str
)
def test_values_and_gradients_match_nnx_rmsnorm(mesh_shape, sp):
    mesh = utils.mesh(*mesh_shape)
    # under SP the sequence dim is split: neither reduced nor a feature dim (see the errors)
    cases = [c for c in CASES if not (sp and (len(c[2]) < 3 or "reduction_axes" in c[1]))]
    ours = [_build(shardlax.nn.RMSNorm, kw, mesh=mesh, sequence_parallel=sp) for _, kw, *_ in cases]
    refs = [_build(nnx.RMSNorm, kw) for _, kw, *_ in cases]
    keys = jax.random.split(jax.random.key(0), 3 * len(cases))
    xs = [jax.random.normal(keys[3 * i], c[2]) for i, c in enumerate(cases)]
    masks = [
        None if c[3] is None else jax.random.bernoulli(keys[3 * i + 1], 0.6, c[3])
        for i, c in enumerate(cases)
    ]
    cots = [jax.random.normal(keys[3 * i + 2], c[2]) for i, c in enumerate(cases)]

    def run(layers, xs):
        def loss(layers, xs):
            terms = [
                jnp.sum(layer(x, mask=m).astype(jnp.float32) * c)
                for layer, x, m, c in zip(layers, xs, masks, cots, strict=True)
            ]
            return sum(terms)

        ys = [layer(x, mask=m) for layer, x, m in zip(layers, xs, masks, strict=True)]
        return ys, nnx.grad(loss, argnums=(0, 1))(layers, xs)

    ys, (g, dxs) = nnx.jit(run)(ours, xs)
    ys_ref, (g_ref, dxs_ref) = nnx.jit(run)(refs, xs)
    for i, (name, kw, *_) in enumerate(cases):
        assert ys[i].dtype == ys_ref[i].dtype, name
        dtype = kw.get("dtype", jnp.float32)
        if mesh_shape[0] == 1 and not sp:  # per-device shapes as on one device: bit for bit
            np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(ys_ref[i]), err_msg=name)
        else:  # a token shard compiles to another fusion (a masked mean rounds 1 ulp apart)
            utils.assert_close(ys[i], ys_ref[i], dtype, err_msg=name)
        utils.assert_close(dxs[i], dxs_ref[i], dtype, err_msg=f"dx {name}")
        if kw.get("use_scale", True):
            utils.assert_close(g[i]["scale"][...], g_ref[i]["scale"][...], dtype, err_msg=name)


def test_metadata_and_with_partitioning_initializers():
    mesh = utils.mesh(1, 1, 2)
    norm = shardlax.nn.RMSNorm(
        8, mesh=mesh, rngs=nnx.Rngs(0), scale_metadata={"sharding_metadata": ("embed",)},
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
    )  # fmt: skip
    assert norm.scale.sharding_metadata == ("embed",)
    np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.ones(8))
    assert shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0), axis_name=None).axis_name == "model"


def test_parity_errors():
    mesh = utils.mesh(2, 1, 2)
    with pytest.raises(ValueError, match=r"RMSNorm\(axis_index_groups=\[\[0, 1\]\]\): groups of"):
        shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0), axis_index_groups=[[0, 1]])
    with pytest.raises(TypeError, match=r"RMSNorm\(reduction_axes='x'\): expected an int or"):
        shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0), reduction_axes="x")
    x = jnp.zeros((4, 6, 8))
    norm = shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0), reduction_axes=(0, -1))
    msg = (
        r"RMSNorm\(reduction_axes=\(0, -1\)\): dim 0 of inputs.shape=\(4, 6, 8\) is split over "
        r"mesh axes \('data', 'fsdp'\) \(size 2\); statistics or a scale along it would need"
    )
    with pytest.raises(ValueError, match=msg):
        norm(x)
    sp = shardlax.nn.RMSNorm(6, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True,
                             reduction_axes=1, feature_axes=1)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"dim 1 of inputs.shape=\(4, 6, 8\) is split over mesh axis"
    ):
        sp(x)
    norm = shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0), reduction_axes=3)
    with pytest.raises(ValueError, match=r"reduction_axes=3\): dim 3 is out of range for inputs"):
        norm(x)
    norm = shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0), feature_axes=1, reduction_axes=1)
    with pytest.raises(ValueError, match=r"inputs.shape=\(4, 6, 8\) has 6 features on those dims"):
        norm(x)
    norm = shardlax.nn.RMSNorm(8, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mask.shape=\(6,\) does not broadcast to inputs.shape"):
        norm(x, mask=jnp.ones((6,), bool))
    with pytest.raises(ValueError, match=r"inputs.shape=\(8,\) has no batch dim to split"):
        norm(jnp.zeros((8,)))
